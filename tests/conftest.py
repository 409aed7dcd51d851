import logging
import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on the CPU (before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import autodeploy  # noqa: E402,F401

torch.set_num_threads(2)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped elsewhere)")
    config.addinivalue_line("markers", "slow: longer runs, opt-in")


@pytest.fixture(autouse=True)
def _quiet_transformers():
    logging.getLogger("transformers").setLevel(logging.ERROR)
    yield
