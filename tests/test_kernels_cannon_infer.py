"""The batched test step: exact chi2, recovery, calibrated physical errors, multi-start."""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from lamost_mdwarf.kernels.cannon_design import (
    design_jacobian,
    design_matrix,
    design_second_derivatives,
    scale_labels,
    unscale_labels,
)
from lamost_mdwarf.kernels.cannon_infer import (
    InferenceStatus,
    SufficientStatistics,
    chi2_from_statistics,
    infer_labels,
    optimize_labels,
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


def _masked_statistics(flux, ivar, theta, s2, threshold=1e-4):
    """Sufficient statistics with explicit masks, star by star (the reference)."""
    model_ok = np.all(np.isfinite(theta), axis=1) & np.isfinite(s2) & (s2 >= 0)
    theta0 = np.where(model_ok[:, None], theta, 0.0)
    quadratic, linear, constant, n_good, bad = [], [], [], [], []
    for f, iv in zip(flux, ivar):
        data_ok = np.isfinite(f) & np.isfinite(iv) & (iv >= 0)
        usable = data_ok & model_ok
        w = np.where(usable, iv, 0.0)
        w = w / (1.0 + w * np.where(model_ok, s2, 0.0))
        r = np.where(usable, f - theta0[:, 0], 0.0)
        quadratic.append((theta0 * w[:, None]).T @ theta0)
        linear.append(theta0.T @ (w * r))
        constant.append(np.sum(w * r * r))
        n_good.append(np.count_nonzero(usable & (w > 0) & (np.where(usable, iv, 0.0) > threshold)))
        bad.append(np.any(~data_ok & (iv != 0)))
    return [np.array(v) for v in (quadratic, linear, constant, n_good, bad)]


def test_sufficient_statistics_fast_and_masked_blocks_agree(simulated):
    # More stars than one block of the fast path; corrupt stars in some blocks only, and
    # with an untrainable pixel every block takes the masked path: both give the reference.
    theta, s2, flux, ivar, _, _ = simulated
    flux, ivar = flux[:150].copy(), ivar[:150].copy()
    ivar[:, ::9] = 1e-5
    flux[3, 10] = np.nan  # non-finite flux
    flux[60, 11] = np.inf
    ivar[61, 12] = np.nan
    ivar[62, 13] = -1.0
    ivar[63, 14] = np.inf
    flux[100, 15], ivar[100, 15] = np.nan, 0.0  # NaN flux with ivar 0: zero weight, not bad input
    bad_theta = theta.copy()
    bad_theta[7, 3] = np.nan
    for model in (theta, bad_theta):
        stats = sufficient_statistics(flux, ivar, model, s2)
        reference = _masked_statistics(flux, ivar, model, s2)
        for got, want in zip(stats[:3], reference[:3]):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.max(np.abs(want)))
        np.testing.assert_array_equal(stats.n_good_pixels, reference[3])
        np.testing.assert_array_equal(stats.bad_input, reference[4])
        assert set(np.flatnonzero(stats.bad_input)) == {3, 60, 61, 62, 63}
    # The test step's own statistics leave out row/column 0 of Q and b_0 (unused: A'_0 = 0).
    from lamost_mdwarf.kernels.cannon_infer import _statistics

    full = sufficient_statistics(flux, ivar, theta, s2)
    reduced = _statistics(flux, ivar, theta, s2, 1e-4, pivot_terms=False)
    np.testing.assert_array_equal(reduced.quadratic[:, 0], 0.0)
    np.testing.assert_allclose(reduced.quadratic[:, 1:, 1:], full.quadratic[:, 1:, 1:], rtol=1e-12)
    np.testing.assert_allclose(reduced.linear[:, 1:], full.linear[:, 1:], rtol=1e-12)
    np.testing.assert_array_equal(reduced.constant, full.constant)


def test_statistics_of_a_star_do_not_depend_on_its_chunk(simulated):
    # Bit for bit, whatever the chunk size and the star's row in it (BLAS kernels are
    # chosen by matrix shape; the statistics use fixed shapes).
    from lamost_mdwarf.kernels.cannon_infer import _statistics

    theta, s2, flux, ivar, _, _ = simulated
    for pivot_terms in (True, False):
        everything = _statistics(flux[:130], ivar[:130], theta, s2, 1e-4, pivot_terms)
        for part in (slice(3, 4), slice(0, 25), slice(7, 60), slice(47, 49), slice(100, 130)):
            alone = _statistics(flux[part], ivar[part], theta, s2, 1e-4, pivot_terms)
            for got, want in zip(alone, everything):
                np.testing.assert_array_equal(got, want[part])


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


