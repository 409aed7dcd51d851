import logging
import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on the CPU (before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import autodeploy  # noqa: E402,F401

# two threads (the CI machine's cores) unless OMP_NUM_THREADS says otherwise (the fuzz script runs
# one single-threaded process per core: two threads per process there wait on each other's cores)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped elsewhere)")
    config.addinivalue_line("markers", "slow: longer runs, opt-in")


@pytest.fixture(autouse=True)
def _quiet_transformers():
    logging.getLogger("transformers").setLevel(logging.ERROR)
    yield
