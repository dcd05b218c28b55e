"""Builds tokencarve_kernels._C: the op schemas, CPU kernels always, CUDA kernels when torch has CUDA.

Build with `pip install --no-build-isolation -e .` (setup.py imports the torch already installed).
TORCH_CUDA_ARCH_LIST is honoured; without it the CUDA kernels are built for sm_80 and sm_90.
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))

# No fused multiply-add: fused scores and dot products round the same way on every machine (see
# csrc/cpu/select.cpp and merge.cpp). tests/test_cuda_build.py compiles csrc/cuda/*.cu with NVCC_FLAGS.
CXX_FLAGS = ["-O3", "-std=c++20", "-ffp-contract=off", "-DTOKENCARVE_PYTHON_MODULE"]
NVCC_FLAGS = ["-O3", "-std=c++20", "--fmad=false", "--expt-relaxed-constexpr", "-DTOKENCARVE_WITH_CUDA"]


def sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def extension():
    cpu_sources = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("TOKENCARVE_NO_CUDA") != "1"
    if not with_cuda:
        return CppExtension("tokencarve_kernels._C", cpu_sources, extra_compile_args={"cxx": CXX_FLAGS})
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    return CUDAExtension(
        "tokencarve_kernels._C",
        cpu_sources + sources("csrc/cuda/*.cpp") + sources("csrc/cuda/*.cu"),
        extra_compile_args={"cxx": CXX_FLAGS + ["-DTOKENCARVE_WITH_CUDA"], "nvcc": NVCC_FLAGS},
    )


setup(
    # python_ref ships too: it is the spec, and TOKENCARVE_BACKEND=ref runs it.
    packages=find_packages(include=["tokencarve_kernels", "tokencarve_kernels.*", "python_ref"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
