"""Test step of The Cannon: labels of every star of a chunk at once (pure numpy).

Method
------
With the trained ``theta_p`` (P, T) and ``s2_p`` (P,) fixed, the labels ``x`` of star
``n`` minimise

    chi2_n(x) = sum_p w_np (f_np - theta_p . A(x))^2,    w_np = ivar_np / (1 + ivar_np s2_p)

whose weights do not depend on ``x``. Writing ``f - theta . A(x) = r0 - theta . A'(x)``
with ``r0_p = f_p - theta_p0`` (the residual from the model at the pivot, ``A(0) = e_0``)
and ``A'(x) = A(x) - e_0``, chi2 is *exactly*

    chi2_n(x) = c_n - 2 A'(x) . b_n + A'(x)^T Q_n A'(x),
    Q_n = sum_p w_np theta_p theta_p^T,  b_n = sum_p w_np r0_np theta_p,  c_n = sum_p w_np r0_np^2

(:func:`sufficient_statistics`; one pass over the pixels as matrix products, additive over
pixel chunks). Centring on the pivot model only improves floating-point cancellation;
FIELD_NOTES' ``(Q, b, c)`` with the raw flux gives the same chi2.

After that every step is a K-dimensional problem for all stars and all starting points
at once (per-iteration cost independent of the number of pixels):

* Levenberg-Marquardt / damped Newton on ``chi2 / 2`` in scaled labels: the step solves
  ``(H + mu I) dx = -g`` with ``g = J^T (Q A' - b)``, ``H`` the *exact* Hessian
  ``J^T Q J + sum_t (Q A' - b)_t d2A_t/dx dx`` when it is positive definite, else the
  Gauss-Newton ``J^T Q J``; ``mu = lambda * max eig(H)``; a step is accepted when it
  lowers chi2 (the change is computed from exact design differences, free of
  cancellation), then ``lambda /= 10``, else ``lambda *= 10``.
* Converged when the Newton decrement ``g^T H^-1 g`` (the chi2 decrease a full Newton
  step would still bring) is below ``decrement_tolerance``, or an accepted step is
  below ``step_tolerance`` in every scaled label.
* Several starting points per star (:func:`starting_points_from_training`); the
  solution with the lowest chi2 wins (flagged ``NOT_CONVERGED`` if it did not converge).
* Formal covariance = inverse Hessian of ``chi2 / 2`` at the optimum (the exact Hessian
  of the quartic chi2 by default, Gauss-Newton on request), converted to physical units
  ``cov_phys = S cov S``, ``S = diag(scales)``.

Failures never raise: each star gets a status made of :class:`InferenceStatus` bits.
Labels are NaN only with ``NON_FINITE`` or ``TOO_FEW_PIXELS``; the covariance is NaN only
with one of those or ``SINGULAR_HESSIAN``. Inputs are never modified.
"""
from __future__ import annotations

import enum
from typing import Literal, NamedTuple

import numpy as np

from lamost_mdwarf.kernels.cannon_design import (
    design_jacobian,
    design_matrix,
    design_second_derivatives,
    n_quadratic_terms,
    quadratic_term_pairs,
    scale_labels,
    unscale_labels,
)

__all__ = [
    "DEFAULT_MASKED_IVAR_THRESHOLD",
    "InferenceResult",
    "InferenceStatus",
    "SufficientStatistics",
    "chi2_from_statistics",
    "infer_labels",
    "optimize_labels",
    "starting_points_from_training",
    "sufficient_statistics",
]

#: Pixels with ``ivar <= threshold`` count as masked (the pipeline sets masked pixels to
#: ivar = 1e-5; continuum-normalized usable pixels have ivar ~ SNR^2 >> 1).
DEFAULT_MASKED_IVAR_THRESHOLD = 1e-4


