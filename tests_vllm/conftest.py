"""The vLLM tests' environment: run only in .venv-vllm (`make test-vllm`), never by the main suite.

Set before vLLM is imported, and inherited by every process vLLM spawns: a small KV cache for the CPU,
pickled functions for `LLM.apply_model` (the tests read what the carve saw inside the worker), and
site/ on PYTHONPATH (see site/sitecustomize.py: why torchvision needs two op schemas here).
"""

import os
import sys

import pytest

SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "site")

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
if SITE not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (SITE, os.environ.get("PYTHONPATH")) if p)
    sys.path.insert(0, SITE)
    import sitecustomize  # noqa: F401,E402  (this process started before PYTHONPATH had it)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """The tiny random-weight LLaVA-1.5 every vLLM test serves or builds (tiny_llava.py), saved once."""
    from tests_vllm.tiny_llava import save_tiny_llava

    return save_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))
