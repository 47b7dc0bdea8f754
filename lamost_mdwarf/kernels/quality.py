"""Per-star quality quantities of a chunk of spectra (pure numpy).

The survey's quality metric, SNR_lambda (sum of the five ugriz SNRs of the header), comes
from the headers and is not computed here. This module computes, per star:

``n_good_pixels``
    Pixels with no mask bit set (:mod:`lamost_mdwarf.kernels.masking`).
``n_invalid_continuum``
    Pixels where the pseudo-continuum is undefined (NaN or <= 0); a fully masked star
    has all of them.
``continuum_slope``
    Blue slope of the pseudo-continuum (see below).
``blue_excess``
    ``continuum_slope < threshold`` (paper: -3): the "unusually high flux at blue
    wavelengths" cut of Galgano et al. (2020), Sect. 2.1.1.
``median_snr``
    Median of ``flux * sqrt(ivar)`` over good pixels: a per-pixel SNR that cross-checks
    the header SNR (TheCannon computes the same quantity for LAMOST spectra).

Blue slope, and the unit of the -3 threshold
---------------------------------------------
The paper drops stars whose "pseudo-continuum slope [is] more negative than -3 (in units
of normalized flux per unit wavelength)" without saying which normalization or which
wavelength unit. Here:

1. the continuum is divided by its plain median over all pixels of the grid where it is
   defined (a robust, mask-independent level; for M dwarfs it lies in the red half);
2. a straight line is fitted to that normalized continuum over 4500-5500 A (rest
   frame) by weighted least squares, weights = the pixels' (masked) inverse variance, so
   masked pixels (tiny ivar) barely count and pixels with an undefined continuum not at
   all (``weighting="uniform"`` gives every defined pixel the same weight);
3. the slope is expressed per ``wavelength_unit`` Angstrom, default 1000 A.

Per Angstrom, a slope of -3 would mean the normalized continuum rising by 3000 over the
fit range, which no spectrum does; per 1000 A it means rising by ~3 times the median
level from 5500 A to 4500 A, whereas an M dwarf's continuum falls to the blue (slope
> 0): a "severe upward trend to the blue", affecting a small fraction of spectra as in
the paper (~1000 of ~100,000). Both the unit and the threshold are parameters
(:class:`QualityConfig`).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

__all__ = [
    "QualityConfig",
    "StarQuality",
    "blue_excess_flag",
    "continuum_blue_slope",
    "count_good_pixels",
    "count_invalid_continuum",
    "median_pixel_snr",
    "star_quality",
]

_WEIGHTINGS = ("ivar", "uniform")


@dataclass(frozen=True)
class QualityConfig:
    """Settings of the per-star quality quantities.

    Attributes
    ----------
    slope_range : (float, float)
        Rest-frame wavelength range of the blue-slope fit, Angstrom (default 4500-5500).
    slope_wavelength_unit : float
        The slope is in normalized flux per this many Angstrom (default 1000).
    blue_excess_threshold : float
        A star has a blue excess when its slope is below this (paper: -3), in normalized
        flux per ``slope_wavelength_unit``.
    slope_weighting : {"ivar", "uniform"}
        Weights of the slope fit: the pixels' inverse variance (default) or equal.
    """

    slope_range: tuple[float, float] = (4500.0, 5500.0)
    slope_wavelength_unit: float = 1000.0
    blue_excess_threshold: float = -3.0
    slope_weighting: Literal["ivar", "uniform"] = "ivar"

    def __post_init__(self) -> None:
        lo, hi = self.slope_range
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"slope_range must be finite with lo < hi, got {self.slope_range!r}")
        if not (math.isfinite(self.slope_wavelength_unit) and self.slope_wavelength_unit > 0):
            raise ValueError(
                "slope_wavelength_unit must be finite and > 0 A, got "
                f"{self.slope_wavelength_unit!r}")
        if not math.isfinite(self.blue_excess_threshold):
            raise ValueError(
                f"blue_excess_threshold must be finite, got {self.blue_excess_threshold!r}")
        if self.slope_weighting not in _WEIGHTINGS:
            raise ValueError(
                f"slope_weighting must be one of {_WEIGHTINGS}, got {self.slope_weighting!r}")


class StarQuality(NamedTuple):
    """Per-star quality quantities of a chunk; arrays of shape (n_star,).

    Attributes
    ----------
    n_good_pixels : numpy.ndarray
        int32, pixels without any mask bit.
    n_invalid_continuum : numpy.ndarray
        int32, pixels with an undefined pseudo-continuum.
    continuum_slope : numpy.ndarray
        float64, blue slope of the normalized pseudo-continuum, per
        ``QualityConfig.slope_wavelength_unit`` Angstrom; NaN if it cannot be fitted.
    blue_excess : numpy.ndarray
        bool, ``continuum_slope < QualityConfig.blue_excess_threshold``.
    median_snr : numpy.ndarray
        float64, median ``flux * sqrt(ivar)`` over good pixels (dimensionless); NaN if none.
    """

    n_good_pixels: np.ndarray
    n_invalid_continuum: np.ndarray
    continuum_slope: np.ndarray
    blue_excess: np.ndarray
    median_snr: np.ndarray


def _check_2d(name: str, arr: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_star, n_pixel), got shape {arr.shape}")
    if shape is not None and arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}, expected {shape}")
    return arr


def count_good_pixels(bitmask: np.ndarray) -> np.ndarray:
    """Number of unmasked pixels per star.

    Parameters
    ----------
    bitmask : numpy.ndarray
        Integer mask bits, shape (n_star, n_pixel); 0 = good.

    Returns
    -------
    numpy.ndarray
        int32, shape (n_star,).
    """
    bitmask = _check_2d("bitmask", bitmask)
    if not np.issubdtype(bitmask.dtype, np.integer):
        raise ValueError(f"bitmask must be an integer array, got dtype {bitmask.dtype}")
    return np.count_nonzero(bitmask == 0, axis=1).astype(np.int32)


def count_invalid_continuum(continuum: np.ndarray) -> np.ndarray:
    """Number of pixels per star where the pseudo-continuum is NaN, infinite or <= 0.

    Parameters
    ----------
    continuum : numpy.ndarray
        Pseudo-continuum, flux units, shape (n_star, n_pixel).

    Returns
    -------
    numpy.ndarray
        int32, shape (n_star,).
    """
    continuum = _check_2d("continuum", continuum)
    valid = np.isfinite(continuum) & (continuum > 0)
    return np.count_nonzero(~valid, axis=1).astype(np.int32)


def median_pixel_snr(flux: np.ndarray, ivar: np.ndarray,
                     bitmask: np.ndarray | None = None) -> np.ndarray:
    """Median per-pixel signal-to-noise ratio ``flux * sqrt(ivar)`` over good pixels.

    Parameters
    ----------
    flux : numpy.ndarray
        Fluxes, shape (n_star, n_pixel).
    ivar : numpy.ndarray
        Inverse variances, flux units^-2, same shape. Use the *raw* ivar (before
        :func:`~lamost_mdwarf.kernels.masking.apply_mask`), or pass ``bitmask``.
    bitmask : numpy.ndarray or None
        Mask bits, same shape; pixels with any bit set are excluded. Pixels with
        non-finite flux or ivar, or ivar <= 0, are always excluded.

    Returns
    -------
    numpy.ndarray
        float64, shape (n_star,), dimensionless; NaN for a star without good pixels.
    """
    flux = _check_2d("flux", flux)
    ivar = _check_2d("ivar", ivar, flux.shape)
    flux64 = flux.astype(np.float64)
    ivar64 = ivar.astype(np.float64)
    with np.errstate(invalid="ignore"):
        good = np.isfinite(flux64) & np.isfinite(ivar64) & (ivar64 > 0)
        if bitmask is not None:
            good &= _check_2d("bitmask", bitmask, flux.shape) == 0
        snr = np.where(good, flux64 * np.sqrt(np.where(good, ivar64, 0.0)), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows -> NaN, by design
        return np.nanmedian(snr, axis=1) if snr.shape[1] else np.full(snr.shape[0], np.nan)


def continuum_blue_slope(wavelength: np.ndarray, continuum: np.ndarray,
                         ivar: np.ndarray | None = None,
                         fit_range: tuple[float, float] = (4500.0, 5500.0),
                         wavelength_unit: float = 1000.0) -> np.ndarray:
    """Slope of the median-normalized pseudo-continuum over a blue wavelength range.

    Parameters
    ----------
    wavelength : numpy.ndarray
        Rest-frame wavelengths, Angstrom, shape (n_pixel,).
    continuum : numpy.ndarray
        Pseudo-continuum, flux units, shape (n_star, n_pixel); NaN or <= 0 = undefined.
    ivar : numpy.ndarray or None
        Fit weights, shape (n_star, n_pixel): the pixels' (masked) inverse variance.
        None gives equal weights. Non-finite or negative weights count as 0.
    fit_range : (float, float)
        Wavelength range of the fit, Angstrom (inclusive).
    wavelength_unit : float
        Express the slope per this many Angstrom.

    Returns
    -------
    numpy.ndarray
        float64, shape (n_star,): slope of ``continuum / median(continuum)`` in
        normalized flux per ``wavelength_unit`` Angstrom (median over the pixels of the
        whole grid where the continuum is defined). NaN when fewer than two pixels with
        positive weight and a defined continuum lie in ``fit_range``.
    """
    continuum = _check_2d("continuum", continuum)
    n_star, n_pixel = continuum.shape
    wavelength = np.asarray(wavelength, dtype=np.float64)
    if wavelength.shape != (n_pixel,):
        raise ValueError(f"wavelength must have shape ({n_pixel},), got {wavelength.shape}")
    lo, hi = fit_range
    if not lo < hi:
        raise ValueError(f"fit_range must have lo < hi, got {fit_range!r}")
    if not (math.isfinite(wavelength_unit) and wavelength_unit > 0):
        raise ValueError(f"wavelength_unit must be finite and > 0, got {wavelength_unit!r}")

    cont = continuum.astype(np.float64)
    defined = np.isfinite(cont) & (cont > 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # stars without a defined pixel
        level = np.nanmedian(np.where(defined, cont, np.nan), axis=1) if n_pixel else \
            np.full(n_star, np.nan)

    in_range = (wavelength >= lo) & (wavelength <= hi)
    x = (wavelength[in_range] - 0.5 * (lo + hi)) / wavelength_unit
    y = cont[:, in_range] / level[:, None]
    if ivar is None:
        weight = np.ones_like(y)
    else:
        weight = _check_2d("ivar", ivar, continuum.shape)[:, in_range].astype(np.float64)
    with np.errstate(invalid="ignore"):
        usable = defined[:, in_range] & np.isfinite(y) & np.isfinite(weight) & (weight > 0)
    weight = np.where(usable, weight, 0.0)
    y = np.where(usable, y, 0.0)
    # Rescale the weights per star (only their ratios matter) to avoid overflow.
    scale = weight.max(axis=1, initial=0.0)
    weight = weight / np.where(scale > 0, scale, 1.0)[:, None]

    s0 = weight.sum(axis=1)
    s1 = weight @ x
    s2 = weight @ (x * x)
    sy = (weight * y).sum(axis=1)
    sxy = (weight * y) @ x
    denominator = s0 * s2 - s1 * s1
    enough = (np.count_nonzero(usable, axis=1) >= 2) & (denominator > 1e-12 * s0 * s2)
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = (s0 * sxy - s1 * sy) / denominator
    return np.where(enough, slope, np.nan)


def blue_excess_flag(slope: np.ndarray, threshold: float = -3.0) -> np.ndarray:
    """Blue-excess flag: slope more negative than the threshold.

    Parameters
    ----------
    slope : numpy.ndarray
        Slopes from :func:`continuum_blue_slope`, normalized flux per wavelength unit.
    threshold : float
        Threshold in the same units (paper: -3).

    Returns
    -------
    numpy.ndarray
        bool, same shape; False where the slope is NaN (no evidence of a blue excess:
        such stars are caught by ``n_invalid_continuum`` / ``n_good_pixels``).
    """
    slope = np.asarray(slope, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return slope < threshold


def star_quality(wavelength: np.ndarray, flux: np.ndarray, ivar: np.ndarray,
                 bitmask: np.ndarray, continuum: np.ndarray,
                 config: QualityConfig = QualityConfig()) -> StarQuality:
    """All per-star quality quantities of a chunk, in one call.

    Parameters
    ----------
    wavelength : numpy.ndarray
        Rest-frame wavelengths, Angstrom, shape (n_pixel,).
    flux : numpy.ndarray
        Fluxes, shape (n_star, n_pixel).
    ivar : numpy.ndarray
        Inverse variances, flux units^-2 (raw or masked: masked pixels are excluded
        from the SNR through ``bitmask`` and barely weigh in the slope fit), same shape.
    bitmask : numpy.ndarray
        Mask bits from :func:`~lamost_mdwarf.kernels.masking.pixel_bitmask`, same shape.
    continuum : numpy.ndarray
        Pseudo-continuum from :func:`~lamost_mdwarf.kernels.continuum.pseudo_continuum`.
    config : QualityConfig
        Slope range, unit, threshold and weighting.

    Returns
    -------
    StarQuality
        See :class:`StarQuality`.
    """
    flux = _check_2d("flux", flux)
    for name, arr in (("ivar", ivar), ("bitmask", bitmask), ("continuum", continuum)):
        _check_2d(name, arr, flux.shape)
    weights = np.asarray(ivar) if config.slope_weighting == "ivar" else None
    slope = continuum_blue_slope(wavelength, continuum, weights, config.slope_range,
                                 config.slope_wavelength_unit)
    return StarQuality(
        n_good_pixels=count_good_pixels(bitmask),
        n_invalid_continuum=count_invalid_continuum(continuum),
        continuum_slope=slope,
        blue_excess=blue_excess_flag(slope, config.blue_excess_threshold),
        median_snr=median_pixel_snr(flux, ivar, bitmask),
    )
