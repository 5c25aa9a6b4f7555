"""Persona schema, validator errors (file/record/field), generator balance, split determinism, sampler mix."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import yaml

from simulator.personas import (
    DEFAULT_PERSONA_FILE,
    EXTRINSIC_DEMANDS,
    Persona,
    PersonaFileError,
    distill_personas,
    generate_bank_personas,
    load_personas,
    sample_personas,
    validate_file,
)


def _good() -> dict:
    return generate_bank_personas(20, seed=1)[0].model_dump(mode="json")


def test_shipped_bank_is_valid_balanced_and_large():
    personas = load_personas()
    assert len(personas) >= 200
    assert len({p.id for p in personas}) == len(personas)
    demand = Counter(p.extrinsic_demand for p in personas)
    coop = Counter(p.cooperation for p in personas)
    assert set(demand) == set(EXTRINSIC_DEMANDS) and max(demand.values()) - min(demand.values()) <= 1
    assert set(coop) == {1, 2, 3, 4, 5} and max(coop.values()) - min(coop.values()) <= 1
    # the stratified split keeps every (demand, cooperation) cell in both splits
    held = [p for p in personas if p.split == "heldout"]
    assert 0.15 <= len(held) / len(personas) <= 0.25
    assert {(p.extrinsic_demand, p.cooperation) for p in held} == {
        (d, c) for d in EXTRINSIC_DEMANDS for c in range(1, 6)
    }


def test_shipped_bank_equals_generator_output():
    # the file is exactly `generate_bank(n=240, seed=0)`: regenerating must not change the fixed split
    assert load_personas() == generate_bank_personas(240, seed=0)


def test_generator_deterministic_and_seed_sensitive():
    a, b = generate_bank_personas(100, seed=7), generate_bank_personas(100, seed=7)
    assert a == b
    assert [p.split for p in a] != [
        p.split for p in generate_bank_personas(100, seed=8)
    ] or a != generate_bank_personas(100, seed=8)


def test_hard_personas_lean_hard():
    ps = generate_bank_personas(240, seed=0)
    hard_adv = sum(
        p.intrinsic.problem_solving_style.level in ("competitive", "adversarial") for p in ps if p.cooperation == 1
    )
    easy_adv = sum(
        p.intrinsic.problem_solving_style.level in ("competitive", "adversarial") for p in ps if p.cooperation == 5
    )
    assert hard_adv > easy_adv


def test_jsonl_errors_name_file_record_and_field(tmp_path):
    good = _good()
    bad_level = json.loads(json.dumps(good))
    bad_level["id"] = "x1"
    bad_level["intrinsic"]["affective_style"]["level"] = "furious"
    bad_coop = {**good, "id": "x2", "cooperation": 9}
    extra = {**good, "id": "x3", "mood": "odd"}
    dup = {**good}
    f = tmp_path / "bank.jsonl"
    f.write_text(
        "\n".join(
            [
                json.dumps(good),
                json.dumps(bad_level),
                "{not json",
                json.dumps(bad_coop),
                json.dumps(extra),
                json.dumps(dup),
            ]
        )
        + "\n"
    )
    personas, issues = validate_file(f)
    assert len(personas) == 1
    text = [str(i) for i in issues]
    assert any(str(f) in t and "record 1 (id=x1)" in t and "intrinsic.affective_style.level" in t for t in text)
    assert any("record 2" in t and "not valid JSON" in t for t in text)
    assert any("record 3 (id=x2)" in t and "field cooperation" in t and "9" in t for t in text)
    assert any("record 4 (id=x3)" in t and "field mood" in t and "unknown field" in t for t in text)
    assert any("record 5" in t and "duplicate id" in t for t in text)
    with pytest.raises(PersonaFileError) as e:
        load_personas(f)
    assert len(e.value.issues) == 5


def test_yaml_bank_and_missing_field(tmp_path):
    good = _good()
    missing = {k: v for k, v in good.items() if k != "extrinsic_demand"}
    missing["id"] = "y1"
    f = tmp_path / "bank.yaml"
    f.write_text(yaml.safe_dump({"personas": [good, missing]}))
    _, issues = validate_file(f)
    assert [(i.record, i.record_id, i.field) for i in issues] == [(1, "y1", "extrinsic_demand")]
    assert "Field required" in issues[0].message
    f2 = tmp_path / "scalar.yaml"
    f2.write_text("just a string\n")
    _, issues = validate_file(f2)
    assert issues and issues[0].record is None and "top level" in issues[0].message


def test_split_filter_and_unknown_extension(tmp_path):
    assert all(p.split == "train" for p in load_personas(split="train"))
    assert len(load_personas(split="train")) + len(load_personas(split="heldout")) == len(load_personas())
    _, issues = validate_file(tmp_path / "bank.csv")
    assert issues  # missing file or unknown extension, both reported, never raised raw


@pytest.mark.parametrize("frac", [0.0, 0.3, 0.5, 1.0])
def test_sampler_hard_fraction(frac):
    bank = load_personas(DEFAULT_PERSONA_FILE, split="train")
    picked = sample_personas(bank, 40, hard_fraction=frac, seed=3)
    assert len(picked) == 40
    assert sum(p.cooperation <= 2 for p in picked) == round(40 * frac)
    assert picked == sample_personas(bank, 40, hard_fraction=frac, seed=3)
    assert len({p.id for p in picked}) == 40  # no reuse while the pools are large enough


class _FakeChat:
    """Stands in for the openai client's `chat.completions.create` (unit level: the integration test is real)."""

    def __init__(self, outputs):
        self.outputs = list(outputs)
        self.chat = self
        self.completions = self

    def create(self, **kw):
        text = self.outputs.pop(0)
        msg = type("M", (), {"content": text})
        return type("R", (), {"choices": [type("C", (), {"message": msg})]})


