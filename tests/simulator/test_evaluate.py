"""`gopo-online eval` without a server: the run folder's adapter lookup, pairing, per-episode metrics and the report
(play_episode with small in-test agents; the real vLLM run is tests/simulator/test_evaluate_integration.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from safetensors.numpy import save_file
from typer.testing import CliRunner

from gopo_online.cli import app
from gopo_online.config import GopoConfig
from gopo_online.paired import EvalError
from gopo_online.types import JudgeScores, UserTurnMeta
from simulator.evaluate import (
    METRICS,
    Arm,
    build_eval_report,
    make_arm,
    paired_jobs,
    play_pairs,
    plot_eval_report,
    print_eval_report,
    run_adapters,
)
from simulator.personas import load_personas
from simulator.teacher import teacher_skills
from simulator.user import UserTurn

CFG = GopoConfig()


# --------------------------------------------------------------------------- adapter lookup


def _adapter(d: Path, rank: int = 8) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    save_file({"w": np.zeros((2, 2), dtype=np.float32)}, str(d / "adapter_model.safetensors"))
    return d


def _export(run: Path, version: int, agents: tuple[str, ...] = ("expert", "cs")) -> Path:
    """The layout WeightSync writes: weights/<agent>/lora-v<N>/ (a PEFT adapter folder each)."""
    for a in agents:
        _adapter(run / "weights" / a / f"lora-v{version}")
    return run / "weights"


def test_latest_version_is_picked_and_a_version_can_be_asked_for(tmp_path):
    run = tmp_path / "r1"
    _export(run, 0)
    _export(run, 3)
    _export(run, 12)
    v, dirs = run_adapters(run)
    assert v == 12 and dirs == {a: run / "weights" / a / "lora-v12" for a in ("expert", "cs")}
    assert run_adapters(run, 3)[0] == 3


def test_half_written_or_one_agent_versions_are_ignored(tmp_path):
    run = tmp_path / "r"
    _export(run, 2)
    _export(run, 6, agents=("expert",))  # cs of v6 missing: v6 is not complete
    _adapter(run / "weights" / "cs" / ".lora-v6.tmp-abc")  # a write in progress (WeightSync's temp folder)
    assert run_adapters(run)[0] == 2


@pytest.mark.parametrize(
    ("setup", "version", "match"),
    [
        (lambda r: None, None, "does not exist"),
        (lambda r: r.mkdir(), None, "no trained adapters"),
        (lambda r: _export(r, 1), 7, r"no adapters of version 7; available: \[1\]"),
        (lambda r: (_export(r, 1), (r / "weights/cs/lora-v1/adapter_model.safetensors").unlink()), None, "complete"),
        (lambda r: (_export(r, 1), (r / "weights/cs/lora-v1/adapter_model.safetensors").write_bytes(b"x")), None,
         "complete"),
    ],
)  # fmt: skip
def test_bad_run_folders_are_named(tmp_path, setup, version, match):
    run = tmp_path / "run"
    setup(run)
    with pytest.raises(EvalError, match=match):
        run_adapters(run, version)


def test_arms(tmp_path):
    _export(tmp_path / "mine", 4)
    a = make_arm("a", tmp_path / "mine", CFG)
    assert a.label == "mine@v4" and a.models == {"expert": "a-expert-v4", "cs": "a-cs-v4"}
    assert set(a.adapters) == set(a.models.values())
    b = make_arm("b", "base", CFG)
    assert b.models == {"expert": CFG.model.served_name, "cs": CFG.model.served_name} and b.adapters == {}
    with pytest.raises(EvalError, match="--version"):
        make_arm("b", "base", CFG, version=2)
    with pytest.raises(EvalError, match="neither 'base' nor an existing run folder"):
        make_arm("b", "bsae", CFG)


def test_cli_names_a_missing_run(tmp_path):
    res = CliRunner().invoke(app, ["eval", "--run", str(tmp_path / "nope")])
    assert res.exit_code == 2
    assert "does not exist" in res.output and "Traceback" not in res.output


# --------------------------------------------------------------------------- pairing and report


class SeedEchoUser:
    """Speaks a line that depends only on the seed it is given; stops after the agent's first reply."""

    def __init__(self):
        self.calls = []

    def respond(self, *, persona, instance, history, turn, seed=None):
        self.calls.append((persona.id, instance.instance_id, turn, seed))
        meta = UserTurnMeta(intent="ask", emotion="neutral", satisfaction=3, stop=turn > 1, completed_tasks=())
        return UserTurn(utterance=f"hello {seed}", meta=meta, raw="{}", attempts=1)


