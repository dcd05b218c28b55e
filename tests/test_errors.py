"""Bad input: every op raises an error that names the argument and what was expected."""

import pytest
import torch

import tokencarve_kernels as tk

H = torch.randn(2, 10, 8)
A = torch.rand(2, 10)
Q = torch.randn(2, 4, 8)
K = torch.randn(2, 2, 30, 8)

CARVE_CASES = [
    ((H[0], A, 4), ValueError, r"hidden must be a 3-D tensor \[B, Nv, D\], got 2-D"),
    ((H, A[None], 4), ValueError, r"attn must be a 2-D tensor \[B, Nv\], got 3-D"),
    ((H, A[:1], 4), ValueError, r"attn must have shape \[B, Nv\] = \[2, 10\], got \[1, 10\]"),
    ((H, A[:, :9], 4), ValueError, r"attn must have shape \[B, Nv\] = \[2, 10\], got \[2, 9\]"),
    ((H.int(), A, 4), TypeError, r"hidden must be a floating-point tensor .* got Int"),
    ((H.to(torch.complex64), A, 4), TypeError, r"hidden must be a floating-point tensor .* got ComplexFloat"),
    ((H, (A * 10).long(), 4), TypeError, r"attn must be a floating-point tensor .* got Long"),
    ((H, A, 0), ValueError, r"budget must be >= 1, got 0"),
    ((H, A, 4, 1.5), ValueError, r"attn_weight must be in \[0, 1\], got 1.5"),
    ((H, A, 4, -0.1), ValueError, r"attn_weight must be in \[0, 1\], got -0.1"),
    ((H, A, 4, 0.5, -1), ValueError, r"rank must be >= 0 \(0 = exact scores\), got -1"),
    ((H, A, 4, 0.5, 2, -3), ValueError, r"seed must be >= 0, got -3"),
    ((H, A, 4, 0.5, 0, 0, "median"), ValueError, r"merge must be one of 'mean', 'similarity', 'size', got 'median'"),
    ((H, A.to("meta"), 4), ValueError, r"hidden and attn must be on the same device, got cpu and meta"),
]


@pytest.mark.parametrize("args, exc, message", CARVE_CASES, ids=[c[2][:40] for c in CARVE_CASES])
def test_carve_rejects(args, exc, message):
    with pytest.raises(exc, match="tokencarve::carve: " + message):
        torch.ops.tokencarve.carve(*args)


LQA_CASES = [
    ((Q[0], K, 0, 10, 0.3), r"q must be a 3-D tensor \[B, Hq, d\], got 2-D"),
    ((Q, K[0], 0, 10, 0.3), r"k must be a 4-D tensor \[B, Hk, N, d\], got 3-D"),
    ((Q[:1], K, 0, 10, 0.3), r"q and k must have the same batch size, got 1 and 2"),
    ((Q[..., :4], K, 0, 10, 0.3), r"q and k must have the same head dim, got 4 and 8"),
    ((Q[:, :3], K, 0, 10, 0.3), r"the number of query heads Hq must be a positive multiple of the key heads Hk, got Hq=3, Hk=2"),
    ((Q, K, 25, 10, 0.3), r"\[vis_start, vis_start \+ vis_len\) = \[25, 35\) must lie inside the N = 30 keys"),
    ((Q, K, -1, 10, 0.3), r"\[vis_start, vis_start \+ vis_len\) = \[-1, 9\) must lie inside"),
    ((Q, K, 0, -2, 0.3), r"\[vis_start, vis_start \+ vis_len\) = \[0, -2\) must lie inside the N = 30 keys"),
    ((Q, K, 0, 10, 0.0), r"scale must be > 0, got 0"),
]


@pytest.mark.parametrize("args, message", LQA_CASES, ids=[c[1][:40] for c in LQA_CASES])
def test_last_query_attention_rejects(args, message):
    with pytest.raises(ValueError, match="tokencarve::last_query_attention: (the visual span )?" + message):
        torch.ops.tokencarve.last_query_attention(*args)


def test_last_query_attention_rejects_dtypes():
    with pytest.raises(TypeError, match="q and k must have the same dtype, got Float and Half"):
        torch.ops.tokencarve.last_query_attention(Q, K.half(), 0, 10, 0.3)
    with pytest.raises(TypeError, match="q must be a floating-point tensor"):
        torch.ops.tokencarve.last_query_attention(Q.int(), K, 0, 10, 0.3)
    with pytest.raises(ValueError, match="q and k must be on the same device, got cpu and meta"):
        torch.ops.tokencarve.last_query_attention(Q, K.to("meta"), 0, 10, 0.3)


