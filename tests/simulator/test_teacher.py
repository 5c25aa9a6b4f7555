"""Teacher table: complete, valid pool skills, deterministic lookup equal to the SOP rules."""

from __future__ import annotations

import json

import pytest

from gopo_online.types import MAX_SKILLS
from simulator.scenarios import FAMILIES, get_family, sample_instance
from simulator.state import DialogueState
from simulator.teacher import (
    TEACHER_DIR,
    TeacherTable,
    all_signatures,
    generate_table,
    signature,
    sop_sequence,
    teacher_skills,
)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_stored_table_complete_and_valid(family):
    rows = [json.loads(line) for line in (TEACHER_DIR / f"{family}.jsonl").read_text().splitlines()]
    keys = {r["key"] for r in rows}
    assert len(keys) == len(rows) == len(all_signatures(family))
    pool = set(get_family(family).skill_names)
    for r in rows:
        assert 1 <= len(r["skills"]) <= MAX_SKILLS and len(set(r["skills"])) == len(r["skills"])
        assert set(r["skills"]) <= pool, r


def test_stored_table_matches_sop_rules(tmp_path):
    # the shipped table is what the generator writes today: a stale table would silently change T
    for fam in FAMILIES:
        path = generate_table(fam, tmp_path)
        assert path.read_text() == (TEACHER_DIR / f"{fam}.jsonl").read_text()


def _state(family, case_type, turn, intent, emotion, done=()):
    fam = get_family(family)
    return DialogueState(
        episode_id="e",
        turn=turn,
        family=family,
        case_type=case_type,
        user_utterance="hi",
        user_intent=intent,
        user_emotion=emotion,
        skill_pool=fam.skills,
        action_tags=fam.action_tags,
        business_context={},
        tasks_done=done,
    )


def test_lookup_deterministic_and_sop_shaped():
    inst = sample_instance("food_delivery", seed=0, case_type="damaged")
    s = _state("food_delivery", "damaged", 1, "complain", "angry")
    t = teacher_skills(inst, s)
    assert t == teacher_skills(inst, s) == sop_sequence("food_delivery", "damaged", "1", "complain", "negative", 0)
    assert t[0] == "acknowledge_and_empathize" and "request_photo_evidence" in t
    # unknown intents are looked up as "other", emotions bucketed
    s2 = _state("food_delivery", "damaged", 5, "Banana", "Frustrated", ("requirement_matching",))
    assert (
        signature("food_delivery", "damaged", 5, "Banana", "frustrated", 1)
        == "food_delivery|damaged|3+|other|negative|1"
    )
    assert teacher_skills("food_delivery", s2) == TeacherTable().lookup("food_delivery|damaged|3+|other|negative|1")
    with pytest.raises(ValueError):
        teacher_skills("ecommerce", s2)


def test_evidence_before_voucher_in_teacher():
    # the SOP teacher never offers a voucher in a damaged case before evidence at turn 1
    seq = sop_sequence("food_delivery", "damaged", "1", "demand_compensation", "negative", 1)
    assert "offer_voucher" not in seq and "request_photo_evidence" in seq
