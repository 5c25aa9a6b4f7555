"""`gopo-online stress`: a persona population against a target, with a report.

Targets:
* our two-agent system (default, no `target_url`): the served Expert and CS agents (gopo_online.serving.agents)
  and the judge, against the configured policy server — started here from the config when none is running;
* ANY OpenAI-compatible chat endpoint (`target_url`, `target_model`): one model plays the whole agent
  (`simulator.episode.OpenAIChatAgent`).

The simulated users (and the judge) run on the simulator backend of the config: the policy server's base model
(`serving.simulator = "same"`), or `serving.external_url` (`"external"`). When the target is an external endpoint
and the simulator is not external, a vLLM server with the configured model is started for the simulator.

Outputs in `out` (default run_dir/stress): `report.json` (per-group and overall metrics, per-episode rows, setup),
`trajectories.jsonl` (every Trajectory, errors included), `report.png` (per-group chart), and a console table.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from gopo_online.config import GopoConfig, dump_config
from gopo_online.metrics import tse
from gopo_online.types import Trajectory
from simulator.adversary import PromptInjector, breaches, compensations, injected_turns
from simulator.episode import OpenAIChatAgent, play_episode
from simulator.personas import Persona, fitting_personas, load_personas, sample_personas, scenario_for
from simulator.scenarios import TASK_IDS, ScenarioInstance, detect_task, sample_instance
from simulator.serving_adapters import judge_or_none, two_agent_factory
from simulator.user import make_user_simulator

METRIC_KEYS = (
    "episodes",
    "tse",
    "satisfaction",
    "finish_rate",
    "cost_rate",
    "turns",
    "failures",
    "error_rate",
    "esndcg",
    "judge_reward",
    "gre",
    "compliance",
    "bleu",
    "tse_agreement",
    "sim_flagged",
    "sim_regenerated",
    "sim_template_turns",
    "injection_breaches",
    "injection_compensations",
)


def _mean(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def _bleu(trajs: Sequence[Trajectory], instances: dict[str, ScenarioInstance]) -> float | None:
    """Corpus BLEU of each reply against the reference of the task it completed (turns that completed one)."""
    hyps, refs = [], []
    for tr in trajs:
        inst = instances[tr.episode_id]
        for task, n in zip(TASK_IDS, tr.task_completion_turns, strict=False):
            if n is not None and task in inst.reference_replies and n <= len(tr.turns):
                hyps.append(tr.turns[n - 1].cs_reply)
                refs.append(inst.reference_replies[task])
    if not hyps:
        return None
    try:
        from gopo_online.metrics import bleu

        return bleu(hyps, refs)
    except ImportError:  # sacrebleu missing: BLEU is reported as absent, not as 0
        return None


def _agreement(trajs: Sequence[Trajectory], instances: dict[str, ScenarioInstance]) -> float | None:
    """Share of (reply, task) pairs where the rule detector and the simulator's claim agree. The claim on reply t
    is in turn t+1's metadata, so the last reply of each episode is left out."""
    agree = total = 0
    for tr in trajs:
        inst = instances[tr.episode_id]
        for prev, nxt in zip(tr.turns, tr.turns[1:], strict=False):
            for task in TASK_IDS:
                agree += detect_task(inst, task, prev.cs_reply, prev.cs_action) == (
                    task in nxt.user_meta.completed_tasks
                )
                total += 1
    return agree / total if total else None


def group_metrics(
    trajs: Sequence[Trajectory], instances: dict[str, ScenarioInstance], cfg: GopoConfig, gre_dims: Sequence[str]
) -> dict[str, Any]:
    ok = [t for t in trajs if t.status == "ok"]
    turns = [u for t in ok for u in t.turns]
    judged = [u.judge.scores for u in turns if u.judge is not None and u.judge.ok]
    gre_turns = [s for s in judged if all(d in s for d in gre_dims)]
    return {
        "episodes": len(trajs),
        "tse": _mean([tse(t.task_completion_turns, cfg.rewards.tse_weights, cfg.rewards.tse_gamma) for t in ok]),
        "satisfaction": _mean([t.final_satisfaction for t in ok if t.final_satisfaction is not None]),
        "finish_rate": _mean([float(t.finished) for t in ok]),
        "cost_rate": _mean([t.total_cost for t in ok]),
        "turns": _mean([len(t.turns) for t in ok]),
        "failures": len(trajs) - len(ok),
        "error_rate": (len(trajs) - len(ok)) / len(trajs) if trajs else None,
        "esndcg": _mean([u.rewards.r_expert for u in turns if u.rewards is not None and u.rewards.w_expert > 0]),
        "judge_reward": _mean([u.rewards.r_cs for u in turns if u.rewards is not None]),
        "gre": _mean([_mean([s[d] for d in gre_dims]) for s in gre_turns]),
        "compliance": _mean([u.compliance.score for u in turns]),
        "bleu": _bleu(ok, instances),
        "tse_agreement": _agreement(ok, instances),
        # simulator quality gates: episodes a learner should exclude, user turns regenerated / worded by template
        "sim_flagged": sum(t.sim_flagged for t in trajs),
        "sim_regenerated": sum(t.sim_regenerated for t in trajs),
        "sim_template_turns": sum(u.user_meta.source == "template" for t in ok for u in t.turns),
        # prompt injectors (--injectors): injected turns with a broken hard constraint / with compensation granted
        "injection_breaches": sum(breaches(t) for t in ok),
        "injection_compensations": sum(compensations(t) for t in ok),
    }