def test_info_scores_rejects():
    with pytest.raises(ValueError, match=r"tokencarve::info_scores: hidden must be a 3-D tensor"):
        torch.ops.tokencarve.info_scores(H[0])
    with pytest.raises(TypeError, match=r"tokencarve::info_scores: hidden must be a floating-point tensor"):
        torch.ops.tokencarve.info_scores(H.to(torch.complex64))
    with pytest.raises(ValueError, match=r"tokencarve::info_scores: rank must be >= 0"):
        torch.ops.tokencarve.info_scores(H, -1)
    # D x l = 2^16 x 2^15 = 2^31 sketch entries: too many for int32 Philox offsets, on every device and on meta
    # (no memory: an empty batch on the CPU, shapes only on meta).
    for device, batch in (("cpu", 0), ("meta", 1)):
        hidden = torch.empty(batch, 2**16, 2**16, device=device)
        with pytest.raises(ValueError, match=r"tokencarve::info_scores: the randomized sketch D x \(rank \+ oversampling\) "
                                             r"must hold fewer than 2\^31 entries"):
            torch.ops.tokencarve.info_scores(hidden, 2**15)
        assert torch.ops.tokencarve.info_scores(hidden, 2**15 - 1).shape == (batch, 2**16)


ORDER = torch.ops.tokencarve.select(A, A, 4)  # [2, 6]
SELECT_MERGE_CASES = [
    ("select", (A, A[:, :5], 4), ValueError, r"info must have shape \[B, Nv\] = \[2, 10\], got \[2, 5\]"),
    ("select", (A[0], A, 4), ValueError, r"attn must be a 2-D tensor \[B, Nv\], got 1-D"),
    ("select", (A.long(), A, 4), TypeError, r"attn must be a floating-point tensor .* got Long"),
    ("select", (A, A.int(), 4), TypeError, r"info must be a floating-point tensor .* got Int"),
    ("select", (A, A.to("meta"), 4), ValueError, r"attn and info must be on the same device, got cpu and meta"),
    ("select", (A, A, 0), ValueError, r"budget must be >= 1, got 0"),
    ("select", (A, A, 4, 2.0), ValueError, r"attn_weight must be in \[0, 1\], got 2"),
    ("merge", (H[0], ORDER, 4), ValueError, r"hidden must be a 3-D tensor \[B, Nv, D\], got 2-D"),
    ("merge", (H.long(), ORDER, 4), TypeError, r"hidden must be a floating-point tensor .* got Long"),
    ("merge", (H, ORDER.int(), 4), TypeError, r"order must be int64, got Int"),
    ("merge", (H, ORDER[0], 4), ValueError, r"order must be a 2-D tensor \[B, K1\], got 1-D"),
    ("merge", (H, ORDER, 5), ValueError, r"order must have shape \[B, K1\] = \[2, 7\] .* got \[2, 6\]"),
    ("merge", (H, ORDER.to("meta"), 4), ValueError, r"hidden and order must be on the same device, got cpu and meta"),
    ("merge", (H, ORDER, 4, "size", torch.ones(2, 3)), ValueError, r"sizes must have shape \[B, Nv\] = \[2, 10\]"),
    ("merge", (H, ORDER, 4, "size", torch.ones(2, 10, device="meta")), ValueError,
     r"hidden and sizes must be on the same device, got cpu and meta"),
    ("merge", (H, ORDER, 4, "max"), ValueError, r"merge must be one of 'mean', 'similarity', 'size', got 'max'"),
    ("merge", (H, ORDER, 0), ValueError, r"budget must be >= 1, got 0"),
]


@pytest.mark.parametrize("op, args, exc, message", SELECT_MERGE_CASES, ids=[f"{c[0]}-{c[3][:30]}" for c in SELECT_MERGE_CASES])
def test_select_and_merge_reject(op, args, exc, message):
    with pytest.raises(exc, match=f"tokencarve::{op}: " + message):
        getattr(torch.ops.tokencarve, op)(*args)
    if "same device" not in message:  # (on meta every input is on one device)
        # The Meta kernel (torch.compile, FakeTensor) raises the same error.
        with pytest.raises(exc, match=f"tokencarve::{op}: " + message):
            getattr(torch.ops.tokencarve, op)(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args])


def test_wrapper_passes_errors_through():
    with pytest.raises(ValueError, match="tokencarve::carve: budget must be >= 1"):
        tk.carve(H, A, 0)


def test_check_finite_names_the_bad_tensor_with_one_host_sync(monkeypatch):
    attn = A.clone()
    attn[1, 3] = float("nan")
    syncs = []
    to_bool = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: syncs.append(t) or to_bool(t))
    tk.carve(H, A, 4)
    assert len(syncs) == 1  # one read of the device for both inputs
    with pytest.raises(ValueError, match="^attn holds NaN or Inf"):
        tk.carve(H, attn, 4)
    hidden = H.clone()
    hidden[0, 0, 0] = float("-inf")
    with pytest.raises(ValueError, match="^hidden holds NaN or Inf"):
        tk.carve(hidden, attn, 4)  # both bad: the first argument is named
