"""Synthetic trajectories whose token ids come from a real tokenizer's chat template.

For tests and `gopo-online bench --only learner`: they exercise the learner's collate, losses and DeepSpeed step
with realistic shapes, without a server.
"""

from __future__ import annotations

from gopo_online.types import Generation, GrammarRef, Trajectory, Turn, TurnRewards, UserTurnMeta

SKILLS = ["greet", "apologize", "offer_voucher", "check_order", "explain_policy", "escalate"]


class FakeTokenizer:
    """A stand-in for tests that need no model: characters become ids."""

    pad_token_id = 0

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"
        return [1 + (ord(c) % 200) for c in text]

    def encode(self, text, add_special_tokens=False):
        return [1 + (ord(c) % 200) for c in text]

    def convert_tokens_to_ids(self, tok):
        return 2


def _ids(tok, messages):
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def make_gen(tok, messages, completion, version=0, temperature=1.0, logprob=-1.0, grammar=None):
    prompt = _ids(tok, messages)
    comp = list(tok.encode(completion, add_special_tokens=False)) + [tok.convert_tokens_to_ids("<|im_end|>")]
    return Generation(
        prompt_token_ids=tuple(prompt),
        completion_token_ids=tuple(comp),
        logprobs=tuple(logprob for _ in comp),
        text=completion,
        model="policy",
        policy_version=version,
        temperature=temperature,
        latency_s=0.1,
        grammar=grammar,
    )


def make_trajectory(
    tok, ep: int, n_turns: int = 4, version: int = 0, scenario="ecommerce", group="g0", seed=0, grammar=False
):
    """A synthetic episode. `grammar=True`: production-shaped generations, the completions written in the agents'
    output grammars and carrying their `GrammarRef` (the Expert's skill list, the CS `ACTION: <tag>` prefix)."""
    import random

    expert_ref = GrammarRef(kind="expert_skills", choices=tuple(SKILLS), max_items=5) if grammar else None
    cs_ref = GrammarRef(kind="cs_action", choices=("chat", "voucher")) if grammar else None
    rng = random.Random(seed * 1000 + ep)
    turns = []
    for t in range(1, n_turns + 1):
        user = rng.choice(["Where is my order?", "I want a refund.", "The item arrived broken.", "Any discount?"])
        skills = tuple(rng.sample(SKILLS, rng.randint(1, 3)))
        teacher = tuple(rng.sample(SKILLS, 2))
        exp_msgs = [
            {"role": "system", "content": "Pick 1-5 skills from: " + ", ".join(SKILLS)},
            {"role": "user", "content": user},
        ]
        reply = rng.choice(["Sorry about that, let me check your order.", "I can offer a voucher.", "Refund issued."])
        cs_msgs = [
            {"role": "system", "content": "You are a helpful agent. Skills: " + ", ".join(skills)},
            {"role": "user", "content": user},
        ]
        turns.append(
            Turn(
                index=t,
                user_utterance=user,
                user_meta=UserTurnMeta(intent="ask", emotion="neutral", satisfaction=rng.randint(1, 5), stop=False),
                expert_skills=skills,
                teacher_skills=teacher,
                expert_gen=make_gen(tok, exp_msgs, ", ".join(skills), version=version, grammar=expert_ref),
                cs_reply=reply,
                cs_action="voucher" if "voucher" in reply else "chat",
                cs_gen=make_gen(
                    tok,
                    cs_msgs,
                    f"ACTION: {'voucher' if 'voucher' in reply else 'chat'}\n{reply}" if grammar else reply,
                    version=version,
                    temperature=0.8,
                    grammar=cs_ref,
                ),
                rewards=TurnRewards(
                    r_expert=rng.random(),
                    r_cs=rng.random(),
                    w_expert=0.5,
                    w_cs=0.5,
                    joint=0.5,
                    process=rng.choice([0.0, 0.5, 1.0]),
                    skill_distance=rng.random(),
                ),
                cost=1.0 if "voucher" in reply else 0.0,
            )
        )
    return Trajectory(
        episode_id=f"ep{ep}",
        scenario_id=scenario,
        persona_id=f"p{ep}",
        persona_group=group,
        turns=tuple(turns),
        final_satisfaction=rng.randint(1, 5),
    )


def sample_constrained(model, tok, masks, messages, grammar, temperature: float, seed: int, max_tokens: int = 48):
    """A `Generation` sampled the way vLLM samples a constrained request: logits -> grammar mask (xgrammar, the
    same replay `trainer.grammar` runs) -> / temperature -> softmax -> draw; the recorded logprob is log softmax of
    the masked, tempered logits at the drawn token (vLLM's `processed_logprobs`). `masks` is a
    `trainer.grammar.GrammarMasks`; one token at a time with the KV cache, fp32, so it is an independent
    computation from the learner's batched, left-padded scoring."""
    import torch
    import xgrammar as xgr

    from trainer.grammar import _unpack

    gen = torch.Generator().manual_seed(seed)
    matcher = xgr.GrammarMatcher(masks._grammar(grammar))
    bitmask = xgr.allocate_token_bitmask(1, masks.vocab_size)
    prompt = _ids(tok, messages)
    ids, logps, past = [], [], None
    inp = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(max_tokens):
            out = model(input_ids=inp, past_key_values=past, use_cache=True)
            past = out.past_key_values
            z = out.logits[0, -1].float()[: masks.vocab_size]
            matcher.fill_next_token_bitmask(bitmask)
            z = z.masked_fill(~_unpack(bitmask[0], masks.vocab_size), float("-inf")) / temperature
            logp = torch.log_softmax(z, -1)
            t = int(torch.multinomial(logp.exp(), 1, generator=gen))
            ids.append(t)
            logps.append(min(float(logp[t]), 0.0))
            assert matcher.accept_token(t)
            if matcher.is_terminated():
                break
            inp = torch.tensor([[t]])
    return Generation(
        prompt_token_ids=tuple(prompt),
        completion_token_ids=tuple(ids),
        logprobs=tuple(logps),
        text=tok.decode(ids, skip_special_tokens=True),
        model="policy",
        policy_version=0,
        temperature=temperature,
        latency_s=0.0,
        grammar=grammar,
    )