class InferenceStatus(enum.IntFlag):
    """Bit flags describing a star's test-step result (0 = fine)."""

    OK = 0
    #: The winning start did not meet the convergence tolerance (labels are its last
    #: iterate, finite).
    NOT_CONVERGED = 1
    #: No start gave a finite chi2 (labels and covariance NaN).
    NON_FINITE = 2
    #: The Hessian at the optimum is not positive definite (covariance NaN).
    SINGULAR_HESSIAN = 4
    #: ``n_good_pixels <= K`` (labels, covariance and reduced chi2 NaN).
    TOO_FEW_PIXELS = 8
    #: Some pixels had non-finite flux (with ivar != 0) or non-finite / negative ivar and
    #: were given zero weight.
    BAD_INPUT = 16


class SufficientStatistics(NamedTuple):
    """Per-star sufficient statistics of chi2 (see the module docstring).

    Attributes
    ----------
    quadratic : numpy.ndarray
        ``Q_n``, shape (N, T, T), symmetric, flux^2 ivar units (dimensionless for
        normalized spectra).
    linear : numpy.ndarray
        ``b_n`` (residual from the pivot model), shape (N, T).
    constant : numpy.ndarray
        ``c_n = chi2_n`` at the pivot labels, shape (N,).
    n_good_pixels : numpy.ndarray
        Shape (N,), int: pixels with ``ivar > masked_ivar_threshold`` and non-zero weight.
    bad_input : numpy.ndarray
        Shape (N,), bool: the star had pixels with non-finite flux (where ``ivar != 0``),
        non-finite or negative ivar; they were given zero weight. (Pixels with a
        non-finite trained model get zero weight for every star without this flag.)
    """

    quadratic: np.ndarray
    linear: np.ndarray
    constant: np.ndarray
    n_good_pixels: np.ndarray
    bad_input: np.ndarray


class InferenceResult(NamedTuple):
    """Test-step result for a chunk of N stars with K labels.

    Attributes
    ----------
    labels : numpy.ndarray
        Shape (N, K), physical units (K, Rsun, Msun, Lsun, ...).
    covariance : numpy.ndarray
        Formal covariance, shape (N, K, K), physical units (e.g. K^2, K Rsun).
    chi2 : numpy.ndarray
        Shape (N,), chi2 at the optimum (all pixels, with their weights).
    reduced_chi2 : numpy.ndarray
        Shape (N,), ``chi2 / (n_good_pixels - K)``.
    n_good_pixels : numpy.ndarray
        Shape (N,), int.
    converged : numpy.ndarray
        Shape (N,), bool: the winning start converged.
    status : numpy.ndarray
        Shape (N,), int: :class:`InferenceStatus` bits, 0 when all is well.
    n_iterations : numpy.ndarray
        Shape (N,), int: iterations of the winning start.
    start_index : numpy.ndarray
        Shape (N,), int: which starting point won (-1 if none gave a finite chi2).
    """

    labels: np.ndarray
    covariance: np.ndarray
    chi2: np.ndarray
    reduced_chi2: np.ndarray
    n_good_pixels: np.ndarray
    converged: np.ndarray
    status: np.ndarray
    n_iterations: np.ndarray
    start_index: np.ndarray


