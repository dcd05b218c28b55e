"""Which implementation runs behind `torch.ops.tokencarve.*` (the TOKENCARVE_BACKEND switch).

  auto    (default) CPU tensors: the C++ kernels of csrc/cpu; CUDA tensors: the Triton score kernels
          (tokencarve_kernels/triton, registered at import when triton imports and CUDA is available)
          and the CUDA kernels of csrc/cuda.
  ref     every stage op on every device runs python_ref (float64, slow): to rule the kernels out.
  triton  the Triton kernels of the two scores (info_scores, last_query_attention, last_query_attention_varlen)
          on every device: CPU tensors run them in the Triton interpreter (TRITON_INTERPRET=1, set before
          the import), which is how CI tests them without a GPU. The other ops keep their `auto` kernels.

`carve`, `carve_varlen` and `gather_kv` are composed in C++ from other ops through the dispatcher, so
they follow the backend of their stages. The switch is read once at import from the environment; `use_backend` switches for a block of
code (it registers Python kernels over the C++ ones and removes them on exit).
"""

import contextlib
import os
import warnings

import torch

import python_ref

from . import _C  # noqa: F401

BACKENDS = ("auto", "ref", "triton")
_STAGE_OPS = ("info_scores", "last_query_attention", "last_query_attention_varlen", "select", "merge")


def _same_device(op_name: str, args: tuple) -> None:
    devices = {a.device for a in args if isinstance(a, torch.Tensor)}
    if len(devices) > 1:
        raise ValueError(f"tokencarve::{op_name}: all tensor arguments must be on the same device, got {sorted(map(str, devices))}")


def _checked(op_name: str, fn):
    """fn behind the same argument checks as the C++ kernels (they run on meta copies: no data, no sync)."""
    meta_op = getattr(torch.ops.tokencarve, op_name).default

    def kernel(*args, **kwargs):
        _same_device(op_name, args + tuple(kwargs.values()))
        meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        meta_op(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args], **meta)
        return fn(*args, **kwargs)

    return kernel


_REFERENCE = {
    # Callers through the dispatcher may leave out arguments that equal the schema's defaults.
    "info_scores": lambda hidden, rank=0, seed=0: python_ref.info_scores(hidden, rank=rank, seed=seed),
    "last_query_attention": python_ref.last_query_attention,
    "last_query_attention_varlen": python_ref.last_query_attention_varlen,
    "select": python_ref.select,
    "merge": python_ref.merge,
}


def _triton_kernels() -> dict:
    try:
        from . import triton as kernels
    except ImportError as exc:
        raise ImportError(f"tokencarve: the triton backend needs the triton package ({exc})") from exc
    return {
        "info_scores": kernels.info_scores,
        "last_query_attention": kernels.last_query_attention,
        "last_query_attention_varlen": kernels.last_query_attention_varlen,
    }


def _impl(kernels: dict, keys: tuple[str, ...]) -> torch.library.Library:
    lib = torch.library.Library("tokencarve", "IMPL")
    with warnings.catch_warnings():  # "Overriding a previously registered kernel": that is the point
        warnings.simplefilter("ignore", UserWarning)
        for op_name, fn in kernels.items():
            for key in keys:
                lib.impl(op_name, _checked(op_name, fn), key)
    return lib


def _register(name: str) -> torch.library.Library | None:
    if name not in BACKENDS:
        raise ValueError(f"TOKENCARVE_BACKEND must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        return None
    if name == "triton":
        return _impl(_triton_kernels(), ("CPU", "CUDA"))
    return _impl({op_name: _REFERENCE[op_name] for op_name in _STAGE_OPS}, ("CPU", "CUDA"))


def _register_cuda_scores() -> torch.library.Library | None:
    """The Triton score kernels as the CUDA kernels of `auto`, when triton imports and a GPU is there."""
    if not torch.cuda.is_available():
        return None
    try:
        return _impl(_triton_kernels(), ("CUDA",))
    except ImportError:
        return None  # no triton: the score ops have no CUDA kernel (the ref backend still works)


@contextlib.contextmanager
def use_backend(name: str):
    """Run the block with backend `name` ("auto", "ref" or "triton"), then restore what was registered before."""
    lib = _register(name)
    try:
        yield
    finally:
        if lib is not None:
            lib._destroy()


# Held for the life of the process: auto's CUDA score kernels, then the backend the environment asks for
# (registered later, so it wins).
_cuda_scores = _register_cuda_scores()
_from_env = _register(os.environ.get("TOKENCARVE_BACKEND", "auto"))
