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

Since every ``A'_t A'_u`` is a monomial of degree 2-4 in ``x``, chi2 is a polynomial of
degree 4 in the K labels, ``chi2_n(x) = sum_m C_nm x^(e_m)`` over the 70 monomials of
degree <= 4 (K = 4; :mod:`lamost_mdwarf.kernels.cannon_quartic`). :func:`infer_labels`
computes these coefficients directly in its pass over the pixels, ``w @ G`` with 65
per-model columns ``G`` (sums of ``theta_t theta_u`` of the same monomial) plus
``(w r0) @ theta`` (14 columns): 79 columns in the matrix products instead of the 119
that ``Q`` and ``b`` take (about 2/3 of the time of the pixel pass is these products).
:func:`optimize_labels` converts given statistics to the same coefficients. ``Q``
itself is not a function of chi2 (several entries multiply the same monomial); it is
computed, for the few stars that need it, only for the Gauss-Newton model Hessian
below and for the Gauss-Newton covariance.

After that every step is a K-dimensional problem for all stars and all starting points
at once (per-iteration cost independent of the number of pixels); the gradient and
Hessian of ``chi2 / 2`` are small per-star coefficient tensors applied to the monomials
of degree <= 3 and <= 2 of ``x``:

* Trust-region Newton on ``chi2 / 2`` in scaled labels. The model Hessian is the exact
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
  third-order (Chebyshev) correction ``a = -(B + sigma I)^-1 T[p, p]``, ``T`` the exact
  third derivative of ``chi2 / 2`` (``T[p, p] = (d/dt H(x + t p)) p``; it replaces the
  geodesic acceleration of Transtrum & Sethna 2012, which needs ``Q``, and converges in
  fewer iterations near a minimum), followed by one frozen-Hessian Newton correction
  along the stiffest eigen-direction (back onto the valley floor). The chi2 change is
  exact: ``d chi2 / dt`` along the step is a cubic, fixed by the gradients and Hessians
  at both ends.
* Converged when the Newton decrement ``g^T H^-1 g`` (the chi2 decrease a full Newton
  step would still bring; also the squared Mahalanobis distance to the optimum in units
  of the formal errors) is below ``decrement_tolerance`` (computed from the gradient, not
  from chi2 differences: reachable in float64), or when a full Newton step is below
  ``step_tolerance`` in every scaled label; the last Newton step is then still taken if
  it does not raise chi2. A start that reaches ``max_iterations`` or whose trust region
  collapses is not converged.
* Positive definite 4x4 models are factorized with Cholesky decompositions written out
  column by column, each entry a vector over all points of the chunk (no per-matrix
  LAPACK call); only indefinite or singular ones use ``eigh``. Given the same
  statistics, a star's fit is bit-for-bit independent of the other stars of its chunk.
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
import threading
from typing import Literal, NamedTuple

import numpy as np