def two_minima_model():
    """One label, model m(x) = th0 + th1 x + th2 x^2 with th1 = -1.5 th2 + small orthogonal
    part: chi2(x) ~ (x - 2)^2 [|th2|^2 (x + 0.5)^2 + e] has its global minimum at the
    truth x = 2, a local one near x = -0.5 and a local maximum between them."""
    rng = np.random.default_rng(11)
    n_pixels = 200
    th2 = rng.normal(scale=0.05, size=n_pixels)
    ortho = rng.normal(size=n_pixels)
    ortho -= th2 * (ortho @ th2) / (th2 @ th2)
    ortho *= 0.1 * np.linalg.norm(th2) / np.linalg.norm(ortho)
    theta = np.column_stack([np.ones(n_pixels), -1.5 * th2 + ortho, th2])
    s2 = np.zeros(n_pixels)
    flux, ivar = observe(12, theta, s2, np.full((3, 1), 2.0))
    return flux, ivar, theta, s2, np.array([10.0]), np.array([2.0])


def test_multi_start_finds_the_global_minimum():
    # Descent from x = 0 ends in the local minimum near x = -0.5.
    flux, ivar, theta, s2, pivots, scales = two_minima_model()

    single = infer_labels(flux, ivar, theta, s2, pivots, scales, pivots[None, :])
    assert single.converged.all()
    np.testing.assert_allclose(scale_labels(single.labels, pivots, scales), -0.5, atol=0.15)

    starts = np.array([[10.0], [13.0], [6.0]])  # scaled 0, 1.5, -2
    multi = infer_labels(flux, ivar, theta, s2, pivots, scales, starts)
    assert np.all(multi.status == InferenceStatus.OK)
    np.testing.assert_allclose(scale_labels(multi.labels, pivots, scales), 2.0, atol=0.01)
    assert np.all(multi.start_index == 1)
    assert np.all(multi.chi2 < single.chi2 - 100)


def test_pruned_search_finds_the_global_minimum_from_a_worse_first_start():
    # The start with the lowest chi2 (x = -0.5) sits in the local minimum's basin, so the
    # staged search converges there first; the start at x = 2.5 has a higher chi2 but lies
    # beyond the barrier, so it must still run (and win); the start at x = -2 descends
    # monotonically into the local minimum and may be dropped.
    flux, ivar, theta, s2, pivots, scales = two_minima_model()
    stats = sufficient_statistics(flux, ivar, theta, s2)
    starts = np.array([[9.0], [15.0], [6.0]])  # scaled -0.5, 2.5, -2
    chi2_starts = chi2_from_statistics(stats, np.broadcast_to(scale_labels(starts, pivots, scales)[None], (3, 3, 1)))
    assert np.all(np.argmin(chi2_starts, axis=1) == 0)  # the first start looks best
    for prune in (True, False):
        result = optimize_labels(stats, pivots, scales, starts, prune=prune)
        assert np.all(result.status == InferenceStatus.OK)
        np.testing.assert_allclose(scale_labels(result.labels, pivots, scales), 2.0, atol=0.01)
        assert np.all(result.start_index == 1)
    local = optimize_labels(stats, pivots, scales, starts[:1])
    assert np.all(result.chi2 < local.chi2 - 100)
    # Per-star starting points: the same, star by star.
    per_star = np.broadcast_to(starts[None], (3,) + starts.shape)
    again = optimize_labels(stats, pivots, scales, per_star)
    np.testing.assert_array_equal(again.labels, optimize_labels(stats, pivots, scales, starts).labels)


