"""Noise-free synthetic M-dwarf spectra (rest frame, vacuum, R ~ 1800).

A deliberately simple, fast, *parametric* model that reproduces the features the
Galgano et al. (2020) method relies on; it is not a model atmosphere.

Flux model, per star, on an internal log-linear grid (2.5e-5 dex, 3550-9450 A):

    F(lambda) = (R/Rsun)^2 B_lambda(Teff) exp(-tau(lambda)) + emission

* ``B_lambda`` is the Planck function, in units of B_lambda(7500 A, 3500 K).
* ``tau = sum_k S_k(Teff, log g, [Fe/H]) * phi_k(lambda)``: fixed opacity templates
  ``phi_k`` (molecular bands and lines) times strengths ``S_k`` that are smooth but
  nonlinear functions of the labels (see :func:`feature_strengths`):

  - TiO bands (heads 4584-8859 A; the main ones 4955, 5167, 5448, 5847, 6159, 6651,
    7054 A), sharp band heads degrading to the red; strength grows ~ quadratically in
    softplus((4300 K - Teff)/250 K), so it is negligible for G/K stars and saturates
    in late M;
  - CaH (6382 A, 6750-7050 A) and MgH (4780 A): also gravity sensitive, scaling as
    10^(1.5 (log g - 4.9)), so radius and mass leave a small imprint independent of Teff;
  - VO (7334-7534 A, 7851-7973 A), weak in early M, strong below ~3200 K;
  - atomic lines: Na D (5891.6/5897.6 A) and Na I 8185/8197 A, K I 7667/7701 A
    (Teff and gravity sensitive), Ca I 4227.9 and 6574.6 A, Ca II H&K and the infrared
    triplet, Mg b, Balmer absorption (G/K stars only), a blue line blanketing term and
    a fixed forest of ~500 weak metal lines (positions drawn once from a fixed seed);
  - a [Fe/H] term strengthens oxides more than hydrides.
* emission: H-alpha (6564.61 A) and a weaker H-beta, given as an equivalent width
  relative to the local molecular pseudo-continuum.
* instrumental broadening: Gaussian line spread function with FWHM = lambda / R.

All wavelengths are vacuum Angstrom in the stellar rest frame. Functions here are pure
numpy (no I/O) and vectorised over stars.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.ndimage import gaussian_filter1d

from lamost_mdwarf.relations import log_surface_gravity

__all__ = [
    "RESOLVING_POWER",
    "HALPHA_VACUUM_A",
    "HBETA_VACUUM_A",
    "FINE_LOG10_STEP",
    "FINE_WAVELENGTH_RANGE_A",
    "FEATURE_NAMES",
    "TIO_BAND_HEADS_A",
    "feature_strengths",
    "fine_log_wavelength",
    "synthesize_fine",
    "sample_fine_spectra",
    "synthesize_rest_frame",
    "tio5_index",
]

#: LAMOST low-resolution resolving power lambda / FWHM.
RESOLVING_POWER = 1800.0
#: H-alpha and H-beta vacuum wavelengths, Angstrom.
HALPHA_VACUUM_A = 6564.61
HBETA_VACUUM_A = 4862.68
#: Step of the internal synthesis grid, dex (a quarter of a LAMOST pixel).
FINE_LOG10_STEP = 2.5e-5
#: Range (Angstrom) of the internal synthesis grid: LAMOST's 3690-9100 A plus room for
#: Doppler shifts of +-0.003.
FINE_WAVELENGTH_RANGE_A = (3550.0, 9450.0)

_HC_OVER_K_A_K = 1.438776877e8  # h c / k_B in Angstrom K
_REFERENCE_WAVELENGTH_A = 7500.0
_REFERENCE_TEFF_K = 3500.0
_LOGG_REFERENCE = 4.9

# --------------------------------------------------------------------------- templates
# Molecular band heads (vacuum A): (head, relative strength, e-folding length to the red, A)
TIO_BANDS = (
    (4584.0, 0.25, 60.0), (4626.0, 0.25, 60.0), (4761.0, 0.40, 80.0), (4804.0, 0.30, 60.0),
    (4848.0, 0.30, 60.0), (4955.0, 0.60, 120.0), (5167.0, 0.60, 120.0), (5448.0, 0.65, 90.0),
    (5497.0, 0.45, 90.0), (5597.0, 0.35, 80.0), (5847.0, 0.50, 120.0), (6159.0, 0.90, 90.0),
    (6187.0, 0.60, 80.0), (6215.0, 0.45, 160.0), (6651.0, 0.60, 90.0), (6681.0, 0.45, 150.0),
    (7054.0, 1.00, 110.0), (7088.0, 0.70, 100.0), (7126.0, 0.45, 250.0), (7589.0, 0.45, 90.0),
    (7666.0, 0.35, 90.0), (8432.0, 0.40, 30.0), (8442.0, 0.40, 30.0), (8452.0, 0.40, 90.0),
    (8859.0, 0.35, 120.0),
)
#: The main TiO band heads, vacuum Angstrom.
TIO_BAND_HEADS_A = (4955.0, 5167.0, 5448.0, 5847.0, 6159.0, 6651.0, 7054.0)
CAH_BANDS = ((6382.0, 0.50, 40.0), (6750.0, 0.45, 150.0), (6908.0, 0.30, 60.0))
MGH_BANDS = ((4780.0, 0.35, 100.0), (5211.0, 0.15, 60.0))
CAOH_BANDS = ((5530.0, 0.20, 40.0),)
VO_BANDS = ((7334.0, 0.50, 100.0), (7400.0, 0.40, 80.0), (7851.0, 0.45, 60.0), (7940.0, 0.35, 60.0))

# Atomic lines (vacuum A): (centre, relative depth, Lorentzian half width, A)
NA_D_LINES = ((5891.58, 1.0, 2.0), (5897.56, 0.9, 2.0))
NA_IR_LINES = ((8185.5, 0.8, 1.5), (8197.1, 1.0, 1.5))
K_I_LINES = ((7667.0, 1.0, 2.5), (7701.1, 0.9, 2.5))
CA_I_LINES = ((4227.92, 1.5, 2.0), (6574.6, 0.35, 0.8), (6124.0, 0.25, 0.8), (6164.0, 0.2, 0.8))
CA_II_LINES = ((3934.78, 2.0, 4.0), (3969.59, 1.8, 4.0), (8500.36, 0.6, 1.5), (8544.44, 0.9, 1.5), (8664.52, 0.8, 1.5))
MG_B_LINES = ((5168.76, 0.6, 0.8), (5174.13, 0.7, 0.8), (5185.05, 0.8, 0.8))
BALMER_LINES = ((6564.61, 1.0, 4.0), (4862.68, 1.0, 5.0), (4341.69, 0.9, 5.0), (4102.89, 0.8, 5.0))

#: Names of the opacity templates, in the column order of :func:`feature_strengths`.
FEATURE_NAMES = (
    "tio", "cah", "mgh", "caoh", "vo", "na_d", "na_ir", "k_i", "ca_i", "ca_ii", "mg_b",
    "balmer", "blue_blanketing", "metal_forest",
)
# Global template amplitudes (optical depth at unit strength), tuned so the TiO5 index
# runs from ~0.85 at M0 to ~0.3 at M6 and the pseudo-continuum resembles LAMOST M dwarfs.
_AMPLITUDES = {
    "tio": 0.42, "cah": 0.55, "mgh": 0.45, "caoh": 0.5, "vo": 0.6, "na_d": 0.9, "na_ir": 0.5,
    "k_i": 0.6, "ca_i": 0.6, "ca_ii": 0.6, "mg_b": 0.5, "balmer": 0.5, "blue_blanketing": 1.0,
    "metal_forest": 1.0,
}
_FOREST_SEED = 20200101
_FOREST_N_LINES = 500


def fine_log_wavelength() -> np.ndarray:
    """The internal synthesis grid, log10(wavelength / Angstrom), rest frame vacuum.

    Returns
    -------
    numpy.ndarray
        float64, uniformly spaced by :data:`FINE_LOG10_STEP` dex over
        :data:`FINE_WAVELENGTH_RANGE_A`.
    """
    return _fine_log_wavelength_cached().copy()


@lru_cache(maxsize=1)
def _fine_log_wavelength_cached() -> np.ndarray:
    start, stop = np.log10(FINE_WAVELENGTH_RANGE_A[0]), np.log10(FINE_WAVELENGTH_RANGE_A[1])
    n_pixels = int(np.ceil((stop - start) / FINE_LOG10_STEP)) + 1
    out = start + FINE_LOG10_STEP * np.arange(n_pixels, dtype=np.float64)
    out.setflags(write=False)
    return out


def _band_profile(wavelength: np.ndarray, bands: tuple) -> np.ndarray:
    """Sum of sawtooth band profiles: 0 blueward of the head, exp(-(l - head)/w) redward."""
    out = np.zeros_like(wavelength)
    for head, strength, width in bands:
        offset = wavelength - head
        # 1 A logistic edge instead of a discontinuity
        edge = 0.5 * (1.0 + np.tanh(offset / 1.0))
        out += strength * edge * np.exp(-np.clip(offset, 0.0, None) / width)
    return out


def _line_profile(wavelength: np.ndarray, lines: tuple) -> np.ndarray:
    """Sum of Lorentzian optical-depth profiles (peak = relative depth)."""
    out = np.zeros_like(wavelength)
    for centre, depth, half_width in lines:
        out += depth / (1.0 + ((wavelength - centre) / half_width) ** 2)
    return out


def _metal_forest(wavelength: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(_FOREST_SEED)
    log_lo, log_hi = np.log10(3650.0), np.log10(9350.0)
    centres = 10 ** rng.uniform(log_lo, log_hi, _FOREST_N_LINES)
    depths = rng.lognormal(np.log(0.06), 0.8, _FOREST_N_LINES) * (5000.0 / centres)
    sigma = 0.45
    out = np.zeros_like(wavelength)
    for centre, depth in zip(centres, depths):
        lo, hi = np.searchsorted(wavelength, (centre - 6 * sigma, centre + 6 * sigma))
        out[lo:hi] += depth * np.exp(-0.5 * ((wavelength[lo:hi] - centre) / sigma) ** 2)
    return out


@lru_cache(maxsize=1)
def _templates() -> np.ndarray:
    """Opacity templates on the fine grid, shape (len(FEATURE_NAMES), n_fine)."""
    wavelength = 10 ** _fine_log_wavelength_cached()
    rows = {
        "tio": _band_profile(wavelength, TIO_BANDS),
        "cah": _band_profile(wavelength, CAH_BANDS),
        "mgh": _band_profile(wavelength, MGH_BANDS),
        "caoh": _band_profile(wavelength, CAOH_BANDS),
        "vo": _band_profile(wavelength, VO_BANDS),
        "na_d": _line_profile(wavelength, NA_D_LINES),
        "na_ir": _line_profile(wavelength, NA_IR_LINES),
        "k_i": _line_profile(wavelength, K_I_LINES),
        "ca_i": _line_profile(wavelength, CA_I_LINES),
        "ca_ii": _line_profile(wavelength, CA_II_LINES),
        "mg_b": _line_profile(wavelength, MG_B_LINES),
        "balmer": _line_profile(wavelength, BALMER_LINES),
        "blue_blanketing": (4500.0 / wavelength) ** 6,
        "metal_forest": _metal_forest(wavelength),
    }
    out = np.stack([_AMPLITUDES[name] * rows[name] for name in FEATURE_NAMES])
    out.setflags(write=False)
    return out


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def feature_strengths(teff_k: np.ndarray, logg_cgs: np.ndarray, feh_dex: np.ndarray) -> np.ndarray:
    """Strength of every opacity template as a function of the stellar labels.

    Parameters
    ----------
    teff_k : array_like
        Effective temperature, K, shape (n,).
    logg_cgs : array_like
        log10 surface gravity (cgs, dex), shape (n,).
    feh_dex : array_like
        Metallicity [Fe/H], dex, shape (n,).

    Returns
    -------
    numpy.ndarray
        Shape (n, len(FEATURE_NAMES)), dimensionless multipliers of the templates; 1 for
        a Teff = 3500 K, log g = 4.9, [Fe/H] = 0 star for the molecular bands.
    """
    teff = np.atleast_1d(np.asarray(teff_k, dtype=np.float64))
    logg = np.broadcast_to(np.asarray(logg_cgs, dtype=np.float64), teff.shape)
    feh = np.broadcast_to(np.asarray(feh_dex, dtype=np.float64), teff.shape)
    dlogg = logg - _LOGG_REFERENCE

    def ratio(t0: float, scale: float) -> np.ndarray:
        return _softplus((t0 - teff) / scale) / _softplus((t0 - _REFERENCE_TEFF_K) / scale)

    tio = ratio(4300.0, 250.0) ** 2 * 10 ** (0.25 * feh)
    hydride_gravity = 10 ** (1.5 * dlogg)
    cah = ratio(4100.0, 250.0) ** 1.5 * hydride_gravity * 10 ** (0.1 * feh)
    mgh = ratio(4400.0, 300.0) ** 1.2 * hydride_gravity * 10 ** (0.2 * feh)
    caoh = ratio(4000.0, 250.0) ** 1.5 * 10 ** (0.2 * feh)
    vo = (_softplus((3300.0 - teff) / 150.0) / _softplus(2.0)) ** 1.5 * 10 ** (0.25 * feh)
    alkali_gravity = 10 ** (1.0 * dlogg)
    na_d = ratio(5200.0, 600.0) ** 1.2 * alkali_gravity * 10 ** (0.3 * feh)
    na_ir = ratio(4600.0, 400.0) ** 1.2 * alkali_gravity * 10 ** (0.3 * feh)
    k_i = ratio(4600.0, 400.0) ** 1.3 * alkali_gravity * 10 ** (0.3 * feh)
    ca_i = ratio(5500.0, 700.0) * 10 ** (0.3 * feh)
    ca_ii = (1.0 + np.clip((teff - 3500.0) / 1000.0, 0.0, None)) * 10 ** (0.2 * feh) * np.clip(teff / 3500.0, 0.6, None)
    mg_b = (0.6 + 0.4 * np.clip((teff - 3200.0) / 1000.0, 0.0, 2.0)) * 10 ** (0.3 * feh)
    balmer = np.clip((teff - 4300.0) / 1500.0, 0.0, None) ** 2
    blue = 0.35 * ratio(5000.0, 500.0) * 10 ** (0.2 * feh)
    forest = (5000.0 / teff) ** 1.5 * 10 ** (0.8 * feh)
    columns = {
        "tio": tio, "cah": cah, "mgh": mgh, "caoh": caoh, "vo": vo, "na_d": na_d, "na_ir": na_ir,
        "k_i": k_i, "ca_i": ca_i, "ca_ii": ca_ii, "mg_b": mg_b, "balmer": balmer,
        "blue_blanketing": blue, "metal_forest": forest,
    }
    return np.stack([columns[name] for name in FEATURE_NAMES], axis=1)


def _weighted_sum(weights: np.ndarray, templates: np.ndarray) -> np.ndarray:
    """weights @ templates with a fixed summation order (no BLAS), so that results are
    bit-for-bit reproducible whatever the BLAS library or thread count."""
    out = np.zeros((weights.shape[0], templates.shape[1]))
    for k in range(templates.shape[0]):
        out += weights[:, k, None] * templates[k][None, :]
    return out


def _planck_relative(wavelength_a: np.ndarray, teff_k: np.ndarray) -> np.ndarray:
    """B_lambda(lambda, T) / B_lambda(7500 A, 3500 K), shape (n, n_lambda)."""
    ref = _REFERENCE_WAVELENGTH_A**-5 / np.expm1(_HC_OVER_K_A_K / (_REFERENCE_WAVELENGTH_A * _REFERENCE_TEFF_K))
    x = _HC_OVER_K_A_K / (wavelength_a[None, :] * teff_k[:, None])
    return wavelength_a[None, :] ** -5 / np.expm1(x) / ref


def _validate_labels(teff_k, radius_rsun, mass_msun, feh_dex, halpha_ew_a) -> tuple[np.ndarray, ...]:
    teff = np.atleast_1d(np.asarray(teff_k, dtype=np.float64))
    if teff.ndim != 1:
        raise ValueError(f"teff must be a scalar or 1-D array, got shape {teff.shape}")
    try:
        arrays = [np.broadcast_to(np.asarray(v, dtype=np.float64), teff.shape) for v in (radius_rsun, mass_msun, feh_dex, halpha_ew_a)]
    except ValueError as exc:
        raise ValueError(f"labels must broadcast to the shape of teff {teff.shape}: {exc}") from None
    radius, mass, feh, halpha = arrays
    if not np.all(np.isfinite(teff)) or np.any(teff < 1500) or np.any(teff > 12000):
        raise ValueError("teff must be finite and within 1500-12000 K")
    if not (np.all(np.isfinite(radius)) and np.all(radius > 0) and np.all(np.isfinite(mass)) and np.all(mass > 0)):
        raise ValueError("radius (Rsun) and mass (Msun) must be finite and positive")
    if not (np.all(np.isfinite(feh)) and np.all(np.isfinite(halpha))) or np.any(halpha < 0):
        raise ValueError("feh must be finite and halpha_ew (emission equivalent width, A) finite and >= 0")
    return teff, radius, mass, feh, halpha


def synthesize_fine(
    teff_k: np.ndarray | float,
    radius_rsun: np.ndarray | float,
    mass_msun: np.ndarray | float,
    *,
    feh_dex: np.ndarray | float = 0.0,
    halpha_ew_a: np.ndarray | float = 0.0,
    resolving_power: float = RESOLVING_POWER,
) -> np.ndarray:
    """Instrument-broadened rest-frame spectra on the internal fine grid.

    Parameters
    ----------
    teff_k : float or array_like, shape (n,)
        Effective temperature, K (1500-12000).
    radius_rsun, mass_msun : float or array_like
        Radius (Rsun) and mass (Msun); they set log g and scale the flux by R^2.
    feh_dex : float or array_like, optional
        Metallicity [Fe/H], dex.
    halpha_ew_a : float or array_like, optional
        H-alpha emission equivalent width, Angstrom (>= 0; 0 = no emission). H-beta gets
        half of it.
    resolving_power : float, optional
        lambda / FWHM of the Gaussian line spread function.

    Returns
    -------
    numpy.ndarray
        Shape (n, len(fine_log_wavelength())): flux in units of B_lambda(7500 A, 3500 K)
        per unit solar surface (relative flux density), float64.
    """
    teff, radius, mass, feh, halpha = _validate_labels(teff_k, radius_rsun, mass_msun, feh_dex, halpha_ew_a)
    if not np.isfinite(resolving_power) or resolving_power <= 0:
        raise ValueError(f"resolving_power must be positive, got {resolving_power!r}")
    log_wavelength = _fine_log_wavelength_cached()
    wavelength = 10**log_wavelength
    templates = _templates()
    strengths = feature_strengths(teff, log_surface_gravity(mass, radius), feh)
    tau = _weighted_sum(strengths, templates)
    continuum = _planck_relative(wavelength, teff) * (radius**2)[:, None]
    flux = continuum * np.exp(-tau)
    if np.any(halpha > 0):
        molecular = [FEATURE_NAMES.index(name) for name in ("tio", "cah", "vo", "blue_blanketing")]
        local = continuum * np.exp(-_weighted_sum(strengths[:, molecular], templates[molecular]))
        sigma = 0.6
        emission = np.exp(-0.5 * ((wavelength - HALPHA_VACUUM_A) / sigma) ** 2) + 0.5 * np.exp(
            -0.5 * ((wavelength - HBETA_VACUUM_A) / sigma) ** 2
        )
        emission /= sigma * np.sqrt(2 * np.pi)
        flux = flux + halpha[:, None] * local * emission[None, :]
    sigma_dex = 1.0 / (resolving_power * 2.0 * np.sqrt(2.0 * np.log(2.0)) * np.log(10.0))
    return gaussian_filter1d(flux, sigma_dex / FINE_LOG10_STEP, axis=1, mode="nearest", truncate=4.0)


def sample_fine_spectra(fine_flux: np.ndarray, log10_wavelength: np.ndarray, redshift: np.ndarray | float = 0.0) -> np.ndarray:
    """Sample fine-grid spectra at given wavelengths, optionally Doppler shifted.

    Parameters
    ----------
    fine_flux : numpy.ndarray
        Shape (n, n_fine), from :func:`synthesize_fine`.
    log10_wavelength : numpy.ndarray
        log10 of the sampling wavelengths (Angstrom), shape (n_pixels,) shared by all stars
        or (n, n_pixels). With ``redshift`` these are observed-frame wavelengths.
    redshift : float or array_like, optional
        Redshift z of each star; the rest-frame spectrum is seen at lambda (1 + z).

    Returns
    -------
    numpy.ndarray
        Shape (n, n_pixels), linear interpolation in log wavelength.

    Raises
    ------
    ValueError
        If a requested (rest-frame) wavelength lies outside the internal grid.
    """
    fine_flux = np.asarray(fine_flux, dtype=np.float64)
    n_stars = fine_flux.shape[0]
    grid = _fine_log_wavelength_cached()
    if fine_flux.ndim != 2 or fine_flux.shape[1] != grid.size:
        raise ValueError(f"fine_flux must have shape (n, {grid.size}), got {fine_flux.shape}")
    log_wl = np.asarray(log10_wavelength, dtype=np.float64)
    log_wl = np.broadcast_to(log_wl, (n_stars, log_wl.shape[-1]))
    shift = np.log10(1.0 + np.broadcast_to(np.asarray(redshift, dtype=np.float64), (n_stars,)))
    rest = log_wl - shift[:, None]
    if rest.size and (rest.min() < grid[0] or rest.max() > grid[-1]):
        raise ValueError(
            f"requested rest wavelengths {10 ** rest.min():.1f}-{10 ** rest.max():.1f} A are outside the "
            f"synthesis range {FINE_WAVELENGTH_RANGE_A[0]}-{FINE_WAVELENGTH_RANGE_A[1]} A"
        )
    out = np.empty(rest.shape, dtype=np.float64)
    for star in range(n_stars):
        out[star] = np.interp(rest[star], grid, fine_flux[star])
    return out


def synthesize_rest_frame(
    teff_k: np.ndarray | float,
    radius_rsun: np.ndarray | float,
    mass_msun: np.ndarray | float,
    wavelength_a: np.ndarray,
    *,
    feh_dex: np.ndarray | float = 0.0,
    halpha_ew_a: np.ndarray | float = 0.0,
    resolving_power: float = RESOLVING_POWER,
) -> np.ndarray:
    """Noise-free rest-frame M-dwarf spectra on any wavelength grid.

    Parameters
    ----------
    teff_k : float or array_like, shape (n,)
        Effective temperature, K (1500-12000; the model is meant for ~2500-6000 K).
    radius_rsun : float or array_like
        Radius, Rsun; sets log g (with the mass) and scales the flux as R^2.
    mass_msun : float or array_like
        Mass, Msun.
    wavelength_a : array_like
        Rest-frame vacuum wavelengths, Angstrom, within 3550-9450 A, 1-D.
    feh_dex : float or array_like, optional
        [Fe/H], dex.
    halpha_ew_a : float or array_like, optional
        H-alpha emission equivalent width, Angstrom (>= 0).
    resolving_power : float, optional
        Instrumental resolving power lambda / FWHM (default 1800, LAMOST).

    Returns
    -------
    numpy.ndarray
        Relative flux density (units of B_lambda(7500 A, 3500 K) x (R/Rsun)^2), shape
        (n, len(wavelength_a)) for array labels or (len(wavelength_a),) when every label
        is a scalar.

    Raises
    ------
    ValueError
        For labels out of range, non-broadcastable labels, or wavelengths outside
        3550-9450 A.

    Examples
    --------
    >>> import numpy as np
    >>> wl = np.arange(4500.0, 7500.0, 1.0)
    >>> flux = synthesize_rest_frame([3800.0, 3200.0], [0.55, 0.25], [0.58, 0.24], wl)
    >>> flux.shape
    (2, 3000)
    """
    scalar = all(np.ndim(v) == 0 for v in (teff_k, radius_rsun, mass_msun, feh_dex, halpha_ew_a))
    wavelength = np.asarray(wavelength_a, dtype=np.float64)
    if wavelength.ndim != 1 or wavelength.size == 0 or not np.all(np.isfinite(wavelength)) or np.any(wavelength <= 0):
        raise ValueError("wavelength_a must be a non-empty 1-D array of positive wavelengths (Angstrom)")
    teff = np.atleast_1d(np.asarray(teff_k, dtype=np.float64))
    shape = np.broadcast_shapes(teff.shape, *(np.shape(v) for v in (radius_rsun, mass_msun, feh_dex, halpha_ew_a)))
    teff = np.broadcast_to(teff, shape if shape else (1,))
    fine = synthesize_fine(
        teff, radius_rsun, mass_msun, feh_dex=feh_dex, halpha_ew_a=halpha_ew_a, resolving_power=resolving_power
    )
    out = sample_fine_spectra(fine, np.log10(wavelength))
    return out[0] if scalar else out


def tio5_index(wavelength_a: np.ndarray, flux: np.ndarray) -> np.ndarray:
    """TiO5 band index (Reid et al. 1995), on vacuum wavelengths.

    Mean flux in 7128-7137 A over mean flux in 7044-7048 A (the air windows 7126-7135 and
    7042-7046 A converted to vacuum). Smaller values mean deeper TiO.

    Parameters
    ----------
    wavelength_a : numpy.ndarray
        Rest-frame vacuum wavelength, Angstrom, shape (n_pixels,).
    flux : numpy.ndarray
        Flux, shape (n_pixels,) or (n, n_pixels).

    Returns
    -------
    numpy.ndarray or float
        Dimensionless index per spectrum.
    """
    wavelength = np.asarray(wavelength_a, dtype=np.float64)
    flux = np.asarray(flux, dtype=np.float64)
    band = (wavelength >= 7128.0) & (wavelength <= 7137.0)
    reference = (wavelength >= 7044.0) & (wavelength <= 7048.0)
    if not band.any() or not reference.any():
        raise ValueError("wavelength grid does not cover the TiO5 windows (7044-7048 and 7128-7137 A)")
    return flux[..., band].mean(axis=-1) / flux[..., reference].mean(axis=-1)