def test_distill_reports_invalid_extractions_instead_of_inventing():
    good = {
        k: v
        for k, v in _good().items()
        if k in ("cooperation", "intrinsic", "extrinsic_demand", "demand_description", "background")
    }
    bad = {**good, "cooperation": 0}
    client = _FakeChat(["```json\n" + json.dumps(good) + "\n```", json.dumps(bad), "I cannot do that."])
    res = distill_personas(["user: where is my order", "user: refund now", "user: hi"], client, "m")
    assert [p.id for p in res.personas] == ["d0000"]
    assert res.personas[0].source == "distilled"
    assert [f.log_index for f in res.failures] == [1, 2]
    assert "cooperation" in res.failures[0].error and res.failures[1].raw == "I cannot do that."


def test_prompt_profile_mentions_every_dimension():
    p: Persona = load_personas()[0]
    text = p.prompt_profile()
    for word in ("Communication", "disclosure", "Problem-solving", "Affective", "Cooperation", p.extrinsic_demand):
        assert word in text


# ---------------------------------------------------------------------------------------------------------------------
# Persona <-> scenario fit
# ---------------------------------------------------------------------------------------------------------------------


def test_shipped_bank_states_scenario_fit():
    from simulator.personas import _BACKGROUND_SCENARIOS

    bank = load_personas()
    assert {p.background for p in bank} <= set(_BACKGROUND_SCENARIOS)
    assert all(p.scenarios == _BACKGROUND_SCENARIOS[p.background] for p in bank)
    lunch = [p for p in bank if p.background == "office worker ordering lunch"]
    assert lunch and all(p.fits("food_delivery") and not p.fits("ecommerce") for p in lunch)
    assert any(not p.scenarios for p in bank)  # some fit everything


def test_scenario_for_respects_fit_and_rotates():
    from simulator.personas import fitting_personas, scenario_for

    base = generate_bank_personas(20, seed=1)[0]
    anyp = base.model_copy(update={"scenarios": ()})
    food = base.model_copy(update={"scenarios": ("food_delivery",)})
    case = base.model_copy(update={"scenarios": ("ecommerce/return_refund", "ecommerce/order_delay")})
    fams = ["ecommerce", "food_delivery"]
    assert [scenario_for(anyp, fams, i) for i in range(2)] == [("ecommerce", None), ("food_delivery", None)]
    assert {scenario_for(food, fams, i) for i in range(5)} == {("food_delivery", None)}
    assert [scenario_for(case, fams, i) for i in range(3)] == [
        ("ecommerce", "return_refund"),
        ("ecommerce", "order_delay"),
        ("ecommerce", "return_refund"),
    ]
    with pytest.raises(ValueError, match="fits none of the configured scenarios"):
        scenario_for(food, ["ecommerce"], 0)
    assert fitting_personas([anyp, food, case], ["ecommerce"]) == [anyp, case]


def test_unknown_scenario_in_a_persona_is_named(tmp_path):
    rec = _good() | {"scenarios": ["groceries"]}
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps(rec) + "\n")
    with pytest.raises(PersonaFileError, match=r"field scenarios.*unknown scenario family 'groceries'"):
        load_personas(f)
    f.write_text(json.dumps(_good() | {"scenarios": ["food_delivery/lost"]}) + "\n")
    with pytest.raises(PersonaFileError, match=r"unknown case type 'lost' of food_delivery"):
        load_personas(f)


def test_dispatcher_pairs_personas_only_with_fitting_scenarios():
    from gopo_online.config import GopoConfig
    from simulator.personas import load_personas as lp
    from workers.controller import Dispatcher

    d = Dispatcher(GopoConfig())
    bank = {p.id: p for p in lp()}
    reqs = [d.request(i, 0) for i in range(200)]
    assert all(bank[r.persona_id].fits(r.scenario_id, r.case_type) for r in reqs)
    assert {r.scenario_id for r in reqs} == {"ecommerce", "food_delivery"}
    only_food = Dispatcher(GopoConfig.model_validate({"simulator": {"scenarios": ["food_delivery"]}}))
    assert all(bank[only_food.request(i, 0).persona_id].fits("food_delivery") for i in range(100))
