# Root conftest: the Triton interpreter must be chosen before any @triton.jit function is defined, and
# the machines that run CI have no GPU, so Triton kernels run interpreted on CPU tensors unless a GPU is here.
import os

try:
    import torch

    _has_gpu = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _has_gpu = False
if not _has_gpu:
    os.environ.setdefault("TRITON_INTERPRET", "1")