def sufficient_statistics(
    flux: np.ndarray,
    ivar: np.ndarray,
    theta: np.ndarray,
    s2: np.ndarray,
    masked_ivar_threshold: float = DEFAULT_MASKED_IVAR_THRESHOLD,
) -> SufficientStatistics:
    """Compute ``Q_n``, ``b_n``, ``c_n`` of every star in one pass over the pixels.

    Parameters
    ----------
    flux : numpy.ndarray
        Normalized flux, shape (N, P), flux units.
    ivar : numpy.ndarray
        Inverse variance, shape (N, P), flux units^-2. Tiny values for masked pixels are
        used as given (their weight stays tiny). Non-finite or negative values get zero
        weight and set ``bad_input``.
    theta : numpy.ndarray
        Trained coefficients, shape (P, T), flux units.
    s2 : numpy.ndarray
        Trained scatter squared, shape (P,), flux units^2. Pixels with non-finite
        ``theta`` or ``s2`` (untrainable pixels) get zero weight.
    masked_ivar_threshold : float
        Pixels with ``ivar <= masked_ivar_threshold`` do not count in ``n_good_pixels``.

    Returns
    -------
    SufficientStatistics

    Raises
    ------
    ValueError
        On inconsistent shapes only.
    """
    flux = np.asarray(flux, dtype=np.float64)
    ivar = np.asarray(ivar, dtype=np.float64)
    theta = np.asarray(theta, dtype=np.float64)
    s2 = np.asarray(s2, dtype=np.float64)
    if flux.ndim != 2 or ivar.shape != flux.shape:
        raise ValueError(f"flux and ivar must have the same shape (N, P), got {flux.shape} and {ivar.shape}")
    n_pixels = flux.shape[1]
    if theta.ndim != 2 or theta.shape[0] != n_pixels or s2.shape != (n_pixels,):
        raise ValueError(
            f"theta must have shape (P={n_pixels}, T) and s2 shape (P,), got {theta.shape} and {s2.shape}"
        )
    model_ok = np.all(np.isfinite(theta), axis=1) & np.isfinite(s2) & (s2 >= 0)  # (P,)
    data_ok = np.isfinite(flux) & np.isfinite(ivar) & (ivar >= 0)
    bad_input = np.any(~data_ok & (ivar != 0), axis=1)  # (NaN != 0 is True)
    usable = data_ok & model_ok[None, :]
    theta_safe = np.where(model_ok[:, None], theta, 0.0)
    s2_safe = np.where(model_ok, s2, 0.0)
    ivar_safe = np.where(usable, ivar, 0.0)
    weight = ivar_safe / (1.0 + ivar_safe * s2_safe)  # (N, P)
    resid0 = np.where(usable, flux - theta_safe[:, 0], 0.0)

    n_terms = theta.shape[1]
    rows, cols = np.triu_indices(n_terms)
    quadratic_triu = weight @ (theta_safe[:, rows] * theta_safe[:, cols])  # (N, T(T+1)/2)
    quadratic = np.empty((flux.shape[0], n_terms, n_terms))
    quadratic[:, rows, cols] = quadratic_triu
    quadratic[:, cols, rows] = quadratic_triu
    w_resid = weight * resid0
    linear = w_resid @ theta_safe
    constant = np.sum(w_resid * resid0, axis=1)
    n_good = np.count_nonzero(usable & (ivar_safe > masked_ivar_threshold), axis=1)
    return SufficientStatistics(quadratic, linear, constant, n_good, bad_input)


def chi2_from_statistics(statistics: SufficientStatistics, scaled_labels: np.ndarray) -> np.ndarray:
    """Exact chi2 of every star at given scaled labels, from its sufficient statistics.

    Parameters
    ----------
    statistics : SufficientStatistics
        For N stars.
    scaled_labels : numpy.ndarray
        Shape (N, K) or (N, M, K) (M label vectors per star), dimensionless.

    Returns
    -------
    numpy.ndarray
        chi2, shape (N,) or (N, M), dimensionless.
    """
    x = np.asarray(scaled_labels, dtype=np.float64)
    n_stars, n_terms = statistics.linear.shape
    if x.ndim not in (2, 3) or x.shape[0] != n_stars or n_quadratic_terms(x.shape[-1]) != n_terms:
        raise ValueError(f"scaled_labels must have shape (N={n_stars}, [M,] K) with a {n_terms}-term design")
    squeeze = x.ndim == 2
    if squeeze:
        x = x[:, None, :]
    design = _centred_design(x)
    q_design = np.einsum("ntu,nmu->nmt", statistics.quadratic, design)
    chi2 = statistics.constant[:, None] + np.sum(design * (q_design - 2.0 * statistics.linear[:, None, :]), axis=-1)
    return chi2[:, 0] if squeeze else chi2


