"""`gopo-online bench --only learning`: does training help? A run at the configured lr vs an lr-0 control.

1. `train` twice for `minutes` (default 30) each, with the same config and seeds (persona sampling, dispatch order,
   learner init): once at `learner.lr`, once at `learner.lr = 0`. The control runs the very same loop (rollouts,
   rewards, steps, pushes), only its adapters never move: LoRA B starts at zero, so its policy stays the base model.
   The difference between the arms is therefore what the updates did, not what serving adapters or sampling do.
2. `eval --run <lr run> --against <lr-0 run>` on the held-out persona split: paired episodes, per metric both arms'
   means and the paired difference with its 95 % bootstrap CI (simulator/evaluate.py).

Rows (gopo_online.bench format) go into results/bench.json: one per metric (value = mean difference lr - lr0, with
both means, the CI and n in the context) plus the training budget each arm got. Every row names the simulator and
judge modes, because the result depends on them (a 135M simulator and judge give a weak signal).

The upper rooms are reached by module path (`workers.controller:train`, `simulator.evaluate:main`), as the CLI does,
so this base module imports none of them.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gopo_online.bench import Row, _row
from gopo_online.config import GopoConfig, load_config
from gopo_online.metrics_log import read_metrics

DEFAULT_MINUTES = 30.0


def _call(target: str, *args: Any, **kwargs: Any) -> Any:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)(*args, **kwargs)


def arm_overrides(name: str, lr: float, minutes: float) -> list[str]:
    """The overrides of one training arm (added after the user's own, so they win)."""
    return [
        f"run.name='{name}'",
        f"learner.lr={lr!r}",
        "run.resume=false",
        f"run.max_minutes={minutes!r}",
        "dashboard.enabled=false",
    ]


def modes(cfg: GopoConfig) -> dict[str, Any]:
    """The simulator and judge modes a result was measured with (they bound what learning can show)."""
    sim = cfg.model_dump(mode="json")["simulator"]
    backend = cfg.serving.external_model if cfg.serving.simulator == "external" else cfg.model.served_name
    return {
        "simulator": f"{cfg.serving.simulator}:{backend}",
        "judge": f"{cfg.serving.simulator}:{backend} scoring={cfg.judge.scoring}",
        "simulator_mode": {k: v for k, v in sim.items() if k not in ("persona_file", "split", "scenarios")},
    }


def _trained(run_dir: Path) -> dict[str, Any]:
    """What an arm's training got done, from its run folder (controller.json, learner_metrics.jsonl)."""
    state_path, metrics_path = run_dir / "controller.json", run_dir / "learner_metrics.jsonl"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    # the file is the learner's event log: count its step events, not its lines (pushes are events too)
    events = read_metrics(metrics_path)[0] if metrics_path.is_file() else []
    steps = sum(e["kind"] == "learner" for e in events)
    return {
        "episodes": state.get("finished", 0),
        "episode_errors": state.get("errors", 0),
        "learner_steps": steps,
        "stop": (state.get("runs") or [{}])[-1].get("reason"),
    }


def learning_rows(
    report: dict[str, Any],
    trained: dict[str, dict[str, Any]],
    context: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> list[Row]:
    """bench rows from an eval report (A = lr run, B = lr-0 run) and the two arms' training summaries; `context`
    goes on every metric row, `extra` on the training rows only."""
    extra = extra or {}
    rows = []
    for metric, s in report["overall"].items():
        if s["n"] == 0:
            continue  # no complete pair: nothing measured (the eval report lists the errors)
        rows.append(
            _row(
                "learning",
                metric,
                s["diff"],
                "diff",
                lr=round(s["mean_a"], 4),
                lr0=round(s["mean_b"], 4),
                ci=[round(s["ci_low"], 4), round(s["ci_high"], 4)],
                n=s["n"],
                excludes_zero=s["excludes_zero"],
                **context,
            )
        )
    for arm, t in trained.items():
        rows.append(_row("learning", f"train.{arm}.episodes", t["episodes"], "episodes", **t, **extra))
    return rows


def unmoved_adapters(run_dir: Path) -> dict[str, bool]:
    """Per agent: are the LoRA B matrices of the run's latest exported adapter still all zero (the state LoRA starts
    in)? For an lr-0 control this proves its policy is the base model, however long it trained."""
    from safetensors.torch import load_file

    from gopo_online.serving.weights import WeightSync

    sync = WeightSync.for_run(run_dir)
    versions = sync.versions()
    if not versions:
        return {}
    out: dict[str, bool] = {}
    for agent in sync.agents:
        tensors = load_file(str(sync.path(agent, versions[-1]) / "adapter_model.safetensors"))
        bs = [t for name, t in tensors.items() if "lora_B" in name]
        out[agent] = bool(bs) and all(bool((t == 0).all()) for t in bs)
    return out


def bench_learning(
    cfg: GopoConfig,
    *,
    config_path: Path | None = None,
    overrides: Sequence[str] = (),
    minutes: float | None = None,
    control_minutes: float | None = None,
    personas: int = 20,
    max_turns: int | None = None,
    concurrency: int = 4,
) -> list[Row]:
    """Train at lr for `minutes` (default 30) and at lr=0 for `control_minutes` (default: the same), then eval the lr
    run against the lr-0 run.

    A shorter control is sound because its weights cannot move (lr 0, LoRA B starts at zero): the bench checks that
    the control's last exported adapters still have all-zero B matrices (`unmoved_adapters`) and refuses to report
    otherwise. `config_path` / `overrides` are the user's (the spawned learner and workers reload the config from
    them). Run folders: output_dir/<run.name>-learning-<time>-{lr,lr0}; the eval report goes into the lr run's folder.
    """
    minutes = DEFAULT_MINUTES if minutes is None else float(minutes)
    control = minutes if control_minutes is None else float(control_minutes)
    if minutes <= 0 or control <= 0:
        raise ValueError(f"bench learning: minutes must be > 0, got {minutes} (control {control})")
    if cfg.learner.lr <= 0:
        raise ValueError(f"bench learning compares learner.lr = {cfg.learner.lr} with lr = 0: set a positive lr")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    arms = {"lr": cfg.learner.lr, "lr0": 0.0}
    run_dirs: dict[str, Path] = {}
    trained: dict[str, dict[str, Any]] = {}
    arm_cfgs: dict[str, GopoConfig] = {}
    for tag, lr in arms.items():
        arm_minutes = minutes if tag == "lr" else control
        sets = [*overrides, *arm_overrides(f"{cfg.run.name}-learning-{stamp}-{tag}", lr, arm_minutes)]
        arm_cfg = load_config(config_path, sets)
        code = _call("workers.controller:train", arm_cfg, spawn=True, config_path=config_path, overrides=sets)
        run_dirs[tag] = arm_cfg.run.run_dir
        trained[tag] = {"lr": lr, "minutes": arm_minutes, "exit_code": code or 0, **_trained(arm_cfg.run.run_dir)}
        arm_cfgs[tag] = arm_cfg
        if code:
            raise RuntimeError(f"bench learning: training arm {tag} (lr={lr}) exited with {code}: {trained[tag]}")
        if str(trained[tag].get("stop") or "").startswith("interrupted"):
            # Ctrl-C / SIGTERM stops `train` in order with rc 0; the bench must stop too, not start the next arm
            raise KeyboardInterrupt(f"bench learning: training arm {tag} was interrupted; no further arm or eval")
    unmoved = unmoved_adapters(run_dirs["lr0"])
    if unmoved and not all(unmoved.values()):
        raise RuntimeError(f"bench learning: the lr-0 control's adapters moved ({unmoved}): no valid control")
    trained["lr0"]["adapters_unmoved"] = unmoved
    report = _call(
        "simulator.evaluate:main",
        arm_cfgs["lr"],
        run=run_dirs["lr"],
        against=str(run_dirs["lr0"]),
        n_personas=personas,
        seed=cfg.run.seed,
        concurrency=concurrency,
        max_turns=max_turns,
    )
    m = modes(cfg)
    context = {
        "simulator": m["simulator"],
        "judge": m["judge"],
        "minutes": minutes,
        "control_minutes": control,
        "learner_lr": cfg.learner.lr,
        "versions": {"lr": report["arms"]["a"]["version"], "lr0": report["arms"]["b"]["version"]},
        "runs": {k: str(v) for k, v in run_dirs.items()},
        "personas": report["setup"]["n_personas"],
    }
    if trained["lr"]["learner_steps"] == 0:
        # a budget too short for one learner step leaves the lr arm at its initial (zero-B) adapters
        context["warning"] = "the lr arm made no learner step: both arms are the untrained policy"
    return learning_rows(report, trained, context, {"simulator_mode": m["simulator_mode"]})
