"""The agenda user model (simulator.mode = "agenda"): deterministic metadata, persona policies, LLM wording with a
template fallback, quality gates. Unit level with fake chat clients; the real server runs in
tests/simulator/test_agenda_integration.py and tests/test_loop_integration.py."""

from __future__ import annotations

import re
import re._parser as sre_parse
from types import SimpleNamespace

import pytest

from gopo_online.config import GopoConfig, load_config
from simulator.agenda import AgendaUserSimulator, quality_issues, replay, wrong_order_id
from simulator.episode import play_episode
from simulator.personas import load_personas
from simulator.scenarios import sample_instance
from simulator.user import UserSimulator, UserTurn, make_user_simulator, simulator_mode

CFG = GopoConfig()


class EchoClient:
    """Returns a fixed text, or the template (the message after 'Customer's message: ') with a prefix."""

    def __init__(self, text=None, prefix="Well, "):
        self.text, self.prefix, self.calls = text, prefix, []

    def chat(self, messages, *, model, temperature, max_tokens, seed=None, structured=None):
        self.calls.append({"max_tokens": max_tokens, "structured": structured, "seed": seed})
        if self.text is not None:
            return SimpleNamespace(text=self.text)
        template = messages[-1]["content"].split("Customer's message: ", 1)[1].split("\nRewritten", 1)[0]
        return SimpleNamespace(text=self.prefix + template[0].lower() + template[1:])


class Boom:
    def chat(self, *a, **k):
        raise TimeoutError("read timed out")


def persona(**levels):
    """The first shipped persona with some trait levels / fields replaced."""
    base = load_personas()[0]
    intr = base.intrinsic
    upd = {}
    for dim in ("communication_style", "information_disclosure", "problem_solving_style", "affective_style"):
        if dim in levels:
            upd[dim] = getattr(intr, dim).model_copy(update={"level": levels.pop(dim)})
    return base.model_copy(update={"intrinsic": intr.model_copy(update=upd), "scenarios": (), **levels})


@pytest.fixture(scope="module")
def food():
    return sample_instance("food_delivery", seed=1, case_type="damaged", demand="incentive_open")


def _respond(sim, p, inst, history=(), actions=(), turn=None, seed=5):
    turn = turn or sum(r == "user" for r, _ in history) + 1
    return sim.respond(persona=p, instance=inst, history=history, turn=turn, seed=seed, actions=actions,
                       episode_seed=seed)  # fmt: skip


def test_metadata_does_not_depend_on_the_llm_text(food):
    p = persona(information_disclosure="forthcoming")
    hist = (("user", "hi"), ("agent", f"I'm sorry. Which order is it? Please send a photo of the {food.case_id}."))
    metas = set()
    for client in (EchoClient(), EchoClient(text="How can I assist you today?"), EchoClient(text="An"), None):
        res = _respond(AgendaUserSimulator(client, "m"), p, food, hist, ("chat",))
        assert isinstance(res, UserTurn)
        metas.add(res.meta.model_dump_json(exclude={"source", "state"}))
    assert len(metas) == 1
    # and the same inputs give the same turn
    sim = AgendaUserSimulator(EchoClient(), "m")
    assert _respond(sim, p, food, hist, ("chat",)).meta == _respond(sim, p, food, hist, ("chat",)).meta


def test_llm_words_used_when_usable_else_template_recorded(food):
    p = persona(information_disclosure="proactive")
    good = _respond(AgendaUserSimulator(EchoClient(), "m"), p, food)
    assert good.meta.source == "llm" and good.utterance.startswith("Well, ") and food.case_id in good.utterance
    bad_client = EchoClient(text="Hello, welcome to the customer support system. How can I assist you today?")
    bad = _respond(AgendaUserSimulator(bad_client, "m"), p, food)
    assert bad.meta.source == "template" and len(bad_client.calls) == 2  # regenerated once, then the template
    assert "speaks_as_agent" in bad.meta.state["llm_rejected"][0] and food.case_id in bad.utterance
    assert bad.meta.state["gate_issues"] == []
    # an LLM that drops the order number it must disclose is not used either
    drops = _respond(AgendaUserSimulator(EchoClient(text="My food was spilled everywhere, please help."), "m"), p, food)
    assert drops.meta.source == "template" and "drops_facts" in drops.meta.state["llm_rejected"][0]


