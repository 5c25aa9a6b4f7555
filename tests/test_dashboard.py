import io
import math
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from gopo_online.config import DashboardConfig, GopoConfig, RunConfig
from gopo_online.dashboard import Dashboard, DashboardState, _History, attach, episode_event, sparkline
from gopo_online.metrics_log import MetricsLogger
from gopo_online.types import Trajectory, Turn, TurnRewards, UserTurnMeta


def ep(t, group="g", status="ok", **metrics):
    payload = {"persona_group": group, "status": status, "episode_id": f"e{t}"}
    if status == "error":
        payload["error"] = "judge timed out"
    return {"time": t, "step": 0, "kind": "episode", "metrics": metrics, "payload": payload}


def test_episodes_per_min_over_a_known_window():
    state = DashboardState(window_s=60, start_time=0.0, clock=lambda: 120.0)
    for t in range(10, 121, 10):  # 12 episodes, one every 10 s, 100 tokens each
        state.fold(ep(float(t), **{"episode/tokens": 100}))
    # window (60, 120] holds t = 70..120: 6 episodes in 60 s -> 6/min; 600 tokens / 60 s = 10 tok/s
    assert state.episodes_per_min(120.0) == pytest.approx(6.0)
    assert state.tokens_per_s(120.0) == pytest.approx(10.0)
    # the run's own average: 12 episodes from the first event (t=0 start) to the last (t=120) -> 6/min
    assert state.avg_episodes_per_min() == pytest.approx(6.0)
    # a system tokens/s sample wins over the derived figure
    state.fold({"time": 120.0, "kind": "system", "metrics": {"sys/tokens_per_s": 1234.0}})
    assert state.tokens_per_s(120.0) == 1234.0


def test_young_run_rate_uses_its_age_not_the_full_window():
    state = DashboardState(window_s=60, start_time=0.0)
    for t in (10.0, 20.0, 30.0):
        state.fold(ep(t))
    # 30 s old: 3 episodes over 30 s -> 6/min (a 60 s window would under-report 3/min)
    assert state.episodes_per_min(30.0) == pytest.approx(6.0)


def test_per_group_table_values():
    state = DashboardState(start_time=0.0)
    m = "episode/tse", "episode/satisfaction", "episode/finish_rate", "episode/cost_rate"
    state.fold(ep(1.0, "coop", **dict(zip(m, (0.2, 3.0, 1.0, 1.0), strict=True))))
    state.fold(ep(2.0, "coop", **dict(zip(m, (0.4, 5.0, 0.0, 0.0), strict=True))))
    state.fold(ep(3.0, "coop", status="error", **{"episode/error_rate": 1.0}))
    state.fold(ep(4.0, "hard", **dict(zip(m, (0.9, 2.0, 1.0, 2.0), strict=True))))
    rows = {r["group"]: r for r in state.group_rows()}
    # coop: 3 episodes, 1 failed; means over the 2 ok ones: TSE (0.2+0.4)/2, satisfaction (3+5)/2, ...
    assert rows["coop"] == {
        "group": "coop",
        "episodes": 3,
        "failures": 1,
        "tse": pytest.approx(0.3),
        "satisfaction": 4.0,
        "finish_rate": 0.5,
        "cost_rate": 0.5,
    }
    assert rows["hard"]["episodes"] == 1 and rows["hard"]["tse"] == 0.9 and rows["hard"]["cost_rate"] == 2.0
    assert state.failures == 1 and state.errors_total == 1 and "judge timed out" in state.errors[-1][2]


def test_start_vs_now_and_learner_figures():
    state = DashboardState(recent=2, trend_n=2, start_time=0.0)
    for i, v in enumerate((0.1, 0.2, 0.3, 0.4, 0.5)):
        state.fold(ep(float(i), **{"reward/esndcg": v, "episode/compliance": 1.0 - v}))
    assert state.start_mean("reward/esndcg") == pytest.approx(0.15)  # (0.1 + 0.2) / 2
    assert state.now_mean("reward/esndcg") == pytest.approx(0.45)  # (0.4 + 0.5) / 2
    assert state.now_mean("reward/compliance") == pytest.approx(0.55)  # falls back to episode/compliance
    assert math.isnan(state.now_mean("episode/tse"))
    state.fold({"time": 5.0, "kind": "push", "step": 5, "metrics": {"sys/policy_version": 5, "sys/push_latency_s": 2}})
    learner = {"loss/expert": 0.5, "loss/cs": 1.5, "loss/kl": 0.02, "learner/cost_lambda": 0.3, "sys/step_time_s": 4.0}
    state.fold({"time": 6.0, "kind": "learner", "step": 11, "metrics": {**learner, "learner/trained_version": 3}})
    state.fold({"time": 7.0, "kind": "learner", "step": 12, "metrics": {"sys/step_time_s": 2.0}})
    assert state.policy_version == 5 and state.version_lag == 2  # 5 - 3
    assert state.learner_step == 12 and state.step_time == 2.0 and state.mean_step_time == 3.0
    assert state.losses == {"loss/expert": 0.5, "loss/cs": 1.5, "loss/kl": 0.02} and state.lam == 0.3
    assert state.pushes == 1 and state.push_latency == 2


