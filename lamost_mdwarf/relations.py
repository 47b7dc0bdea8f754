"""Empirical M-dwarf relations: radius and mass as functions of Teff, and luminosity.

The TESS Cool Dwarf Catalog (Muirhead et al. 2018), whose labels Galgano et al. (2020)
train on, derives its parameters from the empirical relations of Mann et al. (2015,
ApJ 804, 64). This module ships polynomial Teff -> R and Teff -> M relations fitted to
the 183 K7-M7 dwarfs of Mann et al. (2015) (table ``mann15.stars.csv``, columns ``Teff``
[K], ``R`` [Rsun], ``M`` [Msun]):

    log10(R / Rsun) = sum_k RADIUS_COEFFS[k] * x**k
    log10(M / Msun) = sum_k MASS_COEFFS[k] * x**k,       x = Teff / 3500 K

(unweighted least squares in log10 space, degree 2). Fitting in log space keeps R and M
positive and both relations strictly increasing over 2500-4400 K; the cubic in linear
space that Mann et al. use for Teff-R turns over below ~2750 K. The fit residuals are
0.050 Rsun and 0.050 Msun rms (15-17 %, the real scatter of the calibration sample at
fixed Teff, mostly from metallicity). The calibration sample spans 2700-4131 K
(:data:`TEFF_CALIBRATED_RANGE_K`); outside it the functions extrapolate.

:func:`fit_mann15_relations` refits the coefficients from the CSV (the package never reads
it at run time; ``tests/test_relations.py`` checks the shipped constants against a refit).

The same relations serve the survey simulator (true radii and masses) and the label
selection step (training stars deviating from them by more than 0.01 Rsun / 0.01 Msun
are rejected, as in Galgano et al. 2020).
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np

__all__ = [
    "RADIUS_COEFFS",
    "MASS_COEFFS",
    "TEFF_SCALE_K",
    "TEFF_SUN_K",
    "TEFF_CALIBRATED_RANGE_K",
    "MannRelationFit",
    "radius_from_teff",
    "mass_from_teff",
    "luminosity_from_radius_teff",
    "log_surface_gravity",
    "fit_mann15_relations",
]

#: Teff normalisation of the polynomial variable x = Teff / TEFF_SCALE_K, in K.
TEFF_SCALE_K = 3500.0

#: Nominal solar effective temperature (IAU 2015 Resolution B3), K.
TEFF_SUN_K = 5772.0

#: Teff range (K) spanned by the Mann et al. (2015) calibration stars.
TEFF_CALIBRATED_RANGE_K = (2700.0, 4131.0)

#: log10(R/Rsun) polynomial coefficients in x = Teff/3500 K, increasing power.
#: Fitted to the 183 stars of Mann et al. (2015) (mann15.stars.csv) by
#: :func:`fit_mann15_relations` with degree=2.
RADIUS_COEFFS: tuple[float, ...] = (-5.634739875318158, 8.526688231266714, -3.293932319332685)

#: log10(M/Msun) polynomial coefficients in x = Teff/3500 K, increasing power.
#: Fitted to the 183 stars of Mann et al. (2015) (mann15.stars.csv) by
#: :func:`fit_mann15_relations` with degree=2.
MASS_COEFFS: tuple[float, ...] = (-7.057338718598001, 10.83941058576115, -4.19731707656234)

#: log10 of the nominal solar surface gravity in cgs (g = G Msun / Rsun^2).
_LOG_G_SUN_CGS = 4.438067627303133


def _validated_teff(teff_k: np.ndarray | float) -> np.ndarray:
    teff = np.asarray(teff_k, dtype=np.float64)
    if np.any(teff[np.isfinite(teff)] <= 0) or np.any(np.isinf(teff)):
        raise ValueError("effective temperatures must be positive and finite (K); NaN is propagated")
    return teff


def _evaluate_log_polynomial(teff: np.ndarray, coeffs: tuple[float, ...]) -> np.ndarray:
    return 10.0 ** np.polynomial.polynomial.polyval(teff / TEFF_SCALE_K, np.asarray(coeffs))


def radius_from_teff(teff_k: np.ndarray | float) -> np.ndarray | float:
    """Stellar radius on the Mann et al. (2015) Teff-R relation.

    Parameters
    ----------
    teff_k : float or array_like
        Effective temperature, K. NaN propagates to NaN.

    Returns
    -------
    float or numpy.ndarray
        Radius, Rsun (same shape as ``teff_k``).

    Raises
    ------
    ValueError
        If any finite temperature is <= 0 or any is infinite.
    """
    teff = _validated_teff(teff_k)
    out = _evaluate_log_polynomial(teff, RADIUS_COEFFS)
    return float(out) if out.ndim == 0 else out


def mass_from_teff(teff_k: np.ndarray | float) -> np.ndarray | float:
    """Stellar mass on the Teff-M relation fitted to the Mann et al. (2015) stars.

    Parameters
    ----------
    teff_k : float or array_like
        Effective temperature, K. NaN propagates to NaN.

    Returns
    -------
    float or numpy.ndarray
        Mass, Msun (same shape as ``teff_k``).

    Raises
    ------
    ValueError
        If any finite temperature is <= 0 or any is infinite.
    """
    teff = _validated_teff(teff_k)
    out = _evaluate_log_polynomial(teff, MASS_COEFFS)
    return float(out) if out.ndim == 0 else out


def luminosity_from_radius_teff(radius_rsun: np.ndarray | float, teff_k: np.ndarray | float) -> np.ndarray | float:
    """Bolometric luminosity from radius and Teff, L = R^2 (Teff / 5772 K)^4.

    Parameters
    ----------
    radius_rsun : float or array_like
        Radius, Rsun (>= 0).
    teff_k : float or array_like
        Effective temperature, K (> 0). Broadcast against ``radius_rsun``.

    Returns
    -------
    float or numpy.ndarray
        Luminosity, Lsun.

    Raises
    ------
    ValueError
        If any finite radius is negative or any finite temperature is <= 0.
    """
    radius = np.asarray(radius_rsun, dtype=np.float64)
    if np.any(radius[np.isfinite(radius)] < 0):
        raise ValueError("radii must be >= 0 (Rsun)")
    teff = _validated_teff(teff_k)
    out = radius**2 * (teff / TEFF_SUN_K) ** 4
    return float(out) if np.ndim(out) == 0 else out


def log_surface_gravity(mass_msun: np.ndarray | float, radius_rsun: np.ndarray | float) -> np.ndarray | float:
    """Surface gravity log10(g / (cm s^-2)) = 4.438 + log10(M/Msun) - 2 log10(R/Rsun).

    Parameters
    ----------
    mass_msun : float or array_like
        Mass, Msun (> 0).
    radius_rsun : float or array_like
        Radius, Rsun (> 0).

    Returns
    -------
    float or numpy.ndarray
        log10 of the surface gravity in cgs units (dex).
    """
    mass = np.asarray(mass_msun, dtype=np.float64)
    radius = np.asarray(radius_rsun, dtype=np.float64)
    if np.any(mass[np.isfinite(mass)] <= 0) or np.any(radius[np.isfinite(radius)] <= 0):
        raise ValueError("mass (Msun) and radius (Rsun) must be positive")
    out = _LOG_G_SUN_CGS + np.log10(mass) - 2.0 * np.log10(radius)
    return float(out) if np.ndim(out) == 0 else out


@dataclass(frozen=True)
class MannRelationFit:
    """Result of :func:`fit_mann15_relations`.

    Attributes
    ----------
    radius_coeffs, mass_coeffs : tuple of float
        log10(R/Rsun) and log10(M/Msun) polynomial coefficients in x = Teff/3500 K,
        increasing power.
    radius_rms_rsun, mass_rms_msun : float
        RMS of the linear-space residuals, Rsun and Msun.
    n_stars : int
        Number of stars used.
    teff_range_k : tuple of float
        Minimum and maximum Teff of the stars used, K.
    """

    radius_coeffs: tuple[float, ...]
    mass_coeffs: tuple[float, ...]
    radius_rms_rsun: float
    mass_rms_msun: float
    n_stars: int
    teff_range_k: tuple[float, float]


def fit_mann15_relations(csv_path: str | os.PathLike, degree: int = 2) -> MannRelationFit:
    """Refit the Teff-R and Teff-M relations from the Mann et al. (2015) star table.

    Parameters
    ----------
    csv_path : str or path-like
        CSV with at least the columns ``Teff`` (K), ``R`` (Rsun) and ``M`` (Msun), such as
        ``mann15.stars.csv``. Rows with an empty or non-positive value are skipped.
    degree : int, optional
        Polynomial degree in x = Teff/3500 K of log10(R) and log10(M). The shipped
        constants use 2.

    Returns
    -------
    MannRelationFit

    Raises
    ------
    ValueError
        If a column is missing, ``degree`` < 1, or fewer than ``degree + 2`` usable rows.
    """
    if int(degree) != degree or degree < 1:
        raise ValueError(f"degree must be a positive integer, got {degree!r}")
    teff, radius, mass = [], [], []
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"Teff", "R", "M"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {sorted(missing)}")
        for row in reader:
            try:
                values = float(row["Teff"]), float(row["R"]), float(row["M"])
            except (TypeError, ValueError):
                continue
            if all(np.isfinite(v) and v > 0 for v in values):
                teff.append(values[0])
                radius.append(values[1])
                mass.append(values[2])
    if len(teff) < degree + 2:
        raise ValueError(f"{csv_path}: only {len(teff)} usable rows for a degree-{degree} fit")
    teff_arr, radius_arr, mass_arr = np.array(teff), np.array(radius), np.array(mass)
    x = teff_arr / TEFF_SCALE_K
    poly = np.polynomial.polynomial
    radius_coeffs = poly.polyfit(x, np.log10(radius_arr), degree)
    mass_coeffs = poly.polyfit(x, np.log10(mass_arr), degree)
    radius_rms = float(np.sqrt(np.mean((radius_arr - 10 ** poly.polyval(x, radius_coeffs)) ** 2)))
    mass_rms = float(np.sqrt(np.mean((mass_arr - 10 ** poly.polyval(x, mass_coeffs)) ** 2)))
    return MannRelationFit(
        radius_coeffs=tuple(float(c) for c in radius_coeffs),
        mass_coeffs=tuple(float(c) for c in mass_coeffs),
        radius_rms_rsun=radius_rms,
        mass_rms_msun=mass_rms,
        n_stars=len(teff),
        teff_range_k=(float(teff_arr.min()), float(teff_arr.max())),
    )
