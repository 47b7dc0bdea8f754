"""Pseudo-continuum normalization of spectra on a uniform wavelength grid (pure numpy).

Method (Galgano et al. 2020, Eq. 1-2; Ho et al. 2017)
-----------------------------------------------------
The pseudo-continuum of one spectrum at wavelength ``lambda_0`` is the inverse-variance
and Gaussian weighted mean of its fluxes::

    C(lambda_0) = sum_n f_n ivar_n w_n(lambda_0) / sum_n ivar_n w_n(lambda_0)

with one of two weight conventions (``L`` is the smoothing width, Angstrom):

``"cannon"`` (default)
    ``w = exp(-0.5 (lambda_0 - lambda_n)^2 / L^2)``: the code the paper used
    (``annayqho/TheCannon``, ``gaussian_weight_matrix``), so it reproduces the published
    normalization. ``L`` is the Gaussian standard deviation.
``"paper"``
    ``w = exp(-(lambda_0 - lambda_n)^2 / L^2)``: Eq. 2 as printed. It equals the
    ``"cannon"`` weights with ``L / sqrt(2)``.

The normalized spectrum is ``flux / C`` with inverse variance ``ivar * C^2``.

Pixels with non-finite flux or inverse variance, or a negative inverse variance, get zero
weight. Where no pixel has non-zero weight (the denominator is 0), or the result is not
finite and positive, the continuum is NaN; :func:`normalize_by_continuum` then gives flux
1 and inverse variance 0 there, and :mod:`lamost_mdwarf.kernels.quality` counts such
pixels.

Fast algorithm (no pixel x pixel matrix per spectrum)
------------------------------------------------------
On a uniform grid both sums are discrete convolutions with the same Gaussian kernel
``g(k) = exp(-(k / s)^2)`` (``k`` in pixels, ``s`` = :func:`gaussian_scale` / step, so
``s = sqrt(2) L / step`` for ``"cannon"``; zero padding at the grid ends).
:func:`pseudo_continuum` evaluates them for a whole chunk of spectra with a block
low-rank factorization of that Toeplitz operator (an H^2-matrix, in the spirit of the
fast Gauss transform):

1. split the pixels into blocks of ``B ~ 2 s`` pixels; every kernel block ``G_j``
   (targets in block ``a``, sources in block ``a - j``) is approximated by
   ``U S_j U^T`` with one orthonormal basis ``U`` (``B x p``) from the SVD of all the
   blocks side by side (singular values below 1e-11 of the largest dropped: ``p = 16``
   for L = 50 A on a 1 A grid); blocks with ``|j| B > 6.25 s`` (weights < 1e-17) are
   dropped;
2. per row block of spectra (about 2 MB of float64 work space): moments
   ``A_b = U^T x_b``, translation ``C_a = sum_j S_j A_{a-j}`` (one product over
   overlapping windows of blocks), evaluation ``y_a = U C_a``: three BLAS products.

For the default grid that is ~50 multiply-adds per pixel and sum instead of
``n_pixel = 3000`` for the dense formulation. The absolute error of each sum is
bounded by ``K max|x|`` over the spectrum, with ``K`` computed exactly when the
operator is built (``K`` ~ 1e-11 of the kernel mass). Every pixel whose resulting bound
on the relative error of the continuum exceeds 1e-6 is recomputed exactly by direct
summation over all pixels: that happens only where the weighted sum is below ~2e-5 of
``max(ivar)`` times the kernel mass (deep inside long runs of zero or tiny ivar, e.g. a
star whose masked ivar is < 2e-5 of its best ivar over hundreds of pixels), or where the
smoothed flux crosses zero. The result therefore equals :func:`pseudo_continuum_dense`
to 1e-6 relative (typically 1e-12 where the ivar is uniform, up to ~5e-8 in masked
stretches), plus the float32 output rounding (6e-8). The operator is built once per
kernel width (~10-20 ms) and cached.

The grid must be uniform (checked; a non-uniform grid raises ``ValueError``: use
:func:`pseudo_continuum_dense`, which accepts any grid, or resample first).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

__all__ = [
    "ContinuumConvention",
    "ContinuumNormalization",
    "DEFAULT_CONVENTION",
    "DEFAULT_SMOOTHING_WIDTH",
    "gaussian_scale",
    "gaussian_weight",
    "normalize_by_continuum",
    "pseudo_continuum",
    "pseudo_continuum_dense",
    "pseudo_continuum_normalize",
    "uniform_grid_step",
]

ContinuumConvention = Literal["cannon", "paper"]

#: Smoothing width L of Galgano et al. (2020), Angstrom.
DEFAULT_SMOOTHING_WIDTH: float = 50.0
#: Default weight convention: the code the paper used (annayqho/TheCannon).
DEFAULT_CONVENTION: ContinuumConvention = "cannon"

_CONVENTIONS = ("cannon", "paper")
_METHODS = ("auto", "fast", "direct")

#: Relative tolerance of the uniform-grid check (spacing deviations / mean step).
_GRID_RTOL = 1e-6
#: Block size of the fast operator in units of the kernel width s (pixels).
_BLOCK_PER_SCALE = 2.0
#: Singular values kept: those above this fraction of the largest.
_SVD_RTOL = 1e-11
#: Kernel blocks dropped beyond this distance in units of s (weights < exp(-39) ~ 1e-17).
_REACH_IN_SCALES = 6.25
#: Pixels whose fast-path relative error bound exceeds this are recomputed exactly.
_TARGET_RTOL = 1e-6
#: Below this many pixels (or fewer than 4 blocks) "auto" uses the exact Toeplitz product.
_DIRECT_MAX_PIXELS = 256
#: Working-set size of one row block of the fast path (bytes of float64 buffers).
_ROW_BLOCK_BYTES = 1 << 21
#: Target blocks per translation product (a band of G + 2J source blocks each).
_SUPER_BLOCK = 2
#: Largest block size of the fast operator, pixels (very wide kernels).
_MAX_BLOCK = 1024
#: Pixels per exact-fallback matrix (bounds its memory to ~ this x n_pixel x 8 bytes).
_FALLBACK_BATCH = 256


class ContinuumNormalization(NamedTuple):
    """Result of :func:`pseudo_continuum_normalize`; all arrays (n_star, n_pixel).

    Attributes
    ----------
    continuum : numpy.ndarray
        Pseudo-continuum, flux units; NaN where undefined.
    flux : numpy.ndarray
        Normalized flux ``flux / continuum`` (dimensionless); 1 where undefined.
    ivar : numpy.ndarray
        Normalized inverse variance ``ivar * continuum**2`` (dimensionless); 0 where
        undefined.
    """

    continuum: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray


# --------------------------------------------------------------------------------------
# Weights and grid checks
# --------------------------------------------------------------------------------------


def _check_width_and_convention(width: float, convention: str) -> float:
    if convention not in _CONVENTIONS:
        raise ValueError(f"convention must be one of {_CONVENTIONS}, got {convention!r}")
    width = float(width)
    if not (math.isfinite(width) and width > 0):
        raise ValueError(f"smoothing width must be finite and > 0 Angstrom, got {width!r}")
    return width


def gaussian_scale(width: float = DEFAULT_SMOOTHING_WIDTH,
                   convention: ContinuumConvention = DEFAULT_CONVENTION) -> float:
    """Scale ``s`` such that the continuum weights are ``exp(-(dlambda / s)^2)``.

    Parameters
    ----------
    width : float
        Smoothing width ``L``, Angstrom (> 0).
    convention : {"cannon", "paper"}
        ``"cannon"``: ``w = exp(-0.5 dl^2 / L^2)``, so ``s = sqrt(2) L``;
        ``"paper"``: ``w = exp(-dl^2 / L^2)``, so ``s = L``.

    Returns
    -------
    float
        ``s``, Angstrom.
    """
    width = _check_width_and_convention(width, convention)
    return math.sqrt(2.0) * width if convention == "cannon" else width


def gaussian_weight(delta_wavelength: np.ndarray | float,
                    width: float = DEFAULT_SMOOTHING_WIDTH,
                    convention: ContinuumConvention = DEFAULT_CONVENTION) -> np.ndarray:
    """Gaussian pixel weight ``w(dlambda)`` of the pseudo-continuum (Eq. 2).

    Parameters
    ----------
    delta_wavelength : array_like
        Wavelength differences ``lambda_0 - lambda_n``, Angstrom.
    width : float
        Smoothing width ``L``, Angstrom.
    convention : {"cannon", "paper"}
        See :func:`gaussian_scale`.

    Returns
    -------
    numpy.ndarray
        Dimensionless weights in [0, 1], float64, same shape as ``delta_wavelength``.
    """
    scale = gaussian_scale(width, convention)
    ratio = np.asarray(delta_wavelength, dtype=np.float64) / scale
    return np.exp(-(ratio * ratio))


def uniform_grid_step(wavelength: np.ndarray, rtol: float = _GRID_RTOL) -> float:
    """Check that a wavelength grid is uniform and return its step.

    Parameters
    ----------
    wavelength : numpy.ndarray
        Pixel centres, Angstrom, shape (n_pixel,), strictly increasing.
    rtol : float
        Largest allowed deviation of any pixel spacing from the mean spacing, as a
        fraction of the mean spacing.

    Returns
    -------
    float
        Grid step, Angstrom (1.0 for a one-pixel grid, where it is irrelevant).

    Raises
    ------
    ValueError
        If the grid is not 1-D, is empty, has non-finite values, is not strictly
        increasing or is not uniform within ``rtol``.
    """
    wavelength = np.asarray(wavelength, dtype=np.float64)
    if wavelength.ndim != 1 or wavelength.size == 0:
        raise ValueError(f"wavelength must be a non-empty 1-D array, got shape {wavelength.shape}")
    if not np.all(np.isfinite(wavelength)):
        raise ValueError("wavelength grid contains non-finite values")
    if wavelength.size == 1:
        return 1.0
    spacing = np.diff(wavelength)
    if np.any(spacing <= 0):
        raise ValueError("wavelength grid must be strictly increasing")
    step = (wavelength[-1] - wavelength[0]) / (wavelength.size - 1)
    worst = float(np.max(np.abs(spacing - step)))
    if worst > rtol * step:
        raise ValueError(
            f"wavelength grid is not uniform: a spacing deviates by {worst:.3g} A from the "
            f"mean step {step:.6g} A (tolerance {rtol:g} relative). The fast pseudo-continuum "
            "needs a uniform grid: resample onto one, or use pseudo_continuum_dense, which "
            "accepts any grid."
        )
    return float(step)


def _check_spectra(wavelength: np.ndarray, flux: np.ndarray, ivar: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    wavelength = np.asarray(wavelength)
    flux = np.asarray(flux)
    ivar = np.asarray(ivar)
    if flux.ndim != 2:
        raise ValueError(f"flux must be 2-D (n_star, n_pixel), got shape {flux.shape}")
    if ivar.shape != flux.shape:
        raise ValueError(f"ivar shape {ivar.shape} differs from flux shape {flux.shape}")
    if wavelength.ndim != 1 or wavelength.shape[0] != flux.shape[1]:
        raise ValueError(
            f"wavelength must be 1-D with n_pixel={flux.shape[1]} values, got shape "
            f"{wavelength.shape}"
        )
    for name, arr in (("flux", flux), ("ivar", ivar)):
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    return wavelength, flux, ivar


def _output_dtype(flux: np.ndarray, ivar: np.ndarray) -> np.dtype:
    """float32 for float32 (or narrower) inputs, float64 otherwise."""
    return np.result_type(flux.dtype, ivar.dtype, np.float32)


def _weighted_products(flux: np.ndarray, ivar: np.ndarray, out_num: np.ndarray,
                       out_den: np.ndarray) -> None:
    """Write ``f * ivar`` and ``ivar`` (float64) into the buffers, zeroing bad pixels.

    A pixel is bad when ``f * ivar`` is not finite (non-finite flux or ivar) or
    ``ivar < 0``; such pixels get zero weight in both sums.
    """
    np.copyto(out_num, flux)
    np.copyto(out_den, ivar)
    with np.errstate(invalid="ignore", over="ignore"):
        out_num *= out_den
    # One reduction each: the sum is finite iff every product is (float64 cannot overflow
    # here for float32 inputs), and min(ivar) >= 0 is False for NaN.
    if math.isfinite(float(out_num.sum())) and float(out_den.min(initial=0.0)) >= 0.0:
        return
    bad = ~np.isfinite(out_num) | ~(out_den >= 0)
    out_num[bad] = 0.0
    out_den[bad] = 0.0


def _finalize_continuum(numerator: np.ndarray, denominator: np.ndarray,
                        out: np.ndarray | None = None) -> np.ndarray:
    """``numerator / denominator`` with NaN wherever it is not finite and positive.

    The quotient is computed in float64 (overwriting ``numerator``), then copied into
    ``out`` (cast to its dtype) when given, else returned.
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        continuum = np.divide(numerator, denominator, out=numerator)
    if continuum.size == 0:
        return continuum if out is None else out
    # Fast path: two reductions (a NaN makes min() NaN, so the test fails). Row-wise
    # first: a full reduction over a strided 2-D view is about twice slower.
    low = float(continuum.min(axis=-1).min())
    high = float(continuum.max(axis=-1).max())
    clean = low > 0 and math.isfinite(high)
    if not clean:
        continuum[~(continuum > 0) | ~np.isfinite(continuum)] = np.nan
    if out is None:
        return continuum
    with np.errstate(over="ignore", under="ignore"):
        np.copyto(out, continuum, casting="same_kind")
    limits = np.finfo(out.dtype)
    if out.dtype.itemsize < continuum.dtype.itemsize and (
            not clean or high > float(limits.max) or low < float(limits.tiny)):
        # A narrower output dtype: a value beyond its range overflows to inf, and one
        # below its smallest normal number (subnormal, ~1e-38 for float32) is
        # effectively 0: both are undefined.
        out[~(out >= limits.tiny) | ~np.isfinite(out)] = np.nan
    return out


