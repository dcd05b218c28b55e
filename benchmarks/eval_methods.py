"""Visual-token reduction methods compared at equal budget by the evaluation (benchmarks/eval_fidelity.py).

Every method has one signature, so one harness runs them all with no per-method tuning:

    method(hidden [1, Nv, D], attn [1, Nv], budget) -> (carved [1, T, D], keep_idx [1, T] ascending)

keep_idx names the original position each output token sits at (a merged token sits at its destination).
TokenCarve and its ablations call the package's ops; the peers (random, DivPrune-like diversity, ToMe-like
bipartite merging) are written here from their papers' descriptions, as simply as they allow.
"""

import torch

import python_ref
import tokencarve_kernels as tk


def tokencarve(attn_weight: float = 0.5, rank: int = 0, merge: str = "mean", seed: int = 0):
    def method(hidden, attn, budget):
        return tk.carve(hidden, attn, budget, attn_weight=attn_weight, rank=rank, seed=seed, merge=merge)

    return method


def no_merge(hidden, attn, budget):
    """Ablation: stage I straight to the budget (the T best fused scores), no stage II."""
    fused = python_ref.fuse_ranks(attn, tk.info_scores(hidden))
    keep_idx = torch.sort(-fused, dim=-1, stable=True).indices[:, :budget].sort(dim=-1).values
    return _take(hidden, keep_idx), keep_idx


def random_selection(seed: int = 0):
    def method(hidden, attn, budget):
        gen = torch.Generator().manual_seed(seed)
        keep_idx = torch.randperm(hidden.shape[1], generator=gen)[:budget].sort().values[None]
        return _take(hidden, keep_idx), keep_idx

    return method


def diversity(hidden, attn, budget):
    """DivPrune-like: greedy max-min cosine distance. Start from the token farthest from all others on
    average, then repeatedly add the token whose nearest selected token is farthest."""
    x = torch.nn.functional.normalize(hidden[0].double(), dim=-1)
    dist = 1.0 - x @ x.T
    chosen = [int(dist.sum(1).argmax())]
    nearest = dist[chosen[0]].clone()
    for _ in range(min(budget, x.shape[0]) - 1):
        nearest[chosen] = -1.0
        nxt = int(nearest.argmax())
        chosen.append(nxt)
        nearest = torch.minimum(nearest, dist[nxt])
    keep_idx = torch.tensor(sorted(chosen))[None]
    return _take(hidden, keep_idx), keep_idx


def bipartite_merge(hidden, attn, budget):
    """ToMe-like: alternate tokens into sets A and B, merge the most similar B -> A edges (size-weighted
    means, sizes tracked), repeated until `budget` tokens remain (one round removes at most half)."""
    x = hidden[0].double()
    pos = torch.arange(x.shape[0])
    size = torch.ones(x.shape[0], dtype=torch.float64)
    while x.shape[0] > budget:
        a, b = x[0::2], x[1::2]
        r = min(x.shape[0] - budget, b.shape[0])
        sim = torch.nn.functional.normalize(b, dim=-1) @ torch.nn.functional.normalize(a, dim=-1).T
        best, target = sim.max(dim=-1)
        merged = torch.sort(-best, stable=True).indices[:r]
        keep_b = torch.ones(b.shape[0], dtype=torch.bool)
        keep_b[merged] = False
        sa, sb = size[0::2].clone(), size[1::2]
        acc = a * sa[:, None]
        acc.index_add_(0, target[merged], b[merged] * sb[merged, None])
        sa.index_add_(0, target[merged], sb[merged])
        x = torch.cat([acc / sa[:, None], b[keep_b]])
        size = torch.cat([sa, sb[keep_b]])
        pos = torch.cat([pos[0::2], pos[1::2][keep_b]])
        order = pos.argsort()
        x, size, pos = x[order], size[order], pos[order]
    return x[None].to(hidden.dtype), pos[None]


def _take(hidden, keep_idx):
    return torch.gather(hidden, 1, keep_idx[..., None].expand(-1, -1, hidden.shape[-1]))


def methods(seed: int = 0) -> dict:
    """Every method by name; `seed` drives the two that draw random numbers (the randomized score's sketch,
    random selection), so that an evaluation over several samples can draw afresh for each one.
    merge="size" is absent: inside carve every size is 1, where it equals "mean"."""
    return {
        "tokencarve": tokencarve(),
        "tokencarve-similarity": tokencarve(merge="similarity"),
        "tokencarve-rand64": tokencarve(rank=64, seed=seed),
        "tokencarve-rand64-similarity": tokencarve(rank=64, merge="similarity", seed=seed),
        "info-only": tokencarve(attn_weight=0.0),
        "attention-only (FastV-like)": tokencarve(attn_weight=1.0),
        "no-merge": no_merge,
        "random": random_selection(seed),
        "diversity (DivPrune-like)": diversity,
        "bipartite merge (ToMe-like)": bipartite_merge,
    }


METHODS = methods()


def spectrum_share(hidden: torch.Tensor, carved: torch.Tensor) -> float:
    """The paper's information measure: singular-value mass of the carved visual states over the full set's."""
    full = torch.linalg.svdvals(hidden[0].double()).sum()
    return (torch.linalg.svdvals(carved[0].double()).sum() / full).item()
