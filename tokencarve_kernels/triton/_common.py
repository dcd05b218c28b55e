"""What the Triton kernels share: whether the interpreter runs them, the device check and the device guard."""

import contextlib
import os

import torch

# Read once, as Triton itself does when it decorates the kernels (TRITON_INTERPRET must be set before).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def check_device(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"tokencarve: the Triton kernels need CUDA tensors (got {t.device}); on the CPU they run only under the "
            "Triton interpreter (TRITON_INTERPRET=1 set before importing tokencarve_kernels)")


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Makes t's CUDA device current for the block: Triton launches on the current device and its current stream,
    not on the device of the tensors it is given (inputs on cuda:1 while cuda:0 is current would run on the wrong
    device). A no-op for CPU tensors (the interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
