"""GRPO groups at dispatch (workers/groups.py, the Dispatcher) and the reward terms the rollout wires in."""

from __future__ import annotations

import pytest

from gopo_online.config import GopoConfig, load_config
from gopo_online.types import JudgeScores, UserTurnMeta
from simulator.episode import play_episode
from simulator.personas import load_personas
from simulator.scenarios import sample_instance
from simulator.user import UserTurn
from trainer.advantages import compute_advantages, episode_groups
from workers.groups import group_slot

CFG = GopoConfig()


def test_group_slot_is_pure_and_fills_groups_of_g():
    slots = [group_slot(i, 4, run_seed=7) for i in range(9)]
    assert [s.group for s in slots] == [0, 0, 0, 0, 1, 1, 1, 1, 2]
    assert [s.member for s in slots] == [0, 1, 2, 3, 0, 1, 2, 3, 0]
    assert len({s.group_id for s in slots[:4]}) == 1 and slots[0].group_id != slots[4].group_id
    assert len({s.seed for s in slots[:4]}) == 1 and slots[0].seed != slots[4].seed
    assert group_slot(5, 4, 7) == slots[5]  # a resumed controller rebuilds the same groups
    assert [group_slot(i, 1, 7).member for i in range(3)] == [0, 0, 0]  # G = 1: singletons
    with pytest.raises(ValueError, match="group_size"):
        group_slot(0, 0, 7)


def test_dispatcher_sends_g_rollouts_of_one_persona_instance_and_seed():
    """Defect: every request had its own seed, so its own scenario instance: GRPO groups never formed."""
    from workers.controller import Dispatcher

    cfg = load_config(overrides=["learner.group_size=4"])
    d = Dispatcher(cfg)
    reqs = [d.request(i, policy_version=0) for i in range(8)]
    bank = {p.id: p for p in load_personas()}

    def instance_id(r):
        return sample_instance(r.scenario_id, seed=r.seed, demand=bank[r.persona_id].extrinsic_demand).instance_id

    for group in (reqs[:4], reqs[4:]):
        assert len({(r.persona_id, r.scenario_id, r.seed, r.group_id) for r in group}) == 1
        assert len({instance_id(r) for r in group}) == 1
        assert [r.sample_index for r in group] == [0, 1, 2, 3]
    assert reqs[0].group_id != reqs[4].group_id and reqs[0].seed != reqs[4].seed
    assert len({r.episode_id for r in reqs}) == 8


# ---- the production path of one group: play_episode with the rollout's reward extras ---------------------------------


class ScriptedUser:
    def __init__(self):
        self.seeds = []

    def respond(self, *, persona, instance, history, turn, seed=None):
        self.seeds.append(seed)
        meta = UserTurnMeta(intent="complain", emotion="angry", satisfaction=2 + (turn % 3), stop=turn >= 3)
        return UserTurn(utterance=f"my order is late ({turn})", meta=meta, raw="{}", attempts=1)


class SeedExpert:
    """Picks skills from the pool by the state's seed: different agent seeds give different decisions."""

    def __init__(self):
        self.seeds = []

    def decide(self, state):
        self.seeds.append(state.seed)
        pool = sorted(state.skill_names)
        return (pool[state.seed % len(pool)],), None


class EchoCS:
    def respond(self, state):
        return "I am sorry your order is late; I can offer a voucher.", "voucher", None, None


class FullJudge:
    def score(self, state, reply, action):
        return JudgeScores(
            scores={k: 0.5 for k in (*CFG.judge.dimensions, *CFG.judge.gre_dimensions)},
            principles={k: 1.0 for k in CFG.judge.principles},
        )


def _group(extras, g=4):
    from workers.groups import group_slot

    persona = load_personas()[0]
    out, users, experts = [], [], []
    for j in range(g):
        slot = group_slot(j, g, run_seed=3)
        inst = sample_instance("food_delivery", seed=slot.seed, demand=persona.extrinsic_demand)
        user, expert = ScriptedUser(), SeedExpert()
        tr = play_episode(
            episode_id=f"e{j}",
            scenario_instance=inst,
            persona=persona,
            user_sim=user,
            expert=expert,
            cs=EchoCS(),
            judge=FullJudge(),
            cfg=CFG,
            seed=slot.seed,
            agent_seed_offset=slot.member,
            **extras,
        )
        out.append(tr.model_copy(update={"group_id": slot.group_id}))
        users.append(user.seeds)
        experts.append(expert.seeds)
    return out, users, experts


def test_group_members_share_the_simulator_seed_and_differ_in_agent_seeds():
    trajs, users, experts = _group({})
    assert all(u == users[0] for u in users)  # same simulator seeds
    assert len({tuple(e) for e in experts}) == 4  # four different draws of the agents
    assert len({t.scenario_id for t in trajs}) == 1
    assert episode_groups(trajs) == [[0, 1, 2, 3]]
    adv = compute_advantages(trajs, "grpo", CFG.rewards, 0.9, 0.95)
    assert sum(adv.cs.values()) == pytest.approx(0.0, abs=1e-9)


def test_skill_distance_is_set_in_the_production_path():
    """Defect: SkillDistance was never built outside tests, so has_distance was 0 and gopo eq 9c's L_s was 0."""
    from workers.rollout import reward_extras

    trajs, _, _ = _group(reward_extras(CFG), g=1)
    turns = trajs[0].turns
    assert turns and all(t.rewards.skill_distance is not None for t in turns)
    assert all(0.0 < t.rewards.skill_distance < 2.0 for t in turns)
    # what the learner sees: every CS row has a distance (collate's has_distance, the L_s term's mask)
    from trainer.collate import collate
    from trainer.synthetic import FakeTokenizer, make_gen

    gen = make_gen(FakeTokenizer(), [{"role": "user", "content": "late"}], "sorry", temperature=0.8)
    tr = trajs[0].model_copy(update={"turns": tuple(t.model_copy(update={"cs_gen": gen}) for t in turns)})
    mb = collate([tr], micro_batch_turns=8).batches["cs"][0]
    assert mb.has_distance.sum().item() == len(turns) and (mb.skill_distance > 0).all()
    assert reward_extras(load_config(overrides=["rewards.skill_distance=false"])) == {}
