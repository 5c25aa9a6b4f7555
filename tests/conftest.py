"""Suite-wide settings."""

from hypothesis import HealthCheck, settings

# CI shares 2 cores with vLLM servers and a learner: per-example wall-clock deadlines would fail on load, not on bugs.
settings.register_profile("gopo", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("gopo")
