"""securevault's test suite: runs under trial and under pytest."""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "securevault",
    deadline=None,
    derandomize=True,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("securevault")