def test_segment_descent_check_is_exact(simulated, inferred):
    from lamost_mdwarf.kernels.cannon_infer import _descends_to

    theta, s2, flux, ivar, _, _ = simulated
    stats = sufficient_statistics(flux[:100], ivar[:100], theta, s2)
    rng = np.random.default_rng(8)
    optimum = scale_labels(inferred.labels[:100], PIVOTS, SCALES)
    t = np.linspace(0.0, 1.0, 4001)
    outcomes = []
    for x_from, x_to in (
        (optimum + rng.normal(scale=1.5, size=optimum.shape), optimum),  # mostly downhill
        (rng.normal(scale=1.5, size=optimum.shape), rng.normal(scale=1.5, size=optimum.shape)),
    ):
        got = _descends_to(stats, x_from[:, None, :], x_to)[:, 0]
        path = x_from[:, None, :] + t[None, :, None] * (x_to - x_from)[:, None, :]
        chi2 = chi2_from_statistics(stats, path)
        want = np.all(np.diff(chi2, axis=1) <= 1e-6, axis=1)
        np.testing.assert_array_equal(got, want)
        outcomes.append(got.sum())
    assert outcomes[0] > 50 and 0 < outcomes[1] < 100, outcomes  # both outcomes are tested


def test_pruning_does_not_change_results(simulated, inferred, curved_valley):
    theta, s2, flux, ivar, _, starts = simulated
    stats = sufficient_statistics(flux, ivar, theta, s2)
    cases = [(stats, PIVOTS, SCALES, starts), curved_valley[:1] + (curved_valley[1].pivots, curved_valley[1].scales,
                                                                   curved_valley[2])]
    for st, pivots, scales, points in cases:
        pruned = optimize_labels(st, pivots, scales, points)
        full = optimize_labels(st, pivots, scales, points, prune=False)
        np.testing.assert_array_equal(pruned.status, full.status)
        errors = np.sqrt(np.diagonal(full.covariance, axis1=1, axis2=2))
        assert np.all(np.abs(pruned.labels - full.labels) < 1e-3 * errors)
        np.testing.assert_allclose(pruned.covariance, full.covariance, rtol=1e-4)
        assert np.sum(pruned.n_iterations) <= np.sum(full.n_iterations)


def test_saddle_points_are_left_not_reported():
    # Started exactly at the local maximum between the two minima (zero gradient, negative
    # curvature), the optimiser must leave it: the Gauss-Newton Hessian (positive there)
    # would call it converged.
    flux, ivar, theta, s2, pivots, scales = two_minima_model()
    stats = sufficient_statistics(flux, ivar, theta, s2)
    grid = np.linspace(-0.5, 2.0, 2001)
    chi2_grid = chi2_from_statistics(stats, np.broadcast_to(grid[None, :, None], (3, grid.size, 1)))
    for n in range(3):
        quartic = np.polyfit(grid, chi2_grid[n], 4)  # chi2 is exactly a quartic in x
        critical = np.roots(np.polyder(quartic))
        critical = np.sort(critical.real[np.abs(critical.imag) < 1e-9])
        assert critical.size == 3 and np.polyval(np.polyder(quartic, 2), critical[1]) < 0
        start = unscale_labels(critical[1:2, None], pivots, scales)
        one = SufficientStatistics(*(np.asarray(field)[n : n + 1] for field in stats))
        result = optimize_labels(one, pivots, scales, start)
        assert result.status[0] == InferenceStatus.OK and result.n_iterations[0] <= 15
        x = scale_labels(result.labels, pivots, scales)[0, 0]
        assert min(abs(x - critical[0]), abs(x - critical[2])) < 1e-6
        assert result.chi2[0] < np.polyval(quartic, critical[1]) - 100


def test_ill_conditioned_but_positive_definite_hessian_is_not_singular():
    # Two labels the spectra barely distinguish: Hessian eigenvalue ratio ~1e-11, far
    # above float64 round-off (~1e-15); the covariance is valid and must be reported.
    rng = np.random.default_rng(5)
    n_pixels = 400
    theta = np.zeros((n_pixels, 6))
    theta[:, 0] = 1.0
    theta[:, 1] = rng.normal(scale=0.05, size=n_pixels)
    theta[:, 2] = theta[:, 1] + 1e-5 * rng.normal(scale=0.05, size=n_pixels)
    s2 = np.zeros(n_pixels)
    truth = np.array([[0.3, -0.2], [1.0, 1.0]])
    flux, ivar = observe(6, theta, s2, truth, sigma=1e-5)
    stats = sufficient_statistics(flux, ivar, theta, s2)
    result = optimize_labels(stats, np.zeros(2), np.ones(2), np.zeros((1, 2)))
    hessian = stats.quadratic[:, 1:3, 1:3]  # linear model: J^T Q J
    eig = np.linalg.eigvalsh(hessian)
    assert np.all(eig[:, 0] / eig[:, 1] < 1e-10) and np.all(eig[:, 0] / eig[:, 1] > 1e-12)
    assert np.all(result.status == InferenceStatus.OK)
    np.testing.assert_allclose(result.covariance, np.linalg.inv(hessian), rtol=1e-3)
    errors = np.sqrt(np.diagonal(result.covariance, axis1=1, axis2=2))
    assert np.all(np.abs(result.labels - truth) < 5 * errors)


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


