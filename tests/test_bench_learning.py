"""`bench --only learning` driver (gopo_online/bench_learning.py) without training: what each arm is started with,
how the eval report becomes bench rows, and that the bench runs only when asked for."""

from __future__ import annotations

import json

import pytest

from gopo_online import bench, bench_learning
from gopo_online.config import ConfigError, load_config


def test_arm_overrides_give_two_configs_that_differ_only_in_lr_and_name():
    user = ["run.seed=7", "simulator.max_turns=2"]
    cfgs = {
        tag: load_config(None, [*user, *bench_learning.arm_overrides(f"x-{tag}", lr, 1.5)])
        for tag, lr in (("lr", 3e-5), ("lr0", 0.0))
    }
    a, b = (c.model_dump(mode="json") for c in cfgs.values())
    assert a["learner"]["lr"] == 3e-5 and b["learner"]["lr"] == 0.0
    assert a["run"]["name"] == "x-lr" and b["run"]["name"] == "x-lr0"
    for d in (a, b):
        assert d["run"]["seed"] == 7 and d["run"]["max_minutes"] == 1.5 and d["run"]["resume"] is False
        d["learner"].pop("lr")
        d["run"].pop("name")
    assert a == b  # same seeds, same budget, same everything else


def test_lr_zero_is_a_valid_config_and_a_negative_lr_is_not():
    assert load_config(None, ["learner.lr=0"]).learner.lr == 0.0
    with pytest.raises(ConfigError, match="learner.lr"):
        load_config(None, ["learner.lr=-1e-5"])


def _summary(diff, n=4):
    return {"n": n, "mean_a": 0.5 + diff, "mean_b": 0.5, "diff": diff, "ci_low": diff - 0.1, "ci_high": diff + 0.1,
            "excludes_zero": abs(diff) > 0.1, "level": 0.95}  # fmt: skip


