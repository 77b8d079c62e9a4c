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
