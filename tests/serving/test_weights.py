"""WeightSync: layout, atomic writes, verification before any HTTP call, call order, versions, served versions.

The server here is a real local `http.server` that records what it is sent and answers like vLLM's admin
routes; the behaviour of vLLM itself is covered by test_weights_integration.py.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from gopo_online.bench_weights import full_weights_writer, single_sync
from gopo_online.serving.weights import (
    AdminClient,
    WeightPushError,
    WeightSync,
    atomic_dir,
    check_safetensors_file,
    verify_weights_dir,
)

torch = pytest.importorskip("torch")


class FakeAdmin:
    """Records every request; answers /weight_info, /v1/models, and 500s on paths listed in `fail`."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.weight_version = "default"
        self.lora: dict[str, str] = {}
        self.fail: set[str] = set()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep pytest output clean
                pass

            def _reply(self, code: int, body: dict | None = None) -> None:
                data = json.dumps(body or {}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                u = urlsplit(self.path)
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n)) if n else None
                owner.calls.append(
                    {
                        "method": method,
                        "path": u.path,
                        "query": parse_qs(u.query),
                        "body": body,
                        "auth": self.headers.get("Authorization"),
                    }
                )
                if u.path in owner.fail:
                    return self._reply(500, {"error": "boom"})
                if u.path == "/weight_info":
                    return self._reply(200, {"weight_version": owner.weight_version})
                if u.path == "/update_weight_version":
                    owner.weight_version = body["new_version"]
                    return self._reply(200, {"success": True})
                if u.path == "/reset_prefix_cache":
                    return self._reply(200, {"success": True})
                if u.path == "/v1/load_lora_adapter":
                    owner.lora[body["lora_name"]] = body["lora_path"]
                    return self._reply(200, {})
                if u.path == "/v1/models":
                    data = [{"id": "policy", "root": "/m"}] + [{"id": k, "root": v} for k, v in owner.lora.items()]
                    return self._reply(200, {"data": data})
                return self._reply(200, {"status": "ok"})

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def paths(self) -> list[str]:
        return [c["path"] for c in self.calls]


@pytest.fixture
def fake():
    srv = FakeAdmin()
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


@pytest.fixture
def base_model(tmp_path: Path) -> Path:
    d = tmp_path / "base"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    return d


def _sd(scale: float = 1.0) -> dict:
    return {"w": torch.full((4, 3), scale, dtype=torch.bfloat16), "b": torch.arange(5, dtype=torch.float32)}


