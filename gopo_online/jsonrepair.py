"""Repair of the JSON small models write: code fences, prose around the object, single quotes, trailing commas,
Python literals, unbalanced closing braces. Pure functions; `tests/simulator/test_user_json.py` runs them on
malformed outputs recorded from SmolLM2-135M.

Every rewrite applies only OUTSIDE string literals (a user who writes "is that true? null and void" keeps those
words). Whatever the text, the only exception `parse_json_object` raises is `JSONRepairError`: nesting too deep
for the parser, numbers past Python's int-digit limit or a text over `MAX_TEXT_CHARS` are reported as such, so the
caller re-asks and keeps the raw text.
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
_JSON_LITERALS = (
    (re.compile(r"\btrue\b"), "True"),
    (re.compile(r"\bfalse\b"), "False"),
    (re.compile(r"\bnull\b"), "None"),
)
MAX_TEXT_CHARS = 100_000
"""Longer model output is not parsed (a reply is a few hundred characters; max_tokens bounds it anyway)."""
MAX_DEPTH = 64
"""Deepest {...}/[...] nesting accepted; the replies we parse are 2 levels deep."""


def _outside_strings(text: str, fn) -> str:
    """Apply `fn` to the parts of `text` that are not inside a '...' or "..." literal; string literals are kept
    byte for byte."""
    out: list[str] = []
    seg_start = 0
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch in "\"'":
            out.append(fn(text[seg_start:i]))
            j = i + 1
            while j < n and text[j] != ch:
                j += 2 if text[j] == "\\" else 1
            j = min(j + 1, n)
            out.append(text[i:j])
            i = seg_start = j
            continue
        i += 1
    out.append(fn(text[seg_start:]))
    return "".join(out)


def _subs(pairs):
    def fn(seg: str) -> str:
        for pat, rep in pairs:
            seg = pat.sub(rep, seg)
        return seg

    return fn


def _max_depth(text: str) -> int:
    """Deepest bracket nesting outside string literals."""
    depth = best = 0

    def count(seg: str) -> str:
        nonlocal depth, best
        for ch in seg:
            if ch in "{[":
                depth += 1
                best = max(best, depth)
            elif ch in "}]":
                depth -= 1
        return seg

    _outside_strings(text, count)
    return best


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
    fixed = _outside_strings(span, _subs(((_TRAILING_COMMA, r"\1"), *_PY_LITERALS)))
    keyed = _outside_strings(fixed, _subs(((_UNQUOTED_KEY, r'\1"\2":'),)))
    return [span, fixed, keyed]


def parse_json_object(text: str) -> dict[str, Any]:
    """Recover one JSON object from model output or raise `JSONRepairError`.

    Order: strip code fences -> first {...} span -> strict JSON -> trailing commas / Python literals / unquoted keys
    -> Python-literal parse (single-quoted strings)."""
    if not text or not text.strip():
        raise JSONRepairError("empty output")
    if len(text) > MAX_TEXT_CHARS:
        raise JSONRepairError(f"output of {len(text)} characters exceeds the {MAX_TEXT_CHARS} parsed")
    m = _FENCE.search(text)
    body = m.group(1) if m else text
    span = _first_object(body) or _first_object(text)
    if span is None:
        raise JSONRepairError("no '{' in output")
    depth = _max_depth(span)
    if depth > MAX_DEPTH:
        raise JSONRepairError(f"nesting {depth} levels deep exceeds the {MAX_DEPTH} accepted: {span[:200]!r}")
    problems: list[str] = []
    for cand in _candidates(span):
        try:
            obj = json.loads(cand)
        except json.JSONDecodeError:
            pass
        except (ValueError, RecursionError, OverflowError, MemoryError) as e:
            # ValueError here: an integer past sys.get_int_max_str_digits (4300 digits)
            problems.append(f"{type(e).__name__}: {str(e)[:120]}")
        else:
            if isinstance(obj, dict):
                return obj
        try:
            # single-quoted dicts ({'a': 'b'}) are valid Python literals; literal_eval never executes code
            pyobj = ast.literal_eval(_outside_strings(cand, _subs(_JSON_LITERALS)))
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError, OverflowError) as e:
            if not isinstance(e, SyntaxError | ValueError) or "digits" in str(e):
                problems.append(f"{type(e).__name__}: {str(e)[:120]}")
            continue
        if isinstance(pyobj, dict):
            return pyobj
    why = f" ({'; '.join(dict.fromkeys(problems))})" if problems else ""
    raise JSONRepairError(f"could not repair JSON object{why}: {span[:200]!r}")
