from __future__ import annotations

import pytest
import torch

from gopo_online.types import Trajectory
from trainer.collate import collate, drop_errors, drop_sim_flagged, split_fresh
from trainer.synthetic import make_trajectory


def test_split_fresh_counts_stale(fake_tok):
    trajs = [make_trajectory(fake_tok, i, 2, version=v) for i, v in enumerate([0, 1, 2, 3, 5])]
    fresh, dropped = split_fresh(trajs, current_version=5, max_staleness=2)
    # ages 5, 4, 3, 2, 0 -> ages > 2 dropped: three of them
    assert [t.min_policy_version for t in fresh] == [3, 5]
    assert dropped == 3
    fresh, dropped = split_fresh(trajs, current_version=5, max_staleness=0)
    assert dropped == 4


def test_future_version_trajectories_are_rejected_with_a_reason(fake_tok):
    """Defect: a trajectory from a version the learner never published (negative age) was trained on."""
    from trainer.collate import split_versions

    trajs = [make_trajectory(fake_tok, i, 2, version=v) for i, v in enumerate([3, 4, 6])]
    fresh, dropped = split_fresh(trajs, current_version=4, max_staleness=2)
    assert [t.min_policy_version for t in fresh] == [3, 4] and dropped == 0
    kept, stale, future = split_versions(trajs, current_version=4, max_staleness=2)
    assert [t.episode_id for t in kept] == ["ep0", "ep1"] and stale == 0
    assert [(r.episode_id, r.reason) for r in future] == [("ep2", "future_version")]
    assert "6 > learner version 4" in future[0].detail


def test_behaviour_logprobs_with_push_every_two(fake_tok):
    """Defect: with push_every >= 2 the learner compared versions with None (`mb.versions == None`) and crashed."""
    from trainer.learner import behaviour_logprobs

    mb = collate([make_trajectory(fake_tok, 0, 2, version=3)], micro_batch_turns=4).batches["cs"][0]
    logp = torch.full(mb.old_logprobs.shape, -0.25)
    # right after a push, rows of the pushed version are on-policy: ratio exactly 1
    assert torch.equal(behaviour_logprobs(logp, mb, version=3, steps_since_push=0), logp)
    # one step later (push_every = 2) no row was sampled by the current weights: the recorded logprobs
    assert torch.equal(behaviour_logprobs(logp, mb, version=3, steps_since_push=1), mb.old_logprobs)
    assert torch.equal(behaviour_logprobs(logp, mb, version=4, steps_since_push=0), mb.old_logprobs)


def test_collate_records_temperature_and_grammar(fake_tok):
    from gopo_online.types import GrammarRef

    tr = make_trajectory(fake_tok, 0, 2)
    ref = GrammarRef(kind="cs_action", choices=("chat", "voucher"))
    turns = tuple(t.model_copy(update={"cs_gen": t.cs_gen.model_copy(update={"grammar": ref})}) for t in tr.turns)
    res = collate([tr.model_copy(update={"turns": turns})], micro_batch_turns=4)
    cs = res.batches["cs"][0]
    assert cs.temperatures.tolist() == pytest.approx([0.8, 0.8]) and cs.grammars == [ref, ref]
    assert [len(c) for c in cs.completions] == [int(n) for n in cs.completion_mask.sum(-1).tolist()]
    assert res.batches["expert"][0].grammars == [None, None]


def test_error_trajectories_are_skipped_and_counted(fake_tok):
    good = make_trajectory(fake_tok, 0, 2)
    bad = Trajectory(episode_id="e", scenario_id="s", persona_id="p", status="error", error="simulator timeout")
    ok, n_err = drop_errors([good, bad])
    assert ok == [good] and n_err == 1
    res = collate([good, bad], micro_batch_turns=8)
    assert res.error_trajectories == 1
    assert res.n_rows == {"expert": 2, "cs": 2}


def test_sim_flagged_episodes_are_excluded_and_counted(fake_tok):
    good = make_trajectory(fake_tok, 0, 2)
    flagged = good.model_copy(update={"episode_id": "f", "sim_flags": ("turn 2: speaks_as_agent",)})
    assert flagged.sim_flagged and not good.sim_flagged
    kept, n = drop_sim_flagged([good, flagged])
    assert kept == [good] and n == 1


