"""An instant-reply OpenAI-compatible load server: a real HTTP server on loopback that answers chat completions at
once, with no model, so a bench measures the orchestration (dispatch, workers, broker, learner ingest) alone.

Answers are well formed the way vLLM's are: `choices[0].message.content`, `choices[0].token_ids`,
`prompt_token_ids`, per-token `logprobs` (<= 0) and `usage`. Each structured-output kind gets a text that parses:
- grammar: the first alternative of `root` that the Expert grammar offers (one pool skill), or an
  `ACTION: <tag>\\n...` reply for the CS grammar;
- regex: a string that matches it (`regex_example`, alternatives drawn with the request's seed);
- json: an object built from the schema's required properties (enums their first value, strings "ok", integers
  the minimum or 3, booleans false, arrays empty); free text otherwise.
"Tokens" are words, spaces and punctuation characters (`tokenize`), ids their CRC32 mod 49152: consistent lengths
and a judge's `1=8` answer still has its digits as separate tokens, no tokenizer needed.
`GET /v1/models` lists the served names, `GET /health` answers 200. Stdlib only.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_ROOT_ALT = re.compile(r'^root ::= "([^"]*)"', re.MULTILINE)
_CS_ROOT = re.compile(r'^root ::= "ACTION: " \("([a-z0-9_]+)"', re.MULTILINE)


def _from_schema(schema: dict[str, Any]) -> Any:
    t = schema.get("type")
    if "enum" in schema:
        return schema["enum"][0]
    if t == "object":
        props = schema.get("properties", {})
        return {k: _from_schema(props.get(k, {})) for k in schema.get("required", list(props))}
    if t == "integer":
        return int(schema.get("minimum", 3))
    if t == "number":
        return float(schema.get("minimum", 0.5))
    if t == "boolean":
        return False
    if t == "array":
        return []
    return "ok"


_SAFE = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?0123456789"


def regex_example(pattern: str, rng: random.Random) -> str:
    """One string that fully matches `pattern` (literals, classes, groups, alternation, bounded repeats: what our
    structured outputs use). Alternatives are picked by `rng`; repeats take a short length within their bounds."""
    from re import _parser as sre  # the stdlib's own regex parser (stable within a Python version)

    def cls_char(items: list[tuple[Any, Any]]) -> str:
        negate = any(op == sre.NEGATE for op, _ in items)
        allowed: set[str] = set()
        for op, av in items:
            if op == sre.LITERAL:
                allowed.add(chr(av))
            elif op == sre.RANGE:
                allowed |= {chr(c) for c in range(av[0], av[1] + 1)}
            elif op == sre.CATEGORY:
                allowed |= {c for c in _SAFE if re.fullmatch(r"\d" if "DIGIT" in str(av) else r"\w", c)}
        pool = [c for c in _SAFE if (c not in allowed) == negate] if negate else sorted(allowed)
        return rng.choice(pool) if pool else "x"

    def gen(items: Any) -> str:
        out = []
        for op, av in items:
            if op == sre.LITERAL:
                out.append(chr(av))
            elif op == sre.NOT_LITERAL:
                out.append(next(c for c in _SAFE if ord(c) != av))
            elif op == sre.ANY:
                out.append("x")
            elif op == sre.IN:
                out.append(cls_char(list(av)))
            elif op == sre.BRANCH:
                out.append(gen(rng.choice(av[1])))
            elif op == sre.SUBPATTERN:
                out.append(gen(av[-1]))
            elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT, getattr(sre, "POSSESSIVE_REPEAT", None)):
                lo, hi, sub = av
                hi = lo + 24 if hi == sre.MAXREPEAT else hi
                n = min(hi, max(lo, rng.randint(lo, min(hi, lo + 24))))
                out.extend(gen(sub) for _ in range(n))
            elif op == sre.AT:
                pass
            else:
                raise ValueError(f"regex construct {op} is not supported by the load server: {pattern[:80]!r}")
        return "".join(out)

    text = gen(sre.parse(pattern))
    if re.fullmatch(pattern, text) is None:  # a construct we approximated: say so rather than answer wrongly
        raise ValueError(f"could not build a string matching {pattern[:80]!r}")
    return text


_PIECE = re.compile(r"\w+|\s|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """The load server's "tokens": words, single whitespace characters and single punctuation characters."""
    return _PIECE.findall(text)


def token_id(piece: str) -> int:
    return zlib.crc32(piece.encode()) % 49_152


