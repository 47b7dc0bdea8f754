"""Calibrated label uncertainties from residuals against a noisy reference (pure numpy).

No dask, xarray or I/O.

Method
------
A star's error against the truth is modelled as the formal (photon-noise) error and a
systematic (model) error added in quadrature, ``sigma^2 = formal^2 + sigma_sys^2``. The
only reference is a catalog whose own errors ``e`` are known: the residual
``r = model - catalog`` then has variance ``formal^2 + sigma_sys^2 + e^2``, and
``sigma_sys^2`` is the maximum-likelihood solution of

    sum_n r_n^2 / v_n^2 - 1 / v_n = 0,    v_n = formal_n^2 + sigma_sys^2 + e_n^2

(:func:`fit_systematic_variance`; the catalog errors removed in quadrature, star by
star). Its standard error, from the Fisher information ``1/2 sum 1 / v_n^2``, is about
``sqrt(2 / N) (sigma_sys^2 + e^2)``: when the catalog errors are several times the
model's, thousands of stars only bound ``sigma_sys`` loosely (for e = 130 K and
N = 1000, +-750 K^2, i.e. a 25 K systematic error is measured as 0-35 K), and the
maximum can sit at 0. The estimate used is therefore the posterior mean of
``sigma_sys^2`` under a flat prior on ``sigma_sys^2 >= 0`` (the likelihood integrated on
a grid), which stays positive when the maximum is at the boundary and errs on the
large (conservative) side when the likelihood is broad; the maximum and its standard
error are reported with it.
:func:`binned_systematic_scatter` gives the same estimate per SNR bin
(moment form) for inspection.

The formal errors themselves are checked against repeat observations of the same stars
(:func:`repeat_pair_scale`): the label difference of two spectra of one star contains
no systematic error, so its width in units of the combined formal error measures how
much the formal errors under-estimate the noise (e.g. the resampled pixels' noise is
correlated, which the inverse-Hessian errors ignore). The reported error is then
``sqrt((scale formal)^2 + sigma_sys^2)``.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["BinnedSystematic", "RepeatScale", "SystematicFit", "binned_systematic_scatter", "fit_systematic_variance",
           "repeat_pair_scale", "repeat_pairs"]


class SystematicFit(NamedTuple):
    """Systematic variance from residuals against a noisy reference.

    Attributes
    ----------
    sigma : float
        Posterior-mean estimate ``sqrt(E[sigma_sys^2 | residuals])`` under a flat prior on
        ``sigma_sys^2 >= 0``, label units (what the reported errors use).
    sigma_ml : float
        Maximum-likelihood ``sigma_sys`` (0 when the likelihood peaks at 0), label units.
    variance_error : float
        Standard error of ``sigma_sys^2`` (label units squared) from the Fisher
        information at the maximum.
    n_stars : int
        Residuals used.
    """

    sigma: float
    sigma_ml: float
    variance_error: float
    n_stars: int


class BinnedSystematic(NamedTuple):
    """Per-bin moment estimates of the systematic scatter.

    Attributes
    ----------
    snr_mean : numpy.ndarray
        Mean SNR_lambda of each bin, (B,).
    sigma : numpy.ndarray
        ``sqrt(max(mean(r^2) - mean(formal^2 + e^2), 0))`` per bin, label units.
    variance_error : numpy.ndarray
        Standard error of the variance estimate ``sqrt(2 / n) mean(v)``, label units^2.
    n_stars : numpy.ndarray
        Stars per bin, int.
    """

    snr_mean: np.ndarray
    sigma: np.ndarray
    variance_error: np.ndarray
    n_stars: np.ndarray


def _clean(residual, catalog_err, formal_err):
    r = np.asarray(residual, dtype=np.float64)
    e = np.asarray(catalog_err, dtype=np.float64)
    f = np.asarray(formal_err, dtype=np.float64)
    if not (r.shape == e.shape == f.shape and r.ndim == 1):
        raise ValueError(f"residual, catalog_err and formal_err must be 1-D of equal length, got "
                         f"{r.shape}, {e.shape}, {f.shape}")
    ok = np.isfinite(r) & np.isfinite(e) & np.isfinite(f) & (e >= 0) & (f >= 0)
    return r[ok], e[ok], f[ok], ok


def fit_systematic_variance(
    residual: np.ndarray,
    catalog_err: np.ndarray,
    formal_err: np.ndarray,
    max_iterations: int = 200,
) -> SystematicFit:
    """Maximum-likelihood ``sigma_sys`` from residuals against a reference with known errors.

    Parameters
    ----------
    residual : numpy.ndarray
        Shape (N,): ``model - reference``, label units (mean removed by the caller if a
        bias is not part of the error).
    catalog_err : numpy.ndarray
        Shape (N,): the reference's 1-sigma errors, label units.
    formal_err : numpy.ndarray
        Shape (N,): the formal errors of the model values, label units.
    max_iterations : int
        Bisection steps on ``sigma_sys^2``.

    Returns
    -------
    SystematicFit
        Non-finite entries are ignored.

    Raises
    ------
    ValueError
        On fewer than 3 finite residuals or inconsistent shapes.
    """
    r, e, f, _ = _clean(residual, catalog_err, formal_err)
    if r.size < 3:
        raise ValueError(f"need at least 3 finite residuals, got {r.size}")
    base = e * e + f * f

    def score(s2: float) -> float:  # d log L / d s2 (times 2)
        v = base + s2
        return float(np.sum(r * r / (v * v) - 1.0 / v))

    if score(0.0) <= 0:
        s2 = 0.0
    else:
        lo, hi = 0.0, max(float(np.mean(r * r)), 1e-300)
        while score(hi) > 0:
            lo, hi = hi, hi * 4.0
        for _ in range(int(max_iterations)):
            mid = 0.5 * (lo + hi)
            if score(mid) > 0:
                lo = mid
            else:
                hi = mid
            if hi - lo <= 1e-12 * hi:
                break
        s2 = 0.5 * (lo + hi)
    fisher = 0.5 * np.sum(1.0 / (base + s2) ** 2)
    variance_error = float(1.0 / np.sqrt(fisher))
    # posterior mean of s2 (flat prior on s2 >= 0): integrate the likelihood on a grid
    # reaching 8 standard errors beyond the maximum.
    grid = np.linspace(0.0, s2 + 8.0 * variance_error, 2001)
    v = base[None, :] + grid[:, None]
    log_like = -0.5 * np.sum(np.log(v) + r * r / v, axis=1)
    weight = np.exp(log_like - log_like.max())
    posterior_mean = float(np.sum(weight * grid) / np.sum(weight))
    return SystematicFit(float(np.sqrt(posterior_mean)), float(np.sqrt(s2)), variance_error, int(r.size))


def binned_systematic_scatter(
    residual: np.ndarray,
    catalog_err: np.ndarray,
    formal_err: np.ndarray,
    snr: np.ndarray,
    n_bins: int = 4,
) -> BinnedSystematic:
    """Moment estimate of ``sigma_sys`` in equal-count SNR_lambda bins.

    Parameters
    ----------
    residual, catalog_err, formal_err : numpy.ndarray
        Shape (N,), label units (see :func:`fit_systematic_variance`).
    snr : numpy.ndarray
        Shape (N,), SNR_lambda.
    n_bins : int
        Number of bins (>= 1).

    Returns
    -------
    BinnedSystematic
    """
    r, e, f, ok = _clean(residual, catalog_err, formal_err)
    s = np.asarray(snr, dtype=np.float64)[ok]
    keep = np.isfinite(s)
    r, e, f, s = r[keep], e[keep], f[keep], s[keep]
    if int(n_bins) < 1 or r.size < 2 * int(n_bins):
        raise ValueError(f"need n_bins >= 1 and at least 2 stars per bin, got {n_bins} for {r.size} stars")
    order = np.argsort(s, kind="stable")
    edges = np.linspace(0, r.size, int(n_bins) + 1).round().astype(int)
    snr_mean, sigma, var_err, count = [], [], [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        idx = order[lo:hi]
        v = e[idx] ** 2 + f[idx] ** 2
        excess = float(np.mean(r[idx] ** 2) - np.mean(v))
        snr_mean.append(float(s[idx].mean()))
        sigma.append(float(np.sqrt(max(excess, 0.0))))
        var_err.append(float(np.sqrt(2.0 / idx.size) * np.mean(v + max(excess, 0.0))))
        count.append(idx.size)
    return BinnedSystematic(np.asarray(snr_mean), np.asarray(sigma), np.asarray(var_err),
                            np.asarray(count, dtype=np.int64))


class RepeatScale(NamedTuple):
    """Scale factor of formal errors measured from repeat observations.

    Attributes
    ----------
    scale : float
        Robust width (1.4826 MAD) of ``(a - b) / sqrt(err_a^2 + err_b^2)`` over the pairs:
        the factor by which the formal errors under-estimate the noise-driven scatter
        (dimensionless). 1 when there are too few pairs.
    scale_error : float
        Its approximate standard error, ``1.17 scale / sqrt(2 n)`` (MAD efficiency).
    n_pairs : int
        Pairs used.
    """

    scale: float
    scale_error: float
    n_pairs: int


def repeat_pairs(group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs of entries sharing a group id (the first two of each group).

    Parameters
    ----------
    group : numpy.ndarray
        Shape (N,), integer object ids (e.g. the matched catalog row); negative ids are
        ignored.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        Indices ``i``, ``j`` (``i < j`` in input order) of one pair per group with at
        least two entries.
    """
    group = np.asarray(group)
    idx = np.flatnonzero(group >= 0)
    order = idx[np.argsort(group[idx], kind="stable")]
    same = group[order][1:] == group[order][:-1]
    starts = np.flatnonzero(same & np.concatenate([[True], ~same[:-1]]))
    first, second = order[starts], order[starts + 1]
    return np.minimum(first, second), np.maximum(first, second)


