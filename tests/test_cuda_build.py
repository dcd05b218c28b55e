"""The CUDA sources compile, on machines with nvcc, whatever torch is installed.

With a CPU torch, setup.py builds no CUDA code (CUDAExtension refuses), so CUDA code that does not compile
could land unnoticed. Here every csrc/cuda/*.cu is compiled by nvcc (compile only, no link) for sm_80 and
sm_90 in one call per file (host code parsed once), files in parallel, with setup.py's nvcc flags and the
flags torch's BuildExtension adds; and csrc/ops.cpp, whose CUDA registration block only exists under
TOKENCARVE_WITH_CUDA, is compiled by the host compiler with that macro. A CPU wheel of torch lacks one
generated header (c10/cuda/impl/cuda_cmake_macros.h); a one-line stand-in is written to a temporary folder.
About a minute of CPU per .cu file.
"""

import ast
import concurrent.futures
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from tests import ROOT
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCHS = ("80", "90")


def _setup_flags(name: str) -> list[str]:
    """A list of flags assigned at the top of setup.py (read, not imported: importing runs setup())."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py defines no {name}")


def _include_flags(shim: Path) -> list[str]:
    shim_header = shim / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    shim_header.parent.mkdir(parents=True, exist_ok=True)
    shim_header.write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    # The shim goes last: a CUDA torch's own generated header wins where it exists.
    return [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{shim}"]


def _run(command: list[str]) -> tuple[int, str]:
    done = subprocess.run(command, capture_output=True, text=True)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_every_cu_file_compiles_for_sm80_and_sm90(tmp_path):
    assert CUDA_SOURCES, "csrc/cuda holds no .cu file"
    flags = _setup_flags("NVCC_FLAGS") + cpp_extension.COMMON_NVCC_FLAGS + _include_flags(tmp_path / "shim")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    commands = {src.name: ["nvcc", "-c", str(src), "-o", str(tmp_path / f"{src.stem}.o"), *flags, *gencode]
                for src in CUDA_SOURCES}
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = dict(zip(commands, pool.map(_run, commands.values())))
    failed = {name: log for name, (code, log) in results.items() if code != 0}
    assert not failed, "\n\n".join(f"{name} does not compile:\n{log[-6000:]}" for name, log in failed.items())


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_cuda_registration_block_compiles(tmp_path):
    flags = [f for f in _setup_flags("CXX_FLAGS") if f != "-DTOKENCARVE_PYTHON_MODULE"]
    code, log = _run(["c++", "-fsyntax-only", "-DTOKENCARVE_WITH_CUDA", *flags, *_include_flags(tmp_path / "shim"),
                      str(ROOT / "csrc" / "ops.cpp")])
    assert code == 0, log[-6000:]
