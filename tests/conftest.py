import os
import tempfile

from hypothesis import HealthCheck, settings

# CI runs on 2 cores within a fixed budget: fewer examples, no per-example deadline (the
# first call of a torch op can be slow). Locally: HYPOTHESIS_PROFILE=dev for more examples.
settings.register_profile("ci", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The expert FFN's tuner caches choices under the user's cache directory: tests (and the
# processes they start) tune into a directory of their own instead.
os.environ.setdefault("DEEPSEEK_RS_CACHE_DIR", tempfile.mkdtemp(prefix="deepseek-rs-tuning-"))
