"""Against ONE real vLLM server with the default model (SmolLM2-135M-Instruct): no fakes.

Run: OMP_NUM_THREADS=1 python -m pytest tests/serving -m integration
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from gopo_online.models import default_model_dir, is_prepared
from gopo_online.serving.agents import CSAgent, DialogueTurn, ExpertAgent
from gopo_online.serving.client import ChatClient
from gopo_online.serving.judge import Judge
from gopo_online.serving.process import ServerError, VLLMServer
from gopo_online.skills import expert_grammar
from gopo_online.types import JudgeScores, Skill

pytestmark = pytest.mark.integration

MODEL = default_model_dir()
POOL = [
    Skill(name="greet", description="Greet the customer warmly."),
    Skill(name="apologize", description="Apologize for the inconvenience.", required_any=((r"sorry", r"apolog"),)),
    Skill(name="check_order", description="Look up the order status.", forbidden=(r"no idea",)),
    Skill(
        name="offer_voucher",
        description="Offer a voucher.",
        required_any=((r"voucher",),),
        allowed_actions=("voucher",),
    ),
    Skill(name="explain_policy", description="Explain the return policy."),
    Skill(name="refund_process", description="Start a refund.", allowed_actions=("refund", "chat")),
    Skill(name="escalate_human", description="Hand over to a human agent.", allowed_actions=("escalate",)),
    Skill(name="recommend_product", description="Recommend a fitting product."),
]
HISTORY = [
    DialogueTurn("Hi, I ordered shoes last week.", "Hello! How can I help?"),
    DialogueTurn("They have not arrived!"),
]


def _require_model():
    if not is_prepared(MODEL):
        pytest.skip(f"default model not prepared at {MODEL}: run `gopo-online model prepare`")


def test_bad_model_path_raises_with_log_tail(tmp_path):
    """A server on a folder that holds no model fails on its own, fast, with the log tail in the error."""
    bad = tmp_path / "no-such-model"
    bad.mkdir()
    server = VLLMServer(bad, log_path=tmp_path / "bad.log", startup_timeout_s=180)
    t0 = time.monotonic()
    with pytest.raises(ServerError) as err:
        server.start()
    assert not server.running
    msg = str(err.value)
    assert str(bad) in msg and "did not become ready" in msg
    assert len(msg.splitlines()) > 3  # the log tail is in the message
    assert time.monotonic() - t0 < 180  # it failed on its own, not by the timeout


@pytest.fixture(scope="module")
def server(policy_server):
    _require_model()
    return policy_server


@pytest.fixture(scope="module")
def client(server):
    with ChatClient(server.base_url, timeout=120.0, max_retries=2) as c:
        # Warm-up: the first structured request initialises the grammar backend (tens of seconds here).
        c.chat([{"role": "user", "content": "hi"}], model="policy", temperature=0.0, max_tokens=4,
               structured={"grammar": expert_grammar([s.name for s in POOL], 5)})  # fmt: skip
        yield c


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)


def test_server_is_healthy(server):
    assert server.is_healthy() and server.log_tail(5)


def test_expert_always_returns_distinct_pool_skills(client):
    agent = ExpertAgent(client, model="policy", policy_version=0)  # temperature 1.0 (config default)

    def one(i: int):
        return agent.decide(POOL, HISTORY, intent="delivery_delay", emotion="angry", previous_skills=["greet"], seed=i)

    with ThreadPoolExecutor(8) as ex:
        decisions = list(ex.map(one, range(20)))
    names = {s.name for s in POOL}
    for d in decisions:
        assert 1 <= len(d.skills) <= 5 and len(set(d.skills)) == len(d.skills) and set(d.skills) <= names
        # the default Expert writes two-letter codes: at most 5 codes + 4 ", " (the names took 31-63 tokens)
        assert len(d.generation.text) <= 5 * 2 + 4 * 2 and len(d.generation.completion_token_ids) <= 19
        assert d.generation.completion_token_ids and len(d.generation.logprobs) == len(
            d.generation.completion_token_ids
        )
    assert len({d.skills for d in decisions}) > 1  # sampling at T=1 explores


def test_cs_reply_parsed_with_action_tag(client):
    agent = CSAgent(client, model="policy", policy_version=2)
    context = {"order_status": "delayed in transit", "voucher_limit_eur": 5}
    cases = [POOL[1:3], [POOL[3]], [POOL[5], POOL[1]], [POOL[6]]]

    def one(i: int):
        return agent.reply("Where are my shoes?!", cases[i % len(cases)], context, HISTORY, seed=i)

    with ThreadPoolExecutor(8) as ex:
        replies = list(ex.map(one, range(8)))
    for i, r in enumerate(replies):
        skills = cases[i % len(cases)]
        assert r.reply and r.action in r.allowed_actions
        if any(s.allowed_actions for s in skills):
            assert all(r.action in s.allowed_actions for s in skills if s.allowed_actions)
        assert len(r.compliance.checks) == sum(
            len(s.required_any) + len(s.forbidden) + bool(s.allowed_actions) for s in skills
        )
        assert r.generation.policy_version == 2


def test_token_ids_and_logprobs_match_text_and_template(client, tokenizer):
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Name a colour."}]
    for structured in (None, {"grammar": expert_grammar(["red", "green", "blue"], 2)}):
        r = client.chat(messages, model="policy", temperature=1.0, max_tokens=40, structured=structured, seed=1)
        assert r.token_ids and len(r.token_ids) == len(r.logprobs)
        assert all(lp <= 0.0 for lp in r.logprobs)
        assert tokenizer.decode(list(r.token_ids), skip_special_tokens=True) == r.text
        template = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        template = template["input_ids"] if isinstance(template, dict) or hasattr(template, "keys") else template
        assert list(r.prompt_token_ids) == list(template)
        g = r.to_generation(policy_version=0)
        assert g.text == r.text


def test_judge_returns_scores_or_explicit_failure(client):
    judge = Judge(client, model="policy")
    verdicts = [
        judge.score("Where are my shoes?", reply, "chat", POOL[1:3], {"order_status": "delayed"}, seed=i)
        for i, reply in enumerate(["I am sorry for the delay, your shoes arrive tomorrow.", "No idea. Bye."])
    ]
    for v in verdicts:
        assert isinstance(v, JudgeScores) and v.raw
        if v.ok:
            assert set(v.scores) == set(judge.dimensions) and set(v.principles) == set(judge.principles)
            assert all(0.0 <= s <= 1.0 for s in v.scores.values())
        else:
            assert v.error and not v.scores


def test_recorded_logprobs_are_what_the_learner_scores(client, tokenizer):
    """vLLM's recorded logprobs (grammar mask, then temperature: processed_logprobs) equal the learner's masked,
    tempered scoring of the same tokens with the same weights (issue 9 defect 1); the learner's old full-vocabulary
    T = 1 scoring of the same tokens does not."""
    import torch
    from transformers import AutoModelForCausalLM

    from gopo_online.config import CSConfig, ExpertConfig
    from trainer.grammar import GrammarMasks
    from trainer.losses import scored_logits, token_logprobs

    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    masks = GrammarMasks(tokenizer, model.config.vocab_size)
    expert = ExpertAgent(client, model="policy", cfg=ExpertConfig(temperature=1.3))
    cs = CSAgent(client, model="policy", cfg=CSConfig(temperature=0.8))
    gens = [expert.decide(POOL, HISTORY, intent="delivery_delay", emotion="angry", seed=i).generation for i in (1, 2)]
    gens += [cs.reply("Where are my shoes?!", POOL[1:4], {"order": "late"}, HISTORY, seed=i).generation for i in (1, 2)]
    for g in gens:
        assert g.grammar is not None and g.temperature in (1.3, 0.8)
        ids = torch.tensor([list(g.prompt_token_ids) + list(g.completion_token_ids)])
        K = len(g.completion_token_ids)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, -K - 1 : -1]
        targets = torch.tensor([list(g.completion_token_ids)])
        allowed, mismatch = masks.allowed(g.grammar, g.completion_token_ids)
        assert not mismatch
        new = token_logprobs(scored_logits(logits, allowed.unsqueeze(0), torch.tensor([g.temperature])), targets)[0]
        old = token_logprobs(logits, targets)[0]
        rec = torch.tensor(g.logprobs)
        # the server computes in bf16: a small per-token difference remains, far below the old scoring's gap
        assert (new - rec).abs().mean().item() < 0.15, g.grammar.kind
        assert (old - rec).abs().mean().item() > 3 * (new - rec).abs().mean().item() + 0.1, g.grammar.kind
