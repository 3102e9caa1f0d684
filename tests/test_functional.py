from __future__ import annotations

import pytest
import torch

from eclipse_transforms import functional as EF

from .conftest import H, W


def _ddpm_posterior_reference(x0_start, den, t_star, eps_init, step_noises):
    """A direct implementation of the paper's sampler (Ho et al. 2020), independent of diffusers' step().

    x_{t*} = sqrt(ab) x0 + sqrt(1 - ab) eps (formula 4); then for t = t*-1 .. 0 (0-indexed):
    x0_hat = (x_t - sqrt(1 - ab_t) eps_theta) / sqrt(ab_t), clipped to [-1, 1] (formula 15);
    mean = sqrt(ab_prev) beta_t / (1 - ab_t) x0_hat + sqrt(alpha_t) (1 - ab_prev) / (1 - ab_t) x_t (formula 7);
    var = (1 - ab_prev) / (1 - ab_t) beta_t; x_{t-1} = mean + sqrt(var) z, z = 0 at the last step.
    """
    ab = den.scheduler.alphas_cumprod.double()
    x = x0_start.double() * 2 - 1
    x = ab[t_star - 1].sqrt() * x + (1 - ab[t_star - 1]).sqrt() * eps_init.double()
    for k, t in enumerate(range(t_star - 1, -1, -1)):
        ab_t = ab[t]
        ab_prev = ab[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64)
        beta_t = 1 - ab_t / ab_prev
        eps = den(x.float(), torch.tensor(t)).double()
        x0_hat = ((x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()).clamp(-1, 1)
        mean = ab_prev.sqrt() * beta_t / (1 - ab_t) * x0_hat + (1 - beta_t).sqrt() * (1 - ab_prev) / (1 - ab_t) * x
        if t > 0:
            var = (1 - ab_prev) / (1 - ab_t) * beta_t
            x = mean + var.clamp(min=1e-20).sqrt() * step_noises[k].double()
        else:
            x = mean
    return (x / 2 + 0.5).clamp(0, 1).float()


def test_paper_sampler_matches_direct_ddpm_posterior(tiny):
    t_star, n = 12, 3
    x = torch.rand(n, 3, H, W)
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    ours = EF.purify(x, tiny, t_star, steps=None, generator=gens)
    # Replay the same per-image noise streams: the first draw is the forward noise, then one per step but the last.
    replay = [torch.Generator().manual_seed(i) for i in range(n)]
    draws = [[torch.randn(3, H, W, generator=g) for _ in range(t_star)] for g in replay]
    eps_init = torch.stack([d[0] for d in draws])
    step_noises = [torch.stack([d[k + 1] for d in draws]) for k in range(t_star - 1)]
    ref = _ddpm_posterior_reference(x, tiny, t_star, eps_init, step_noises)
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


def test_one_step_is_the_x0_estimate(tiny):
    t_star = 20
    x = torch.rand(2, 3, H, W)
    noisy = EF.forward_diffusion(x, tiny, t_star, generator=torch.Generator().manual_seed(0))
    out = EF.reverse_diffusion(noisy, tiny, t_star, steps=1, generator=torch.Generator().manual_seed(1))
    ab = tiny.scheduler.alphas_cumprod[t_star - 1]
    xt = noisy * 2 - 1
    with torch.no_grad():
        eps = tiny(xt, torch.tensor(t_star - 1))
    x0 = ((xt - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1) / 2 + 0.5
    assert torch.allclose(out, x0, atol=1e-5)


def test_diffuse_matches_forward_formula(tiny):
    x = torch.rand(2, 3, H, W)
    noisy = EF.forward_diffusion(x, tiny, 30, generator=torch.Generator().manual_seed(5))
    eps = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(5))
    ab = tiny.scheduler.alphas_cumprod[29]
    expected = (ab.sqrt() * (x * 2 - 1) + (1 - ab).sqrt() * eps) / 2 + 0.5
    assert torch.allclose(noisy, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("t_star", "steps", "expected"),
    [
        (10, None, list(range(9, -1, -1))),
        (10, 4, [9, 6, 3, 0]),
        (100, 1, [99]),
        (100, 2, [99, 0]),
        (5, 5, [4, 3, 2, 1, 0]),
    ],
)
def test_sampling_timesteps(t_star, steps, expected):
    assert EF.sampling_timesteps(t_star, steps) == expected


def test_respaced_timesteps_strictly_decrease():
    for t_star in (1, 2, 7, 100, 300):
        for steps in range(1, t_star + 1, max(1, t_star // 13)):
            ts = EF.sampling_timesteps(t_star, steps)
            assert len(ts) == steps and ts[0] == t_star - 1 and ts[-1] == (0 if steps > 1 else t_star - 1)
            assert all(a > b for a, b in zip(ts, ts[1:], strict=False))


def test_generators_make_images_independent_of_their_batch(tiny):
    x = torch.rand(4, 3, H, W)
    gens = lambda idx: [torch.Generator().manual_seed(i) for i in idx]  # noqa: E731
    whole = EF.purify(x, tiny, 10, steps=3, generator=gens(range(4)))
    parts = torch.cat(
        [
            EF.purify(x[:1], tiny, 10, steps=3, generator=gens([0])),
            EF.purify(x[1:], tiny, 10, steps=3, generator=gens([1, 2, 3])),
        ]
    )
    assert torch.allclose(whole, parts, atol=1e-5)


def test_compensation_statistics():
    torch.manual_seed(0)
    x = torch.full((4000, 3, 4, 4), 0.5)
    x[:, 0] = 0.9
    out = EF.corruption_compensation(x, p_gray=0.4, sigma=0.05, generator=torch.Generator().manual_seed(0))
    gray = (out[:, 0] - out[:, 2]).mean((1, 2)).abs() < 0.1
    assert 0.36 < gray.float().mean() < 0.44
    resid = out[~gray] - x[~gray]
    assert abs(resid.std().item() - 0.05) < 0.003 and abs(resid.mean().item()) < 0.003


@pytest.mark.parametrize(
    ("t_star", "match"), [(0, r"t_star must be in \[1, 100\]"), (101, r"t_star must be in"), (41, r"above t_max=40")]
)
def test_bad_t_star(tiny, t_star, match):
    with pytest.raises(ValueError, match=match):
        EF.forward_diffusion(torch.rand(1, 3, H, W), tiny, t_star)


@pytest.mark.parametrize("steps", [0, 11, -1])
def test_bad_steps(tiny, steps):
    with pytest.raises(ValueError, match=r"steps must be in \[1, t_star=10\]"):
        EF.reverse_diffusion(torch.rand(1, 3, H, W), tiny, 10, steps=steps)
