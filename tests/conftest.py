import os
import sys

import numpy as np
import pytest

# Test helpers (the einsum oracle) live beside the tests; importlib import mode does not put
# this folder on sys.path by itself.
sys.path.insert(0, os.path.dirname(__file__))

import linmaps


def pytest_report_header(config):
    cfg = linmaps._config.config()
    lines = [
        f"linmaps {cfg['linmaps']} from {os.path.dirname(linmaps.__file__)}",
        f"numpy {np.__version__}; backend {cfg['backend']}; "
        f"available {cfg['available_backends']}; threads {cfg['num_threads']}",
    ]
    if cfg["compiled"] == "yes":
        lines.append(
            f"_core: Eigen {cfg['eigen']}, {cfg['compiler']}, SIMD {cfg['simd']}, "
            f"flags '{cfg['cxx_flags']}'"
        )
    else:
        lines.append(f"_core: {cfg['compiled']}")
    return lines


@pytest.fixture(params=["python", "cpp"])
def backend(request):
    """Run the test once per backend, with that backend active."""
    if request.param not in linmaps.available_backends():
        pytest.skip("the compiled backend is not available")
    with linmaps.use_backend(request.param):
        yield request.param
