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

* Trust-region Newton on ``chi2 / 2`` in scaled labels, gradient ``g = J^T (Q A' - b)``,
  exact Hessian ``H = J^T Q J + sum_t (Q A' - b)_t d2A_t/dx dx``. The model Hessian is
  ``H`` where it is positive definite, else the Gauss-Newton ``J^T Q J`` (away from a
  saddle the exact one's negative curvature only reflects the distance from the valley
  floor), except near a stationary point (Gauss-Newton decrement < 1), where ``H`` is
  kept so that saddles are left along their negative curvature. The step solves
  ``(B + sigma I) p = -g`` with ``|p| <= radius`` (Moré-Sorensen; ``sigma = 0`` for an
  interior Newton step); the radius follows the ratio of actual to predicted decrease.
* Curved valleys: labels that are nearly collinear in the training set (Teff, R, M, L of
  M dwarfs follow one sequence) give chi2 long, narrow, curved valleys (Hessian
  condition numbers 1e5-1e10), where straight steps leave the valley floor after a few
  hundredths of a scaled unit. Each trial point is therefore ``x + p + a/2`` with the
  geodesic acceleration ``a = -(B + sigma I)^-1 J^T Q (p^T d2A p)`` (Transtrum & Sethna
  2012: the second-order term of the model along the step, exact here since ``A`` is
  quadratic), followed by one frozen-Hessian Newton correction along the stiffest
  eigen-direction (back onto the valley floor). The chi2 change is computed from exact
  design differences ``(A(x') - A(x)) . (r(x') + r(x))``, free of cancellation.
* Converged when the Newton decrement ``g^T H^-1 g`` (the chi2 decrease a full Newton
  step would still bring; also the squared Mahalanobis distance to the optimum in units
  of the formal errors) is below ``decrement_tolerance`` (computed from the gradient, not
  from chi2 differences: reachable in float64), or when a full Newton step is below
  ``step_tolerance`` in every scaled label; the last Newton step is then still taken if
  it does not raise chi2. A start that reaches ``max_iterations`` or whose trust region
  collapses is not converged.
* Positive definite 4x4 models are factorized with Cholesky decompositions written out
  entry by entry, each entry a vector over all points of the chunk (no per-matrix LAPACK
  call); only indefinite or singular ones use ``eigh``. Given the same statistics, a
  star's fit is bit-for-bit independent of the other stars of its chunk.
* Several starting points per star (:func:`starting_points_from_training`); the
  solution with the lowest chi2 wins (flagged ``NOT_CONVERGED`` if it did not converge).
  By default the search is staged (``prune``): the start with the lowest chi2 runs
  first; starts from which chi2 descends monotonically along the straight segment to
  its minimum (exact: chi2 along a line is a quartic) are dropped; starts beyond a
  chi2 barrier run, and stop early once they are duplicates of a better minimum or
  clearly worse than it. On the bench data every other start is dropped, so the
  search costs about one start per star.
* Formal covariance = inverse Hessian of ``chi2 / 2`` at the optimum (the exact Hessian
  of the quartic chi2 by default, Gauss-Newton on request), converted to physical units
  ``cov_phys = S cov S``, ``S = diag(scales)``.

Failures never raise: each star gets a status made of :class:`InferenceStatus` bits.
Labels are NaN only with ``NON_FINITE`` or ``TOO_FEW_PIXELS``; the covariance is NaN only
with one of those or ``SINGULAR_HESSIAN``. Inputs are never modified.
"""
from __future__ import annotations

import enum
import functools
from typing import Literal, NamedTuple

import numpy as np

from lamost_mdwarf.kernels.cannon_design import (
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

    Notes
    -----
    Stars are processed in blocks of ``_STATISTICS_BLOCK`` rows: the elementwise work
    (weights, residuals, ``c_n``, pixel counts) reuses a few preallocated block buffers
    (in L3 rather than main memory), and the products with the per-model constants
    ``theta_t theta_u`` (cached between calls with the same model) are matrix products
    of fixed shapes per block, so a star's statistics are bit-for-bit independent of its
    chunk. A block whose data are all finite with ``ivar >= 0`` (checked from ``c_n``
    and ``min(ivar)``) takes that fast path; any other block is computed with explicit
    masks (same results). About 2/3 of the time is the matrix products (floating-point
    bound: ~40 GFLOP/s on one core).
    """
    return _statistics(flux, ivar, theta, s2, masked_ivar_threshold, pivot_terms=True)


#: Stars per block of :func:`sufficient_statistics` (fixed, see there; 16-128 are within
#: ~15% of each other in time at P = 3000).
_STATISTICS_BLOCK = 48

#: Per-model constants of the last model seen: (theta copy, s2 copy, pivot_terms, constants).
_MODEL_CACHE: list = [None]


def _model_constants(theta: np.ndarray, s2: np.ndarray, pivot_terms: bool):
    """``model_ok``, safe ``theta``/``s2``, the products ``theta_t theta_u`` (upper
    triangle, row 0 left out unless ``pivot_terms``) and the map to the full (T, T)."""
    cached = _MODEL_CACHE[0]
    if (
        cached is not None
        and cached[2] == pivot_terms
        and cached[0].shape == theta.shape
        and np.array_equal(cached[0], theta, equal_nan=True)
        and np.array_equal(cached[1], s2, equal_nan=True)
    ):
        return cached[3]
    n_terms = theta.shape[1]
    model_ok = np.all(np.isfinite(theta), axis=1) & np.isfinite(s2) & (s2 >= 0)  # (P,)
    theta_safe = np.where(model_ok[:, None], theta, 0.0)
    s2_safe = np.where(model_ok, s2, 0.0)
    first = 0 if pivot_terms else 1
    rows, cols = np.triu_indices(n_terms - first)
    rows, cols = rows + first, cols + first
    # (P, n_columns): the products, then zero columns up to a multiple of 8 (at least one
    # without the pivot terms: the zero entries of Q point to it).
    n_columns = 8 * -(-(rows.size + (0 if pivot_terms else 1)) // 8)
    products = np.zeros((theta.shape[0], n_columns))
    products[:, : rows.size] = theta_safe[:, rows] * theta_safe[:, cols]
    # Where each (t, u) entry of Q comes from (a zero column for row/column 0 when the
    # pivot terms are left out).
    index = np.full((n_terms, n_terms), rows.size, dtype=np.intp)
    index[rows, cols] = np.arange(rows.size)
    index[cols, rows] = np.arange(rows.size)
    linear_theta = np.ascontiguousarray(theta_safe[:, first:])
    constants = (model_ok, theta_safe, s2_safe, products, index.ravel(), linear_theta, first)
    _MODEL_CACHE[0] = (theta.copy(), s2.copy(), pivot_terms, constants)
    return constants


def _as_float(values) -> np.ndarray:
    """``values`` as a float32 or float64 array (other types converted to float64)."""
    values = np.asarray(values)
    return values if values.dtype in (np.float32, np.float64) else values.astype(np.float64)


def _statistics(flux, ivar, theta, s2, masked_ivar_threshold, pivot_terms: bool) -> SufficientStatistics:
    """:func:`sufficient_statistics`; without ``pivot_terms`` row and column 0 of ``Q`` and
    ``b_0`` (never used by the optimiser, since ``A'_0 = 0``) are left at 0."""
    # float32 spectra (as stored) are converted block by block, inside the elementwise
    # operations (exactly: float32 -> float64 is exact), not copied whole.
    flux = _as_float(flux)
    ivar = _as_float(ivar)
    theta = np.asarray(theta, dtype=np.float64)
    s2 = np.asarray(s2, dtype=np.float64)
    if flux.ndim != 2 or ivar.shape != flux.shape:
        raise ValueError(f"flux and ivar must have the same shape (N, P), got {flux.shape} and {ivar.shape}")
    n_stars, n_pixels = flux.shape
    if theta.ndim != 2 or theta.shape[0] != n_pixels or s2.shape != (n_pixels,):
        raise ValueError(
            f"theta must have shape (P={n_pixels}, T) and s2 shape (P,), got {theta.shape} and {s2.shape}"
        )
    n_terms = theta.shape[1]
    model_ok, theta_safe, s2_safe, products, index, linear_theta, first = _model_constants(theta, s2, pivot_terms)
    all_model_ok = bool(model_ok.all())
    threshold = float(masked_ivar_threshold)
    quadratic_packed = np.empty((n_stars, products.shape[1]))  # zero padding columns at the end
    linear = np.zeros((n_stars, n_terms))
    constant = np.empty(n_stars)
    n_good = np.empty(n_stars, dtype=np.int64)
    bad_input = np.zeros(n_stars, dtype=bool)
    # Products of fixed shapes, (block, P) @ (P, columns a multiple of 8), with zero rows
    # appended to the last block: OpenBLAS' choice of kernels (and threads) by shape can
    # otherwise make a star's round-off depend on its row in the chunk; with these
    # shapes a star's statistics are bit-for-bit those it gets in any other chunk.
    block = _STATISTICS_BLOCK
    weight = np.empty((block, n_pixels))
    resid0 = np.empty((block, n_pixels))
    w_resid = np.empty((block, n_pixels))
    good = np.empty((block, n_pixels))
    quad_block = np.empty((block, products.shape[1]))
    linear_block = np.empty((block, linear_theta.shape[1]))
    ones = np.ones(n_pixels)
    theta0 = np.ascontiguousarray(theta_safe[:, 0])
    for start in range(0, n_stars, block):
        stop = min(start + block, n_stars)
        m = stop - start
        f, iv = flux[start:stop], ivar[start:stop]
        w, r, wr = weight[:m], resid0[:m], w_resid[:m]
        fast = all_model_ok and m > 0
        if fast:
            with np.errstate(all="ignore"):
                np.multiply(iv, s2_safe, out=w)
                w += 1.0
                np.divide(iv, w, out=w)
                np.subtract(f, theta0, out=r)
                np.multiply(w, r, out=wr)
                c = (wr[:, None, :] @ r[:, :, None])[:, 0, 0]  # row dot products (BLAS)
            # Finite c_n: every w r^2 term is finite, so every w and r is (inf * 0 = NaN);
            # with ivar >= 0 the masks of the general path would all be true.
            fast = bool(np.all(np.isfinite(c))) and bool(iv.min() >= 0)
        if fast:
            np.greater(iv, threshold, out=good[:m], casting="unsafe")  # 0.0 / 1.0
        else:
            data_ok = np.isfinite(f) & np.isfinite(iv) & (iv >= 0)
            bad_input[start:stop] = np.any(~data_ok & (iv != 0), axis=1)  # (NaN != 0 is True)
            usable = data_ok & model_ok[None, :]
            ivar_safe = np.where(usable, iv, 0.0)
            w[...] = ivar_safe / (1.0 + ivar_safe * s2_safe)
            r[...] = np.where(usable, f - theta0, 0.0)
            np.multiply(w, r, out=wr)
            c = np.sum(wr * r, axis=1)
            good[:m] = usable & (ivar_safe > threshold)
        constant[start:stop] = c
        n_good[start:stop] = good[:m] @ ones  # exact counts
        if m < block:
            weight[m:] = 0.0
            w_resid[m:] = 0.0
        np.matmul(weight, products, out=quad_block)
        np.matmul(w_resid, linear_theta, out=linear_block)
        quadratic_packed[start:stop] = quad_block[:m]
        linear[start:stop, first:] = linear_block[:m]
    quadratic = np.take(quadratic_packed, index, axis=1).reshape(n_stars, n_terms, n_terms)
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
    q_design = np.swapaxes(statistics.quadratic @ np.swapaxes(design, 1, 2), 1, 2)  # Q A' per point
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
    prune: bool = True,
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
        Convergence threshold on the Newton decrement ``g^T H^-1 g`` (chi2 units): the
        chi2 decrease a full Newton step would still bring, i.e. the squared distance to
        the optimum in units of the formal errors (1e-8: 1e-4 sigma).
    step_tolerance : float
        Convergence threshold on a full Newton step (exact, positive definite Hessian,
        inside the trust region): converged when below this in every scaled label
        (dimensionless).
    prune : bool
        Stop starts that cannot win (see :func:`optimize_labels`).

    Returns
    -------
    InferenceResult
        Labels and covariance in physical units.
    """
    statistics = _statistics(flux, ivar, theta, s2, masked_ivar_threshold, pivot_terms=False)
    return optimize_labels(
        statistics,
        pivots,
        scales,
        starting_points,
        covariance=covariance,
        max_iterations=max_iterations,
        decrement_tolerance=decrement_tolerance,
        step_tolerance=step_tolerance,
        prune=prune,
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
    singular_rtol: float = 1e-12,
    prune: bool = True,
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
        times its largest (also the pivot threshold of the optimiser's Cholesky
        factorizations, relative to the largest diagonal entry). The default, 1e-12, is
        ~1000 times the float64 round-off of the smallest eigenvalue of these Hessians
        (measured: ~1.5e-15 times the largest), so the covariance of a flagged-OK star is
        accurate to ~0.1%; trained M-dwarf models give condition numbers up to ~1e10.
    prune : bool
        Staged search (default): per star, the start with the lowest chi2 runs first, to
        its minimum ``x*``; every other start from which chi2 decreases monotonically
        along the straight segment to ``x*`` (an exact test: chi2 is a quartic along a
        line) is dropped, since it descends into the same minimum; the others run, and
        stop once within ~1 formal sigma of their own minimum (Newton decrement < 1) if
        a start with a lower chi2 lies within squared Mahalanobis distance 1 (the same
        minimum) or if another start's chi2 is already clearly below their minimum. A
        start separated from ``x*`` by a chi2 barrier is never dropped before that, so
        other basins are still explored. On one basin the result is that of the
        unpruned search to the convergence tolerance; ``start_index`` and
        ``n_iterations`` may name another start of the same minimum. Heuristic only in
        that descent from a dropped start is assumed to follow the segment's basin.
        ``False``: every start runs to convergence (about M times the work).

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

    fit = _multi_start_search(
        statistics, starts.reshape(n_stars * n_starts, n_labels), n_starts,
        int(max_iterations), decrement_tolerance, step_tolerance, singular_rtol, prune,
    )
    chi2_all = fit.chi2.reshape(n_stars, n_starts)
    finite_all = np.isfinite(chi2_all) & np.all(np.isfinite(fit.x.reshape(n_stars, n_starts, n_labels)), axis=-1)
    finite_all &= ~fit.pruned.reshape(n_stars, n_starts)  # a pruned start cannot win
    # The lowest finite chi2 wins, converged or not (a non-converged winner is flagged).
    best = np.argmin(np.where(finite_all, chi2_all, np.inf), axis=1)
    any_finite = finite_all.any(axis=1)
    flat_best = np.arange(n_stars) * n_starts + best

    x_best = fit.x[flat_best]
    chi2 = fit.chi2[flat_best]
    converged = fit.converged[flat_best] & any_finite
    n_iterations = fit.n_iterations[flat_best]

    x_for_hessian = np.where(any_finite[:, None], x_best, 0.0)
    hessian = _hessians(statistics, x_for_hessian, covariance == "exact")
    # Eigenvalues for the test of positive definiteness, the inverse by LU (together ~1.4x
    # faster than a batched eigh for 4 x 4 matrices; the same matrix to round-off).
    finite_hessian = np.all(np.isfinite(hessian), axis=(-2, -1))
    safe_hessian = np.where(finite_hessian[:, None, None], hessian, np.eye(n_labels))
    eigenvalues = np.linalg.eigvalsh(safe_hessian)
    eigenvalues[~finite_hessian] = np.nan
    positive = np.all(np.isfinite(eigenvalues), axis=1) & (
        eigenvalues[:, 0] > singular_rtol * np.abs(eigenvalues[:, -1])
    )
    cov_scaled = np.full((n_stars, n_labels, n_labels), np.nan)
    if positive.any():
        inverse = np.linalg.inv(safe_hessian[positive])
        cov_scaled[positive] = 0.5 * (inverse + np.swapaxes(inverse, 1, 2))
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


def _multi_start_search(
    statistics: SufficientStatistics,
    x0: np.ndarray,
    n_starts: int,
    max_iterations: int,
    decrement_tolerance: float,
    step_tolerance: float,
    singular_rtol: float,
    prune: bool,
) -> "_FitResult":
    """All starts of all stars (``prune=False``), or the staged search (``prune=True``).

    Staged search, per star: (1) the start with the lowest chi2 runs to convergence,
    ``x*``; (2) every other start from which chi2 decreases monotonically along the
    straight segment to a converged ``x*`` (checked exactly: chi2 is a quartic
    polynomial along a line) lies in the descent basin of ``x*`` and is dropped; (3) the
    remaining starts run, with the duplicate / hopeless pruning of
    :func:`_starts_to_prune` against each other and ``x*``. A start on the far side of a
    chi2 barrier from ``x*`` (another local minimum) is never dropped before it is
    within ~1 sigma of its own minimum.
    """
    n_points, n_labels = x0.shape
    if not prune or n_starts == 1 or n_points == 0:
        return _trust_region_newton(
            statistics, x0, n_starts, max_iterations, decrement_tolerance, step_tolerance, singular_rtol, prune
        )
    n_stars = n_points // n_starts
    star = np.repeat(np.arange(n_stars), n_starts)
    x0 = np.asarray(x0, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        chi2_start = chi2_from_statistics(statistics, x0.reshape(n_stars, n_starts, n_labels))
    finite_start = np.isfinite(chi2_start) & np.all(np.isfinite(x0.reshape(n_stars, n_starts, n_labels)), axis=-1)
    first = np.argmin(np.where(finite_start, chi2_start, np.inf), axis=1)  # ties: the earlier start
    phase1 = np.zeros(n_points, dtype=bool)
    phase1[np.arange(n_stars) * n_starts + first] = True
    fit1 = _trust_region_newton(
        statistics, x0, n_starts, max_iterations, decrement_tolerance, step_tolerance, singular_rtol,
        prune=False, run=phase1, pruned=~phase1,
    )
    best_flat = np.arange(n_stars) * n_starts + first
    x_best = fit1.x[best_flat]
    has_best = fit1.converged[best_flat] & np.isfinite(fit1.chi2[best_flat])
    others = ~phase1 & finite_start.ravel() & has_best[star]
    in_basin = np.zeros(n_points, dtype=bool)
    if others.any():
        in_basin = others & _descends_to(statistics, x0.reshape(n_stars, n_starts, n_labels), x_best).ravel()
    x1 = np.where(phase1[:, None], fit1.x, x0)
    run2 = ~phase1 & ~in_basin & finite_start.ravel()
    if not run2.any():  # every other start pruned (or unusable): the phase-1 result stands
        return _FitResult(x1, fit1.chi2, fit1.converged, fit1.n_iterations, ~phase1)
    fit2 = _trust_region_newton(
        statistics, x1, n_starts, max_iterations, decrement_tolerance, step_tolerance, singular_rtol,
        prune=True, run=run2, pruned=in_basin, target=np.where(has_best[:, None], x_best, np.nan),
    )
    return _FitResult(
        x=fit2.x,
        chi2=fit2.chi2,
        converged=np.where(phase1, fit1.converged, fit2.converged),
        n_iterations=np.where(phase1, fit1.n_iterations, fit2.n_iterations),
        pruned=fit2.pruned,
    )


#: A chi2 rise below this along a segment (chi2 units) does not count as a barrier.
_BARRIER_TOLERANCE = 1e-3


def _descends_to(statistics, x_from: np.ndarray, x_to: np.ndarray) -> np.ndarray:
    """Whether chi2 is non-increasing along the straight segments ``x_from -> x_to``.

    ``x_from`` has shape (N, M, K) (M points per star), ``x_to`` (N, K); returns (N, M).
    Along ``x(t) = x_from + t d``, ``A'(x(t)) = A0 + t A1 + t^2 A2`` exactly (``A1 = J d``,
    ``A2 = d_a d_b`` per term), so chi2 is the quartic ``sum_i c_i t^i``; its derivative
    (a cubic) is at most ``_BARRIER_TOLERANCE`` on [0, 1] iff it is at the ends and at
    the zeros of its derivative (a quadratic) inside (0, 1).
    """
    n_stars, n_points, n_labels = x_from.shape
    ops = _design_operators(n_labels)
    flat_from = x_from.reshape(n_stars * n_points, n_labels)
    d = (x_to[:, None, :] - x_from).reshape(n_stars * n_points, n_labels)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        shape = (n_stars, n_points, -1)
        a0 = ops.centred_design(flat_from).reshape(shape)
        a1 = ops.directional(flat_from, d).reshape(shape)
        a2 = ops.second_order(d).reshape(shape)
        # Q A for all points of a star: one (T, T) @ (T, M) product per star.
        q_a1 = np.swapaxes(statistics.quadratic @ np.swapaxes(a1, 1, 2), 1, 2)
        q_a2 = np.swapaxes(statistics.quadratic @ np.swapaxes(a2, 1, 2), 1, 2)
        return _monotone_quartic(a0, a1, a2, q_a1, q_a2, statistics.linear[:, None, :])


def _descends_to_points(quadratic, linear, x_from: np.ndarray, x_to: np.ndarray) -> np.ndarray:
    """:func:`_descends_to` for B points with their own (B, T, T) ``Q`` and (B, T) ``b``."""
    ops = _design_operators(x_from.shape[1])
    d = x_to - x_from
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        a0, a1, a2 = ops.centred_design(x_from), ops.directional(x_from, d), ops.second_order(d)
        q_a1 = _residual_vector(quadratic, 0.0, a1)
        q_a2 = _residual_vector(quadratic, 0.0, a2)
        return _monotone_quartic(a0, a1, a2, q_a1, q_a2, linear)


def _monotone_quartic(a0, a1, a2, q_a1, q_a2, linear) -> np.ndarray:
    """The test of :func:`_descends_to`, from ``A0, A1, A2``, ``Q A1``, ``Q A2`` and ``b``."""
    c1 = 2.0 * np.sum(a0 * q_a1 - linear * a1, axis=-1)
    c2 = np.sum(a1 * q_a1 + 2.0 * (a0 * q_a2 - linear * a2), axis=-1)
    c3 = 2.0 * np.sum(a1 * q_a2, axis=-1)
    c4 = np.sum(a2 * q_a2, axis=-1)

    def slope(t):
        return c1 + t * (2.0 * c2 + t * (3.0 * c3 + t * 4.0 * c4))

    worst = np.maximum(slope(0.0), slope(1.0))
    # Zeros of slope'(t) = 2 c2 + 6 c3 t + 12 c4 t^2 (or of its linear part if c4 = 0).
    disc = np.sqrt(np.maximum(36.0 * c3**2 - 96.0 * c2 * c4, 0.0))
    quadratic_case = c4 != 0.0
    roots = [
        np.where(quadratic_case, (-6.0 * c3 + disc) / (24.0 * c4), -c2 / (3.0 * c3)),
        np.where(quadratic_case, (-6.0 * c3 - disc) / (24.0 * c4), np.nan),
    ]
    for t in roots:
        inside = np.isfinite(t) & (t > 0.0) & (t < 1.0)
        worst = np.where(inside, np.maximum(worst, slope(np.where(inside, t, 0.0))), worst)
    scale = np.abs(c1) + np.abs(c2) + np.abs(c3) + np.abs(c4)
    return np.isfinite(worst) & np.isfinite(scale) & (worst <= _BARRIER_TOLERANCE + 1e-12 * scale)


class _FitResult(NamedTuple):
    x: np.ndarray  # (B, K) scaled labels
    chi2: np.ndarray  # (B,)
    converged: np.ndarray  # (B,)
    n_iterations: np.ndarray  # (B,)
    pruned: np.ndarray  # (B,) bool: dropped as a duplicate or a hopeless start (cannot win)


#: Initial trust-region radius, scaled label units (the training set spans about +-2).
_RADIUS_INITIAL = 0.5
#: Largest trust-region radius, scaled label units (reached only by nearly degenerate fits).
_RADIUS_MAX = 1e3
#: A start whose trust region has shrunk below this (scaled label units) has stalled.
_RADIUS_MIN = 1e-10
#: Relative accuracy of a boundary step, ``| |p| - radius | <= rtol radius`` (Moré-Sorensen).
_BOUNDARY_RTOL = 0.1
#: Frozen-Hessian Newton corrections along the stiffest direction per iteration (two or
#: more save ~20% of the iterations but, being unbounded by the trust region, send a few
#: starts to a different, worse, local minimum).
_N_CORRECTIONS = 1
#: Where the exact Hessian is indefinite, the Gauss-Newton one models chi2 unless the
#: Gauss-Newton decrement is below this (chi2 units): then the point is close to a
#: saddle and the exact Hessian's negative curvature is used to leave it.
_SADDLE_DECREMENT = 1.0
#: Pruning of starts (per star): a start is examined once its exact Hessian is positive
#: definite and its Newton decrement is below this (chi2 units: within ~1 formal sigma
#: of its local minimum, where the quadratic model is accurate).
_PRUNE_DECREMENT = 1.0
#: ... and dropped as a duplicate when another start of the star with a lower (or equal,
#: earlier) chi2 lies within this squared Mahalanobis distance (chi2 units, its Hessian).
_PRUNE_DISTANCE = 1.0
#: ... or dropped as hopeless when another start's chi2 is already below its local
#: minimum predicted by the quadratic model (``chi2 - decrement``) by more than
#: ``decrement`` plus this margin (chi2 units).
_PRUNE_MARGIN = 1.0


@functools.lru_cache(maxsize=8)
def _design_operators(n_labels: int) -> "_DesignOperators":
    """The (immutable) operators of a K-label design, built once."""
    return _DesignOperators(n_labels)


class _DesignOperators:
    """Centred design, Jacobian and curvature of the quadratic design by gathers (no BLAS)."""

    def __init__(self, n_labels: int) -> None:
        pairs = quadratic_term_pairs(n_labels)
        n_terms = pairs.shape[0]
        self.n_labels = n_labels
        self.left = pairs[:, 0]
        self.right = pairs[:, 1]
        # J(x)[t, k] = x_ext[left_t] [right_t == k] + x_ext[right_t] [left_t == k]: two
        # gathers of x_ext = [x, 1] times constant 0/1 masks (elementwise: no BLAS call,
        # whose threads only slow down these small products).
        labels = np.arange(n_labels)
        self.jac_left = np.broadcast_to(self.left[:, None], (n_terms, n_labels))
        self.jac_right = np.broadcast_to(self.right[:, None], (n_terms, n_labels))
        self.mask_right = (self.right[:, None] == labels[None, :]).astype(np.float64)
        self.mask_left = (self.left[:, None] == labels[None, :]).astype(np.float64)
        # sum_t v_t d2A_t/dx_k dx_l = c_kl v_{t(k, l)}: one gather of v times a constant.
        second = design_second_derivatives(n_labels)  # (T, K, K), one term per (k, l)
        self.curvature_term = np.argmax(second != 0, axis=0)
        self.curvature_factor = np.take_along_axis(second, self.curvature_term[None], axis=0)[0]
        # The non-zero entries of J, (flat index t K + k, source label in x_ext, factor):
        # J[t, k] = sum of factor * x_ext[source] (one entry per (t, k); 2 x_k for x_k^2).
        coefficient = self.mask_right[:, :, None] * np.eye(n_labels + 1)[self.left][:, None, :]
        coefficient = coefficient + self.mask_left[:, :, None] * np.eye(n_labels + 1)[self.right][:, None, :]
        flat, source = np.nonzero(coefficient.reshape(n_terms * n_labels, n_labels + 1))
        if np.unique(flat).size != flat.size:  # cannot happen for the quadratic design
            raise AssertionError("one source per Jacobian entry expected")
        self.jac_flat = flat
        self.jac_source = source
        self.jac_factor = coefficient.reshape(n_terms * n_labels, n_labels + 1)[flat, source]
        self.n_terms = n_terms

    def _extend(self, x: np.ndarray, last: float) -> np.ndarray:
        return np.concatenate([x, np.full(x.shape[:-1] + (1,), last)], axis=-1)

    # np.take keeps the results C-ordered (fancy indexing on the last axis returns F-ordered
    # arrays, whose row sums numpy computes in an order that depends on the number of
    # rows: a star's result would then depend on the other stars of the chunk).

    def centred_design(self, x: np.ndarray) -> np.ndarray:
        """``A(x) - e_0``, shape (B, T)."""
        x_ext = self._extend(x, 1.0)
        design = np.take(x_ext, self.left, axis=1) * np.take(x_ext, self.right, axis=1)
        design[:, 0] = 0.0
        return design

    def jacobian(self, x: np.ndarray) -> np.ndarray:
        """``dA/dx``, shape (B, T, K)."""
        x_ext = self._extend(x, 1.0)
        jac = np.zeros((x.shape[0], self.n_terms * self.n_labels))
        jac[:, self.jac_flat] = np.take(x_ext, self.jac_source, axis=1) * self.jac_factor
        return jac.reshape(x.shape[0], self.n_terms, self.n_labels)

    def curvature(self, weights: np.ndarray) -> np.ndarray:
        """``sum_t weights_t d2A_t/dx dx``, shape (B, K, K)."""
        return np.take(weights, self.curvature_term, axis=1) * self.curvature_factor

    def directional(self, x: np.ndarray, direction: np.ndarray) -> np.ndarray:
        """``J(x) d`` (derivative of A along d), shape (B, T)."""
        x_ext, d_ext = self._extend(x, 1.0), self._extend(direction, 0.0)
        return np.take(x_ext, self.left, axis=1) * np.take(d_ext, self.right, axis=1) + np.take(
            d_ext, self.left, axis=1
        ) * np.take(x_ext, self.right, axis=1)

    def second_order(self, step: np.ndarray) -> np.ndarray:
        """``A(x + d) - A(x) - J(x) d`` (independent of x): ``d_a d_b`` per term, shape (B, T)."""
        d_ext = self._extend(step, 0.0)
        return np.take(d_ext, self.left, axis=1) * np.take(d_ext, self.right, axis=1)

    def difference(self, x: np.ndarray, step: np.ndarray) -> np.ndarray:
        """Exact ``A(x + step) - A(x)``, free of cancellation for small steps."""
        x_ext, d_ext = self._extend(x, 1.0), self._extend(step, 0.0)
        x_left, x_right = np.take(x_ext, self.left, axis=1), np.take(x_ext, self.right, axis=1)
        d_left, d_right = np.take(d_ext, self.left, axis=1), np.take(d_ext, self.right, axis=1)
        return x_left * d_right + d_left * x_right + d_left * d_right


def _trust_region_newton(
    statistics: SufficientStatistics,
    x0: np.ndarray,
    n_starts: int,
    max_iterations: int,
    decrement_tolerance: float,
    step_tolerance: float,
    singular_rtol: float,
    prune: bool = True,
    run: np.ndarray | None = None,
    pruned: np.ndarray | None = None,
    target: np.ndarray | None = None,
) -> _FitResult:
    """Batched trust-region Newton on chi2/2 for B = N*M points (see the module docstring).

    Each iteration, for every active point: exact gradient and Hessian; the model Hessian
    (exact, or Gauss-Newton where the exact one is indefinite away from a saddle) gives
    the trust-region step ``p``, solution of ``(B + sigma I) p = -g`` with
    ``|p| <= radius`` (Moré-Sorensen); the trial point ``x + p + a/2`` adds the geodesic
    acceleration ``a`` (second-order correction for the curvature of the valley), then
    ``_N_CORRECTIONS`` frozen-Hessian Newton steps along the stiffest eigen-direction put
    it back on the valley floor. The exact chi2 change decides acceptance and the radius.

    Positive definite models (almost all) are handled with Cholesky factorizations
    written out over the K x K entries, each a vector over the points (much cheaper than
    a batched LAPACK call per 4x4 matrix); indefinite or singular ones with ``eigh``.
    """
    n_points, n_labels = x0.shape
    n_all_stars = statistics.linear.shape[0]
    star = np.repeat(np.arange(n_all_stars), n_starts)
    ops = _design_operators(n_labels)
    x = np.array(x0, dtype=np.float64)  # a copy
    run = np.ones(n_points, dtype=bool) if run is None else np.asarray(run, dtype=bool)
    pruned = np.zeros(n_points, dtype=bool) if pruned is None else np.array(pruned, dtype=bool)
    # Points that run or take part in the pruning; the others are left alone (chi2 NaN).
    needed = np.flatnonzero(run | ~pruned)
    design = np.full((n_points, statistics.linear.shape[1]), np.nan)
    resid_vec = np.full_like(design, np.nan)
    with np.errstate(invalid="ignore", over="ignore"):
        design[needed] = ops.centred_design(x[needed])
        resid_vec[needed] = _residual_vector(
            statistics.quadratic[star[needed]], statistics.linear[star[needed]], design[needed]
        )
    radius = np.full(n_points, _RADIUS_INITIAL)
    converged = np.zeros(n_points, dtype=bool)
    n_iter = np.zeros(n_points, dtype=np.int64)
    active = run & np.all(np.isfinite(x), axis=1) & np.all(np.isfinite(resid_vec), axis=1)
    prune = prune and n_starts > 1
    if prune:
        with np.errstate(invalid="ignore", over="ignore"):
            chi2_now = statistics.constant[star] + np.sum(design * (resid_vec - statistics.linear[star]), axis=1)
    while active.any():
        ib = np.flatnonzero(active)
        stars_b = star[ib]
        if stars_b.size == n_all_stars and stars_b[0] == 0 and stars_b[-1] == n_all_stars - 1:
            quadratic, linear = statistics.quadratic, statistics.linear  # one point per star, in order
        else:
            quadratic, linear = np.take(statistics.quadratic, stars_b, axis=0), np.take(statistics.linear, stars_b, axis=0)
        xa, resid_a = x[ib], resid_vec[ib]
        jac = ops.jacobian(xa)  # (b, T, K)
        q_jac = quadratic @ jac
        gauss_newton = np.swapaxes(jac, 1, 2) @ q_jac
        grad = (resid_a[:, None, :] @ jac)[:, 0]
        exact = gauss_newton + ops.curvature(resid_a)
        # Matrices as (K, K, b) and vectors as (K, b): every entry a contiguous vector.
        exact_t = _symmetric_entries(exact)
        grad_t = np.ascontiguousarray(grad.T)
        factor, posdef = _cholesky(exact_t, singular_rtol)
        with np.errstate(invalid="ignore", over="ignore"):
            decrement = np.where(posdef, np.sum(_forward_substitution(factor, grad_t) ** 2, axis=0), np.inf)
        no_information = np.all(grad == 0.0, axis=1)  # and a zero Hessian: e.g. no data
        if no_information.any():
            no_information &= np.all(exact == 0.0, axis=(1, 2))
        done = (decrement < decrement_tolerance) | no_information
        broken = ~np.all(np.isfinite(exact_t), axis=(0, 1)) | ~np.all(np.isfinite(grad_t), axis=0)
        if prune:
            drop = _starts_to_prune(ib, n_starts, x, chi2_now, ~pruned, exact, decrement, posdef & ~done & ~broken)
            if target is not None:
                # An iterate from which chi2 descends monotonically to its star's best
                # minimum found so far has entered that basin (the test of phase 2).
                goal = target[stars_b]
                check = ~drop & ~done & np.all(np.isfinite(goal), axis=1)
                if check.any():
                    sel = np.flatnonzero(check)
                    drop[sel] = _descends_to_points(
                        np.take(quadratic, sel, axis=0), np.take(linear, sel, axis=0), xa[sel], goal[sel]
                    )
            if drop.any():
                pruned[ib[drop]] = True
                active[ib[drop]] = False
                keep = ~drop
                ib, quadratic, linear, xa, resid_a = ib[keep], quadratic[keep], linear[keep], xa[keep], resid_a[keep]
                q_jac, gauss_newton, grad, exact = q_jac[keep], gauss_newton[keep], grad[keep], exact[keep]
                # np.compress keeps C order (see _DesignOperators: star-independent sums).
                exact_t, factor = np.compress(keep, exact_t, axis=2), np.compress(keep, factor, axis=2)
                grad_t = np.compress(keep, grad_t, axis=1)
                posdef, decrement, done, broken = posdef[keep], decrement[keep], done[keep], broken[keep]
                if ib.size == 0:
                    continue

        # Model Hessian: the exact one where positive definite; elsewhere Gauss-Newton, unless
        # it says the point is already (nearly) stationary: then a saddle is left along the
        # exact Hessian's negative curvature (eigendecomposition path).
        model_t = exact_t.copy()
        newton_model = posdef.copy()
        by_cholesky = posdef.copy()
        other = np.flatnonzero(~posdef & ~broken)
        if other.size:
            gn_t = _symmetric_entries(gauss_newton[other])
            gn_factor, gn_posdef = _cholesky(gn_t, singular_rtol)
            with np.errstate(invalid="ignore", over="ignore"):
                gn_decrement = np.sum(_forward_substitution(gn_factor, grad_t[:, other]) ** 2, axis=0)
            near_saddle = gn_posdef & (gn_decrement < _SADDLE_DECREMENT)
            model_t[:, :, other[~near_saddle]] = gn_t[:, :, ~near_saddle]
            factor[:, :, other[gn_posdef & ~near_saddle]] = gn_factor[:, :, gn_posdef & ~near_saddle]
            by_cholesky[other[gn_posdef & ~near_saddle]] = True

        step_t = np.zeros((n_labels, ib.size))
        accel_t = np.zeros((n_labels, ib.size))
        shift = np.zeros(ib.size)
        top_vec = np.zeros((n_labels, ib.size))
        top_val = np.zeros(ib.size)
        chol = np.flatnonzero(by_cholesky & ~broken)
        eig_path = np.flatnonzero(~by_cholesky & ~broken)
        if chol.size == ib.size:  # (almost always) no copies
            step_t, shift, chol_factor = _trust_region_step_cholesky(model_t, factor, grad_t, radius[ib], singular_rtol)
            top_vec, top_val = _top_eigenpair(model_t)
        elif chol.size:
            # np.take keeps C order (fancy indexing on the last axis does not, and the
            # entry-by-entry operations on such arrays are 2x slower).
            model_c = np.take(model_t, chol, axis=-1)
            step_t[:, chol], shift[chol], chol_factor = _trust_region_step_cholesky(
                model_c, np.take(factor, chol, axis=-1), np.take(grad_t, chol, axis=-1), radius[ib[chol]],
                singular_rtol,
            )
            top_vec[:, chol], top_val[chol] = _top_eigenpair(model_c)
        if eig_path.size:
            eig, vec = _safe_eigh(np.moveaxis(model_t[:, :, eig_path], -1, 0))
            grad_eig = (grad[eig_path, None, :] @ vec)[:, 0]
            step_eig, shift[eig_path] = _trust_region_step(eig, grad_eig, radius[ib[eig_path]], singular_rtol)
            step_t[:, eig_path] = (vec @ step_eig[:, :, None])[:, :, 0].T
            top_vec[:, eig_path], top_val[eig_path] = vec[:, :, -1].T, eig[:, -1]
        with np.errstate(invalid="ignore", over="ignore"):
            predicted = 2.0 * np.sum(grad_t * step_t + 0.5 * step_t * _matvec(model_t, step_t), axis=0)  # chi2
            step = np.ascontiguousarray(step_t.T)
            # Geodesic acceleration: the model's second-order term along the step, projected out.
            curvature_grad = np.ascontiguousarray(((2.0 * ops.second_order(step))[:, None, :] @ q_jac)[:, 0].T)
            if chol.size == ib.size:
                accel_t = -_cholesky_solve(chol_factor, curvature_grad)
            elif chol.size:
                accel_t[:, chol] = -_cholesky_solve(chol_factor, np.take(curvature_grad, chol, axis=-1))
            if eig_path.size:
                shifted = eig + shift[eig_path, None]
                inverse = np.where(shifted > 0, 1.0 / np.where(shifted > 0, shifted, 1.0), 0.0)
                rhs_eig = (curvature_grad[:, eig_path].T[:, None, :] @ vec)[:, 0] * inverse
                accel_t[:, eig_path] = -(vec @ rhs_eig[:, :, None])[:, :, 0].T
            # Second-order terms larger than the step itself are meaningless (e.g. along a
            # direction the shift has made singular, in the hard case): dropped.
            step_norm = np.sqrt(np.sum(step_t**2, axis=0))
            accel_t *= np.sqrt(np.sum(accel_t**2, axis=0)) <= 2.0 * step_norm
            x_trial = xa + step + 0.5 * accel_t.T
            # Corrector: back to the valley floor along the stiffest direction (frozen Hessian).
            top_shifted = top_val + shift
            top_inverse = np.where(top_shifted > 0, 1.0 / np.where(top_shifted > 0, top_shifted, 1.0), 0.0)
            top = np.ascontiguousarray(top_vec.T)
            for _ in range(_N_CORRECTIONS):
                resid_trial = _residual_vector(quadratic, linear, ops.centred_design(x_trial))
                along = np.sum(resid_trial * ops.directional(x_trial, top), axis=1) * top_inverse  # g.u / lambda
                along *= np.abs(along) <= step_norm
                x_trial = x_trial - along[:, None] * top
            design_trial = ops.centred_design(x_trial)
            resid_trial = _residual_vector(quadratic, linear, design_trial)
            total_step = x_trial - xa
            delta_chi2 = np.sum(ops.difference(xa, total_step) * (resid_trial + resid_a), axis=1)
        finite = (
            ~broken
            & np.isfinite(delta_chi2)
            & np.all(np.isfinite(x_trial), axis=1)
            & np.all(np.isfinite(resid_trial), axis=1)
        )
        # Converged points still take their last (Newton) step when it does not raise chi2:
        # the result is then the optimum to ~decrement^2, not to ~decrement^(1/2).
        accept = finite & np.where(done, posdef & (delta_chi2 <= 0), delta_chi2 < 0)
        # A full (undamped) Newton step on the exact Hessian below step_tolerance: converged.
        small_step = (
            ~done & finite & newton_model & (shift == 0.0) & (np.max(np.abs(total_step), axis=1) < step_tolerance)
        )
        accept |= small_step & (delta_chi2 <= 0)

        # Trust-region radius from the agreement of actual and predicted decrease.
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(predicted < 0, delta_chi2 / predicted, 0.0)
        old = radius[ib]
        radius[ib] = np.where(
            ~accept | (ratio < 0.25),
            0.25 * np.minimum(old, step_norm),
            np.where((ratio > 0.75) & (step_norm > 0.9 * old), np.minimum(2.0 * old, _RADIUS_MAX), old),
        )
        acc = ib[accept]
        x[acc], resid_vec[acc], design[acc] = x_trial[accept], resid_trial[accept], design_trial[accept]
        if prune:
            chi2_now[acc] = statistics.constant[star[acc]] + np.sum(
                design[acc] * (resid_vec[acc] - statistics.linear[star[acc]]), axis=1
            )
        n_iter[ib] += 1
        finished = done | small_step
        converged[ib[finished]] = True
        stalled = broken | (radius[ib] < _RADIUS_MIN)
        active[ib[finished | stalled | (n_iter[ib] >= max_iterations)]] = False
    chi2 = np.full(n_points, np.nan)
    chi2[needed] = statistics.constant[star[needed]] + np.sum(
        design[needed] * (resid_vec[needed] - statistics.linear[star[needed]]), axis=1
    )
    return _FitResult(x, chi2, converged, n_iter, pruned)


def _starts_to_prune(ib, n_starts, x, chi2_now, alive, exact, decrement, eligible) -> np.ndarray:
    """Which active points ``ib`` cannot win their star and can stop (bool over ib).

    A point is examined when ``eligible`` (positive definite exact Hessian, not yet
    converged) and its decrement is below ``_PRUNE_DECREMENT``. It is dropped if another
    live point of the same star, with a lower chi2 (ties: the earlier start), lies within
    ``_PRUNE_DISTANCE`` of it in the metric of its Hessian (both converge to the same
    minimum), or if another live point's chi2 is below ``chi2 - 2 decrement -
    _PRUNE_MARGIN`` (its local minimum is worse than what the star already has). The
    point with the lowest chi2 of a star is never dropped; every decision uses only the
    points of the same star.
    """
    drop = np.zeros(ib.size, dtype=bool)
    cand = np.flatnonzero(eligible & (decrement < _PRUNE_DECREMENT))
    if cand.size == 0:
        return drop
    j = ib[cand]
    others = (j // n_starts * n_starts)[:, None] + np.arange(n_starts)  # (c, M): the star's points
    delta = x[others] - x[j][:, None, :]
    with np.errstate(invalid="ignore", over="ignore"):
        distance = 2.0 * np.sum((delta @ exact[cand]) * delta, axis=-1)  # chi2 units
        chi2_j, chi2_o = chi2_now[j][:, None], chi2_now[others]
        valid = alive[others] & (others != j[:, None]) & np.isfinite(chi2_o)
        lower = valid & ((chi2_o < chi2_j) | ((chi2_o == chi2_j) & (others < j[:, None])))
        duplicate = np.any(lower & (distance < _PRUNE_DISTANCE), axis=1)
        hopeless = np.any(valid & (chi2_o < chi2_j - 2.0 * decrement[cand][:, None] - _PRUNE_MARGIN), axis=1)
    drop[cand] = duplicate | hopeless
    return drop


def _symmetric_entries(matrices: np.ndarray) -> np.ndarray:
    """Symmetrized (B, K, K) matrices as a C-contiguous (K, K, B) array."""
    entries = np.ascontiguousarray(matrices.transpose(1, 2, 0))
    return 0.5 * (entries + entries.transpose(1, 0, 2))


def _matvec(matrices_t: np.ndarray, vectors_t: np.ndarray) -> np.ndarray:
    """``M v`` for (K, K, B) matrices and (K, B) vectors."""
    return np.einsum("klb,lb->kb", matrices_t, vectors_t)


def _cholesky(matrices_t: np.ndarray, singular_rtol: float) -> tuple[np.ndarray, np.ndarray]:
    """Lower Cholesky factors of symmetric (K, K, B) matrices, entry by entry.

    Every operation acts on a contiguous vector over the B points: for K = 4 this is
    ~20 times faster than a batched LAPACK call per matrix.

    Returns the factors (K, K, B) and ``ok`` (B,): every pivot is finite and above
    ``singular_rtol`` times the largest diagonal entry (positive definite, numerically).
    Where not ok, the factor is finite but meaningless.
    """
    n_labels = matrices_t.shape[0]
    factor = np.zeros_like(matrices_t)
    threshold = np.abs(matrices_t[0, 0])
    for k in range(1, n_labels):
        threshold = np.maximum(threshold, np.abs(matrices_t[k, k]))
    threshold *= singular_rtol
    ok = np.ones(matrices_t.shape[-1], dtype=bool)
    with np.errstate(invalid="ignore", over="ignore"):
        for j in range(n_labels):
            pivot = matrices_t[j, j].copy()
            for k in range(j):
                pivot -= factor[j, k] * factor[j, k]
            ok &= pivot > threshold  # False for NaN
            inverse_root = 1.0 / np.sqrt(np.where(ok, pivot, 1.0))
            factor[j, j] = 1.0 / inverse_root
            for i in range(j + 1, n_labels):
                entry = matrices_t[i, j].copy()
                for k in range(j):
                    entry -= factor[i, k] * factor[j, k]
                factor[i, j] = entry * inverse_root
    return factor, ok


def _forward_substitution(factor: np.ndarray, rhs_t: np.ndarray) -> np.ndarray:
    """Solve ``L y = rhs`` for lower-triangular (K, K, B) factors and (K, B) right-hand sides."""
    out = np.empty_like(rhs_t)
    for i in range(factor.shape[0]):
        entry = rhs_t[i].copy()
        for k in range(i):
            entry -= factor[i, k] * out[k]
        out[i] = entry / factor[i, i]
    return out


def _cholesky_solve(factor: np.ndarray, rhs_t: np.ndarray) -> np.ndarray:
    """Solve ``L L^T x = rhs`` for (K, B) right-hand sides."""
    y = _forward_substitution(factor, rhs_t)
    out = np.empty_like(y)
    n_labels = factor.shape[0]
    for i in range(n_labels - 1, -1, -1):
        entry = y[i]
        for k in range(i + 1, n_labels):
            entry -= factor[k, i] * out[k]
        out[i] = entry / factor[i, i]
    return out


def _trust_region_step_cholesky(
    model_t: np.ndarray, factor: np.ndarray, grad_t: np.ndarray, radius: np.ndarray, singular_rtol: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Trust-region step for positive definite (K, K, B) models (Moré-Sorensen iteration).

    Parameters
    ----------
    model_t : numpy.ndarray
        Model Hessians, (K, K, B), positive definite.
    factor : numpy.ndarray
        Their Cholesky factors, (K, K, B).
    grad_t : numpy.ndarray
        Gradients, (K, B).
    radius : numpy.ndarray
        Trust-region radii, (B,).
    singular_rtol : float
        Pivot threshold of the factorizations.

    Returns
    -------
    step_t : numpy.ndarray
        (K, B), ``-(model + shift I)^-1 g`` with ``|step| <= radius`` (within
        ``_BOUNDARY_RTOL``) or the Newton step inside the region (shift 0).
    shift : numpy.ndarray
        (B,), >= 0.
    factor : numpy.ndarray
        Cholesky factors of ``model + shift I``, (K, K, B).

    Notes
    -----
    Newton's method on ``1/|p(shift)| - 1/radius`` (concave, so the iterates from
    ``shift = 0``, where the step is too long, increase monotonically to the root):
    ``shift += (|p| / |q|)^2 (|p| - radius) / radius`` with ``L q = p``.
    """
    factor = factor.copy()
    step_t = -_cholesky_solve(factor, grad_t)
    shift = np.zeros(radius.shape)
    norm = np.sqrt(np.sum(step_t**2, axis=0))
    todo = np.flatnonzero(norm > radius)
    diagonal = np.arange(model_t.shape[0])
    for _ in range(50):
        if todo.size == 0:
            break
        p, r = np.take(step_t, todo, axis=-1), radius[todo]
        q = _forward_substitution(np.take(factor, todo, axis=-1), p)
        norm_p = np.sqrt(np.sum(p**2, axis=0))
        norm_q2 = np.sum(q**2, axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            new_shift = np.maximum(shift[todo] + norm_p**2 / norm_q2 * (norm_p - r) / r, 0.0)
        shifted = np.take(model_t, todo, axis=-1)
        shifted[diagonal, diagonal] += new_shift
        new_factor, ok = _cholesky(shifted, singular_rtol)  # shift >= 0 on a positive definite model
        keep = ok & np.isfinite(new_shift)
        if not keep.all():  # numerically singular after all: the step cut back to the boundary
            lost = todo[~keep]
            step_t[:, lost] *= radius[lost] / np.sqrt(np.sum(step_t[:, lost] ** 2, axis=0))
        sub = todo[keep]
        shift[sub] = new_shift[keep]
        kept_factor = np.compress(keep, new_factor, axis=-1)
        factor[:, :, sub] = kept_factor
        step_t[:, sub] = -_cholesky_solve(kept_factor, np.take(grad_t, sub, axis=-1))
        norm_sub = np.sqrt(np.sum(step_t[:, sub] ** 2, axis=0))
        todo = sub[np.abs(norm_sub - radius[sub]) > _BOUNDARY_RTOL * radius[sub]]
    return step_t, shift, factor


def _top_eigenpair(matrices_t: np.ndarray, n_power: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Largest eigenvalue and its unit eigenvector of positive definite (K, K, B) matrices.

    Power iteration from the column with the largest diagonal entry: the stiff direction
    of these problems is separated from the others by orders of magnitude, so a few
    iterations suffice (otherwise the vector lies in the span of the top eigenvectors,
    still a valid corrector direction).
    """
    n_labels, _, n_points = matrices_t.shape
    diagonal = np.array([matrices_t[k, k] for k in range(n_labels)])
    vector = matrices_t[:, np.argmax(diagonal, axis=0), np.arange(n_points)]  # (K, B): the column
    for _ in range(n_power):
        vector = vector / np.sqrt(np.sum(vector**2, axis=0))
        vector = _matvec(matrices_t, vector)
    vector = vector / np.sqrt(np.sum(vector**2, axis=0))
    return vector, np.sum(vector * _matvec(matrices_t, vector), axis=0)


def _trust_region_step(
    eig: np.ndarray, grad_eig: np.ndarray, radius: np.ndarray, singular_rtol: float
) -> tuple[np.ndarray, np.ndarray]:
    """Minimise ``g.p + p.B.p / 2`` subject to ``|p| <= radius``, B diagonal (eigenbasis).

    Parameters
    ----------
    eig : numpy.ndarray
        Eigenvalues of B, ascending, shape (B, K).
    grad_eig : numpy.ndarray
        Gradient in the eigenbasis, shape (B, K).
    radius : numpy.ndarray
        Shape (B,), > 0.
    singular_rtol : float
        Eigenvalues at most ``singular_rtol`` times the largest count as non-positive.

    Returns
    -------
    step : numpy.ndarray
        In the eigenbasis, shape (B, K).
    shift : numpy.ndarray
        ``sigma >= max(0, -eig_min)``, shape (B,): 0 for an interior Newton step.

    Notes
    -----
    The boundary solution ``p = -g / (eig + sigma)`` uses Newton's method on
    ``1/|p(sigma)| - 1/radius`` (concave: the iterates increase monotonically to the root)
    from the lower bound ``max_i (|g_i| / radius - eig_i)``. In the "hard case" (g has
    no component along a non-positive eigen-direction) the step is completed along it.
    """
    top = np.maximum(np.abs(eig[:, -1]), np.finfo(np.float64).tiny)
    floor = singular_rtol * top
    posdef = eig[:, 0] > floor
    sq = grad_eig**2
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        newton = np.where(posdef[:, None], -grad_eig / np.where(posdef[:, None], eig, 1.0), np.inf)
        inside = posdef & (np.linalg.norm(newton, axis=1) <= radius)
    step = np.where(inside[:, None], newton, 0.0)
    shift = np.zeros(eig.shape[0])
    todo = np.flatnonzero(~inside)
    if todo.size == 0:
        return step, shift
    w, c, g, r = eig[todo], sq[todo], grad_eig[todo], radius[todo]
    lower = np.maximum(0.0, -w[:, 0]) + floor[todo]
    s = np.maximum(lower, np.max(np.abs(g) / r[:, None] - w, axis=1))

    def norm_and_slope(s):
        d = w + s[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            norm = np.sqrt(np.sum(np.where(c > 0, c / d**2, 0.0), axis=1))
            slope = np.sum(np.where(c > 0, c / d**3, 0.0), axis=1) / norm**3
        return norm, slope

    norm, slope = norm_and_slope(s)
    hard = norm < r * (1.0 - _BOUNDARY_RTOL)  # the step fits even at the lower bound
    for _ in range(50):
        pending = ~hard & (np.abs(norm - r) > _BOUNDARY_RTOL * r) & (slope > 0) & np.isfinite(slope)
        if not pending.any():
            break
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.where(pending, s - (1.0 / norm - 1.0 / r) / slope, s)
        norm, slope = norm_and_slope(s)
    d = w + s[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(c > 0, -g / d, 0.0)
    # Hard case: complete the step to the boundary along the lowest eigen-direction,
    # downhill (or either way when g = 0 there).
    extra = np.where(hard, np.sqrt(np.maximum(r**2 - np.sum(p**2, axis=1), 0.0)), 0.0)
    p[:, 0] += np.where(g[:, 0] > 0, -extra, extra)
    step[todo] = p
    shift[todo] = s
    return step, shift


def _residual_vector(quadratic: np.ndarray, linear: np.ndarray, design: np.ndarray) -> np.ndarray:
    """``Q A' - b`` (d chi2/2 / d A'), shape (B, T)."""
    return (quadratic @ design[:, :, None])[:, :, 0] - linear


def _centred_design(x: np.ndarray) -> np.ndarray:
    """Design vector minus its value at the pivot (the constant term set to 0)."""
    design = design_matrix(x)
    design[..., 0] = 0.0
    return design


def _hessians(statistics, x, exact: bool) -> np.ndarray:
    """Hessian of chi2/2 w.r.t. scaled labels of one point per star (N, K):
    J^T Q J (+ sum_t v_t d2A_t if exact, v = Q A' - b)."""
    ops = _design_operators(x.shape[-1])
    jac = ops.jacobian(x)
    hess = np.swapaxes(jac, 1, 2) @ (statistics.quadratic @ jac)
    if exact:
        resid_vec = _residual_vector(statistics.quadratic, statistics.linear, ops.centred_design(x))
        hess = hess + ops.curvature(resid_vec)
    return 0.5 * (hess + np.swapaxes(hess, -1, -2))


def _safe_eigh(matrices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Batched eigh; non-finite matrices give NaN eigenvalues instead of an exception."""
    finite = np.all(np.isfinite(matrices), axis=(-2, -1))
    safe = np.where(finite[:, None, None], matrices, np.eye(matrices.shape[-1]))
    eigenvalues, eigenvectors = np.linalg.eigh(safe)
    eigenvalues[~finite] = np.nan
    return eigenvalues, eigenvectors
