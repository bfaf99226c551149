"""The SFT objective (PROTOCOL.md section 1) against hand-computed values."""

import math

import pytest
import torch

from etchr_sft.objective import lookup, make_schedule, noisy_input, sample_generator, weighted_mse


def test_schedule_golden_values():
    s = make_schedule()
    e = math.exp(0.8)
    assert s.sigmas[0].item() == pytest.approx(1.0)  # s = 1
    assert s.sigmas[-1].item() == pytest.approx(e / (e + 1000 - 1))  # s = 1/1000: 0.0022228...
    i = 499  # s_i = 1 - 499 * (1 - 1/1000) / 999
    si = 1 - 499 * (1 - 1e-3) / 999
    assert s.sigmas[i].item() == pytest.approx(e / (e + 1 / si - 1))
    assert torch.allclose(s.timesteps, 1000 * s.sigmas)
    assert torch.all(s.sigmas[1:] < s.sigmas[:-1])  # decreasing


def test_weights_mean_one_peak_at_500():
    s = make_schedule()
    assert s.weights.mean().item() == pytest.approx(1.0)
    assert s.weights.min().item() == pytest.approx(0.0)  # y -= min(y)
    peak = s.timesteps[s.weights.argmax()].item()
    assert abs(peak - 500) < 2.0
    y = torch.exp(-2 * ((s.timesteps - 500) / 1000) ** 2)
    y = y - y.min()
    assert torch.allclose(s.weights, 1000 * y / y.sum())


def test_lookup_exact_and_reference_bf16():
    s = make_schedule()
    idx = torch.tensor([0, 123, 999])
    sigma, t, w = lookup(s, idx, "exact")
    assert torch.equal(sigma, s.sigmas[idx]) and torch.allclose(t, s.timesteps[idx] / 1000)
    sigma_b, t_b, w_b = lookup(s, idx, "reference_bf16")
    rounded = s.timesteps[idx].to(torch.bfloat16).double()
    assert torch.allclose(t_b, rounded / 1000)
    j = (s.timesteps[None] - rounded[:, None]).abs().argmin(1)
    assert torch.equal(sigma_b, s.sigmas[j]) and torch.equal(w_b, s.weights[j])
    assert (j != idx).any()  # bf16 has ~3 significant digits: it does move some indices
    with pytest.raises(ValueError, match="exact or reference_bf16"):
        lookup(s, idx, "fp8")


def test_noisy_input_and_target():
    x0 = torch.tensor([[[1.0, 2.0]], [[3.0, -1.0]]])  # (B=2, L=1, C=2)
    eps = torch.tensor([[[0.5, 0.5]], [[-1.0, 1.0]]])
    x_t, target = noisy_input(x0, eps, torch.tensor([0.0, 0.25]))
    assert torch.allclose(x_t[0], x0[0])  # sigma 0: clean
    assert torch.allclose(x_t[1], 0.75 * x0[1] + 0.25 * eps[1])
    assert torch.allclose(target, eps - x0)


def test_weighted_mse_by_hand():
    pred = torch.tensor([[[1.0, 1.0]], [[0.0, 2.0]]])
    tgt = torch.tensor([[[0.0, 1.0]], [[0.0, 0.0]]])
    # sample 0: mean((1,0)^2) = 0.5, weight 2 -> 1.0; sample 1: mean((0,2)^2) = 2, weight 0.5 -> 1.0
    assert weighted_mse(pred, tgt, torch.tensor([2.0, 0.5])).item() == pytest.approx(1.0)


def test_sample_rng_depends_on_sample_not_process():
    a = torch.randn(4, generator=sample_generator(42, 0, 7))
    assert torch.equal(a, torch.randn(4, generator=sample_generator(42, 0, 7)))
    assert not torch.equal(a, torch.randn(4, generator=sample_generator(42, 1, 7)))
    assert not torch.equal(a, torch.randn(4, generator=sample_generator(42, 0, 8)))
