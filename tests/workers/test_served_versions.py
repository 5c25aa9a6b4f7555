"""Workers learn the served version from `weights.updated` announcements, not from the server: a test counts the
requests a worker process sends to the policy server's admin/model routes (once per process, 0 per request).

Real parts: the worker's own `default_deps` wiring, a real broker (Redis) carrying the learner's
announcement; the policy server is a local HTTP server that records every request (its model list is all a
version read needs)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytestmark = pytest.mark.integration


class PolicyServer:
    def __init__(self) -> None:
        self.paths: list[str] = []
        self.roots = {"expert": "/w/expert/lora-v2", "cs": "/w/cs/lora-v2"}
        owner = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                owner.paths.append(self.path)
                data = [{"id": "policy", "root": "/m"}] + [{"id": k, "root": v} for k, v in owner.roots.items()]
                body = json.dumps({"data": data}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def test_worker_makes_no_admin_call_per_request_and_follows_announcements(redis_url, tmp_path) -> None:
    import uuid

    from gopo_online.config import load_config
    from gopo_online.stream import WeightsAnnouncer
    from workers.rollout import WorkerContext, default_deps

    srv = PolicyServer()
    tag = uuid.uuid4().hex[:8]  # a private weights exchange: other tests on the shared Redis never reach it
    cfg = load_config(
        overrides=[
            f"run.output_dir='{tmp_path}'",
            f"serving.policy.url='{srv.url}'",
            f"broker.weights_exchange='test.weights.{tag}'",
            f"broker.events_exchange='test.events.{tag}'",
        ]
    )
    ctx = WorkerContext(cfg=cfg, broker_url=redis_url)
    try:
        deps = default_deps(ctx)
        turns_per_episode = 6
        for _ in range(3 * turns_per_episode):  # three episodes: an Expert and a CS request per turn
            assert deps.expert.resolve() == ("expert", 2) and deps.cs.resolve() == ("cs", 2)
        assert srv.paths == ["/v1/models"]  # one read when the process started; none per request

        # The learner pushes v3 and announces it: the worker's next request uses and records v3, still no call.
        with WeightsAnnouncer(redis_url, cfg) as announcer:
            announcer.announce(3, "lora", str(tmp_path / "weights"), {"expert": "expert", "cs": "cs"})
        deadline = time.monotonic() + 10
        while deps.cs.resolve()[1] != 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert deps.cs.resolve() == ("cs", 3) and deps.expert.resolve() == ("expert", 3)
        assert srv.paths == ["/v1/models"]
    finally:
        ctx.close()
        srv.httpd.shutdown()
