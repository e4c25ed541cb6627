import pytest
import torch

import reslora  # noqa: F401  (registers torch.ops.reslora)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
