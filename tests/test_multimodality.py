"""Diffusion Policy keeps both modes of a bimodal demonstration set; MSE regression averages them.

The toy task (diffusion_policy/toy.py): one constant observation, and action chunks that pass an
obstacle either on the left or on the right with probability 1/2 each. Both models share the same
ConditionalUnet1D and parameter count and are trained for the same steps; only the objective
differs. Implicit BC (an energy model sampled by Langevin MCMC) is checked against the same
yardstick. scripts/plot_multimodality.py draws the same experiment.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from toy import (
    BimodalTask,
    ToyTrainConfig,
    count_parameters,
    make_diffusion_policy,
    make_ibc_policy,
    make_mse_policy,
    policy_sampler,
    train_toy,
)

N_SAMPLES = 200


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task() -> BimodalTask:
    return BimodalTask()


@pytest.fixture(scope="module")
def data(task: BimodalTask) -> dict:
    return task.sample(1024, seed=0)


@pytest.fixture(scope="module")
def diffusion(task, data):
    policy = make_diffusion_policy(task, seed=0)
    losses = train_toy(policy, data, ToyTrainConfig(seed=0))
    return policy, losses


@pytest.fixture(scope="module")
def ibc(task, data):
    policy = make_ibc_policy(task, seed=0)
    losses = train_toy(policy, data, ToyTrainConfig(seed=0))
    return policy, losses


@pytest.fixture(scope="module")
def mse(task, data):
    policy = make_mse_policy(task, seed=0)
    losses = train_toy(policy, data, ToyTrainConfig(seed=0))
    return policy, losses


def test_the_data_is_bimodal_and_the_classifier_sees_it(task, data):
    """Sanity of the yardstick: demonstrations sit on the two modes, their mean on neither."""
    fr = task.mode_fractions(data["action"])
    assert fr == {"left": 0.5, "right": 0.5, "neither": 0.0}
    mean = data["action"].mean(0, keepdims=True)
    assert task.mode_fractions(mean)["neither"] == 1.0
    assert abs(task.side_score(mean)[0]) < 0.05
    np.testing.assert_allclose(task.side_score(task.mode_paths()), [-1.0, 1.0], atol=1e-6)


def test_same_network_size(diffusion, mse):
    """A fair comparison: identical denoiser/regressor architecture (within 10% parameters)."""
    n_dp, n_mse = count_parameters(diffusion[0]), count_parameters(mse[0])
    assert abs(n_dp - n_mse) <= 0.1 * n_dp, (n_dp, n_mse)


def test_both_models_trained(data, diffusion, mse):
    """Both converged, so the outcome below is the objective's doing, not a failure to train: the
    diffusion loss fell well below its start, and the MSE loss reached its floor, the variance of
    the (normalised) demonstrations around their mean."""
    _, dp_losses = diffusion
    assert np.mean(dp_losses[-30:]) < 0.2 * np.mean(dp_losses[:10])
    policy, mse_losses = mse
    naction = policy.normalizer.normalize("action", torch.from_numpy(data["action"]))
    floor = naction.var(0, unbiased=False).mean().item()
    assert 0.97 * floor < np.mean(mse_losses[-30:]) < 1.05 * floor
    assert np.mean(mse_losses[:10]) > 1.3 * floor


def _assert_samples_both_modes(task, policy) -> None:
    actions = policy_sampler(policy)(N_SAMPLES, torch.Generator().manual_seed(0))
    assert actions.shape == (N_SAMPLES, task.horizon, 2)
    fr = task.mode_fractions(actions)
    assert 0.25 <= fr["left"] <= 0.75, fr
    assert 0.25 <= fr["right"] <= 0.75, fr
    assert fr["neither"] <= 0.05, fr


def test_diffusion_policy_samples_both_modes(task, diffusion):
    _assert_samples_both_modes(task, diffusion[0])


def test_diffusion_sampling_is_seeded(diffusion):
    sample = policy_sampler(diffusion[0])
    a = sample(8, torch.Generator().manual_seed(5))
    b = sample(8, torch.Generator().manual_seed(5))
    c = sample(8, torch.Generator().manual_seed(6))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_mse_regressor_predicts_the_average(task, data, mse):
    """E[action | obs] of two symmetric modes is the straight path through the obstacle."""
    policy, _ = mse
    actions = policy_sampler(policy)(4, torch.Generator().manual_seed(0))
    assert task.mode_fractions(actions)["neither"] == 1.0
    assert np.abs(task.side_score(actions)).max() < 0.2
    mean = data["action"].mean(0)
    rms_to_mean = np.sqrt(((actions - mean) ** 2).mean(axis=(1, 2)))
    assert rms_to_mean.max() < 0.15
    # far from both modes: at least half the distance between them
    gap = np.sqrt(((task.mode_paths()[0] - task.mode_paths()[1]) ** 2).mean())
    assert task.mode_distances(actions).min() > 0.4 * gap


def test_implicit_bc_keeps_both_modes(task, ibc, mse):
    """An energy model with Langevin sampling also keeps both modes, where MSE lands in between."""
    _assert_samples_both_modes(task, ibc[0])
    regressed = policy_sampler(mse[0])(4, torch.Generator().manual_seed(0))
    assert task.mode_fractions(regressed)["neither"] == 1.0