def _visible(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


# ---------------------------------------------------------------- atomic write


def test_atomic_dir_crash_leaves_nothing(tmp_path: Path) -> None:
    final = tmp_path / "weights" / "v1"
    with pytest.raises(RuntimeError, match="crash"), atomic_dir(final) as tmp:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("crash mid-write")
    assert not final.exists()
    assert _visible(final.parent) == []  # the temp folder is gone too


def test_atomic_dir_replaces_existing_version(tmp_path: Path) -> None:
    final = tmp_path / "v1"
    for text in ("old", "new"):
        with atomic_dir(final) as tmp:
            (tmp / "f").write_text(text)
    assert (final / "f").read_text() == "new"
    assert _visible(tmp_path) == ["v1"]


def _adapter(d: Path) -> Path:
    from safetensors.torch import save_file

    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text('{"r": 4}')
    save_file({"base_model.model.x.lora_A.weight": torch.zeros(4, 8)}, str(d / "adapter_model.safetensors"))
    return d


def _writer(tag: float = 0.0):
    """A learner-like source: fills the temp folder it is handed (the adapter is written once, in place)."""
    from safetensors.torch import save_file

    def write(dest: Path) -> None:
        (dest / "adapter_config.json").write_text('{"r": 4}')
        save_file(
            {"base_model.model.x.lora_A.weight": torch.full((4, 8), tag)}, str(dest / "adapter_model.safetensors")
        )

    return write


def _sync(tmp_path: Path, servers: list[str], **kw) -> WeightSync:
    from gopo_online.serving.weights import LoRATransport

    return WeightSync(tmp_path / "w", {a: LoRATransport(adapter_name=a) for a in ("expert", "cs")}, servers, **kw)


def test_publish_crash_in_writer_makes_no_call_and_keeps_registry(tmp_path, fake) -> None:
    def exploding(dest: Path) -> None:
        (dest / "adapter_config.json").write_text("{}")
        raise OSError("disk full")

    sync = _sync(tmp_path, [fake.url])
    with pytest.raises(OSError, match="disk full"):
        sync.publish(1, {"expert": _writer(), "cs": exploding})
    assert _visible(tmp_path / "w" / "cs") == []  # no half-written folder, no temp folder
    assert fake.calls == []
    assert sync.registry.current() is None


def test_incomplete_writer_output_is_never_renamed_into_place(tmp_path, fake) -> None:
    sync = _sync(tmp_path, [fake.url])
    with pytest.raises(WeightPushError, match="adapter_config.json"):
        sync.publish(1, {"expert": _writer(), "cs": lambda dest: None})
    assert _visible(tmp_path / "w" / "cs") == [] and fake.calls == []


# ---------------------------------------------------------------- verification before HTTP


def test_check_safetensors_detects_truncation(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    f = tmp_path / "m.safetensors"
    save_file(_sd(), str(f))
    assert check_safetensors_file(f) == 2
    f.write_bytes(f.read_bytes()[:-3])
    with pytest.raises(WeightPushError, match="truncated"):
        check_safetensors_file(f)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_verify_missing_or_incomplete_dir(tmp_path: Path, kind) -> None:
    with pytest.raises(WeightPushError, match="does not exist"):
        verify_weights_dir(tmp_path / "nope", kind)
    (tmp_path / "d").mkdir()
    with pytest.raises(WeightPushError, match="no "):
        verify_weights_dir(tmp_path / "d", kind)


def test_refit_with_missing_path_fails_before_any_admin_post(tmp_path, fake) -> None:
    import shutil

    sync = _sync(tmp_path, [fake.url])
    res = sync.publish(1, {"expert": _writer(), "cs": _writer()})
    fake.calls.clear()
    fake.lora.clear()  # the server restarted
    shutil.rmtree(res.paths["expert"])  # and the folder vanished
    with pytest.raises(WeightPushError, match="does not exist"):
        sync.refit(fake.url)
    assert [c["method"] for c in fake.calls] == ["GET"]  # only the version query, no load


# ---------------------------------------------------------------- layout, write once, registry


def test_layout_write_once_and_registry(tmp_path, fake) -> None:
    sync = _sync(tmp_path, [fake.url])
    written = sync.write(1, {"expert": _writer(1.0), "cs": _writer(2.0)})
    assert written == {a: tmp_path / "w" / a / "lora-v1" for a in ("expert", "cs")}
    inode = written["expert"].stat().st_ino
    res = sync.publish(1, written)  # what the learner does: write, then publish the final folders
    assert written["expert"].stat().st_ino == inode  # verified, not copied again
    assert res is not None and res.version == 1 and res.served_models == {"expert": "expert", "cs": "cs"}
    reg = json.loads((tmp_path / "w" / "versions.json").read_text())
    assert reg["current"]["version"] == 1 and reg["current"]["paths"]["cs"] == str(written["cs"])
    assert _visible(tmp_path / "w") == ["cs", "expert", "versions.json"]
    with pytest.raises(ValueError, match="exactly the agents"):
        sync.write(2, {"expert": _writer()})


def test_prune_keeps_last_versions(tmp_path, fake) -> None:
    sync = _sync(tmp_path, [fake.url], keep_last=2)
    for v in range(1, 5):
        sync.publish(v, {"expert": _writer(v), "cs": _writer(v)})
    assert _visible(tmp_path / "w" / "expert") == ["lora-v3", "lora-v4"]


def test_republish_current_refits_and_older_is_skipped(tmp_path, fake) -> None:
    sync = _sync(tmp_path, [fake.url])
    sync.publish(2, {"expert": _writer(), "cs": _writer()})
    fake.lora.clear()  # restart
    assert sync.publish(2, {"expert": _writer(), "cs": _writer()}) is None  # learner setup after a resume
    assert sync.server_version() == 2
    fake.calls.clear()
    assert sync.publish(1, {"expert": _writer(), "cs": _writer()}) is None  # registry ahead: nothing pushed
    assert fake.calls == [] and sync.current_version() == 2


# ---------------------------------------------------------------- full reload protocol (benchmark transport)


def test_full_publish_call_order_and_version(tmp_path, fake, base_model) -> None:
    seen = []
    sync = single_sync("full", tmp_path / "w", [fake.url + "/v1"])
    sync.on_published = seen.append
    res = sync.publish(1, {"policy": full_weights_writer(_sd(), base_model, 1)})
    assert fake.paths() == [
        "/pause",
        "/collective_rpc",
        "/reset_prefix_cache",
        "/update_weight_version",
        "/resume",
        "/weight_info",
    ]
    path = tmp_path / "w" / "policy" / "v1"
    assert fake.calls[0]["query"] == {"mode": ["keep"]}
    assert fake.calls[1]["body"] == {"method": "reload_weights", "kwargs": {"weights_path": str(path)}}
    assert res.paths == {"policy": str(path)} and (path / "config.json").is_file()
    assert res.version == 1 and res.served_models == {"policy": "policy"} and res.cache_reset is True
    assert sync.current_version() == 1 and seen == [res]
    assert sync.server_version() == 1


def test_full_reload_failure_resumes_marks_unknown_and_keeps_registry(tmp_path, fake, base_model) -> None:
    sync = single_sync("full", tmp_path / "w", [fake.url])
    fake.fail.add("/collective_rpc")
    with pytest.raises(WeightPushError, match="HTTP 500"):
        sync.publish(1, {"policy": full_weights_writer(_sd(), base_model)})
    assert fake.paths()[-1] == "/resume"  # resumed in the finally
    assert fake.weight_version == "unknown"
    assert sync.registry.current() is None
    assert sync.server_version() is None


def test_server_that_does_not_confirm_is_an_error(tmp_path, fake, base_model) -> None:
    sync = single_sync("full", tmp_path / "w", [fake.url])
    fake.fail.add("/update_weight_version")
    with pytest.raises(WeightPushError):
        sync.publish(1, {"policy": full_weights_writer(_sd(), base_model)})
    assert sync.registry.current() is None


# ---------------------------------------------------------------- LoRA protocol


def test_lora_publish_loads_in_place_and_reads_version_back(tmp_path, fake) -> None:
    sync = _sync(tmp_path, [fake.url])
    assert sync.server_version() == 0 and sync.served_models(0) == {"expert": "policy", "cs": "policy"}
    for v in (1, 2):
        res = sync.publish(v, {"expert": _adapter(tmp_path / f"e{v}"), "cs": _adapter(tmp_path / f"c{v}")})
        loads = [c["body"] for c in fake.calls if c["path"] == "/v1/load_lora_adapter"][-2:]
        assert loads == [{"lora_name": a, "lora_path": res.paths[a], "load_inplace": True} for a in ("expert", "cs")]
        assert res.paths["cs"] == str(tmp_path / "w" / "cs" / f"lora-v{v}")
        assert sync.server_version() == v


def test_restarted_server_is_stale_until_refit(tmp_path, fake) -> None:
    sync = _sync(tmp_path, [fake.url])
    sync.publish(1, {"expert": _writer(), "cs": _writer()})
    sync.publish(2, {"expert": _writer(), "cs": _writer()})
    fake.lora.clear()  # restart: adapters gone
    assert sync.server_version() == 0
    other = _sync(tmp_path, [fake.url])  # the controller: same layout, its own instance
    fake.calls.clear()
    assert other.refit(fake.url) == 2
    assert {c["body"]["lora_path"] for c in fake.calls if c["method"] == "POST"} == {
        str(tmp_path / "w" / a / "lora-v2") for a in ("expert", "cs")
    }
    fake.calls.clear()
    assert other.refit(fake.url) == 2  # already current: only queries
    assert {c["method"] for c in fake.calls} == {"GET"}
    fake.lora["cs"] = "/elsewhere/lora-v1"  # a server that will not take the adapter reads as stale
    fake.fail.add("/v1/load_lora_adapter")
    with pytest.raises(WeightPushError):
        other.refit(fake.url)


def test_refit_to_a_registry_path_that_is_gone(tmp_path, fake) -> None:
    """The registry's folders were removed (a clean-up, a full disk's rescue) and the server restarts: nothing
    is sent for the missing path (it would kill vLLM's engine); with `fallback` the server is refit to the newest
    complete version on disk (stale until the learner's next push), else the error names the folder."""
    import shutil

    sync = _sync(tmp_path, [fake.url])
    for v in (1, 2, 3):
        sync.publish(v, {"expert": _writer(v), "cs": _writer(v)})
    shutil.rmtree(tmp_path / "w" / "cs" / "lora-v3")  # the registry's current version, one agent's folder
    (tmp_path / "w" / "expert" / "lora-v2" / "adapter_model.safetensors").write_bytes(b"trunc")  # v2 incomplete
    fake.lora.clear()  # restarted
    fake.calls.clear()
    other = _sync(tmp_path, [fake.url])  # the controller's own instance
    with pytest.raises(WeightPushError, match="lora-v3 does not exist"):
        other.refit(fake.url)
    assert [c for c in fake.calls if c["method"] == "POST"] == []
    assert other.refit(fake.url, fallback=True) == 1  # v2 is incomplete too: v1
    loaded = {c["body"]["lora_path"] for c in fake.calls if c["path"] == "/v1/load_lora_adapter"}
    assert loaded == {str(tmp_path / "w" / a / "lora-v1") for a in ("expert", "cs")}
    assert other.current_version() == 3 and other.server_version() == 1  # the registry is not rewritten
    # a version the learner wrote but could not push (the server was down) is newer: it wins
    sync.write(4, {"expert": _writer(4), "cs": _writer(4)})
    fake.lora.clear()
    assert other.refit(fake.url, fallback=True) == 4 and other.current_version() == 3
    # the learner's next push is a new version, written afresh: the server is current again
    assert sync.publish(5, {"expert": _writer(5), "cs": _writer(5)}).version == 5 and sync.server_version() == 5


def test_lora_rejects_incomplete_adapter_dir(tmp_path, fake) -> None:
    sync = _sync(tmp_path, [fake.url])
    (tmp_path / "a").mkdir()
    with pytest.raises(WeightPushError, match="adapter_config.json"):
        sync.publish(1, {"expert": tmp_path / "a", "cs": tmp_path / "a"})
    assert fake.calls == [] and _visible(tmp_path / "w" / "expert") == []


# ---------------------------------------------------------------- served versions (workers)


@dataclass
class Ann:
    version: int
    served_models: dict


def test_served_reads_the_server_once_then_follows_announcements(tmp_path, fake) -> None:
    """The worker's question "which model and version?" costs one server read per process, none per request."""
    fake.lora["expert"] = "/r/lora-v3"
    fake.lora["cs"] = "/r/lora-v3"
    sync = _sync(tmp_path, [fake.url])
    assert sync.served("expert") == ("expert", 3)
    for _ in range(50):  # 50 requests' worth of lookups
        sync.served("cs")
    assert fake.paths() == ["/v1/models"] and sync.server_reads == 1
    sync.observe(Ann(4, {"expert": "expert", "cs": "cs"}))
    assert sync.served("cs") == ("cs", 4)
    sync.observe(Ann(2, {"expert": "old", "cs": "old"}))  # a late, older announcement never moves it back
    assert sync.served("expert") == ("expert", 4)
    assert fake.paths() == ["/v1/models"]


def test_announcement_after_publish_is_what_workers_observe(tmp_path, fake) -> None:
    from gopo_online.stream import WeightsAnnouncement

    learner = _sync(tmp_path, [fake.url])
    worker = _sync(tmp_path / "elsewhere", [fake.url])
    worker.observe(Ann(0, {}))
    learner.publish(1, {"expert": _writer(), "cs": _writer()})
    ann = WeightsAnnouncement(**learner.announcement(1), announced_at=0.0)  # what the learner sends
    fake.calls.clear()
    worker.observe(ann)
    assert worker.served("expert") == ("expert", 1) and fake.calls == []


# ---------------------------------------------------------------- admin safety, config


def test_non_loopback_needs_token_and_token_is_sent(tmp_path, fake) -> None:
    with pytest.raises(WeightPushError, match="non-loopback"):
        AdminClient("http://10.1.2.3:8000")
    with pytest.raises(WeightPushError, match="non-loopback"):
        _sync(tmp_path, ["http://example.org:8000/v1"])
    AdminClient("http://10.1.2.3:8000", token="t").close()  # allowed with a token
    sync = _sync(tmp_path, [fake.url], token="s3cret")
    sync.publish(1, {"expert": _writer(), "cs": _writer()})
    assert {c["auth"] for c in fake.calls} == {"Bearer s3cret"}


def test_from_config_layout_transport_and_token(tmp_path, fake, monkeypatch) -> None:
    from gopo_online.config import load_config
    from gopo_online.serving.weights import LoRATransport

    monkeypatch.setenv("MY_ADMIN_TOKEN", "tok")
    cfg = load_config(
        overrides=[
            f"run.output_dir='{tmp_path}'",
            "serving.admin_token_env='MY_ADMIN_TOKEN'",
            f"serving.policy.url='{fake.url}'",
        ]
    )
    sync = WeightSync.from_config(cfg)
    assert sync.root == cfg.run.run_dir / "weights" and sync.servers == [fake.url] and sync.token == "tok"
    assert all(isinstance(t, LoRATransport) for t in sync.transports.values()) and sync.agents == ("expert", "cs")
    assert sync.path("cs", 7) == cfg.run.run_dir / "weights" / "cs" / "lora-v7"


@pytest.mark.parametrize("kind", ["full", "nccl"])
def test_config_rejects_a_transport_the_loop_cannot_run(kind) -> None:
    from gopo_online.config import load_config

    with pytest.raises(Exception, match="weight_transport") as e:
        load_config(overrides=[f"serving.weight_transport='{kind}'", "serving.simulator='separate'"])
    if kind == "full":
        assert "cannot run in the training loop" in str(e.value)


def test_wait_serving_returns_once_the_server_answers_and_names_a_server_that_never_does(tmp_path, fake) -> None:
    """The cluster layout: a learner started on its own may be set up before the policy server it pushes to."""
    from gopo_online.procutil import free_port

    sync = _sync(tmp_path, [fake.url])
    sync.wait_serving(5.0)  # answers at once: one GET /v1/models, no push
    assert [c["path"] for c in fake.calls] == ["/v1/models"]
    down = f"http://127.0.0.1:{free_port('127.0.0.1')}"  # nothing listens there: connection refused
    with pytest.raises(WeightPushError, match=rf"policy server {down} not serving after 0s"):
        _sync(tmp_path, [down]).wait_serving(0.0, poll_s=0.01)
