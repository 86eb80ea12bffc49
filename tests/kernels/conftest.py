"""Kernel tests run single-threaded (as vLLM runs the model on CPU): on a shared 2-core machine a
second OpenMP thread makes every small call wait for a descheduled thread. test_cpu_kernel has one
test that runs with two threads on purpose."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