def test_collate_left_pads_and_aligns_completion(fake_tok):
    trajs = [make_trajectory(fake_tok, i, 3) for i in range(2)]
    res = collate(trajs, micro_batch_turns=4, pad_id=0)
    assert [mb.size for mb in res.batches["expert"]] == [4, 2]
    by_key = {(i, t.index): t for i, tr in enumerate(trajs) for t in tr.turns}
    for mb in res.batches["cs"] + res.batches["expert"]:
        B, L = mb.input_ids.shape
        K = mb.n_completion
        assert mb.targets.shape == mb.completion_mask.shape == mb.old_logprobs.shape == (B, K)
        for b, key in enumerate(mb.keys):
            gen = by_key[key].cs_gen if mb.agent == "cs" else by_key[key].expert_gen
            n = len(gen.prompt_token_ids) + len(gen.completion_token_ids)
            # row = pads, prompt, completion; completion is the last c tokens, targets carry it
            assert mb.input_ids[b, L - n :].tolist() == list(gen.prompt_token_ids) + list(gen.completion_token_ids)
            assert mb.attention_mask[b].sum().item() == n
            assert mb.position_ids[b, L - n :].tolist() == list(range(n))
            assert mb.targets[b][mb.completion_mask[b].bool()].tolist() == list(gen.completion_token_ids)
            assert mb.old_logprobs[b][mb.completion_mask[b].bool()].tolist() == pytest.approx(list(gen.logprobs))
            # the state s_t is the last prompt token, right before the completion
            assert mb.input_ids[b, mb.state_index[b]].item() == gen.prompt_token_ids[-1]
        # sorted by length: rows never get shorter along the batch list
    lens = [mb.attention_mask.sum(1) for mb in res.batches["cs"]]
    flat = torch.cat(lens).tolist()
    assert flat == sorted(flat)


def test_collate_advantages_and_side_channels(fake_tok):
    trajs = [make_trajectory(fake_tok, 0, 2)]
    adv = {"expert": {(0, 1): 1.5, (0, 2): -0.5}, "cs": {(0, 1): 0.25, (0, 2): 0.75}}
    res = collate(trajs, micro_batch_turns=8, advantages=adv)
    mb = res.batches["cs"][0]
    assert dict(zip(mb.keys, mb.advantages.tolist(), strict=True)) == {(0, 1): 0.25, (0, 2): 0.75}
    t = {tt.index: tt for tt in trajs[0].turns}
    assert dict(zip(mb.keys, mb.costs.tolist(), strict=True)) == {k[0:2]: t[k[1]].cost for k in mb.keys}
    assert mb.has_distance.tolist() == [1.0, 1.0]
    with pytest.raises(KeyError):
        collate(trajs, micro_batch_turns=8, advantages={"expert": {}, "cs": {}})


def test_turn_without_rewards_is_skipped(fake_tok):
    tr = make_trajectory(fake_tok, 0, 2)
    turns = (tr.turns[0].model_copy(update={"rewards": None}), tr.turns[1])
    tr = tr.model_copy(update={"turns": turns})
    res = collate([tr], micro_batch_turns=8)
    assert res.n_rows == {"expert": 1, "cs": 1}
    assert res.skipped_turns == {"expert": 1, "cs": 1}


def test_micro_batches_respect_a_padded_token_budget(fake_tok):
    """Defect: micro-batches were bounded by rows only; 8 rows of ~700 tokens (float32, forward + backward) took
    19 GB and the kernel killed the learner on a 24 GiB AVX2 box. With a token budget each micro-batch holds at
    most that many padded tokens (a longer single row alone) and every row is in exactly one micro-batch (so the
    learner's size / rows weights still sum to 1)."""
    trajs = [make_trajectory(fake_tok, i, 3) for i in range(4)]
    wide = collate(trajs, micro_batch_turns=8)
    lengths = sorted(mb.input_ids.shape[1] for mb in wide.batches["cs"])
    budget = 2 * max(lengths) + 1  # at most two of the longest rows fit
    res = collate(trajs, micro_batch_turns=8, micro_batch_tokens=budget)
    for agent in ("expert", "cs"):
        mbs = res.batches[agent]
        assert len(mbs) > len(wide.batches[agent])
        assert all(mb.size * mb.input_ids.shape[1] <= budget or mb.size == 1 for mb in mbs)
        keys = [k for mb in mbs for k in mb.keys]
        assert sorted(keys) == sorted(k for mb in wide.batches[agent] for k in mb.keys) and len(set(keys)) == len(keys)
    tiny = collate(trajs, micro_batch_turns=8, micro_batch_tokens=1)  # every row longer than the budget: alone
    assert all(mb.size == 1 for mb in tiny.batches["cs"]) and len(tiny.batches["cs"]) == res.n_rows["cs"]
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        collate(trajs, micro_batch_turns=8, micro_batch_tokens=0)
