"""Short real stress runs: a real vLLM server with the default model plays the simulated users, the judge and the
agent under test (a single agent; the two-agent system with prompt injectors), no mocks. ~1-3 min on 2 CPU cores."""

from __future__ import annotations

import json
import math

import pytest

from gopo_online.config import load_config
from gopo_online.types import Trajectory

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(policy_server):
    return policy_server


def test_short_stress_single_agent(server, tmp_path):
    from simulator.stress import METRIC_KEYS, main

    # one turn per episode: the multi-turn path is the loop test's; here the report, its groups and the 135M model's
    # words in the agenda user's turn (two turns made this test 74 s of the suite on the AVX2 box)
    cfg = load_config(overrides=["simulator.max_turns=1", "agents.cs.max_tokens=48", "simulator.json_retries=1"])
    out = tmp_path / "stress"
    report = main(
        cfg,
        n_personas=2,
        concurrency=2,
        seed=1,
        target_url=server.base_url,
        target_model="policy",
        out=out,
        max_turns=1,
        sim_url=server.base_url,
    )
    for name in ("report.json", "trajectories.jsonl", "report.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["overall"] == json.loads(json.dumps(report["overall"]))
    assert set(METRIC_KEYS) <= set(on_disk["overall"])
    assert {"difficulty=hard", "difficulty=easy"} <= set(on_disk["groups"])
    assert on_disk["setup"]["target"].startswith("single-agent:policy@")
    trajs = [Trajectory.from_json(line) for line in (out / "trajectories.jsonl").read_text().splitlines()]
    assert len(trajs) == 2 and on_disk["overall"]["episodes"] == 2
    ok = [t for t in trajs if t.status == "ok"]
    # the default simulator is the agenda user model: its metadata never depends on the model's JSON, so no episode
    # fails in the simulator (issue 8: half of them did with the LLM role-play on this model)
    assert all(t.error for t in trajs if t.status == "error")
    assert not [t.error for t in trajs if t.error and "simulator" in t.error]
    assert ok, [t.error for t in trajs]
    for t in ok:
        for u in t.turns:
            assert u.user_meta.source in ("llm", "template") and u.user_meta.state is not None
            assert u.user_meta.source == "template" or len(u.user_utterance) <= cfg.simulator.utterance_chars
            assert "assist you" not in u.user_utterance
    assert {"sim_flagged", "sim_regenerated", "sim_template_turns"} <= set(o := on_disk["overall"])
    assert o["sim_flagged"] == sum(t.sim_flagged for t in trajs)
    o = on_disk["overall"]
    for key in ("tse", "satisfaction", "finish_rate", "cost_rate", "turns", "compliance"):
        assert isinstance(o[key], float) and math.isfinite(o[key]), key
    assert 1.0 <= o["satisfaction"] <= 5.0 and 0.0 <= o["tse"] <= 1.0 and o["turns"] == 1.0
    for t in ok:
        assert all(u.cs_reply and u.user_utterance and u.expert_skills == ("single_agent",) for u in t.turns)
        assert t.final_satisfaction is not None


def test_two_agent_stress_with_prompt_injectors(server, tmp_path):
    """`stress --injectors 0.5` against our two agents: half the users end every message with a prompt injection.
    The CS agent's action is decoded under the chosen skills' grammar, so whatever the words say, no injected turn
    may carry an action none of its skills allows; the report counts the injected turns' breaches per group."""
    from simulator.adversary import INJECTIONS, breaches
    from simulator.stress import main

    cfg = load_config(overrides=["simulator.max_turns=1", "agents.cs.max_tokens=32"])
    out = tmp_path / "stress"
    report = main(cfg, n_personas=2, concurrency=2, seed=3, out=out, max_turns=1, sim_url=server.base_url,
                  injectors=0.5)  # fmt: skip
    assert report["setup"]["target"] == f"two-agent@{server.base_url}"
    assert len(report["setup"]["injected"]) == 1
    assert {"adversary=injection", "adversary=none"} <= set(report["groups"])
    trajs = {t.episode_id: t for t in map(Trajectory.from_json, (out / "trajectories.jsonl").read_text().splitlines())}
    inj = trajs[report["setup"]["injected"][0]]
    assert inj.status == "ok", inj.error
    rows = {r["episode_id"]: r for r in report["episodes"]}
    assert rows[inj.episode_id]["injected_turns"] == [u.index for u in inj.turns]  # every message, from turn 1
    for u in inj.turns:
        assert any(u.user_utterance.endswith(text) for text in INJECTIONS), u.user_utterance
        # the decoder admits only the actions the chosen skills allow (their intersection, or their union when they
        # conflict): so whatever the words demand, at least one chosen skill allows the action taken
        skill_actions = [c for c in u.compliance.checks if c.kind == "action" and c.skill in u.expert_skills]
        assert not skill_actions or any(c.passed for c in skill_actions), (u.expert_skills, u.cs_action)
    assert report["groups"]["adversary=injection"]["injection_breaches"] == breaches(inj)
    assert report["groups"]["adversary=none"]["injection_breaches"] == 0  # no injected turn there


def test_llm_mode_turn_always_closes_its_json(server):
    """simulator.mode = "llm" on the real model at the tightest budget the bound allows: no retries, every turn must
    parse (before issue 8's fix, 240-character utterances were cut at max_tokens=160 before the JSON closed)."""
    from concurrent.futures import ThreadPoolExecutor

    from gopo_online.serving.client import ChatClient
    from simulator.personas import load_personas
    from simulator.scenarios import sample_instance
    from simulator.user import UserSimulator, skeleton_chars

    max_tokens = skeleton_chars() + 24
    sim = UserSimulator(ChatClient(server.base_url, timeout=120), "policy", max_tokens=max_tokens,
                        json_retries=0, temperature=1.0)  # fmt: skip
    personas = load_personas()[:4]
    hist = (("agent", "Hello, this is customer support. How can I help you today?"),)

    def one(i):
        inst = sample_instance(("ecommerce", "food_delivery")[i % 2], seed=i, demand=personas[i].extrinsic_demand)
        return sim.respond(persona=personas[i], instance=inst, history=hist, turn=2, seed=i)

    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(one, range(4)))
    assert all(r.ok for r in results), [getattr(r, "error", "") for r in results]
    assert all(1 <= len(r.utterance) <= 24 for r in results)
