"""Server throughput from a Prometheus endpoint: a local HTTP server serves vLLM-style /metrics text."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gopo_online.events import Key
from gopo_online.serving.server_metrics import ServerThroughput, parse_counter

TEXT = """# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{{engine="0",model_name="policy"}} {a}
vllm:generation_tokens_total{{engine="1",model_name="policy"}} {b}
vllm:generation_tokens_total_created{{engine="0",model_name="policy"}} 1.7e9
vllm:prompt_tokens_total{{engine="0",model_name="policy"}} 999.0
"""


def test_parse_counter_sums_series_and_ignores_lookalikes() -> None:
    assert parse_counter(TEXT.format(a=10.0, b=5.0)) == 15.0
    assert parse_counter("vllm:generation_tokens_total 7\n") == 7.0
    assert parse_counter("# nothing here\nother_total 3\n") is None


@pytest.fixture
def server():
    state = {"a": 100.0, "up": True}

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            if not state["up"] or self.path != "/metrics":
                self.send_response(503)
                self.end_headers()
                return
            body = TEXT.format(a=state["a"], b=0.0).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", state
    httpd.shutdown()


def test_rate_between_samples_restart_and_outage(server) -> None:
    url, state = server
    t = iter([0.0, 2.0, 4.0, 6.0, 8.0])
    tp = ServerThroughput(url + "/v1", clock=lambda: next(t))
    assert tp.metrics() == {}  # one sample is no rate
    state["a"] = 300.0
    assert tp.metrics() == {Key.SERVER_TOKENS_PER_S: 100.0}  # (300 - 100) tokens / 2 s
    state["a"] = 50.0  # the server restarted: its counter began again
    assert tp.metrics() == {}
    state["up"] = False
    assert tp.metrics() == {}  # an outage is no sample, not an error
    state["up"], state["a"] = True, 250.0
    assert tp.metrics() == {Key.SERVER_TOKENS_PER_S: 50.0}  # (250 - 50) / 4 s since the last good sample


def test_prefix_cache_hit_rate_is_reported_when_the_server_counts_it(server) -> None:
    url, state = server
    extra = ('vllm:prefix_cache_queries_total{engine="0",model_name="policy"} 800.0\n'
             'vllm:prefix_cache_hits_total{engine="0",model_name="policy"} 600.0\n')  # fmt: skip
    t = iter([0.0, 2.0])
    tp = ServerThroughput(url + "/v1", clock=lambda: next(t))
    tp._fetch = lambda: TEXT.format(a=state["a"], b=0.0) + extra  # the same server, now with vLLM's cache counters
    assert tp.metrics() == {Key.PREFIX_CACHE_HIT_RATE: 0.75}  # no rate yet from one sample, the hit rate already
    state["a"] = 300.0
    assert tp.metrics() == {Key.SERVER_TOKENS_PER_S: 100.0, Key.PREFIX_CACHE_HIT_RATE: 0.75}
