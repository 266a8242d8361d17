import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks: one intra-op thread is faster, and much faster on a shared, loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
