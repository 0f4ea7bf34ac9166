import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # Restored by the root conftest. Small models on a busy 2-core machine crawl
    # when torch's threads wait on each other.
    torch.set_num_threads(1)
