"""Judge answer repair and parsing, on answers recorded from SmolLM2 and on hand-made slips."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gopo_online.config import JudgeConfig
from gopo_online.serving.client import ChatResult
from gopo_online.serving.judge import (
    Judge,
    JudgeParseError,
    OutOfScale,
    expected_digit,
    judge_regex,
    judge_schema,
    normalise_score,
    parse_judgement,
    snap_principle,
)

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "judge_raw_smollm2.json").read_text())
DIMS, PRINS = FIXTURE["dimensions"], FIXTURE["principles"]
ANSWERS = FIXTURE["answers"]
# Index of each recorded answer that holds a complete verdict after repair; every other one must fail.
REPAIRABLE = {
    0: "complete object followed by a stray '}'",
    5: "complete object with an extra unknown key and a stray '}'",
    9: "clean answer",
}


@pytest.mark.parametrize("i", range(len(ANSWERS)))
def test_recorded_smollm2_answers_repaired_or_rejected(i):
    text = ANSWERS[i]
    if i in REPAIRABLE:
        v = parse_judgement(text, DIMS, PRINS)
        assert v.ok and set(v.scores) == set(DIMS) and set(v.principles) == set(PRINS)
        assert v.raw == text
    else:
        # truncated JSON, prose, a list instead of an object, missing principles: never invented scores
        with pytest.raises(JudgeParseError):
            parse_judgement(text, DIMS, PRINS)


@pytest.mark.parametrize("i", range(len(FIXTURE["answers_placeholder_prompt"])))
def test_recorded_answers_to_the_placeholder_prompt_are_all_rejected(i):
    # Without a schema this small model never produced a complete verdict to the current prompt: every one must fail.
    with pytest.raises(JudgeParseError):
        parse_judgement(FIXTURE["answers_placeholder_prompt"][i], DIMS, PRINS)


def test_score_alias_is_accepted():
    text = '{"score": {"quality": "1"}, "principles": {"logic": "1"}}'  # shape of a recorded SmolLM2 answer
    v = parse_judgement(text, ["quality"], ["logic"])
    assert v.scores == {"quality": 0.0} and v.principles == {"logic": 1.0}


def test_recorded_answer_values():
    v = parse_judgement(ANSWERS[0], DIMS, PRINS)
    # 7 on the 1..10 scale -> (7 - 1) / 9
    assert v.scores["quality"] == pytest.approx(6 / 9)
    assert v.principles == {"logic": 1.0, "empathy": 1.0, "compliance": 1.0}


def test_repairs_fences_quotes_words_and_flat_form():
    text = (
        "Sure! ```json\n{'scores': {'Quality': '8/10', 'skill compliance': 7.5, 'empathy': 10, 'diversity': 1,}, "
        "principles: {'logic': 'partial', 'empathy': 0.5, 'compliance': 'yes'}}\n```"
    )
    v = parse_judgement(
        text, ["quality", "skill_compliance", "empathy", "diversity"], ["logic", "empathy", "compliance"]
    )
    # 8/10 is the asked scale written out -> 8 -> 7/9; 7.5 -> 6.5/9; 10 -> 1; 1 is the scale's bottom -> 0
    assert v.scores == pytest.approx({"quality": 7 / 9, "skill_compliance": 6.5 / 9, "empathy": 1.0, "diversity": 0.0})
    assert v.principles == {"logic": 0.5, "empathy": 0.5, "compliance": 1.0}
    flat = parse_judgement('{"quality": 10, "logic": 0}', ["quality"], ["logic"])
    assert flat.scores == {"quality": 1.0} and flat.principles == {"logic": 0.0}


# Issue 11 item 3: these were silently mapped (11 -> 0.11, 10.5 -> 0.105, 0.9 -> 0.9, -3 -> 0, 85 -> 0.85, a principle
# 0.4 -> 0.5 or 9 -> 1). Every one is now rejected with the value named.
@pytest.mark.parametrize(
    "quality", [11, 10.5, 0.9, -3, 0, 85, 1000, '"80%"', '"4/5"', '"11"', "true"], ids=lambda v: f"quality={v}"
)
def test_scores_off_the_asked_scale_are_rejected_not_rescaled(quality):
    with pytest.raises(JudgeParseError, match="out of scale"):
        parse_judgement(f'{{"scores": {{"quality": {quality}}}, "principles": {{"logic": 1}}}}', ["quality"], ["logic"])


@pytest.mark.parametrize("logic", [0.4, 0.76, 2, 9, -1, '"3/5"'])
def test_principles_off_their_scale_are_rejected(logic):
    with pytest.raises(JudgeParseError, match="out of scale"):
        parse_judgement(f'{{"scores": {{"quality": 5}}, "principles": {{"logic": {logic}}}}}', ["quality"], ["logic"])


def test_scale_edges_map_exactly():
    assert normalise_score(1) == 0.0 and normalise_score(1.0) == 0.0 and normalise_score(10) == 1.0
    assert normalise_score(5.5) == pytest.approx(0.5)  # (5.5 - 1) / 9
    for bad in (0.9, 10.5, 11, -3, float("nan")):
        with pytest.raises(OutOfScale):
            normalise_score(bad)
    assert [snap_principle(x) for x in (0, 0.5, 1)] == [0.0, 0.5, 1.0]
    with pytest.raises(OutOfScale):
        snap_principle(0.76)


def test_off_scale_answer_is_reasked_and_the_note_kept():
    dims = ["quality"]
    cfg = JudgeConfig(dimensions={"quality": 1.0}, gre_dimensions=[], principles={"logic": 1.0}, retries=1,
                      scoring="sampled")  # fmt: skip
    backend = Replay(['{"scores": {"quality": 11}, "principles": {"logic": 1}}',
                      '{"scores": {"quality": 7}, "principles": {"logic": 1}}'])  # fmt: skip
    v = Judge(backend, model="j", cfg=cfg).score("where?", "sorry", "chat")
    assert len(backend.calls) == 2 and v.ok and v.scores["quality"] == pytest.approx(6 / 9)  # the re-ask's 7
    assert len(v.notes) == 1 and "quality" in v.notes[0] and "11" in v.notes[0] and "re-asked" in v.notes[0]
    assert set(v.scores) == set(dims)
    # twice off scale: an explicit failure, both reasons kept
    backend = Replay(['{"scores": {"quality": 11}, "principles": {"logic": 1}}',
                      '{"scores": {"quality": -3}, "principles": {"logic": 1}}'])  # fmt: skip
    v = Judge(backend, model="j", cfg=cfg).score("where?", "sorry", "chat")
    assert not v.ok and v.scores == {} and len(v.notes) == 2 and "-3" in v.error


def test_schema_enumerates_the_ranges():
    s = judge_schema(["quality"], ["logic"])
    assert s["properties"]["scores"]["properties"]["quality"]["enum"] == list(range(1, 11))
    assert s["properties"]["principles"]["properties"]["logic"]["enum"] == [0, 0.5, 1]
    assert s["properties"]["scores"]["required"] == ["quality"]


class Replay:
    """A chat backend that replays recorded answers in order."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.calls = []

    def chat(self, messages, *, model, temperature, max_tokens, seed=None, structured=None):
        self.calls.append({"temperature": temperature, "structured": structured})
        return ChatResult(text=self.answers.pop(0), model=model)


