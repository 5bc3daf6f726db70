"""A real local Ray for the transport tests: one per test module, torn down after it."""

from pathlib import Path

import pytest
import ray

# The peer actor lives in tests/transport/peers.py; Ray's workers must be able to import it by name.
_HERE = str(Path(__file__).resolve().parent)


@pytest.fixture(scope="module")
def ray_local():
    # Four logical CPUs on a 2-core machine: the peers ask for none, so the number only bounds Ray itself.
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": _HERE}},
    )
    yield
    ray.shutdown()