def test_driver_trains_both_arms_with_the_same_seed_then_evals_lr_against_lr0(tmp_path, monkeypatch):
    calls = []

    def fake_call(target, *args, **kw):
        calls.append((target, args, kw))
        if target == "workers.controller:train":
            run_dir = args[0].run.run_dir
            run_dir.mkdir(parents=True)
            (run_dir / "controller.json").write_text(
                json.dumps({"finished": 9, "errors": 1, "runs": [{"reason": "max_minutes=0.5 reached"}]})
            )
            # the learner's event log: two steps and a push (the push is no step)
            events = [{"kind": "push", "step": 0}, {"kind": "learner", "step": 1}, {"kind": "learner", "step": 2}]
            (run_dir / "learner_metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + '{"kin')
            return 0
        assert target == "simulator.evaluate:main"
        return {
            "overall": {"esndcg": _summary(0.3), "joint": _summary(0.05), "tse": _summary(0.0, n=0)},
            "arms": {"a": {"version": 2}, "b": {"version": 2}},
            "setup": {"n_personas": 4},
        }

    monkeypatch.setattr(bench_learning, "_call", fake_call)
    cfg = load_config(None, [f"run.output_dir='{tmp_path}'", "run.seed=4", "learner.lr=2e-5"])
    rows = bench_learning.bench_learning(
        cfg, overrides=[f"run.output_dir='{tmp_path}'", "run.seed=4"], minutes=0.5, personas=4
    )
    (t1, (c1,), k1), (t2, (c2,), k2), (t3, (c3,), k3) = calls
    assert t1 == t2 == "workers.controller:train" and t3 == "simulator.evaluate:main"
    assert (c1.learner.lr, c2.learner.lr) == (2e-5, 0.0) and c1.run.seed == c2.run.seed == 4
    # the spawned children reload the config from the same overrides, so they must carry the arm's lr and name
    assert "learner.lr=0.0" in k2["overrides"] and f"run.name='{c2.run.name}'" in k2["overrides"]
    assert k3["run"] == c1.run.run_dir and k3["against"] == str(c2.run.run_dir) and k3["n_personas"] == 4
    by = {r["metric"]: r for r in rows}
    assert "tse" not in by  # no complete pair: no row rather than a made-up number
    assert by["esndcg"]["value"] == pytest.approx(0.3) and by["esndcg"]["ci"] == [0.2, 0.4]
    assert by["esndcg"]["lr"] == 0.8 and by["esndcg"]["lr0"] == 0.5 and by["esndcg"]["excludes_zero"]
    assert by["esndcg"]["simulator"] == "same:policy" and "scoring=" in by["esndcg"]["judge"]
    assert by["train.lr.episodes"]["value"] == 9 and by["train.lr.episodes"]["episode_errors"] == 1
    assert by["train.lr0.episodes"]["learner_steps"] == 2 and by["train.lr0.episodes"]["lr"] == 0.0
    assert "simulator_mode" in by["train.lr.episodes"] and "warning" not in by["esndcg"]
    json.dumps(rows)


def test_an_arm_without_a_learner_step_is_flagged(tmp_path, monkeypatch):
    def fake_call(target, *args, **kw):
        if target == "workers.controller:train":
            args[0].run.run_dir.mkdir(parents=True)
            return 0  # no controller.json, no learner_metrics.jsonl: nothing trained
        return {"overall": {"esndcg": _summary(0.0)}, "arms": {"a": {"version": 0}, "b": {"version": 0}},
                "setup": {"n_personas": 4}}  # fmt: skip

    monkeypatch.setattr(bench_learning, "_call", fake_call)
    out = [f"run.output_dir='{tmp_path}'"]  # the arms reload the config from the overrides: they must carry it
    rows = bench_learning.bench_learning(load_config(None, out), overrides=out, minutes=0.1)
    by = {r["metric"]: r for r in rows}
    assert "no learner step" in by["esndcg"]["warning"] and by["train.lr.episodes"]["learner_steps"] == 0


def test_a_failed_training_arm_stops_the_bench(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_learning, "_call", lambda target, *a, **k: 3)
    cfg = load_config(None, [f"run.output_dir='{tmp_path}'"])
    with pytest.raises(RuntimeError, match="arm lr .* exited with 3"):
        bench_learning.bench_learning(cfg, minutes=0.1)


def test_bad_options_are_named():
    cfg = load_config(None, ["learner.lr=0"])
    with pytest.raises(ValueError, match="positive lr"):
        bench_learning.bench_learning(cfg, minutes=1)
    with pytest.raises(ValueError, match="minutes must be > 0"):
        bench_learning.bench_learning(load_config(), minutes=0)


def test_learning_runs_only_when_named(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(bench, "BENCHES", {"math": "m:f", "learning": "l:f"})

    def fake_resolve(target):
        def fn(cfg, *, minutes=None):
            ran.append((target, minutes))
            return []

        return fn

    monkeypatch.setattr(bench, "_resolve", fake_resolve)
    bench.main(load_config(), [], tmp_path / "b.json", minutes=2.0, personas=3)
    assert ran == [("m:f", 2.0)]
    bench.main(load_config(), ["learning"], tmp_path / "b.json", minutes=2.0, personas=3)
    assert ran[-1] == ("l:f", 2.0)  # personas is not one of fn's parameters, so it is not passed


def test_an_interrupted_arm_stops_the_bench(tmp_path, monkeypatch):
    """Ctrl-C during the lr arm stopped `train` in order (rc 0); the bench went on to start the lr-0 arm."""
    calls = []

    def fake_call(target, *args, **kw):
        calls.append(target)
        run_dir = args[0].run.run_dir
        run_dir.mkdir(parents=True)
        (run_dir / "controller.json").write_text(json.dumps({"runs": [{"reason": "interrupted (Ctrl-C / SIGTERM)"}]}))
        return 0

    monkeypatch.setattr(bench_learning, "_call", fake_call)
    out = [f"run.output_dir='{tmp_path}'"]
    with pytest.raises(KeyboardInterrupt, match="arm lr was interrupted"):
        bench_learning.bench_learning(load_config(None, out), overrides=out, minutes=0.1)
    assert calls == ["workers.controller:train"]


def test_control_arm_budget_and_unmoved_adapter_check(tmp_path, monkeypatch):
    """--control-minutes: the lr-0 arm may run shorter (its weights cannot move); the bench checks that they did not
    (all LoRA B matrices of its last export still zero) and refuses a control whose adapters moved."""
    import torch
    from safetensors.torch import save_file

    budgets = {}

    def fake_call(target, *args, b_value=0.0, **kw):
        if target == "workers.controller:train":
            c = args[0]
            budgets[c.learner.lr] = c.run.max_minutes
            for agent in ("expert", "cs"):
                d = c.run.run_dir / "weights" / agent / "lora-v3"
                d.mkdir(parents=True)
                b = torch.full((8, 4), 0.0 if c.learner.lr == 0 else 0.1)
                save_file(
                    {"x.lora_A.weight": torch.ones(4, 8), "x.lora_B.weight": b}, str(d / "adapter_model.safetensors")
                )
            return 0
        return {"overall": {"esndcg": _summary(0.1)}, "arms": {"a": {"version": 3}, "b": {"version": 3}},
                "setup": {"n_personas": 4}}  # fmt: skip

    monkeypatch.setattr(bench_learning, "_call", fake_call)
    out = [f"run.output_dir='{tmp_path}'", "learner.lr=1e-4"]
    rows = bench_learning.bench_learning(load_config(None, out), overrides=out, minutes=2.0, control_minutes=0.5)
    assert budgets == {1e-4: 2.0, 0.0: 0.5}
    by = {r["metric"]: r for r in rows}
    assert by["train.lr0.episodes"]["adapters_unmoved"] == {"cs": True, "expert": True}
    assert by["esndcg"]["control_minutes"] == 0.5
    lr_run = next(p for p in tmp_path.iterdir() if p.name.endswith("-lr"))
    assert bench_learning.unmoved_adapters(lr_run) == {"cs": False, "expert": False}