def test_endpoint_failure_falls_back_to_the_template_and_says_so(food):
    """Only the words come from the LLM: a failed request (a real loop run hit a worker-side httpx import race)
    leaves the turn to the template, recorded; the metadata is the same as with a working endpoint."""
    res = _respond(AgendaUserSimulator(Boom(), "m"), persona(), food)
    assert isinstance(res, UserTurn) and res.meta.source == "template"
    assert res.meta.state["llm_rejected"] == ["request failed: TimeoutError: read timed out"]
    ok = _respond(AgendaUserSimulator(EchoClient(), "m"), persona(), food)
    assert res.meta.model_dump(exclude={"source", "state"}) == ok.meta.model_dump(exclude={"source", "state"})


def _width(regex: str) -> int:
    return sre_parse.parse(regex).getwidth()[1]


@pytest.mark.parametrize("max_tokens", [16, 40, 100, 320])
def test_agenda_request_always_fits_max_tokens(food, max_tokens):
    client = EchoClient()
    _respond(AgendaUserSimulator(client, "m", max_tokens=max_tokens), persona(), food)
    call = client.calls[0]
    assert call["max_tokens"] == max_tokens and _width(call["structured"]["regex"]) <= max_tokens
    # printable ASCII only: one byte (<= one token) per character
    assert re.fullmatch(call["structured"]["regex"], "Abcdefgh \u00e9") is None


def _ask_order(n, inst):
    hist, acts = [("user", "x")], []
    for _ in range(n):
        hist += [("agent", "Could you give me your order number?"), ("user", "y")]
        acts.append("chat")
    return tuple(hist[:-1]), tuple(acts)


@pytest.mark.parametrize(
    ("level", "turn_disclosed", "wrong_first"),
    [("proactive", 1, False), ("forthcoming", 2, False), ("reluctant", 3, False), ("withholding", 3, True)],
)
def test_disclosure_policy(food, level, turn_disclosed, wrong_first):
    p = persona(information_disclosure=level)
    sim = AgendaUserSimulator(None, "m")
    oid = food.user_facts["order_id"]
    seen = None
    texts = []
    for asks in range(0, 3):
        hist, acts = _ask_order(asks, food)
        res = _respond(sim, p, food, hist, acts)
        texts.append(res.utterance)
        if oid in res.utterance and seen is None:
            seen = asks + 1
    assert seen == turn_disclosed, texts
    assert (wrong_order_id(oid) in texts[1]) == wrong_first


def _offer_dialogue(p, inst, action):
    sim = AgendaUserSimulator(None, "m")
    refs = inst.reference_replies
    hist = (("user", "x"), ("agent", refs["requirement_matching"] + " I understand, sorry."),
            ("user", "y"), ("agent", f"Here is what I can do: {refs['proactive_guidance']}"))  # fmt: skip
    return _respond(sim, p, inst, hist, ("chat", action))


def test_acceptance_by_demand():
    inst = sample_instance("ecommerce", seed=3, case_type="return_refund", demand="rigid_pursuit")
    rigid = persona(extrinsic_demand="rigid_pursuit", problem_solving_style="compromising")
    openp = persona(extrinsic_demand="incentive_open", problem_solving_style="compromising")
    assert not _offer_dialogue(rigid, inst, "voucher").meta.stop  # only the exact outcome (a refund) ends it
    assert _offer_dialogue(rigid, inst, "refund").meta.stop
    res = _offer_dialogue(openp, inst, "voucher")
    assert res.meta.stop and res.meta.intent == "accept_offer" and res.meta.satisfaction >= 4
    # an adversarial user turns the first acceptable offer down on principle
    adv = persona(extrinsic_demand="incentive_open", problem_solving_style="adversarial")
    res = _offer_dialogue(adv, inst, "voucher")
    assert not res.meta.stop and res.meta.intent == "reject_offer"


