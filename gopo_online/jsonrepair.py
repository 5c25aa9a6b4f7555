"""Repair of the JSON small models write: code fences, prose around the object, single quotes, trailing commas,
Python literals, unbalanced closing braces. Pure functions; `tests/simulator/test_user_json.py` runs them on
malformed outputs recorded from SmolLM2-135M.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any


class JSONRepairError(ValueError):
    """No JSON object could be recovered from the text; the message says which step failed."""


_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")
_PY_LITERALS = (
    (re.compile(r"\bTrue\b"), "true"),
    (re.compile(r"\bFalse\b"), "false"),
    (re.compile(r"\bNone\b"), "null"),
)
_UNQUOTED_KEY = re.compile(r"([{,]\s*)([A-Za-z_][A-Za-z0-9_]*)\s*:")


def _first_object(text: str) -> str | None:
    """The first balanced {...} span (string-aware); if never closed, the text from the first '{' with the missing
    closers appended (a small model often stops right after the last value)."""
    start = text.find("{")
    if start < 0:
        return None
    depth = 0
    in_str: str | None = None
    esc = False
    for i in range(start, len(text)):
        ch = text[i]
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == in_str:
                in_str = None
            continue
        if ch in "\"'":
            in_str = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
    tail = text[start:].rstrip().rstrip(",")
    if in_str:
        tail += in_str
    return tail + "}" * max(depth, 1)


def _candidates(span: str) -> list[str]:
    fixed = _TRAILING_COMMA.sub(r"\1", span)
    for pat, rep in _PY_LITERALS:
        fixed = pat.sub(rep, fixed)
    keyed = _UNQUOTED_KEY.sub(r'\1"\2":', fixed)
    return [span, fixed, keyed]


def parse_json_object(text: str) -> dict[str, Any]:
    """Recover one JSON object from model output or raise `JSONRepairError`.

    Order: strip code fences -> first {...} span -> strict JSON -> trailing commas / Python literals / unquoted keys
    -> Python-literal parse (single-quoted strings)."""
    if not text or not text.strip():
        raise JSONRepairError("empty output")
    m = _FENCE.search(text)
    body = m.group(1) if m else text
    span = _first_object(body) or _first_object(text)
    if span is None:
        raise JSONRepairError("no '{' in output")
    for cand in _candidates(span):
        try:
            obj = json.loads(cand)
        except json.JSONDecodeError:
            pass
        else:
            if isinstance(obj, dict):
                return obj
        try:
            # single-quoted dicts ({'a': 'b'}) are valid Python literals; literal_eval never executes code
            pyobj = ast.literal_eval(cand.replace("true", "True").replace("false", "False").replace("null", "None"))
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            continue
        if isinstance(pyobj, dict):
            return pyobj
    raise JSONRepairError(f"could not repair JSON object: {span[:200]!r}")
