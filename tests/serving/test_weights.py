"""Client logic of the weight push: atomic writes, verification before any HTTP call, call order, versions.

The server here is a real local `http.server` that records what it is sent and answers like vLLM's admin
routes; the behaviour of vLLM itself is covered by test_weights_integration.py.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from gopo_online.serving.weights import (
    AdminClient,
    FullReloadTransport,
    LoRATransport,
    NCCLTransport,
    StaleServerError,
    VersionRegistry,
    WeightPublisher,
    WeightPushError,
    atomic_dir,
    check_safetensors_file,
    ensure_current,
    make_transport,
    require_current,
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


def test_publish_crash_in_writer_makes_no_call_and_keeps_registry(tmp_path, fake, base_model) -> None:
    class Exploding(dict):
        def items(self):  # the writer dies after starting to serialise
            raise OSError("disk full")

    pub = WeightPublisher(FullReloadTransport(base_model), tmp_path / "w", [fake.url])
    with pytest.raises(OSError, match="disk full"):
        pub.publish(1, state_dict=Exploding(w=torch.zeros(1)))
    assert _visible(tmp_path / "w") == []
    assert fake.calls == []
    assert pub.registry.current() is None


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


def test_refit_with_missing_path_fails_before_any_admin_post(tmp_path, fake, base_model) -> None:
    pub = WeightPublisher(FullReloadTransport(base_model), tmp_path / "w", [fake.url])
    res = pub.publish(1, state_dict=_sd())
    fake.calls.clear()
    fake.weight_version = "default"  # the server restarted
    import shutil

    shutil.rmtree(res.path)  # and the folder vanished
    with pytest.raises(WeightPushError, match="does not exist"):
        pub.refit(fake.url)
    assert [c["method"] for c in fake.calls] == ["GET"]  # only the version query, no /pause or /collective_rpc


def test_push_of_unverifiable_folder_makes_no_call(tmp_path, fake) -> None:
    pub = WeightPublisher(FullReloadTransport(None), tmp_path / "w", [fake.url])
    (tmp_path / "w" / "v3").mkdir(parents=True)  # exists but holds no weights
    with pytest.raises(WeightPushError):
        pub._push_one(fake.url, 3, tmp_path / "w" / "v3")
    assert fake.calls == []


# ---------------------------------------------------------------- full reload protocol


def test_full_publish_call_order_and_version(tmp_path, fake, base_model) -> None:
    seen = []
    pub = WeightPublisher(FullReloadTransport(base_model), tmp_path / "w", [fake.url + "/v1"], on_published=seen.append)
    res = pub.publish(1, state_dict=_sd())
    assert fake.paths() == [
        "/pause",
        "/collective_rpc",
        "/reset_prefix_cache",
        "/update_weight_version",
        "/resume",
        "/weight_info",
    ]
    assert fake.calls[0]["query"] == {"mode": ["keep"]}
    assert fake.calls[1]["body"] == {"method": "reload_weights", "kwargs": {"weights_path": str(res.path)}}
    assert res.path == tmp_path / "w" / "v1" and (res.path / "config.json").is_file()
    assert res.version == 1 and res.served_model == "policy" and res.cache_reset is True
    assert pub.registry.current_version() == 1 and seen == [res]
    assert pub.server_version() == 1
    with pytest.raises(ValueError, match="not newer"):
        pub.publish(1, state_dict=_sd())


def test_full_reload_failure_resumes_marks_unknown_and_keeps_registry(tmp_path, fake, base_model) -> None:
    pub = WeightPublisher(FullReloadTransport(base_model), tmp_path / "w", [fake.url])
    fake.fail.add("/collective_rpc")
    with pytest.raises(WeightPushError, match="HTTP 500"):
        pub.publish(1, state_dict=_sd())
    assert fake.paths()[-1] == "/resume"  # resumed in the finally
    assert fake.weight_version == "unknown"
    assert pub.registry.current() is None
    assert pub.server_version() is None


def test_server_that_does_not_confirm_is_an_error(tmp_path, fake, base_model) -> None:
    pub = WeightPublisher(FullReloadTransport(base_model), tmp_path / "w", [fake.url])
    fake.fail.add("/update_weight_version")
    with pytest.raises(WeightPushError):
        pub.publish(1, state_dict=_sd())
    assert pub.registry.current() is None


def test_restarted_server_is_stale_until_refit(tmp_path, fake, base_model) -> None:
    t = FullReloadTransport(base_model)
    pub = WeightPublisher(t, tmp_path / "w", [fake.url])
    pub.publish(1, state_dict=_sd())
    pub.publish(2, state_dict=_sd(2.0))
    fake.weight_version = "default"  # restart: the engine forgot
    reg = VersionRegistry(tmp_path / "w")
    with pytest.raises(StaleServerError):
        require_current(fake.url, reg, t)
    fake.calls.clear()
    assert ensure_current(fake.url, reg, t) is True
    assert fake.calls[2]["body"]["kwargs"]["weights_path"] == str(tmp_path / "w" / "v2")
    assert require_current(fake.url, reg, t) == 2
    fake.calls.clear()
    assert ensure_current(fake.url, reg, t) is True  # already current: only the query
    assert fake.paths() == ["/weight_info"]


def test_prune_keeps_last_versions(tmp_path, fake, base_model) -> None:
    pub = WeightPublisher(FullReloadTransport(base_model), tmp_path / "w", [fake.url], keep_last=2)
    for v in range(1, 5):
        pub.publish(v, state_dict=_sd(v))
    assert _visible(tmp_path / "w") == ["v3", "v4", "versions.json"]


# ---------------------------------------------------------------- LoRA protocol


def _adapter(d: Path) -> Path:
    from safetensors.torch import save_file

    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text('{"r": 4}')
    save_file({"base_model.model.x.lora_A.weight": torch.zeros(4, 8)}, str(d / "adapter_model.safetensors"))
    return d


def test_lora_publish_loads_in_place_and_reads_version_back(tmp_path, fake) -> None:
    pub = WeightPublisher(LoRATransport(), tmp_path / "w", [fake.url])
    assert pub.server_version() == 0 and pub.served_model(0) == "policy"
    for v in (1, 2):
        res = pub.publish(v, adapter_dir=_adapter(tmp_path / f"a{v}"))
        assert res.path == tmp_path / "w" / f"lora-v{v}" and res.served_model == "policy-lora"
        load = [c for c in fake.calls if c["path"] == "/v1/load_lora_adapter"][-1]
        assert load["body"] == {"lora_name": "policy-lora", "lora_path": str(res.path), "load_inplace": True}
        assert pub.server_version() == v
    fake.lora.clear()  # restart: adapter gone
    assert pub.server_version() == 0
    assert pub.refit(fake.url) is True and pub.server_version() == 2


def test_lora_rejects_incomplete_adapter_dir(tmp_path, fake) -> None:
    pub = WeightPublisher(LoRATransport(), tmp_path / "w", [fake.url])
    (tmp_path / "a").mkdir()
    with pytest.raises(WeightPushError, match="adapter_config.json"):
        pub.publish(1, adapter_dir=tmp_path / "a")
    assert fake.calls == [] and _visible(tmp_path / "w") == []


# ---------------------------------------------------------------- admin safety, config


def test_non_loopback_needs_token_and_token_is_sent(tmp_path, fake, base_model) -> None:
    with pytest.raises(WeightPushError, match="non-loopback"):
        AdminClient("http://10.1.2.3:8000")
    with pytest.raises(WeightPushError, match="non-loopback"):
        WeightPublisher(LoRATransport(), tmp_path / "w", ["http://example.org:8000/v1"])
    AdminClient("http://10.1.2.3:8000", token="t").close()  # allowed with a token
    pub = WeightPublisher(FullReloadTransport(base_model), tmp_path / "w", [fake.url], token="s3cret")
    pub.publish(1, state_dict=_sd())
    assert {c["auth"] for c in fake.calls} == {"Bearer s3cret"}


def test_from_config_reads_transport_and_token(tmp_path, fake, monkeypatch) -> None:
    from gopo_online.config import ServingConfig

    monkeypatch.setenv("MY_ADMIN_TOKEN", "tok")
    pub = WeightPublisher.from_config(
        ServingConfig(weight_transport="lora", admin_token_env="MY_ADMIN_TOKEN"),
        weights_root=tmp_path / "w",
        servers=[fake.url],
    )
    assert isinstance(pub.transport, LoRATransport) and pub.token == "tok"


def test_nccl_is_a_documented_stub() -> None:
    with pytest.raises(NotImplementedError, match="CUDA GPU"):
        NCCLTransport()
    with pytest.raises(NotImplementedError):
        make_transport("nccl")
