"""gather_kv: apply a carve's keep set to the KV cache (and any per-token tensor) of a padded batch."""

import pytest
import torch

import python_ref
import tokencarve_kernels as tk
from tests.devices import DEVICES


def test_reference_by_hand():
    kv = torch.arange(20).view(2, 1, 10, 1)
    keep_idx = torch.tensor([[0, 2, 3], [1, 3, 4]])
    vis_start = torch.tensor([2, 4])  # sample 1 is left-padded by two more tokens
    out = python_ref.gather_kv(kv, keep_idx, vis_start, 5)
    assert out[:, 0, :, 0].tolist() == [[0, 1, 2, 4, 5, 7, 8, 9], [10, 11, 12, 13, 15, 17, 18, 19]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64], ids=str)
@pytest.mark.parametrize("batch, heads, n, d, vis_len, t", [(1, 1, 5, 1, 5, 1), (3, 4, 50, 8, 30, 7), (2, 2, 700, 16, 576, 128)])
@pytest.mark.parametrize("device", DEVICES)
def test_op_matches_reference(batch, heads, n, d, vis_len, t, dtype, device):
    gen = torch.Generator().manual_seed(n)
    kv = (torch.randn(batch, heads, n, d, generator=gen) * 100).to(dtype)
    keep_idx = torch.stack([torch.randperm(vis_len, generator=gen)[:t].sort().values for _ in range(batch)])
    vis_start = torch.randint(0, n - vis_len + 1, (batch,), generator=gen)
    out = tk.gather_kv(kv.to(device), keep_idx.to(device), vis_start.to(device), vis_len)
    assert out.shape == (batch, heads, n - vis_len + t, d) and out.dtype == dtype and out.device.type == device
    assert torch.equal(out.cpu(), python_ref.gather_kv(kv, keep_idx, vis_start, vis_len))


def test_rejects_bad_input():
    kv, keep_idx, vis_start = torch.randn(2, 1, 10, 4), torch.tensor([[0, 1], [2, 3]]), torch.tensor([0, 5])
    with pytest.raises(ValueError, match=r"vis_len must lie in \[T, N\] = \[2, 10\], got 11"):
        tk.gather_kv(kv, keep_idx, vis_start, 11)
    with pytest.raises(ValueError, match=r"every visual span \[vis_start, vis_start \+ vis_len\) must lie inside the N = 10"):
        tk.gather_kv(kv, keep_idx, vis_start, 6)
    with pytest.raises(ValueError, match=r"keep_idx must hold indices in \[0, vis_len = 3\)"):
        tk.gather_kv(kv, keep_idx, vis_start, 3)
    with pytest.raises(TypeError, match="vis_start must be int64, got Int"):
        tk.gather_kv(kv, keep_idx, vis_start.int(), 4)
    with pytest.raises(ValueError, match=r"kv must be a 4-D tensor \[B, H, N, d\], got 3-D"):
        tk.gather_kv(kv[0], keep_idx, vis_start, 4)
