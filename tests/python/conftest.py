import pytest
import torch

import reslora  # noqa: F401  (registers torch.ops.reslora)

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