def test_empty_chunk(simulated):
    theta, s2, flux, ivar, _, starts = simulated
    for prune in (True, False):
        result = infer_labels(flux[:0], ivar[:0], theta, s2, PIVOTS, SCALES, starts, prune=prune)
        assert result.labels.shape == (0, 4) and result.covariance.shape == (0, 4, 4)
        assert result.status.shape == (0,)


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


# --- Curved valleys: a model trained on nearly collinear labels ---------------------------


def m_dwarf_sequence(rng, n_stars):
    """(Teff, R, M, L) of M dwarfs as in the TESS Cool Dwarf Catalog: ~2 dimensions in 4.

    Teff from colour; M_K scattered about the main sequence; R and M functions of M_K
    (Mann et al. 2015, 2019-like relations); L from Stefan-Boltzmann. Also a hidden
    parameter (e.g. metallicity) that changes the spectrum but is not a label.
    """
    teff = rng.uniform(3000.0, 4000.0, n_stars)
    mk = 9.5 - 4.0 * (teff - 3000.0) / 1000.0 + 0.3 * rng.normal(size=n_stars)
    radius = 1.9515 - 0.3520 * mk + 0.01680 * mk**2 + 3e-4 * rng.normal(size=n_stars)
    dmk = mk - 7.5
    mass = 10 ** (-0.642 - 0.208 * dmk - 8.43e-4 * dmk**2 + 7.87e-3 * dmk**3) + 3e-4 * rng.normal(size=n_stars)
    luminosity = radius**2 * (teff / 5772.0) ** 4
    return np.column_stack([teff, radius, mass, luminosity]), 0.3 * rng.normal(size=n_stars)


def m_dwarf_spectra(rng, labels, hidden, n_pixels=800, sigma=0.01):
    """Absorption features driven by Teff (and a little by log g and the hidden parameter)."""
    lines = np.random.default_rng(12345)
    centre, width = lines.uniform(2900.0, 4100.0, n_pixels), lines.uniform(150.0, 600.0, n_pixels)
    depth, gravity = lines.uniform(0.05, 0.4, n_pixels), lines.normal(scale=0.3, size=n_pixels)
    hidden_sensitivity = lines.normal(scale=0.05, size=n_pixels)
    teff, radius, mass, _ = labels.T
    log_g = np.log10(mass / radius**2)
    profile = 0.5 + 0.5 * np.tanh((centre - teff[:, None]) / width)
    flux = 1.0 - depth * profile * (1.0 + gravity * (log_g[:, None] - 4.9)) + hidden_sensitivity * hidden[:, None]
    return flux + sigma * rng.normal(size=flux.shape), np.full(flux.shape, sigma**-2)


@pytest.fixture(scope="module")
def curved_valley():
    """89 training stars (as in the failing survey run), 5% of the pixels masked in all
    but 18 of them: the trained coefficients of the off-sequence label combinations are
    large and cancelling, so chi2 has narrow curved valleys (Hessian condition numbers
    1e6-3e7 at the optima, as on the simulated LAMOST survey)."""
    from lamost_mdwarf.kernels.cannon_design import compute_label_scaling
    from lamost_mdwarf.kernels.cannon_train import train_pixels

    rng = np.random.default_rng(0)
    train_labels, train_hidden = m_dwarf_sequence(rng, 89)
    scaling = compute_label_scaling(train_labels)
    train_flux, train_ivar = m_dwarf_spectra(rng, train_labels, train_hidden)
    for pixel in np.flatnonzero(np.random.default_rng(99).random(train_flux.shape[1]) < 0.05):
        train_ivar[rng.permutation(89)[18:], pixel] = 1e-5
    trained = train_pixels(
        design_matrix(scale_labels(train_labels, scaling.pivots, scaling.scales)), train_flux, train_ivar
    )
    test_labels, test_hidden = m_dwarf_sequence(rng, 40)
    flux, ivar = m_dwarf_spectra(rng, test_labels, test_hidden)
    stats = sufficient_statistics(flux, ivar, trained.theta, trained.s2)
    starts = starting_points_from_training(train_labels)
    return stats, scaling, starts