def _busy_dashboard() -> Dashboard:
    state = DashboardState(start_time=0.0, recent=2, trend_n=2)
    dash = Dashboard(DashboardConfig(excerpt_turns=2), "unit-run", state=state)
    for i in range(4):
        dash.update(
            "episode",
            {"reward/esndcg": 0.5 + 0.1 * i, "reward/cs": 0.7, "reward/joint": 0.6, "episode/tse": 0.8},
            {
                "persona_group": "impatient",
                "status": "ok",
                "episode_id": f"ep-{i}",
                "excerpt": [
                    {"t": 1, "user": "where is my parcel", "skills": ["apologize"], "reply": "x", "action": "chat"},
                    {
                        "t": 2,
                        "user": "I want a refund",
                        "skills": ["offer_refund", "apologize"],
                        "reply": "Refund issued to your card.",
                        "action": "refund",
                        "r": 0.75,
                    },
                ],
            },
            time_s=float(i),
        )
    dash.update("learner", {"loss/expert": 0.4321, "loss/kl": 0.0123, "learner/trained_version": 1}, step=9, time_s=5.0)
    dash.update("push", {"sys/policy_version": 3}, time_s=5.0)
    dash.update("system", {"sys/queue_depth": 17, "sys/in_flight": 8}, time_s=5.0)
    dash.update("error", {}, {"source": "worker-2", "error": "ConnectionResetError from broker"}, time_s=6.0)
    return dash


def test_rendered_text_has_the_panels_and_values():
    text = _busy_dashboard().snapshot_text(width=140)
    for needle in (
        "unit-run",
        "throughput",
        "learner",
        "rewards & outcomes",
        "persona groups",
        "latest dialogue · ep-3 · impatient",
        "recent errors (1 total)",
        "ESNDCG",
        "0.4321",  # loss expert
        "impatient",
        "I want a refund",
        "[refund] Refund issued to your card.",
        "offer_refund, apologize",
        "ConnectionResetError from broker",
        "policy v3",
        "lag 2",
        "▲0.200",  # ESNDCG now (0.7 + 0.8) / 2 vs start (0.5 + 0.6) / 2
    ):
        assert needle in text, needle
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 140
    assert len(lines) <= 45  # fits the terminal the console is designed for


def test_snapshot_fits_45_lines_with_many_groups_and_long_text():
    dash = Dashboard(DashboardConfig(excerpt_turns=3), "r", state=DashboardState(start_time=0.0))
    long = "very long sentence " * 40
    turns = [{"t": k, "user": long, "skills": ["a_skill"] * 1, "reply": long, "action": "chat"} for k in (1, 2, 3)]
    for i in range(30):
        dash.update("episode", {"reward/cs": 0.5}, {"persona_group": f"group_{i:02d}", "excerpt": turns}, time_s=i)
    for _ in range(10):
        dash.update("error", {}, {"source": "w", "error": long}, time_s=40.0)
    lines = dash.snapshot_text(width=140).splitlines()
    assert len(lines) <= 45 and max(map(len, lines)) <= 140
    assert "+18 more" in "\n".join(lines)


def test_update_is_thread_safe():
    dash = Dashboard(DashboardConfig(), "r")

    def feed():
        for _ in range(200):
            dash.update("episode", {"reward/cs": 0.5, "episode/tokens": 1}, {"persona_group": "g"})

    threads = [threading.Thread(target=feed) for _ in range(4)]
    for th in threads:
        th.start()
    for _ in range(5):
        dash.render()
    for th in threads:
        th.join()
    assert dash.state.episodes == 800 and dash.state.groups["g"].episodes == 800


def test_not_a_terminal_falls_back_to_summary_lines(capsys):
    console = Console(file=io.StringIO(), force_terminal=False)
    dash = Dashboard(DashboardConfig(), "r", console=console, log_every_s=0.05)
    assert not dash.live
    dash.start()
    dash.update("episode", {"reward/esndcg": 0.25}, {"persona_group": "g"})
    dash.stop()
    out = capsys.readouterr().out
    assert "[r] up=" in out and "episodes=1" in out and "reward/esndcg=0.250" in out