def test_quality_gates(food):
    oid = food.user_facts["order_id"]
    kw = dict(instance=food, earlier_user=["My soup spilled all over the bag, I want a voucher."], issued=())
    assert quality_issues("How can I assist you today?", **kw) == ["speaks_as_agent"]
    assert quality_issues("My soup spilled all over the bag, I want a voucher!", **kw) == ["repeats_turn"]
    assert quality_issues(f"It is order {oid}.", withheld_values=(oid,), **kw) == ["breaks_disclosure"]
    assert quality_issues("Thanks for the refund, bye.", **kw) == ["contradicts_state"]
    assert quality_issues("Thanks for the refund, bye.", **{**kw, "issued": ("refund",)}) == []
    assert quality_issues("My order is F999999.", allowed_ids=(oid,), **kw) == ["contradicts_state"]
    assert quality_issues(f"My order is {oid}, the soup spilled.", allowed_ids=(oid,), **kw) == []


class LLMUser:
    """An llm-mode user whose first answer to each turn is given, the regenerated one another."""

    def __init__(self, first, second):
        self.first, self.second, self.calls = first, second, 0

    def respond(self, *, persona, instance, history, turn, seed=None):
        from gopo_online.types import UserTurnMeta

        self.calls += 1
        text = self.first if self.calls % 2 else self.second
        meta = UserTurnMeta(intent="complain", emotion="angry", satisfaction=2, stop=turn >= 2)
        return UserTurn(utterance=f"{text} (turn {turn})" if "assist" not in text else text, meta=meta, raw="",
                        attempts=1)  # fmt: skip


class OneCS:
    def respond(self, state):
        return "I'm sorry, let me look at it.", "chat", None, None


def test_play_episode_regenerates_then_flags(food):
    p = persona()
    agent_talk = "Hello, how can I assist you today?"
    user = LLMUser(agent_talk, "My soup spilled")
    fixed = play_episode(episode_id="e1", scenario_instance=food, persona=p, user_sim=user, expert=None, cs=OneCS(),
                         judge=None, cfg=CFG)  # fmt: skip
    assert fixed.status == "ok" and fixed.sim_regenerated == 2 and not fixed.sim_flagged
    assert all("assist" not in t.user_utterance for t in fixed.turns)
    user = LLMUser(agent_talk, agent_talk)
    flagged = play_episode(episode_id="e2", scenario_instance=food, persona=p, user_sim=user, expert=None,
                           cs=OneCS(), judge=None, cfg=CFG)  # fmt: skip
    assert flagged.sim_flagged and flagged.sim_flags[0] == "turn 1: speaks_as_agent"


def test_mode_default_and_factory():
    assert simulator_mode(CFG) == "agenda"
    ext = load_config(overrides=["serving.simulator=external", "serving.external_url=http://x/v1",
                                 "serving.external_model=big"])  # fmt: skip
    assert simulator_mode(ext) == "llm"
    assert isinstance(make_user_simulator(CFG, EchoClient(), "m"), AgendaUserSimulator)
    assert isinstance(make_user_simulator(ext, EchoClient(), "m", structured="json"), UserSimulator)
    with pytest.raises(ValueError, match="simulator.max_tokens=160 is too small"):
        UserSimulator(EchoClient(), "m", max_tokens=160)


def test_the_small_default_uses_the_template_words_without_an_llm_call(food):
    """`simulator.agenda_rewrite = "auto"`: no rewording request on the small default (the gates rejected 83% of the
    135M model's rewordings, and they were half of the engine's requests); a capable simulator model rewords."""
    client = EchoClient()
    res = _respond(make_user_simulator(CFG, client, "m"), persona(), food)
    assert client.calls == [] and res.meta.source == "template"
    for overrides in (["simulator.agenda_rewrite=true"], ["model.path='/models/big'"]):
        client = EchoClient()
        res = _respond(make_user_simulator(load_config(overrides=overrides), client, "m"), persona(), food)
        assert len(client.calls) == 1 and res.meta.source == "llm", overrides
    client = EchoClient()
    off = load_config(overrides=["model.path='/models/big'", "simulator.agenda_rewrite=false"])
    assert _respond(make_user_simulator(off, client, "m"), persona(), food).meta.source == "template"
    assert client.calls == []


