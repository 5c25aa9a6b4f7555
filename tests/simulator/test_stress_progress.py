"""`stress` off a terminal and when stopped early: one plain progress line per finished episode, each episode
written to trajectories.jsonl as it finishes, and a report over what finished when the run is interrupted (Ctrl-C
or SIGTERM). The episode player is replaced here (this tests the orchestration; the real episodes run in
test_stress_integration.py)."""

from __future__ import annotations

import io
import json
import threading

import pytest
from rich.console import Console

import simulator.stress as stress
from gopo_online.config import load_config
from gopo_online.types import Trajectory
from simulator.personas import load_personas


def _run(tmp_path, monkeypatch, stop_after: int | None):
    cfg = load_config()
    personas = load_personas(cfg.simulator.persona_file)[:6]
    calls = []
    lock = threading.Lock()

    def fake_play(*, episode_id, persona, **_):
        with lock:
            calls.append(episode_id)
            if stop_after is not None and len(calls) > stop_after:
                raise KeyboardInterrupt  # as Ctrl-C lands in the main thread's wait
        return Trajectory(
            episode_id=episode_id, scenario_id="s", persona_id=persona.id, status="error", error="simulator: x"
        )

    monkeypatch.setattr(stress, "play_episode", fake_play)
    monkeypatch.setattr(stress, "make_user_simulator", lambda *a, **k: type("U", (), {"max_turns": 2})())
    buf = io.StringIO()
    report = stress.run_stress(
        cfg, personas=personas, sim_client=None, sim_model="m", sim_structured="regex",
        agents_factory=lambda: (None, None, None), concurrency=1, seed=0, out=tmp_path / "stress", target="t",
        console=Console(file=buf, force_terminal=False, width=200),
    )  # fmt: skip
    return report, buf.getvalue()


def test_one_plain_line_per_episode_off_a_tty(tmp_path, monkeypatch):
    report, text = _run(tmp_path, monkeypatch, None)
    lines = [ln for ln in text.splitlines() if ln.startswith("[stress] ") and " turns, errors " in ln]
    assert len(lines) == 6 and lines[-1].startswith("[stress] 6/6 "), text
    assert report["setup"]["interrupted"] is False and report["setup"]["finished_of"] == [6, 6]


def test_interrupted_run_reports_what_finished(tmp_path, monkeypatch):
    report, text = _run(tmp_path, monkeypatch, 3)
    assert "interrupted" in text
    assert report["setup"]["interrupted"] is True and report["setup"]["finished_of"] == [3, 6]
    assert report["overall"]["episodes"] == 3
    out = tmp_path / "stress"
    assert json.loads((out / "report.json").read_text())["setup"]["finished_of"] == [3, 6]
    assert len((out / "trajectories.jsonl").read_text().splitlines()) == 3


def test_sigterm_handler_is_restored(tmp_path, monkeypatch):
    import signal

    before = signal.getsignal(signal.SIGTERM)
    _run(tmp_path, monkeypatch, None)
    assert signal.getsignal(signal.SIGTERM) is before


if __name__ == "__main__":
    pytest.main([__file__])