def test_live_console_draws_on_a_terminal():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=140, height=45)
    dash = Dashboard(DashboardConfig(refresh_hz=50), "live-run", console=console)
    assert dash.live
    with dash:
        dash.update("episode", {"reward/esndcg": 0.25}, {"persona_group": "g"})
    assert "live-run" in buf.getvalue() and "throughput" in buf.getvalue()


def test_episode_event_from_a_trajectory():
    def turn(i, skills, joint):
        return Turn(
            index=i,
            user_utterance=f"user says {i}",
            user_meta=UserTurnMeta(intent="ask", emotion="calm", satisfaction=4, stop=i == 3),
            expert_skills=skills,
            teacher_skills=skills,
            cs_reply=f"reply {i}",
            cs_action="chat",
            rewards=TurnRewards(r_expert=1.0, r_cs=0.5, w_expert=0.5, w_cs=0.5, joint=joint, compliance=0.5),
        )

    traj = Trajectory(
        episode_id="ep-7",
        scenario_id="s",
        persona_id="p",
        persona_group="coop",
        turns=(turn(1, ("a",), 0.7), turn(2, ("b", "c"), 0.8), turn(3, ("d",), 0.9)),
        final_satisfaction=4,
        finished=True,
        task_completion_turns=(1, 3),
    )
    metrics, payload = episode_event(traj, tse_weights=(0.5, 0.5), tse_gamma=0.9, excerpt_turns=2)
    assert metrics["reward/esndcg"] == 1.0 and metrics["reward/compliance"] == 0.5
    assert metrics["episode/tse"] == pytest.approx(0.5 + 0.5 * 0.9)  # N = (1, 3): second task waited one turn
    assert metrics["episode/tokens"] == 0.0 and "episode/policy_version" not in metrics  # no generations recorded
    assert payload["persona_group"] == "coop" and payload["status"] == "ok"
    assert [t["t"] for t in payload["excerpt"]] == [2, 3]
    assert payload["excerpt"][0] == {
        "t": 2,
        "user": "user says 2",
        "skills": ["b", "c"],
        "reply": "reply 2",
        "action": "chat",
        "r": 0.8,
    }


def _cfg(tmp_path, **dash):
    return GopoConfig(run=RunConfig(output_dir=tmp_path, name="job"), dashboard=DashboardConfig(refresh_hz=50, **dash))


def test_attach_reads_an_existing_metrics_file(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    with MetricsLogger(cfg.run.run_dir, tensorboard=False) as log:
        for i in range(5):
            log.log(i, {"reward/joint": 0.5, "episode/tse": 0.25}, "episode", {"persona_group": "coop"}, time_s=i)
        log.log(1, {"loss/cs": 0.75, "learner/trained_version": 0}, "learner", time_s=5.0)
        log.log(1, {"sys/policy_version": 1}, "push", time_s=5.0)
    console = Console(file=io.StringIO(), force_terminal=False)
    dash = attach(cfg, max_iterations=2, console=console)
    assert dash.state.episodes == 5 and dash.state.version_lag == 1 and dash.run_name == "job"
    out = capsys.readouterr().out  # not a terminal: one full snapshot, then summary lines
    assert "persona groups" in out and "coop" in out and "0.7500" in out


def test_attach_follows_lines_appended_later(tmp_path):
    cfg = _cfg(tmp_path)
    log = MetricsLogger(cfg.run.run_dir, tensorboard=False)
    log.log(0, {"reward/cs": 0.5}, "episode")
    console = Console(file=io.StringIO(), force_terminal=False)
    timer = threading.Timer(0.05, lambda: log.log(1, {"reward/cs": 0.7}, "episode"))
    timer.start()
    dash = attach(cfg, max_iterations=20, console=console)  # 20 polls at 50 Hz = 0.4 s
    timer.join()
    log.close()
    assert dash.state.episodes == 2


def test_attach_without_a_metrics_file_exits_with_a_message(tmp_path):
    with pytest.raises(SystemExit, match="no metrics file at .*metrics.jsonl"):
        attach(_cfg(tmp_path), wait_s=0.05)


def test_sparkline_shapes():
    assert sparkline([]) == ""
    assert sparkline([1, 2, 3, 4, 5, 6, 7, 8], width=8) == "▁▂▃▄▅▆▇█"
    assert len(sparkline(list(range(1000)), width=20)) == 20
    assert len(set(sparkline([2.0] * 10))) == 1


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=3000), st.integers(4, 64))
def test_history_stays_bounded_and_keeps_the_mean_of_a_constant(values, cap):
    h = _History(cap=cap)
    for v in values:
        h.add(v)
    assert 1 <= len(h.values()) <= cap + 1
    c = _History(cap=cap)
    for _ in values:
        c.add(3.5)
    assert all(v == 3.5 for v in c.values())
