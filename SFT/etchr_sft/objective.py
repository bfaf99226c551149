"""The SFT objective of PROTOCOL.md section 1 (DiffSynth's FLUX.2 training schedule), as pure functions.

    s      = linspace(1, 1/1000, 1000)
    SIGMA  = e^mu / (e^mu + 1/s - 1)                 mu = 0.8, no resolution-dependent shift
    T      = 1000 * SIGMA
    W      = 1000 * y / sum(y),  y = exp(-2 ((T - 500)/1000)^2) - min(...)     (mean 1)
    x_t    = (1 - sigma) x0 + sigma eps;  target = eps - x0
    loss   = W[i] * mean((v - target)^2)             (fp32)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NUM_TRAIN_TIMESTEPS = 1000
MU = 0.8


@dataclass(frozen=True)
class Schedule:
    sigmas: torch.Tensor  # (1000,) float64, decreasing from 1
    timesteps: torch.Tensor  # (1000,) = 1000 * sigmas
    weights: torch.Tensor  # (1000,) mean 1


def make_schedule(n: int = NUM_TRAIN_TIMESTEPS, mu: float = MU) -> Schedule:
    s = torch.linspace(1.0, 1.0 / n, n, dtype=torch.float64)
    sigmas = math.exp(mu) / (math.exp(mu) + 1.0 / s - 1.0)
    timesteps = n * sigmas
    y = torch.exp(-2.0 * ((timesteps - n / 2) / n) ** 2)
    y = y - y.min()
    weights = n * y / y.sum()
    return Schedule(sigmas=sigmas, timesteps=timesteps, weights=weights)


def lookup(schedule: Schedule, index: torch.Tensor, mode: str = "exact") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sigma, model timestep in [0, 1], loss weight) for table indices `index` (B,).

    exact: the table entry itself. reference_bf16: the reference rounds T to bf16 and then uses the
    nearest table entry's sigma and weight, feeding the rounded T to the model.
    """
    t = schedule.timesteps[index]
    if mode == "exact":
        j = index
    elif mode == "reference_bf16":
        t = t.to(torch.bfloat16).to(torch.float64)
        j = (schedule.timesteps[None, :] - t[:, None]).abs().argmin(dim=1)
    else:
        raise ValueError(f"timestep lookup {mode!r}: use exact or reference_bf16")
    return schedule.sigmas[j], t / NUM_TRAIN_TIMESTEPS, schedule.weights[j]


def noisy_input(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t = (1 - sigma) x0 + sigma eps and the velocity target eps - x0.

    x0, eps: (B, L, C) packed latents; sigma: (B,).
    """
    s = sigma.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1.0 - s) * x0 + s * eps, eps - x0


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of W_b * mean over elements of (pred - target)^2, in fp32.

    pred, target: (B, L, C); weight: (B,). Returns a scalar.
    """
    per_sample = ((pred.float() - target.float()) ** 2).flatten(1).mean(dim=1)
    return (weight.to(per_sample.dtype) * per_sample).mean()


def sample_generator(seed: int, epoch: int, sample_index: int, device="cpu") -> torch.Generator:
    """The RNG of one sample's timestep and noise: keyed by (seed, epoch, sample), never by rank or
    process count, so 1 process with accumulation and N processes draw the same numbers."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + epoch * 7_919 + sample_index) % (2 ** 63 - 1))
    return g