def test_curved_valleys_converge_in_few_iterations(curved_valley):
    stats, scaling, starts = curved_valley
    result = optimize_labels(stats, scaling.pivots, scaling.scales, starts)
    x = scale_labels(result.labels, scaling.pivots, scaling.scales)
    eig = np.linalg.eigvalsh(_exact_hessians(stats, x))
    assert np.median(eig[:, -1] / eig[:, 0]) > 1e6  # the fixture really is ill-conditioned
    assert np.all(result.status == InferenceStatus.OK)
    # The previous Levenberg-Marquardt: median 66 iterations, 27% not converged in 100.
    assert np.median(result.n_iterations) <= 15
    assert result.n_iterations.max() <= 40
    # Every start of every star converges within 60 iterations.
    for k in range(starts.shape[0]):
        single = optimize_labels(stats, scaling.pivots, scaling.scales, starts[k : k + 1], max_iterations=60)
        assert single.converged.all(), k
        # The winner is the best start, to the round-off of chi2 from the statistics: chi2 =
        # c - ... cancels the pivot chi2 c (~7e7 here) to ~1e3, so ~1e-5 absolute (the
        # pruned search runs one start into a shared minimum, where the unpruned search
        # kept the lowest of several round-off values)...
        round_off = 1e-12 * stats.constant
        assert np.all(single.chi2 >= result.chi2 - round_off)
        # ... and a start that reaches the same chi2 reaches the same labels.
        same = single.chi2 <= result.chi2 + round_off
        errors = np.sqrt(np.diagonal(result.covariance, axis1=1, axis2=2))
        assert np.all(np.abs(single.labels - result.labels)[same] < 1e-3 * errors[same])


def test_curved_valley_solutions_are_minima(curved_valley):
    from scipy.optimize import minimize

    stats, scaling, starts = curved_valley
    result = optimize_labels(stats, scaling.pivots, scaling.scales, starts)
    x = scale_labels(result.labels, scaling.pivots, scaling.scales)
    for n in range(0, 40, 4):
        one = SufficientStatistics(*(np.asarray(field)[n : n + 1] for field in stats))

        def chi2(v, one=one):
            return chi2_from_statistics(one, v[None])[0]

        def gradient(v, one=one):
            residual = one.quadratic[0] @ _centred(v[None])[0] - one.linear[0]
            return 2.0 * design_jacobian(v[None])[0].T @ residual

        polished = minimize(
            chi2, x[n], jac=gradient, hess=lambda v, one=one: 2.0 * _exact_hessians(one, v[None])[0],
            method="trust-exact", options={"gtol": 1e-10, "maxiter": 200},
        )
        # Nothing left to gain (chi2 round-off here is ~1e-9 relative).
        assert polished.fun >= result.chi2[n] - 1e-7 * result.chi2[n]
        errors = np.sqrt(np.diag(result.covariance[n])) / scaling.scales
        assert np.all(np.abs(polished.x - x[n]) < 1e-3 * errors)


def test_a_star_does_not_depend_on_the_rest_of_its_chunk(curved_valley):
    # Given the same sufficient statistics, each star's fit is bit-for-bit the same whether
    # it is optimised with 39 other stars or with a few (chunking must not change results).
    stats, scaling, starts = curved_valley
    everything = optimize_labels(stats, scaling.pivots, scaling.scales, starts)
    for part in (slice(0, 3), slice(5, 18), slice(39, 40)):
        sub = SufficientStatistics(*(np.asarray(field)[part] for field in stats))
        alone = optimize_labels(sub, scaling.pivots, scaling.scales, starts)
        np.testing.assert_array_equal(alone.labels, everything.labels[part])
        np.testing.assert_array_equal(alone.chi2, everything.chi2[part])
        np.testing.assert_array_equal(alone.n_iterations, everything.n_iterations[part])


