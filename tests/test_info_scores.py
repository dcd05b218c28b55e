"""info_scores: the reference's exact and randomized paths against the definition, then the op."""

import ctypes
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

import python_ref
import tokencarve_kernels as tk
from tests import ROOT
from tests.devices import TRITON_DEVICE, requires_two_cuda
from tests.inputs import attention_scores, hidden_states, rel_err
from tests.test_cuda_build import _setup_flags

SHAPES = [(1, 1, 8), (3, 7, 5), (2, 64, 33), (2, 40, 96), (1, 130, 24)]  # Nv < D, Nv > D, Nv = 1


def _svd64(hidden):
    return python_ref.info_scores_svd(hidden.double())


# ---- the reference against the definition ----

@pytest.mark.parametrize("batch, nv, dim", SHAPES, ids=lambda v: str(v))
def test_gram_path_equals_fp64_svd(batch, nv, dim):
    hidden = hidden_states(batch, nv, dim, seed=nv + dim, dtype=torch.float64)
    assert rel_err(python_ref.info_scores_gram(hidden), _svd64(hidden)) < 1e-6


def test_exact_paths_select_what_fp64_svd_selects():
    # A decaying spectrum squares badly in a Gram matrix; computed in float64 the selection must not move.
    hidden = hidden_states(2, 576, 1024, seed=11, decay=7.0)
    attn = attention_scores(2, 576, seed=11)
    ref = python_ref.select(attn, _svd64(hidden).float(), 128)
    assert torch.equal(python_ref.select(attn, python_ref.info_scores_gram(hidden).float(), 128), ref)
    assert torch.equal(python_ref.select(attn, tk.info_scores(hidden), 128), ref)


def test_authors_baseline_is_the_same_score():
    hidden = hidden_states(1, 50, 80, seed=2, decay=2.0)
    assert rel_err(python_ref.authors_info_scores(hidden), _svd64(hidden)) < 1e-4


