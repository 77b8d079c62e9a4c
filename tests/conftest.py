"""Shared fixtures."""

import pytest
import torch


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
