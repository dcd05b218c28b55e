"""The library builds for C++ users too: CMakeLists.txt with find_package(Torch) registers the same ops."""

import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from tests import ROOT


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_build_registers_the_ops(tmp_path):
    build = tmp_path / "build"
    subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
        check=True, capture_output=True,
    )
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True)
    library = build / "libtokencarve_ops.so"
    # A fresh interpreter: this one already holds the ops from tokencarve_kernels._C.
    script = textwrap.dedent(f"""
        import torch
        torch.ops.load_library({str(library)!r})
        hidden, attn = torch.randn(2, 12, 6), torch.rand(2, 12)
        carved, keep_idx = torch.ops.tokencarve.carve(hidden, attn, 4)
        assert carved.shape == (2, 4, 6) and keep_idx.shape == (2, 4)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "ok"
