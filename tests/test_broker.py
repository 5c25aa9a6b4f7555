"""The embedded broker: a real redis-server child process, loopback only, persistent, dies with its parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from gopo_online.broker import BrokerError, EmbeddedRedis, broker_url, redis_server_path
from gopo_online.config import BrokerConfig, GopoConfig, RunConfig

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def _listening(pid: int) -> list[tuple[str, int]]:
    return [(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN]  # fmt: skip


def test_binary_is_redis_6_2() -> None:
    out = subprocess.run([str(redis_server_path()), "--version"], capture_output=True, text=True, timeout=10)
    assert "v=6.2" in out.stdout


def test_start_ping_loopback_only_stop(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "broker") as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        client = server.client()
        assert client.ping()
        cfg = client.config_get("*")
        assert cfg["appendonly"] == "yes" and cfg["protected-mode"] == "yes" and cfg["bind"] == "127.0.0.1"
        listening = _listening(server.pid)  # type: ignore[arg-type]
        assert listening and all(ip == "127.0.0.1" for ip, _ in listening), listening
        pid = server.pid
        client.close()
    assert not server.running
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # type: ignore[arg-type]


def test_queued_data_survives_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "broker"
    with EmbeddedRedis(data) as server:
        server.client().lpush("q", b"trajectory-1")
        port = server.port
    assert (data / "gopo.aof").stat().st_size > 0
    with EmbeddedRedis(data, port=port) as server:
        assert server.client().lrange("q", 0, -1) == [b"trajectory-1"]


def test_two_servers_cannot_share_a_data_dir(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as _, pytest.raises(BrokerError, match="already uses"):
        EmbeddedRedis(tmp_path).start()


def test_dies_with_its_parent(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import time
        from gopo_online.broker import EmbeddedRedis
        s = EmbeddedRedis({str(tmp_path)!r}).start()
        print(s.pid, flush=True)
        time.sleep(60)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = parent.stdout.readline()  # type: ignore[union-attr]
        redis_pid = int(line)
        assert psutil.pid_exists(redis_pid)
        parent.send_signal(signal.SIGKILL)  # no atexit, no cleanup: only the kernel's parent-death signal
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while psutil.pid_exists(redis_pid) and time.monotonic() < deadline:
            try:
                if psutil.Process(redis_pid).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
        alive = psutil.pid_exists(redis_pid) and psutil.Process(redis_pid).status() != psutil.STATUS_ZOMBIE
        assert not alive, "redis-server outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=10)


def test_broker_url_from_config(tmp_path: Path) -> None:
    cfg = GopoConfig(broker=BrokerConfig(url="amqp://guest:guest@127.0.0.1:5672//"))
    assert broker_url(cfg) == ("amqp://guest:guest@127.0.0.1:5672//", None)
    cfg = GopoConfig(run=RunConfig(output_dir=tmp_path, name="run"))
    url, server = broker_url(cfg)
    assert server is not None
    try:
        assert url == server.url and server.client().ping()
        assert server.data_dir == tmp_path / "run" / "broker"
    finally:
        server.stop()
