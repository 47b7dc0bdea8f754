"""The batched test step: exact chi2, recovery, calibrated physical errors, multi-start."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from lamost_mdwarf.kernels.cannon_design import design_jacobian, design_matrix, scale_labels, unscale_labels
from lamost_mdwarf.kernels.cannon_infer import (
    InferenceStatus,
    chi2_from_statistics,
    infer_labels,
    starting_points_from_training,
    sufficient_statistics,
)

PIVOTS = np.array([3500.0, 0.40, 0.40, 0.030])  # K, Rsun, Msun, Lsun
SCALES = np.array([250.0, 0.15, 0.15, 0.020])


def make_model(seed, n_pixels=600, n_terms=15, s2=1e-4):
    rng = np.random.default_rng(seed)
    theta = rng.normal(scale=0.05, size=(n_pixels, n_terms))
    theta[:, 0] = 1.0
    return theta, np.full(n_pixels, s2)


def observe(seed, theta, s2, scaled_labels, sigma=0.01):
    """Spectra of given scaled labels drawn from the model, with noise sigma and scatter s2."""
    rng = np.random.default_rng(seed)
    shape = (scaled_labels.shape[0], theta.shape[0])
    ivar = (1.0 / sigma**2) * rng.uniform(0.5, 1.0, size=shape)
    flux = design_matrix(scaled_labels) @ theta.T + rng.normal(size=shape) * np.sqrt(1.0 / ivar + s2)
    return flux, ivar


@pytest.fixture(scope="module")
def simulated():
    theta, s2 = make_model(0)
    rng = np.random.default_rng(1)
    true_scaled = rng.normal(scale=0.8, size=(400, 4))
    flux, ivar = observe(2, theta, s2, true_scaled)
    training = unscale_labels(rng.normal(size=(300, 4)), PIVOTS, SCALES)
    starts = starting_points_from_training(training)
    return theta, s2, flux, ivar, true_scaled, starts


@pytest.fixture(scope="module")
def inferred(simulated):
    theta, s2, flux, ivar, _, starts = simulated
    return infer_labels(flux, ivar, theta, s2, PIVOTS, SCALES, starts)


def direct_chi2(flux, ivar, theta, s2, scaled_labels):
    weight = ivar / (1.0 + ivar * s2)
    model = design_matrix(scaled_labels) @ theta.T
    return np.sum(weight * (flux - model) ** 2, axis=1)


def test_sufficient_statistics_chi2_equals_direct_sum(simulated):
    theta, s2, flux, ivar, true_scaled, _ = simulated
    ivar = ivar.copy()
    ivar[:, ::7] = 1e-5  # masked pixels keep their tiny weight in both
    stats = sufficient_statistics(flux, ivar, theta, s2)
    rng = np.random.default_rng(5)
    for x in (true_scaled, true_scaled + 0.3 * rng.normal(size=true_scaled.shape), np.zeros_like(true_scaled)):
        np.testing.assert_allclose(chi2_from_statistics(stats, x), direct_chi2(flux, ivar, theta, s2, x), rtol=1e-9)
    several = np.stack([true_scaled, -true_scaled], axis=1)
    np.testing.assert_allclose(
        chi2_from_statistics(stats, several)[:, 1], direct_chi2(flux, ivar, theta, s2, -true_scaled), rtol=1e-9
    )
    assert np.all(stats.n_good_pixels == flux.shape[1] - len(range(0, flux.shape[1], 7)))
    np.testing.assert_allclose(stats.quadratic, np.swapaxes(stats.quadratic, 1, 2))


def test_recovers_labels_with_calibrated_physical_errors(simulated, inferred):
    *_, true_scaled, _ = simulated
    result = inferred
    assert np.all(result.status == InferenceStatus.OK) and result.converged.all()
    truth = unscale_labels(true_scaled, PIVOTS, SCALES)
    errors = np.sqrt(np.diagonal(result.covariance, axis1=1, axis2=2))
    z = (result.labels - truth) / errors
    np.testing.assert_allclose(z.std(axis=0), 1.0, atol=0.1)
    assert np.all(np.abs(z.mean(axis=0)) < 0.15)
    # Errors are in physical units: Teff errors of order a kelvin, not ~0.005 (scaled).
    assert 0.3 < np.median(errors[:, 0]) < 10
    np.testing.assert_allclose(result.reduced_chi2.mean(), 1.0, atol=0.02)
    assert np.all(result.n_good_pixels == 600)


def test_covariance_is_inverse_exact_hessian_or_gauss_newton(simulated, inferred):
    theta, s2, flux, ivar, _, starts = simulated
    stats = sufficient_statistics(flux[:5], ivar[:5], theta, s2)
    x_best = scale_labels(inferred.labels[:5], PIVOTS, SCALES)
    h = 1e-3
    eye = np.eye(4) * h
    numeric = np.empty((5, 4, 4))
    for k in range(4):
        for m in range(4):
            f = lambda dx: chi2_from_statistics(stats, x_best + dx) / 2  # noqa: E731
            numeric[:, k, m] = (
                f(eye[k] + eye[m]) - f(eye[k] - eye[m]) - f(-eye[k] + eye[m]) + f(-eye[k] - eye[m])
            ) / (4 * h * h)
    cov_scaled = inferred.covariance[:5] / np.outer(SCALES, SCALES)
    np.testing.assert_allclose(cov_scaled @ numeric, np.broadcast_to(np.eye(4), (5, 4, 4)), atol=1e-4)

    gauss_newton = infer_labels(flux[:5], ivar[:5], theta, s2, PIVOTS, SCALES, starts, covariance="gauss_newton")
    jac = design_jacobian(x_best)
    expected = np.linalg.inv(np.einsum("ntk,ntu,nul->nkl", jac, stats.quadratic, jac))
    np.testing.assert_allclose(gauss_newton.covariance / np.outer(SCALES, SCALES), expected, rtol=1e-6)
    np.testing.assert_allclose(gauss_newton.labels, inferred.labels[:5])


def test_errors_scale_with_physical_units(simulated, inferred):
    theta, s2, flux, ivar, _, starts = simulated
    rescaled = infer_labels(flux[:20], ivar[:20], theta, s2, 1000 * PIVOTS, 1000 * SCALES, 1000 * starts)
    np.testing.assert_allclose(rescaled.labels, 1000 * inferred.labels[:20], rtol=1e-7)
    np.testing.assert_allclose(rescaled.covariance, 1e6 * inferred.covariance[:20], rtol=1e-6)
    np.testing.assert_allclose(rescaled.chi2, inferred.chi2[:20], rtol=1e-9)


def test_multi_start_finds_the_global_minimum():
    # One label, model m(x) = th0 + th1 x + th2 x^2 with th1 = -1.5 th2 + small orthogonal
    # part: chi2(x) ~ (x - 2)^2 [|th2|^2 (x + 0.5)^2 + e] has its global minimum at the
    # truth x = 2 and a local one near x = -0.5, which is where descent from x = 0 ends.
    rng = np.random.default_rng(11)
    n_pixels = 200
    th2 = rng.normal(scale=0.05, size=n_pixels)
    ortho = rng.normal(size=n_pixels)
    ortho -= th2 * (ortho @ th2) / (th2 @ th2)
    ortho *= 0.1 * np.linalg.norm(th2) / np.linalg.norm(ortho)
    theta = np.column_stack([np.ones(n_pixels), -1.5 * th2 + ortho, th2])
    s2 = np.zeros(n_pixels)
    flux, ivar = observe(12, theta, s2, np.full((3, 1), 2.0))
    pivots, scales = np.array([10.0]), np.array([2.0])

    single = infer_labels(flux, ivar, theta, s2, pivots, scales, pivots[None, :])
    assert single.converged.all()
    np.testing.assert_allclose(scale_labels(single.labels, pivots, scales), -0.5, atol=0.15)

    starts = np.array([[10.0], [13.0], [6.0]])  # scaled 0, 1.5, -2
    multi = infer_labels(flux, ivar, theta, s2, pivots, scales, starts)
    assert np.all(multi.status == InferenceStatus.OK)
    np.testing.assert_allclose(scale_labels(multi.labels, pivots, scales), 2.0, atol=0.01)
    assert np.all(multi.start_index == 1)
    assert np.all(multi.chi2 < single.chi2 - 100)


def test_inputs_are_not_modified(simulated):
    theta, s2, flux, ivar, _, starts = simulated
    arrays = [flux[:10].copy(), ivar[:10].copy(), theta, s2, PIVOTS, SCALES, starts]
    arrays[0][0, 3] = np.nan  # non-finite flux and ivar are zero-weighted in a copy
    arrays[1][1, 4] = np.inf
    copies = [a.copy() for a in arrays]
    infer_labels(*arrays)
    for original, copy in zip(arrays, copies):
        np.testing.assert_array_equal(original, copy)


def test_masked_pixels_barely_affect_results(simulated, inferred):
    theta, s2, flux, ivar, true_scaled, starts = simulated
    rng = np.random.default_rng(21)
    masked = rng.random(ivar[:50].shape) < 0.1
    garbage_flux = np.where(masked, 5.0, flux[:50])
    with_masked = infer_labels(garbage_flux, np.where(masked, 1e-5, ivar[:50]), theta, s2, PIVOTS, SCALES, starts)
    dropped = infer_labels(garbage_flux, np.where(masked, 0.0, ivar[:50]), theta, s2, PIVOTS, SCALES, starts)
    errors = np.sqrt(np.diagonal(dropped.covariance, axis1=1, axis2=2))
    assert np.all(np.abs(with_masked.labels - dropped.labels) < 1e-3 * errors)
    np.testing.assert_array_equal(with_masked.n_good_pixels, 600 - masked.sum(axis=1))
    assert np.all(with_masked.status == InferenceStatus.OK)


def test_failures_are_flagged_not_raised(simulated):
    theta, s2, flux, ivar, true_scaled, starts = simulated
    flux, ivar = flux[:4].copy(), ivar[:4].copy()
    ivar[0] = 0.0  # no data at all
    flux[1, 10] = np.nan  # one corrupt pixel
    ivar[2, :597] = 1e-5  # only 3 good pixels (< K + 1)
    theta = theta.copy()
    theta[5] = np.nan  # an untrainable pixel: zero weight for everyone
    result = infer_labels(flux, ivar, theta, s2, PIVOTS, SCALES, starts)
    status = [InferenceStatus(int(s)) for s in result.status]
    assert InferenceStatus.TOO_FEW_PIXELS in status[0] and np.all(np.isnan(result.labels[0]))
    assert status[1] == InferenceStatus.BAD_INPUT
    truth = unscale_labels(true_scaled[1], PIVOTS, SCALES)
    errors = np.sqrt(np.diag(result.covariance[1]))
    assert np.all(np.abs(result.labels[1] - truth) < 5 * errors)
    assert InferenceStatus.TOO_FEW_PIXELS in status[2] and np.isnan(result.reduced_chi2[2])
    assert status[3] == InferenceStatus.OK
    assert result.n_good_pixels[3] == 599
    # No NaN without a flag.
    unflagged = result.status == 0
    assert np.all(np.isfinite(result.labels[unflagged])) and np.all(np.isfinite(result.covariance[unflagged]))

    limited = infer_labels(flux[3:], ivar[3:], theta, s2, PIVOTS, SCALES, starts, max_iterations=1)
    assert not limited.converged[0]
    assert limited.status[0] & InferenceStatus.NOT_CONVERGED
    assert np.all(np.isfinite(limited.labels))


def test_starting_points_from_training():
    rng = np.random.default_rng(4)
    teff = rng.uniform(3000, 4000, 200)
    training = np.column_stack([teff, 0.5 * (teff - 2700) / 1000, 0.55 * (teff - 2700) / 1000])
    points = starting_points_from_training(training, quantiles=(0.1, 0.5, 0.9))
    assert points.shape == (4, 3)
    np.testing.assert_allclose(points[0], np.median(training, axis=0))
    for point in points[1:]:
        assert np.any(np.all(training == point, axis=1))  # real training label combinations
    assert points[1:, 0].min() < 3200 and points[1:, 0].max() > 3800
    assert starting_points_from_training(training, quantiles=(0.5, 0.5), include_median=False).shape == (1, 3)
    with pytest.raises(ValueError):
        starting_points_from_training(training, quantiles=(1.5,))


def test_bad_shapes_raise(simulated):
    theta, s2, flux, ivar, _, starts = simulated
    with pytest.raises(ValueError):
        infer_labels(flux[:3], ivar[:2], theta, s2, PIVOTS, SCALES, starts)
    with pytest.raises(ValueError):
        infer_labels(flux[:3], ivar[:3], theta[:, :10], s2, PIVOTS, SCALES, starts)
    with pytest.raises(ValueError):
        infer_labels(flux[:3], ivar[:3], theta, s2, PIVOTS, SCALES, starts[:, :3])
    with pytest.raises(ValueError):
        infer_labels(flux[:3], ivar[:3], theta, s2, PIVOTS, SCALES, starts, covariance="bfgs")


def test_kernels_do_not_import_dask_or_xarray():
    code = (
        "import sys\n"
        "import lamost_mdwarf.kernels.cannon_design, lamost_mdwarf.kernels.cannon_train\n"
        "import lamost_mdwarf.kernels.cannon_infer, lamost_mdwarf.kernels.error_model\n"
        "bad = [m for m in ('dask', 'xarray', 'zarr') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_train_then_infer_round_trip():
    from lamost_mdwarf.kernels.cannon_design import compute_label_scaling
    from lamost_mdwarf.kernels.cannon_train import train_pixels

    theta, s2 = make_model(30, n_pixels=300, s2=4e-4)
    rng = np.random.default_rng(31)
    train_labels = unscale_labels(rng.normal(size=(800, 4)), PIVOTS, SCALES)
    scaling = compute_label_scaling(train_labels)
    # The truth is defined on PIVOTS/SCALES; the model is retrained on its own scaling.
    train_flux, train_ivar = observe(32, theta, s2, scale_labels(train_labels, PIVOTS, SCALES))
    trained = train_pixels(design_matrix(scale_labels(train_labels, scaling.pivots, scaling.scales)),
                           train_flux, train_ivar)
    assert trained.converged.all()
    np.testing.assert_allclose(np.sqrt(trained.s2).mean(), 0.02, rtol=0.05)

    test_scaled = rng.normal(scale=0.7, size=(200, 4))
    flux, ivar = observe(33, theta, s2, test_scaled)
    starts = starting_points_from_training(train_labels)
    result = infer_labels(flux, ivar, trained.theta, trained.s2, scaling.pivots, scaling.scales, starts)
    assert np.all(result.status == 0)
    truth = unscale_labels(test_scaled, PIVOTS, SCALES)
    z = (result.labels - truth) / np.sqrt(np.diagonal(result.covariance, axis1=1, axis2=2))
    # Formal errors ignore the (small) uncertainty of the trained model: z-scatter ~ 1.
    assert np.all(z.std(axis=0) < 1.3) and np.all(z.std(axis=0) > 0.8)
    assert np.all(np.abs(np.median(z, axis=0)) < 0.3)
