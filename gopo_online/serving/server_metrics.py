"""A vLLM server's own generation throughput, read from its Prometheus endpoint (``GET /metrics``).

vLLM counts every generated token in the counter ``vllm:generation_tokens_total`` (one series per model/engine
label set; summed here). Tokens per second is the counter's increase between two samples over the time between
them, so the dashboard shows what the server produced in the first minutes of a run, before any episode
finished and before the per-episode token counts arrive.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gopo_online.events import Key

GENERATION_TOKENS = "vllm:generation_tokens_total"
PREFIX_CACHE_QUERIES = "vllm:prefix_cache_queries_total"
PREFIX_CACHE_HITS = "vllm:prefix_cache_hits_total"
"""Prompt tokens looked up in the prefix cache and found there, since the server started (vLLM V1 counters)."""


def parse_counter(text: str, name: str = GENERATION_TOKENS) -> float | None:
    """The sum of a counter's series in Prometheus text exposition format; None when the counter is absent."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        rest = line[len(name) :]
        if rest[:1] not in ("{", " "):
            continue  # a longer metric name with the same prefix (e.g. …_total_created)
        try:
            total += float(rest.rsplit(None, 1)[-1] if rest.startswith(" ") else rest.split("}", 1)[1].split()[0])
        except (IndexError, ValueError):
            continue
        seen = True
    return total if seen else None


class ServerThroughput:
    """Samples a server's generated-token counter; `metrics()` gives ``sys/server_tokens_per_s`` once two samples
    exist (an empty dict before, or when the server does not answer: monitoring never fails the run)."""

    def __init__(self, root_url: str, *, timeout_s: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.url = root_url.rstrip("/").removesuffix("/v1") + "/metrics"
        self.timeout_s = timeout_s
        self.clock = clock
        self._last: tuple[float, float] | None = None

    def _fetch(self) -> str | None:
        """The server's /metrics text, None when it does not answer."""
        import httpx

        try:
            r = httpx.get(self.url, timeout=self.timeout_s)
            r.raise_for_status()
        except httpx.HTTPError:
            return None
        return r.text

    def _rate(self, text: str | None) -> float | None:
        """Tokens per second since the previous sample (None on the first one or when a read failed)."""
        count, now = (None if text is None else parse_counter(text)), self.clock()
        if count is None:
            return None
        last, self._last = self._last, (now, count)
        if last is None or now <= last[0] or count < last[1]:  # first sample, or the server restarted
            return None
        return (count - last[1]) / (now - last[0])

    def metrics(self) -> dict[str, float]:
        """From one read of /metrics: generated tok/s since the last sample, and the prefix cache's hit rate (hit /
        queried prompt tokens since the server started) when the server counts it."""
        text = self._fetch()
        rate = self._rate(text)
        out = {} if rate is None else {Key.SERVER_TOKENS_PER_S: rate}
        if text is not None:
            queries = parse_counter(text, PREFIX_CACHE_QUERIES)
            hits = parse_counter(text, PREFIX_CACHE_HITS)
            if queries and hits is not None:
                out[Key.PREFIX_CACHE_HIT_RATE] = hits / queries
        return out
