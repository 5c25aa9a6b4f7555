"""Persona bank: schema, loader/validator, balanced generator, LLM distillation and difficulty sampler.

A persona is the bi-level profile of InteractCS-RL §4.1.1:

* intrinsic traits on four stable dimensions, each a graded level (five named grades, ordered from easiest to
  hardest for an agent) plus a prose description the simulator's prompt uses verbatim:
  - ``communication_style``      terse … rambling (verbosity, interaction frequency)
  - ``information_disclosure``   proactive … withholding (initiative and completeness in giving key facts)
  - ``problem_solving_style``    collaborative … adversarial (Thomas-Kilmann conflict modes)
  - ``affective_style``          calm … volatile (emotional baseline and stability)
* an extrinsic demand (the goal logic): ``rigid_pursuit``, ``preference_learning``, ``incentive_open``,
  ``feedback_oriented``;
* ``cooperation`` 1-5 (1 = least cooperative): levels 1-2 are the InteractCS "hard" users, 3-5 "easy";
* ``id`` and a fixed ``split`` (``train`` / ``heldout``).

File formats (the schema is `Persona`; docs/personas.md shows an example record):

* JSONL: one persona object per line (blank lines and lines starting with ``#`` are skipped);
* YAML: a list of persona objects, or a mapping ``{personas: [...]}``.

Every validation problem is reported as ``FILE: record N (id=X): field a.b.c: message``; a whole file is checked
before anything is raised, so one run lists every bad record.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gopo_online.errors import InputError, short_repr

DATA_DIR = Path(__file__).parent / "data"
DEFAULT_PERSONA_FILE = DATA_DIR / "personas.jsonl"

COMMUNICATION_LEVELS = ("concise", "balanced", "detailed", "terse", "rambling")
DISCLOSURE_LEVELS = ("proactive", "forthcoming", "selective", "reluctant", "withholding")
PROBLEM_SOLVING_LEVELS = ("collaborative", "accommodating", "compromising", "competitive", "adversarial")
AFFECTIVE_LEVELS = ("calm", "composed", "sensitive", "irritable", "volatile")
EXTRINSIC_DEMANDS = ("rigid_pursuit", "preference_learning", "incentive_open", "feedback_oriented")
HARD_COOPERATION = (1, 2)
"""Cooperation levels that make a persona "hard" (InteractCS hard/easy mixes)."""

CommunicationLevel = Literal["concise", "balanced", "detailed", "terse", "rambling"]
DisclosureLevel = Literal["proactive", "forthcoming", "selective", "reluctant", "withholding"]
ProblemSolvingLevel = Literal["collaborative", "accommodating", "compromising", "competitive", "adversarial"]
AffectiveLevel = Literal["calm", "composed", "sensitive", "irritable", "volatile"]
ExtrinsicDemand = Literal["rigid_pursuit", "preference_learning", "incentive_open", "feedback_oriented"]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class CommunicationStyle(_Model):
    level: CommunicationLevel
    description: str = Field(min_length=8)


class InformationDisclosure(_Model):
    level: DisclosureLevel
    description: str = Field(min_length=8)


class ProblemSolvingStyle(_Model):
    level: ProblemSolvingLevel
    description: str = Field(min_length=8)


class AffectiveStyle(_Model):
    level: AffectiveLevel
    description: str = Field(min_length=8)


class IntrinsicTraits(_Model):
    communication_style: CommunicationStyle
    information_disclosure: InformationDisclosure
    problem_solving_style: ProblemSolvingStyle
    affective_style: AffectiveStyle


class Persona(_Model):
    """One simulated user profile (InteractCS §4.1.1)."""

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    """Stable identifier, unique within a bank."""
    split: Literal["train", "heldout"]
    """Fixed split: train personas drive training, held-out ones only evaluation."""
    name: str = ""
    """Display name, optional."""
    cooperation: int = Field(ge=1, le=5, strict=True)
    """1 (least cooperative) … 5; levels 1-2 are "hard"."""
    intrinsic: IntrinsicTraits
    extrinsic_demand: ExtrinsicDemand
    demand_description: str = Field(min_length=8)
    """Prose for the goal logic, e.g. "insists on a full refund and rejects substitutes"."""
    background: str = ""
    """Optional free-text life context."""
    source: Literal["generated", "distilled", "handwritten"] = "generated"
    scenarios: tuple[str, ...] = ()
    """Where this persona belongs: scenario families ("food_delivery") or family/case-type pairs
    ("ecommerce/return_refund"). Empty = fits every scenario. The episode samplers only pair a persona with a case
    it fits (`scenario_for`)."""

    @field_validator("scenarios")
    @classmethod
    def _known_scenarios(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from simulator.scenarios import FAMILIES

        for entry in v:
            fam, _, case = entry.partition("/")
            if fam not in FAMILIES:
                raise ValueError(f"unknown scenario family {fam!r} in {entry!r} (known: {', '.join(FAMILIES)})")
            if case and case not in FAMILIES[fam].case_types:
                raise ValueError(
                    f"unknown case type {case!r} of {fam} in {entry!r} (known: {', '.join(FAMILIES[fam].case_types)})"
                )
        return v

    def fits(self, family: str, case_type: str | None = None) -> bool:
        """Does this persona belong to `family` (and `case_type`, when given)? True for a persona without
        `scenarios`."""
        if not self.scenarios:
            return True
        for entry in self.scenarios:
            fam, _, case = entry.partition("/")
            if fam == family and (case_type is None or not case or case == case_type):
                return True
        return False

    def case_types_in(self, family: str) -> tuple[str, ...] | None:
        """The case types of `family` this persona names, or None when it fits the whole family."""
        cases = []
        for entry in self.scenarios or (family,):
            fam, _, case = entry.partition("/")
            if fam == family:
                if not case:
                    return None
                cases.append(case)
        return tuple(cases)

    @property
    def difficulty(self) -> Literal["hard", "easy"]:
        return "hard" if self.cooperation in HARD_COOPERATION else "easy"

    @property
    def group(self) -> str:
        """Group label used in per-group report tables."""
        return f"{self.difficulty}/{self.extrinsic_demand}"

    def prompt_profile(self) -> str:
        """The persona as the simulator prompt shows it."""
        t = self.intrinsic
        return "\n".join(
            [
                f"- Communication style ({t.communication_style.level}): {t.communication_style.description}",
                f"- Information disclosure ({t.information_disclosure.level}): {t.information_disclosure.description}",
                f"- Problem-solving style ({t.problem_solving_style.level}): {t.problem_solving_style.description}",
                f"- Affective style ({t.affective_style.level}): {t.affective_style.description}",
                f"- Cooperation: {self.cooperation}/5",
                f"- What you want ({self.extrinsic_demand}): {self.demand_description}",
            ]
            + ([f"- Background: {self.background}"] if self.background else [])
        )


# ---------------------------------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------------------------------


class PersonaIssue(BaseModel):
    """One validation problem, located by file, record (0-based index and id when known) and field."""

    model_config = ConfigDict(frozen=True)
    file: str
    record: int | None
    record_id: str | None
    field: str
    message: str

    def __str__(self) -> str:
        rec = (
            ""
            if self.record is None
            else f"record {self.record}" + (f" (id={self.record_id})" if self.record_id else "")
        )
        where = ": ".join(p for p in (self.file, rec, f"field {self.field}" if self.field else "") if p)
        return f"{where}: {self.message}"


class PersonaFileError(InputError):
    """A persona file has problems; `issues` lists every one."""

    def __init__(self, issues: Sequence[PersonaIssue]):
        self.issues = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


MAX_YAML_NODES = 1_000_000
"""Most nodes a YAML bank may expand to once its aliases are followed (a 240-persona bank has ~15 000); a
"billion laughs" file of a few lines would expand to 10^9 (every validation message would then print it)."""


def _file_text(path: Path) -> tuple[str | None, str | None]:
    """(text, None) or (None, why the file is not a UTF-8 text file)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return None, f"cannot read: {e.strerror or e}"
    nul = data.find(b"\x00", 0, 65536)
    if nul >= 0:
        return None, f"binary file (NUL byte at offset {nul}), not a persona bank"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        return None, f"not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} (line {line}) ({e.reason})"


