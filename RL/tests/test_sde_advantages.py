"""SDE step / log-prob / ratio / loss and advantages against hand-computed values and invariants."""

from __future__ import annotations

import math
import os

import pytest
import torch

from etchr_rl.advantages import combine, dist_gather, gdpo, group_normalise, zero_variance_fraction
from etchr_rl.sde import (clean_estimate, clipped_loss, log_prob, ratio, sde_mean, sde_step, sigma_schedule,
                          step_noise_scale)


def test_schedule_golden():
    s = sigma_schedule(25, 3.0)
    assert s.shape == (26,) and s[0] == 1.0 and s[-1] == 0.0
    assert s[5].item() == pytest.approx(3 * 0.8 / (1 + 2 * 0.8))  # u = 0.8 -> 0.923077
    assert torch.all(s[1:] < s[:-1])


def test_noise_scale_uses_sigma_1_at_sigma_0():
    s = sigma_schedule(25, 3.0)
    sigma, dt, scale = step_noise_scale(s, 0, 0.7)
    s1 = s[1].item()
    assert sigma == 1.0 and dt == pytest.approx(s1 - 1.0)
    assert scale == pytest.approx(0.7 * math.sqrt(1.0 / (1.0 - s1)) * math.sqrt(1.0 - s1))
    sigma, dt, scale = step_noise_scale(s, 10, 0.7)
    assert scale == pytest.approx(0.7 * math.sqrt(s[10].item() / (1 - s[10].item())) * math.sqrt(-dt))


def test_mean_by_hand():
    s = sigma_schedule(4, 3.0)  # [1, 0.9, 0.75, 0.5, 0]
    assert torch.allclose(s, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0], dtype=torch.float64))
    x, v = torch.tensor([[[1.0]]]), torch.tensor([[[0.5]]])
    # k = 2: sigma 0.75, dt = -0.25, std^2 = 0.49 * 0.75 / 0.25 = 1.47
    std2, dt, sg = 1.47, -0.25, 0.75
    expected = 1.0 * (1 + std2 * dt / (2 * sg)) + 0.5 * (1 + std2 * (1 - sg) / (2 * sg)) * dt
    assert sde_mean(x, v, s, 2, 0.7).item() == pytest.approx(expected, rel=1e-6)


def test_logp_is_a_mean_not_a_sum():
    mu = torch.zeros(2, 10, 4)
    lp = log_prob(mu.clone(), mu, 0.3)
    assert torch.allclose(lp, torch.full((2,), -math.log(0.3) - 0.5 * math.log(2 * math.pi)))
    x = mu.clone()
    x[0, 0, 0] = 0.3  # one element one sigma away: mean contribution -0.5 / 40
    assert lp[0] - log_prob(x, mu, 0.3)[0] == pytest.approx(0.5 / 40, rel=1e-5)


def test_recomputed_logprob_gives_ratio_one_and_perturbation_moves_it():
    torch.manual_seed(0)
    s = sigma_schedule(25, 3.0)
    x, v, noise = torch.randn(3, 16, 8), torch.randn(3, 16, 8), torch.randn(3, 16, 8)
    k = 7
    x_next, logp_old, mu_old = sde_step(x, v, s, k, 0.7, noise)
    _, _, sc = step_noise_scale(s, k, 0.7)
    mu_new = sde_mean(x, v, s, k, 0.7)  # same policy, recomputed
    logp_new = log_prob(x_next, mu_new, sc)
    assert torch.allclose(logp_new, logp_old) and torch.allclose(ratio(logp_new, logp_old, mu_new, mu_old, sc),
                                                                 torch.ones(3))
    mu_p = sde_mean(x, v + 0.05 * torch.randn_like(v), s, k, 0.7)
    r = ratio(log_prob(x_next, mu_p, sc), logp_old, mu_p, mu_old, sc)
    assert torch.all((r - 1).abs() > 1e-6)
    # the rationorm identity: r = exp(mean_d eps (mu_new - mu_old))
    assert torch.allclose(r, torch.exp((noise * (mu_p - mu_old)).flatten(1).mean(1)), rtol=1e-5)


def test_clean_estimate():
    assert clean_estimate(torch.tensor([2.0]), torch.tensor([1.0]), 0.5).item() == 1.5


def test_clipped_loss_by_hand():
    a = torch.tensor([1.0, 1.0, -1.0, -1.0])
    r = torch.tensor([1.5, 0.5, 1.5, 0.5])
    e, dt = 0.1, -0.04
    # A>0: max(-r, -clip(r)) -> r=1.5: max(-1.5,-1.1)=-1.1; r=0.5: max(-0.5,-0.9)=-0.5
    # A<0: max(r, clip(r))    -> r=1.5: 1.5;                r=0.5: max(0.5, 0.9)=0.9
    expected = torch.tensor([-1.1, -0.5, 1.5, 0.9]) / 0.04
    assert torch.allclose(clipped_loss(a, r, e, dt), expected)


