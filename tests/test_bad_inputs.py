"""The bad-input corpus (issue 11): config files, persona files, simulator and judge replies, broker messages and
command lines that a new user (or a small model) really produces. Each case must end in a clear error that names
what is wrong (file, record, field, key) — or, for a model reply, a re-ask with the raw text kept; for a broker
message, a dead letter with its reason — and never in a traceback, a hang or a silent rewrite.

Every case is one parametrised test; `test_corpus_size` keeps the count the README quotes honest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from gopo_online.config import ConfigError, JudgeConfig, load_config
from gopo_online.jsonrepair import JSONRepairError, parse_json_object
from gopo_online.serving.client import ChatResult
from gopo_online.serving.judge import Judge
from gopo_online.stream import JSON, validate_message
from gopo_online.types import Trajectory, Turn, UserTurnMeta
from simulator.personas import DEFAULT_PERSONA_FILE, load_personas, validate_file
from simulator.scenarios import sample_instance
from simulator.user import UserSimulator, UserTurn, UserTurnError

ROOT = Path(__file__).resolve().parents[1]
CORPUS_SIZE = 88
"""Bad inputs tried below (README: "N tried, N clear")."""
GOOD_RECORD = json.loads(DEFAULT_PERSONA_FILE.read_text().splitlines()[0])


def _yaml_record(**override: str) -> str:
    """One persona record as YAML lines (values given as YAML text, e.g. an alias `*i`)."""
    import yaml

    rec = {k: v for k, v in GOOD_RECORD.items() if k not in override}
    lines = yaml.safe_dump([rec], sort_keys=False).splitlines()
    lines[0] = "  " + lines[0]
    body = "\n".join("  " + ln if i else ln for i, ln in enumerate(lines))
    return body + "".join(f"\n    {k}: {v}" for k, v in override.items())


def _laughs(levels: int) -> str:
    """The "billion laughs" anchors: level k is a list of 9 aliases to level k-1, so `*l{levels}` expands to
    9^levels strings."""
    out = ['l0: &l0 "lol"']
    for k in range(1, levels + 1):
        out.append(f"l{k}: &l{k} [{', '.join([f'*l{k - 1}'] * 9)}]")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- persona files
# (file name, content, fragments the issue list must contain). Every message must also name the file.
PERSONA_FILES = {
    "yaml-bomb-in-record-field": (
        "bank.yaml",
        _laughs(9) + "\npersonas:\n" + _yaml_record(name="*l9"),
        ["aliases expand the document to", "alias bomb"],
    ),
    "yaml-bomb-in-record-id": (
        "bank.yaml",
        _laughs(9) + "\npersonas:\n" + _yaml_record(id="*l9"),
        ["aliases expand the document to"],
    ),
    "yaml-bomb-top-level": ("bank.yaml", _laughs(9) + "\npersonas: *l9\n", ["aliases expand the document to"]),
    "yaml-small-alias-fanout-message-bounded": (
        # 9^5 = 59 049 strings: under the node limit, so the record is validated; its message must stay short
        "bank.yaml",
        _laughs(5) + "\npersonas:\n" + _yaml_record(name="*l5"),
        ["record 0", "field name", "Input should be a valid string"],
    ),
    "jsonl-empty": ("bank.jsonl", "", ["no persona records"]),
    "jsonl-only-comments": ("bank.jsonl", "# nothing here\n\n", ["no persona records"]),
    "yaml-empty-list": ("bank.yaml", "[]\n", ["no persona records"]),
    "yaml-empty-file": ("bank.yaml", "", ["top level must be a list"]),
    "jsonl-latin1": (
        "bank.jsonl",
        json.dumps(GOOD_RECORD).encode() + b"\n" + json.dumps({**GOOD_RECORD, "id": "x2"}).encode()[:-2] + b'\xe9"}\n',
        ["not UTF-8 text", "byte 0xe9", "line 2"],
    ),
    "yaml-binary-gzip": ("bank.yaml", b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03", ["binary file"]),
    "yaml-not-utf8": ("bank.yaml", b"- id: \xc3\x28\n", ["not UTF-8 text", "byte 0xc3 at offset 6"]),
    "jsonl-binary-nul": ("bank.jsonl", b"PK\x03\x04\x00\x00\x00", ["binary file", "NUL byte at offset 4"]),
    "jsonl-cooperation-true": (
        "bank.jsonl",
        json.dumps({**GOOD_RECORD, "cooperation": True}) + "\n",
        ["record 0", "field cooperation", "valid integer", "True"],
    ),
    "yaml-cooperation-true": (
        "bank.yaml",
        _yaml_record(cooperation="true"),
        ["field cooperation", "valid integer"],
    ),
    "yaml-duplicate-key": (
        "bank.yaml",
        _yaml_record(cooperation="2") + "\n    cooperation: 5",
        ["duplicate key 'cooperation'", "first at line"],
    ),
    "jsonl-4300-digit-number": (
        "bank.jsonl",
        json.dumps(GOOD_RECORD).replace(f'"cooperation": {GOOD_RECORD["cooperation"]}', '"cooperation": ' + "1" * 5000)
        + "\n",
        ["line 1", "not usable JSON", "4300 digits"],
    ),
    "yaml-4300-digit-number": ("bank.yaml", _yaml_record(cooperation="1" * 5000), ["not usable YAML", "4300 digits"]),
    "json-4300-digit-number": ("bank.json", "[" + "1" * 5000 + "]", ["not valid JSON", "4300 digits"]),
    "jsonl-deep-nesting": ("bank.jsonl", "[" * 100_000 + "]" * 100_000 + "\n", ["line 1", "RecursionError"]),
    "jsonl-1mb-string-message-bounded": (
        "bank.jsonl",
        json.dumps({**GOOD_RECORD, "cooperation": "x" * 1_000_000}) + "\n",
        ["field cooperation", "valid integer", "xxx..."],
    ),
    "jsonl-id-is-a-list": (
        "bank.jsonl",
        json.dumps({**GOOD_RECORD, "id": ["a"] * 100_000}) + "\n",
        ["record 0", "field id", "valid string"],
    ),
    "jsonl-bad-line": ("bank.jsonl", '{"id": "p1",\n', ["line 1", "not valid JSON"]),
    "unknown-extension": ("bank.csv", "id,split\n", ["unknown extension '.csv'"]),
    "unknown-field": ("bank.jsonl", json.dumps({**GOOD_RECORD, "mood": "x"}) + "\n", ["field mood", "unknown field"]),
}

_PERSONA_CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # a bomb that expands must fail here, not eat the box
from simulator.personas import validate_file
personas, issues = validate_file(sys.argv[1])
print(len(personas))
for i in issues:
    print(str(i))
"""


