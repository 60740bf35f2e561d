import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