def _yaml_load(text: str) -> Any:
    """`yaml.safe_load` that rejects duplicate keys and alias expansion beyond `MAX_YAML_NODES`."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader: Loader, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True) if key_node.tag != "tag:yaml.org,2002:merge" else "<<"
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # unhashable key: SafeLoader reports it
                continue
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {short_repr(key)} (first at line {first})", key_node.start_mark
                )
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    loader = Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        sizes: dict[int, int] = {}

        def size(n: Any) -> int:  # nodes after alias expansion; shared (aliased) nodes are counted once per use
            if id(n) not in sizes:
                kids = n.value if isinstance(n, yaml.SequenceNode) else []
                if isinstance(n, yaml.MappingNode):
                    kids = [k for pair in n.value for k in pair]
                sizes[id(n)] = 1 + sum(size(k) for k in kids)
            return sizes[id(n)]

        total = size(node)
        if total > MAX_YAML_NODES:
            raise yaml.YAMLError(
                f"aliases expand the document to {total} nodes, more than the {MAX_YAML_NODES} allowed (an alias bomb?)"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _raw_records(path: Path) -> tuple[list[tuple[int, Any]], list[PersonaIssue]]:
    """(index, object) pairs of a file, plus parse-level issues (bad JSON line, bad YAML, wrong top level)."""
    issues: list[PersonaIssue] = []
    f = str(path)
    if not path.is_file():
        return [], [PersonaIssue(file=f, record=None, record_id=None, field="", message="file not found")]
    text, why = _file_text(path)
    if text is None:
        return [], [PersonaIssue(file=f, record=None, record_id=None, field="", message=str(why))]
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        out = []
        n = 0
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                out.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                issues.append(
                    PersonaIssue(
                        file=f,
                        record=n,
                        record_id=None,
                        field="",
                        message=f"line {lineno}: not valid JSON ({e.msg} at column {e.colno})",
                    )
                )
            except (ValueError, RecursionError) as e:  # a 5000-digit number, nesting past the parser's depth
                issues.append(
                    PersonaIssue(
                        file=f,
                        record=n,
                        record_id=None,
                        field="",
                        message=f"line {lineno}: not usable JSON ({type(e).__name__}: {str(e)[:120]})",
                    )
                )
            n += 1
        return out, issues
    if suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = _yaml_load(text)
        except yaml.YAMLError as e:
            return [], [PersonaIssue(file=f, record=None, record_id=None, field="", message=f"not valid YAML: {e}")]
        except (ValueError, RecursionError) as e:
            msg = f"not usable YAML ({type(e).__name__}: {str(e)[:120]})"
            return [], [PersonaIssue(file=f, record=None, record_id=None, field="", message=msg)]
        if isinstance(data, dict) and "personas" in data:
            data = data["personas"]
        if not isinstance(data, list):
            return [], [
                PersonaIssue(
                    file=f,
                    record=None,
                    record_id=None,
                    field="",
                    message="top level must be a list of personas or {personas: [...]}",
                )
            ]
        return list(enumerate(data)), issues
    if suffix == ".json":
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError, so is a 5000-digit number
            return [], [PersonaIssue(file=f, record=None, record_id=None, field="", message=f"not valid JSON: {e}")]
        if isinstance(data, dict) and "personas" in data:
            data = data["personas"]
        if not isinstance(data, list):
            return [], [PersonaIssue(file=f, record=None, record_id=None, field="", message="top level must be a list")]
        return list(enumerate(data)), issues
    return [], [
        PersonaIssue(
            file=f,
            record=None,
            record_id=None,
            field="",
            message=f"unknown extension {suffix!r}: use .jsonl, .yaml/.yml or .json",
        )
    ]


def validation_issues(record: Any, *, file: str, index: int | None) -> tuple[Persona | None, list[PersonaIssue]]:
    """Validate one raw record; returns the persona or the issues naming each bad field."""
    raw_id = record.get("id") if isinstance(record, dict) else None
    rid = raw_id if isinstance(raw_id, str) and len(raw_id) <= 64 else None if raw_id is None else short_repr(raw_id)
    if not isinstance(record, dict):
        return None, [
            PersonaIssue(
                file=file,
                record=index,
                record_id=None,
                field="",
                message=f"record must be an object, got {type(record).__name__}",
            )
        ]
    try:
        return Persona.model_validate(record), []
    except ValidationError as e:
        issues = []
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"]) or "<record>"
            msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
            if err["type"] != "missing" and "input" in err and not isinstance(err["input"], dict):
                msg += f" (got {short_repr(err['input'])})"  # bounded: the input may be an expanded alias bomb
            issues.append(PersonaIssue(file=file, record=index, record_id=rid, field=field, message=msg))
        return None, issues


def validate_file(path: Path | str) -> tuple[list[Persona], list[PersonaIssue]]:
    """All valid personas of a file and every issue found (bad records, duplicate ids)."""
    path = Path(path)
    raw, issues = _raw_records(path)
    if not raw and not issues:
        issues.append(PersonaIssue(file=str(path), record=None, record_id=None, field="", message="no persona records"))
    personas: list[Persona] = []
    seen: dict[str, int] = {}
    for idx, rec in raw:
        p, errs = validation_issues(rec, file=str(path), index=idx)
        issues.extend(errs)
        if p is None:
            continue
        if p.id in seen:
            issues.append(
                PersonaIssue(
                    file=str(path),
                    record=idx,
                    record_id=p.id,
                    field="id",
                    message=f"duplicate id (first used by record {seen[p.id]})",
                )
            )
            continue
        seen[p.id] = idx
        personas.append(p)
    return personas, issues


def load_personas(path: Path | str | None = None, split: str = "all") -> list[Persona]:
    """Load a bank (default: the shipped one); raises `PersonaFileError` listing every issue."""
    personas, issues = validate_file(Path(path) if path is not None else DEFAULT_PERSONA_FILE)
    if issues:
        raise PersonaFileError(issues)
    if split not in ("all", "train", "heldout"):
        raise ValueError(f"split must be all, train or heldout, got {split!r}")
    return [p for p in personas if split == "all" or p.split == split]


def dump_personas(personas: Iterable[Persona], path: Path | str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        path.write_text(yaml.safe_dump([p.model_dump(mode="json") for p in personas], sort_keys=False, width=120))
    else:
        path.write_text("".join(p.model_dump_json() + "\n" for p in personas))


# ---------------------------------------------------------------------------------------------------------------------
# Balanced generator
# ---------------------------------------------------------------------------------------------------------------------

_TRAIT_TEXT: dict[str, dict[str, tuple[str, ...]]] = {
    "communication_style": {
        "concise": (
            "Writes short, clear sentences and gets to the point.",
            "Brief and businesslike; one fact per message.",
        ),
        "balanced": ("Writes a few polite sentences with the key facts.", "Normal chatty tone, neither long nor curt."),
        "detailed": (
            "Explains the situation at length with specifics.",
            "Gives background and asks several questions.",
        ),
        "terse": (
            "Answers in a few words, often without greeting.",
            "Types fragments like 'where is it' and 'still no'.",
        ),
        "rambling": ("Writes long messages that drift off topic.", "Repeats the story and adds unrelated complaints."),
    },
    "information_disclosure": {
        "proactive": ("Volunteers order number and all relevant facts up front.", "Shares details before being asked."),
        "forthcoming": ("Answers questions fully when asked.", "Gives the order number as soon as it is requested."),
        "selective": (
            "Shares some facts, leaves out others until pressed.",
            "Mentions the problem but not the details.",
        ),
        "reluctant": ("Needs to be asked twice before giving details.", "Questions why information is needed."),
        "withholding": ("Refuses to give evidence or details, expects the agent to know.", "Hides key facts."),
    },
    "problem_solving_style": {
        "collaborative": ("Works with the agent toward a fair solution.", "Open to options and asks what works best."),
        "accommodating": ("Accepts the first reasonable offer.", "Goes along with the agent's suggestions."),
        "compromising": ("Will meet halfway if the offer is fair.", "Bargains a little, then settles."),
        "competitive": ("Pushes hard for the best outcome for themself.", "Argues against each limitation."),
        "adversarial": ("Treats the agent as an opponent and threatens bad reviews.", "Rejects offers on principle."),
    },
    "affective_style": {
        "calm": ("Stays even-tempered throughout.", "Patient and polite even when things go wrong."),
        "composed": ("Mildly annoyed but controlled.", "Shows disappointment without raising their tone."),
        "sensitive": ("Feels let down easily; needs reassurance.", "Takes delays personally and wants empathy."),
        "irritable": ("Gets impatient quickly and uses sharp words.", "Short-tempered when answers are vague."),
        "volatile": (
            "Swings from calm to angry in one message; may use caps.",
            "Escalates emotionally at small setbacks.",
        ),
    },
}
_LEVELS = {
    "communication_style": COMMUNICATION_LEVELS,
    "information_disclosure": DISCLOSURE_LEVELS,
    "problem_solving_style": PROBLEM_SOLVING_LEVELS,
    "affective_style": AFFECTIVE_LEVELS,
}
_DEMAND_TEXT = {
    "rigid_pursuit": (
        "Wants one specific outcome (e.g. a full refund) and rejects substitutes.",
        "Insists on exactly what they asked for and repeats the demand.",
    ),
    "preference_learning": (
        "Wants to understand options and get a recommendation that fits their needs.",
        "Asks questions to learn what suits them before deciding.",
    ),
    "incentive_open": (
        "Can be satisfied by compensation such as a voucher or discount.",
        "Open to a coupon or credit instead of the original demand.",
    ),
    "feedback_oriented": (
        "Mainly wants the complaint heard, recorded and passed on.",
        "Cares that the problem is acknowledged and escalated, less about money.",
    ),
}
_NAMES = (
    "Alex",
    "Sam",
    "Jordan",
    "Taylor",
    "Morgan",
    "Casey",
    "Riley",
    "Jamie",
    "Avery",
    "Quinn",
    "Li Wei",
    "Priya",
    "Carlos",
    "Fatima",
    "Kenji",
    "Olga",
    "Amara",
    "Noah",
    "Elena",
    "Omar",
)
_BACKGROUND_SCENARIOS: dict[str, tuple[str, ...]] = {
    "busy parent ordering for the family": (),
    "student on a tight budget": (),
    "office worker ordering lunch": ("food_delivery",),
    "retired teacher who shops online rarely": ("ecommerce",),
    "small-business owner buying supplies": ("ecommerce",),
    "night-shift nurse": ("food_delivery",),
    "frequent online shopper": ("ecommerce",),
    "first-time customer": (),
}
"""Which scenario families a generated background belongs to (empty: any): a lunch order is food delivery, a
shopper buying supplies is e-commerce."""
_BACKGROUNDS = (
    "busy parent ordering for the family",
    "student on a tight budget",
    "office worker ordering lunch",
    "retired teacher who shops online rarely",
    "small-business owner buying supplies",
    "night-shift nurse",
    "frequent online shopper",
    "first-time customer",
)


def _level_for(dim: str, cooperation: int, rng: random.Random) -> str:
    # Low cooperation skews traits toward the hard end of each scale so "hard" personas are hard on every axis,
    # while noise keeps the bank diverse (a calm but adversarial user exists).
    levels = _LEVELS[dim]
    centre = (5 - cooperation) / 4 * (len(levels) - 1)
    idx = round(min(max(rng.gauss(centre, 1.0), 0), len(levels) - 1))
    return levels[idx]


def generate_bank_personas(n: int = 240, seed: int = 0, heldout_fraction: float = 0.2) -> list[Persona]:
    """A balanced bank: every (extrinsic demand, cooperation) cell gets n/20 personas (±1), and within each cell a
    fixed `heldout_fraction` goes to the held-out split (stratified), so both splits stay balanced. Deterministic
    in (n, seed)."""
    if n < 20:
        raise ValueError(f"n must be >= 20 to cover the 4 demands x 5 cooperation levels, got {n}")
    rng = random.Random(seed)
    cells = [(d, c) for d in EXTRINSIC_DEMANDS for c in range(1, 6)]
    per_cell = [n // len(cells) + (1 if i < n % len(cells) else 0) for i in range(len(cells))]
    # held-out quota: round(n * fraction) in total, spread as evenly as the cells allow (the remainder goes to
    # seeded-random cells), so small banks get a held-out split too
    total_held = round(n * heldout_fraction)
    held_per_cell = [total_held // len(cells)] * len(cells)
    for i in rng.sample(range(len(cells)), total_held % len(cells)):
        held_per_cell[i] += 1
    personas: list[Persona] = []
    k = 0
    for (demand, coop), count, n_held in zip(cells, per_cell, held_per_cell, strict=True):
        n_held = min(n_held, count)
        held = set(rng.sample(range(count), n_held))
        for j in range(count):
            traits = {}
            for dim in _LEVELS:
                level = _level_for(dim, coop, rng)
                traits[dim] = {"level": level, "description": rng.choice(_TRAIT_TEXT[dim][level])}
            # same draw order as before the scenarios field existed (name, demand text, background): same bank
            name = rng.choice(_NAMES)
            demand_text = rng.choice(_DEMAND_TEXT[demand])
            background = rng.choice(_BACKGROUNDS)
            personas.append(
                Persona(
                    id=f"p{k:04d}",
                    split="heldout" if j in held else "train",
                    name=name,
                    cooperation=coop,
                    intrinsic=IntrinsicTraits.model_validate(traits),
                    extrinsic_demand=demand,
                    demand_description=demand_text,
                    background=background,
                    source="generated",
                    scenarios=_BACKGROUND_SCENARIOS[background],
                )
            )
            k += 1
    return personas


def balance_report(personas: Sequence[Persona]) -> dict[str, dict[str, int]]:
    return {
        "demand": dict(Counter(p.extrinsic_demand for p in personas)),
        "cooperation": {str(k): v for k, v in sorted(Counter(p.cooperation for p in personas).items())},
        "split": dict(Counter(p.split for p in personas)),
        "difficulty": dict(Counter(p.difficulty for p in personas)),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Difficulty sampler
# ---------------------------------------------------------------------------------------------------------------------


def sample_personas(personas: Sequence[Persona], n: int, *, hard_fraction: float = 0.5, seed: int = 0) -> list[Persona]:
    """n personas with round(n * hard_fraction) "hard" ones (cooperation 1-2), deterministic in seed.

    Draws without replacement inside each pool and only reuses personas when a pool is smaller than asked."""
    if not 0.0 <= hard_fraction <= 1.0:
        raise ValueError(f"hard_fraction must be in [0, 1], got {hard_fraction}")
    rng = random.Random(seed)
    hard = [p for p in personas if p.difficulty == "hard"]
    easy = [p for p in personas if p.difficulty == "easy"]
    n_hard = round(n * hard_fraction)
    if n_hard and not hard:
        raise ValueError("hard_fraction > 0 but the bank has no hard (cooperation 1-2) personas")
    if n - n_hard and not easy:
        raise ValueError("hard_fraction < 1 but the bank has no easy (cooperation 3-5) personas")

    def draw(pool: list[Persona], k: int) -> list[Persona]:
        out: list[Persona] = []
        while len(out) < k:
            out.extend(rng.sample(pool, min(len(pool), k - len(out))))
        return out

    picked = draw(hard, n_hard) + draw(easy, n - n_hard)
    rng.shuffle(picked)
    return picked


def scenario_for(persona: Persona, families: Sequence[str], index: int) -> tuple[str, str | None]:
    """(family, case_type or None) for episode `index` of `persona`, among the configured `families` it fits:
    the families it fits in rotation, and, when it names case types of that family, those in rotation (None = any
    case type, the instance sampler picks). Raises when the persona fits none of `families`."""
    fams = [f for f in families if persona.fits(f)]
    if not fams:
        raise ValueError(
            f"persona {persona.id} fits none of the configured scenarios {list(families)} "
            f"(it names {list(persona.scenarios)}): add one to simulator.scenarios or use another persona bank"
        )
    fam = fams[index % len(fams)]
    cases = persona.case_types_in(fam)
    return fam, (cases[(index // len(fams)) % len(cases)] if cases else None)


def fitting_personas(personas: Sequence[Persona], families: Sequence[str]) -> list[Persona]:
    """The personas that fit at least one of `families` (a bank filtered to the configured scenarios)."""
    return [p for p in personas if any(p.fits(f) for f in families)]


# ---------------------------------------------------------------------------------------------------------------------
# Distillation from dialogue logs (InteractCS §4.1.1: "we utilize LLMs to extract features from dialogue logs")
# ---------------------------------------------------------------------------------------------------------------------

_DISTILL_FIELDS = ("cooperation", "intrinsic", "extrinsic_demand", "demand_description", "background", "name")


def distill_schema() -> dict[str, Any]:
    """JSON schema of what the extracting LLM must write (the persona without id/split/source)."""
    schema = Persona.model_json_schema()
    props = {k: v for k, v in schema["properties"].items() if k in _DISTILL_FIELDS}
    return {
        "type": "object",
        "properties": props,
        "required": ["cooperation", "intrinsic", "extrinsic_demand", "demand_description"],
        "$defs": schema.get("$defs", {}),
    }


class DistillFailure(BaseModel):
    """A log the LLM could not turn into a valid persona: reported, never replaced by an invented one."""

    log_index: int
    error: str
    raw: str


class DistillResult(BaseModel):
    personas: list[Persona]
    failures: list[DistillFailure]


def _log_text(log: Any) -> str:
    if isinstance(log, str):
        return log
    if isinstance(log, dict) and "turns" in log:
        log = log["turns"]
    return "\n".join(f"{t.get('role', '?')}: {t.get('content', t.get('text', ''))}" for t in log)


def _split_for(pid: str, heldout_fraction: float) -> Literal["train", "heldout"]:
    # Hash-based so a persona's split does not depend on which other logs were in the batch.
    h = int(hashlib.sha256(pid.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "heldout" if h < heldout_fraction else "train"


def distill_personas(
    dialogue_logs: Sequence[Any],
    client: Any,
    model: str,
    *,
    seed: int = 0,
    id_prefix: str = "d",
    heldout_fraction: float = 0.2,
    structured: bool = True,
    timeout_s: float = 120.0,
    max_tokens: int = 600,
) -> DistillResult:
    """Extract one persona per dialogue log with an LLM through an `openai.OpenAI`-style `client`.

    Each log is a string or a list of {"role", "content"} turns. The reply is parsed with the simulator's JSON
    repair and validated against `Persona`; anything invalid becomes a `DistillFailure` with the raw text.
    `structured=True` asks a vLLM backend for schema-constrained output (`structured_outputs`, DESIGN §5)."""
    from gopo_online.jsonrepair import parse_json_object

    levels = "; ".join(f"{d}: {', '.join(v)}" for d, v in _LEVELS.items())
    personas: list[Persona] = []
    failures: list[DistillFailure] = []
    for i, log in enumerate(dialogue_logs):
        prompt = (
            "Read this customer-service dialogue and describe the CUSTOMER as a persona in JSON with keys "
            "cooperation (1-5, 1 = least cooperative), intrinsic {communication_style, information_disclosure, "
            "problem_solving_style, affective_style: each {level, description}}, extrinsic_demand (one of "
            f"{', '.join(EXTRINSIC_DEMANDS)}), demand_description, background. Allowed levels: {levels}.\n\n"
            f"Dialogue:\n{_log_text(log)}\n\nJSON:"
        )
        extra = {"structured_outputs": {"json": distill_schema()}} if structured else {}
        raw = ""
        try:
            resp = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                temperature=0.0,
                seed=seed + i,
                max_tokens=max_tokens,
                timeout=timeout_s,
                extra_body=extra or None,
            )
            raw = resp.choices[0].message.content or ""
            obj = parse_json_object(raw)
        except Exception as e:  # noqa: BLE001 - any failure of one log is reported and the batch goes on
            failures.append(DistillFailure(log_index=i, error=f"{type(e).__name__}: {e}", raw=raw))
            continue
        pid = f"{id_prefix}{i:04d}"
        rec = {k: v for k, v in obj.items() if k in _DISTILL_FIELDS}
        rec.update(id=pid, split=_split_for(pid, heldout_fraction), source="distilled")
        p, errs = validation_issues(rec, file="<llm>", index=i)
        if p is None:
            failures.append(
                DistillFailure(log_index=i, error="; ".join(f"{e.field}: {e.message}" for e in errs), raw=raw)
            )
        else:
            personas.append(p)
    return DistillResult(personas=personas, failures=failures)


def group_counts(personas: Iterable[Persona]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for p in personas:
        out[p.group] += 1
    return dict(out)
