"""`gopo-online show`: the episode table and its filters, one dialogue turn by turn, two versions compared, the
HTML page, all at 80 columns. The run folder is written through the real `TrajectoryStore`."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from gopo_online import types as T
from gopo_online.show import Filters, load_episodes, main, pairs, render_html
from gopo_online.trajectory_store import TrajectoryStore


def _gen(version: int, text: str) -> T.Generation:
    return T.Generation(prompt_token_ids=(1, 2), completion_token_ids=(3,), logprobs=(-0.2,), text=text, model="cs",
                      policy_version=version, temperature=1.0, latency_s=0.05)  # fmt: skip


def _turn(i: int, version: int, joint: float, user: str, reply: str, passed: bool = True) -> T.Turn:
    checks = (
        T.ConstraintCheck(skill="apologize", kind="required", target=r"\bsorry\b", passed=True),
        T.ConstraintCheck(skill="offer_refund", kind="action", target="refund", passed=passed),
    )
    return T.Turn(
        index=i,
        user_utterance=user,
        user_meta=T.UserTurnMeta(
            intent="ask_refund",
            emotion="angry",
            satisfaction=2,
            stop=i == 2,
            completed_tasks=("verify_order",) if i == 2 else (),
            state={"satisfaction": 2, "disclosed": ["order_id"], "asked": {"order_id": 2}, "issued": [],
                   "acknowledged": True, "gave_up": False, "no_progress": 0},
        ),  # fmt: skip
        expert_skills=("apologize", "offer_refund"),
        teacher_skills=("apologize", "verify_order"),
        expert_gen=_gen(version, "apologize, offer_refund"),
        cs_reply=reply,
        cs_action="refund",
        cs_gen=_gen(version, reply),
        compliance=T.Compliance(checks=checks),
        judge=T.JudgeScores(
            scores={"helpfulness": 0.75, "empathy": 0.5},
            principles={"polite": 1.0},
            raw='{"helpfulness": 4, "empathy": 3, "note": "ok"}',
        ),  # fmt: skip
        rewards=T.TurnRewards(
            r_expert=0.613,
            r_cs=0.702,
            w_expert=0.5,
            w_cs=0.5,
            joint=joint,
            process=0.25,
            compliance=1.0 if passed else 0.5,
            skill_distance=0.31,
        ),  # fmt: skip
        cost=1.0,
    )


def _traj(eid: str, version: int, joint: float, group: str = "impatient", seed: int = 7, persona: str = "p1",
          scenario: str = "ecommerce") -> T.Trajectory:  # fmt: skip
    turns = (
        _turn(1, version, joint, "Where is my parcel? <b>now</b>", "Sorry for the wait, I can refund it."),
        _turn(2, version, joint, "Fine, refund it then.", "Sorry again: the refund is issued.", passed=False),
    )
    return T.Trajectory(episode_id=eid, scenario_id=scenario, persona_id=persona, persona_group=group, seed=seed,
                      turns=turns, final_satisfaction=3, finished=True)  # fmt: skip


@pytest.fixture
def run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "runs" / "demo"
    with TrajectoryStore(run_dir) as store:
        store.append(_traj("ep-1", 0, 0.412), "trained", 0)
        store.append(_traj("ep-2", 0, 0.150, group="patient", persona="p2", seed=8), "trained", 0)
        store.append(_traj("ep-3", 3, 0.733), "trained", 3)  # same persona + scenario + seed as ep-1, newer policy
        store.append(_traj("ep-4", 1, 0.5, scenario="telecom"), "dropped_stale", 3)
        err = T.Trajectory(episode_id="ep-5", scenario_id="ecommerce", persona_id="p3", persona_group="patient",
                         status="error", error="judge timed out after 60 s")  # fmt: skip
        store.append(err, "error", 3)
        store.dead_letter("not a valid T.Trajectory", b"{}")
    return run_dir


def _show(run_dir: Path, **kw) -> str:
    buf = io.StringIO()
    assert main(run_dir, out=buf, width=80, **kw) == 0
    return buf.getvalue()


def test_filters(run: Path) -> None:
    eps = load_episodes(run)
    assert [e.id for e in eps] == ["ep-1", "ep-2", "ep-3", "ep-4", "ep-5"]  # the dead letter is no episode

    def ids(**f) -> list[str]:
        return [e.id for e in eps if Filters(**f).keep(e)]

    assert ids(group="patient") == ["ep-2", "ep-5"]
    assert ids(scenario="telecom") == ["ep-4"] and ids(status="error") == ["ep-5"]
    assert ids(outcome="dropped_stale") == ["ep-4"] and ids(version=0) == ["ep-1", "ep-2"]
    assert ids(min_reward=0.4, max_reward=0.6) == ["ep-1", "ep-4"]  # an error episode has no reward: left out


def test_list_at_80_columns_keeps_every_number_whole(run: Path) -> None:
    text = _show(run, limit=0)
    assert all(len(line) <= 80 for line in text.splitlines()), text
    for needle in ("ep-1", "ep-5", "0.412", "0.733", "0.150", "dropped_stale", "error"):
        assert needle in text, text
    assert "…" not in text


def test_one_dialogue_turn_by_turn(run: Path) -> None:
    text = _show(run, episode="ep-1")
    assert all(len(line) <= 80 for line in text.splitlines()), text
    flat = re.sub(r"\s+", " ", text)
    for needle in (
        "persona p1 (impatient)",
        "Where is my parcel? <b>now</b>",  # shown as typed, not interpreted as markup
        "intent=ask_refund emotion=angry satisfaction=2",
        "tasks_done=verify_order",
        # the agenda user model's state: only what is set
        "state satisfaction=2 disclosed=order_id asked=order_id:2 acknowledged=yes",
        "apologize, offer_refund",  # the Expert's skills
        "apologize, verify_order (1/2 teacher skills picked)",
        "[refund] Sorry for the wait, I can refund it.",
        "✓ required apologize: \\bsorry\\b",
        "✗ action offer_refund: refund",
        "helpfulness=0.75 empathy=0.50 | polite=1",
        '{"helpfulness": 4, "empathy": 3, "note": "ok"}',
        "r_expert=0.613 r_cs=0.702 w_E=0.50 w_A=0.50 joint=0.412 process=0.250",
        "skill_distance=0.310 cost=1",
    ):
        assert needle in flat, needle
    assert flat.count("turn ") >= 2
    buf = io.StringIO()
    assert main(run, episode="nope", out=buf, width=200) == 2 and "no episode 'nope'" in buf.getvalue()


def test_compare_pairs_same_persona_scenario_seed(run: Path) -> None:
    eps = load_episodes(run)
    assert [(a.id, b.id) for a, b in pairs(eps, 0, 3)] == [("ep-1", "ep-3")]  # ep-2 has no v3 twin
    text = _show(run, compare=(0, 3))
    assert "v0 vs v3: 1 pairs" in text and text.index("ep-1 ·") < text.index("ep-3 ·")
    assert "versions in the (filtered) run: [0, 1, 3]" in _show(run, compare=(0, 9))


def test_html_page_escapes_and_holds_the_same_view(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "page.html"
    _show(run, html_out=out, dialogues=2)
    page = out.read_text()
    assert page.startswith("<!doctype html>") and "<script" not in page
    assert "Where is my parcel? &lt;b&gt;now&lt;/b&gt;" in page and "<b>now</b>" not in page
    assert page.count('class="turn"') == 4 and "judge timed out" in page
    pair_page = render_html("x", load_episodes(run), compare=pairs(load_episodes(run), 0, 3), versions=(0, 3))
    assert 'class="cmp"' in pair_page and "v0 vs v3: 1 pairs" in pair_page


def test_missing_store_is_a_clear_error(tmp_path: Path) -> None:
    buf = io.StringIO()
    assert main(tmp_path, out=buf, width=80) == 2
    assert "no trajectories/ folder" in " ".join(buf.getvalue().split())


CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
)


@pytest.mark.integration
def test_html_page_in_real_headless_chromium(run: Path, tmp_path: Path) -> None:
    """The page in Debian's `chromium`: the browser's DOM holds the table and the dialogue, and the screenshot is a
    drawn page. GOPO_SCREENSHOT_DIR keeps the PNG."""
    import os
    import shutil
    import subprocess

    from PIL import Image

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        # A browser is not part of the product's set-up (the README's two commands do not install one, and a CI
        # box has none): the page's content is checked without it above; this adds the real browser's view.
        pytest.skip("chromium not installed (apt-get install -y chromium to run this check)")
    page = tmp_path / "show.html"
    _show(run, html_out=page, dialogues=1)
    url = page.resolve().as_uri()

    def chrome(*args: str) -> subprocess.CompletedProcess:
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args, url]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)

    dom = chrome("--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    for needle in ("ep-5", "judge timed out after 60 s", "[refund]", "r_expert=0.613", "Where is my parcel?"):
        assert needle in dom.stdout, needle
    assert "<b>now</b>" not in dom.stdout  # the utterance stayed text in the browser too

    shot_dir = Path(os.environ.get("GOPO_SCREENSHOT_DIR") or tmp_path)
    shot_dir.mkdir(parents=True, exist_ok=True)
    png = shot_dir / "show.png"
    shot = chrome(f"--screenshot={png}", "--window-size=1200,1400", "--hide-scrollbars")
    assert shot.returncode == 0 and png.is_file(), shot.stderr[-2000:]
    with Image.open(png) as im:
        assert im.size == (1200, 1400)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text and table lines drawn, not one flat colour


def test_a_stress_output_folder_is_read_too(tmp_path: Path) -> None:
    out = tmp_path / "stress"
    out.mkdir()
    (out / "trajectories.jsonl").write_text(
        _traj("s-1", 0, 0.2).to_json() + "\n" + _traj("s-2", 0, 0.3).to_json() + "\n"
    )
    assert [(e.id, e.outcome) for e in load_episodes(out)] == [("s-1", "-"), ("s-2", "-")]


def test_long_group_and_scenario_names_move_below_rather_than_fold(tmp_path: Path) -> None:
    run_dir = tmp_path / "long"
    group, scenario = "hard/preference_learning", "ecommerce/order_delay/481813"
    with TrajectoryStore(run_dir) as store:
        store.append(_traj("ep-0-0000008", 1, 0.216, group=group, scenario=scenario), "dropped_stale", 2)
    text = _show(run_dir)
    assert all(len(line) <= 80 for line in text.splitlines()), text
    lines = text.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("ep-0-0000008"))
    assert "dropped_stale" in lines[row] and "0.216" in lines[row]
    assert lines[row + 1].strip() == f"{group} · {scenario}"  # whole names, one line
