"""`gopo-online bench --only judge`: how well each judge mode tells good replies from bad on the labelled set.

Per judge mode and scenario family: AUC (good vs bad, ties count half), accuracy (R^A >= 0.5 called good), the margin
mean(good) - mean(bad) of R^A on [0, 1] (gopo eq 8 with the configured weights), and the cost of one judge call.
The rubric mode scores the whole set; the LLM judge (a real vLLM server with the configured model, started here) and
the mixed mode score `judge.bench_llm_items` replies per family, picked round-robin over the reply kinds, because a
call of the 135M judge takes seconds on a CPU. Set `judge.bench_llm_items = 0` to measure the rubric alone.

Every reply is scored through the same path an episode uses: the turn's hard-constraint checks (chosen skills +
scenario SOP, `simulator.episode`) and `simulator.judging.EpisodeJudge`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Sequence
from typing import Any

from gopo_online.bench import Row, _row
from gopo_online.config import GopoConfig
from gopo_online.rewards import weighted_judge_reward
from gopo_online.rubric import mix_verdicts, resolve_mode
from gopo_online.skills import check_compliance
from gopo_online.types import Compliance, JudgeScores
from simulator import judge_set
from simulator.judging import EpisodeJudge
from simulator.scenarios import FAMILIES, ScenarioInstance, get_family, sample_instance
from simulator.state import DialogueState

AUC_TARGET, MARGIN_TARGET = 0.9, 0.3
"""A judge mode qualifies as the default when it reaches both on every family (issue 8)."""


def auc(good: Sequence[float], bad: Sequence[float]) -> float:
    """P(score of a good reply > score of a bad one), ties counted 1/2 (Mann-Whitney U / (n_good * n_bad))."""
    if not good or not bad:
        raise ValueError(f"AUC needs good and bad scores, got {len(good)} good and {len(bad)} bad")
    wins = sum((g > b) + 0.5 * (g == b) for g in good for b in bad)
    return wins / (len(good) * len(bad))


def case_of(record: dict[str, Any]) -> tuple[ScenarioInstance, DialogueState, Compliance]:
    """The scenario instance, the CS agent's state and the turn's hard-constraint checks of one labelled reply."""
    from simulator.episode import _sop_checks

    r = record
    inst = sample_instance(r["family"], seed=r["seed"], demand=r["demand"], case_type=r["case_type"])
    if inst.instance_id != record["instance_id"]:
        raise ValueError(
            f"judge set record {record['id']}: the store now gives {inst.instance_id}, the set was built on "
            f"{record['instance_id']}; rebuild it with python -m simulator.judge_set"
        )
    fam = get_family(record["family"])
    state = DialogueState(
        episode_id=f"judge-set/{record['id']}",
        turn=record["turn"],
        family=record["family"],
        case_type=record["case_type"],
        user_utterance=record["user_utterance"],
        user_intent="other",
        user_emotion="neutral",
        history=tuple((r, t) for r, t in record["history"]),
        skill_pool=fam.skills,
        action_tags=fam.action_tags,
        business_context=inst.business_context(),
        tasks_done=tuple(record["tasks_done"]),
        expert_skills=tuple(record["expert_skills"]),
        seed=record["turn"],
    )
    comp = check_compliance(record["reply"], record["action"], [fam.skill(s) for s in record["expert_skills"]])
    sop = _sop_checks(inst, r["turn"], r["action"], tuple(r["prior_actions"]), tuple(r["user_texts"]))
    return inst, state, Compliance(checks=comp.checks + sop)


def score_records(judge: EpisodeJudge, records: Iterable[dict[str, Any]]) -> list[tuple[dict, JudgeScores, float]]:
    """(record, verdict, seconds) for each labelled reply."""
    out = []
    for r in records:
        inst, state, comp = case_of(r)
        t0 = time.perf_counter()
        verdict = judge.score_case(state, r["reply"], r["action"], instance=inst, compliance=comp)
        out.append((r, verdict, time.perf_counter() - t0))
    return out


def summarise(cfg: GopoConfig, scored: Sequence[tuple[dict, JudgeScores, float]]) -> dict[str, float]:
    """AUC, accuracy, margin, means and cost of one mode on one family (failed verdicts are counted, not scored)."""
    ok = [(r, v, s) for r, v, s in scored if v.ok]
    ra = [(r["label"], weighted_judge_reward(v.scores, cfg.judge.dimensions)) for r, v, _ in ok]
    good = [x for y, x in ra if y == 1]
    bad = [x for y, x in ra if y == 0]
    return {
        "auc": auc(good, bad),
        "accuracy": sum((x >= 0.5) == (y == 1) for y, x in ra) / len(ra),
        "margin": statistics.mean(good) - statistics.mean(bad),
        "mean_good": statistics.mean(good),
        "mean_bad": statistics.mean(bad),
        "cost_s": statistics.mean(s for _, _, s in scored),
        "n": len(scored),
        "failed": len(scored) - len(ok),
    }


def per_kind(cfg: GopoConfig, scored: Sequence[tuple[dict, JudgeScores, float]]) -> dict[str, float]:
    """Mean R^A per reply kind (where a judge is fooled shows here)."""
    kinds: dict[str, list[float]] = {}
    for r, v, _ in scored:
        if v.ok:
            kinds.setdefault(r["kind"], []).append(weighted_judge_reward(v.scores, cfg.judge.dimensions))
    return {k: round(statistics.mean(xs), 4) for k, xs in kinds.items()}


def subset(records: Sequence[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """n records picked round-robin over the kinds (every kind before any repeats), in the set's order."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_kind.setdefault(r["kind"], []).append(r)
    out: list[dict[str, Any]] = []
    depth = 0
    while len(out) < n and any(depth < len(v) for v in by_kind.values()):
        out += [v[depth] for v in by_kind.values() if depth < len(v)][: n - len(out)]
        depth += 1
    return out