def starting_points_from_training(
    training_labels: np.ndarray,
    quantiles: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95),
    include_median: bool = True,
) -> np.ndarray:
    """Starting points for the test step, spread over the training label distribution.

    The training labels are standardised and projected on their first principal
    component (for M dwarfs: the sequence along which Teff, R, M, L grow together);
    the training stars closest to the given quantiles of that projection are the
    starting points, so that every point is a realistic label combination. The
    per-label median (the default pivot) is prepended when ``include_median``.

    Parameters
    ----------
    training_labels : numpy.ndarray
        Shape (N, K), physical units, finite.
    quantiles : tuple of float
        Quantiles in [0, 1] of the first principal component.
    include_median : bool
        Prepend the per-label median.

    Returns
    -------
    numpy.ndarray
        Shape (M, K), physical units, without duplicate rows.
    """
    labels = np.asarray(training_labels, dtype=np.float64)
    if labels.ndim != 2 or labels.shape[0] < 2 or not np.all(np.isfinite(labels)):
        raise ValueError(f"training_labels must be finite with shape (N >= 2, K), got {labels.shape}")
    q = np.asarray(quantiles, dtype=np.float64)
    if q.ndim != 1 or np.any((q < 0) | (q > 1)) or (q.size == 0 and not include_median):
        raise ValueError(f"quantiles must be a 1-D sequence in [0, 1], got {quantiles!r}")
    spread = labels.std(axis=0)
    standardised = (labels - labels.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    _, _, vt = np.linalg.svd(standardised, full_matrices=False)
    projection = standardised @ vt[0]
    points = [np.median(labels, axis=0)] if include_median else []
    for value in np.quantile(projection, q):
        points.append(labels[np.argmin(np.abs(projection - value))])
    unique = []
    for point in points:
        if not any(np.array_equal(point, seen) for seen in unique):
            unique.append(point)
    return np.asarray(unique)


def infer_labels(
    flux: np.ndarray,
    ivar: np.ndarray,
    theta: np.ndarray,
    s2: np.ndarray,
    pivots: np.ndarray,
    scales: np.ndarray,
    starting_points: np.ndarray,
    *,
    masked_ivar_threshold: float = DEFAULT_MASKED_IVAR_THRESHOLD,
    covariance: Literal["exact", "gauss_newton"] = "exact",
    max_iterations: int = 100,
    decrement_tolerance: float = 1e-8,
    step_tolerance: float = 1e-9,
) -> InferenceResult:
    """Labels, formal covariances and chi2 of a chunk of stars (the Cannon test step).

    Parameters
    ----------
    flux, ivar : numpy.ndarray
        Normalized flux and inverse variance, shape (N, P) (see
        :func:`sufficient_statistics`).
    theta, s2 : numpy.ndarray
        Trained model, shapes (P, T) and (P,).
    pivots, scales : numpy.ndarray
        Label scaling of the trained model, shape (K,), physical units.
    starting_points : numpy.ndarray
        Physical labels to start from, shape (M, K) (the same for all stars) or
        (N, M, K).
    masked_ivar_threshold : float
        ``ivar`` at or below which a pixel does not count as good.
    covariance : {"exact", "gauss_newton"}
        Hessian used for the formal covariance: the exact Hessian of ``chi2 / 2`` or its
        Gauss-Newton part ``J^T Q J``.
    max_iterations : int
        Maximum optimiser iterations per starting point.
    decrement_tolerance : float
        Convergence threshold on the Newton decrement (chi2 units).
    step_tolerance : float
        Convergence threshold on the largest scaled-label step (dimensionless).

    Returns
    -------
    InferenceResult
        Labels and covariance in physical units.
    """
    statistics = sufficient_statistics(flux, ivar, theta, s2, masked_ivar_threshold)
    return optimize_labels(
        statistics,
        pivots,
        scales,
        starting_points,
        covariance=covariance,
        max_iterations=max_iterations,
        decrement_tolerance=decrement_tolerance,
        step_tolerance=step_tolerance,
    )


def optimize_labels(
    statistics: SufficientStatistics,
    pivots: np.ndarray,
    scales: np.ndarray,
    starting_points: np.ndarray,
    *,
    covariance: Literal["exact", "gauss_newton"] = "exact",
    max_iterations: int = 100,
    decrement_tolerance: float = 1e-8,
    step_tolerance: float = 1e-9,
    singular_rtol: float = 1e-10,
) -> InferenceResult:
    """Minimise chi2 from several starting points per star, given sufficient statistics.

    Parameters
    ----------
    statistics : SufficientStatistics
        For N stars (possibly summed over pixel chunks).
    pivots, scales : numpy.ndarray
        Shape (K,), physical units.
    starting_points : numpy.ndarray
        Physical labels, shape (M, K) or (N, M, K).
    covariance, max_iterations, decrement_tolerance, step_tolerance
        See :func:`infer_labels`.
    singular_rtol : float
        A Hessian is singular when its smallest eigenvalue is at most ``singular_rtol``
        times its largest.

    Returns
    -------
    InferenceResult
    """
    if covariance not in ("exact", "gauss_newton"):
        raise ValueError(f"covariance must be 'exact' or 'gauss_newton', got {covariance!r}")
    if int(max_iterations) < 1 or not decrement_tolerance > 0 or not step_tolerance > 0:
        raise ValueError("max_iterations must be >= 1 and the tolerances > 0")
    pivots = np.asarray(pivots, dtype=np.float64)
    scales = np.asarray(scales, dtype=np.float64)
    n_stars, n_terms = statistics.linear.shape
    if pivots.ndim != 1 or n_quadratic_terms(pivots.size) != n_terms:
        raise ValueError(f"pivots/scales must have shape (K,) for a {n_terms}-term model, got {pivots.shape}")
    n_labels = pivots.size
    starts = scale_labels(starting_points, pivots, scales)
    if starts.ndim == 2:
        starts = np.broadcast_to(starts[None], (n_stars,) + starts.shape)
    if starts.ndim != 3 or starts.shape[0] != n_stars or starts.shape[1] < 1:
        raise ValueError(
            f"starting_points must have shape (M, K) or (N={n_stars}, M, K), got {np.shape(starting_points)}"
        )
    n_starts = starts.shape[1]

    fit = _levenberg_marquardt(
        statistics, starts.reshape(n_stars * n_starts, n_labels), n_starts,
        int(max_iterations), decrement_tolerance, step_tolerance, singular_rtol,
    )
    chi2_all = fit.chi2.reshape(n_stars, n_starts)
    finite_all = np.isfinite(chi2_all) & np.all(np.isfinite(fit.x.reshape(n_stars, n_starts, n_labels)), axis=-1)
    # The lowest finite chi2 wins, converged or not (a non-converged winner is flagged).
    best = np.argmin(np.where(finite_all, chi2_all, np.inf), axis=1)
    any_finite = finite_all.any(axis=1)
    flat_best = np.arange(n_stars) * n_starts + best

    x_best = fit.x[flat_best]
    chi2 = fit.chi2[flat_best]
    converged = fit.converged[flat_best] & any_finite
    n_iterations = fit.n_iterations[flat_best]

    x_for_hessian = np.where(any_finite[:, None], x_best, 0.0)
    hessian = _hessians(statistics, np.arange(n_stars), x_for_hessian, covariance == "exact")
    eigenvalues, eigenvectors = _safe_eigh(hessian)
    positive = np.all(np.isfinite(eigenvalues), axis=1) & (
        eigenvalues[:, 0] > singular_rtol * np.abs(eigenvalues[:, -1])
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        inverse_eig = np.where(positive[:, None], 1.0 / eigenvalues, np.nan)
    cov_scaled = np.einsum("nkj,nj,nlj->nkl", eigenvectors, inverse_eig, eigenvectors)
    cov_physical = cov_scaled * scales[None, :, None] * scales[None, None, :]

    n_good = np.asarray(statistics.n_good_pixels, dtype=np.int64)
    status = np.zeros(n_stars, dtype=np.int64)
    status[~converged & any_finite] |= InferenceStatus.NOT_CONVERGED
    status[~any_finite] |= InferenceStatus.NON_FINITE
    status[~positive & any_finite] |= InferenceStatus.SINGULAR_HESSIAN
    too_few = n_good <= n_labels
    status[too_few] |= InferenceStatus.TOO_FEW_PIXELS
    status[np.asarray(statistics.bad_input, dtype=bool)] |= InferenceStatus.BAD_INPUT

    labels = unscale_labels(x_best, pivots, scales)
    invalid = ~any_finite | too_few
    labels[invalid] = np.nan
    cov_physical[invalid | ~positive] = np.nan
    chi2 = np.where(any_finite, chi2, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        reduced = np.where(too_few, np.nan, chi2 / (n_good - n_labels))
    return InferenceResult(
        labels=labels,
        covariance=cov_physical,
        chi2=chi2,
        reduced_chi2=reduced,
        n_good_pixels=n_good,
        converged=converged,
        status=status,
        n_iterations=n_iterations,
        start_index=np.where(any_finite, best, -1),
    )


class _FitResult(NamedTuple):
    x: np.ndarray  # (B, K) scaled labels
    chi2: np.ndarray  # (B,)
    converged: np.ndarray  # (B,)
    n_iterations: np.ndarray  # (B,)


_LAMBDA_INITIAL = 1e-3
_LAMBDA_MIN = 1e-12
_LAMBDA_MAX = 1e12


def _levenberg_marquardt(
    statistics: SufficientStatistics,
    x0: np.ndarray,
    n_starts: int,
    max_iterations: int,
    decrement_tolerance: float,
    step_tolerance: float,
    singular_rtol: float,
) -> _FitResult:
    """Batched damped Newton / Levenberg-Marquardt on chi2/2 for B = N*M points."""
    n_points = x0.shape[0]
    star = np.repeat(np.arange(statistics.linear.shape[0]), n_starts)
    x = np.array(x0, dtype=np.float64)  # a copy
    design, resid_vec = _design_and_residual_vector(statistics, star, x)
    lam = np.full(n_points, _LAMBDA_INITIAL)
    converged = np.zeros(n_points, dtype=bool)
    n_iter = np.zeros(n_points, dtype=np.int64)
    active = np.all(np.isfinite(x), axis=1) & np.all(np.isfinite(resid_vec), axis=1)
    while active.any():
        ib = np.flatnonzero(active)
        xa = x[ib]
        jac = design_jacobian(xa)  # (b, T, K)
        grad = np.einsum("btk,bt->bk", jac, resid_vec[ib])
        hess = _hessians(statistics, star[ib], xa, True, jac=jac, resid_vec=resid_vec[ib])
        eigenvalues, eigenvectors = _safe_eigh(hess)
        indefinite = ~(eigenvalues[:, 0] > singular_rtol * np.abs(eigenvalues[:, -1]))
        if indefinite.any():  # fall back to Gauss-Newton (positive semi-definite)
            gn = _hessians(statistics, star[ib[indefinite]], xa[indefinite], False, jac=jac[indefinite])
            eigenvalues[indefinite], eigenvectors[indefinite] = _safe_eigh(gn)
        eig = np.clip(eigenvalues, 0.0, None)
        top = np.maximum(eig[:, -1], np.finfo(float).tiny)
        grad_eig = np.einsum("bkj,bk->bj", eigenvectors, grad)
        usable_eig = eig > singular_rtol * top[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            decrement = np.sum(np.where(usable_eig, grad_eig**2 / eig, 0.0), axis=1)
        done = decrement < decrement_tolerance

        mu = lam[ib] * top
        step = -np.einsum("bkj,bj->bk", eigenvectors, grad_eig / (eig + mu[:, None]))
        x_new = xa + step
        design_new, resid_new = _design_and_residual_vector(statistics, star[ib], x_new)
        delta_chi2 = np.sum(_design_difference(xa, step) * (resid_new + resid_vec[ib]), axis=1)
        accept = ~done & np.isfinite(delta_chi2) & (delta_chi2 < 0) & np.all(np.isfinite(x_new), axis=1)

        acc = ib[accept]
        x[acc], design[acc], resid_vec[acc] = x_new[accept], design_new[accept], resid_new[accept]
        lam[acc] = np.maximum(lam[acc] / 10.0, _LAMBDA_MIN)
        rej = ib[~accept & ~done]
        lam[rej] = lam[rej] * 10.0
        n_iter[ib] += 1

        small_step = accept & (np.max(np.abs(step), axis=1) < step_tolerance)
        converged[ib[done | small_step]] = True
        stalled = lam[ib] > _LAMBDA_MAX
        active[ib[done | small_step | stalled | (n_iter[ib] >= max_iterations)]] = False
    chi2 = statistics.constant[star] + np.sum(design * (resid_vec - statistics.linear[star]), axis=1)
    return _FitResult(x, chi2, converged, n_iter)


def _centred_design(x: np.ndarray) -> np.ndarray:
    """Design vector minus its value at the pivot (the constant term set to 0)."""
    design = design_matrix(x)
    design[..., 0] = 0.0
    return design


def _design_and_residual_vector(statistics, star, x) -> tuple[np.ndarray, np.ndarray]:
    """Centred design A' and ``Q A' - b`` (d chi2/2 / d A') for points of given stars."""
    design = _centred_design(x)
    resid_vec = np.einsum("btu,bu->bt", statistics.quadratic[star], design) - statistics.linear[star]
    return design, resid_vec


def _design_difference(x: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Exact ``A(x + step) - A(x)``: for a term x_a x_b, x_a d_b + d_a x_b + d_a d_b."""
    pairs = quadratic_term_pairs(x.shape[-1])
    x_ext = np.concatenate([x, np.ones(x.shape[:-1] + (1,))], axis=-1)
    d_ext = np.concatenate([step, np.zeros(step.shape[:-1] + (1,))], axis=-1)
    xa, xb = x_ext[..., pairs[:, 0]], x_ext[..., pairs[:, 1]]
    da, db = d_ext[..., pairs[:, 0]], d_ext[..., pairs[:, 1]]
    return xa * db + da * xb + da * db


def _hessians(statistics, star, x, exact: bool, jac=None, resid_vec=None) -> np.ndarray:
    """Hessian of chi2/2 w.r.t. scaled labels: J^T Q J (+ sum_t v_t d2A_t if exact)."""
    if jac is None:
        jac = design_jacobian(x)
    quadratic = statistics.quadratic[star]
    hess = np.einsum("btk,btl->bkl", jac, quadratic @ jac)
    if exact:
        if resid_vec is None:
            _, resid_vec = _design_and_residual_vector(statistics, star, x)
        hess = hess + np.einsum("bt,tkl->bkl", resid_vec, design_second_derivatives(x.shape[-1]))
    return 0.5 * (hess + np.swapaxes(hess, -1, -2))


def _safe_eigh(matrices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Batched eigh; non-finite matrices give NaN eigenvalues instead of an exception."""
    finite = np.all(np.isfinite(matrices), axis=(-2, -1))
    safe = np.where(finite[:, None, None], matrices, np.eye(matrices.shape[-1]))
    eigenvalues, eigenvectors = np.linalg.eigh(safe)
    eigenvalues[~finite] = np.nan
    return eigenvalues, eigenvectors