def _validate_isolated(case: str, path: Path) -> tuple[int, list[str]]:
    """validate_file in a child process with a time and memory limit (a YAML bomb used to hang the loader)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PERSONA_CHILD, str(path)], capture_output=True, text=True, timeout=60, env=env
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{case}: loading the persona file did not finish in 60 s")
    assert proc.returncode == 0, f"{case}: the loader crashed:\n{proc.stderr[-2000:]}"
    count, *issues = proc.stdout.splitlines()
    return int(count), issues


@pytest.mark.parametrize("case", list(PERSONA_FILES), ids=list(PERSONA_FILES))
def test_persona_file(case: str, tmp_path: Path) -> None:
    name, content, fragments = PERSONA_FILES[case]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    if "yaml-bomb" in case or "alias" in case:
        count, issues = _validate_isolated(case, path)
    else:
        personas, found = validate_file(path)
        count, issues = len(personas), [str(i) for i in found]
    assert count == 0 and issues, f"{case}: accepted ({count} personas, no issue)"
    text = "\n".join(issues)
    assert len(text) < 2000, f"{case}: message of {len(text)} chars (must be bounded)"
    assert issues[0].startswith(f"{path}: "), text  # (a YAML error adds indented context lines)
    for frag in fragments:
        assert frag in text, f"{case}: {frag!r} not in {text!r}"


def test_load_personas_raises_naming_the_file(tmp_path: Path) -> None:
    from simulator.personas import PersonaFileError

    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(PersonaFileError, match=f"{path}: no persona records"):
        load_personas(path)


def test_yaml_aliases_within_the_limit_still_load(tmp_path: Path) -> None:
    """Anchors are legitimate YAML: a shared description used by many records loads (the limit is on expansion)."""
    import yaml

    rec = dict(GOOD_RECORD)
    desc = rec["intrinsic"]["communication_style"]["description"]
    path = tmp_path / "bank.yaml"
    recs = [{**rec, "id": f"p{i}"} for i in range(3)]
    text = yaml.safe_dump(recs, sort_keys=False).replace(f"description: {desc}", "description: *d")
    text = f"shared: &d {desc}\npersonas:\n" + textwrap.indent(text, "  ")
    path.write_text(text)
    personas, issues = validate_file(path)
    assert not issues and [p.id for p in personas] == ["p0", "p1", "p2"]


# ----------------------------------------------------------------------------------------------------- config files
CONFIG_FILES = {
    "latin1": (b'[run]\nname = "caf\xe9"\n', ["not UTF-8 text", "byte 0xe9", "line 2"]),
    "binary-png": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", ["a binary file"]),
    "bool-for-int": (b"[learner]\nbatch_episodes = true\n", ["learner.batch_episodes", "not a boolean"]),
    "bool-for-optional-int": (b"[run]\nmax_episodes = false\n", ["run.max_episodes", "not a boolean"]),
    "bool-for-float": (b"[learner]\nlr = true\n", ["learner.lr", "not a boolean"]),
    "inf-float": (b"[run]\nmax_minutes = inf\n", ["run.max_minutes", "finite number"]),
    "4300-digit-int": (b"[run]\nseed = " + b"1" * 5000 + b"\n", ["not usable TOML", "4300 digits"]),
    "deep-array": (b"a = " + b"[" * 5000 + b"]" * 5000 + b"\n", ["not usable TOML", "RecursionError"]),
    "huge-string-message-bounded": (
        b'[serving]\ndevice = "' + b"x" * 200_000 + b'"\n',
        ["serving.device", "'auto', 'cpu' or 'gpu'", "xxx..."],
    ),
    "unknown-key": (b"[learner]\nbatch_episode = 4\n", ["unknown key 'learner.batch_episode'", "did you mean"]),
    "not-toml": (b"[learner\n", ["not valid TOML"]),
    "duplicate-key": (b"[learner]\nlr = 1e-5\nlr = 2e-5\n", ["not valid TOML", "line 3"]),
}


@pytest.mark.parametrize("case", list(CONFIG_FILES), ids=list(CONFIG_FILES))
def test_config_file(case: str, tmp_path: Path) -> None:
    content, fragments = CONFIG_FILES[case]
    path = tmp_path / "run.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert str(path) in text and len(text) < 2000, text[:3000]
    for frag in fragments:
        assert frag in text, f"{case}: {frag!r} not in {text!r}"


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("learner.batch_episodes=true", "learner.batch_episodes"),
        ("run.seed=" + "9" * 5000, "4300 digits"),
    ],
    ids=["bool-for-int", "4300-digit-int"],
)
def test_config_override(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


def test_bool_fields_still_take_booleans_and_ints_still_take_ints() -> None:
    cfg = load_config(None, ["run.resume=false", "learner.batch_episodes=3", "learner.lr=1"])
    assert cfg.run.resume is False and cfg.learner.batch_episodes == 3 and cfg.learner.lr == 1.0


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("model.path='/nonexistent/model'", "model.path = '/nonexistent/model' does not exist"),
        ("simulator.persona_file='/nonexistent/bank.jsonl'", "simulator.persona_file = '/nonexistent/bank.jsonl'"),
    ],
    ids=["model-path", "persona-file"],
)
def test_config_missing_paths(override: str, fragment: str) -> None:
    from gopo_online.config import missing_paths

    problems = missing_paths(load_config(None, [override]))
    assert any(fragment in p for p in problems), problems


def test_model_path_that_is_not_a_model_folder(tmp_path: Path) -> None:
    from gopo_online.config import missing_paths

    problems = missing_paths(load_config(None, [f"model.path='{tmp_path}'"]))
    assert problems == [f"model.path = '{tmp_path}' is not a Hugging Face model folder (no config.json)"]


# ------------------------------------------------------------------------------------------------ simulator replies
_GOOD_TURN = {"utterance": "where is my parcel?", "intent": "inquire_status", "emotion": "calm", "satisfaction": 3}


def _turn(**kw: object) -> str:
    return json.dumps({**_GOOD_TURN, "stop": False, **kw})


# reply text -> fragment of the error after the re-asks (every reply is bad on every attempt)
SIM_REPLIES_REJECTED = {
    "satisfaction-1e999": (_turn().replace('"satisfaction": 3', '"satisfaction": 1e999'), "outside 1-5"),
    "satisfaction-nan": (_turn().replace('"satisfaction": 3', '"satisfaction": NaN'), "outside 1-5"),
    "satisfaction-7": (_turn(satisfaction=7), "satisfaction 7 is outside 1-5"),
    "satisfaction-minus-3": (_turn(satisfaction=-3), "satisfaction -3 is outside 1-5"),
    "satisfaction-10/10": (_turn(satisfaction="10/10"), "another scale than 1-5"),
    "satisfaction-0.8": (_turn(satisfaction=0.8), "satisfaction 0.8 is outside 1-5"),
    "satisfaction-4300-digits": (_turn().replace('"satisfaction": 3', '"satisfaction": ' + "4" * 5000), "4300 digits"),
    "satisfaction-4300-digits-string": (_turn(satisfaction="4" * 5000), "outside 1-5"),
    "deep-nesting": ('{"utterance": ' + "[" * 30_000 + "]" * 30_000 + "}", "levels deep"),
    "deep-nesting-unclosed": ('{"a": ' + "{" * 30_000, "levels deep"),
    "huge-output": ("{" + " " * 200_000 + "}", "exceeds the 100000 parsed"),
    "single-quote-int-key-mix": ("{'utterance': 'hi', 1: 2, 'intent': 'greet'}", "missing field(s)"),
}


class _Res:
    def __init__(self, text: str) -> None:
        self.text = text


class _Script:
    """A chat backend that answers from a script, in order (the simulator's `ChatLike`)."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = list(texts)
        self.calls = 0

    def chat(self, messages, *, model, temperature, max_tokens, seed=None, structured=None):
        self.calls += 1
        return _Res(self.texts.pop(0))


@pytest.fixture(scope="module")
def sim_ctx():
    return load_personas()[0], sample_instance("ecommerce", seed=0)


@pytest.mark.parametrize("case", list(SIM_REPLIES_REJECTED), ids=list(SIM_REPLIES_REJECTED))
def test_simulator_reply_rejected_reasked_raw_kept(case: str, sim_ctx) -> None:
    text, fragment = SIM_REPLIES_REJECTED[case]
    client = _Script([text, text])
    res = UserSimulator(client, "m", json_retries=1).respond(
        persona=sim_ctx[0], instance=sim_ctx[1], history=(), turn=1, seed=1
    )
    assert isinstance(res, UserTurnError), f"{case}: accepted as {res!r}"[:500]
    assert client.calls == 2 and res.attempts == 2  # re-asked
    assert res.raw_outputs == (text, text)  # the raw text is kept
    assert fragment in res.error and len(res.error) < 1000, res.error[:2000]


@pytest.mark.parametrize("case", ["satisfaction-1e999", "satisfaction-7", "deep-nesting"])
def test_simulator_reask_after_bad_reply_succeeds(case: str, sim_ctx) -> None:
    client = _Script([SIM_REPLIES_REJECTED[case][0], _turn()])
    res = UserSimulator(client, "m", json_retries=1).respond(
        persona=sim_ctx[0], instance=sim_ctx[1], history=(), turn=1, seed=1
    )
    assert isinstance(res, UserTurn) and res.attempts == 2 and res.meta.satisfaction == 3


# reply text -> (expected utterance, fragment one of the repair notes must contain; None = no note expected)
SIM_REPLIES_REPAIRED = {
    "single-quotes-keep-words": (
        "{'utterance': 'is that true? null and void', 'intent': 'greet', 'emotion': 'calm', 'satisfaction': 3, "
        "'stop': false}",
        "is that true? null and void",
        "JSON repaired",
    ),
    "trailing-comma-keeps-python-words": (
        '{"utterance": "True story, None of it arrived", "intent": "greet", "emotion": "calm", "satisfaction": 3, '
        '"stop": False,}',
        "True story, None of it arrived",
        "JSON repaired",
    ),
    "unquoted-keys-keep-words": (
        '{utterance: "hi, note: it broke", intent: "greet", emotion: "calm", satisfaction: 3, stop: false}',
        "hi, note: it broke",
        "JSON repaired",
    ),
    "unknown-intent-noted": (_turn(intent="dance"), _GOOD_TURN["utterance"], "intent 'dance' is not one of"),
    "unknown-emotion-noted": (_turn(emotion="hangry"), _GOOD_TURN["utterance"], "emotion 'hangry' is not one of"),
    "satisfaction-4/5-read": (_turn(satisfaction="4/5"), _GOOD_TURN["utterance"], "satisfaction '4/5' read as 4"),
}


@pytest.mark.parametrize("case", list(SIM_REPLIES_REPAIRED), ids=list(SIM_REPLIES_REPAIRED))
def test_simulator_reply_repaired_with_note(case: str, sim_ctx) -> None:
    text, utterance, note = SIM_REPLIES_REPAIRED[case]
    res = UserSimulator(_Script([text]), "m", json_retries=0).respond(
        persona=sim_ctx[0], instance=sim_ctx[1], history=(), turn=1, seed=1
    )
    assert isinstance(res, UserTurn), res
    assert res.utterance == utterance  # the user's own words are never rewritten by the repair
    assert any(note in r for r in res.repairs), res.repairs


def test_parse_json_object_raises_only_its_own_error() -> None:
    for text, _ in SIM_REPLIES_REJECTED.values():
        try:
            parse_json_object(text)
        except JSONRepairError:
            pass


def test_repair_notes_reach_the_trajectory(sim_ctx) -> None:
    """The simulator's repair notes are kept on the Trajectory (schema 2); a schema-1 record still loads."""
    from gopo_online.config import GopoConfig
    from simulator.episode import play_episode

    class _CS:
        def respond(self, state):
            return "Let me check that for you.", "chat", None, None

    # two different utterances: the same one twice would trip the simulator's repeated-turn gate (a regeneration)
    texts = [_turn(intent="dance"), _turn(satisfaction=4.2, stop=True, utterance="Thanks, that settles it for me.")]
    traj = play_episode(
        episode_id="ep-1", scenario_instance=sim_ctx[1], persona=sim_ctx[0], expert=None, cs=_CS(), judge=None,
        user_sim=UserSimulator(_Script(texts), "m", json_retries=0), cfg=GopoConfig(), seed=0,
    )  # fmt: skip
    assert traj.status == "ok", traj.error
    assert traj.schema_version == 2
    assert any(r.startswith("turn 1 simulator: intent 'dance'") for r in traj.repairs), traj.repairs
    assert any(r.startswith("turn 2 simulator: satisfaction 4.2 read as 4") for r in traj.repairs), traj.repairs
    assert Trajectory.from_json(traj.to_json()).repairs == traj.repairs
    old = json.loads(traj.to_json())
    old.pop("repairs")
    old["schema_version"] = 1
    assert Trajectory.model_validate(old).repairs == ()


# --------------------------------------------------------------------------------------------------- judge replies
JUDGE_REPLIES = {
    "deep-nesting": '{"scores": ' + "[" * 50_000 + "]" * 50_000 + "}",
    "4300-digit-number": '{"scores": {"quality": ' + "7" * 5000 + "}}",
    "4300-digit-number-python-literal": "{'scores': {'quality': " + "7" * 5000 + "}}",
    "huge-output": "{" + " " * 200_000 + "}",
}


def _judge_cfg(retries: int) -> JudgeConfig:
    return JudgeConfig(dimensions={"quality": 1.0}, gre_dimensions=[], principles={"logic": 1.0}, retries=retries,
                       scoring="sampled")  # fmt: skip


class _JudgeScript:
    def __init__(self, answers: list[str]) -> None:
        self.answers = list(answers)

    def chat(self, messages, *, model, temperature, max_tokens, seed=None, structured=None):
        return ChatResult(text=self.answers.pop(0), model=model)


@pytest.mark.parametrize("case", list(JUDGE_REPLIES), ids=list(JUDGE_REPLIES))
def test_judge_reply_reasked_raw_kept(case: str) -> None:
    bad = JUDGE_REPLIES[case]
    good = '{"scores": {"quality": 7}, "principles": {"logic": 1}}'
    v = Judge(_JudgeScript([bad, good]), model="j", cfg=_judge_cfg(1), structured=False).score("u", "r", "chat")
    assert v.ok and v.raw == bad + "\n---\n" + good  # re-asked, both raw answers kept in order
    v = Judge(_JudgeScript([bad]), model="j", cfg=_judge_cfg(0), structured=False).score("u", "r", "chat")
    assert not v.ok and v.raw == bad and "attempt 1" in (v.error or "") and len(v.error or "") < 1000


# ------------------------------------------------------------------------------------------------- broker messages
def _traj_json(utterance: str = "where is my order?") -> bytes:
    turn = Turn(index=1, user_utterance=utterance, cs_reply="It ships today.", cs_action="chat",
                user_meta=UserTurnMeta(intent="greet", emotion="calm", satisfaction=3, stop=False),
                expert_skills=("empathize",))  # fmt: skip
    return Trajectory(episode_id="e1", scenario_id="ecommerce", persona_id="p1", turns=(turn,)).to_json().encode()


def _msg(body: bytes, content_type: str | None = JSON) -> SimpleNamespace:
    return SimpleNamespace(body=body, content_type=content_type)


BROKER_MESSAGES = {
    "valid-50mb-trajectory": (lambda: _msg(_traj_json("x" * 50_000_000)), "exceeds broker.max_trajectory_bytes"),
    "pickle": (lambda: _msg(b"\x80\x04K\x01.", "application/x-python-serialize"), "foreign content type"),
    "no-content-type": (lambda: _msg(b"{}", None), "foreign content type None"),
    "invalid-json": (lambda: _msg(b'{"episode_id": '), "invalid JSON"),
    "json-array": (lambda: _msg(b"[1, 2]"), "not a valid Trajectory"),
    "other-record": (lambda: _msg(b'{"event": "weights.updated", "version": 3}'), "not a valid Trajectory"),
    "future-schema": (
        lambda: _msg(_traj_json().replace(b'"schema_version":2', b'"schema_version":9')),
        "schema_version",
    ),
    "deep-nesting": (lambda: _msg(b'{"turns": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "invalid JSON"),
    "4300-digit-seed": (
        lambda: _msg(_traj_json().replace(b'"seed":null', b'"seed":' + b"1" * 5000)),
        "number out of range",
    ),
}


@pytest.mark.parametrize("case", list(BROKER_MESSAGES), ids=list(BROKER_MESSAGES))
def test_broker_message_dead_lettered_with_reason(case: str) -> None:
    from gopo_online.config import BrokerConfig

    make, fragment = BROKER_MESSAGES[case]
    message = make()
    traj, reason = validate_message(message, BrokerConfig().max_trajectory_bytes)
    del message
    assert traj is None and reason is not None
    assert fragment in reason, reason[:2000]


def test_normal_trajectory_passes_the_size_cap() -> None:
    from gopo_online.config import BrokerConfig

    traj, reason = validate_message(_msg(_traj_json()), BrokerConfig().max_trajectory_bytes)
    assert reason is None and traj is not None and traj.episode_id == "e1"


# ---------------------------------------------------------------------------------------------------- command lines
def _cli(args: list[str], tmp_path: Path) -> tuple[int, str]:
    from typer.testing import CliRunner

    from gopo_online.cli import app

    env = {"GOPO_BROKER_URL": "", "COLUMNS": "200"}
    res = CliRunner().invoke(app, args, env=env, catch_exceptions=True)
    out = res.output + (res.stderr if res.stderr_bytes is not None else "")
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        out += f"\nTraceback: {type(res.exception).__name__}: {res.exception}"
    return res.exit_code, out


CLI_CASES = {
    "learner-without-broker": (["learner"], "the learner needs a broker"),
    "personas-list-bad-file": (["personas", "list", "--file", "{bad}"], "not UTF-8 text"),
    "personas-list-missing-file": (["personas", "list", "--file", "{tmp}/nope.yaml"], "nope.yaml: file not found"),
    "personas-show-bad-file": (["personas", "show", "p0000", "--file", "{bad}"], "not UTF-8 text"),
    "personas-list-split-bogus": (["personas", "list", "--split", "bogus"], "'bogus' is not one of train"),
    "personas-validate-empty": (["personas", "validate", "{empty}"], "no persona records"),
    "stress-concurrency-0": (["stress", "--concurrency", "0", "--out", "{tmp}/out"], "must be at least 1"),
    "stress-personas-0": (["stress", "--personas", "0", "--out", "{tmp}/out"], "must be at least 1"),
    "stress-injectors-out-of-range": (["stress", "--injectors", "1.5", "--out", "{tmp}/out"], "fraction in [0, 1]"),
    "eval-personas-0": (["eval", "--personas", "0"], "must be at least 1"),
    "config-validate-model-path": (["config", "validate", "--set", "model.path='{tmp}/nope'"], "model.path"),
    "config-validate-persona-file": (
        ["config", "validate", "--set", "simulator.persona_file='{tmp}/nope.jsonl'"],
        "simulator.persona_file",
    ),
    "config-validate-empty-bank": (
        ["config", "validate", "--set", "simulator.persona_file='{empty}'"],
        "no persona records",
    ),
    "config-validate-bool": (["config", "validate", "--set", "learner.batch_episodes=true"], "not a boolean"),
    "config-latin1-file": (["config", "validate", "--config", "{bad}"], "not UTF-8 text"),
}


@pytest.mark.parametrize("case", list(CLI_CASES), ids=list(CLI_CASES))
def test_cli_message_not_traceback(case: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\xff\xfe not text\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args, fragment = CLI_CASES[case]
    args = [a.format(bad=bad, empty=empty, tmp=tmp_path) for a in args]
    code, out = _cli(args, tmp_path)
    assert code != 0, f"{case}: exit code 0\n{out[-2000:]}"
    assert "Traceback" not in out, out[-2000:]
    assert fragment in out, out[-2000:]
    assert not (tmp_path / "out").exists()  # a rejected `stress` writes (or overwrites) no report


def test_corpus_size() -> None:
    """The count quoted in the README ("N tried, N clear"); update both together."""
    n = (
        len(PERSONA_FILES) + 1  # + load_personas on an empty bank
        + len(CONFIG_FILES) + 2 + 2 + 1  # + overrides, missing paths, a folder that is not a model
        + len(SIM_REPLIES_REJECTED) + len(SIM_REPLIES_REPAIRED) + len(JUDGE_REPLIES) + len(BROKER_MESSAGES)
        + len(CLI_CASES)
    )  # fmt: skip
    assert n == CORPUS_SIZE
