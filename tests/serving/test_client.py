"""ChatClient retries and errors against real local HTTP endpoints (a dead port, a server that answers 500/400)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gopo_online.serving.client import ChatClient, ChatResult, ClientError
from gopo_online.serving.process import free_port


class _Handler(BaseHTTPRequestHandler):
    status = 500
    hits = 0

    def do_POST(self):  # noqa: N802 - http.server's name
        type(self).hits += 1
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({"error": {"message": f"status {self.status}", "type": "x"}}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    def start(status: int):
        handler = type("H", (_Handler,), {"status": status, "hits": 0})
        srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/v1", handler

    servers: list[ThreadingHTTPServer] = []
    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def test_server_down_names_the_url_after_retries():
    url = f"http://127.0.0.1:{free_port()}/v1"
    client = ChatClient(url, timeout=2.0, max_retries=2, backoff_s=0.01)
    with pytest.raises(ClientError, match=r"127\.0\.0\.1:\d+/v1 unreachable or failing after 3 attempts"):
        client.chat([{"role": "user", "content": "hi"}], model="m", temperature=0.0, max_tokens=4)


def test_5xx_is_retried_then_fails(http_server):
    url, handler = http_server(500)
    client = ChatClient(url, timeout=5.0, max_retries=2, backoff_s=0.01)
    with pytest.raises(ClientError, match="after 3 attempts"):
        client.chat([{"role": "user", "content": "hi"}], model="m", temperature=0.0, max_tokens=4)
    assert handler.hits == 3


def test_4xx_is_not_retried(http_server):
    url, handler = http_server(400)
    client = ChatClient(url, timeout=5.0, max_retries=3, backoff_s=0.01)
    with pytest.raises(ClientError, match="rejected the request .HTTP 400"):
        client.chat([{"role": "user", "content": "hi"}], model="m", temperature=0.0, max_tokens=4)
    assert handler.hits == 1


def test_to_generation_requires_token_ids():
    r = ChatResult(text="hi", model="m", token_ids=(5,), logprobs=(-0.1,), prompt_token_ids=(1, 2), latency_s=0.2)
    g = r.to_generation(4)
    assert g.completion_token_ids == (5,) and g.policy_version == 4 and g.prompt_token_ids == (1, 2)
    with pytest.raises(ValueError, match="no token ids"):
        ChatResult(text="hi", model="m").to_generation(0)
