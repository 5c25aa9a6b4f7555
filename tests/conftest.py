"""Suite-wide settings."""

import os
import socket

import pytest
from hypothesis import HealthCheck, settings

# CI shares 2 cores with vLLM servers and a learner: per-example wall-clock deadlines would fail on load, not on bugs.
settings.register_profile("gopo", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("gopo")


@pytest.fixture
def redis_url() -> str:
    """The running Redis the broker tests share (GOPO_TEST_REDIS_URL); CI must have it, elsewhere a skip."""
    url = os.environ.get("GOPO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    host, port = url.split("://")[1].split("/")[0].rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1.0).close()
    except OSError:
        msg = f"redis not reachable at {host}:{port}"
        pytest.fail(msg) if os.environ.get("CI") else pytest.skip(msg)
    return url


@pytest.fixture(scope="session")
def policy_server(tmp_path_factory):
    """ONE real vLLM server with the default model and default flags, shared by the integration modules that need
    no special flags (serving, stress, prompt injection): each starting its own cost ~40 s of the suite's budget.
    Modules that need other flags (LoRA hot-load, a run's adapters, a whole `train`) still start their own."""
    from gopo_online.models import default_model_dir, is_prepared
    from gopo_online.serving.process import VLLMServer

    model = default_model_dir()
    if not is_prepared(model):
        pytest.fail(f"default model not prepared at {model}: run `gopo-online model prepare`")
    log = tmp_path_factory.mktemp("vllm") / "policy.log"
    with VLLMServer(model, served_name="policy", log_path=log, startup_timeout_s=400) as srv:
        print(f"\n[vllm] shared policy server ready in {srv.ready_s:.1f}s at {srv.base_url}")
        yield srv
    assert not srv.running


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """The default architecture cut to ~6.6 M random parameters (gopo_online.models.prepare_tiny_model), built in a
    few seconds from the prepared default model's config and tokenizer. For the tests of the machinery whose
    outcome must not depend on what a model writes (the cluster layout, eval, learner steps, weight pushes): vLLM, LoRA
    pushes and DeepSpeed run for real on it, ~20x cheaper per token than the 135M model."""
    from gopo_online.models import default_model_dir, is_prepared, prepare_tiny_model

    if not is_prepared(default_model_dir()):
        pytest.fail(f"default model not prepared at {default_model_dir()}: run `gopo-online model prepare`")
    return str(prepare_tiny_model())