def _centred(x):
    design = design_matrix(x)
    design[:, 0] = 0.0
    return design


def _exact_hessians(stats, x):
    """Exact Hessian of chi2/2 in scaled labels (written out independently of the module)."""
    jac = design_jacobian(x)
    residual = np.einsum("ntu,nu->nt", stats.quadratic, _centred(x)) - stats.linear
    gauss_newton = np.einsum("ntk,ntu,nul->nkl", jac, stats.quadratic, jac)
    return gauss_newton + np.einsum("nt,tkl->nkl", residual, design_second_derivatives(x.shape[1]))


# --- chi2 as a polynomial of degree 4 (the coefficients infer_labels computes) ------------


def _random_problem(seed, n_labels, n_stars=6, n_pixels=150):
    """Small random model and spectra with K labels (theta of order 0.05, SNR ~30-100)."""
    from lamost_mdwarf.kernels.cannon_design import n_quadratic_terms

    rng = np.random.default_rng(seed)
    theta = rng.normal(scale=0.05, size=(n_pixels, n_quadratic_terms(n_labels)))
    theta[:, 0] = 1.0
    s2 = rng.uniform(0.0, 1e-4, n_pixels)
    s2[::5] = 0.0
    flux = 1.0 + 0.05 * rng.normal(size=(n_stars, n_pixels))
    ivar = rng.uniform(1e3, 1e4, size=(n_stars, n_pixels))
    ivar[:, ::11] = 1e-5
    return theta, s2, flux, ivar


@pytest.mark.parametrize("n_labels", [1, 2, 3, 4, 5])
def test_polynomial_chi2_equals_direct_sum_over_pixels(n_labels):
    from lamost_mdwarf.kernels.cannon_infer import _quartic_statistics
    from lamost_mdwarf.kernels.cannon_quartic import chi2_quartic, coefficients_from_statistics, monomial_basis

    theta, s2, flux, ivar = _random_problem(40 + n_labels, n_labels)
    basis = monomial_basis(n_labels)
    assert basis.counts == tuple(math.comb(n_labels + d, d) for d in range(5))  # monomials of degree <= d
    direct_stats = _quartic_statistics(flux, ivar, theta, s2, 1e-4)
    from_stats = coefficients_from_statistics(*sufficient_statistics(flux, ivar, theta, s2)[:3])
    np.testing.assert_allclose(direct_stats.coefficients, from_stats, rtol=1e-10, atol=1e-10 * np.abs(from_stats).max())
    rng = np.random.default_rng(7)
    for scale in (0.0, 0.5, 2.0):
        x = scale * rng.normal(size=(flux.shape[0], n_labels))
        want = direct_chi2(flux, ivar, theta, s2, x)
        np.testing.assert_allclose(chi2_quartic(direct_stats.coefficients, x), want, rtol=1e-9)
        np.testing.assert_allclose(chi2_quartic(from_stats, x), want, rtol=1e-9)


