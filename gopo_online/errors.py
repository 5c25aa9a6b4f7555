"""What every bad-input error shares: one base class the CLI turns into a message (never a traceback), and a
bounded `repr` for putting what was read into that message.

An error message quotes the bad value so the user can find it, but the value may be anything a file or a model
wrote: a YAML alias bomb that expands to 10^9 nodes, a 5000-digit integer (past Python's int-to-str limit), a
10 MB string. `short_repr` shows a bounded prefix of any of them in bounded time.
"""

from __future__ import annotations

import reprlib
from typing import Any


class InputError(ValueError):
    """A file, record, option or message from outside is wrong; `str(e)` names what (file, record, field, key).
    The CLI prints it and exits 2."""


_REPR = reprlib.Repr()
_REPR.maxlevel = 2
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxfrozenset = _REPR.maxdeque = 4
_REPR.maxdict = 4
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlong = 40


def short_repr(value: Any, limit: int = 80) -> str:
    """A repr of at most `limit` characters, computed without walking (or expanding) the whole value."""
    try:
        text = _REPR.repr(value)
    except ValueError:  # an int past sys.get_int_max_str_digits
        text = f"<int of about {int(value.bit_length() * 0.30103) + 1} digits>" if isinstance(value, int) else "<?>"
    except Exception:  # noqa: BLE001 - a hostile __repr__ must not hide the error being reported
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
