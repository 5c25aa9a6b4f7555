"""`gopo-online bench --only peer`: our loop against TRL's `GRPOTrainer` on the same model, box and reward.

Theirs: TRL's GRPOTrainer (a bench-only dependency, `TRL_PIN`, installed into the environment on first use), on a
single-turn version of the CS agent's task. Each prompt is the CS agent's own prompt for one case of the labelled
judge set (system prompt with the business context, the dialogue so far, the user's message with the Expert's
skills as hard constraints: `CSAgent.messages`); the reward of a completion is R^A (gopo eq 8) of the configured
judge on this box (the rubric judge), with the turn's hard-constraint checks (skills + SOP), scored exactly as an
episode scores a CS reply. The same LoRA (rank, alpha, target modules), learning rate, dtype, sampling temperature
and max tokens as our learner and CS agent; generation by TRL's own `generate` (no vLLM on this box for TRL), in a
child process with every core.

Ours: a real `train` run (default config: vLLM server, workers, DeepSpeed learner) of the same wall-clock budget.

Rows: trained completion tokens per second (completion tokens the updates trained on / seconds from the first
rollout to the last update; TRL: / seconds of `train()`), seconds per update, each side's reward per update against
wall-clock (ours: the batch's mean CS reward R^A, `reward/cs`; theirs: the batch's mean R^A), the time to a target
reward (the first update whose 3-update running mean is `target_gain` above the mean of the first 3) and the ratios
ours / theirs (target >= 3x trained completion tok/s).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gopo_online.bench import Row, _row
from gopo_online.config import GopoConfig

TRL_PIN = "trl==1.16.0"
"""The peer's version (what the README's numbers were measured with). Adds datasets, pandas, pyarrow, xxhash and
multiprocess; keeps the installed torch and transformers."""
RATIO_TARGET = 3.0
WINDOW = 3


def ensure_trl(log=print) -> None:
    """Install `TRL_PIN` into this environment unless trl is importable (pip, with the CPU constraints on a CPU
    box so that torch stays the installed build)."""
    if importlib.util.find_spec("trl") is not None:
        return
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "pip", "install", "--progress-bar", "off", "-q", TRL_PIN]
    constraints = root / "requirements" / "cpu-constraints.txt"
    if constraints.is_file():
        cmd[4:4] = ["-c", str(constraints)]
    log(f"[peer] installing the bench-only dependency {TRL_PIN} …")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"could not install {TRL_PIN} (pip rc {proc.returncode}):\n{proc.stderr[-2000:]}")


def time_to_target(points: Sequence[tuple[float, float]], gain: float, window: int = WINDOW) -> dict[str, Any]:
    """`points` = (seconds, reward) per update in order. The baseline is the mean of the first `window` rewards; the
    target is baseline + `gain`; returns {baseline, target, seconds (the first update whose running mean of the last
    `window` rewards reaches it, None if none), updates}."""
    rewards = [r for _, r in points]
    if len(rewards) < window:
        return {"baseline": None, "target": None, "seconds": None, "updates": len(rewards)}
    base = statistics.mean(rewards[:window])
    target = base + gain
    for i in range(window, len(rewards)):
        if statistics.mean(rewards[i - window + 1 : i + 1]) >= target:
            return {"baseline": base, "target": target, "seconds": points[i][0], "updates": len(rewards)}
    return {"baseline": base, "target": target, "seconds": None, "updates": len(rewards)}


# ----------------------------------------------------------------------------- the single-turn task
def peer_cases(cfg: GopoConfig) -> list[dict[str, Any]]:
    """One prompt per distinct (family, scenario, turn) of the judge set, as the CS agent would see it, with what the
    reward needs to score a reply to it."""
    from gopo_online.serving.agents import CSAgent, DialogueTurn
    from simulator import judge_set
    from simulator.judge_bench import case_of
    from simulator.scenarios import FAMILIES, get_family

    out: list[dict[str, Any]] = []
    seen: set[tuple[str, str, int]] = set()
    for family in FAMILIES:
        fam = get_family(family)
        agent = CSAgent(None, cfg=cfg.agents.cs, default_actions=fam.action_tags)
        for rec in judge_set.load(family):
            key = (family, rec["instance_id"], rec["turn"])
            if key in seen:
                continue
            seen.add(key)
            inst, state, _ = case_of(rec)
            skills = [fam.skill(s) for s in rec["expert_skills"]]
            h = rec["history"]
            history = [DialogueTurn(h[i][1], h[i + 1][1] if i + 1 < len(h) else "") for i in range(0, len(h), 2)]
            msgs = agent.messages(rec["user_utterance"], skills, inst.business_context(), history)
            out.append({"record": rec, "instance": inst, "state": state, "skills": skills, "messages": msgs})
    return out


class PeerReward:
    """R^A of one CS reply to one case, scored as `play_episode` scores it; counts the completion tokens it saw."""

    __name__ = "cs_judge_reward"  # TRL names the reward column after it

    def __init__(self, cfg: GopoConfig, cases: Sequence[dict[str, Any]]) -> None:
        from simulator.judging import EpisodeJudge

        self.cfg = cfg
        self.cases = list(cases)
        self.judge = EpisodeJudge(cfg, "rubric")
        self.completion_tokens = 0
        self.unparsed = 0
        self.scored = 0

    def score(self, case: dict[str, Any], text: str) -> float:
        from gopo_online.rewards import weighted_judge_reward
        from gopo_online.serving.agents import AgentOutputError, parse_cs_output
        from gopo_online.skills import allowed_actions, check_compliance
        from gopo_online.types import Compliance
        from simulator.episode import _sop_checks
        from simulator.scenarios import get_family

        rec, skills = case["record"], case["skills"]
        actions = allowed_actions(skills, get_family(rec["family"]).action_tags)
        try:
            action, reply = parse_cs_output(text.strip(), actions)
        except AgentOutputError:  # no valid ACTION line: scored as written, with no action taken
            self.unparsed += 1
            action, reply = "none", text.strip() or "(empty)"
        comp = check_compliance(reply, action, skills)
        sop = _sop_checks(case["instance"], rec["turn"], action, tuple(rec["prior_actions"]), tuple(rec["user_texts"]))
        verdict = self.judge.score_case(case["state"], reply, action, instance=case["instance"],
                                        compliance=Compliance(checks=comp.checks + sop))  # fmt: skip
        self.scored += 1
        return weighted_judge_reward(verdict.scores, self.cfg.judge.dimensions) if verdict.ok else 0.0

    def __call__(self, prompts, completions, completion_ids=None, case=None, **_: Any) -> list[float]:
        if completion_ids is not None:
            self.completion_tokens += sum(len(ids) for ids in completion_ids)
        texts = [c[-1]["content"] if isinstance(c, list) else str(c) for c in completions]
        return [self.score(self.cases[int(i)], t) for i, t in zip(case, texts, strict=True)]


# ----------------------------------------------------------------------------- theirs (child process)
def run_trl(cfg: GopoConfig, seconds: float, out: Path, seed: int = 0, batch: int = 8, generations: int = 4) -> dict:
    """TRL GRPOTrainer for `seconds` of `train()` (stopped after the update that crosses it); writes and returns
    {updates, wall_s, setup_s, completion_tokens, points: [(s, mean R^A)], step_s, unparsed, dtype, threads}."""
    t_setup = time.perf_counter()
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from gopo_online.hardware import cpu_cores, resolve_dtype
    from gopo_online.models import LORA_TARGETS, resolve_model_path

    threads = cpu_cores()
    torch.set_num_threads(threads)
    dtype = resolve_dtype(cfg.model.dtype)
    cases = peer_cases(cfg)
    reward = PeerReward(cfg, cases)
    ds = Dataset.from_list([{"prompt": c["messages"], "case": i} for i, c in enumerate(cases)])
    marks: list[float] = []

    class Budget(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            marks.append(time.perf_counter())
            if marks[-1] - marks[0] >= seconds:
                control.should_training_stop = True

    lc = cfg.learner
    args = GRPOConfig(
        output_dir=str(out.parent / "trl-out"), per_device_train_batch_size=batch, num_generations=generations,
        max_completion_length=cfg.agents.cs.max_tokens, temperature=cfg.agents.cs.temperature,
        learning_rate=lc.lr, max_steps=100_000, logging_steps=1, report_to="none", save_strategy="no",
        use_cpu=True, bf16=dtype == "bfloat16", seed=seed, dataloader_num_workers=0, disable_tqdm=True,
        model_init_kwargs={"dtype": dtype},
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=str(resolve_model_path(cfg.model)), reward_funcs=reward, args=args, train_dataset=ds,
        callbacks=[Budget()],
        peft_config=LoraConfig(r=lc.lora_rank, lora_alpha=2 * lc.lora_rank, lora_dropout=0.0,
                               target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM"),
    )  # fmt: skip
    setup_s = time.perf_counter() - t_setup
    trainer.train()
    t0 = marks[0]
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    ends = [m - t0 for m in marks[1:]]
    result = {
        "updates": len(ends), "wall_s": ends[-1] if ends else 0.0, "setup_s": setup_s,
        "completion_tokens": reward.completion_tokens, "points": list(zip(ends, rewards, strict=False)),
        "step_s": [b - a for a, b in zip([0.0, *ends], ends, strict=False)], "unparsed": reward.unparsed,
        "scored": reward.scored, "dtype": dtype, "threads": threads, "cases": len(cases), "batch": batch,
        "generations": generations, "trl": __import__("trl").__version__,
    }  # fmt: skip
    out.write_text(json.dumps(result))
    return result


_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_trl_child(cfg: GopoConfig, seconds: float, out_dir: Path, batch: int = 8, generations: int = 4) -> dict:
    """`run_trl` in a child process (`python -m simulator.peer_bench`) with every core and no torch.distributed
    variables inherited (a learner in this process leaves them; accelerate would then try a rendezvous)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path, out = out_dir / "config.json", out_dir / "trl.json"
    cfg_path.write_text(cfg.model_dump_json())
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env |= {"OMP_NUM_THREADS": str(os.cpu_count() or 1), "TOKENIZERS_PARALLELISM": "false"}
    child = subprocess.run(
        [sys.executable, "-m", "simulator.peer_bench", "--config-json", str(cfg_path), "--seconds", str(seconds),
         "--out", str(out), "--batch", str(batch), "--generations", str(generations)],
        capture_output=True, text=True, timeout=seconds + 1200, env=env,
    )  # fmt: skip
    if child.returncode != 0 or not out.is_file():
        raise RuntimeError(f"the TRL run failed (rc {child.returncode}):\n{child.stderr[-3000:]}")
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------- ours
def ours_from_run(run_dir: Path) -> dict[str, Any]:
    """Trained completion tokens, update times and `reward/cs` per update of a `train` run's metrics.jsonl; the clock
    starts at the run's first episode or learner event (after the servers are up, as TRL's starts after loading)."""
    from gopo_online.bench_loop import _read_events

    events = [e for e in _read_events(run_dir) if isinstance(e.get("time"), int | float)]
    work = [e for e in events if e.get("kind") in ("episode", "learner")]
    if not work:
        raise RuntimeError(f"the train run in {run_dir} logged no episode or update")
    t0 = min(e["time"] for e in work)
    learner = [e for e in work if e.get("kind") == "learner" and e.get("metrics")]
    tokens = cs_tokens = 0.0
    points: list[tuple[float, float]] = []
    step_s: list[float] = []
    for e in learner:
        m = e["metrics"]
        cs_tokens += m.get("learner/completion_tokens_cs", 0.0)
        tokens += m.get("learner/completion_tokens_cs", 0.0) + m.get("learner/completion_tokens_expert", 0.0)
        if "sys/step_time_s" in m:
            step_s.append(m["sys/step_time_s"])
        if "reward/cs" in m:
            points.append((round(e["time"] - t0, 1), float(m["reward/cs"])))
    wall = (max(e["time"] for e in learner) - t0) if learner else 0.0
    return {"updates": len(learner), "wall_s": wall, "completion_tokens": tokens, "cs_completion_tokens": cs_tokens,
            "points": points, "step_s": step_s, "episodes": sum(e.get("kind") == "episode" for e in work)}  # fmt: skip


