"""Session-wide test settings.

Triton kernels run through Triton's interpreter on machines without a GPU. ``TRITON_INTERPRET`` is
read when ``triton.jit`` decorates a kernel, so it must be set before any test imports
``speedasr.kernels``: here, before collection starts.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def one_thread():
    """Tests use tiny tensors: extra intra-op threads only add overhead and contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
