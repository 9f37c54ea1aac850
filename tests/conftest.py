"""Shared fixtures: GPU skipping, seeded random inputs, NaN-poisoned outputs, dtype tolerances."""

from __future__ import annotations

import zlib

import pytest
import torch

HAS_GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False); run scripts/gpu_ci.sh on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    # A different seed per test (from its id) so that no two tests share inputs, yet reruns reproduce.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))




@pytest.fixture
def fake_cuda():
    """Fake CUDA tensors (metadata only, no GPU needed): for tests of validation that raises before any launch.
    Create the tensors inside the test, after this fixture is active."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        yield
