"""Group-relative advantages with None rewards, weighted sum, GDPO renormalisation (PROTOCOL.md 2).

    for each reward j: A_j = (R_j - mean_group(R_j)) / (std_group(R_j) + 1e-8)   (unbiased std)
    A = sum_j w_j A_j
    GDPO: A = (A - mean(A over all ranks)) / (std(A over all ranks) + 1e-8); A = clamp(A, -5, 5)

A None reward (the judge failed) is left out of its group's statistics and gets zero advantage for
that reward. A group with fewer than two valid rewards, or all equal, gives zero advantage. A sample
with no valid reward at all keeps advantage 0 after GDPO and does not enter the GDPO statistics.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

EPS = 1e-8


def group_normalise(rewards: Sequence[Optional[float]], group_ids: Sequence[int]) -> torch.Tensor:
    """(N,) per-reward advantages; None -> 0 and excluded from its group's mean / std."""
    out = torch.zeros(len(rewards), dtype=torch.float64)
    for g in sorted(set(group_ids)):
        idx = [i for i, gid in enumerate(group_ids) if gid == g and rewards[i] is not None]
        if len(idx) < 2:
            continue
        vals = torch.tensor([float(rewards[i]) for i in idx], dtype=torch.float64)
        a = (vals - vals.mean()) / (vals.std(unbiased=True) + EPS)
        out[idx] = a
    return out


def combine(rewards: dict[str, Sequence[Optional[float]]], weights: dict[str, float],
            group_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (N,), valid (N,) bool): weighted sum of per-reward group advantages; valid = any reward known."""
    missing = [name for name in weights if name not in rewards]
    if missing:
        raise KeyError(f"no rewards computed for {missing}; have {sorted(rewards)}")
    n = len(group_ids)
    total = torch.zeros(n, dtype=torch.float64)
    valid = torch.zeros(n, dtype=torch.bool)
    for name, w in weights.items():
        r = rewards[name]
        total += float(w) * group_normalise(r, group_ids)
        valid |= torch.tensor([x is not None for x in r])
    return total, valid


def gdpo(advantages: torch.Tensor, valid: torch.Tensor, clip: float = 5.0, gather=None) -> torch.Tensor:
    """Renormalise over all ranks' valid samples, clamp; invalid samples stay at 0.

    `gather(t)` concatenates a tensor over ranks (identity on one process)."""
    gather = gather or (lambda t: t)
    all_a, all_v = gather(advantages), gather(valid)
    pool = all_a[all_v]
    if pool.numel() < 2:
        return torch.zeros_like(advantages)
    a = (advantages - pool.mean()) / (pool.std(unbiased=True) + EPS)
    return torch.where(valid, a.clamp(-clip, clip), torch.zeros_like(a))


def zero_variance_fraction(advantages: torch.Tensor, group_ids: Sequence[int]) -> float:
    """Share of groups whose combined advantage is 0 everywhere (wasted rollouts, logged)."""
    groups = sorted(set(group_ids))
    zero = sum(bool(torch.all(advantages[[i for i, g in enumerate(group_ids) if g == gid]].abs() < 1e-12))
               for gid in groups)
    return zero / max(1, len(groups))


def dist_gather(t: torch.Tensor) -> torch.Tensor:
    """all_gather + concatenate over ranks (equal sizes per rank), identity without torch.distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    src = t.to(backend_device)
    parts = [torch.empty_like(src) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, src)
    return torch.cat(parts).to(t.device)