class TeacherExpert:
    """Picks exactly the teacher sequence: ESNDCG = 1 (gopo eq 6 of T against itself)."""

    def __init__(self, instances):
        self.instances = instances

    def decide(self, state):
        return teacher_skills(self.instances[state.episode_id.rsplit("-", 1)[0]], state), None


class OffTeacherExpert(TeacherExpert):
    """Picks one pool skill the teacher does not: no relevant skill, ESNDCG = 0."""

    def decide(self, state):
        teach = set(teacher_skills(self.instances[state.episode_id.rsplit("-", 1)[0]], state))
        return (next(s for s in state.skill_names if s not in teach),), None


class PlainCS:
    def respond(self, state):
        return "Thank you, let me check that for you.", "chat", None, None


class HalfJudge:
    def score(self, state, reply, action):
        return JudgeScores(
            scores={k: 0.5 for k in (*CFG.judge.dimensions, *CFG.judge.gre_dimensions)},
            principles={k: 1.0 for k in CFG.judge.principles},
        )


@pytest.fixture(scope="module")
def played():
    personas = load_personas(split="heldout")[:6]
    jobs = paired_jobs(personas, CFG.simulator.scenarios, seed=5)
    instances = {j.pair_id: j.instance for j in jobs}
    arms = (Arm("a", "teacher", {"expert": "x", "cs": "x"}, 1), Arm("b", "off", {"expert": "y", "cs": "y"}, 0))
    experts = {"a": TeacherExpert(instances), "b": OffTeacherExpert(instances)}
    user = SeedEchoUser()
    trajs = play_pairs(
        CFG,
        jobs=jobs,
        arms=arms,
        agents_for=lambda arm: (experts[arm.key], PlainCS()),
        user_sim=user,
        judge=HalfJudge(),
        concurrency=2,
        max_turns=1,
        console=Console(file=io.StringIO()),
    )
    report = build_eval_report(jobs, trajs, arms, CFG, {"seed": 5}, resamples=200)
    return jobs, trajs, user, report


def test_paired_jobs_are_deterministic_and_alternate_families():
    personas = load_personas(split="heldout")[:4]
    j1, j2 = (
        paired_jobs(personas, ["ecommerce", "food_delivery"], 1),
        paired_jobs(personas, ["ecommerce", "food_delivery"], 1),
    )
    assert [(j.persona.id, j.instance.instance_id, j.seed) for j in j1] == [
        (j.persona.id, j.instance.instance_id, j.seed) for j in j2
    ]
    assert [j.instance.family for j in j1] == ["ecommerce", "food_delivery"] * 2
    assert [j.seed for j in j1] == [100_000, 100_001, 100_002, 100_003]
    with pytest.raises(EvalError, match="scenarios is empty"):
        paired_jobs(personas, [], 0)


