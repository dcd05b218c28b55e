"""Input factories shared by the tests and the benchmarks, and the comparison helpers of the tests.

Hidden states are built the way a decoder layer's output looks to TokenCarve: a decaying singular
spectrum, a few massive-activation channels, and duplicated patches (flat backgrounds), so that ties and
ill-conditioned Gram matrices actually occur.
"""

import torch


def hidden_states(
    batch: int,
    num_visual: int,
    dim: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    decay: float = 6.0,
    massive_channels: int = 3,
    duplicate_fraction: float = 0.1,
) -> torch.Tensor:
    """[batch, num_visual, dim] with singular values spanning 10^-decay, massive channels, duplicates."""
    gen = torch.Generator().manual_seed(seed)
    rank = min(num_visual, dim)
    u = torch.linalg.qr(torch.randn(batch, num_visual, rank, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(batch, dim, rank, generator=gen, dtype=torch.float64)).Q
    spectrum = torch.logspace(0, -decay, rank, dtype=torch.float64) * (num_visual * dim) ** 0.5
    x = (u * spectrum) @ v.transpose(1, 2)
    if massive_channels:
        channels = torch.randperm(dim, generator=gen)[:massive_channels]
        x[:, :, channels] += 20.0 * x.abs().mean() * (1 + torch.rand(batch, num_visual, massive_channels, generator=gen, dtype=torch.float64))
    n_dup = int(duplicate_fraction * num_visual)
    if n_dup and num_visual > 1:
        src = torch.randint(0, num_visual, (batch, 1), generator=gen).expand(batch, n_dup)
        dst = torch.randperm(num_visual, generator=gen)[:n_dup].expand(batch, n_dup)
        x.scatter_(1, dst[..., None].expand(-1, -1, dim), torch.gather(x, 1, src[..., None].expand(-1, -1, dim)))
    return x.to(dtype)


def attention_scores(batch: int, num_visual: int, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[batch, num_visual] positive, peaked (a few salient patches), not summing to 1."""
    gen = torch.Generator().manual_seed(seed + 7919)
    logits = torch.randn(batch, num_visual, generator=gen, dtype=torch.float64) * 2.0
    return (torch.softmax(logits, dim=-1) * 0.6).to(dtype)


def queries_keys(batch: int, heads_q: int, heads_k: int, num_keys: int, head_dim: int, *, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, d] and k [B, Hk, N, d] with attention logits of realistic spread (a few sharp keys)."""
    gen = torch.Generator().manual_seed(seed + 104729)
    q = torch.randn(batch, heads_q, head_dim, generator=gen)
    k = torch.randn(batch, heads_k, num_keys, head_dim, generator=gen)
    k[:, :, :: max(1, num_keys // 5)] *= 3.0  # attention sinks
    return q.to(dtype), k.to(dtype)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float64."""
    ref = ref.double()
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()
