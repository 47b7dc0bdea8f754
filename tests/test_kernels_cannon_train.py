"""Per-pixel maximum-likelihood training against a scipy brute force and known truth."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from lamost_mdwarf.kernels.cannon_design import design_matrix
from lamost_mdwarf.kernels import cannon_train
from lamost_mdwarf.kernels.cannon_train import profile_likelihood, train_pixels

MASKED_IVAR = 1e-5


def simulate(seed, n_stars, n_pixels, scatter, sigma=0.01, masked_fraction=0.05, n_labels=4):
    """Fluxes drawn from a known quadratic model; masked entries get garbage flux and ivar 1e-5."""
    rng = np.random.default_rng(seed)
    design = design_matrix(rng.normal(size=(n_stars, n_labels)))
    theta = rng.normal(scale=0.05, size=(n_pixels, design.shape[1]))
    theta[:, 0] = 1.0
    ivar = (1.0 / sigma**2) * rng.uniform(0.3, 1.0, size=(n_stars, n_pixels))
    flux = design @ theta.T + rng.normal(size=ivar.shape) * np.sqrt(1.0 / ivar + scatter**2)
    masked = rng.random(ivar.shape) < masked_fraction
    ivar[masked] = MASKED_IVAR
    flux[masked] = rng.uniform(0.0, 3.0, size=masked.sum())
    return design, theta, flux, ivar, masked


def brute_force_nll(design, flux, ivar, scatter):
    """Exact profile NLL of one pixel at scatter s, theta from scipy-free weighted lstsq."""
    weight = ivar / (1.0 + ivar * scatter**2)
    root_w = np.sqrt(weight)
    theta, *_ = np.linalg.lstsq(design * root_w[:, None], flux * root_w, rcond=None)
    resid = flux - design @ theta
    return 0.5 * np.sum(weight * resid**2 - np.log(weight)), theta


def brute_force_pixel(design, flux, ivar):
    """scipy.optimize.minimize_scalar on ln s per pixel; the s = 0 boundary checked explicitly."""
    result = minimize_scalar(
        lambda log_s: brute_force_nll(design, flux, ivar, np.exp(log_s))[0],
        bounds=(np.log(1e-7), np.log(1.0)), method="bounded", options={"xatol": 1e-10},
    )
    nll_zero, theta_zero = brute_force_nll(design, flux, ivar, 0.0)
    if nll_zero <= result.fun:
        return 0.0, nll_zero, theta_zero
    s = float(np.exp(result.x))
    return s, result.fun, brute_force_nll(design, flux, ivar, s)[1]


@pytest.fixture(scope="module")
def small_problem():
    scatter = np.r_[np.zeros(6), np.linspace(0.002, 0.04, 18)]
    design, theta, flux, ivar, masked = simulate(1, n_stars=250, n_pixels=scatter.size, scatter=scatter)
    return design, theta, flux, ivar, masked, scatter


def test_agrees_with_per_pixel_scipy_brute_force(small_problem):
    design, _, flux, ivar, _, _ = small_problem
    result = train_pixels(design, flux, ivar)
    assert result.converged.all()
    for p in range(flux.shape[1]):
        s_ref, nll_ref, theta_ref = brute_force_pixel(design, flux[:, p], ivar[:, p])
        # Never worse than the brute force, and the same optimum.
        assert result.neg_log_likelihood[p] <= nll_ref + 1e-7
        np.testing.assert_allclose(np.sqrt(result.s2[p]), s_ref, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(result.theta[p], theta_ref, rtol=1e-6, atol=1e-8)
        nll_check = brute_force_nll(design, flux[:, p], ivar[:, p], np.sqrt(result.s2[p]))[0]
        np.testing.assert_allclose(result.neg_log_likelihood[p], nll_check, rtol=1e-10)


def test_s2_is_a_stationary_point_of_the_profile_likelihood(small_problem):
    design, _, flux, ivar, _, _ = small_problem
    result = train_pixels(design, flux, ivar)
    interior = result.s2 > 0
    assert interior.sum() >= 15
    for factor, sign in ((1 - 1e-3, 1), (1 + 1e-3, 1)):
        _, nll_moved = profile_likelihood(design, flux, ivar, result.s2 * factor)
        assert np.all(nll_moved[interior] >= result.neg_log_likelihood[interior] - 1e-9)
    # At the boundary the likelihood decreases away from s2 = 0.
    _, nll_up = profile_likelihood(design, flux, ivar, np.where(interior, result.s2, 1e-8))
    assert np.all(nll_up[~interior] >= result.neg_log_likelihood[~interior])


def test_recovers_known_theta_and_scatter():
    true_scatter = np.linspace(0.02, 0.04, 20)
    design, theta, flux, ivar, masked = simulate(7, n_stars=2500, n_pixels=20, scatter=true_scatter)
    result = train_pixels(design, flux, ivar)
    assert result.converged.all()
    ratio = np.sqrt(result.s2) / true_scatter
    assert np.all(np.abs(ratio - 1) < 0.08)
    assert abs(ratio.mean() - 1) < 0.02
    # theta within its statistical errors (covariance of the weighted least squares).
    z = []
    for p in range(20):
        weight = ivar[:, p] / (1 + ivar[:, p] * result.s2[p])
        cov = np.linalg.inv(design.T @ (weight[:, None] * design))
        z.append((result.theta[p] - theta[p]) / np.sqrt(np.diag(cov)))
    z = np.concatenate(z)
    assert np.max(np.abs(z)) < 5
    assert 0.85 < z.std() < 1.15


def test_zero_scatter_pixels_give_small_finite_scatter():
    design, _, flux, ivar, _ = simulate(3, n_stars=800, n_pixels=30, scatter=0.0, sigma=0.01)
    result = train_pixels(design, flux, ivar)
    assert result.converged.all()
    assert np.all(np.isfinite(result.s2)) and np.all(result.s2 >= 0)
    assert np.all(np.isfinite(result.theta))
    # MLE fluctuation: std(s2) ~ sqrt(2 / N) sigma^2 ~ 1e-5, i.e. s ~ 0.003; noise >= 0.01.
    assert np.sqrt(result.s2).max() < 0.005
    assert np.mean(result.s2 == 0) > 0.25  # the boundary is reached, not approximated


def test_inputs_untouched_and_masked_entries_barely_matter(small_problem):
    design, _, flux, ivar, masked, _ = small_problem
    copies = [a.copy() for a in (design, flux, ivar)]
    with_masked = train_pixels(design, flux, ivar)
    for original, copy in zip((design, flux, ivar), copies):
        np.testing.assert_array_equal(original, copy)
    assert np.all(ivar[masked] == MASKED_IVAR)  # never clamped
    dropped = train_pixels(design, flux, np.where(masked, 0.0, ivar))
    np.testing.assert_allclose(with_masked.theta, dropped.theta, atol=2e-4)
    np.testing.assert_allclose(np.sqrt(with_masked.s2), np.sqrt(dropped.s2), atol=2e-4)


def test_zero_ivar_entries_may_have_non_finite_flux(small_problem):
    design, _, flux, ivar, masked, _ = small_problem
    ivar0 = np.where(masked, 0.0, ivar)
    reference = train_pixels(design, np.where(masked, 0.5, flux), ivar0)
    result = train_pixels(design, np.where(masked, np.nan, flux), ivar0)
    np.testing.assert_allclose(result.theta, reference.theta, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(result.s2, reference.s2, rtol=1e-10, atol=1e-14)


def test_untrainable_pixel_is_flagged_not_fatal(small_problem):
    design, _, flux, ivar, _, _ = small_problem
    ivar = ivar.copy()
    ivar[:, 0] = 0.0
    result = train_pixels(design, flux, ivar)
    assert not result.converged[0]
    assert np.isnan(result.s2[0]) and np.all(np.isnan(result.theta[0]))
    assert result.converged[1:].all() and np.all(np.isfinite(result.theta[1:]))


def test_float32_input_and_iteration_count(small_problem):
    design, _, flux, ivar, _, _ = small_problem
    result64 = train_pixels(design, flux.astype(np.float32), ivar.astype(np.float32))
    assert result64.theta.dtype == np.float64
    assert result64.converged.all()
    assert result64.n_iterations.max() <= 12
    limited = train_pixels(design, flux, ivar, max_iterations=2)
    interior = result64.s2 > 0
    assert not limited.converged[interior].all()
    assert np.all(np.isfinite(limited.s2)) and np.all(limited.n_iterations <= 2)


def test_few_likelihood_evaluations_on_a_realistic_chunk():
    """Heteroscedastic noise, 5 % masked entries, scatter 0 and 0.1-3x the noise.

    The Newton search starts from the re-weighted moment estimate (about 1 % from the
    root): the s2 = 0 evaluation, the start and two Newton steps suffice for almost every
    pixel (the plain moment estimate, about 5 % off, needed 4.4 evaluations on average).
    """
    scatter = np.r_[np.zeros(30), np.geomspace(1e-3, 0.03, 270)]
    design, _, flux, ivar, _ = simulate(11, n_stars=1000, n_pixels=scatter.size, scatter=scatter)
    result = train_pixels(design, flux, ivar)
    assert result.converged.all()
    interior = result.s2 > 0
    assert 200 < interior.sum() < 300
    assert np.all(result.n_iterations[~interior] == 1)
    assert result.n_iterations[interior].mean() <= 4.1
    assert result.n_iterations.max() <= 5


def test_pixel_blocks_and_gathers_do_not_change_the_result(small_problem, monkeypatch):
    """Pixels are processed in cache-sized blocks; the result must not depend on them."""
    design, _, flux, ivar, _, _ = small_problem
    ivar = ivar.copy()
    ivar[:, [2, 9]] = 0.0  # untrainable columns: the blocks are gathered, not sliced
    reference = [train_pixels(design, flux[:, [p]], ivar[:, [p]]) for p in range(flux.shape[1])]
    monkeypatch.setattr(cannon_train, "_BLOCK_ENTRIES", 1)  # blocks of the minimum 16 pixels
    forward = train_pixels(design, flux, ivar)
    backward = train_pixels(design, flux[:, ::-1], ivar[:, ::-1])  # other pixels share a block
    backward = cannon_train.TrainingResult(*(a[::-1] for a in backward))
    for result in (forward, backward):
        for p, ref in enumerate(reference):
            np.testing.assert_allclose(result.s2[p], ref.s2[0], rtol=1e-7, atol=0)
            np.testing.assert_allclose(result.theta[p], ref.theta[0], rtol=1e-7, atol=1e-10)
            np.testing.assert_allclose(result.neg_log_likelihood[p], ref.neg_log_likelihood[0], rtol=1e-12)
            assert result.converged[p] == ref.converged[0]
            assert result.n_iterations[p] == ref.n_iterations[0]


def test_bad_input_raises():
    design, _, flux, ivar, _ = simulate(5, n_stars=40, n_pixels=3, scatter=0.01)
    with pytest.raises(ValueError, match="more training stars"):
        train_pixels(design[:15], flux[:15], ivar[:15])
    with pytest.raises(ValueError, match="shape"):
        train_pixels(design, flux[:, :2], ivar)
    with pytest.raises(ValueError, match="ivar"):
        train_pixels(design, flux, -ivar)
    bad_flux = flux.copy()
    bad_flux[0, 0] = np.nan
    with pytest.raises(ValueError, match="flux"):
        train_pixels(design, bad_flux, ivar)
    with pytest.raises(ValueError, match="tol"):
        train_pixels(design, flux, ivar, tol_log_s2=0.0)