def _cfg(retries: int) -> JudgeConfig:
    return JudgeConfig(
        dimensions={d: 1.0 for d in DIMS[:4]},
        gre_dimensions=DIMS[4:],
        principles={p: 1.0 for p in PRINS},
        retries=retries,
        scoring="sampled",
    )


def test_judge_reasks_then_succeeds_and_keeps_all_raw_text():
    backend = Replay([ANSWERS[2], ANSWERS[9]])
    v = Judge(backend, model="j", cfg=_cfg(retries=1)).score("where?", "sorry", "chat")
    assert v.ok and ANSWERS[2] in v.raw and ANSWERS[9] in v.raw
    assert backend.calls[0]["structured"]["json"]["required"] == ["scores", "principles"]
    assert backend.calls[1]["temperature"] >= 0.7  # a greedy re-ask would repeat itself


def test_judge_marks_failure_instead_of_inventing_scores():
    backend = Replay([ANSWERS[1], ANSWERS[4]])
    v = Judge(backend, model="j", cfg=_cfg(retries=1), structured=False).score("where?", "sorry", "chat")
    assert not v.ok and v.scores == {} and v.principles == {}
    assert "attempt 1" in v.error and "attempt 2" in v.error
    assert v.raw == ANSWERS[1] + "\n---\n" + ANSWERS[4]
    assert backend.calls[0]["structured"] is None