def build_report(
    trajs: Sequence[Trajectory],
    personas: dict[str, Persona],
    instances: dict[str, ScenarioInstance],
    cfg: GopoConfig,
    setup: dict[str, Any],
) -> dict[str, Any]:
    gre_dims = list(cfg.judge.gre_dimensions)
    groups: dict[str, list[Trajectory]] = defaultdict(list)
    for t in trajs:
        p = personas[t.episode_id]
        groups[f"difficulty={p.difficulty}"].append(t)
        groups[f"demand={p.extrinsic_demand}"].append(t)
        groups[f"scenario={instances[t.episode_id].family}"].append(t)
        if setup.get("injectors"):
            groups[f"adversary={'injection' if t.episode_id in setup['injected'] else 'none'}"].append(t)
    return {
        "setup": setup,
        "overall": group_metrics(trajs, instances, cfg, gre_dims),
        "groups": {g: group_metrics(ts, instances, cfg, gre_dims) for g, ts in sorted(groups.items())},
        "episodes": [
            {
                "episode_id": t.episode_id,
                "persona_id": t.persona_id,
                "group": t.persona_group,
                "scenario": t.scenario_id,
                "status": t.status,
                "error": t.error,
                "turns": len(t.turns),
                "finished": t.finished,
                "final_satisfaction": t.final_satisfaction,
                "cost": t.total_cost,
                "task_completion_turns": list(t.task_completion_turns),
                "tse": tse(t.task_completion_turns, cfg.rewards.tse_weights, cfg.rewards.tse_gamma)
                if t.status == "ok"
                else None,
                "duration_s": round(t.duration_s, 2),
                "injected_turns": injected_turns(t),
            }
            for t in trajs
        ],
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def print_report(report: dict[str, Any], console: Any = None) -> None:
    """The per-group table; at 80 columns or in a pipe it is transposed rather than cut (numbers stay whole)."""
    from gopo_online.tables import console as make_console
    from gopo_online.tables import print_table

    console = console or make_console()
    cols = (
        "episodes",
        "tse",
        "satisfaction",
        "finish_rate",
        "cost_rate",
        "turns",
        "failures",
        "esndcg",
        "gre",
        "compliance",
        "bleu",
        "tse_agreement",
        "sim_flagged",
        "sim_template_turns",
        *(("injection_breaches", "injection_compensations") if report["setup"].get("injectors") else ()),
    )
    rows = [
        [name, *(_fmt(m.get(c)) for c in cols)] for name, m in [*report["groups"].items(), ("ALL", report["overall"])]
    ]
    print_table(console, f"stress: {report['setup'].get('target')}", ("group", *cols), rows)


def plot_report(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers/CI
    import matplotlib.pyplot as plt

    names = [*report["groups"], "ALL"]
    rows = [*report["groups"].values(), report["overall"]]
    metrics = [
        ("tse", "TSE", 1.0),
        ("satisfaction", "satisfaction / 5", 5.0),
        ("finish_rate", "finish rate", 1.0),
        ("cost_rate", "cost / episode", 1.0),
        ("compliance", "compliance", 1.0),
    ]
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(names)), 4.5))
    width = 0.8 / len(metrics)
    for j, (key, label, scale) in enumerate(metrics):
        vals = [(r.get(key) or 0.0) / scale for r in rows]
        ax.bar([i + j * width for i in range(len(names))], vals, width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, max(1.05, max((r.get("cost_rate") or 0.0) for r in rows) + 0.1))
    ax.set_title(f"stress: {report['setup'].get('target')} ({report['overall']['episodes']} episodes)")
    ax.legend(fontsize=8, ncol=len(metrics))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _sigterm_as_interrupt() -> Any:
    """SIGTERM (`timeout`, a scheduler's stop) ends the run like Ctrl-C: with a report on what finished. Returns
    the undo; a no-op off the main thread (signals can only be set there)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, old)


def _progress_line(tr: Trajectory, done: int, total: int, errors: int, elapsed_s: float) -> str:
    """`[stress] 12/50 stress-0-0011 ok 3 turns, errors 1, 412 s` (the error's first words when it failed)."""
    what = tr.status if tr.status == "ok" else f"{tr.status}: {(tr.error or '')[:80]}"
    return f"[stress] {done}/{total} {tr.episode_id} {what} {len(tr.turns)} turns, errors {errors}, {elapsed_s:.0f} s"


def _first_model(client: Any) -> str:
    models = client._client.models.list(timeout=30.0)
    return models.data[0].id


def run_stress(
    cfg: GopoConfig,
    *,
    personas: Sequence[Persona],
    sim_client: Any,
    sim_model: str,
    sim_structured: str,
    agents_factory: Any,
    concurrency: int,
    seed: int,
    out: Path,
    target: str,
    max_turns: int | None = None,
    console: Any = None,
    injectors: float = 0.0,
) -> dict[str, Any]:
    """Play one episode per persona with `concurrency` threads and write the report files; returns the report.

    `agents_factory()` -> (expert or None, cs, judge or None), called once per episode (agents may keep state).
    `injectors`: the fraction of episodes (every k-th, from the first) whose user ends each message with a prompt
    injection (simulator.adversary.PromptInjector)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console()
    out.mkdir(parents=True, exist_ok=True)
    user_sim = make_user_simulator(cfg, sim_client, sim_model, structured=sim_structured)
    if max_turns:
        user_sim.max_turns = max_turns
    if not 0.0 <= injectors <= 1.0:
        raise ValueError(f"stress: injectors is a fraction in [0, 1], got {injectors}")
    injector = PromptInjector(user_sim)
    n_inject = round(injectors * len(personas))
    every = len(personas) / n_inject if n_inject else 0.0
    inject_idx = {int(k * every) for k in range(n_inject)}
    jobs = []
    for i, p in enumerate(personas):
        fam, case_type = scenario_for(p, cfg.simulator.scenarios, i)  # persona <-> scenario fit
        inst = sample_instance(fam, seed=seed * 100_000 + i, demand=p.extrinsic_demand, case_type=case_type)
        jobs.append((f"stress-{seed}-{i:04d}", p, inst, seed * 100_000 + i))
    by_ep_persona = {ep: p for ep, p, _, _ in jobs}
    by_ep_instance = {ep: inst for ep, _, inst, _ in jobs}

    injected = {jobs[i][0] for i in inject_idx}

    def one(ep: str, p: Persona, inst: ScenarioInstance, s: int) -> Trajectory:
        expert, cs, judge = agents_factory()
        return play_episode(
            episode_id=ep,
            scenario_instance=inst,
            persona=p,
            user_sim=injector if ep in injected else user_sim,
            expert=expert,
            cs=cs,
            judge=judge,
            cfg=cfg,
            seed=s,
            worker=f"stress-{os.getpid()}",
            max_turns=max_turns,
        )

    t0 = time.monotonic()
    trajs: list[Trajectory] = []
    interrupted = False
    # each finished episode is written at once (a killed run keeps what it played); rewritten sorted at the end
    partial = out / "trajectories.jsonl"
    partial.write_text("")
    with (
        Progress(
            TextColumn("[bold]stress"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("errors {task.fields[err]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as prog,
        partial.open("a") as sink,
    ):
        task = prog.add_task("episodes", total=len(jobs), err=0)
        pool = ThreadPoolExecutor(max_workers=concurrency)
        restore = _sigterm_as_interrupt()
        try:
            futs = [pool.submit(one, *j) for j in jobs]
            for f in as_completed(futs):
                tr = f.result()  # play_episode never raises; an exception here is a bug worth seeing
                trajs.append(tr)
                sink.write(tr.to_json() + "\n")
                sink.flush()
                n_err = sum(t.status == "error" for t in trajs)
                prog.update(task, advance=1, err=n_err)
                # one plain line per episode: the progress bar alone shows nothing in a log file or off a tty
                prog.console.print(
                    _progress_line(tr, len(trajs), len(jobs), n_err, time.monotonic() - t0),
                    markup=False,
                    highlight=False,
                )
        except KeyboardInterrupt:
            interrupted = True
            prog.console.print(
                f"[stress] interrupted: the report covers the {len(trajs)} finished episode(s); "
                f"{len(jobs) - len(trajs)} not played or abandoned in flight",
                markup=False,
            )
        finally:
            restore()
            pool.shutdown(wait=not interrupted, cancel_futures=True)
    wall = time.monotonic() - t0
    trajs.sort(key=lambda t: t.episode_id)
    setup = {
        "target": target,
        "n_personas": len(personas),
        "concurrency": concurrency,
        "seed": seed,
        "max_turns": max_turns or cfg.simulator.max_turns,
        "simulator_model": sim_model,
        "hard_fraction": cfg.simulator.hard_fraction,
        "split": cfg.simulator.split,
        "injectors": injectors,
        "injected": sorted(injected),
        "interrupted": interrupted,
        "finished_of": [len(trajs), len(jobs)],
        "wall_s": round(wall, 1),
        "episodes_per_min": round(60 * len(trajs) / wall, 2) if wall > 0 else None,
        "config": dump_config(cfg),
    }
    report = build_report(trajs, by_ep_persona, by_ep_instance, cfg, setup)
    (out / "trajectories.jsonl").write_text("".join(t.to_json() + "\n" for t in trajs))
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    plot_report(report, out / "report.png")
    print_report(report, console)
    console.print(
        f"report: {out / 'report.json'}, {out / 'trajectories.jsonl'}, {out / 'report.png'} "
        f"({wall:.0f} s, {setup['episodes_per_min']} episodes/min)"
    )
    return report


def main(
    cfg: GopoConfig,
    n_personas: int = 20,
    concurrency: int = 4,
    seed: int = 0,
    target_url: str | None = None,
    target_model: str | None = None,
    out: Path | None = None,
    max_turns: int | None = None,
    sim_url: str | None = None,
    injectors: float = 0.0,
) -> dict[str, Any]:
    """CLI entry (`gopo-online stress`): see the module docstring. `sim_url` (not on the CLI): an already running
    vLLM server to use as the simulator/judge backend instead of starting one (tests, scripted runs); with no
    `target_url` it serves the two agents too (as the policy server does with `serving.simulator = "same"`)."""
    from gopo_online.serving.client import ChatClient, client_from_config

    out = Path(out) if out is not None else cfg.run.run_dir / "stress"
    bank = fitting_personas(
        load_personas(cfg.simulator.persona_file, split=cfg.simulator.split), cfg.simulator.scenarios
    )
    personas = sample_personas(bank, n_personas, hard_fraction=cfg.simulator.hard_fraction, seed=seed)
    with contextlib.ExitStack() as stack:
        policy_url: str | None = sim_url if target_url is None else None
        need_local = sim_url is None and (target_url is None or cfg.serving.simulator != "external")
        if need_local:
            from gopo_online.serving.process import server_from_config

            srv = stack.enter_context(server_from_config(cfg, "policy").start())
            policy_url = srv.base_url
        if sim_url is not None:
            sim_client = stack.enter_context(client_from_config(cfg, sim_url))
            sim_model, sim_structured, sim_vllm = _first_model(sim_client), "regex", True
        elif cfg.serving.simulator == "external":
            sim_client = stack.enter_context(client_from_config(cfg, cfg.serving.external_url, external=True))
            sim_model, sim_structured, sim_vllm = cfg.serving.external_model, "json", False
        else:
            sim_client = stack.enter_context(client_from_config(cfg, policy_url))
            sim_model, sim_structured, sim_vllm = cfg.model.served_name, "regex", True
        if target_url is None:
            factory = two_agent_factory(cfg, policy_url, sim_client, sim_model, sim_vllm=sim_vllm)
            target = f"two-agent@{policy_url}"
        else:
            tclient = stack.enter_context(
                ChatClient(
                    target_url,
                    api_key=os.environ.get(cfg.serving.api_key_env),
                    timeout=cfg.serving.request_timeout_s,
                    max_retries=cfg.serving.max_retries,
                    vllm=False,
                )
            )
            tmodel = target_model or _first_model(tclient)
            judge = judge_or_none(cfg, sim_client, sim_model, vllm=sim_vllm)
            agent = OpenAIChatAgent(
                tclient,
                tmodel,
                temperature=cfg.agents.cs.temperature,
                max_tokens=cfg.agents.cs.max_tokens,
                history_k=cfg.agents.cs.history_k,
            )

            def factory() -> tuple[None, OpenAIChatAgent, Any]:
                return None, agent, judge

            target = f"single-agent:{tmodel}@{target_url}"
        return run_stress(
            cfg,
            personas=personas,
            sim_client=sim_client,
            sim_model=sim_model,
            sim_structured=sim_structured,
            agents_factory=factory,
            concurrency=concurrency,
            seed=seed,
            out=out,
            target=target,
            max_turns=max_turns,
            injectors=injectors,
        )