@pytest.mark.parametrize("batch, nv, dim", [(2, 40, 24), (1, 24, 40), (1, 33, 33)], ids=lambda v: str(v))
def test_randomized_becomes_exact_at_full_rank(batch, nv, dim):
    hidden = hidden_states(batch, nv, dim, seed=3, dtype=torch.float64)
    full = python_ref.info_scores_randomized(hidden, rank=min(nv, dim), seed=5)
    assert rel_err(full, _svd64(hidden)) < 1e-6
    partial = python_ref.info_scores_randomized(hidden, rank=min(nv, dim) // 4, seed=5)
    assert rel_err(partial, _svd64(hidden)) > 1e-3  # a true approximation below full rank


def test_randomized_seed_is_deterministic_and_matters():
    hidden = hidden_states(2, 96, 64, seed=4)
    a = python_ref.info_scores(hidden, rank=8, seed=1)
    assert torch.equal(a, python_ref.info_scores(hidden, rank=8, seed=1))
    assert not torch.equal(a, python_ref.info_scores(hidden, rank=8, seed=2))
    assert not torch.equal(python_ref.gaussian_sketch(1, 64, 24), python_ref.gaussian_sketch(2, 64, 24))


def test_gaussian_sketch_is_standard_normal():
    omega = python_ref.gaussian_sketch(123, 256, 64).double()
    assert abs(omega.mean().item()) < 0.02 and abs(omega.std().item() - 1.0) < 0.02


_CXX = os.environ.get("CXX", "c++")


@pytest.mark.skipif(shutil.which(_CXX) is None, reason=f"no C++ compiler ({_CXX})")
@pytest.mark.parametrize("seed", [0, 123456789, 2**40 + 7])
def test_cpp_sketch_is_the_reference_sketch(seed, tmp_path):
    # csrc/philox.h (the C++ CPU kernel's sketch) against python_ref.gaussian_sketch, bit for bit: Philox words
    # exact, Box-Muller in double with glibc's log/cos here, numpy's there. Compiled alone with setup.py's flags
    # (about a second), since the extension does not expose the sketch.
    source = tmp_path / "sketch.cpp"
    source.write_text('#include "philox.h"\n'
                      'extern "C" void sketch(uint64_t seed, uint32_t count, float* out) {\n'
                      '  for (uint32_t i = 0; i < count; ++i) out[i] = tokencarve::philox_normal(seed, i);\n'
                      '}\n')
    library = tmp_path / "sketch.so"
    flags = [f for f in _setup_flags("CXX_FLAGS") if not f.startswith("-D")]
    subprocess.run([_CXX, *flags, "-shared", "-fPIC", f"-I{ROOT / 'csrc'}", str(source), "-o", str(library)],
                   check=True, capture_output=True)
    rows, cols = 512, 128
    out = np.empty(rows * cols, dtype=np.float32)
    ctypes.CDLL(str(library)).sketch(ctypes.c_uint64(seed), ctypes.c_uint32(out.size), out.ctypes.data_as(ctypes.c_void_p))
    assert torch.equal(torch.from_numpy(out).view(rows, cols), python_ref.gaussian_sketch(seed, rows, cols))


def test_nonfinite_rows_score_nan_and_others_as_if_zero():
    hidden = hidden_states(1, 20, 12, seed=6)
    bad = hidden.clone()
    bad[0, 3, 5] = float("nan")
    bad[0, 7, 0] = float("-inf")
    zeroed = hidden.clone()
    zeroed[0, [3, 7]] = 0.0
    ref = python_ref.info_scores(bad)
    assert ref[0, [3, 7]].isnan().all()
    keep = [i for i in range(20) if i not in (3, 7)]
    torch.testing.assert_close(ref[0, keep], python_ref.info_scores(zeroed)[0, keep])
    torch.testing.assert_close(tk.info_scores(bad, check_finite=False), ref, equal_nan=True)
    with pytest.raises(ValueError, match="hidden holds NaN or Inf"):
        tk.info_scores(bad)


@pytest.mark.parametrize("seed", [0, 1])
def test_randomized_overlap_holds(seed):
    # Regression guard on benchmarks/study_randomized.py: at the default oversampling and power iterations,
    # rank 128 of a 576 x 1024 image (decay 6) kept >= 0.974 of the exact top-192 on both seeds studied.
    # (The op's CPU kernel; the Triton path equals the reference in test_triton_randomized_matches_reference.)
    hidden = hidden_states(1, 576, 1024, seed=seed)
    attn = attention_scores(1, 576, seed=seed)
    exact = python_ref.select(attn, python_ref.info_scores_gram(hidden).float(), 128, attn_weight=0.0)
    rand = python_ref.select(attn, tk.info_scores(hidden, rank=128, seed=seed), 128, attn_weight=0.0)
    assert len(set(exact[0].tolist()) & set(rand[0].tolist())) / exact.shape[1] >= 0.97


# ---- the op against the reference ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("batch, nv, dim", SHAPES, ids=lambda v: str(v))
def test_exact_op_matches_reference(batch, nv, dim, dtype):
    hidden = hidden_states(batch, nv, dim, seed=nv * dim, dtype=dtype)
    out = tk.info_scores(hidden)
    assert out.dtype == torch.float32 and out.shape == (batch, nv)
    assert rel_err(out, _svd64(hidden)) < 1e-6  # the op upcasts to float64: only the float32 output rounds


@pytest.mark.parametrize("rank", [1, 4, 16])
@pytest.mark.parametrize("batch, nv, dim", [(3, 7, 5), (2, 64, 33), (2, 40, 96)], ids=lambda v: str(v))
def test_randomized_op_matches_reference(batch, nv, dim, rank):
    hidden = hidden_states(batch, nv, dim, seed=rank)
    out = tk.info_scores(hidden, rank=rank, seed=9)
    # The same sketch (test_cpp_sketch_is_the_reference_sketch) and float64 algebra on both sides (LAPACK QR/eigh
    # may differ in the last float64 bits): the float32 output rounding is the only visible difference.
    assert rel_err(out, python_ref.info_scores_randomized(hidden, rank, 9)) <= 2.0**-23
    assert torch.equal(out, tk.info_scores(hidden, rank=rank, seed=9))


# ---- the Triton kernels (tokencarve_kernels/triton), interpreted on the CPU when there is no GPU ----


def _triton_scores(hidden, rank=0, seed=0):
    return tk.info_scores(hidden.to(TRITON_DEVICE), rank=rank, seed=seed, check_finite=False).cpu()


# Nv = 1; Nv = 7 > D = 5; 575 <= D and 577 > D (both Gram sides, around LLaVA's 576); D = 70, 580
# (not multiples of the 64-wide blocks); D = 3; B = 3.
TRITON_EXACT_SHAPES = [(1, 1, 8), (3, 7, 5), (1, 575, 580), (1, 577, 96), (3, 40, 70), (2, 9, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch, nv, dim", TRITON_EXACT_SHAPES, ids=lambda v: str(v))
def test_triton_exact_matches_reference(batch, nv, dim, dtype, triton_backend):
    hidden = hidden_states(batch, nv, dim, seed=nv + dim, dtype=dtype)
    out = _triton_scores(hidden)
    assert out.dtype == torch.float32 and out.shape == (batch, nv)
    # Error budget: twice the reference's own error when it runs in the lowest precision torch's SVD
    # takes (float32: the authors' SVD), with one float32 ulp for the output rounding.
    ref = _svd64(hidden)
    assert rel_err(out, ref) <= max(2 * rel_err(python_ref.authors_info_scores(hidden), ref), 2.0**-23)


@pytest.mark.parametrize("batch, nv, dim", [(3, 7, 5), (2, 40, 70), (1, 77, 20)], ids=lambda v: str(v))
def test_triton_exact_float64_input_and_determinism(batch, nv, dim, triton_backend):
    hidden = hidden_states(batch, nv, dim, seed=nv, dtype=torch.float64)
    out = _triton_scores(hidden)
    assert rel_err(out, _svd64(hidden)) < 1e-6
    assert torch.equal(out, _triton_scores(hidden))


@pytest.mark.parametrize("batch, nv, dim", [(1, 576, 640), (1, 700, 256)], ids=["XXt", "XtX"])
def test_triton_exact_selects_what_fp64_svd_selects(batch, nv, dim, triton_backend):
    # decay 7: the Gram's condition number is far past float32 (a float32 Gram + eigh changes the order
    # of the selection on both inputs); float64 accumulation keeps it.
    hidden = hidden_states(batch, nv, dim, seed=nv, decay=7.0)
    attn = attention_scores(batch, nv, seed=nv)
    for weight in (0.0, 0.5):
        ref = python_ref.select(attn, _svd64(hidden).float(), 128, weight)
        assert torch.equal(python_ref.select(attn, _triton_scores(hidden), 128, weight), ref)


# rank >= min(Nv, D) (exact); sketches narrower and wider (70) than a 64-wide block; B = 3.
@pytest.mark.parametrize("batch, nv, dim, rank", [(3, 7, 5, 16), (3, 7, 5, 1), (2, 64, 33, 4), (2, 40, 96, 16),
                                                  (1, 130, 200, 70)], ids=lambda v: str(v))
def test_triton_randomized_matches_reference(batch, nv, dim, rank, triton_backend):
    hidden = hidden_states(batch, nv, dim, seed=rank, dtype=torch.bfloat16)
    out = _triton_scores(hidden, rank, 9)
    assert rel_err(out, python_ref.info_scores(hidden, rank=rank, seed=9)) < 1e-5
    assert torch.equal(out, _triton_scores(hidden, rank, 9))  # same seed: bit-identical
    if rank < min(nv, dim):  # below full rank the sketch matters
        assert not torch.equal(out, _triton_scores(hidden, rank, 10))


@pytest.mark.parametrize("seed", [0, 1, 123456789, 2**40 + 7])
def test_triton_sketch_is_the_reference_sketch(seed):
    # I @ Omega is exact in float64, so the GEMM with the in-kernel Philox sketch returns Omega itself.
    pytest.importorskip("triton", reason="the triton backend needs the triton package")
    from tokencarve_kernels.triton.info_scores import Sketch, matmul

    rows, cols = 70, 19
    eye = torch.eye(rows, dtype=torch.float64, device=TRITON_DEVICE)[None]
    omega = matmul(eye, Sketch(seed, rows, cols), torch.ones(1, rows, dtype=torch.int8, device=TRITON_DEVICE))
    assert torch.equal(omega[0].cpu(), python_ref.gaussian_sketch(seed, rows, cols).double())




# min(Nv, D) <= 32 and rank <= 32: the sizes where cuSOLVER's batched eigh (syevj) would take over from B = 2.
@pytest.mark.parametrize("rank, nv, dim", [(0, 20, 48), (0, 40, 24), (8, 40, 24), (32, 30, 50)],
                         ids=["XXt", "XtX", "rank8", "rank32"])
def test_triton_scores_do_not_depend_on_the_batch(rank, nv, dim, triton_backend, monkeypatch):
    # SPEC.md: an image's scores must not depend on the rest of the batch. torch.linalg.eigh / qr on CUDA switch
    # algorithm with the batch size, so the kernels call them on one image at a time; the spies check that on
    # every device (the CPU's LAPACK loops over images anyway), the equality checks the scores, on a GPU for real.
    hidden = hidden_states(3, nv, dim, seed=nv + rank)
    shapes = []
    for name in ("eigh", "qr"):
        original = getattr(torch.linalg, name)

        def spy(a, *args, _original=original, **kwargs):
            shapes.append(tuple(a.shape))
            return _original(a, *args, **kwargs)

        monkeypatch.setattr(torch.linalg, name, spy)
    batched = _triton_scores(hidden, rank, 4)
    singles = torch.cat([_triton_scores(hidden[i : i + 1], rank, 4) for i in range(3)])
    assert torch.equal(batched, singles)
    assert shapes and all(len(shape) == 2 for shape in shapes), shapes


@requires_two_cuda
@pytest.mark.parametrize("rank", [0, 8])
def test_triton_launches_on_the_inputs_device(rank, triton_backend):
    # Triton launches on the current device; the kernels must switch to their inputs' device.
    hidden = hidden_states(2, 40, 70, seed=3)
    with torch.cuda.device(0):
        out = tk.info_scores(hidden.to("cuda:1"), rank=rank, seed=2)
        assert torch.cuda.current_device() == 0
    assert out.device == torch.device("cuda:1")
    assert rel_err(out.cpu(), python_ref.info_scores(hidden, rank=rank, seed=2)) < 1e-5


@pytest.mark.parametrize("rank, nv, dim", [(0, 20, 12), (0, 12, 20), (3, 20, 12)], ids=["XtX", "XXt", "rank3"])
def test_triton_nonfinite_rows_score_nan_and_others_as_if_zero(rank, nv, dim, triton_backend):
    hidden = hidden_states(1, nv, dim, seed=6)
    bad = hidden.clone()
    bad[0, 3, 5] = float("nan")
    bad[0, 7, 0] = float("-inf")
    out = _triton_scores(bad, rank, 2)
    assert out[0, [3, 7]].isnan().all() and not out[0, :3].isnan().any()
    torch.testing.assert_close(out, python_ref.info_scores(bad, rank=rank, seed=2), equal_nan=True, rtol=1e-5, atol=0)


def test_triton_opcheck_compile_and_errors(triton_backend):
    hidden = hidden_states(2, 24, 16, seed=6).to(TRITON_DEVICE)
    op = torch.ops.tokencarve.info_scores
    torch.library.opcheck(op.default, (hidden,))
    torch.library.opcheck(op.default, (hidden, 4, 1))
    compiled = torch.compile(lambda h: op(h, 4, 3) + op(h), fullgraph=True)
    torch.testing.assert_close(compiled(hidden), op(hidden, 4, 3) + op(hidden), rtol=0, atol=0)
    with pytest.raises(ValueError, match="rank must be >= 0"):
        op(hidden, -1)
    # D x l = 3 * 2^30 entries: past the int32 Philox offsets (an expanded tensor: no memory)
    huge = torch.zeros(1, device=TRITON_DEVICE).expand(1, 3, 2**30)
    with pytest.raises(ValueError, match="must hold fewer than 2"):
        op(huge, 3)


def test_triton_backend_carves_like_the_cpu_kernels():
    # carve is composed in C++ through the dispatcher: under the triton backend its scores come from Triton.
    pytest.importorskip("triton", reason="the triton backend needs the triton package")
    hidden = hidden_states(2, 50, 30, seed=5)
    attn = attention_scores(2, 50, seed=5)
    native = tk.carve(hidden, attn, 12, rank=8, seed=3)
    with tk.use_backend("triton"):
        carved, keep_idx = tk.carve(hidden.to(TRITON_DEVICE), attn.to(TRITON_DEVICE), 12, rank=8, seed=3)
    assert torch.equal(keep_idx.cpu(), native[1])
    torch.testing.assert_close(carved.cpu(), native[0], rtol=1e-6, atol=0.0)
