"""Flow-GRPO SDE sampling math (PROTOCOL.md section 2), as pure functions.

Schedule: u_k = 1 - k/S, sigma_k = shift u_k / (1 + (shift - 1) u_k); sigma_0 = 1, sigma_S = 0.
One SDE step from x (packed latents, (B, L, C)) with velocity v, dt = sigma_{k+1} - sigma_k < 0:

    sigma~ = sigma_k, except sigma_1 when sigma_k == 1     (no division by zero)
    std    = eta * sqrt(sigma_k / (1 - sigma~))
    mu     = x (1 + std^2 dt / (2 sigma_k)) + v (1 + std^2 (1 - sigma_k) / (2 sigma_k)) dt
    s      = std * sqrt(-dt)
    x'     = mu + s eps
    logp   = mean_d [ -(x' - mu)^2 / (2 s^2) - log s - log(2 pi) / 2 ]      (MEAN over elements)
"""

from __future__ import annotations

import math

import torch

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def sigma_schedule(steps: int, shift: float = 3.0) -> torch.Tensor:
    """(steps + 1,) float64 sigmas from 1 down to 0."""
    u = 1.0 - torch.arange(steps + 1, dtype=torch.float64) / steps
    return shift * u / (1.0 + (shift - 1.0) * u)


def step_noise_scale(sigmas: torch.Tensor, k: int, eta: float) -> tuple[float, float, float]:
    """(sigma_k, dt, s) of transition k -> k+1: the Gaussian's standard deviation s = std sqrt(-dt)."""
    sigma, sigma_next = float(sigmas[k]), float(sigmas[k + 1])
    sigma_tilde = float(sigmas[1]) if sigma == 1.0 else sigma
    std = eta * math.sqrt(sigma / (1.0 - sigma_tilde))
    dt = sigma_next - sigma
    return sigma, dt, std * math.sqrt(-dt)


def sde_mean(x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor, k: int, eta: float) -> torch.Tensor:
    """mu of transition k (same shape as x), computed in fp32."""
    sigma, dt, s = step_noise_scale(sigmas, k, eta)
    std2 = (s * s) / (-dt)  # = std^2
    x, v = x.float(), v.float()
    return x * (1.0 + std2 * dt / (2.0 * sigma)) + v * (1.0 + std2 * (1.0 - sigma) / (2.0 * sigma)) * dt


def log_prob(x_next: torch.Tensor, mu: torch.Tensor, s: float) -> torch.Tensor:
    """(B,) mean over all non-batch elements of the Gaussian log-density of x_next under N(mu, s^2)."""
    d = (x_next.float() - mu.float()).flatten(1)
    return (-(d ** 2) / (2.0 * s * s) - math.log(s) - LOG_SQRT_2PI).mean(dim=1)


def sde_step(x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor, k: int, eta: float,
             noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample x_{k+1} = mu + s * noise; returns (x_next, logp (B,), mu)."""
    _, _, s = step_noise_scale(sigmas, k, eta)
    mu = sde_mean(x, v, sigmas, k, eta)
    x_next = mu + s * noise.float()
    return x_next, log_prob(x_next, mu, s), mu


def clean_estimate(x: torch.Tensor, v: torch.Tensor, sigma: float) -> torch.Tensor:
    """x0_hat = x - sigma v: what the last step decodes."""
    return x.float() - sigma * v.float()


def ratio(logp_new: torch.Tensor, logp_old: torch.Tensor, mu_new: torch.Tensor, mu_old: torch.Tensor, s: float,
          rationorm: bool = True) -> torch.Tensor:
    """Importance ratio (B,). With rationorm (the reference's default):
    r = exp(s (logp_new - logp_old + mean_d (mu_new - mu_old)^2 / (2 s^2))) = exp(mean_d eps (mu_new - mu_old))."""
    if not rationorm:
        return torch.exp(logp_new - logp_old)
    drift = ((mu_new.float() - mu_old.float()) ** 2).flatten(1).mean(dim=1) / (2.0 * s * s)
    return torch.exp(s * (logp_new - logp_old + drift))


def clipped_loss(advantage: torch.Tensor, r: torch.Tensor, clip_range: float, dt: float) -> torch.Tensor:
    """(B,) per-sample loss of one trained step: max(-A r, -A clip(r, 1 - e, 1 + e)) / |dt|."""
    unclipped = -advantage * r
    clipped = -advantage * torch.clamp(r, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped) / abs(dt)
