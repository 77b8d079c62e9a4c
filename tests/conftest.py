"""Shared fixtures, and one torch thread per test process.

The suite runs on two pytest-xdist workers (pyproject.toml), one per core of the machine it is sized
for: with torch's default of a thread per core each, four threads would share two cores, and the
small ops of these tests wait on each other's threads. The processes the tests start inherit the
environment variables.
"""

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture
def one_thread():
    """Run the test on one torch thread: bit-exact comparisons need the same thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def images():
    """Three random 3x16x16 images (the adapter tests' tiny models: patch 4, 16 patches)."""
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(7))
