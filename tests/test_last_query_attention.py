"""last_query_attention: the reference against the dense attention matrix, then the op against it."""

import pytest
import torch

import python_ref
import tokencarve_kernels as tk
from tests.devices import TRITON_DEVICE, requires_two_cuda
from tests.inputs import queries_keys, rel_err


@pytest.mark.parametrize("heads_q, heads_k", [(4, 4), (8, 2), (6, 1)], ids=["MHA", "GQA", "MQA"])
def test_reference_equals_last_row_of_dense_causal_softmax(heads_q, heads_k):
    batch, n, d = 2, 37, 16
    gen = torch.Generator().manual_seed(0)
    q_all = torch.randn(batch, heads_q, n, d, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, heads_k, n, d, generator=gen, dtype=torch.float64)
    dense = python_ref.eager_last_query_attention(q_all, k, 5, 20, d**-0.5)
    row = python_ref.last_query_attention(q_all[:, :, -1], k, 5, 20, d**-0.5)
    assert rel_err(row, dense) < 1e-6
    # the full row sums to one over all N keys, not over the visual span
    total = python_ref.last_query_attention(q_all[:, :, -1], k, 0, n, d**-0.5)
    torch.testing.assert_close(total.double().sum(-1), torch.ones(batch, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "batch, heads_q, heads_k, n, d, vis_start, vis_len",
    [(1, 4, 4, 1, 8, 0, 1), (3, 8, 2, 50, 16, 5, 30), (2, 6, 3, 77, 24, 40, 37), (1, 32, 8, 700, 64, 35, 576)],
    ids=lambda v: str(v),
)
def test_op_matches_reference(batch, heads_q, heads_k, n, d, vis_start, vis_len, dtype):
    q, k = queries_keys(batch, heads_q, heads_k, n, d, seed=n, dtype=dtype)
    out = tk.last_query_attention(q, k, vis_start, vis_len, d**-0.5)
    ref = python_ref.last_query_attention(q, k, vis_start, vis_len, d**-0.5)
    assert out.dtype == torch.float32 and out.shape == (batch, vis_len)
    assert rel_err(out, ref) < 1e-5  # inputs upcast to float32 before any arithmetic


def _packed(lengths, heads_q=8, heads_k=2, d=16, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(len(lengths), heads_q, d, generator=gen).to(dtype)
    k = torch.randn(sum(lengths), heads_k, d, generator=gen).to(dtype)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return q, k, cu


def test_varlen_reference_equals_padded_calls():
    lengths = [5, 1, 0, 40]
    q, k, cu = _packed(lengths, seed=1)
    out = python_ref.last_query_attention_varlen(q, k, cu, 0.25)
    for s, n in enumerate(lengths):
        if n:
            keys = k[cu[s] : cu[s + 1]].transpose(0, 1)[None]
            torch.testing.assert_close(out[cu[s] : cu[s + 1]], python_ref.last_query_attention(q[s : s + 1], keys, 0, n, 0.25)[0])
            torch.testing.assert_close(out[cu[s] : cu[s + 1]].double().sum(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lengths", [[1], [7, 33, 2], [0, 12, 0], [300, 77]], ids=str)
def test_varlen_op_matches_reference(lengths, dtype):
    q, k, cu = _packed(lengths, seed=len(lengths), dtype=dtype)
    out = tk.last_query_attention_varlen(q, k, cu.long(), 0.3)
    assert out.shape == (sum(lengths),) and out.dtype == torch.float32
    assert rel_err(out, python_ref.last_query_attention_varlen(q, k, cu, 0.3)) < 1e-5


def test_varlen_rejects_bad_cu_seqlens():
    q, k, cu = _packed([4, 6])
    with pytest.raises(ValueError, match=r"cu_seqlens must have S \+ 1 = 3 entries"):
        tk.last_query_attention_varlen(q, k, cu[:2], 0.3)
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        tk.last_query_attention_varlen(q, k, torch.tensor([0, 7, 6]), 0.3)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0 and end at most at the number of keys 10"):
        tk.last_query_attention_varlen(q, k, torch.tensor([0, 4, 11]), 0.3)
    with pytest.raises(TypeError, match="cu_seqlens must be int32 or int64, got Float"):
        tk.last_query_attention_varlen(q, k, cu.float(), 0.3)


# ---- the Triton kernels (tokencarve_kernels/triton), interpreted on the CPU when there is no GPU ----

def _within_budget(out, q, k, vis_start, vis_len, scale):
    """The kernel's error against float64 is at most twice the reference's own error when the reference
    runs in the input's dtype (the FlashAttention rule), with one float32 ulp for the output rounding."""
    ref = python_ref.last_query_attention(q, k, vis_start, vis_len, scale)
    low = python_ref.last_query_attention(q, k, vis_start, vis_len, scale, compute_dtype=q.dtype)
    assert rel_err(out, ref) <= max(2 * rel_err(low, ref), 2.0**-23)


# N = 1; vis_start + vis_len = N (the span ends at the last key) with B = 3; d = 24, 40 (not a power of
# two); N = 700 and 1030 cross the 512-key chunks of the first pass; MHA, GQA and MQA.
TRITON_SHAPES = [(1, 4, 4, 1, 8, 0, 1), (3, 8, 2, 50, 16, 5, 45), (2, 6, 3, 77, 24, 40, 37),
                 (1, 32, 8, 700, 64, 35, 576), (3, 4, 1, 1030, 40, 1000, 30)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch, heads_q, heads_k, n, d, vis_start, vis_len", TRITON_SHAPES, ids=lambda v: str(v))
def test_triton_matches_reference(batch, heads_q, heads_k, n, d, vis_start, vis_len, dtype, triton_backend):
    q, k = queries_keys(batch, heads_q, heads_k, n, d, seed=n + d, dtype=dtype)
    qd, kd = q.to(TRITON_DEVICE), k.to(TRITON_DEVICE)
    out = tk.last_query_attention(qd, kd, vis_start, vis_len, d**-0.5)
    assert out.dtype == torch.float32 and out.shape == (batch, vis_len)
    _within_budget(out.cpu(), q, k, vis_start, vis_len, d**-0.5)
    assert torch.equal(out, tk.last_query_attention(qd, kd, vis_start, vis_len, d**-0.5))  # deterministic


def test_triton_reads_strided_keys(triton_backend):
    # keys as SDPA/FlashAttention layouts hold them: [B, N, Hk, d] memory viewed as [B, Hk, N, d]
    q, k = queries_keys(2, 8, 2, 90, 32, seed=3)
    k_strided = k.transpose(1, 2).contiguous().transpose(1, 2)
    out = tk.last_query_attention(q.to(TRITON_DEVICE), k_strided.to(TRITON_DEVICE), 10, 80, 0.2).cpu()
    torch.testing.assert_close(out, python_ref.last_query_attention(q, k, 10, 80, 0.2), rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lengths", [[1], [7, 33, 2], [0, 12, 0], [600, 77]], ids=str)
def test_triton_varlen_matches_reference(lengths, dtype, triton_backend):
    q, k, cu = _packed(lengths, seed=len(lengths) + 1, dtype=dtype)
    k = torch.cat([k, torch.randn(3, *k.shape[1:]).to(dtype)])  # keys after the last sequence: 0
    out = tk.last_query_attention_varlen(q.to(TRITON_DEVICE), k.to(TRITON_DEVICE), cu.to(TRITON_DEVICE), 0.3).cpu()
    ref = python_ref.last_query_attention_varlen(q, k, cu, 0.3)
    assert out.shape == (sum(lengths) + 3,) and out.dtype == torch.float32
    assert torch.equal(out[-3:], torch.zeros(3))
    for s, n in enumerate(lengths):  # each sequence within the error budget of its own dense call
        if n:
            keys = k[cu[s] : cu[s + 1]].transpose(0, 1)[None]
            _within_budget(out[cu[s] : cu[s + 1]][None], q[s : s + 1], keys, 0, n, 0.3)
    assert rel_err(out, ref) < 1e-5


def test_triton_opcheck_and_compile(triton_backend):
    q, k = (t.to(TRITON_DEVICE) for t in queries_keys(2, 4, 2, 30, 8))
    ops = torch.ops.tokencarve
    packed = k[0].permute(1, 0, 2).contiguous()
    cu = torch.tensor([0, 12, 30], device=TRITON_DEVICE)
    torch.library.opcheck(ops.last_query_attention.default, (q, k, 2, 20, 0.35))
    torch.library.opcheck(ops.last_query_attention_varlen.default, (q, packed, cu, 0.35))

    def fn(q, k):
        return ops.last_query_attention(q, k, 2, 20, 0.35) * 2.0

    out = torch.compile(fn, fullgraph=True)(q, k)
    torch.testing.assert_close(out, 2.0 * python_ref.last_query_attention(q, k, 2, 20, 0.35), rtol=1e-5, atol=0.0)


def test_triton_kernels_refuse_cpu_tensors_outside_the_interpreter(monkeypatch, triton_backend):
    from tokencarve_kernels.triton import _common

    monkeypatch.setattr(_common, "INTERPRET", False)
    q, k = queries_keys(1, 2, 2, 5, 8)
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        tk.last_query_attention(q, k, 0, 5, 0.3)


def test_triton_float64_scale_reaches_the_softmax_exactly(triton_backend):
    # The softmax runs in float64; a scale typed float32 on its way into the kernel (a compiled kernel types a
    # Python float argument so) moved the fp64 result by ~1e-7 relative. Only the float32 output rounding remains.
    # The interpreter keeps Python floats as float64: there this checks the float64 route, a GPU the rounding.
    scale = 3.0 * 24**-0.5  # not a float32 value; logits of several units make its rounding visible
    q, k = queries_keys(2, 4, 2, 70, 24, seed=8, dtype=torch.float64)
    out = tk.last_query_attention(q.to(TRITON_DEVICE), k.to(TRITON_DEVICE), 3, 60, scale).cpu()
    assert rel_err(out, python_ref.last_query_attention(q, k, 3, 60, scale)) < 1e-12
    qp, kp, cu = _packed([30, 41], seed=8, dtype=torch.float64)
    out = tk.last_query_attention_varlen(qp.to(TRITON_DEVICE), kp.to(TRITON_DEVICE), cu.to(TRITON_DEVICE), scale)
    assert rel_err(out.cpu(), python_ref.last_query_attention_varlen(qp, kp, cu, scale)) < 1e-12


def test_triton_varlen_reads_a_strided_cu_seqlens(triton_backend):
    # The kernels index cu_seqlens as a dense vector: a strided view (every other entry of a wider tensor,
    # zeros in between) must be made contiguous first.
    q, k, cu = _packed([7, 33, 2], seed=4)
    wide = torch.stack([cu, torch.zeros_like(cu)], dim=1).to(TRITON_DEVICE)
    out = tk.last_query_attention_varlen(q.to(TRITON_DEVICE), k.to(TRITON_DEVICE), wide[:, 0], 0.3).cpu()
    assert rel_err(out, python_ref.last_query_attention_varlen(q, k, cu, 0.3)) < 1e-5


def test_triton_varlen_clamps_cu_seqlens_to_the_keys(triton_backend):
    # Unchecked on the device (a check would sync): values outside [0, total] are clamped, so they read and
    # write inside k and the output: [-3, 4, 25] over 10 keys acts as [0, 4, 10].
    q, k, _ = _packed([4, 6], seed=6)
    bad = torch.tensor([-3, 4, 25], device=TRITON_DEVICE)
    out = tk.last_query_attention_varlen(q.to(TRITON_DEVICE), k.to(TRITON_DEVICE), bad, 0.3).cpu()
    ref = python_ref.last_query_attention_varlen(q, k, torch.tensor([0, 4, 10]), 0.3)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_triton_head_dim_256(dtype, triton_backend):
    # fp32/fp64 inputs take the fp64 dot, which switches to 32-key single-stage tiles from head_dim 256 (shared
    # memory on a GPU); the interpreter checks the results of that tiling, a GPU that it compiles and fits.
    q, k = queries_keys(2, 4, 2, 45, 256, seed=2, dtype=dtype)
    out = tk.last_query_attention(q.to(TRITON_DEVICE), k.to(TRITON_DEVICE), 5, 40, 256**-0.5).cpu()
    _within_budget(out, q, k, 5, 40, 256**-0.5)


@pytest.mark.parametrize("axis", ["heads", "keys"])
def test_triton_key_offsets_past_2_31_elements(axis, triton_backend):
    # One sample's K spans more than 2^31 elements while each stride fits in int32, so head * stride_kh (or
    # key * stride_kn) passes 2^31 and must be computed in int64. The view starts 2^31 elements into its storage:
    # a wrapped int32 offset would land inside the storage and read the wrong keys rather than crash. The 8 GiB
    # storage is never written but for the view's few keys (on the CPU its untouched pages are never mapped).
    stride = 2**30 + 64
    if axis == "heads":
        shape, strides = (1, 3, 4, 16), (3 * stride, stride, 16, 1)
    else:
        shape, strides = (1, 1, 3, 16), (3 * stride, 3 * stride, stride, 1)
    offset = 2**31
    try:
        storage = torch.empty(offset + 2 * stride + 64, dtype=torch.float16, device=TRITON_DEVICE)
    except (RuntimeError, MemoryError) as exc:
        pytest.skip(f"cannot reserve the 8 GiB of address space this test views: {exc}")
    q, k = queries_keys(1, 2 * shape[1], shape[1], shape[2], 16, seed=9, dtype=torch.float16)
    big_k = storage.as_strided(shape, strides, offset)
    big_k.copy_(k)
    out = tk.last_query_attention(q.to(TRITON_DEVICE), big_k, 0, shape[2], 0.25).cpu()
    del big_k, storage
    _within_budget(out, q, k, 0, shape[2], 0.25)


@requires_two_cuda
def test_triton_launches_on_the_inputs_device(triton_backend):
    # Triton launches on the current device; the kernels must switch to their inputs' device.
    q, k = queries_keys(2, 8, 2, 90, 32, seed=5)
    qp, kp, cu = _packed([30, 41], seed=5)
    with torch.cuda.device(0):
        out = tk.last_query_attention(q.to("cuda:1"), k.to("cuda:1"), 10, 60, 0.2)
        packed = tk.last_query_attention_varlen(qp.to("cuda:1"), kp.to("cuda:1"), cu.to("cuda:1"), 0.2)
        assert torch.cuda.current_device() == 0
    assert out.device == packed.device == torch.device("cuda:1")
    assert rel_err(out.cpu(), python_ref.last_query_attention(q, k, 10, 60, 0.2)) < 1e-5
    assert rel_err(packed.cpu(), python_ref.last_query_attention_varlen(qp, kp, cu, 0.2)) < 1e-5