# --------------------------------------------------------------------------------------
# Dense reference
# --------------------------------------------------------------------------------------


def pseudo_continuum_dense(wavelength: np.ndarray, flux: np.ndarray, ivar: np.ndarray,
                           width: float = DEFAULT_SMOOTHING_WIDTH,
                           convention: ContinuumConvention = DEFAULT_CONVENTION
                           ) -> np.ndarray:
    """Pseudo-continuum by brute force: the dense ``n_pixel x n_pixel`` weight matrix.

    This is the formulation of TheCannon (``gaussian_weight_matrix`` then two matrix
    products). It is the reference for :func:`pseudo_continuum` in tests and in the
    benchmark, and the fallback for a non-uniform grid. Memory ``8 n_pixel^2`` bytes.

    Parameters
    ----------
    wavelength : numpy.ndarray
        Pixel centres, Angstrom, shape (n_pixel,); any finite grid.
    flux : numpy.ndarray
        Fluxes (any units), shape (n_star, n_pixel).
    ivar : numpy.ndarray
        Inverse variances, flux units^-2, shape (n_star, n_pixel).
    width : float
        Smoothing width ``L``, Angstrom.
    convention : {"cannon", "paper"}
        Weight convention, see the module docstring.

    Returns
    -------
    numpy.ndarray
        Continuum, flux units, float64, shape (n_star, n_pixel); NaN where undefined.
    """
    wavelength, flux, ivar = _check_spectra(wavelength, flux, ivar)
    wavelength = wavelength.astype(np.float64)
    if not np.all(np.isfinite(wavelength)):
        raise ValueError("wavelength grid contains non-finite values")
    weights = gaussian_weight(wavelength[:, None] - wavelength[None, :], width, convention)
    numerator_in = np.empty(flux.shape, dtype=np.float64)
    denominator_in = np.empty(flux.shape, dtype=np.float64)
    _weighted_products(flux, ivar, numerator_in, denominator_in)
    # The weight matrix is symmetric: x @ W == x @ W.T.
    return _finalize_continuum(numerator_in @ weights, denominator_in @ weights)