def test_clipped_loss_gradient_is_zero_only_where_clipped_on_the_pessimistic_side():
    """d loss / d r = -A / |dt| inside [1 - e, 1 + e] and where the ratio moved against the advantage
    (A > 0, r < 1 - e; A < 0, r > 1 + e); 0 where it already moved with it (A > 0, r > 1 + e; A < 0,
    r < 1 - e): the pessimistic max keeps the clipped, constant term there."""
    e, dt = 1e-4, -0.25
    a = torch.tensor([2.0, 2.0, 2.0, -3.0, -3.0, -3.0], dtype=torch.float64)
    r = torch.tensor([1 + 5e-4, 1 - 5e-4, 1 + 5e-5, 1 - 5e-4, 1 + 5e-4, 1 - 5e-5], dtype=torch.float64,
                     requires_grad=True)
    loss = clipped_loss(a, r, e, dt)
    loss.sum().backward()
    expected_grad = torch.tensor([0.0, -2.0 / 0.25, -2.0 / 0.25, 0.0, 3.0 / 0.25, 3.0 / 0.25], dtype=torch.float64)
    assert torch.allclose(r.grad, expected_grad)
    # values: the clipped rows sit at the bound, the others are -A r / |dt|
    rd = r.detach()
    expected = torch.stack([-2 * (1 + e) * torch.ones(()), -2 * rd[1], -2 * rd[2], 3 * (1 - e) * torch.ones(()),
                            3 * rd[4], 3 * rd[5]]).double() / 0.25
    assert torch.allclose(loss.detach(), expected)
    # zero advantage: no gradient anywhere, clipped or not
    r0 = torch.tensor([0.5, 1.0, 1.5], requires_grad=True)
    clipped_loss(torch.zeros(3), r0, e, dt).sum().backward()
    assert torch.all(r0.grad == 0)


def test_group_normalise_with_none_and_degenerate_groups():
    r = [1.0, 0.0, 1.0, None, 0.5, None, 1.0, 1.0]
    g = [0, 0, 0, 0, 1, 1, 2, 2]
    a = group_normalise(r, g)
    sd = math.sqrt(1 / 3)  # unbiased std of (1, 0, 1)
    assert a[:4].tolist() == pytest.approx([(1 - 2 / 3) / sd, (0 - 2 / 3) / sd, (1 - 2 / 3) / sd, 0.0], rel=1e-6)
    assert a[4:].tolist() == [0.0, 0.0, 0.0, 0.0]  # one valid reward; all equal rewards


def test_combine_and_gdpo_single_process():
    rewards = {"guidance": [1.0, 0.0, None, 1.0], "correctness": [0.0, 0.0, None, 1.0]}
    a, valid = combine(rewards, {"guidance": 0.5, "correctness": 0.5}, [0, 0, 0, 0])
    sd_g = torch.tensor([1.0, 0.0, 1.0]).std().item()
    sd_c = torch.tensor([0.0, 0.0, 1.0]).std().item()
    exp0 = 0.5 * (1 - 2 / 3) / sd_g + 0.5 * (0 - 1 / 3) / sd_c
    assert a[0].item() == pytest.approx(exp0, rel=1e-6) and a[2].item() == 0.0
    assert valid.tolist() == [True, True, False, True]
    out = gdpo(a, valid)
    pool = a[valid]
    assert out[0].item() == pytest.approx(((a[0] - pool.mean()) / (pool.std() + 1e-8)).item(), rel=1e-6)
    assert out[2].item() == 0.0 and out.abs().max() <= 5.0
    with pytest.raises(KeyError, match="correctness"):
        combine({"guidance": [1.0]}, {"guidance": 0.5, "correctness": 0.5}, [0])


def test_zero_variance_fraction():
    a = torch.tensor([0.0, 0.0, 1.0, -1.0])
    assert zero_variance_fraction(a, [0, 0, 1, 1]) == 0.5


def _gdpo_worker(rank, world, port, q):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    local = [torch.tensor([3.0, -1.0, 0.5]), torch.tensor([10.0, 2.0, 0.0])][rank]
    valid = [torch.tensor([True, True, True]), torch.tensor([True, True, False])][rank]
    q.put((rank, gdpo(local, valid, clip=5.0, gather=dist_gather).tolist()))
    dist.destroy_process_group()


def test_gdpo_across_two_ranks_equals_the_pooled_computation():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_gdpo_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    pool = torch.tensor([3.0, -1.0, 0.5, 10.0, 2.0])  # the invalid sample is left out
    m, sd = pool.mean(), pool.std()
    expect0 = ((torch.tensor([3.0, -1.0, 0.5]) - m) / (sd + 1e-8)).tolist()
    expect1 = ((torch.tensor([10.0, 2.0]) - m) / (sd + 1e-8)).tolist() + [0.0]
    assert got[0] == pytest.approx(expect0, rel=1e-5) and got[1] == pytest.approx(expect1, rel=1e-5)