def bench_peer(cfg: GopoConfig, minutes: float = 5.0, target_gain: float = 0.05) -> list[Row]:
    """Ours (a `train` of `minutes`) and theirs (TRL GRPOTrainer for `minutes` of training), one after the other."""
    from gopo_online.bench_loop import _train

    ensure_trl()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="gopo-peer-") as tmp:
        out = Path(tmp)
        proc, train_s = _train(minutes, out / "runs", "peer", ())
        run_dir = out / "runs" / "peer"
        if not (run_dir / "metrics.jsonl").is_file():
            raise RuntimeError(f"the train run wrote no metrics (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        ours = ours_from_run(run_dir)
        theirs = run_trl_child(cfg, 60.0 * minutes, out / "trl")
    sides = {"ours": ours, "trl": theirs}
    rates: dict[str, float] = {}
    for side, d in sides.items():
        rates[side] = d["completion_tokens"] / d["wall_s"] if d["wall_s"] > 0 else 0.0
        ttt = time_to_target(d["points"], target_gain)
        ctx = {"updates": d["updates"], "wall_s": round(d["wall_s"], 1),
               "completion_tokens": int(d["completion_tokens"])}  # fmt: skip
        if side == "ours":
            ctx |= {"cs_completion_tokens": int(d["cs_completion_tokens"]), "episodes": d["episodes"],
                    "train_rc": proc.returncode, "train_s": round(train_s, 1)}  # fmt: skip
        else:
            ctx |= {k: d[k] for k in ("dtype", "threads", "batch", "generations", "unparsed", "scored", "trl")}
            ctx["setup_s"] = round(d["setup_s"], 1)
        rows.append(_row("peer", f"{side}.trained_completion_tok_per_s", rates[side], "tok/s", **ctx))
        rows.append(_row("peer", f"{side}.s_per_update", statistics.median(d["step_s"]) if d["step_s"] else 0.0, "s"))
        rows.append(_row("peer", f"{side}.time_to_target", ttt["seconds"] if ttt["seconds"] is not None else -1.0,
                         "s", reached=ttt["seconds"] is not None, baseline=ttt["baseline"], target=ttt["target"],
                         curve=[(round(t, 1), round(r, 4)) for t, r in d["points"]]))  # fmt: skip
    rows.append(_row("peer", "ratio_trained_completion_tok_per_s", rates["ours"] / max(rates["trl"], 1e-9), "x",
                     target=RATIO_TARGET))  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    """The TRL side, in its own process (all cores, its own memory): `python -m simulator.peer_bench`."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config-json", type=Path, required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--generations", type=int, default=4)
    a = ap.parse_args(argv)
    cfg = GopoConfig.model_validate_json(a.config_json.read_text())
    run_trl(cfg, a.seconds, a.out, batch=a.batch, generations=a.generations)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
