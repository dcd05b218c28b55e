"""The devices the op tests run on: the CPU always, CUDA when a GPU is present (skipped with the reason if not)."""

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is available")

# Parametrize a test with `@pytest.mark.parametrize("device", DEVICES)`: identical checks on every device.
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=requires_cuda)]

requires_two_cuda = pytest.mark.skipif(torch.cuda.device_count() < 2,
                                       reason="needs two CUDA devices (inputs on cuda:1, cuda:0 current)")

# Where the Triton kernels run: the GPU when there is one, else the CPU through the interpreter (conftest.py).
# References stay on the CPU.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
