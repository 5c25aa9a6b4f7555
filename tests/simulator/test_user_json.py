"""Simulator JSON repair and the retry/error path, on outputs recorded from SmolLM2-135M (fixtures/)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from gopo_online.jsonrepair import JSONRepairError, parse_json_object
from simulator.personas import load_personas
from simulator.scenarios import sample_instance
from simulator.user import (
    FieldError,
    UserSimulator,
    UserTurn,
    UserTurnError,
    parse_user_output,
    user_turn_regex,
    user_turn_schema,
)

FIXTURES = Path(__file__).parent / "fixtures"


def _recorded():
    out = []
    for f in sorted(FIXTURES.glob("smollm2_user_outputs_*.json")):
        out += [(f.name, i, o) for i, o in enumerate(json.loads(f.read_text())["outputs"])]
    return out


RECORDED = _recorded()


@pytest.mark.parametrize(("name", "idx", "out"), RECORDED, ids=[f"{n}-{i}" for n, i, _ in RECORDED])
def test_recorded_outputs_parse_or_fail_typed(name, idx, out):
    """Every recorded output either parses to valid metadata or fails with a typed error — never anything else."""
    text = out["text"]
    try:
        utterance, meta, repairs = parse_user_output(text)
    except (JSONRepairError, FieldError):
        # unconstrained outputs are prose; length-truncated JSON lost a required value: both must be errors
        assert out["mode"] == "none" or out["finish_reason"] == "length" or "{" in text
        return
    assert utterance and 1 <= meta.satisfaction <= 5 and len(set(meta.completed_tasks)) == len(meta.completed_tasks)


def test_recorded_fixture_outcomes():
    by_mode = {}
    for _, _, o in RECORDED:
        try:
            parse_user_output(o["text"])
            ok = True
        except (JSONRepairError, FieldError):
            ok = False
        # a regex-constrained output can still run out of max_tokens inside a degenerate utterance ("I'm sorry, "
        # x 40, recorded): that one is an error (retried by the simulator), everything else must parse
        if o["mode"] == "regex" and o["finish_reason"] == "length":
            assert not ok
            continue
        by_mode.setdefault(o["mode"], []).append(ok)
    assert not any(by_mode["none"])  # SmolLM2 never writes the JSON unprompted by a grammar
    assert sum(by_mode["json_schema"]) >= 6  # most schema-constrained outputs repair fine
    if "regex" in by_mode:
        assert all(by_mode["regex"])  # the regex path admits only parseable text


def test_recorded_duplicate_tasks_are_deduplicated_and_reported():
    text = next(o["text"] for _, _, o in RECORDED if o["text"].count('"requirement_matching"') == 3)
    _, meta, repairs = parse_user_output(text)
    assert meta.completed_tasks == ("requirement_matching",) and any("filtered" in r for r in repairs)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('```json\n{"a": 1}\n```', {"a": 1}),
        ('Sure! Here it is: {"a": "x", "b": [1, 2,],} hope that helps {"c": 3}', {"a": "x", "b": [1, 2]}),
        ("{'a': 'single', 'b': True, 'c': None}", {"a": "single", "b": True, "c": None}),
        ('{a: 1, "b": false}', {"a": 1, "b": False}),
        ('{"a": "unterminated', {"a": "unterminated"}),
        ('{"a": {"b": 1}', {"a": {"b": 1}}),
        ('{"a": "brace } in string"}', {"a": "brace } in string"}),
    ],
)
def test_repair_cases(text, expected):
    assert parse_json_object(text) == expected


@pytest.mark.parametrize("text", ["", "   ", "no braces here", "[1, 2, 3]"])
def test_repair_gives_up_with_typed_error(text):
    with pytest.raises(JSONRepairError):
        parse_json_object(text)


@pytest.mark.parametrize(
    ("sat", "expected"),
    # out of scale (0, 9, "10/10") is rejected and re-asked, never clamped to the maximum outcome reward (issue 11)
    [(3, 3), ("4", 4), ("4/5", 4), (4.6, 5), (0, None), (9, None), ("10/10", None), ("five", None), (True, None)],
)
def test_satisfaction_coercion(sat, expected):
    obj = {"utterance": "hi", "intent": "greet", "emotion": "calm", "satisfaction": sat, "stop": "false"}
    if expected is None:
        with pytest.raises(FieldError):
            parse_user_output(json.dumps(obj))
    else:
        _, meta, repairs = parse_user_output(json.dumps(obj))
        assert meta.satisfaction == expected and meta.stop is False and any("stop" in r for r in repairs)


def test_missing_metadata_is_never_invented():
    with pytest.raises(FieldError, match="missing field"):
        parse_user_output('{"utterance": "hi", "intent": "greet", "emotion": "calm"}')


def test_regex_admits_a_valid_turn_and_schema_lists_fields():
    good = (
        '{"utterance": "Where is my order?", "intent": "inquire_status", "emotion": "anxious", '
        '"satisfaction": 2, "stop": false, "completed_tasks": ["requirement_matching", "proactive_guidance"]}'
    )
    assert re.fullmatch(user_turn_regex(), good)
    assert not re.fullmatch(user_turn_regex(), good.replace("inquire_status", "dance"))
    assert not re.fullmatch(user_turn_regex(), good.replace(', "proactive_guidance"', ', "requirement_matching"'))
    assert set(user_turn_schema()["required"]) >= {"utterance", "intent", "emotion", "satisfaction", "stop"}


class _Res:
    def __init__(self, text):
        self.text = text


class _Client:
    def __init__(self, texts, exc=None):
        self.texts = list(texts)
        self.exc = exc
        self.seeds = []

    def chat(self, messages, *, model, temperature, max_tokens, seed=None, structured=None):
        self.seeds.append(seed)
        if self.exc:
            raise self.exc
        return _Res(self.texts.pop(0))


@pytest.fixture(scope="module")
def ctx():
    return load_personas()[0], sample_instance("ecommerce", seed=0)


def test_retry_then_success(ctx):
    bad = RECORDED[0][2]["text"]
    good = '{"utterance": "hi", "intent": "greet", "emotion": "calm", "satisfaction": 3, "stop": false}'
    client = _Client([bad, good])
    res = UserSimulator(client, "m", json_retries=2).respond(
        persona=ctx[0], instance=ctx[1], history=(), turn=1, seed=5
    )
    assert isinstance(res, UserTurn) and res.attempts == 2 and len(set(client.seeds)) == 2


def test_retry_budget_then_error_turn_with_raw(ctx):
    texts = [o["text"] for _, _, o in RECORDED if o["mode"] == "none"][:3]
    res = UserSimulator(_Client(texts), "m", json_retries=2).respond(
        persona=ctx[0], instance=ctx[1], history=(), turn=1, seed=0
    )
    assert isinstance(res, UserTurnError) and res.stage == "json" and res.attempts == 3
    assert list(res.raw_outputs) == texts


def test_request_failure_is_error_turn(ctx):
    res = UserSimulator(_Client([], exc=TimeoutError("read timed out")), "m").respond(
        persona=ctx[0], instance=ctx[1], history=(), turn=1
    )
    assert isinstance(res, UserTurnError) and res.stage == "request" and "timed out" in res.error


class _Capture:
    def __init__(self):
        self.calls = []

    def chat(self, messages, *, model, temperature, max_tokens, seed=None, structured=None):
        self.calls.append((max_tokens, structured))
        return type("R", (), {"text": '{"utterance": "hi", "intent": "greet", "emotion": "calm", "satisfaction": 3, '
                                      '"stop": false, "completed_tasks": []}'})()  # fmt: skip


@pytest.mark.parametrize("overrides", [[], ["simulator.max_tokens=216"], ["simulator.max_tokens=1000"]])
def test_llm_turn_regex_always_fits_max_tokens(ctx, overrides):
    """Issue 8: the regex admitted a 240-character utterance + the metadata (~440 characters) under max_tokens=160,
    so a turn could be cut before its JSON closed. Every string the sent regex admits must fit max_tokens: it is
    printable ASCII (one byte, so at most one token, per character) no longer than max_tokens characters."""
    import re._parser as sre_parse

    from gopo_online.config import load_config

    cfg = load_config(overrides=overrides)
    client = _Capture()
    sim = UserSimulator.from_config(cfg.simulator, client, "m")
    persona, inst = ctx
    assert sim.respond(persona=persona, instance=inst, history=(), turn=1, seed=0).ok
    max_tokens, structured = client.calls[0]
    regex = structured["regex"]
    assert sre_parse.parse(regex).getwidth()[1] <= max_tokens
    turn = (
        '{"utterance": "caf%s", "intent": "greet", "emotion": "calm", "satisfaction": 3, "stop": false, '
        '"completed_tasks": []}'
    )
    assert re.fullmatch(regex, turn % "e") and re.fullmatch(regex, turn % "\u00e9") is None  # 1 byte per character
