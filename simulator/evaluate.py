"""`gopo-online eval --run runs/NAME`: a trained run against a comparison arm on held-out personas, PAIRED.

Two arms, one vLLM server started once:
* arm A ("run"): the run's trained Expert and CS LoRA adapters (version N, default the latest the run exported);
* arm B ("against"): the base model (no adapter, i.e. the untrained policy), or another run's adapters.
Every adapter is served under its own LoRA name (`--lora-modules`), the base model under `model.served_name`;
the simulated user and the judge are the base model (or `serving.external_url` when serving.simulator =
"external"), the same for both arms.

Pairing: the held-out split is sampled once; pair i is (persona i, scenario instance i, simulator seed i) and both
arms play exactly that episode. `play_episode` derives every per-call seed (simulator turns, agent sampling) from
the episode seed, so the two episodes of a pair differ only in the policy that answered. The statistics are in
`gopo_online.paired`: per metric, each arm's mean over the complete pairs, the mean paired difference A - B and its
95 % percentile-bootstrap CI, with n.

Per-episode metrics (an errored episode has none, so its pair drops out of every metric; errors are counted):
ESNDCG (gopo eq 6, mean over turns with an Expert weight), joint reward (eq 10, mean over judged turns), R^A (the
weighted judge reward, eq 8), TSE (eq 11), final satisfaction (1-5), finish rate (the user ended the dialogue),
cost rate (cost of the episode's actions, e.g. vouchers) and skill/SOP compliance (mean over turns).

Outputs in `out` (default run_dir/eval-v{N}-vs-{against}): report.json, trajectories.jsonl (both arms), report.png
(paired differences with CIs per persona group) and an 80-column console table.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gopo_online.config import GopoConfig, dump_config
from gopo_online.metrics import tse
from gopo_online.paired import EvalError, PairedSummary, compare_by_group, compare_metrics
from gopo_online.types import Trajectory
from simulator.episode import play_episode
from simulator.personas import Persona, load_personas, sample_personas
from simulator.scenarios import ScenarioInstance, sample_instance
from simulator.serving_adapters import ServedCS, ServedExpert, judge_or_none
from simulator.user import make_user_simulator

AGENTS = ("expert", "cs")
METRICS = ("esndcg", "joint", "r_a", "tse", "satisfaction", "finish_rate", "cost_rate", "compliance")
"""Metric keys of the report, in table order."""
LABELS = {
    "esndcg": "ESNDCG",
    "joint": "joint reward",
    "r_a": "R^A (judge)",
    "tse": "TSE",
    "satisfaction": "satisfaction",
    "finish_rate": "finish rate",
    "cost_rate": "cost rate",
    "compliance": "compliance",
}


# --------------------------------------------------------------------------- the run folder's adapters


def run_adapters(run_dir: Path | str, version: int | None = None) -> tuple[int, dict[str, Path]]:
    """(version, {"expert": folder, "cs": folder}) of a run's LoRA adapters; the latest when version=None.

    The layout is `gopo_online.serving.weights.WeightSync`'s (the learner writes each adapter once through it);
    this only picks a version and checks that its folders are complete PEFT adapters.
    """
    from gopo_online.serving.weights import WeightPushError, WeightSync, verify_weights_dir

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EvalError(f"run folder {run_dir} does not exist")
    sync = WeightSync.for_run(run_dir)
    complete = sync.versions()
    if not complete:
        raise EvalError(
            f"{run_dir}: no trained adapters found (no version in {sync.root} has a folder for every agent "
            f"{list(sync.agents)}); train the run first"
        )
    if version is None:
        version = complete[-1]
    if version not in complete:
        raise EvalError(f"{run_dir}: no adapters of version {version}; available: {complete}")
    dirs = {a: sync.path(a, version) for a in AGENTS}
    for a, d in dirs.items():
        try:
            verify_weights_dir(d, "lora")
        except WeightPushError as e:
            raise EvalError(f"{d}: not a complete PEFT adapter folder ({a}, version {version}): {e}") from None
    return version, dirs


# --------------------------------------------------------------------------- arms and pairs


@dataclass(frozen=True)
class Arm:
    """One side of the comparison: what each agent is requested as on the eval server."""

    key: str
    """"a" (the evaluated run) or "b" (the comparison arm): episode ids end in it."""
    label: str
    """Human name: "NAME@vN" or "base"."""
    models: dict[str, str]
    """Agent -> model name on the server (a LoRA name, or the base model's served name)."""
    version: int
    """Policy version recorded on the arm's turns (0 = base)."""
    adapters: dict[str, Path] = field(default_factory=dict)
    """LoRA name -> adapter folder to serve (empty for the base arm)."""
    run_dir: str | None = None


def make_arm(key: str, spec: str | Path, cfg: GopoConfig, version: int | None = None) -> Arm:
    """ "base" -> the base model for both agents; a run folder -> its adapters (`run_adapters`)."""
    if str(spec) == "base":
        if version is not None:
            raise EvalError("--version applies to a run, not to the base model")
        return Arm(key, "base", {a: cfg.model.served_name for a in AGENTS}, 0)
    if key == "b" and not Path(spec).is_dir():
        raise EvalError(f"--against {spec}: neither 'base' nor an existing run folder")
    v, dirs = run_adapters(spec, version)
    names = {a: f"{key}-{a}-v{v}" for a in AGENTS}
    return Arm(key, f"{Path(spec).name}@v{v}", names, v, {names[a]: dirs[a] for a in AGENTS}, str(spec))


@dataclass(frozen=True)
class PairJob:
    """One paired episode: both arms play this persona on this scenario instance with this seed."""

    pair_id: str
    persona: Persona
    instance: ScenarioInstance
    seed: int


def paired_jobs(personas: Sequence[Persona], scenarios: Sequence[str], seed: int) -> list[PairJob]:
    """Pair i: persona i, scenario family i mod len(scenarios), instance and simulator seed seed*100000 + i."""
    if not scenarios:
        raise EvalError("simulator.scenarios is empty: there is nothing to evaluate on")
    jobs = []
    for i, p in enumerate(personas):
        s = seed * 100_000 + i
        inst = sample_instance(scenarios[i % len(scenarios)], seed=s, demand=p.extrinsic_demand)
        jobs.append(PairJob(f"eval-{seed}-{i:04d}", p, inst, s))
    return jobs


# --------------------------------------------------------------------------- metrics and report


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def episode_metrics(tr: Trajectory, cfg: GopoConfig) -> dict[str, float | None]:
    """The METRICS of one episode; all None for an errored episode (its pair then drops out)."""
    if tr.status != "ok":
        return dict.fromkeys(METRICS)
    rewarded = [u.rewards for u in tr.turns if u.rewards is not None]
    return {
        "esndcg": _mean([r.r_expert for r in rewarded if r.w_expert > 0]),  # gopo eq 6
        "joint": _mean([r.joint for r in rewarded]),  # gopo eq 10
        "r_a": _mean([r.r_cs for r in rewarded]),  # gopo eq 8
        "tse": tse(tr.task_completion_turns, cfg.rewards.tse_weights, cfg.rewards.tse_gamma),  # gopo eq 11
        "satisfaction": float(tr.final_satisfaction) if tr.final_satisfaction is not None else None,
        "finish_rate": float(tr.finished),
        "cost_rate": float(tr.total_cost),
        "compliance": _mean([u.compliance.score for u in tr.turns]),
    }


def build_eval_report(
    jobs: Sequence[PairJob],
    trajs: dict[tuple[str, str], Trajectory],
    arms: tuple[Arm, Arm],
    cfg: GopoConfig,
    setup: dict[str, Any],
    *,
    resamples: int = 2000,
) -> dict[str, Any]:
    """`trajs[(pair_id, arm.key)]` -> the report dict (JSON-safe). Bootstrap seeds derive from setup["seed"]."""
    a, b = arms
    rows, grouped = [], []
    for j in jobs:
        ta, tb = trajs[(j.pair_id, a.key)], trajs[(j.pair_id, b.key)]
        ma, mb = episode_metrics(ta, cfg), episode_metrics(tb, cfg)
        grouped.append((j.persona.group, ma, mb))
        rows.append(
            {
                "pair_id": j.pair_id,
                "persona_id": j.persona.id,
                "group": j.persona.group,
                "scenario_id": j.instance.instance_id,
                "family": j.instance.family,
                "seed": j.seed,
                "arms": {
                    arm.key: {
                        "episode_id": t.episode_id,
                        "persona_id": t.persona_id,
                        "scenario_id": t.scenario_id,
                        "seed": t.seed,
                        "status": t.status,
                        "error": t.error,
                        "turns": len(t.turns),
                        "first_user_utterance": t.turns[0].user_utterance if t.turns else None,
                        "metrics": m,
                    }
                    for arm, t, m in ((a, ta, ma), (b, tb, mb))
                },
            }
        )
    kw = {"resamples": resamples, "seed": int(setup.get("seed", 0))}
    overall = compare_metrics([(ma, mb) for _, ma, mb in grouped], METRICS, **kw)
    groups = compare_by_group(grouped, METRICS, **kw)

    def js(d: dict[str, PairedSummary]) -> dict[str, Any]:
        return {m: s.to_json() for m, s in d.items()}

    firsts = [(r["arms"][a.key]["first_user_utterance"], r["arms"][b.key]["first_user_utterance"]) for r in rows]
    firsts = [(x, y) for x, y in firsts if x is not None and y is not None]
    return {
        "setup": setup,
        # both arms' opening user message comes from the same prompt and seed; vLLM's seeded sampling makes them
        # equal unless batching changes the numerics (a diagnostic of the pairing, not a precondition)
        "same_first_user_turn": sum(x == y for x, y in firsts) / len(firsts) if firsts else None,
        "arms": {
            arm.key: {"label": arm.label, "version": arm.version, "models": arm.models, "run_dir": arm.run_dir}
            for arm in arms
        },
        "difference": "a - b (run minus against), per pair",
        "pairs_total": len(jobs),
        "errors": {arm.key: sum(trajs[(j.pair_id, arm.key)].status != "ok" for j in jobs) for arm in arms},
        "overall": js(overall),
        "groups": {g: js(d) for g, d in groups.items()},
        "pairs": rows,
    }


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _ci(s: dict[str, Any], digits: int = 3) -> str:
    if s["ci_low"] is None:
        return "-"
    sep = ", " if digits > 2 else ","
    return f"[{s['ci_low']:+.{digits}f}{sep}{s['ci_high']:+.{digits}f}]"


def print_eval_report(report: dict[str, Any], console: Any = None) -> None:
    """Two tables that fit 80 columns: per metric (both arms, difference, CI, n), and per group for ESNDCG/joint."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    a, b = report["arms"]["a"], report["arms"]["b"]
    t = Table(title=f"eval: A = {a['label']}  vs  B = {b['label']}  (A - B, 95% CI)")
    for col, just in (("metric", "left"), ("A", "right"), ("B", "right"), ("A-B", "right"), ("95% CI", "right")):
        t.add_column(col, justify=just, no_wrap=True)
    t.add_column("n", justify="right", no_wrap=True)
    t.add_column("", no_wrap=True)
    for m in METRICS:
        s = report["overall"][m]
        diff = "-" if s["diff"] is None else f"{s['diff']:+.3f}"
        mark = "*" if s["excludes_zero"] else ""
        t.add_row(LABELS[m], _f(s["mean_a"]), _f(s["mean_b"]), diff, _ci(s), str(s["n"]), mark)
    console.print(t)
    g = Table(title="per persona group: A - B [95% CI]")
    g.add_column("group", no_wrap=True)
    g.add_column("n", justify="right", no_wrap=True)
    for m in ("esndcg", "joint"):
        g.add_column(LABELS[m], justify="right", no_wrap=True)
    for name, d in report["groups"].items():
        cells = ["-" if d[m]["diff"] is None else f"{d[m]['diff']:+.2f} {_ci(d[m], 2)}" for m in ("esndcg", "joint")]
        g.add_row(name, str(d["esndcg"]["n"] or d["joint"]["n"]), *cells)
    console.print(g)
    err = report["errors"]
    same = report.get("same_first_user_turn")
    console.print(
        f"{report['pairs_total']} pairs; errored episodes A {err['a']}, B {err['b']} (their pairs are left out); "
        f"identical opening user turn in {'-' if same is None else f'{100 * same:.0f}%'} of pairs; "
        "* = CI excludes 0"
    )


def plot_eval_report(report: dict[str, Any], path: Path) -> None:
    """One panel per metric: the paired difference A - B per persona group and overall, with 95% CI error bars."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers/CI
    import matplotlib.pyplot as plt

    names = [*report["groups"], "ALL"]
    tables = [*report["groups"].values(), report["overall"]]
    fig, axes = plt.subplots(2, 4, figsize=(max(12, 1.1 * len(names) * 4), 7), squeeze=False)
    for ax, m in zip(axes.flat, METRICS, strict=True):
        diffs = [t[m]["diff"] for t in tables]
        xs = [i for i, d in enumerate(diffs) if d is not None]
        ys = [diffs[i] for i in xs]
        # max(0, .): a point interval can sit a float ulp off its mean, and matplotlib refuses negative errors
        lo = [max(0.0, ys[k] - tables[i][m]["ci_low"]) for k, i in enumerate(xs)]
        hi = [max(0.0, tables[i][m]["ci_high"] - ys[k]) for k, i in enumerate(xs)]
        colors = ["tab:green" if tables[i][m]["excludes_zero"] and ys[k] > 0 else
                  "tab:red" if tables[i][m]["excludes_zero"] else "tab:gray" for k, i in enumerate(xs)]  # fmt: skip
        ax.bar(xs, ys, yerr=[lo, hi], color=colors, capsize=3)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=40, ha="right", fontsize=7)
        ax.set_title(f"{LABELS[m]} (n={report['overall'][m]['n']})", fontsize=9)
    a, b = report["arms"]["a"]["label"], report["arms"]["b"]["label"]
    fig.suptitle(f"paired difference A - B with 95% bootstrap CI: A = {a}, B = {b}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- playing


def served_agents(cfg: GopoConfig, policy_client: Any) -> Any:
    """arm -> (Expert, CS) of the eval server: the served agents, each request naming the arm's model."""
    from gopo_online.serving.agents import ExpertAgent

    def agents_for(arm: Arm) -> tuple[ServedExpert, ServedCS]:
        exp_model, cs_model = arm.models["expert"], arm.models["cs"]
        expert = ServedExpert(
            ExpertAgent(policy_client, model=exp_model, policy_version=arm.version, cfg=cfg.agents.expert),
            resolve=lambda: (exp_model, arm.version),
        )
        return expert, ServedCS(policy_client, cfg, arm.version, resolve=lambda: (cs_model, arm.version))

    return agents_for


def play_pairs(
    cfg: GopoConfig,
    *,
    jobs: Sequence[PairJob],
    arms: tuple[Arm, Arm],
    agents_for: Any,
    user_sim: Any,
    judge: Any,
    concurrency: int,
    max_turns: int | None = None,
    console: Any = None,
) -> dict[tuple[str, str], Trajectory]:
    """Play every (pair, arm) episode with `concurrency` threads; returns {(pair_id, arm key): Trajectory}.

    `agents_for(arm)` -> (expert, cs), called once per arm (`served_agents`; a test passes fakes). The two
    episodes of a pair are submitted next to each other, so both arms meet the same server load."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    served = {arm.key: agents_for(arm) for arm in arms}

    def one(job: PairJob, arm: Arm) -> Trajectory:
        expert, cs = served[arm.key]
        return play_episode(
            episode_id=f"{job.pair_id}-{arm.key}",
            scenario_instance=job.instance,
            persona=job.persona,
            user_sim=user_sim,
            expert=expert,
            cs=cs,
            judge=judge,
            cfg=cfg,
            seed=job.seed,
            worker=f"eval-{os.getpid()}",
            max_turns=max_turns,
        )

    out: dict[tuple[str, str], Trajectory] = {}
    with (
        Progress(
            TextColumn("[bold]eval"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("errors {task.fields[err]}"),
            TimeElapsedColumn(),
            console=console,
        ) as prog,
        ThreadPoolExecutor(max_workers=concurrency) as pool,
    ):
        task = prog.add_task("episodes", total=2 * len(jobs), err=0)
        futs = {pool.submit(one, j, arm): (j.pair_id, arm.key) for j in jobs for arm in arms}
        for f in as_completed(futs):
            out[futs[f]] = f.result()  # play_episode never raises; an exception here is a bug worth seeing
            prog.update(task, advance=1, err=sum(t.status != "ok" for t in out.values()))
    return out


def _eval_server(cfg: GopoConfig, arms: tuple[Arm, Arm], log_path: Path) -> Any:
    """The policy server of the config, with every arm's adapters as LoRA names (not started)."""
    from gopo_online.serving.process import server_from_config

    srv = server_from_config(cfg, "policy")
    adapters = {name: path for arm in arms for name, path in arm.adapters.items()}
    if adapters:
        ranks = [json.loads((p / "adapter_config.json").read_text()).get("r", 0) for p in adapters.values()]
        srv.enable_lora = True
        srv.dev_mode = False  # eval changes no weights: no admin endpoints
        srv.max_loras = len(adapters)
        srv.max_lora_rank = max([srv.max_lora_rank, *ranks])
        srv.extra_args = (*srv.extra_args, "--lora-modules", *(f"{n}={p.resolve()}" for n, p in adapters.items()))
    else:
        srv.enable_lora = srv.dev_mode = False
    srv.log_path = log_path
    srv.port = None  # a private server: a free port, never the one a running `train` may hold
    return srv


def _served_models(client: Any) -> set[str]:
    return {m.id for m in client._client.models.list(timeout=30.0).data}


def main(
    cfg: GopoConfig,
    run: Path | str,
    version: int | None = None,
    against: str = "base",
    n_personas: int = 20,
    seed: int = 0,
    out: Path | None = None,
    concurrency: int = 4,
    max_turns: int | None = None,
    resamples: int = 2000,
    console: Any = None,
) -> dict[str, Any]:
    """CLI entry (`gopo-online eval`): see the module docstring. Returns the report (also written to `out`)."""
    from rich.console import Console

    from gopo_online.serving.client import client_from_config

    console = console or Console()
    if n_personas < 1:
        raise EvalError(f"--personas must be >= 1, got {n_personas}")
    arm_a = make_arm("a", run, cfg, version)
    arm_b = make_arm("b", against, cfg)
    if (
        arm_b.run_dir is not None
        and Path(arm_b.run_dir).resolve() == Path(run).resolve()
        and arm_b.version == arm_a.version
    ):
        raise EvalError(f"--against names the same run and version as --run ({arm_a.label}): nothing to compare")
    arms = (arm_a, arm_b)
    run_dir = Path(run)
    out = Path(out) if out is not None else run_dir / f"eval-v{arm_a.version}-vs-{arm_b.label.replace('@', '-')}"
    out.mkdir(parents=True, exist_ok=True)
    bank = load_personas(cfg.simulator.persona_file, split="heldout")
    if not bank:
        raise EvalError(f"the persona bank {cfg.simulator.persona_file or '(shipped)'} has no held-out personas")
    personas = sample_personas(bank, n_personas, hard_fraction=cfg.simulator.hard_fraction, seed=seed)
    jobs = paired_jobs(personas, cfg.simulator.scenarios, seed)
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        srv = _eval_server(cfg, arms, out / "vllm-eval.log")
        console.print(f"eval: starting one vLLM server for A = {arm_a.label}, B = {arm_b.label} ...")
        stack.enter_context(srv.start())
        policy_client = stack.enter_context(client_from_config(cfg, srv.base_url))
        missing = {m for arm in arms for m in arm.models.values()} - _served_models(policy_client)
        if missing:
            raise EvalError(f"the eval server does not list {sorted(missing)} (log: {srv.log_path})")
        if cfg.serving.simulator == "external":
            sim_client = stack.enter_context(client_from_config(cfg, cfg.serving.external_url, external=True))
            sim_model, structured, sim_vllm = cfg.serving.external_model, "json", False
        else:  # "same" and "separate" both mean the base model; eval serves it once, on this server
            sim_client, sim_model, structured, sim_vllm = policy_client, cfg.model.served_name, "regex", True
        user_sim = make_user_simulator(cfg, sim_client, sim_model, structured=structured)  # simulator.mode decides
        if max_turns:
            user_sim.max_turns = max_turns
        judge = judge_or_none(cfg, sim_client, sim_model, vllm=sim_vllm)
        trajs = play_pairs(
            cfg,
            jobs=jobs,
            arms=arms,
            agents_for=served_agents(cfg, policy_client),
            user_sim=user_sim,
            judge=judge,
            concurrency=concurrency,
            max_turns=max_turns,
            console=console,
        )
    wall = time.monotonic() - t0
    setup = {
        "run": str(run),
        "version": arm_a.version,
        "against": str(against),
        "split": "heldout",
        "n_personas": len(personas),
        "seed": seed,
        "max_turns": max_turns or cfg.simulator.max_turns,
        "concurrency": concurrency,
        "simulator": cfg.serving.simulator,
        "simulator_model": sim_model,
        "judge": "none" if judge is None else f"{sim_model} ({cfg.judge.scoring})",
        "bootstrap_resamples": resamples,
        "server_ready_s": srv.ready_s,
        "wall_s": round(wall, 1),
        "config": dump_config(cfg),
    }
    report = build_eval_report(jobs, trajs, arms, cfg, setup, resamples=resamples)
    order = [trajs[(j.pair_id, arm.key)] for j in jobs for arm in arms]
    (out / "trajectories.jsonl").write_text("".join(t.to_json() + "\n" for t in order))
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    plot_eval_report(report, out / "report.png")
    print_eval_report(report, console)
    console.print(f"report: {out / 'report.json'}, {out / 'report.png'} ({wall:.0f} s)")
    return report
