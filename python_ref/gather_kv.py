"""After carving: keep the same tokens in every per-token tensor of the sequence (SPEC.md, "After carving").

The KV cache of the layers already run, the position ids and the hidden states all drop the carved-away
visual tokens; every kept token keeps its original position id.
"""

import torch


def kept_positions(keep_idx: torch.Tensor, vis_start: torch.Tensor, vis_len: int, seq_len: int) -> torch.Tensor:
    """keep_idx [B, T] (ascending, within the visual span), vis_start [B] -> positions [B, N - vis_len + T].

    positions[b] = [0 .. vis_start_b) + (vis_start_b + keep_idx[b]) + [vis_start_b + vis_len .. N):
    the original sequence positions that survive, in order.
    """
    t = keep_idx.shape[1]
    p = torch.arange(seq_len - vis_len + t, device=keep_idx.device).expand(keep_idx.shape[0], -1)
    start = vis_start[:, None]
    in_span = (p >= start) & (p < start + t)
    span_pos = start + torch.gather(keep_idx, 1, (p - start).clamp(0, max(t - 1, 0))) if t else p
    return torch.where(p < start, p, torch.where(in_span, span_pos, p - t + vis_len))


def gather_kv(kv: torch.Tensor, keep_idx: torch.Tensor, vis_start: torch.Tensor, vis_len: int) -> torch.Tensor:
    """kv [B, H, N, d] (any dtype), keep_idx [B, T], vis_start [B] -> [B, H, N - vis_len + T, d].

    The tokens before and after each sample's visual span [vis_start_b, vis_start_b + vis_len) are kept
    as they are; inside it only keep_idx survives.
    """
    batch, heads, seq_len, dim = kv.shape
    pos = kept_positions(keep_idx, vis_start, vis_len, seq_len)
    return torch.gather(kv, 2, pos[:, None, :, None].expand(batch, heads, -1, dim))
