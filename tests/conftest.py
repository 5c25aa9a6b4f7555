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