def _rows(cfg: GopoConfig, mode: str, family: str, scored: Sequence[tuple[dict, JudgeScores, float]]) -> list[Row]:
    s = summarise(cfg, scored)
    ctx = {"mode": mode, "family": family, "n": s["n"], "failed": s["failed"]}
    return [
        _row("judge", f"{mode}.{family}.auc", s["auc"], "", **ctx),
        _row("judge", f"{mode}.{family}.accuracy", s["accuracy"], "", **ctx),
        _row(
            "judge",
            f"{mode}.{family}.margin",
            s["margin"],
            "R^A",
            mean_good=round(s["mean_good"], 4),
            mean_bad=round(s["mean_bad"], 4),
            **ctx,
        ),  # fmt: skip
        _row("judge", f"{mode}.{family}.cost_per_call", s["cost_s"] * 1e3, "ms", **ctx),
        _row("judge", f"{mode}.{family}.per_kind", 0, "", kinds=per_kind(cfg, scored), **ctx),
    ]


def _llm_judge(cfg: GopoConfig, base_url: str) -> Any:
    from gopo_online.serving.client import client_from_config
    from gopo_online.serving.judge import Judge
    from simulator.serving_adapters import ServedJudge

    client = client_from_config(cfg, base_url)
    return ServedJudge(Judge(client, model=cfg.model.served_name, cfg=cfg.judge, structured=True))


def bench_judge(cfg: GopoConfig, llm_url: str | None = None) -> list[Row]:
    """Rows of every judge mode on both families; `llm_url`: an OpenAI-compatible base URL (…/v1) of a running judge
    server to use instead of starting the configured vLLM server (only when judge.bench_llm_items > 0)."""
    sets = {f: judge_set.load(f) for f in FAMILIES}
    rows: list[Row] = []
    passed: dict[str, bool] = {}
    rubric = EpisodeJudge(cfg, "rubric")
    rubric_scored = {f: score_records(rubric, recs) for f, recs in sets.items()}
    for f, scored in rubric_scored.items():
        rows += _rows(cfg, "rubric", f, scored)
    n_llm = cfg.judge.bench_llm_items
    if n_llm > 0:
        server = None
        if llm_url is None:
            from gopo_online.serving.process import server_from_config

            server = server_from_config(cfg, "policy").start()
            llm_url = server.base_url
        try:
            llm = EpisodeJudge(cfg, "llm", _llm_judge(cfg, llm_url))
            for f, recs in sets.items():
                pick = subset(recs, n_llm)
                llm_scored = score_records(llm, pick)
                rows += _rows(cfg, "llm", f, llm_scored)
                by_id = {r["id"]: (v, s) for r, v, s in rubric_scored[f]}
                mixed = [
                    (r, mix_verdicts(by_id[r["id"]][0], v, cfg.judge.mixed_rubric_weight), s + by_id[r["id"]][1])
                    for r, v, s in llm_scored
                ]
                rows += _rows(cfg, "mixed", f, mixed)
        finally:
            if server is not None:
                server.stop()
    for r in rows:
        if r["metric"].endswith((".auc", ".margin")):
            target = AUC_TARGET if r["metric"].endswith(".auc") else MARGIN_TARGET
            passed[r["mode"]] = passed.get(r["mode"], True) and r["value"] >= target
    qualifying = sorted(m for m, ok in passed.items() if ok)
    rows.append(
        _row("judge", "qualifying_modes", len(qualifying), "modes", modes=qualifying,
             configured_default=resolve_mode(cfg), auc_target=AUC_TARGET, margin_target=MARGIN_TARGET)
    )  # fmt: skip
    return rows