@pytest.mark.parametrize("n_labels", [1, 2, 4])
def test_polynomial_derivatives_match_finite_differences(n_labels):
    from lamost_mdwarf.kernels.cannon_infer import (
        _gradients_hessians,
        _hessian_change,
        _make_quartic,
        _quartic_statistics,
    )
    from lamost_mdwarf.kernels.cannon_quartic import chi2_quartic, derivative_tensors

    theta, s2, flux, ivar = _random_problem(50 + n_labels, n_labels)
    coefficients = _quartic_statistics(flux, ivar, theta, s2, 1e-4).coefficients.copy()
    quartic = _make_quartic(coefficients, n_labels)
    gradient, hessian = derivative_tensors(coefficients, quartic.basis)
    np.testing.assert_array_equal(quartic.gradient, gradient)  # the work-array version is the same
    np.testing.assert_array_equal(quartic.hessian, hessian)
    rng = np.random.default_rng(9)
    x = rng.normal(size=(flux.shape[0], n_labels))
    grad, hess_entries = _gradients_hessians(gradient, hessian, x, quartic.basis)
    hess = hess_entries[:, quartic.basis.hessian_row]
    h = 1e-4
    eye = np.eye(n_labels)

    def half_chi2(v):
        return chi2_quartic(coefficients, v) / 2

    numeric_grad = np.stack([(half_chi2(x + h * e) - half_chi2(x - h * e)) / (2 * h) for e in eye], axis=1)
    np.testing.assert_allclose(grad, numeric_grad, rtol=1e-6, atol=1e-6 * np.abs(grad).max())
    numeric_hess = np.stack(
        [(_gradients_hessians(gradient, hessian, x + h * e, quartic.basis)[0]
          - _gradients_hessians(gradient, hessian, x - h * e, quartic.basis)[0]) / (2 * h) for e in eye], axis=2
    )
    np.testing.assert_allclose(hess, numeric_hess, rtol=1e-6, atol=1e-6 * np.abs(hess).max())
    np.testing.assert_allclose(hess, np.swapaxes(hess, 1, 2))
    # Third derivative along p: d/dt H(x + t p), exact for the quartic.
    p = rng.normal(size=x.shape)
    change = _hessian_change(hessian, x, p.T, quartic.basis)
    numeric = (_gradients_hessians(gradient, hessian, x + h * p, quartic.basis)[1]
               - _gradients_hessians(gradient, hessian, x - h * p, quartic.basis)[1]) / (2 * h)
    np.testing.assert_allclose(change, numeric, rtol=1e-6, atol=1e-6 * np.abs(change).max())


def test_chi2_change_from_end_derivatives_is_exact():
    from lamost_mdwarf.kernels.cannon_infer import (
        _chi2_change,
        _entries_t,
        _gradients_hessians,
        _make_quartic,
        _quartic_statistics,
    )
    from lamost_mdwarf.kernels.cannon_quartic import chi2_quartic

    theta, s2, flux, ivar = _random_problem(60, 4, n_stars=50)
    coefficients = _quartic_statistics(flux, ivar, theta, s2, 1e-4).coefficients.copy()
    quartic = _make_quartic(coefficients, 4)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 4))
    step = rng.normal(scale=0.5, size=(50, 4)) * np.logspace(-6, 0, 50)[:, None]
    g0, h0 = _gradients_hessians(quartic.gradient, quartic.hessian, x, quartic.basis)
    g1, h1 = _gradients_hessians(quartic.gradient, quartic.hessian, x + step, quartic.basis)
    got = _chi2_change(g0.T, _entries_t(h0, quartic.basis), g1.T, _entries_t(h1, quartic.basis), step.T)
    want = chi2_quartic(coefficients, x + step) - chi2_quartic(coefficients, x)
    scale = np.abs(chi2_quartic(coefficients, x))
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-12 * scale.max())


def test_polynomial_statistics_fast_and_masked_blocks_agree(simulated):
    # The same corrupt inputs as for sufficient_statistics: both paths give the reference.
    from lamost_mdwarf.kernels.cannon_infer import _quartic_statistics
    from lamost_mdwarf.kernels.cannon_quartic import coefficients_from_statistics

    theta, s2, flux, ivar, _, _ = simulated
    flux, ivar = flux[:150].copy(), ivar[:150].copy()
    ivar[:, ::9] = 1e-5
    flux[3, 10] = np.nan
    flux[60, 11] = np.inf
    ivar[61, 12] = np.nan
    ivar[62, 13] = -1.0
    ivar[63, 14] = np.inf
    flux[100, 15], ivar[100, 15] = np.nan, 0.0
    bad_theta = theta.copy()
    bad_theta[7, 3] = np.nan
    for model in (theta, bad_theta):
        got = _quartic_statistics(flux, ivar, model, s2, 1e-4)
        quadratic, linear, constant, n_good, bad = _masked_statistics(flux, ivar, model, s2)
        want = coefficients_from_statistics(quadratic, linear, constant)
        np.testing.assert_allclose(got.coefficients, want, rtol=1e-11, atol=1e-11 * np.abs(want).max())
        np.testing.assert_array_equal(got.n_good_pixels, n_good)
        np.testing.assert_array_equal(got.bad_input, bad)


