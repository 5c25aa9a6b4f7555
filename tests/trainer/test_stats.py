"""StepStats: a typed record whose keys are the metric names (what the metrics log and the dashboard read)."""

from __future__ import annotations

import json

from trainer.stats import AgentStats, StepStats


def test_step_stats_is_a_mapping_of_metric_names():
    st = StepStats(episodes=2, dropped_future=1, agents={"cs": AgentStats(rows=3, skill=0.5, beta=0.06)})
    assert dict(st) == {
        "learner/episodes": 2.0,
        "learner/dropped_future": 1.0,
        "learner/rows_cs": 3.0,
        "loss/cs_skill": 0.5,
        "learner/kl_beta_cs": 0.06,
    }
    assert st["learner/rows_cs"] == 3.0 and st.get("loss/expert") is None  # unset fields are absent
    assert json.loads(json.dumps({**st}))["loss/cs_skill"] == 0.5


def test_every_field_has_a_namespaced_key():
    from dataclasses import fields

    for cls in (StepStats, AgentStats):
        for f in fields(cls):
            if f.name != "agents":
                assert f.metadata["key"].split("/")[0] in ("loss", "reward", "learner", "sys"), f.name
