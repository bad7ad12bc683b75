"""The math of DDPM (Ho et al. 2020) and DDIM (Song et al. 2021), checked against the schedulers the
policy actually builds (spec §4), so a diffusers upgrade or a config slip cannot change the process
silently.

Notation: beta_t, alpha_t = 1 - beta_t, abar_t = prod_{s <= t} alpha_s, abar_{-1} = 1; timesteps
t = 0..K-1 with K = 100. Everything is checked in float64 where the identity is exact, and at float32
precision where the scheduler computes in float32.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

from diffusion_policy.policies.diffusion import (
    DiffusionConfig,
    DiffusionPolicy,
    NoiseConfig,
    UnetConfig,
    make_scheduler,
)
from diffusion_policy.shapes import ObsSpec, ShapeMeta

K = 100


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sched() -> DDPMScheduler:
    """The training scheduler exactly as DiffusionPolicy builds it."""
    s = make_scheduler(NoiseConfig(), "ddpm")
    assert isinstance(s, DDPMScheduler)
    return s


@pytest.fixture(scope="module")
def sch(sched: DDPMScheduler) -> dict[str, np.ndarray]:
    """The scheduler's betas in float64, with alpha and abar recomputed from them so that the
    identities below hold to float64 precision (the scheduler's own abar is checked separately)."""
    beta = sched.betas.double().numpy()
    alpha = 1.0 - beta
    abar = np.cumprod(alpha)
    return {"beta": beta, "alpha": alpha, "abar": abar, "abar_prev": np.r_[1.0, abar[:-1]]}


def posterior(sch: dict[str, np.ndarray], t: int, x0, xt):
    """q(x_{t-1} | x_t, x0) = N(mu_tilde, beta_tilde) in the closed form of DDPM eq. (6)-(7)."""
    beta, alpha, abar, abar_prev = (
        float(sch[k][t]) for k in ("beta", "alpha", "abar", "abar_prev")
    )
    mu = (math.sqrt(abar_prev) * beta / (1 - abar)) * x0 + (
        math.sqrt(alpha) * (1 - abar_prev) / (1 - abar)
    ) * xt
    var = (1 - abar_prev) / (1 - abar) * beta
    return mu, var


def log_normal(x, mean, var):
    return -0.5 * np.log(2 * np.pi * var) - (x - mean) ** 2 / (2 * var)


# --- the schedule ------------------------------------------------------------------------------


def test_policy_builds_the_reference_scheduler():
    """DiffusionPolicy's training scheduler is DDPM(100, squaredcos_cap_v2, clip, epsilon, fixed_small)."""
    ref = DDPMScheduler(
        num_train_timesteps=100,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=True,
        prediction_type="epsilon",
    )
    policy = DiffusionPolicy(
        DiffusionConfig(
            horizon=4, n_obs_steps=1, n_action_steps=4, unet=UnetConfig(16, [8, 16], 3, 8)
        ),
        ShapeMeta(obs={"s": ObsSpec((1,), "float32", "low_dim")}, action_dim=2),
    )
    got = policy.noise_scheduler
    assert isinstance(got, DDPMScheduler)
    for key in ("num_train_timesteps", "beta_schedule", "clip_sample", "prediction_type"):
        assert got.config[key] == ref.config[key], key
    assert got.config.variance_type == "fixed_small"
    assert got.config.clip_sample_range == 1.0 and not got.config.thresholding
    torch.testing.assert_close(got.betas, ref.betas, rtol=0, atol=0)
    torch.testing.assert_close(got.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=0)


def test_cosine_schedule_values(sched, sch):
    """Spec §4.1: the sample values, and every beta from the squaredcos_cap_v2 formula."""
    beta = sched.betas.double().numpy()
    abar = sched.alphas_cumprod.double().numpy()
    assert beta[0] == pytest.approx(6.31e-4, rel=1e-3)
    assert beta[49] == pytest.approx(0.0306, rel=1e-3)
    assert beta[98] == pytest.approx(0.750, rel=1e-3)
    assert beta[99] == pytest.approx(0.999, rel=1e-7)
    assert abar[0] == pytest.approx(0.99937, rel=1e-5)
    assert abar[49] == pytest.approx(0.4938, rel=1e-3)
    assert abar[99] == pytest.approx(2.4e-7, rel=0.02)

    def f(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    want = np.array([min(1 - f((i + 1) / K) / f(i / K), 0.999) for i in range(K)])
    np.testing.assert_allclose(beta, want, rtol=1e-6)
    # The cap only bites at the last step; before it abar telescopes to f((t+1)/K) / f(0).
    assert (beta[:-1] < 0.999).all()
    telescoped = np.array([f((t + 1) / K) / f(0) for t in range(K - 1)])
    np.testing.assert_allclose(abar[:-1], telescoped, rtol=1e-5)
    # The scheduler's alphas and abar are 1 - beta and its cumulative product (float32 precision).
    np.testing.assert_allclose(sched.alphas.double().numpy(), 1 - beta, rtol=1e-6)
    np.testing.assert_allclose(abar, sch["abar"], rtol=2e-5)


# --- forward process ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_add_noise_is_the_closed_form(sched, dtype, tol):
    """add_noise(x0, eps, t) = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, per sample t, every t."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(K, 8, 2, generator=g, dtype=dtype)
    eps = torch.randn(K, 8, 2, generator=g, dtype=dtype)
    t = torch.randperm(K, generator=g)
    abar = sched.alphas_cumprod.double()[t][:, None, None]
    want = abar.sqrt() * x0.double() + (1 - abar).sqrt() * eps.double()
    got = sched.add_noise(x0, eps, t)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tol)


def test_add_noise_composes_the_one_step_kernels(sched, sch):
    """Iterating q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t) analytically gives add_noise's
    marginal: mean m_t x0 with m_t = prod sqrt(alpha_s), variance v_t = alpha_t v_{t-1} + beta_t."""
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    m, v = 1.0, 0.0
    for t in range(K):
        m = math.sqrt(sch["alpha"][t]) * m
        v = sch["alpha"][t] * v + sch["beta"][t]
        ts = torch.tensor([t])
        # add_noise is linear in (x0, eps): read off its mean coefficient and its std
        mean_coef = sched.add_noise(one, zero, ts).item()
        std = sched.add_noise(zero, one, ts).item()
        assert mean_coef == pytest.approx(m, rel=1e-5, abs=1e-9), t
        assert std**2 == pytest.approx(v, rel=1e-5, abs=1e-6), t
    assert v == pytest.approx(1.0, abs=1e-6)  # x_{K-1} is (almost) pure noise


def test_add_noise_matches_monte_carlo_of_the_chain(sched, sch):
    """Simulating the Markov chain with many samples reproduces add_noise's mean and variance."""
    n = 50_000
    x0 = torch.tensor([0.7, -0.3], dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x = x0.expand(n, 2).clone()
    checked = 0
    for t in range(K):
        x = math.sqrt(sch["alpha"][t]) * x + math.sqrt(sch["beta"][t]) * torch.randn(
            n, 2, generator=g, dtype=torch.float64
        )
        if t not in (0, 3, 20, 49, 80, 99):
            continue
        ts = torch.tensor([t])
        mean = sched.add_noise(x0[None], torch.zeros(1, 2, dtype=torch.float64), ts)[0]
        var = sched.add_noise(torch.zeros(1), torch.ones(1, dtype=torch.float64), ts).item() ** 2
        se_mean, se_var = math.sqrt(var / n), var * math.sqrt(2 / (n - 1))
        assert (x.mean(0) - mean).abs().max() < 5 * se_mean, t
        assert (x.var(0) - var).abs().max() < 5 * se_var, t
        checked += 1
    assert checked == 6


# --- reverse process: the posterior and the scheduler's step -----------------------------------


@pytest.mark.parametrize("t", [1, 2, 10, 49, 90, 98, 99])
def test_posterior_is_bayes_rule(sch, t):
    """log q(x_{t-1}|x_t,x0) = log q(x_t|x_{t-1}) + log q(x_{t-1}|x0) - log q(x_t|x0) pointwise,
    with the forward kernels and marginals on the right: the closed form is the exact posterior."""
    rng = np.random.default_rng(t)
    for x0, xt in rng.normal(0, 1, (5, 2)):
        mu, var = posterior(sch, t, x0, xt)
        xprev = mu + math.sqrt(var) * np.linspace(-4, 4, 9)
        bayes = (
            log_normal(xt, math.sqrt(sch["alpha"][t]) * xprev, sch["beta"][t])
            + log_normal(xprev, math.sqrt(sch["abar_prev"][t]) * x0, 1 - sch["abar_prev"][t])
            - log_normal(xt, math.sqrt(sch["abar"][t]) * x0, 1 - sch["abar"][t])
        )
        np.testing.assert_allclose(bayes, log_normal(xprev, mu, var), rtol=1e-9, atol=1e-9)


def test_posterior_at_t0_is_the_data(sch):
    """With abar_{-1} = 1 the last reverse step is deterministic and lands on x0."""
    mu, var = posterior(sch, 0, 0.37, -1.5)
    assert mu == pytest.approx(0.37, abs=1e-12)
    assert var == 0.0


def test_epsilon_form_of_the_mean(sch):
    """(1/sqrt(alpha_t)) (x_t - beta_t / sqrt(1 - abar_t) eps) = mu_tilde(x0(eps), x_t) for every t."""
    rng = np.random.default_rng(0)
    xt, eps = rng.normal(0, 1, (2, 16))
    for t in range(K):
        x0 = (xt - math.sqrt(1 - sch["abar"][t]) * eps) / math.sqrt(sch["abar"][t])
        mu, _ = posterior(sch, t, x0, xt)
        eps_mean = (xt - sch["beta"][t] / math.sqrt(1 - sch["abar"][t]) * eps) / math.sqrt(
            sch["alpha"][t]
        )
        np.testing.assert_allclose(eps_mean, mu, rtol=1e-7, atol=1e-9 / math.sqrt(sch["abar"][t]))


@pytest.mark.parametrize("t", [0, 1, 10, 49, 98, 99])
def test_scheduler_step_is_the_posterior(sched, sch, t):
    """scheduler.step(true eps, t, x_t) = mu_tilde + sqrt(beta_tilde) z with z ~ N(0, I).

    The mean is checked exactly: two different inputs stepped with the same generator seed must
    leave the same residual (the noise), whatever way diffusers draws it. The residual's moments
    then check the variance, and _get_variance is beta_tilde itself.
    """
    n = 50_000
    residuals = []
    for seed in (10, 11):
        g = torch.Generator().manual_seed(seed)
        x0 = torch.rand(n, 2, generator=g) * 1.8 - 0.9  # inside the clip range [-1, 1]
        eps = torch.randn(n, 2, generator=g)
        xt = sched.add_noise(x0, eps, torch.tensor([t]))
        out = sched.step(eps, t, xt, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(
            out.pred_original_sample, x0, rtol=0, atol=2e-3 if t > 90 else 1e-4
        )
        mu, var = posterior(sch, t, x0.double(), xt.double())
        residuals.append(out.prev_sample.double() - mu)
    torch.testing.assert_close(residuals[0], residuals[1], rtol=0, atol=5e-5)
    r = residuals[0]
    if t == 0:
        assert r.abs().max() < 1e-5  # no noise on the last step
        return
    assert float(sched._get_variance(t)) == pytest.approx(var, rel=1e-5)
    se_mean, se_var = math.sqrt(var / n), var * math.sqrt(2 / (n - 1))
    assert r.mean(0).abs().max() < 5 * se_mean
    assert (r.var(0) - var).abs().max() < 5 * se_var
    # fixed_small is the posterior variance, not beta_t (fixed_large); they differ most at small t
    if t == 1:
        assert var < 0.5 * sch["beta"][t]


# --- the training loss -------------------------------------------------------------------------


def tiny_policy(horizon: int = 8, action_dim: int = 2, obs_dim: int = 3) -> DiffusionPolicy:
    cfg = DiffusionConfig(
        horizon=horizon,
        n_obs_steps=2,
        n_action_steps=2,
        unet=UnetConfig(diffusion_step_embed_dim=16, down_dims=[16, 32], kernel_size=3),
    )
    meta = ShapeMeta(
        obs={"state": ObsSpec((obs_dim,), "float32", "low_dim")}, action_dim=action_dim
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return DiffusionPolicy(cfg, meta)


def test_compute_loss_is_l_simple():
    """compute_loss = mean ||eps - eps_theta(sqrt(abar_t) a0 + sqrt(1 - abar_t) eps, t, o)||^2,
    recomputed here by hand: min-max normalisation, noising, and time-major obs conditioning."""
    policy = tiny_policy()
    rng = np.random.default_rng(0)
    actions = rng.uniform(-3, 5, (50, 8, 2)).astype(np.float32)
    states = rng.normal(2, 4, (50, 2, 3)).astype(np.float32)
    policy.fit_normalizer({"action": actions, "state": states})
    b = 6
    g = torch.Generator().manual_seed(0)
    drawn = policy.sample_training_noise(b, g)
    batch = {
        "obs": {"state": torch.from_numpy(states[:b])},
        "action": torch.from_numpy(actions[:b]),
        **drawn,
    }
    loss = policy.compute_loss(batch)

    def minmax(x: np.ndarray, data: np.ndarray) -> torch.Tensor:
        lo, hi = data.reshape(-1, x.shape[-1]).min(0), data.reshape(-1, x.shape[-1]).max(0)
        return torch.from_numpy(2 * (x - lo) / (hi - lo) - 1).float()

    a0 = minmax(actions[:b], actions)
    cond = minmax(states[:b], states).reshape(b, 2 * 3)  # [o_0, o_1] flattened time-major
    abar = policy.noise_scheduler.alphas_cumprod[drawn["timesteps"]][:, None, None]
    xt = abar.sqrt() * a0 + (1 - abar).sqrt() * drawn["noise"]
    with torch.no_grad():
        want = ((policy.model(xt, drawn["timesteps"], cond) - drawn["noise"]) ** 2).mean()
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)
    # the timesteps matter: the same noise at other noise levels gives another loss
    shuffled = {**batch, "timesteps": (drawn["timesteps"] + 50) % K}
    assert abs(policy.compute_loss(shuffled).item() - loss.item()) > 1e-4
    loss.backward()  # and it is differentiable end to end
    assert all(p.grad is not None for p in policy.model.parameters())


# --- sampling with an oracle denoiser ----------------------------------------------------------


class OracleEpsilon(nn.Module):
    """eps*(x_t, t) = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t): the exact denoiser when the data
    distribution is a point mass at x0. Records every (t, x_t) it is asked about."""

    def __init__(self, x0: torch.Tensor, alphas_cumprod: torch.Tensor, keep=range(K)):
        super().__init__()
        self.x0 = x0
        self.abar = alphas_cumprod.double()
        self.keep = set(keep)  # timesteps whose x_t is stored (all are listed in `ts`)
        self.ts: list[int] = []
        self.seen: list[tuple[int, torch.Tensor]] = []

    def forward(self, sample, timestep, global_cond=None):
        t = int(timestep)
        self.ts.append(t)
        if t in self.keep:
            self.seen.append((t, sample.clone()))
        abar = self.abar[t]
        return ((sample.double() - abar.sqrt() * self.x0) / (1 - abar).sqrt()).to(sample.dtype)


@pytest.mark.parametrize("kind,steps", [("ddpm", 100), ("ddim", 100), ("ddim", 10), ("ddpm", 10)])
def test_oracle_sampling_recovers_x0(kind, steps):
    """With the exact denoiser both samplers, run through DiffusionPolicy.conditional_sample, end
    exactly at x0 from any starting noise."""
    policy = tiny_policy(horizon=4)
    policy.set_sampler(kind, steps)
    x0 = torch.tensor([[0.5, -0.25], [0.9, 0.0], [-0.7, 0.3], [0.1, -0.95]], dtype=torch.float64)
    policy.model = OracleEpsilon(x0, policy.sampler.alphas_cumprod)
    cond = torch.zeros(64, 2 * 3)
    out = policy.conditional_sample(cond, generator=torch.Generator().manual_seed(0))
    assert out.shape == (64, 4, 2)
    torch.testing.assert_close(out.double(), x0.expand(64, 4, 2), rtol=0, atol=1e-5)
    ts = policy.model.ts
    assert len(ts) == steps and ts[-1] == 0 and ts == sorted(ts, reverse=True)
    if steps == K:
        assert ts == list(range(K - 1, -1, -1))


def test_oracle_ddpm_walks_the_forward_marginals():
    """Ancestral sampling with the exact posterior (DDPM) visits x_t ~ q(x_t | x0) at every t: the
    reverse chain reproduces the forward marginals, not just the end point."""
    policy = tiny_policy(horizon=4)
    x0 = torch.tensor([0.6, -0.4], dtype=torch.float64)
    policy.model = OracleEpsilon(x0, policy.sampler.alphas_cumprod, keep=(98, 70, 40, 10, 1))
    n = 5_000
    policy.conditional_sample(torch.zeros(n, 6), generator=torch.Generator().manual_seed(3))
    abar = policy.sampler.alphas_cumprod.double()
    assert len(policy.model.seen) == 5
    for t, x in policy.model.seen:
        x = x.double().reshape(-1, 2)  # 4 time steps x n samples, all i.i.d.
        mean, var = abar[t].sqrt() * x0, 1 - abar[t]
        m = x.shape[0]
        assert (x.mean(0) - mean).abs().max() < 5 * math.sqrt(var / m), t
        assert (x.var(0) - var).abs().max() < 5 * var * math.sqrt(2 / (m - 1)), t


def test_oracle_ddim_keeps_the_noise_fixed():
    """DDIM with eta = 0 moves x_t along sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with eps fixed: the
    deterministic path implied by the starting noise."""
    policy = tiny_policy(horizon=4)
    policy.set_sampler("ddim", 100)
    x0 = torch.tensor([0.6, -0.4], dtype=torch.float64)
    policy.model = OracleEpsilon(x0, policy.sampler.alphas_cumprod)
    noise = torch.randn(8, 4, 2, generator=torch.Generator().manual_seed(0))
    policy.conditional_sample(torch.zeros(8, 6), noise=noise)
    abar = policy.sampler.alphas_cumprod.double()
    eps = [
        ((x.double() - abar[t].sqrt() * x0) / (1 - abar[t]).sqrt()) for t, x in policy.model.seen
    ]
    first = eps[0]
    for (t, _), e in zip(policy.model.seen, eps):
        torch.testing.assert_close(e, first, rtol=0, atol=1e-3, msg=f"t={t}")
    # and the implied noise is the starting noise, up to the sqrt(abar_99) ~ 5e-4 signal left in x_99
    torch.testing.assert_close(first, noise.double(), rtol=0, atol=2e-3)