def reply_text(body: dict[str, Any], *, stop_rate: float = 1.0 / 6.0) -> str:
    """What the load server answers to one chat request body (see the module docstring). A simulator turn (the
    regex has a `"stop": (true|false)` field) stops with probability `stop_rate`, so dialogues last about as long as
    real ones (~1/stop_rate turns) instead of ending at the first coin flip."""
    so = (body.get("structured_outputs") or {}) if isinstance(body.get("structured_outputs"), dict) else {}
    if "answer" in so:
        return str(so["answer"])
    if "grammar" in so:
        g = str(so["grammar"])
        m = _CS_ROOT.search(g)
        if m:
            return f"ACTION: {m.group(1)}\nThank you, I am looking into it right now."
        m = _ROOT_ALT.search(g)
        if m:
            return m.group(1)
    if "regex" in so:
        rng = random.Random(body.get("seed"))
        text = regex_example(str(so["regex"]), rng)
        if '"stop": true' in text or '"stop": false' in text:  # both alternatives match: re-draw with stop_rate
            text = re.sub(r'"stop": (true|false)', f'"stop": {"true" if rng.random() < stop_rate else "false"}', text)
        return text
    if "json" in so and isinstance(so["json"], dict):
        return json.dumps(_from_schema(so["json"]))
    if "choice" in so and so["choice"]:
        return str(so["choice"][0])
    return "ok"


class LoadServer:
    """`with LoadServer() as s: s.base_url` — serves until the block ends. `delay_s` adds a fixed latency."""

    def __init__(
        self,
        served_names: tuple[str, ...] = ("policy",),
        *,
        host: str = "127.0.0.1",
        delay_s: float = 0.0,
        stop_rate: float = 1.0 / 6.0,
    ) -> None:
        self.served_names = served_names
        self.delay_s = delay_s
        self.stop_rate = stop_rate
        self.requests = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # One segment per response and TCP_NODELAY: headers and body written apart would meet the client's
            # delayed ACK (Nagle), 40 ms a request, and measure the load server instead of the orchestration.
            disable_nagle_algorithm = True
            wbufsize = 1 << 16

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, code: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                if self.path.rstrip("/") == "/health":
                    self._send(200, {})
                elif self.path.rstrip("/") == "/v1/models":
                    models = [{"id": n, "object": "model", "owned_by": "load", "root": n} for n in outer.served_names]
                    self._send(200, {"object": "list", "data": models})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:  # noqa: N802
                n = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(n) or b"{}")
                except json.JSONDecodeError as e:
                    self._send(400, {"error": {"message": f"body is not JSON: {e}"}})
                    return
                route = self.path.rstrip("/")
                if route not in ("/v1/chat/completions", "/v1/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                if outer.delay_s:
                    time.sleep(outer.delay_s)
                with outer._lock:
                    outer.requests += 1
                chat = outer.completion(body)
                if route == "/v1/completions":  # replay: token-id prompt, exactly max_tokens tokens when min_tokens
                    n = int(body.get("min_tokens") or 0) or len(chat["choices"][0]["token_ids"])
                    chat = {**chat, "object": "text_completion", "choices": [
                        {"index": 0, "text": "x" * n, "finish_reason": "length", "token_ids": [0] * n}]}  # fmt: skip
                    chat["usage"] = {**chat["usage"], "completion_tokens": n}
                self._send(200, chat)

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        text = reply_text(body, stop_rate=self.stop_rate)
        max_tokens = int(body.get("max_tokens") or 16)
        pieces = tokenize(text)[:max_tokens]
        text = "".join(pieces)
        ids = [token_id(p) for p in pieces]
        prompt = "".join(str(m.get("content", "")) for m in body.get("messages", []))
        prompt_ids = [token_id(p) for p in tokenize(prompt)] or [0]
        lp = [{"token": p, "logprob": -0.1, "bytes": list(p.encode()), "top_logprobs": []} for p in pieces]
        return {
            "id": f"load-{self.requests}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", self.served_names[0]),
            "prompt_token_ids": prompt_ids,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                    "token_ids": ids,
                    "logprobs": {"content": lp},
                }
            ],
            "usage": {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": len(ids),
                "total_tokens": len(prompt_ids) + len(ids),
            },
        }

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.root_url + "/v1"

    def start(self) -> LoadServer:
        self._thread = threading.Thread(target=self._server.serve_forever, name="load-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def __enter__(self) -> LoadServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
