"""Shared pytest set-up: the repository root on sys.path, so tests import the scripts as modules."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's model runs (`pytestmark = usefixtures(...)`): the tiny
    models' ops are too small to gain from threads, and OpenMP threads waiting on a core busy
    with other work stall."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
