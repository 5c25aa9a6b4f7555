"""VLLMServer command line, environment and guards (no server started here)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gopo_online.config import GopoConfig
from gopo_online.procutil import die_with_parent
from gopo_online.serving.process import _PARENT_DEATH_SIGNAL, ServerError, VLLMServer, free_port, server_from_config


def test_cpu_command_and_env():
    s = VLLMServer(Path("/m"), port=1234, device="cpu", kv_cache_gb=2.0, served_name="pol")
    cmd = s.command()
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--port") + 1] == "1234" and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert "--enforce-eager" in cmd and "--gpu-memory-utilization" not in cmd and "--enable-lora" not in cmd
    env = s.environment()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and "VLLM_SERVER_DEV_MODE" not in env
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind" and env["HF_HUB_OFFLINE"] == "1"
    custom = VLLMServer(Path("/m"), port=1, device="cpu", env={"VLLM_CPU_OMP_THREADS_BIND": "0"}).environment()
    assert custom["VLLM_CPU_OMP_THREADS_BIND"] == "0"  # explicit env wins
    assert s.base_url == "http://127.0.0.1:1234/v1" and s.root_url == "http://127.0.0.1:1234"


def test_gpu_lora_dev_flags():
    s = VLLMServer(Path("/m"), port=1, device="gpu", enable_lora=True, max_lora_rank=8, dev_mode=True)
    cmd = s.command()
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.4"
    assert cmd[cmd.index("--max-lora-rank") + 1] == "8" and "--enable-lora" in cmd
    env = s.environment()
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and env["VLLM_SERVER_DEV_MODE"] == "1"


def test_admin_endpoints_refused_beyond_loopback_without_token():
    with pytest.raises(ServerError, match="admin token"):
        VLLMServer(Path("/m"), host="0.0.0.0", dev_mode=True)
    s = VLLMServer(Path("/m"), host="0.0.0.0", port=5, dev_mode=True, admin_token="t0k")
    assert s.command()[-2:] == ["--api-key", "t0k"]
    assert s.root_url == "http://127.0.0.1:5"  # connect to loopback, not to the bind-all address


def test_free_port_is_bindable():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_unstarted_server_is_safe():
    s = VLLMServer(Path("/m"))
    assert not s.running and not s.is_healthy() and s.log_tail() == ""
    s.stop()  # idempotent, nothing to stop
    with pytest.raises(ServerError, match="no port"):
        _ = s.base_url


def test_server_from_config(tmp_path, monkeypatch):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    monkeypatch.delenv("GOPO_ADMIN_TOKEN", raising=False)
    cfg = GopoConfig.model_validate({"model": {"path": str(model)}, "run": {"output_dir": str(tmp_path)}})
    s = server_from_config(cfg)
    assert s.enable_lora and not s.dev_mode  # default weight transport: LoRA hot-load
    assert s.log_path == tmp_path / "gopo" / "logs" / "vllm-policy.log"
    # a full-reload policy server (dev mode) is no config the loop accepts: the validator says why
    with pytest.raises(ValueError, match="cannot run in the training loop"):
        GopoConfig.model_validate(
            {
                "model": {"path": str(model)},
                "serving": {"weight_transport": "full", "simulator": "separate", "policy": {"port": 8123}},
                "learner": {"finetune": "full"},
            }
        )
    cfg = GopoConfig.model_validate(
        {"model": {"path": str(model)}, "serving": {"simulator": "separate", "policy": {"port": 8123}}}
    )
    assert server_from_config(cfg).port == 8123
    sim = server_from_config(cfg, "simulator")
    assert not sim.dev_mode and not sim.enable_lora
    cfg = GopoConfig.model_validate({"model": {"path": str(model)}})
    with pytest.raises(ValueError, match="no separate"):
        server_from_config(cfg, "simulator")


def test_serve_start_listens_on_the_port_its_url_names(tmp_path, monkeypatch):
    """`serve --start policy` (the cluster layout, gopo_online/layout.py): serving.policy.url is how the other parts
    reach the server, so the server started here binds that port; a contradicting port is a clear error."""
    from gopo_online.config import ConfigError
    from gopo_online.serving.process import _bind_to_url

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    monkeypatch.delenv("GOPO_ADMIN_TOKEN", raising=False)
    base = {"model": {"path": str(model)}, "run": {"output_dir": str(tmp_path)}}
    cfg = GopoConfig.model_validate({**base, "serving": {"policy": {"url": "http://127.0.0.1:8811"}}})
    bound = _bind_to_url(cfg, "policy")
    assert server_from_config(bound).port == 8811 and bound.serving.policy.url == "http://127.0.0.1:8811"
    assert cfg.serving.policy.port is None  # the loaded config is not rewritten
    same = GopoConfig.model_validate({**base, "serving": {"policy": {"url": "http://h:8811", "port": 8811}}})
    assert _bind_to_url(same, "policy").serving.policy.port == 8811
    clash = GopoConfig.model_validate({**base, "serving": {"policy": {"url": "http://h:8811", "port": 9000}}})
    with pytest.raises(ConfigError, match=r"serving.policy.port = 9000 but serving.policy.url"):
        _bind_to_url(clash, "policy")
    with pytest.raises(ConfigError, match="names no port"):
        _bind_to_url(GopoConfig.model_validate({**base, "serving": {"policy": {"url": "http://h"}}}), "policy")


def test_serve_rejects_an_unknown_start_name():
    proc = subprocess.run([sys.executable, "-m", "gopo_online.cli", "serve", "--start", "judge"], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "--start takes policy or simulator" in proc.stderr, proc.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux only")
def test_children_are_armed_to_die_with_the_parent():
    # The child reads its own parent-death signal back (PR_GET_PDEATHSIG = 2).
    code = "import ctypes; v = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(v)); print(v.value)"
    out = subprocess.run(
        [sys.executable, "-c", code], preexec_fn=die_with_parent(_PARENT_DEATH_SIGNAL), capture_output=True, text=True
    )
    assert out.stdout.strip() == str(int(signal.SIGKILL))