from lamost_mdwarf.kernels.cannon_design import (
    design_jacobian,
    design_matrix,
    n_labels_from_terms,
    n_quadratic_terms,
    scale_labels,
    unscale_labels,
)
from lamost_mdwarf.kernels.cannon_quartic import (
    MonomialBasis,
    chi2_quartic,
    coefficients_from_statistics,
    derivative_tensors,
    extended_rows,
    monomial_basis,
    monomial_values,
    pixel_columns,
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


#: Stars per block of the pixel sums (fixed, see :func:`sufficient_statistics`; 16-128 are
#: within ~15% of each other in time at P = 3000).
_STATISTICS_BLOCK = 48

#: Per-model constants of the last model seen, per kind of sums: kind -> (theta copy,
#: s2 copy, constants).
_MODEL_CACHE: dict = {}


_SCRATCH = threading.local()


def _scratch(name: str, shape: tuple, dtype=np.float64) -> np.ndarray:
    """An uninitialised per-thread work array, reused from call to call.

    For the large temporaries of one kernel call (block buffers of the pixel sums, the
    quartic's coefficient tensors; never returned to the caller). Fresh memory costs a
    page fault per 4 KiB on first touch -- about 2 us on the virtual machines measured,
    i.e. more than writing the page -- and numpy's arrays above glibc's mmap threshold
    get fresh pages on every call, so reusing them saves ~3 us per star in the test
    step. Each name is used by one function at a time.
    """
    pool = getattr(_SCRATCH, "pool", None)
    if pool is None:
        pool = _SCRATCH.pool = {}
    dtype = np.dtype(dtype)
    size = int(np.prod(shape))
    buffer = pool.get(name)
    if buffer is None or buffer.dtype != dtype or buffer.size < size:
        buffer = np.empty(max(size, 1), dtype=dtype)
        pool[name] = buffer
    return buffer[:size].reshape(shape)


class _ModelColumns(NamedTuple):
    """Per-model constants of the pixel sums (see :func:`_pixel_sums`)."""

    model_ok: np.ndarray  # (P,) bool: finite theta and s2 >= 0
    s2: np.ndarray  # (P,) with 0 where not model_ok
    theta0: np.ndarray  # (P,) pivot model, 0 where not model_ok
    s2_rows: np.ndarray  # (_STATISTICS_BLOCK, P): s2 repeated (see _pixel_sums)
    theta0_rows: np.ndarray  # (_STATISTICS_BLOCK, P): theta0 repeated
    weight_columns: np.ndarray  # (P, 8 k): summed with the weights w (matrix product)
    weight_rows: np.ndarray  # (j, P), j <= 2: further columns, one matrix-vector product each
    residual_columns: np.ndarray  # (P, 8 k'): summed with w r (zero columns at the end)
    n_weighted: int  # columns of the weighted sums (the rest of weight_columns is zero)
    n_residual: int  # columns of the residual sums
    extra: tuple  # what the caller needs to assemble its result


def _model_columns(theta: np.ndarray, s2: np.ndarray, kind: str) -> _ModelColumns:
    """Per-model constants of one kind of sums, cached for the last model seen.

    ``kind`` is ``"full"`` or ``"reduced"`` (``Q`` with or without row/column 0: the
    products ``theta_t theta_u`` of the upper triangle, zero columns up to a multiple of
    8, and the map to the full (T, T)), or ``"quartic"`` (the columns of
    :func:`lamost_mdwarf.kernels.cannon_quartic.pixel_columns`).
    """
    cached = _MODEL_CACHE.get(kind)
    if (
        cached is not None
        and cached[2].s2_rows.shape[0] == _STATISTICS_BLOCK
        and cached[0].shape == theta.shape
        and np.array_equal(cached[0], theta, equal_nan=True)
        and np.array_equal(cached[1], s2, equal_nan=True)
    ):
        return cached[2]
    n_terms = theta.shape[1]
    model_ok = np.all(np.isfinite(theta), axis=1) & np.isfinite(s2) & (s2 >= 0)  # (P,)
    theta_safe = np.where(model_ok[:, None], theta, 0.0)
    s2_safe = np.where(model_ok, s2, 0.0)
    theta0 = np.ascontiguousarray(theta_safe[:, 0])
    if kind == "quartic":
        basis = monomial_basis(n_labels_from_terms(n_terms))
        weight_columns, residual_columns = pixel_columns(theta_safe, basis)
        extra = (basis,)
    else:
        first = 0 if kind == "full" else 1
        rows, cols = np.triu_indices(n_terms - first)
        rows, cols = rows + first, cols + first
        # (P, n_columns): the products, then zero columns up to a multiple of 8 (at least
        # one without the pivot terms: the zero entries of Q point to it).
        n_columns = 8 * -(-(rows.size + first) // 8)
        weight_columns = np.zeros((theta.shape[0], n_columns))
        weight_columns[:, : rows.size] = theta_safe[:, rows] * theta_safe[:, cols]
        # Where each (t, u) entry of Q comes from (a zero column for row/column 0 when the
        # pivot terms are left out).
        index = np.full((n_terms, n_terms), rows.size, dtype=np.intp)
        index[rows, cols] = np.arange(rows.size)
        index[cols, rows] = np.arange(rows.size)
        residual_columns = np.ascontiguousarray(theta_safe[:, first:])
        extra = (index.ravel(), first)
    # Matrix products with a multiple of 8 columns only: with several BLAS threads,
    # OpenBLAS splits other widths so that a star's round-off depends on its row in the
    # block (measured: 49-127 columns not a multiple of 8, with 2 threads). The last 1-2
    # columns of 8k + 1 or 8k + 2 go to matrix-vector products (row by row, cheaper
    # than 6-7 zero columns); other widths are padded with zero columns.
    n_weighted, n_residual = weight_columns.shape[1], residual_columns.shape[1]
    n_main = 8 * (n_weighted // 8)
    if n_weighted - n_main <= 2:
        weight_rows = np.ascontiguousarray(weight_columns[:, n_main:].T)
        weight_columns = np.ascontiguousarray(weight_columns[:, :n_main])
    else:
        weight_rows = np.zeros((0, theta.shape[0]))
        weight_columns = _pad_columns(weight_columns)
    residual_columns = _pad_columns(residual_columns)
    rows = (_STATISTICS_BLOCK, theta.shape[0])
    s2_rows = np.ascontiguousarray(np.broadcast_to(s2_safe, rows))
    theta0_rows = np.ascontiguousarray(np.broadcast_to(theta0, rows))
    constants = _ModelColumns(
        model_ok, s2_safe, theta0, s2_rows, theta0_rows, weight_columns, weight_rows, residual_columns,
        n_weighted, n_residual, extra,
    )
    _MODEL_CACHE[kind] = (theta.copy(), s2.copy(), constants)
    return constants


def _pad_columns(columns: np.ndarray) -> np.ndarray:
    """(P, n) columns followed by zero columns up to a multiple of 8 (C order)."""
    padded = np.zeros((columns.shape[0], 8 * -(-columns.shape[1] // 8)))
    padded[:, : columns.shape[1]] = columns
    return padded


def _as_float(values) -> np.ndarray:
    """``values`` as a float32 or float64 array (other types converted to float64)."""
    values = np.asarray(values)
    return values if values.dtype in (np.float32, np.float64) else values.astype(np.float64)


def _check_inputs(flux, ivar, theta, s2):
    """Arrays of the pixel sums, with their shapes checked (ValueError otherwise)."""
    # float32 spectra (as stored) are converted block by block, inside the elementwise
    # operations (exactly: float32 -> float64 is exact), not copied whole.
    flux = _as_float(flux)
    ivar = _as_float(ivar)
    theta = np.asarray(theta, dtype=np.float64)
    s2 = np.asarray(s2, dtype=np.float64)
    if flux.ndim != 2 or ivar.shape != flux.shape:
        raise ValueError(f"flux and ivar must have the same shape (N, P), got {flux.shape} and {ivar.shape}")
    n_pixels = flux.shape[1]
    if theta.ndim != 2 or theta.shape[0] != n_pixels or s2.shape != (n_pixels,):
        raise ValueError(
            f"theta must have shape (P={n_pixels}, T) and s2 shape (P,), got {theta.shape} and {s2.shape}"
        )
    return flux, ivar, theta, s2


def _pixel_sums(flux, ivar, model: _ModelColumns, masked_ivar_threshold: float, weighted=None, residual=None):
    """One pass over the pixels: ``w @ weight_columns``, ``(w r) @ residual_columns``,
    ``c = sum w r^2``, the good-pixel counts and the bad-input flags of every star.

    ``w = ivar / (1 + ivar s2)`` and ``r = f - theta_0`` (the residual from the pivot
    model); pixels with unusable data or model get ``w = r = 0``. Stars are processed in
    blocks of ``_STATISTICS_BLOCK`` rows: the elementwise work reuses preallocated block
    buffers (in cache rather than main memory), and the products are matrix products of
    fixed shapes per block (zero rows appended to the last block): OpenBLAS' choice of
    kernels by shape could otherwise make a star's round-off depend on its row in the
    chunk; with fixed shapes a star's sums are bit-for-bit those it gets in any other
    chunk. A block whose data are all finite with ``ivar >= 0`` (checked from ``c`` and
    ``min(ivar)``) takes that fast path; any other block is computed with explicit masks
    (same results). ``weighted`` and ``residual``: arrays to write the products into
    (new ones if None).
    """
    n_stars, n_pixels = flux.shape
    model_ok, s2_safe, theta0 = model.model_ok, model.s2, model.theta0
    all_model_ok = bool(model_ok.all())
    threshold = float(masked_ivar_threshold)
    if weighted is None:
        weighted = np.empty((n_stars, model.n_weighted))
    if residual is None:
        residual = np.empty((n_stars, model.n_residual))
    n_main = min(model.weight_columns.shape[1], model.n_weighted)
    n_rows = model.weight_rows.shape[0]
    constant = np.empty(n_stars)
    n_good = np.empty(n_stars, dtype=np.int64)
    bad_input = np.zeros(n_stars, dtype=bool)
    block = _STATISTICS_BLOCK
    weight = _scratch("weight", (block, n_pixels))
    resid0 = _scratch("resid0", (block, n_pixels))
    w_resid = _scratch("w_resid", (block, n_pixels))
    good = _scratch("good", (block, n_pixels), dtype=bool)
    weighted_block = _scratch("weighted_block", (block, model.weight_columns.shape[1]))
    weighted_rows = _scratch("weighted_rows", (n_rows, block))
    residual_block = _scratch("residual_block", (block, model.residual_columns.shape[1]))
    for start in range(0, n_stars, block):
        stop = min(start + block, n_stars)
        m = stop - start
        f, iv = flux[start:stop], ivar[start:stop]
        w, r, wr = weight[:m], resid0[:m], w_resid[:m]
        fast = all_model_ok and m > 0
        if fast:
            # (The per-pixel constants as whole blocks of rows: numpy buffers operands
            # broadcast along rows, ~1.7x slower.)
            with np.errstate(all="ignore"):
                np.multiply(iv, model.s2_rows[:m], out=w)
                w += 1.0
                np.divide(iv, w, out=w)
                np.subtract(f, model.theta0_rows[:m], out=r)
                np.multiply(w, r, out=wr)
                c = (wr[:, None, :] @ r[:, :, None])[:, 0, 0]  # row dot products (BLAS)
            # Finite c_n: every w r^2 term is finite, so every w and r is (inf * 0 = NaN);
            # with ivar >= 0 the masks of the general path would all be true.
            fast = bool(np.all(np.isfinite(c))) and bool(iv.min() >= 0)
        if fast:
            np.greater(iv, threshold, out=good[:m])
        else:
            data_ok = np.isfinite(f) & np.isfinite(iv) & (iv >= 0)
            bad_input[start:stop] = np.any(~data_ok & (iv != 0), axis=1)  # (NaN != 0 is True)
            usable = data_ok & model_ok[None, :]
            ivar_safe = np.where(usable, iv, 0.0)
            w[...] = ivar_safe / (1.0 + ivar_safe * s2_safe)
            r[...] = np.where(usable, f - theta0, 0.0)
            np.multiply(w, r, out=wr)
            c = np.sum(wr * r, axis=1)
            np.logical_and(usable, ivar_safe > threshold, out=good[:m])
        constant[start:stop] = c
        # Exact counts (a sum of bytes: much cheaper than counting booleans).
        n_good[start:stop] = np.add.reduce(good[:m].view(np.uint8), axis=1, dtype=np.uint32)
        if m < block:
            weight[m:] = 0.0
            w_resid[m:] = 0.0
        np.matmul(weight, model.weight_columns, out=weighted_block)
        np.matmul(w_resid, model.residual_columns, out=residual_block)
        weighted[start:stop, :n_main] = weighted_block[:m, :n_main]
        for j in range(n_rows):
            np.matmul(weight, model.weight_rows[j], out=weighted_rows[j])
            weighted[start:stop, n_main + j] = weighted_rows[j, :m]
        residual[start:stop] = residual_block[:m, : model.n_residual]
    return weighted, residual, constant, n_good, bad_input


def _statistics(flux, ivar, theta, s2, masked_ivar_threshold, pivot_terms: bool) -> SufficientStatistics:
    """:func:`sufficient_statistics`; without ``pivot_terms`` row and column 0 of ``Q`` and
    ``b_0`` (never used by the optimiser, since ``A'_0 = 0``) are left at 0."""
    flux, ivar, theta, s2 = _check_inputs(flux, ivar, theta, s2)
    n_stars, n_terms = flux.shape[0], theta.shape[1]
    model = _model_columns(theta, s2, "full" if pivot_terms else "reduced")
    index, first = model.extra
    weighted, residual, constant, n_good, bad_input = _pixel_sums(flux, ivar, model, masked_ivar_threshold)
    quadratic = np.take(weighted, index, axis=1).reshape(n_stars, n_terms, n_terms)
    linear = np.zeros((n_stars, n_terms))
    linear[:, first:] = residual
    return SufficientStatistics(quadratic, linear, constant, n_good, bad_input)


def _quartic_statistics(flux, ivar, theta, s2, masked_ivar_threshold) -> _QuarticStatistics:
    """The monomial coefficients of chi2 of every star, directly from the pixels.

    Same pixel pass as :func:`sufficient_statistics` with 65 + 14 columns (K = 4) in
    the matrix products instead of 105 (+7 zero) + 14, and no (N, T, T) assembly:
    ``C = [c, -2 b (degree 1-2), 0 ...] + [0 (degree 0-1), w @ G (degree 2-4)]`` (see
    :mod:`lamost_mdwarf.kernels.cannon_quartic`). The coefficients are returned in a
    per-thread work array: valid until the next call in the same thread.
    """
    flux, ivar, theta, s2 = _check_inputs(flux, ivar, theta, s2)
    model = _model_columns(theta, s2, "quartic")
    (basis,) = model.extra
    first, n_low = basis.counts[1], basis.counts[2]
    n_stars = flux.shape[0]
    coefficients = _scratch("coefficients", (n_stars, basis.counts[4]))
    residual = _scratch("residual", (n_stars, n_low - 1))
    _, _, constant, n_good, bad_input = _pixel_sums(
        flux, ivar, model, masked_ivar_threshold, weighted=coefficients[:, first:], residual=residual
    )
    coefficients[:, 0] = constant
    np.multiply(residual[:, : first - 1], -2.0, out=coefficients[:, 1:first])
    residual *= -2.0
    coefficients[:, first:n_low] += residual[:, first - 1 :]
    return _QuarticStatistics(coefficients, n_good, bad_input)


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

    Notes
    -----
    One pass over the pixels gives the coefficients of every star's chi2 as a polynomial
    of degree 4 in the scaled labels (79 columns in the matrix products for K = 4, see
    the module docstring); the search of :func:`optimize_labels` then runs on them. ``Q``
    is computed only for the stars whose search needs a Gauss-Newton Hessian, and for
    ``covariance="gauss_newton"``. The large temporaries (block buffers, coefficient
    tensors) are per-thread work arrays reused from call to call.
    """
    _check_optimizer_arguments(covariance, max_iterations, decrement_tolerance, step_tolerance)
    quartic = _quartic_statistics(flux, ivar, theta, s2, masked_ivar_threshold)
    # Q itself (not a function of chi2) only where the Gauss-Newton Hessian is needed.
    source = _QuadraticSource(pixels=(flux, ivar, theta, s2, masked_ivar_threshold))
    return _optimize(
        quartic, source, pivots, scales, starting_points, covariance=covariance,
        max_iterations=max_iterations, decrement_tolerance=decrement_tolerance, step_tolerance=step_tolerance,
        singular_rtol=1e-12, prune=prune,
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

    Notes
    -----
    The statistics are first turned into the monomial coefficients of chi2
    (:func:`lamost_mdwarf.kernels.cannon_quartic.coefficients_from_statistics`); the
    optimiser works on those (as :func:`infer_labels` does, which computes them directly
    from the pixels). ``Q`` itself only serves the Gauss-Newton model Hessian of points
    where the exact one is indefinite, and the Gauss-Newton covariance.
    """
    _check_optimizer_arguments(covariance, max_iterations, decrement_tolerance, step_tolerance)
    n_terms = statistics.linear.shape[1]
    pivots = np.asarray(pivots, dtype=np.float64)
    if pivots.ndim != 1 or n_quadratic_terms(max(pivots.size, 1)) != n_terms:
        raise ValueError(f"pivots/scales must have shape (K,) for a {n_terms}-term model, got {pivots.shape}")
    quartic = _QuarticStatistics(
        coefficients_from_statistics(
            np.asarray(statistics.quadratic, dtype=np.float64),
            np.asarray(statistics.linear, dtype=np.float64),
            np.asarray(statistics.constant, dtype=np.float64),
        ),
        statistics.n_good_pixels,
        statistics.bad_input,
    )
    return _optimize(
        quartic, _QuadraticSource(quadratic=statistics.quadratic), pivots, scales, starting_points,
        covariance=covariance, max_iterations=max_iterations, decrement_tolerance=decrement_tolerance,
        step_tolerance=step_tolerance, singular_rtol=singular_rtol, prune=prune,
    )


def _check_optimizer_arguments(covariance, max_iterations, decrement_tolerance, step_tolerance) -> None:
    if covariance not in ("exact", "gauss_newton"):
        raise ValueError(f"covariance must be 'exact' or 'gauss_newton', got {covariance!r}")
    if int(max_iterations) < 1 or not decrement_tolerance > 0 or not step_tolerance > 0:
        raise ValueError("max_iterations must be >= 1 and the tolerances > 0")


class _QuarticStatistics(NamedTuple):
    """Per-star monomial coefficients of chi2 (see :mod:`lamost_mdwarf.kernels.cannon_quartic`)."""

    coefficients: np.ndarray  # (N, M): chi2(x) = sum_m C_m x^(e_m)
    n_good_pixels: np.ndarray  # (N,) int
    bad_input: np.ndarray  # (N,) bool


class _Quartic(NamedTuple):
    """chi2 of a chunk of stars with the derivative tensors of ``chi2 / 2``."""

    basis: MonomialBasis
    coefficients: np.ndarray  # (N, M)
    gradient: np.ndarray  # (N, K, counts[3])
    hessian: np.ndarray  # (N, K(K+1)/2, counts[2])


def _make_quartic(coefficients: np.ndarray, n_labels: int) -> _Quartic:
    """The quartic of a chunk with its derivative tensors (in reused work arrays)."""
    basis = monomial_basis(n_labels)
    return _Quartic(basis, coefficients, *derivative_tensors(coefficients, basis, workspace=_scratch))


def _optimize(
    quartic_statistics: _QuarticStatistics,
    quadratic_source: "_QuadraticSource",
    pivots: np.ndarray,
    scales: np.ndarray,
    starting_points: np.ndarray,
    *,
    covariance: str,
    max_iterations: int,
    decrement_tolerance: float,
    step_tolerance: float,
    singular_rtol: float,
    prune: bool,
) -> InferenceResult:
    """:func:`optimize_labels` on the monomial coefficients (``quadratic_source``: the
    stars' ``Q`` on demand, for the Gauss-Newton Hessians)."""
    pivots = np.asarray(pivots, dtype=np.float64)
    scales = np.asarray(scales, dtype=np.float64)
    coefficients = quartic_statistics.coefficients
    n_stars, n_monomials = coefficients.shape
    if pivots.ndim != 1 or pivots.size < 1 or monomial_basis(pivots.size).counts[4] != n_monomials:
        raise ValueError(f"pivots/scales must have shape (K,) for this model, got {pivots.shape}")
    n_labels = pivots.size
    starts = scale_labels(starting_points, pivots, scales)
    if starts.ndim == 2:
        starts = np.broadcast_to(starts[None], (n_stars,) + starts.shape)
    if starts.ndim != 3 or starts.shape[0] != n_stars or starts.shape[1] < 1:
        raise ValueError(
            f"starting_points must have shape (M, K) or (N={n_stars}, M, K), got {np.shape(starting_points)}"
        )
    n_starts = starts.shape[1]
    quartic = _make_quartic(coefficients, n_labels)

    shared = starts[0] if n_stars and starts.strides[0] == 0 else None  # the same (M, K) points for all
    fit = _multi_start_search(
        quartic, starts.reshape(n_stars * n_starts, n_labels), n_starts,
        int(max_iterations), decrement_tolerance, step_tolerance, singular_rtol, prune, shared, quadratic_source,
    )
    chi2_all = fit.chi2.reshape(n_stars, n_starts)
    finite_all = np.isfinite(chi2_all) & _rows_finite(fit.x).reshape(n_stars, n_starts)
    finite_all &= ~fit.pruned.reshape(n_stars, n_starts)  # a pruned start cannot win
    # The lowest finite chi2 wins, converged or not (a non-converged winner is flagged).
    best = np.argmin(np.where(finite_all, chi2_all, np.inf), axis=1)
    any_finite = finite_all.any(axis=1)
    flat_best = np.arange(n_stars) * n_starts + best

    x_best = fit.x[flat_best]
    chi2 = fit.chi2[flat_best]
    converged = fit.converged[flat_best] & any_finite
    n_iterations = fit.n_iterations[flat_best]

    if covariance == "exact":  # the exact Hessian at the winner's last iterate (kept by the search)
        hessian_t = np.take(np.ascontiguousarray(fit.hessian[flat_best].T), quartic.basis.hessian_row, axis=0)
    else:
        x_for_hessian = np.where(any_finite[:, None], x_best, 0.0)
        all_stars = np.arange(n_stars)
        hessian_t = _gauss_newton_at(quadratic_source(all_stars), x_for_hessian).transpose(1, 2, 0)
    positive, inverse_t = _positive_definite_inverse(hessian_t, singular_rtol)
    cov_scaled = np.full((n_stars, n_labels, n_labels), np.nan)
    cov_scaled[positive] = np.moveaxis(inverse_t, -1, 0)[positive]
    cov_physical = cov_scaled * scales[None, :, None] * scales[None, None, :]

    n_good = np.asarray(quartic_statistics.n_good_pixels, dtype=np.int64)
    status = np.zeros(n_stars, dtype=np.int64)
    status[~converged & any_finite] |= InferenceStatus.NOT_CONVERGED
    status[~any_finite] |= InferenceStatus.NON_FINITE
    status[~positive & any_finite] |= InferenceStatus.SINGULAR_HESSIAN
    too_few = n_good <= n_labels
    status[too_few] |= InferenceStatus.TOO_FEW_PIXELS
    status[np.asarray(quartic_statistics.bad_input, dtype=bool)] |= InferenceStatus.BAD_INPUT

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


def _positive_definite_inverse(matrices_t: np.ndarray, singular_rtol: float) -> tuple[np.ndarray, np.ndarray]:
    """Which symmetric (K, K, B) matrices are positive definite, and their inverses.

    Positive definite means smallest eigenvalue > ``singular_rtol`` times the largest.
    The inverse comes from the entry-by-entry Cholesky factorization; where the pivots
    are positive and ``1 / trace(H^-1) > singular_rtol trace(H)`` this proves the
    criterion (``lambda_min >= 1 / trace(H^-1)``, ``lambda_max <= trace(H)``); the
    other finite matrices (near the threshold, or indefinite) are decided by their
    eigenvalues (``eigvalsh``) and inverted by LU.

    Returns
    -------
    positive : numpy.ndarray
        (B,) bool.
    inverse_t : numpy.ndarray
        (K, K, B) inverses (meaningless where not ``positive``).
    """
    n_labels, _, n_points = matrices_t.shape
    finite = np.all(np.isfinite(matrices_t), axis=(0, 1))
    safe_t = np.where(finite, matrices_t, np.eye(n_labels)[:, :, None])
    factor, chol_ok = _cholesky(safe_t, singular_rtol)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inverse_t = _inverse_from_cholesky(factor)
        trace = sum(safe_t[k, k] for k in range(n_labels))
        trace_inverse = sum(inverse_t[k, k] for k in range(n_labels))
        certified = finite & chol_ok & (trace_inverse > 0) & (1.0 / trace_inverse > singular_rtol * trace)
    positive = certified.copy()
    unsure = np.flatnonzero(finite & ~certified)
    if unsure.size:
        matrices = np.moveaxis(safe_t[:, :, unsure], -1, 0)
        eigenvalues = np.linalg.eigvalsh(matrices)
        ok = eigenvalues[:, 0] > singular_rtol * np.abs(eigenvalues[:, -1])
        positive[unsure] = ok
        if ok.any():
            inverse = np.linalg.inv(matrices[ok])
            inverse_t[:, :, unsure[ok]] = np.moveaxis(0.5 * (inverse + np.swapaxes(inverse, 1, 2)), 0, -1)
    return positive, inverse_t


def _inverse_from_cholesky(factor: np.ndarray) -> np.ndarray:
    """``(L L^T)^-1 = L^-T L^-1`` for lower-triangular (K, K, B) factors (symmetric)."""
    n_labels = factor.shape[0]
    inverse_factor = np.zeros_like(factor)  # L^-1, lower triangular
    for j in range(n_labels):
        inverse_factor[j, j] = 1.0 / factor[j, j]
        for i in range(j + 1, n_labels):
            entry = factor[i, j] * inverse_factor[j, j]
            for k in range(j + 1, i):
                entry = entry + factor[i, k] * inverse_factor[k, j]
            inverse_factor[i, j] = -entry / factor[i, i]
    inverse = np.empty_like(factor)
    for k in range(n_labels):
        for m in range(k, n_labels):
            entry = inverse_factor[m, k] * inverse_factor[m, m]
            for j in range(m + 1, n_labels):
                entry = entry + inverse_factor[j, k] * inverse_factor[j, m]
            inverse[k, m] = inverse[m, k] = entry
    return inverse


def _gauss_newton_at(quadratic: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Gauss-Newton Hessians ``J^T Q J`` of chi2/2 in scaled labels at B points (B, K)
    with their stars' (B, T, T) ``Q``: (B, K, K), symmetric."""
    jac = design_jacobian(x)
    with np.errstate(invalid="ignore", over="ignore"):
        hess = np.swapaxes(jac, 1, 2) @ (quadratic @ jac)
    return 0.5 * (hess + np.swapaxes(hess, -1, -2))


class _QuadraticSource:
    """``Q_n`` of the stars of a chunk (float64 (n, T, T)), given or computed on demand.

    ``Q`` is not a function of chi2 (several entries multiply the same monomial), so the
    quartic does not carry it. The optimiser needs it only for the Gauss-Newton Hessian
    of points where the exact one is indefinite (rare: far from a minimum in a curved
    valley) and for the Gauss-Newton covariance; from ``pixels`` = (flux, ivar, theta,
    s2, masked_ivar_threshold) it is computed for the stars asked for (with the fixed
    block shapes of :func:`sufficient_statistics`: a star's ``Q`` does not depend on
    which others are computed with it) and kept for the rest of the chunk.
    """

    def __init__(self, quadratic: np.ndarray | None = None, pixels: tuple | None = None) -> None:
        self._quadratic = None if quadratic is None else np.asarray(quadratic, dtype=np.float64)
        self._pixels = pixels
        self._cache: dict[int, np.ndarray] = {}

    def __call__(self, stars: np.ndarray) -> np.ndarray:
        stars = np.asarray(stars, dtype=np.intp)
        if self._quadratic is not None:
            return np.take(self._quadratic, stars, axis=0)
        missing = np.array(sorted({int(n) for n in stars} - self._cache.keys()), dtype=np.intp)
        if missing.size:
            flux, ivar, theta, s2, threshold = self._pixels
            quadratic = _statistics(
                np.asarray(flux)[missing], np.asarray(ivar)[missing], theta, s2, threshold, pivot_terms=False
            ).quadratic
            self._cache.update(zip(missing.tolist(), quadratic))
        if stars.size == 0:
            n_terms = np.shape(self._pixels[2])[1]
            return np.zeros((0, n_terms, n_terms))
        return np.stack([self._cache[int(n)] for n in stars])


# --- Evaluations of the quartic -------------------------------------------------------------


def _gradients(gradient: np.ndarray, x: np.ndarray, basis: MonomialBasis) -> np.ndarray:
    """Gradient of chi2/2 at B points, each with its own (B, K, counts[3]) tensor: (B, K)."""
    _, cubic = monomial_values(x, basis, basis.counts[3])
    return (gradient @ cubic[:, :, None])[:, :, 0]


def _gradients_hessians(gradient, hessian, x, basis) -> tuple[np.ndarray, np.ndarray]:
    """Gradient (B, K) and Hessian entries (B, K(K+1)/2) of chi2/2 at B points."""
    low, cubic = monomial_values(x, basis, basis.counts[3])
    return (gradient @ cubic[:, :, None])[:, :, 0], (hessian @ low[:, :, None])[:, :, 0]


def _hessian_change(hessian: np.ndarray, x: np.ndarray, step_t: np.ndarray, basis: MonomialBasis) -> np.ndarray:
    """``d/dt H(x + t p)`` at t = 0 for B points ``x`` (B, K) and steps ``p`` (K, B) (the
    third derivative of chi2/2 along ``p``, applied once): Hessian entries, (B, K(K+1)/2)."""
    x_ext, p_ext = extended_rows(x.T, 1.0), extended_rows(step_t, 0.0)
    left, right = basis.pair_left, basis.pair_right
    derivative = np.take(x_ext, left, axis=0) * np.take(p_ext, right, axis=0)
    derivative += np.take(p_ext, left, axis=0) * np.take(x_ext, right, axis=0)
    return (hessian @ np.ascontiguousarray(derivative.T)[:, :, None])[:, :, 0]


def _rows_finite(values: np.ndarray) -> np.ndarray:
    """Whether every entry of each row of a (B, n) array is finite, (B,).

    From the row sums (a matrix-vector product: NaN and inf propagate; a reduction along
    short rows is ~10x slower); a row of finite values whose sum overflows counts as
    not finite.
    """
    with np.errstate(invalid="ignore", over="ignore"):
        return np.isfinite(values @ np.ones(values.shape[1]))


def _entries_t(entries: np.ndarray, basis: MonomialBasis) -> np.ndarray:
    """(B, K(K+1)/2) symmetric-matrix entries as a C-ordered (K, K, B) array."""
    return np.take(np.ascontiguousarray(entries.T), basis.hessian_row, axis=0)


def _values_at_points(quartic: _Quartic, x: np.ndarray):
    """chi2 (N, M), gradient (N, M, K) and Hessian entries (N, M, K(K+1)/2) of chi2/2 at M
    points per star: ``x`` of shape (M, K) (the same points for every star) or (N, M, K).

    One small matrix product per star and quantity (the same shapes and strides in both
    cases, whatever the number of stars: a star's values do not depend on its chunk).
    """
    basis = quartic.basis
    n_stars = quartic.coefficients.shape[0]
    n_cubic = basis.counts[3]
    with np.errstate(invalid="ignore", over="ignore"):
        if x.ndim == 2:
            low, values = monomial_values(x, basis, basis.counts[4])
            low_t, values_t = low.T, values.T  # (., M) views with the strides of the case below
            cubic_t = values_t[:n_cubic]
        else:
            n_points, n_labels = x.shape[1:]
            low, values = monomial_values(x.reshape(n_stars * n_points, n_labels), basis, basis.counts[4])
            low_t = np.swapaxes(low.reshape(n_stars, n_points, low.shape[1]), 1, 2)
            values_t = np.swapaxes(values.reshape(n_stars, n_points, values.shape[1]), 1, 2)
            cubic_t = values_t[:, :n_cubic]
        chi2 = (quartic.coefficients[:, None, :] @ values_t)[:, 0, :]
        grad = np.swapaxes(quartic.gradient @ cubic_t, 1, 2)
        hess = np.swapaxes(quartic.hessian @ low_t, 1, 2)
    return chi2, grad, hess


def _quadratic_form(matrices_t: np.ndarray, vectors_t: np.ndarray) -> np.ndarray:
    """``d^T H d`` for (K, K, B) matrices and (K, B) vectors (sums in a fixed order)."""
    return np.sum(vectors_t * _matvec(matrices_t, vectors_t), axis=0)


def _chi2_change(grad_from_t, hess_from_t, grad_to_t, hess_to_t, step_t) -> np.ndarray:
    """Exact ``chi2(x + d) - chi2(x)`` of B points from the gradients (K, B) and Hessians
    (K, K, B) of chi2/2 at both ends and the steps ``d`` (K, B).

    Along the step, ``f(t) = chi2/2`` is a quartic, so ``f'`` is a cubic, fixed by its
    values ``g.d`` and slopes ``d.H.d`` at both ends; the integral of that cubic Hermite
    interpolant is ``(f'(0) + f'(1)) / 2 + (f''(0) - f''(1)) / 12``.
    """
    first = np.sum((grad_from_t + grad_to_t) * step_t, axis=0)
    second = _quadratic_form(hess_from_t, step_t) - _quadratic_form(hess_to_t, step_t)
    return first + second / 6.0


def _multi_start_search(
    quartic: _Quartic,
    x0: np.ndarray,
    n_starts: int,
    max_iterations: int,
    decrement_tolerance: float,
    step_tolerance: float,
    singular_rtol: float,
    prune: bool,
    shared: np.ndarray | None = None,
    quadratic_source: "_QuadraticSource | None" = None,
) -> "_FitResult":
    """All starts of all stars (``prune=False``), or the staged search (``prune=True``).

    Staged search, per star: (1) the start with the lowest chi2 runs to convergence,
    ``x*``; (2) every other start from which chi2 decreases monotonically along the
    straight segment to a converged ``x*`` (checked exactly: chi2 is a quartic
    polynomial along a line) lies in the descent basin of ``x*`` and is dropped; (3) the
    remaining starts run, with the duplicate / hopeless pruning of
    :func:`_starts_to_prune` against each other and ``x*``. A start on the far side of a
    chi2 barrier from ``x*`` (another local minimum) is never dropped before it is
    within ~1 sigma of its own minimum. ``shared``: the (M, K) starts when every star
    has the same (``x0`` is then their repetition).
    """
    n_points, n_labels = x0.shape
    n_stars = n_points // n_starts
    x0 = np.asarray(x0, dtype=np.float64)
    x0_stars = x0.reshape(n_stars, n_starts, n_labels)
    # chi2 and its derivatives at every start (one small product per star).
    chi2_start, grad0, hess0 = _values_at_points(quartic, x0_stars if shared is None else shared)
    chi2_start = chi2_start.reshape(n_stars, n_starts)
    grad0 = grad0.reshape(n_points, n_labels)
    hess0 = hess0.reshape(n_points, quartic.hessian.shape[1])
    if not prune or n_starts == 1 or n_points == 0:
        return _trust_region_newton(
            quartic, x0, chi2_start.ravel(), grad0, hess0, n_starts, max_iterations, decrement_tolerance,
            step_tolerance, singular_rtol, prune, quadratic_source=quadratic_source,
        )
    star = np.repeat(np.arange(n_stars), n_starts)
    finite_start = np.isfinite(chi2_start) & _rows_finite(x0).reshape(n_stars, n_starts)
    first = np.argmin(np.where(finite_start, chi2_start, np.inf), axis=1)  # ties: the earlier start
    phase1 = np.zeros(n_points, dtype=bool)
    best_flat = np.arange(n_stars) * n_starts + first
    phase1[best_flat] = True
    # Phase 1 as a one-start problem (one point per star: no gathers of per-star arrays).
    fit1 = _trust_region_newton(
        quartic, np.take(x0, best_flat, axis=0), np.take(chi2_start.ravel(), best_flat),
        np.take(grad0, best_flat, axis=0), np.take(hess0, best_flat, axis=0), 1, max_iterations,
        decrement_tolerance, step_tolerance, singular_rtol, prune=False, quadratic_source=quadratic_source,
    )
    x_best = fit1.x
    has_best = fit1.converged & np.isfinite(fit1.chi2)
    others = ~phase1 & finite_start.ravel() & has_best[star]
    in_basin = np.zeros(n_points, dtype=bool)
    if others.any():
        descends = _segment_descends(
            x0, grad0, hess0, np.repeat(x_best, n_starts, axis=0), np.repeat(fit1.gradient, n_starts, axis=0),
            np.repeat(fit1.hessian, n_starts, axis=0), quartic.basis,
        )
        in_basin = others & descends
    # Phase-1 results in the slots of their starts.
    x1, grad1, hess1 = x0.copy(), grad0.copy(), hess0.copy()
    x1[best_flat], grad1[best_flat], hess1[best_flat] = fit1.x, fit1.gradient, fit1.hessian
    chi2_1 = np.full(n_points, np.nan)
    chi2_1[best_flat] = fit1.chi2
    converged1 = np.zeros(n_points, dtype=bool)
    converged1[best_flat] = fit1.converged
    n_iterations1 = np.zeros(n_points, dtype=np.int64)
    n_iterations1[best_flat] = fit1.n_iterations
    run2 = ~phase1 & ~in_basin & finite_start.ravel()
    if not run2.any():  # every other start pruned (or unusable): the phase-1 result stands
        return _FitResult(x1, chi2_1, converged1, n_iterations1, ~phase1, grad1, hess1)
    target = np.where(has_best[:, None], x_best, np.nan)
    fit2 = _trust_region_newton(
        quartic, x1, np.where(phase1, chi2_1, chi2_start.ravel()), grad1, hess1, n_starts, max_iterations,
        decrement_tolerance, step_tolerance, singular_rtol, prune=True, run=run2, pruned=in_basin, target=target,
        target_derivatives=(fit1.gradient, fit1.hessian), quadratic_source=quadratic_source,
    )
    return fit2._replace(
        converged=np.where(phase1, converged1, fit2.converged),
        n_iterations=np.where(phase1, n_iterations1, fit2.n_iterations),
    )


#: A chi2 rise below this along a segment (chi2 units) does not count as a barrier.
_BARRIER_TOLERANCE = 1e-3


def _descends_to(statistics, x_from: np.ndarray, x_to: np.ndarray) -> np.ndarray:
    """Whether chi2 is non-increasing along the straight segments ``x_from -> x_to``.

    ``statistics`` are :class:`SufficientStatistics` of N stars, ``x_from`` has shape
    (N, M, K) (M points per star), ``x_to`` (N, K); returns (N, M). See
    :func:`_segment_descends`.
    """
    n_stars, n_points, n_labels = x_from.shape
    quartic = _make_quartic(
        coefficients_from_statistics(statistics.quadratic, statistics.linear, statistics.constant), n_labels
    )
    _, grad0, hess0 = _values_at_points(quartic, np.asarray(x_from, dtype=np.float64))
    _, grad1, hess1 = _values_at_points(quartic, np.asarray(x_to, dtype=np.float64)[:, None, :])
    shape = (n_stars * n_points, -1)
    return _segment_descends(
        x_from.reshape(shape), grad0.reshape(shape), hess0.reshape(shape),
        np.repeat(x_to, n_points, axis=0), np.repeat(grad1[:, 0], n_points, axis=0),
        np.repeat(hess1[:, 0], n_points, axis=0), quartic.basis,
    ).reshape(n_stars, n_points)


def _segment_descends(x_from, grad_from, hess_from, x_to, grad_to, hess_to, basis) -> np.ndarray:
    """Whether chi2 is non-increasing along the segments ``x_from -> x_to`` (B points each).

    Along ``x(t) = x_from + t d`` chi2 is exactly a quartic ``sum_i c_i t^i``; its
    coefficients follow from the gradients ``g`` and Hessians ``H`` of chi2/2 at both
    ends: ``c_1 = 2 g_0.d``, ``c_2 = d.H_0.d``, and ``3 c_3 + 4 c_4 = 2 g_1.d - c_1 -
    2 c_2``, ``6 c_3 + 12 c_4 = 2 d.H_1.d - 2 c_2``. The slope (a cubic) is at most
    ``_BARRIER_TOLERANCE`` on [0, 1] iff it is at the ends and at the zeros of its
    derivative (a quadratic) inside (0, 1).
    """
    d_t = np.ascontiguousarray((x_to - x_from).T)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        c1 = 2.0 * np.sum(grad_from.T * d_t, axis=0)
        c2 = _quadratic_form(_entries_t(hess_from, basis), d_t)
        alpha = 2.0 * np.sum(grad_to.T * d_t, axis=0) - c1 - 2.0 * c2
        beta = 2.0 * _quadratic_form(_entries_t(hess_to, basis), d_t) - 2.0 * c2
        c4 = 0.25 * (beta - 2.0 * alpha)
        c3 = (alpha - 4.0 * c4) / 3.0
        return _monotone_quartic(c1, c2, c3, c4)


def _monotone_quartic(c1, c2, c3, c4) -> np.ndarray:
    """Whether ``c1 t + c2 t^2 + c3 t^3 + c4 t^4`` is non-increasing on [0, 1] (to
    ``_BARRIER_TOLERANCE``, plus 1e-12 of the coefficients' size for round-off)."""

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
    gradient: np.ndarray  # (B, K): of chi2/2 at x (NaN for points not needed)
    hessian: np.ndarray  # (B, K(K+1)/2): entries of the exact Hessian of chi2/2 at x


#: Initial trust-region radius, scaled label units (the training set spans about +-2;
#: 1.0 rather than 0.5: 6% fewer iterations on the benchmark's data from the best
#: start, the same within a few % on the curved-valley fixture of the tests).
_RADIUS_INITIAL = 1.0
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


def _trust_region_newton(
    quartic: _Quartic,
    x0: np.ndarray,
    chi2_0: np.ndarray,
    grad_0: np.ndarray,
    hess_0: np.ndarray,
    n_starts: int,
    max_iterations: int,
    decrement_tolerance: float,
    step_tolerance: float,
    singular_rtol: float,
    prune: bool = True,
    run: np.ndarray | None = None,
    pruned: np.ndarray | None = None,
    target: np.ndarray | None = None,
    target_derivatives: tuple[np.ndarray, np.ndarray] | None = None,
    quadratic_source: "_QuadraticSource | None" = None,
) -> _FitResult:
    """Batched trust-region Newton on chi2/2 for B = N*M points (see the module docstring).

    Each iteration, for every active point: exact gradient and Hessian (from the
    quartic's coefficient tensors); the model Hessian (exact, or Gauss-Newton ``J^T Q J``
    where the exact one is indefinite away from a saddle; ``Q`` of those stars from
    ``quadratic_source``) gives the trust-region step ``p``, solution of
    ``(B + sigma I) p = -g`` with ``|p| <= radius`` (Moré-Sorensen); the trial point
    ``x + p + a/2`` adds the third-order (Chebyshev) correction ``a = -(B + sigma I)^-1
    T[p, p]`` with the exact third derivative ``T`` of chi2/2 (chi2 is a quartic), then
    ``_N_CORRECTIONS`` frozen-Hessian Newton steps along the stiffest eigen-direction put
    it back on the valley floor. The exact chi2 change (from the gradients and
    Hessians at both ends: ``d chi2/dt`` is a cubic along the step) decides acceptance
    and the radius.

    A point whose Newton decrement is below ``decrement_tolerance`` has converged and
    leaves the loop; its last (pure) Newton step ``-H^-1 g`` is taken at the end if it
    does not raise chi2 (all such steps are checked together, with one evaluation).

    Positive definite models (almost all) are handled with Cholesky factorizations
    written out over the K x K entries, each a vector over the points (much cheaper than
    a batched LAPACK call per 4x4 matrix); indefinite or singular ones with ``eigh``.
    ``chi2_0``, ``grad_0``, ``hess_0``: chi2, gradient (B, K) and Hessian entries (B,
    K(K+1)/2) of chi2/2 at ``x0`` (needed for the points that run or are not pruned).
    ``target`` (N, K) with the gradients and Hessian entries of chi2/2 there
    (``target_derivatives``): each star's best minimum so far (phase 2 of the staged
    search).
    """
    n_points, n_labels = x0.shape
    basis = quartic.basis
    n_all_stars = quartic.coefficients.shape[0]
    star = np.repeat(np.arange(n_all_stars), n_starts)
    x = np.array(x0, dtype=np.float64)  # a copy
    grad = np.array(grad_0, dtype=np.float64)
    hess = np.array(hess_0, dtype=np.float64)
    run = np.ones(n_points, dtype=bool) if run is None else np.asarray(run, dtype=bool)
    pruned = np.zeros(n_points, dtype=bool) if pruned is None else np.array(pruned, dtype=bool)
    # Points that run or take part in the pruning; the others are left alone (chi2 NaN).
    needed = np.flatnonzero(run | ~pruned)
    radius = np.full(n_points, _RADIUS_INITIAL)
    converged = np.zeros(n_points, dtype=bool)
    n_iter = np.zeros(n_points, dtype=np.int64)
    active = run & _rows_finite(x) & _rows_finite(grad) & _rows_finite(hess)
    # Converged points' last Newton steps, taken at the end (NaN: none).
    final_step = np.full((n_points, n_labels), np.nan)
    # Each point's last stiffest direction (NaN: none yet), the start of the next one's search.
    last_top = np.full((n_points, n_labels), np.nan)
    prune = prune and n_starts > 1
    if prune:
        chi2_now = np.array(chi2_0, dtype=np.float64)
    while active.any():
        ib = np.flatnonzero(active)
        stars_b = star[ib]
        if _one_per_star(stars_b, n_all_stars, n_starts):
            grad_coef, hess_coef = quartic.gradient, quartic.hessian  # one point per star, in order
        else:
            grad_coef = np.take(quartic.gradient, stars_b, axis=0)
            hess_coef = np.take(quartic.hessian, stars_b, axis=0)
        xa, grad_a, hess_a = np.take(x, ib, axis=0), np.take(grad, ib, axis=0), np.take(hess, ib, axis=0)
        # Matrices as (K, K, b) and vectors as (K, b): every entry a contiguous vector.
        exact_t = _entries_t(hess_a, basis)
        grad_t = np.ascontiguousarray(grad_a.T)
        factor, posdef = _cholesky(exact_t, singular_rtol)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            forward = _forward_substitution(factor, grad_t)  # L^-1 g
            decrement = np.where(posdef, np.sum(forward**2, axis=0), np.inf)
        no_information = np.all(grad_t == 0.0, axis=0)  # and a zero Hessian: e.g. no data
        if no_information.any():
            no_information &= np.all(exact_t == 0.0, axis=(0, 1))
        done = (decrement < decrement_tolerance) | no_information
        broken = ~np.all(np.isfinite(exact_t), axis=(0, 1)) | ~np.all(np.isfinite(grad_t), axis=0)
        if prune:
            exact = np.moveaxis(exact_t, -1, 0)
            drop = _starts_to_prune(ib, n_starts, x, chi2_now, ~pruned, exact, decrement, posdef & ~done & ~broken)
            if target is not None:
                # An iterate from which chi2 descends monotonically to its star's best
                # minimum found so far has entered that basin (the test of phase 2).
                goal = target[stars_b]
                check = ~drop & ~done & np.all(np.isfinite(goal), axis=1)
                if check.any():
                    sel = np.flatnonzero(check)
                    goal_stars = stars_b[sel]
                    drop[sel] = _segment_descends(
                        xa[sel], grad_a[sel], hess_a[sel], goal[sel], target_derivatives[0][goal_stars],
                        target_derivatives[1][goal_stars], basis,
                    )
            if drop.any():
                pruned[ib[drop]] = True
                active[ib[drop]] = False
                keep = ~drop
                ib, stars_b, xa, grad_a, hess_a = ib[keep], stars_b[keep], xa[keep], grad_a[keep], hess_a[keep]
                grad_coef, hess_coef = grad_coef[keep], hess_coef[keep]
                # np.compress keeps C order (star-independent sums, see design_monomials).
                exact_t, factor = np.compress(keep, exact_t, axis=2), np.compress(keep, factor, axis=2)
                grad_t, forward = np.compress(keep, grad_t, axis=1), np.compress(keep, forward, axis=1)
                posdef, decrement, done, broken = posdef[keep], decrement[keep], done[keep], broken[keep]
                if ib.size == 0:
                    continue
        if done.any():
            # Converged: out of the loop; the last Newton step is checked at the end.
            newton = np.flatnonzero(done & posdef)
            if newton.size:
                newton_t = -_back_substitution(np.take(factor, newton, axis=-1), np.take(forward, newton, axis=-1))
                final_step[ib[newton]] = newton_t.T
            converged[ib[done]] = True
            n_iter[ib[done]] += 1  # (the last step counts as an iteration)
            active[ib[done]] = False
            keep = ~done
            if not keep.any():
                continue
            ib, stars_b, xa, grad_a, hess_a = ib[keep], stars_b[keep], xa[keep], grad_a[keep], hess_a[keep]
            grad_coef, hess_coef = grad_coef[keep], hess_coef[keep]
            exact_t, factor = np.compress(keep, exact_t, axis=2), np.compress(keep, factor, axis=2)
            grad_t, forward = np.compress(keep, grad_t, axis=1), np.compress(keep, forward, axis=1)
            posdef, decrement, broken = posdef[keep], decrement[keep], broken[keep]

        # Model Hessian: the exact one where positive definite; elsewhere Gauss-Newton
        # (``J^T Q J``, from the stars' Q, computed on demand), unless it says the point is
        # already (nearly) stationary: then a saddle is left along the exact Hessian's
        # negative curvature (eigendecomposition path).
        model_t = exact_t
        newton_model = posdef.copy()
        by_cholesky = posdef.copy()
        other = np.flatnonzero(~posdef & ~broken)
        if other.size and quadratic_source is not None:
            gn_t = _symmetric_entries(_gauss_newton_at(quadratic_source(stars_b[other]), xa[other]))
            gn_factor, gn_posdef = _cholesky(gn_t, singular_rtol)
            with np.errstate(invalid="ignore", over="ignore"):
                gn_decrement = np.sum(_forward_substitution(gn_factor, grad_t[:, other]) ** 2, axis=0)
            near_saddle = gn_posdef & (gn_decrement < _SADDLE_DECREMENT)
            model_t = exact_t.copy()
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
            step_t, shift, chol_factor = _trust_region_step_cholesky(
                model_t, factor, grad_t, radius[ib], singular_rtol, forward if other.size == 0 else None
            )
            top_vec, top_val = _top_eigenpair(model_t, last_top[ib].T)
        elif chol.size:
            # np.take keeps C order (fancy indexing on the last axis does not, and the
            # entry-by-entry operations on such arrays are 2x slower).
            model_c = np.take(model_t, chol, axis=-1)
            step_t[:, chol], shift[chol], chol_factor = _trust_region_step_cholesky(
                model_c, np.take(factor, chol, axis=-1), np.take(grad_t, chol, axis=-1), radius[ib[chol]],
                singular_rtol,
            )
            top_vec[:, chol], top_val[chol] = _top_eigenpair(model_c, last_top[ib[chol]].T)
        if eig_path.size:
            eig, vec = _safe_eigh(np.moveaxis(model_t[:, :, eig_path], -1, 0))
            grad_eig = (grad_a[eig_path, None, :] @ vec)[:, 0]
            step_eig, shift[eig_path] = _trust_region_step(eig, grad_eig, radius[ib[eig_path]], singular_rtol)
            step_t[:, eig_path] = (vec @ step_eig[:, :, None])[:, :, 0].T
            top_vec[:, eig_path], top_val[eig_path] = vec[:, :, -1].T, eig[:, -1]
        with np.errstate(invalid="ignore", over="ignore"):
            predicted = 2.0 * np.sum(grad_t * step_t + 0.5 * step_t * _matvec(model_t, step_t), axis=0)  # chi2
            step = np.ascontiguousarray(step_t.T)
            # Third-order correction: T[p, p] = (d/dt H(x + t p)) p, exact for the quartic.
            third_t = _matvec(_entries_t(_hessian_change(hess_coef, xa, step_t, basis), basis), step_t)
            if chol.size == ib.size:
                accel_t = -_cholesky_solve(chol_factor, third_t)
            elif chol.size:
                accel_t[:, chol] = -_cholesky_solve(chol_factor, np.take(third_t, chol, axis=-1))
            if eig_path.size:
                shifted = eig + shift[eig_path, None]
                inverse = np.where(shifted > 0, 1.0 / np.where(shifted > 0, shifted, 1.0), 0.0)
                rhs_eig = (third_t[:, eig_path].T[:, None, :] @ vec)[:, 0] * inverse
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
            last_top[ib] = top
            for _ in range(_N_CORRECTIONS):
                along = np.sum(_gradients(grad_coef, x_trial, basis) * top, axis=1) * top_inverse  # g.u / lambda
                along *= np.abs(along) <= step_norm
                x_trial = x_trial - along[:, None] * top
            grad_trial, hess_trial = _gradients_hessians(grad_coef, hess_coef, x_trial, basis)
            # Exact chi2 change: along the segment d chi2/2 / dt is a cubic, fixed by its values
            # and slopes at both ends (cubic Hermite; its integral is exact).
            total_step = x_trial - xa
            delta_chi2 = _chi2_change(grad_t, exact_t, grad_trial.T, _entries_t(hess_trial, basis), total_step.T)
        finite = (
            ~broken
            & np.isfinite(delta_chi2)
            & _rows_finite(x_trial)
            & _rows_finite(grad_trial)
            & _rows_finite(hess_trial)
        )
        accept = finite & (delta_chi2 < 0)
        # A full (undamped) Newton step on the exact Hessian below step_tolerance: converged.
        small_step = finite & newton_model & (shift == 0.0) & (np.max(np.abs(total_step), axis=1) < step_tolerance)
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
        x[acc], grad[acc], hess[acc] = x_trial[accept], grad_trial[accept], hess_trial[accept]
        if prune:
            chi2_now[acc] += delta_chi2[accept]
        n_iter[ib] += 1
        converged[ib[small_step]] = True
        stalled = broken | (radius[ib] < _RADIUS_MIN)
        active[ib[small_step | stalled | (n_iter[ib] >= max_iterations)]] = False

    # The converged points' last Newton steps, where they do not raise chi2: the result is
    # then the optimum to ~decrement^2, not to ~decrement^(1/2).
    pending = np.flatnonzero(_rows_finite(final_step))
    if pending.size:
        with np.errstate(invalid="ignore", over="ignore"):
            x_new = x[pending] + final_step[pending]
            stars_p = star[pending]
            if _one_per_star(stars_p, n_all_stars, n_starts):
                grad_coef, hess_coef = quartic.gradient, quartic.hessian
            else:
                grad_coef = np.take(quartic.gradient, stars_p, axis=0)
                hess_coef = np.take(quartic.hessian, stars_p, axis=0)
            grad_new, hess_new = _gradients_hessians(grad_coef, hess_coef, x_new, basis)
            delta_chi2 = _chi2_change(
                grad[pending].T, _entries_t(hess[pending], basis), grad_new.T, _entries_t(hess_new, basis),
                final_step[pending].T,
            )
            ok = np.isfinite(delta_chi2) & (delta_chi2 <= 0) & _rows_finite(x_new)
            ok &= _rows_finite(grad_new) & _rows_finite(hess_new)
        taken = pending[ok]
        x[taken], grad[taken], hess[taken] = x_new[ok], grad_new[ok], hess_new[ok]
    chi2 = np.full(n_points, np.nan)
    with np.errstate(invalid="ignore", over="ignore"):
        if _one_per_star(star[needed], n_all_stars, n_starts):
            chi2[needed] = chi2_quartic(quartic.coefficients, x[needed])
        elif needed.size:
            chi2[needed] = chi2_quartic(np.take(quartic.coefficients, star[needed], axis=0), x[needed])
    return _FitResult(x, chi2, converged, n_iter, pruned, grad, hess)


def _one_per_star(stars: np.ndarray, n_stars: int, n_starts: int) -> bool:
    """Whether the sorted star indices of some points are exactly 0 .. n_stars - 1 (then
    per-star arrays can be used as they are, without gathering rows)."""
    return stars.size == n_stars and (n_starts == 1 or bool(np.all(np.diff(stars) == 1)))


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
    """``M v`` for (K, K, B) matrices and (K, B) vectors.

    Accumulated column by column in a fixed order (``einsum`` orders its sums by the
    shape, so a point's round-off would depend on how many points share the call).
    """
    n_labels = vectors_t.shape[0]
    if n_labels < 8:  # the sum over a middle axis runs in order (pairwise from 8 terms)
        return np.sum(matrices_t * vectors_t[None], axis=1)
    out = matrices_t[:, 0] * vectors_t[0]
    for k in range(1, n_labels):
        out += matrices_t[:, k] * vectors_t[k]
    return out


def _cholesky(matrices_t: np.ndarray, singular_rtol: float) -> tuple[np.ndarray, np.ndarray]:
    """Lower Cholesky factors of symmetric (K, K, B) matrices, column by column.

    Every operation acts on contiguous vectors over the B points (one column of the
    factor at a time): for K = 4 this is ~20 times faster than a batched LAPACK call per
    matrix. The sums over ``k < j`` run in a fixed order (a reduction over a leading
    axis), so a point's factor does not depend on the other points.

    Returns the factors (K, K, B) and ``ok`` (B,): every pivot is finite and above
    ``singular_rtol`` times the largest diagonal entry (positive definite, numerically).
    Where not ok, the factor is meaningless.
    """
    n_labels = matrices_t.shape[0]
    factor = np.zeros_like(matrices_t)
    threshold = np.abs(matrices_t[0, 0])
    for k in range(1, n_labels):
        threshold = np.maximum(threshold, np.abs(matrices_t[k, k]))
    threshold *= singular_rtol
    ok = np.ones(matrices_t.shape[-1], dtype=bool)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        for j in range(n_labels):
            if j:
                column = matrices_t[j:, j] - np.sum(factor[j:, :j] * factor[j, :j], axis=1)
            else:
                column = matrices_t[:, 0]
            ok &= column[0] > threshold  # False for NaN
            root = np.sqrt(np.where(ok, column[0], 1.0))
            factor[j, j] = root
            if j + 1 < n_labels:
                factor[j + 1 :, j] = column[1:] / root
    return factor, ok


def _forward_substitution(factor: np.ndarray, rhs_t: np.ndarray) -> np.ndarray:
    """Solve ``L y = rhs`` for lower-triangular (K, K, B) factors and (K, B) right-hand sides."""
    out = np.empty_like(rhs_t)
    for i in range(factor.shape[0]):
        entry = rhs_t[i]
        for k in range(i):
            entry = entry - factor[i, k] * out[k]
        out[i] = entry / factor[i, i]
    return out


def _back_substitution(factor: np.ndarray, rhs_t: np.ndarray) -> np.ndarray:
    """Solve ``L^T x = rhs`` for lower-triangular (K, K, B) factors and (K, B) right-hand sides."""
    out = np.empty_like(rhs_t)
    n_labels = factor.shape[0]
    for i in range(n_labels - 1, -1, -1):
        entry = rhs_t[i]
        for k in range(i + 1, n_labels):
            entry = entry - factor[k, i] * out[k]
        out[i] = entry / factor[i, i]
    return out


def _cholesky_solve(factor: np.ndarray, rhs_t: np.ndarray) -> np.ndarray:
    """Solve ``L L^T x = rhs`` for (K, B) right-hand sides."""
    return _back_substitution(factor, _forward_substitution(factor, rhs_t))


def _trust_region_step_cholesky(
    model_t: np.ndarray,
    factor: np.ndarray,
    grad_t: np.ndarray,
    radius: np.ndarray,
    singular_rtol: float,
    forward: np.ndarray | None = None,
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
    forward : numpy.ndarray, optional
        ``L^-1 g`` (K, B), if already known.

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
    if forward is None:
        forward = _forward_substitution(factor, grad_t)
    step_t = -_back_substitution(factor, forward)
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


def _top_eigenpair(
    matrices_t: np.ndarray, start_t: np.ndarray | None = None, n_power: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Largest eigenvalue and its unit eigenvector of positive definite (K, K, B) matrices.

    Power iteration from ``start_t`` (K, B) where finite (the previous iterate's vector:
    then one iteration), else from the column with the largest diagonal entry
    (``n_power`` iterations): the stiff direction of these problems is separated from
    the others by orders of magnitude, so a few iterations suffice (otherwise the vector
    lies in the span of the top eigenvectors, still a valid corrector direction).
    """
    n_labels, _, n_points = matrices_t.shape
    warm = np.zeros(n_points, dtype=bool) if start_t is None else np.all(np.isfinite(start_t), axis=0)
    if warm.all():
        vector, n_power = start_t, 1
    else:
        diagonal = np.array([matrices_t[k, k] for k in range(n_labels)])
        vector = matrices_t[:, np.argmax(diagonal, axis=0), np.arange(n_points)]  # (K, B): the column
        if warm.any():
            vector = np.where(warm, start_t, vector)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        for _ in range(n_power):
            vector = _matvec(matrices_t, vector / np.sqrt(np.sum(vector**2, axis=0)))
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


def _centred_design(x: np.ndarray) -> np.ndarray:
    """Design vector minus its value at the pivot (the constant term set to 0)."""
    design = design_matrix(x)
    design[..., 0] = 0.0
    return design


def _safe_eigh(matrices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Batched eigh; non-finite matrices give NaN eigenvalues instead of an exception."""
    finite = np.all(np.isfinite(matrices), axis=(-2, -1))
    safe = np.where(finite[:, None, None], matrices, np.eye(matrices.shape[-1]))
    eigenvalues, eigenvectors = np.linalg.eigh(safe)
    eigenvalues[~finite] = np.nan
    return eigenvalues, eigenvectors