def test_polynomial_statistics_of_a_star_do_not_depend_on_its_chunk(simulated):
    from lamost_mdwarf.kernels.cannon_infer import _quartic_statistics

    theta, s2, flux, ivar, _, _ = simulated
    everything = [np.array(field) for field in _quartic_statistics(flux[:130], ivar[:130], theta, s2, 1e-4)]
    for part in (slice(3, 4), slice(0, 25), slice(7, 60), slice(47, 49), slice(100, 130)):
        alone = _quartic_statistics(flux[part], ivar[part], theta, s2, 1e-4)
        for got, want in zip(alone, everything):
            np.testing.assert_array_equal(got, want[part])


def test_infer_labels_equals_optimize_labels_on_sufficient_statistics(simulated, inferred):
    # infer_labels computes the polynomial coefficients from the pixels; optimize_labels
    # from Q, b, c: the same fits to round-off.
    theta, s2, flux, ivar, _, starts = simulated
    stats = sufficient_statistics(flux[:60], ivar[:60], theta, s2)
    via_statistics = optimize_labels(stats, PIVOTS, SCALES, starts)
    errors = np.sqrt(np.diagonal(inferred.covariance[:60], axis1=1, axis2=2))
    assert np.all(np.abs(via_statistics.labels - inferred.labels[:60]) < 1e-6 * errors)
    np.testing.assert_allclose(via_statistics.covariance, inferred.covariance[:60], rtol=1e-6)
    np.testing.assert_allclose(via_statistics.chi2, inferred.chi2[:60], rtol=1e-10)
    np.testing.assert_array_equal(via_statistics.status, inferred.status[:60])


def test_infer_labels_of_a_star_do_not_depend_on_its_chunk(simulated, inferred):
    theta, s2, flux, ivar, _, starts = simulated
    for part in (slice(0, 1), slice(5, 18), slice(100, 180)):
        alone = infer_labels(flux[part], ivar[part], theta, s2, PIVOTS, SCALES, starts)
        for field in ("labels", "covariance", "chi2", "n_iterations", "status"):
            np.testing.assert_array_equal(getattr(alone, field), getattr(inferred, field)[part])


def test_gauss_newton_quadratic_on_demand_equals_statistics(simulated):
    from lamost_mdwarf.kernels.cannon_infer import _QuadraticSource, _statistics

    theta, s2, flux, ivar, _, _ = simulated
    source = _QuadraticSource(pixels=(flux[:100], ivar[:100], theta, s2, 1e-4))
    want = _statistics(flux[:100], ivar[:100], theta, s2, 1e-4, pivot_terms=False).quadratic
    for stars in (np.array([5, 3, 5]), np.arange(100), np.array([], dtype=int)):
        np.testing.assert_array_equal(source(stars), want[stars])


def test_positive_definite_inverse_matches_eigenvalue_rule():
    from lamost_mdwarf.kernels.cannon_infer import _positive_definite_inverse

    rng = np.random.default_rng(12)
    matrices = []
    # Condition numbers on both sides of 1 / singular_rtol (= 1e12; 10^11.98: positive by the
    # eigenvalues but not by the trace bound, so decided by eigvalsh), then indefinite.
    for condition in (1.0, 1e4, 1e10, 10**11.9, 10**11.98, 10**12.1, 1e14, -1.0):
        basis_vectors, _ = np.linalg.qr(rng.normal(size=(4, 4)))
        eigenvalues = np.array([1e6 / abs(condition), 1e4, 1e5, 1e6])
        if condition < 0:
            eigenvalues[0] = -5.0
        matrices.append((basis_vectors * eigenvalues) @ basis_vectors.T)
    matrices.append(np.full((4, 4), np.nan))
    matrices = np.array(matrices)
    matrices = 0.5 * (matrices + np.swapaxes(matrices, 1, 2))
    positive, inverse_t = _positive_definite_inverse(np.ascontiguousarray(matrices.transpose(1, 2, 0)), 1e-12)
    finite = np.all(np.isfinite(matrices), axis=(1, 2))
    eig = np.linalg.eigvalsh(np.where(finite[:, None, None], matrices, np.eye(4)))
    want = finite & (eig[:, 0] > 1e-12 * np.abs(eig[:, -1]))
    np.testing.assert_array_equal(positive, want)
    assert want.tolist() == [True, True, True, True, True, False, False, False, False]
    inverse = np.moveaxis(inverse_t, -1, 0)
    for n in np.flatnonzero(want):
        np.testing.assert_allclose(inverse[n] @ matrices[n], np.eye(4), atol=1e-4)
