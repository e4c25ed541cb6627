import os

import pytest
import torch

import reslora  # noqa: F401  (registers torch.ops.reslora)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under xdist the workers share the cores: each takes its share of intra-op threads instead
    # of every worker taking all of them (oversubscribed, the suite ran no faster than serially).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def pytest_collection_modifyitems(config, items):
    # The markers are registered in pyproject.toml; gpu is also the one rule for skipping.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