def test_agenda_episode_state_is_recorded_and_replayable(food):
    p = persona(information_disclosure="forthcoming")
    sim = AgendaUserSimulator(None, "m")

    class CS:
        def respond(self, state):
            r = food.reference_replies
            return ({1: ("I'm sorry. What is your order number?", "chat"), 2: (r["information_delivery"], "chat"),
                     3: (r["proactive_guidance"], "voucher")}[min(state.turn, 3)] + (None, None))  # fmt: skip

    tr = play_episode(episode_id="e", scenario_instance=food, persona=p, user_sim=sim, expert=None, cs=CS(),
                      judge=None, cfg=CFG, seed=9)  # fmt: skip
    assert tr.status == "ok" and tr.finished and tr.final_satisfaction >= 4
    assert all(t.user_meta.state is not None and t.user_meta.source == "template" for t in tr.turns)
    # the recorded state is what a replay of the dialogue gives
    hist = [x for t in tr.turns for x in (("user", t.user_utterance), ("agent", t.cs_reply))]
    st, _ = replay(p, food, hist[:4], [t.cs_action for t in tr.turns][:2], 9)
    assert tr.turns[2].user_meta.state["satisfaction"] == st.satisfaction
    assert tr.turns[2].user_meta.satisfaction == st.satisfaction


def test_non_vllm_endpoint_gets_no_regex_and_long_text_is_rejected(food):
    client = EchoClient(text="I want my money back now. " * 20)
    sim = make_user_simulator(load_config(overrides=["simulator.agenda_rewrite=true"]), client, "m", structured="json")
    res = _respond(sim, persona(), food)
    assert client.calls[0]["structured"] is None
    assert res.meta.source == "template" and "too_long" in res.meta.state["llm_rejected"][0]


def test_recorded_small_model_rewrites_are_rejected(food):
    """Rewrites SmolLM2-135M wrote in a real stress run (agent talk, rambling) must not become user turns."""
    from simulator.agenda import off_plan

    template = "Okay. I think a voucher would be fair for this."
    recorded = (
        "I'm sorry for the trouble, I'm glad to assist you. I'm here to help in any way I can. If you have any "
        "questions or need more assistance, please do not hesitate to ask."
    )
    kw = dict(instance=food, earlier_user=[], issued=())
    assert quality_issues(recorded, **kw) == ["speaks_as_agent"]
    assert (
        off_plan(recorded, template) and off_plan("An", template) and off_plan("The weather is nice today.", template)
    )
    assert not off_plan("Okay, I think a voucher would be fair here.", template)


def test_prompt_echo_is_rejected(food):
    client = EchoClient(prefix="Customer's message: ")
    res = _respond(AgendaUserSimulator(client, "m"), persona(information_disclosure="proactive"), food)
    assert res.meta.source == "template" and "echoes_prompt" in res.meta.state["llm_rejected"][0]


def test_sorry_alone_does_not_satisfy_a_feedback_user():
    inst = sample_instance("ecommerce", seed=2, case_type="product_inquiry", demand="feedback_oriented")
    p = persona(extrinsic_demand="feedback_oriented")
    sim = AgendaUserSimulator(None, "m")
    hist, acts = [("user", "x")], []
    for _ in range(4):
        hist += [("agent", "I'm sorry for any confusion. Can you tell me more details?"), ("user", "y")]
        acts.append("chat")
    res = _respond(sim, p, inst, tuple(hist[:-1]), tuple(acts))
    assert res.meta.satisfaction <= 3 and not res.meta.stop