def test_prompt_lists_every_dimension_and_principle():
    judge = Judge(Replay([]), model="j", cfg=_cfg(0))
    text = judge.messages("u", "r", "chat")[1]["content"]
    for name in DIMS + PRINS:
        assert f'"{name}"' in text


# ----------------------------------------------------------------------------- expected (G-Eval) scoring


class TopReplay:
    """A backend answering in the `name=D` format with per-position candidate logprobs."""

    def __init__(self, tokens, tops):
        self.tokens, self.tops = tokens, tops
        self.calls = []

    def chat(self, messages, *, model, temperature, max_tokens, seed=None, structured=None, top_logprobs=0):
        self.calls.append({"structured": structured, "top_logprobs": top_logprobs})
        return ChatResult(text="".join(self.tokens), model=model, tokens=tuple(self.tokens),
                          top_logprobs=tuple(self.tops))  # fmt: skip


def test_expected_digit_is_the_probability_weighted_mean():
    # p(3) = 0.5, p(5) = 0.25, p(9) = 0.25 -> 1.5 + 1.25 + 2.25 = 5.0; "x" and the disallowed "0" are ignored
    top = {"3": math.log(0.5), "5\n": math.log(0.25), "9": math.log(0.25), "x": math.log(0.9), "0": 0.0}
    assert expected_digit(top, list(range(1, 10))) == pytest.approx(5.0)
    # renormalised over what is allowed: p(1)=0.1, p(2)=0.3 -> (0.1*1 + 0.3*2) / 0.4 = 1.75
    assert expected_digit({"1": math.log(0.1), "2": math.log(0.3)}, [0, 1, 2]) == pytest.approx(1.75)
    assert expected_digit({"a": 0.0}, [1, 2]) is None


def test_expected_scoring_reads_every_digit_position():
    dims, prins = ["quality", "empathy"], ["logic"]
    cfg = JudgeConfig(dimensions={d: 1.0 for d in dims}, gre_dimensions=[], principles={"logic": 1.0})
    tokens = ["1", "=", "7", "\n", "2", "=", "1", "\n", "3", "=", "2"]
    tops = [{}] * len(tokens)
    tops[2] = {"7": math.log(0.5), "9": math.log(0.5)}  # E = 8 -> (8 - 1) / 8 = 0.875
    tops[6] = {"1": 0.0}  # certain 1 -> 0.0
    tops[10] = {"2": math.log(0.75), "1": math.log(0.25)}  # E = 1.75 -> 0.875 -> snapped to 1.0 (nearest of 0/.5/1)
    backend = TopReplay(tokens, tops)
    v = Judge(backend, model="j", cfg=cfg).score("u", "r", "chat")
    assert v.ok and v.scores == {"quality": pytest.approx(0.875), "empathy": 0.0} and v.principles == {"logic": 1.0}
    assert backend.calls[0]["top_logprobs"] >= 9
    assert backend.calls[0]["structured"] == {"regex": judge_regex(dims, prins)}


def test_expected_scoring_with_missing_positions_is_marked_failed():
    cfg = JudgeConfig(dimensions={"quality": 1.0}, gre_dimensions=[], principles={"logic": 1.0}, retries=1)
    backend = TopReplay(["1", "=", "7"], [{}, {}, {"7": 0.0}])
    v = Judge(backend, model="j", cfg=cfg).score("u", "r", "chat")
    assert not v.ok and v.scores == {} and "found 1" in v.error and len(backend.calls) == 2