def test_both_arms_play_the_same_persona_instance_and_seeds(played):
    jobs, trajs, user, report = played
    for j in jobs:
        ta, tb = trajs[(j.pair_id, "a")], trajs[(j.pair_id, "b")]
        assert ta.status == tb.status == "ok"
        assert (
            (ta.persona_id, ta.scenario_id, ta.seed)
            == (tb.persona_id, tb.scenario_id, tb.seed)
            == (
                j.persona.id,
                j.instance.instance_id,
                j.seed,
            )
        )
        assert ta.turns[0].user_utterance == tb.turns[0].user_utterance
    # the simulator was asked the same (persona, instance, turn, seed) twice per pair: once per arm
    calls = sorted(user.calls)
    assert calls[::2] == calls[1::2] and len(calls) == 2 * 2 * len(jobs)
    for row in report["pairs"]:
        a, b = row["arms"]["a"], row["arms"]["b"]
        assert a["persona_id"] == b["persona_id"] == row["persona_id"]
        assert a["scenario_id"] == b["scenario_id"] == row["scenario_id"] and a["seed"] == b["seed"] == row["seed"]


def test_report_numbers_by_hand(played):
    _, _, _, report = played
    o = report["overall"]
    assert report["same_first_user_turn"] == 1.0
    assert set(o) == set(METRICS) and report["pairs_total"] == 6 and report["errors"] == {"a": 0, "b": 0}
    # one turn per episode: ESNDCG 1 (teacher) vs 0 (no teacher skill) in every pair -> diff 1, CI [1, 1]
    assert (o["esndcg"]["mean_a"], o["esndcg"]["mean_b"], o["esndcg"]["n"]) == (1.0, 0.0, 6)
    assert o["esndcg"]["ci_low"] == o["esndcg"]["ci_high"] == 1.0 and o["esndcg"]["excludes_zero"]
    # the judge gives 0.5 everywhere: R^A = 0.5 in both arms, diff 0, CI [0, 0]
    assert o["r_a"]["mean_a"] == o["r_a"]["mean_b"] == pytest.approx(0.5) and o["r_a"]["diff"] == 0.0
    assert not o["r_a"]["excludes_zero"]
    # joint at turn 1 (gopo eq 10): w^E = w_expert_start = 0.3, w^A = 0.7: A 0.3*1 + 0.7*0.5 = 0.65, B 0.35
    assert o["joint"]["mean_a"] == pytest.approx(0.65) and o["joint"]["mean_b"] == pytest.approx(0.35)
    assert o["joint"]["diff"] == pytest.approx(0.3) and o["joint"]["ci_low"] == pytest.approx(0.3)
    # the user stops after reply 1 in both arms: finish rate 1, satisfaction 3, no voucher cost
    assert o["finish_rate"]["diff"] == 0.0 and o["satisfaction"]["mean_a"] == 3.0 and o["cost_rate"]["mean_a"] == 0.0
    assert sum(g["esndcg"]["n"] for g in report["groups"].values()) == 6
    json.dumps(report)  # JSON-safe


def test_errored_episode_drops_its_pair_and_is_counted(played):
    jobs, trajs, _, _ = played
    broken = dict(trajs)
    key = (jobs[0].pair_id, "b")
    broken[key] = trajs[key].model_copy(update={"status": "error", "error": "turn 1 cs: boom"})
    arms = (Arm("a", "A", {}, 1), Arm("b", "B", {}, 0))
    rep = build_eval_report(jobs, broken, arms, CFG, {"seed": 0}, resamples=100)
    assert rep["errors"] == {"a": 0, "b": 1} and rep["overall"]["esndcg"]["n"] == 5


def test_table_fits_80_columns_and_png_is_written(played, tmp_path):
    _, _, _, report = played
    report = json.loads(json.dumps(report))
    report["arms"]["a"]["label"] = "bench-learning-lr-20261201-2014@v12"
    # the widest persona group label the bank can produce
    report["groups"]["easy/preference_learning"] = next(iter(report["groups"].values()))
    buf = io.StringIO()
    print_eval_report(report, Console(file=buf, width=80, record=True))
    text = buf.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text and "easy/preference_learning" in text and "+1.000" in text
    for label in ("ESNDCG", "joint reward", "R^A (judge)", "TSE", "satisfaction", "finish rate", "cost rate"):
        assert label in text
    plot_eval_report(report, tmp_path / "report.png")
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