def repeat_pair_scale(
    value_a: np.ndarray,
    value_b: np.ndarray,
    error_a: np.ndarray,
    error_b: np.ndarray,
    min_pairs: int = 20,
) -> RepeatScale:
    """How much the formal errors under-estimate the scatter between repeat observations.

    Two spectra of the same star share every systematic error, so the difference of
    their labels measures the noise-driven part only, against which the formal errors
    can be checked without any reference catalog.

    Parameters
    ----------
    value_a, value_b : numpy.ndarray
        Shape (n,): the label from the two spectra of each pair (label units).
    error_a, error_b : numpy.ndarray
        Shape (n,): their formal errors (label units).
    min_pairs : int
        Below this many finite pairs the scale is 1 (not measured).

    Returns
    -------
    RepeatScale
    """
    a, b = np.asarray(value_a, dtype=np.float64), np.asarray(value_b, dtype=np.float64)
    ea, eb = np.asarray(error_a, dtype=np.float64), np.asarray(error_b, dtype=np.float64)
    z = (a - b) / np.hypot(ea, eb)
    z = z[np.isfinite(z)]
    if z.size < int(min_pairs):
        return RepeatScale(1.0, float("nan"), int(z.size))
    scale = float(1.4826 * np.median(np.abs(z - np.median(z))))
    return RepeatScale(scale, float(1.17 * scale / np.sqrt(2.0 * z.size)), int(z.size))
