"""Lets PyPI's torchvision wheel import beside the CPU torch in .venv-vllm (test environment only).

vLLM's LLaVA module imports transformers' Pixtral image processor, which imports torchvision. The only
torchvision this machine can install is PyPI's CUDA build; its C++ ops cannot load beside a CPU torch.
torchvision then runs without ops (`torchvision.extension._has_ops()` is False), except that its
`_meta_registrations` registers fake kernels for `torchvision::nms` and `torchvision::qnms` without that
guard and fails because the ops do not exist. Declaring the two schemas first is enough; nothing calls
them (LLaVA-1.5's CLIP preprocessing never uses torchvision ops). Deployments install the CPU
torchvision from PyTorch's own index instead and need none of this (with a torchvision whose ops load,
this file would clash with them: it belongs to .venv-vllm's tests only).

The tests put this directory on PYTHONPATH, so every process vLLM spawns runs this at start-up. The
schemas are declared only when torchvision is first imported, so processes that never import it do not
pay for importing torch.
"""

import importlib.abc
import sys

_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


class _DeclareTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            import torch

            for op in ("nms", "qnms"):
                torch.library.define(f"torchvision::{op}", _SCHEMA)
        return None  # the normal import machinery finds torchvision itself


sys.meta_path.insert(0, _DeclareTorchvisionOps())
