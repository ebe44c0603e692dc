"""Every kernel test runs with the CPU as its default device (the CPU paths' tolerances must hold
on a GPU machine too); the CUDA kernel's own test puts its run on the GPU with ``mx.stream``."""

import mlx.core as mx
import pytest


@pytest.fixture(autouse=True)
def _cpu_default_device():
    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(previous)
