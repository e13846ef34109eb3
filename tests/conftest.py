"""Shared fixtures."""
import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):      # `pytest -n K`: K test processes share the cores, one thread each
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tensors in these tests are small: intra-op threads only spin against each other on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