# --------------------------------------------------------------------------------------
# Fast operator
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _GaussianSumOperator:
    """Block low-rank form of ``y_i = sum_k x_k exp(-((i - k) / s)^2)`` (pixel units).

    Attributes
    ----------
    block : int
        Block size B, pixels.
    reach : int
        Number J of neighbouring blocks on each side that interact.
    basis : numpy.ndarray
        Orthonormal basis U, (B, p).
    translations : numpy.ndarray
        ``S_j = U^T G_j U`` for j = -J..J, shape (2J + 1, p, p).
    error_per_max : float
        Bound on ``|y_fast - y_exact|`` per unit ``max_k |x_k|`` (same for every pixel).
    """

    block: int
    reach: int
    basis: np.ndarray
    translations: np.ndarray
    error_per_max: float


def _block_layout(scale_px: float, n_pixel: int) -> tuple[int, int, int]:
    """Block size B, reach J and number of blocks for a kernel of width ``scale_px``."""
    block = int(min(_MAX_BLOCK, max(4, round(_BLOCK_PER_SCALE * scale_px))))
    n_block = -(-n_pixel // block)
    reach = int(math.ceil(_REACH_IN_SCALES * scale_px / block))
    # Blocks further apart than the grid never interact: no need to model them.
    reach = max(1, min(reach, n_block - 1))
    return block, reach, n_block


def _kernel_block(scale_px: float, block: int, offset: int) -> np.ndarray:
    u = np.arange(block, dtype=np.float64)
    d = (offset * block + u[:, None] - u[None, :]) / scale_px
    return np.exp(-(d * d))


@functools.lru_cache(maxsize=16)
def _gaussian_sum_operator(scale_px: float, block: int, reach: int) -> _GaussianSumOperator:
    """Build (once per kernel width and layout) the block low-rank Gaussian operator."""
    blocks = [_kernel_block(scale_px, block, j) for j in range(-reach, reach + 1)]
    left, singular, _ = np.linalg.svd(np.hstack(blocks), full_matrices=False)
    rank = int(np.count_nonzero(singular > _SVD_RTOL * singular[0]))
    basis = np.ascontiguousarray(left[:, :rank])
    translations = np.stack([basis.T @ g @ basis for g in blocks])
    # Exact worst-case row sum of |G_j - U S_j U^T| over the kept blocks ...
    row_error = np.zeros(block)
    for g, s_j in zip(blocks, translations):
        row_error += np.abs(g - basis @ s_j @ basis.T).sum(axis=1)
    # ... plus the dropped blocks: sources at distance >= reach * block + 1 on each side
    # (a bound even when the grid ends before them).
    tail = reach * block + 1 + np.arange(int(40 * scale_px) + 2, dtype=np.float64)
    tail_sum = 2.0 * float(np.exp(-((tail / scale_px) ** 2)).sum())
    error = float(row_error.max()) + tail_sum
    # Floor: a worst-case estimate of the float64 rounding of the three products (it only
    # matters for narrow kernels, where the factorization itself is exact).
    mass = float(np.exp(-((np.arange(-int(40 * scale_px) - 1, int(40 * scale_px) + 2)
                           / scale_px) ** 2)).sum())
    rounding = np.finfo(np.float64).eps * block**1.5 * (2 * reach + 1) * mass
    error = max(error, rounding)
    for arr in (basis, translations):
        arr.setflags(write=False)
    return _GaussianSumOperator(block, reach, basis, translations, error)


@functools.lru_cache(maxsize=16)
def _super_block_translation(scale_px: float, block: int, reach: int) -> np.ndarray:
    """Translation for ``_SUPER_BLOCK`` consecutive target blocks at once.

    Row ``(w, q)``: coefficient q of source block ``first - J + w`` (w = 0 .. G + 2J - 1);
    column ``(g, l)``: coefficient l of target block ``first + g``. The entry is
    ``S_j[l, q]`` with ``j = g - w + J`` when ``|j| <= J``, else 0. Because the operator is
    block Toeplitz, the same matrix serves every group of G target blocks.
    """
    op = _gaussian_sum_operator(scale_px, block, reach)
    p = op.basis.shape[1]
    group = _SUPER_BLOCK
    width = group + 2 * reach
    matrix = np.zeros((width * p, group * p))
    for w in range(width):
        for g in range(group):
            j = g - w + reach
            if -reach <= j <= reach:
                matrix[w * p:(w + 1) * p, g * p:(g + 1) * p] = op.translations[j + reach].T
    matrix.setflags(write=False)
    return matrix


def _translate(op: _GaussianSumOperator, super_matrix: np.ndarray, moments: np.ndarray
               ) -> np.ndarray:
    """Local coefficients ``C_a = sum_j S_j A_{a-j}`` for all rows and blocks.

    ``moments`` is (rows, n_block, p); sources outside the grid are zero (zero padding).
    Groups of G target blocks read G + 2J consecutive source blocks, so one matrix
    product over overlapping windows does the whole band.
    """
    rows, n_block, p = moments.shape
    group, reach = _SUPER_BLOCK, op.reach
    n_group = -(-n_block // group)
    padded = np.zeros((rows, (n_group * group + 2 * reach) * p))
    padded[:, reach * p:(reach + n_block) * p] = moments.reshape(rows, n_block * p)
    width = (group + 2 * reach) * p
    windows = np.lib.stride_tricks.as_strided(
        padded, shape=(rows, n_group, width),
        strides=(padded.strides[0], group * p * padded.itemsize, padded.itemsize),
        writeable=False)
    local = np.ascontiguousarray(windows).reshape(rows * n_group, width) @ super_matrix
    return local.reshape(rows, n_group * group, p)[:, :n_block]


def _kernel_row(scale_px: float, n_pixel: int) -> np.ndarray:
    """``exp(-(k / s)^2)`` for k = 0 .. n_pixel - 1."""
    k = np.arange(n_pixel, dtype=np.float64) / scale_px
    return np.exp(-(k * k))


def _symmetric_kernel(scale_px: float, n_pixel: int) -> np.ndarray:
    """``g(d)`` for d = -(n_pixel - 1) .. n_pixel - 1 (length 2 n_pixel - 1)."""
    row = _kernel_row(scale_px, n_pixel)
    return np.concatenate([row[:0:-1], row])


def _exact_sums(symmetric_kernel: np.ndarray, pixels: np.ndarray, numerator_in: np.ndarray,
                denominator_in: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Direct (exact) sums at some pixels of one spectrum: the fallback of the fast path.

    Row i of the Toeplitz weight matrix is ``symmetric_kernel[n - 1 - i : 2 n - 1 - i]``,
    so rows are gathered as contiguous slices, ``_FALLBACK_BATCH`` at a time.
    """
    n_pixel = numerator_in.size
    toeplitz_rows = np.lib.stride_tricks.sliding_window_view(symmetric_kernel, n_pixel)
    inputs = np.stack([numerator_in, denominator_in], axis=1)
    sums = np.empty((pixels.size, 2))
    for start in range(0, pixels.size, _FALLBACK_BATCH):
        chunk = pixels[start:start + _FALLBACK_BATCH]
        sums[start:start + chunk.size] = toeplitz_rows[n_pixel - 1 - chunk] @ inputs
    return sums[:, 0], sums[:, 1]


def _load_weighted_rows(flux: np.ndarray, ivar: np.ndarray, out_num: np.ndarray,
                        out_den: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`_weighted_products`, also returning per-row ``max|f ivar|``, ``max ivar``.

    The four row reductions double as the validity check (NaN propagates through
    ``max``/``min``), so clean data costs no extra pass.
    """
    np.copyto(out_num, flux)
    np.copyto(out_den, ivar)
    with np.errstate(invalid="ignore", over="ignore"):
        out_num *= out_den
    num_max, num_min = out_num.max(axis=1), out_num.min(axis=1)
    den_min = out_den.min(axis=1)
    if not (np.all(np.isfinite(num_max)) and np.all(np.isfinite(num_min))
            and np.all(den_min >= 0)):
        bad = ~np.isfinite(out_num) | ~(out_den >= 0)
        out_num[bad] = 0.0
        out_den[bad] = 0.0
        num_max, num_min = out_num.max(axis=1), out_num.min(axis=1)
    return np.maximum(num_max, -num_min), out_den.max(axis=1)


def _toeplitz_weights(scale_px: float, n_pixel: int) -> np.ndarray:
    """The dense (n_pixel, n_pixel) weight matrix of a uniform grid (exact path)."""
    symmetric = _symmetric_kernel(scale_px, n_pixel)
    rows = np.lib.stride_tricks.sliding_window_view(symmetric, n_pixel)
    return np.ascontiguousarray(rows[::-1])


def _fast_block(op: _GaussianSumOperator, super_matrix: np.ndarray,
                symmetric_kernel: np.ndarray, flux: np.ndarray, ivar: np.ndarray,
                work: np.ndarray, out: np.ndarray) -> None:
    """Continuum of a block of m spectra into ``out`` (m, n_pixel).

    ``work`` is a (2m, n_padded) float64 buffer whose padding columns are zero.
    """
    m, n_pixel = flux.shape
    block, p = op.basis.shape
    n_padded = work.shape[1]
    n_block = n_padded // block
    numerator_in = work[:m, :n_pixel]
    denominator_in = work[m:2 * m, :n_pixel]
    num_absmax, den_max = _load_weighted_rows(flux, ivar, numerator_in, denominator_in)

    moments = (work[:2 * m].reshape(2 * m * n_block, block) @ op.basis
               ).reshape(2 * m, n_block, p)
    local = _translate(op, super_matrix, moments)
    sums = (local.reshape(2 * m * n_block, p) @ op.basis.T).reshape(2 * m, n_padded)
    numerator = sums[:m, :n_pixel]
    denominator = sums[m:, :n_pixel]

    # Absolute error bounds per spectrum; pixels whose relative error bound exceeds
    # _TARGET_RTOL are recomputed exactly (rows pass or fail as a whole first).
    num_bound = op.error_per_max * num_absmax
    den_bound = op.error_per_max * den_max
    safe = (numerator.min(axis=1) > 2.0 * num_bound / _TARGET_RTOL) & \
           (denominator.min(axis=1) > 2.0 * den_bound / _TARGET_RTOL)
    for row in np.flatnonzero(~safe):
        if den_bound[row] == 0.0:
            continue  # no weighted pixel at all: every sum is exactly 0, continuum NaN
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = den_bound[row] / np.abs(denominator[row])
            if num_bound[row] > 0.0:  # else every numerator input, hence sum, is exactly 0
                rel += num_bound[row] / np.abs(numerator[row])
        pixels = np.flatnonzero(~(rel <= _TARGET_RTOL))
        if pixels.size:
            num, den = _exact_sums(symmetric_kernel, pixels, numerator_in[row],
                                   denominator_in[row])
            numerator[row, pixels] = num
            denominator[row, pixels] = den
    _finalize_continuum(numerator, denominator, out=out)


def pseudo_continuum(wavelength: np.ndarray, flux: np.ndarray, ivar: np.ndarray,
                     width: float = DEFAULT_SMOOTHING_WIDTH,
                     convention: ContinuumConvention = DEFAULT_CONVENTION,
                     *, method: Literal["auto", "fast", "direct"] = "auto") -> np.ndarray:
    """Gaussian-smoothed, inverse-variance weighted pseudo-continuum of a chunk of spectra.

    Implements Galgano et al. (2020) Eq. 1-2 without a per-spectrum pixel x pixel matrix
    (see the module docstring for the algorithm and its accuracy).

    Parameters
    ----------
    wavelength : numpy.ndarray
        Pixel centres, Angstrom, shape (n_pixel,); must be a uniform grid.
    flux : numpy.ndarray
        Fluxes (any units), shape (n_star, n_pixel). Not modified.
    ivar : numpy.ndarray
        Inverse variances, flux units^-2, shape (n_star, n_pixel); masked pixels should
        carry a tiny value (see :func:`lamost_mdwarf.kernels.masking.apply_mask`).
        Pixels with non-finite flux or ivar, or ivar < 0, get zero weight. Not modified.
    width : float
        Smoothing width ``L``, Angstrom (paper: 50).
    convention : {"cannon", "paper"}
        ``"cannon"`` (default): ``w = exp(-0.5 dl^2 / L^2)``, as in the code the paper
        used; ``"paper"``: ``w = exp(-dl^2 / L^2)`` (Eq. 2 as printed).
    method : {"auto", "fast", "direct"}
        ``"fast"``: block low-rank operator; ``"direct"``: exact Toeplitz product
        (``n_pixel^2`` per spectrum, like the dense reference); ``"auto"``: ``"fast"``
        unless the grid is small (<= 256 pixels, or fewer than 4 blocks of ~2 kernel
        widths).

    Returns
    -------
    numpy.ndarray
        Continuum, flux units, shape (n_star, n_pixel); float32 for float32 inputs
        (float64 otherwise), accumulated in float64. NaN where undefined: no weighted
        pixel within reach, or a result that is not finite and positive (for float32
        output: below the smallest normal float32, ~1.2e-38).

    Raises
    ------
    ValueError
        On inconsistent shapes, a non-uniform or invalid grid, a non-positive width or an
        unknown convention or method.
    """
    wavelength, flux, ivar = _check_spectra(wavelength, flux, ivar)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    step = uniform_grid_step(wavelength)
    scale_px = gaussian_scale(width, convention) / step
    out_dtype = _output_dtype(flux, ivar)
    n_star, n_pixel = flux.shape
    out = np.empty((n_star, n_pixel), dtype=out_dtype)
    if n_star == 0:
        return out

    block, reach, n_block = _block_layout(scale_px, n_pixel)
    use_direct = method == "direct" or (
        method == "auto" and (n_pixel <= _DIRECT_MAX_PIXELS or n_block < 4))
    if use_direct:
        weights = _toeplitz_weights(scale_px, n_pixel)
        rows = max(1, _ROW_BLOCK_BYTES // (16 * n_pixel))
        for start in range(0, n_star, rows):
            stop = min(n_star, start + rows)
            num_in = np.empty((stop - start, n_pixel))
            den_in = np.empty((stop - start, n_pixel))
            _weighted_products(flux[start:stop], ivar[start:stop], num_in, den_in)
            _finalize_continuum(num_in @ weights, den_in @ weights, out=out[start:stop])
        return out

    op = _gaussian_sum_operator(float(scale_px), block, reach)
    super_matrix = _super_block_translation(float(scale_px), block, reach)
    n_padded = n_block * block
    symmetric_kernel = _symmetric_kernel(scale_px, n_pixel)
    rows = max(1, min(n_star, _ROW_BLOCK_BYTES // (16 * n_padded)))
    work = np.zeros((2 * rows, n_padded))
    for start in range(0, n_star, rows):
        stop = min(n_star, start + rows)
        m = stop - start
        # The padding columns of ``work`` stay zero: only [:, :n_pixel] is ever written.
        buffer = work if m == rows else np.zeros((2 * m, n_padded))
        _fast_block(op, super_matrix, symmetric_kernel, flux[start:stop], ivar[start:stop],
                    buffer, out[start:stop])
    return out


# --------------------------------------------------------------------------------------
# Normalization
# --------------------------------------------------------------------------------------


def normalize_by_continuum(flux: np.ndarray, ivar: np.ndarray, continuum: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Divide spectra by their pseudo-continuum.

    Parameters
    ----------
    flux : numpy.ndarray
        Fluxes, shape (n_star, n_pixel).
    ivar : numpy.ndarray
        Inverse variances, flux units^-2, same shape.
    continuum : numpy.ndarray
        Pseudo-continuum, flux units, same shape (NaN where undefined).

    Returns
    -------
    norm_flux : numpy.ndarray
        ``flux / continuum``, dimensionless.
    norm_ivar : numpy.ndarray
        ``ivar * continuum**2``, dimensionless.

    Notes
    -----
    Computed in float64 and returned in the inputs' floating dtype (float32 stays
    float32). Where the continuum is undefined (NaN or <= 0) or a result is not finite,
    the pixel gets flux 1 and ivar 0 (no information), so no NaN goes downstream.
    The inputs are not modified.
    """
    flux = np.asarray(flux)
    ivar = np.asarray(ivar)
    continuum = np.asarray(continuum)
    if not (flux.shape == ivar.shape == continuum.shape):
        raise ValueError(
            f"flux {flux.shape}, ivar {ivar.shape} and continuum {continuum.shape} must "
            "have the same shape"
        )
    out_dtype = _output_dtype(flux, ivar)
    cont = continuum.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        norm_flux = flux / cont
        norm_ivar = ivar * (cont * cont)
    bad = ~(cont > 0) | ~np.isfinite(cont) | ~np.isfinite(norm_flux) | ~np.isfinite(norm_ivar)
    norm_flux[bad] = 1.0
    norm_ivar[bad] = 0.0
    return norm_flux.astype(out_dtype), norm_ivar.astype(out_dtype)


def pseudo_continuum_normalize(wavelength: np.ndarray, flux: np.ndarray, ivar: np.ndarray,
                               width: float = DEFAULT_SMOOTHING_WIDTH,
                               convention: ContinuumConvention = DEFAULT_CONVENTION,
                               *, method: Literal["auto", "fast", "direct"] = "auto"
                               ) -> ContinuumNormalization:
    """Pseudo-continuum and the normalized spectra of a chunk, in one call.

    Parameters
    ----------
    wavelength, flux, ivar, width, convention, method
        As for :func:`pseudo_continuum`.

    Returns
    -------
    ContinuumNormalization
        ``(continuum, flux, ivar)``: see :func:`pseudo_continuum` and
        :func:`normalize_by_continuum`.
    """
    continuum = pseudo_continuum(wavelength, flux, ivar, width, convention, method=method)
    norm_flux, norm_ivar = normalize_by_continuum(flux, ivar, continuum)
    return ContinuumNormalization(continuum, norm_flux, norm_ivar)
