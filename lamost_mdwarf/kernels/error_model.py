"""Validation error model: label scatter as a function of SNR_lambda (Galgano et al. 2020, Sec. 4.3).

Pure numpy; no dask, xarray or I/O.

Method
------
Validation residuals ``model - reference`` of one label are sorted by ``SNR_lambda`` and
cut into equal-count bins (default 1360 stars, as in the paper; a remainder of at least
half a bin is its own last bin, a smaller one joins the previous bin). The standard
deviation of the residuals in each bin (``ddof = 1``) against the bin's mean SNR is
fitted (unweighted least squares, like the paper) by

    sigma(SNR) = c0 + c1 SNR + c2 SNR^2

The paper's Table 2 prints this as ``a + b X + c X^2`` but its numbers only make sense
with ``a`` multiplying ``X^2``: ``sigma_Teff = 174.639 - 0.942 SNR + 2.594e-3 SNR^2`` K
(106 K at SNR 100). :data:`PAPER_ERROR_MODEL` stores the corrected assignment.

Error floor: above ``snr_threshold`` (default 225) the error is the floor, below it the
quadratic clipped from below at the floor. By default the floor is the *minimum of the
fitted quadratic* over ``[lowest bin SNR, snr_threshold]``: for the paper's Teff
coefficients that minimum is 89.1 K at SNR 182, the published floor being 89.2 K; for R
and M the published floors (0.0432, 0.0516) agree with that minimum within the rounding
of the 2-digit ``SNR^2`` coefficients (0.0429-0.0461, 0.0510-0.0543). For L the
published floor (0.0097) lies below the quadratic's minimum (0.0113 for any rounding of
the coefficients), so the paper did not derive all floors the same way (perhaps
empirically for L); :data:`PAPER_ERROR_MODEL` keeps the published floors. Alternatives: ``"threshold_value"`` (the
quadratic at the threshold, continuous there) and ``"empirical"`` (the residual standard
deviation of the stars above the threshold). With the default the error jumps down at
the threshold (e.g. Teff 94.0 K just below 225, 89.2 K above), exactly as in the paper.

Per-star errors (:func:`combine_errors`): the paper reports the error-model value alone
(``"error_model"``, default); ``"quadrature"`` adds the formal test-step error in
quadrature; ``"max"`` takes the larger of the two.
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np

__all__ = [
    "DEFAULT_SNR_THRESHOLD",
    "DEFAULT_STARS_PER_BIN",
    "PAPER_ERROR_MODEL",
    "BinnedScatter",
    "QuadraticErrorModel",
    "binned_residual_scatter",
    "combine_errors",
    "error_model_sigma",
    "fit_error_model",
]

#: SNR_lambda above which the error floor applies (paper Table 2).
DEFAULT_SNR_THRESHOLD = 225.0
#: Stars per equal-count SNR bin (paper Fig. 5: 1360 +- 5).
DEFAULT_STARS_PER_BIN = 1360


class QuadraticErrorModel(NamedTuple):
    """``sigma(SNR) = c0 + c1 SNR + c2 SNR^2`` with a floor above ``snr_threshold``.

    Attributes
    ----------
    c0 : float
        Constant term, label units.
    c1 : float
        Linear coefficient, label units per unit SNR_lambda.
    c2 : float
        Quadratic coefficient, label units per unit SNR_lambda^2.
    floor : float
        Error floor, label units (> 0).
    snr_threshold : float
        SNR_lambda above which ``sigma = floor``.
    unit : str
        Label unit, for provenance (e.g. ``"K"``).
    """

    c0: float
    c1: float
    c2: float
    floor: float
    snr_threshold: float = DEFAULT_SNR_THRESHOLD
    unit: str = ""


#: Galgano et al. (2020) Table 2 with the ``a``/``c`` column names corrected
#: (``c0`` = the table's ``c``, ``c2`` = the table's ``a``).
PAPER_ERROR_MODEL: dict[str, QuadraticErrorModel] = {
    "teff": QuadraticErrorModel(c0=174.639, c1=-0.942, c2=2.594e-3, floor=89.2, unit="K"),
    "radius": QuadraticErrorModel(c0=8.688e-2, c1=-4.692e-4, c2=1.3e-6, floor=0.0432, unit="Rsun"),
    "mass": QuadraticErrorModel(c0=0.106, c1=-5.841e-4, c2=1.6e-6, floor=0.0516, unit="Msun"),
    "luminosity": QuadraticErrorModel(c0=1.623e-2, c1=-6.3e-5, c2=2.0e-7, floor=0.0097, unit="Lsun"),
}


class BinnedScatter(NamedTuple):
    """Residual scatter in equal-count SNR bins (for fitting and plotting).

    Attributes
    ----------
    snr_low, snr_high : numpy.ndarray
        Smallest and largest SNR_lambda in each bin, shape (B,).
    snr_mean : numpy.ndarray
        Mean SNR_lambda of each bin (the abscissa of the fit), shape (B,).
    scatter : numpy.ndarray
        Standard deviation (ddof = 1) of the residuals in each bin, label units, (B,).
    mean_residual : numpy.ndarray
        Mean residual (bias) in each bin, label units, shape (B,).
    n_stars : numpy.ndarray
        Stars per bin, int, shape (B,).
    """

    snr_low: np.ndarray
    snr_high: np.ndarray
    snr_mean: np.ndarray
    scatter: np.ndarray
    mean_residual: np.ndarray
    n_stars: np.ndarray


def error_model_sigma(model: QuadraticErrorModel, snr: np.ndarray | float) -> np.ndarray:
    """Error-model uncertainty at given SNR_lambda.

    Parameters
    ----------
    model : QuadraticErrorModel
        Coefficients, floor and threshold.
    snr : float or numpy.ndarray
        SNR_lambda (dimensionless), any shape.

    Returns
    -------
    numpy.ndarray
        ``floor`` where ``snr > snr_threshold``, else ``max(c0 + c1 snr + c2 snr^2, floor)``;
        label units, the shape of ``snr``. NaN where ``snr`` is NaN.
    """
    snr = np.asarray(snr, dtype=np.float64)
    quadratic = model.c0 + model.c1 * snr + model.c2 * snr * snr
    sigma = np.where(snr > model.snr_threshold, model.floor, np.maximum(quadratic, model.floor))
    return np.where(np.isnan(snr), np.nan, sigma)


def binned_residual_scatter(
    residuals: np.ndarray,
    snr: np.ndarray,
    *,
    stars_per_bin: int | None = DEFAULT_STARS_PER_BIN,
    n_bins: int | None = None,
) -> BinnedScatter:
    """Standard deviation of residuals in equal-count SNR_lambda bins.

    Parameters
    ----------
    residuals : numpy.ndarray
        ``model - reference`` for one label, shape (N,), label units. Non-finite entries
        (and their SNR) are ignored.
    snr : numpy.ndarray
        SNR_lambda of the same stars, shape (N,).
    stars_per_bin : int or None
        Bin size (the last bin takes the remainder if it is at least half a bin,
        otherwise the remainder joins the previous bin). Ignored when ``n_bins`` is given.
    n_bins : int or None
        Number of bins of (nearly) equal counts, instead of ``stars_per_bin``.

    Returns
    -------
    BinnedScatter
        Bins in increasing SNR.
    """
    residuals = np.asarray(residuals, dtype=np.float64)
    snr = np.asarray(snr, dtype=np.float64)
    if residuals.ndim != 1 or snr.shape != residuals.shape:
        raise ValueError(f"residuals and snr must be 1-D of equal length, got {residuals.shape} and {snr.shape}")
    keep = np.isfinite(residuals) & np.isfinite(snr)
    residuals, snr = residuals[keep], snr[keep]
    order = np.argsort(snr, kind="stable")
    residuals, snr = residuals[order], snr[order]
    n = snr.size
    if n_bins is not None:
        if int(n_bins) < 1 or n < 2 * int(n_bins):
            raise ValueError(f"need n_bins >= 1 and at least 2 stars per bin, got n_bins={n_bins} for {n} stars")
        edges = np.linspace(0, n, int(n_bins) + 1).round().astype(int)
    else:
        if stars_per_bin is None or int(stars_per_bin) < 2:
            raise ValueError(f"stars_per_bin must be >= 2, got {stars_per_bin!r}")
        size = int(stars_per_bin)
        if n < size:
            raise ValueError(f"{n} finite residuals are fewer than one bin of {size} stars")
        edges = list(range(0, n, size)) + [n]
        if len(edges) > 2 and (edges[-1] - edges[-2]) < size / 2:
            del edges[-2]
        edges = np.asarray(edges)
    bins = [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]
    return BinnedScatter(
        snr_low=np.array([snr[lo] for lo, _ in bins]),
        snr_high=np.array([snr[hi - 1] for _, hi in bins]),
        snr_mean=np.array([snr[lo:hi].mean() for lo, hi in bins]),
        scatter=np.array([residuals[lo:hi].std(ddof=1) for lo, hi in bins]),
        mean_residual=np.array([residuals[lo:hi].mean() for lo, hi in bins]),
        n_stars=np.array([hi - lo for lo, hi in bins], dtype=np.int64),
    )


def fit_error_model(
    residuals: np.ndarray,
    snr: np.ndarray,
    *,
    stars_per_bin: int | None = DEFAULT_STARS_PER_BIN,
    n_bins: int | None = None,
    snr_threshold: float = DEFAULT_SNR_THRESHOLD,
    floor_method: Literal["quadratic_minimum", "threshold_value", "empirical", "min_binned"] = "quadratic_minimum",
    unit: str = "",
) -> tuple[QuadraticErrorModel, BinnedScatter]:
    """Fit the quadratic error model with a floor to validation residuals of one label.

    Parameters
    ----------
    residuals : numpy.ndarray
        ``model - reference``, shape (N,), label units.
    snr : numpy.ndarray
        SNR_lambda, shape (N,).
    stars_per_bin, n_bins
        Binning, see :func:`binned_residual_scatter` (at least 3 bins are needed).
    snr_threshold : float
        SNR_lambda above which the floor applies.
    floor_method : {"quadratic_minimum", "threshold_value", "empirical", "min_binned"}
        How the floor is derived (module docstring): the quadratic's minimum over
        ``[lowest bin SNR, snr_threshold]`` (default), its value at the threshold, the
        residual standard deviation of the stars with SNR above the threshold, or the
        smallest binned scatter.
    unit : str
        Label unit stored in the result.

    Returns
    -------
    model : QuadraticErrorModel
    bins : BinnedScatter
        The binned scatter that was fitted (for plots).

    Raises
    ------
    ValueError
        On fewer than 3 bins, an unknown ``floor_method``, too few stars above the
        threshold for ``"empirical"``, or a non-positive floor.
    """
    bins = binned_residual_scatter(residuals, snr, stars_per_bin=stars_per_bin, n_bins=n_bins)
    if bins.snr_mean.size < 3:
        raise ValueError(f"a quadratic fit needs at least 3 SNR bins, got {bins.snr_mean.size}")
    c2, c1, c0 = np.polyfit(bins.snr_mean, bins.scatter, 2)
    if floor_method == "quadratic_minimum":
        lo, hi = float(bins.snr_mean[0]), float(snr_threshold)
        candidates = [lo, hi]
        if c2 > 0 and lo < -c1 / (2 * c2) < hi:
            candidates.append(-c1 / (2 * c2))
        floor = min(c0 + c1 * s + c2 * s * s for s in candidates)
    elif floor_method == "threshold_value":
        floor = c0 + c1 * snr_threshold + c2 * snr_threshold**2
    elif floor_method == "empirical":
        res = np.asarray(residuals, dtype=np.float64)
        s = np.asarray(snr, dtype=np.float64)
        above = np.isfinite(res) & np.isfinite(s) & (s > snr_threshold)
        if np.count_nonzero(above) < 2:
            raise ValueError(f"'empirical' floor needs >= 2 stars with SNR > {snr_threshold}")
        floor = float(res[above].std(ddof=1))
    elif floor_method == "min_binned":
        floor = float(np.min(bins.scatter))
    else:
        raise ValueError(
            "floor_method must be 'quadratic_minimum', 'threshold_value', 'empirical' or 'min_binned', "
            f"got {floor_method!r}"
        )
    if not (np.isfinite(floor) and floor > 0):
        raise ValueError(f"the fitted error floor is {floor!r} (not > 0); try floor_method='empirical'")
    model = QuadraticErrorModel(float(c0), float(c1), float(c2), float(floor), float(snr_threshold), unit)
    return model, bins


def combine_errors(
    formal_error: np.ndarray,
    model_error: np.ndarray,
    mode: Literal["error_model", "quadrature", "max"] = "error_model",
) -> np.ndarray:
    """Per-star label uncertainty from the formal and error-model errors.

    Parameters
    ----------
    formal_error : numpy.ndarray
        Formal 1-sigma error of the test step (sqrt of the covariance diagonal), label
        units.
    model_error : numpy.ndarray
        Error-model value :func:`error_model_sigma` at the star's SNR, label units.
    mode : {"error_model", "quadrature", "max"}
        ``"error_model"`` (default, the paper's choice): ``model_error`` alone;
        ``"quadrature"``: ``sqrt(formal^2 + model^2)``; ``"max"``: the larger one.
        NaN formal errors propagate in the last two modes.

    Returns
    -------
    numpy.ndarray
        Broadcast shape of the inputs, label units.
    """
    formal = np.asarray(formal_error, dtype=np.float64)
    model = np.asarray(model_error, dtype=np.float64)
    if mode == "error_model":
        return np.broadcast_to(model, np.broadcast_shapes(formal.shape, model.shape)).copy()
    if mode == "quadrature":
        return np.hypot(formal, model)
    if mode == "max":
        return np.maximum(formal, model)
    raise ValueError(f"mode must be 'error_model', 'quadrature' or 'max', got {mode!r}")
