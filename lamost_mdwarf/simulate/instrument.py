"""What LAMOST and the atmosphere do to a spectrum: noise, masks and artefacts.

Pure numpy, one observation at a time on the file's native log-linear grid
(observed frame, vacuum Angstrom). The input is the noise-free stellar spectrum already
Doppler shifted and sampled on that grid (see :mod:`lamost_mdwarf.simulate.spectra`);
:func:`observe` applies, in order:

1. telluric absorption (O2 B 6867-6950 A, O2 A 7594-7700 A, H2O 7160-7340, 8130-8350 and
   > 8900 A), partially corrected, with per-observation strengths;
2. an optional "blue excess" component (exponentially rising to the blue, which makes
   the pseudo-continuum rise strongly below ~5000 A; ~3 % of LAMOST M-dwarf spectra);
3. a smooth flux-calibration error (Legendre polynomial, a few %) and a flux step at
   the blue/red spectrograph join (5800-6000 A), then the arbitrary flux scale;
4. the per-pixel noise: sigma ~ sqrt(flux + floor) scaled, band by band, so that the
   median flux/sigma in u, g, r, i, z equals the requested band SNRs (interpolated
   smoothly in log wavelength between band centres); extra variance at sky lines and
   in the noisy join; flux = model + sigma * N(0, 1); ivar = 1 / sigma^2;
5. sky-line residuals (5578.9, 5891.6/5897.6, 6302.0, 6365.5 A and OH lines > 6800 A),
   BRIGHTSKY in the ormask (and the andmask for the brightest);
6. ivar = 0 runs at both ends, scattered bad pixels and bad-column runs with andmask
   bits (1 BADCCD, 2 BADPROFILE, 4 NOSKY, 8 BRIGHTSKY, 16 BADCENTER, 32 NODATA), some
   flux == 0 pixels with ivar > 0, and occasionally a masked O2 A band or join gap;
7. cosmic rays (1-2 pixel positive spikes, *not* flagged).

The random pixel positions come from the ``rng`` argument; every other number is a
field of :class:`ObservingConditions`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import uniform_filter1d

__all__ = [
    "LAMOST_MASK_BITS",
    "SKY_LINES_A",
    "TELLURIC_BANDS_A",
    "SNR_BANDS_A",
    "JOIN_RANGE_A",
    "ObservingConditions",
    "ObservedSpectrum",
    "native_wavelength",
    "telluric_transmission",
    "blue_excess_flux",
    "flux_calibration_factor",
    "noise_sigma",
    "measure_band_snr",
    "observe",
]

#: LAMOST pixel mask bits.
LAMOST_MASK_BITS = {"BADCCD": 1, "BADPROFILE": 2, "NOSKY": 4, "BRIGHTSKY": 8, "BADCENTER": 16, "NODATA": 32}

#: Night-sky emission lines (vacuum Angstrom, relative brightness): [O I], Na D, OH.
SKY_LINES_A = (
    (5578.89, 1.00), (5891.58, 0.30), (5897.56, 0.25), (6302.05, 0.50), (6365.54, 0.17),
    (6865.0, 0.15), (6925.1, 0.10), (7244.9, 0.15), (7278.4, 0.12), (7318.3, 0.20),
    (7342.9, 0.20), (7371.3, 0.15), (7794.1, 0.25), (7823.4, 0.20), (7853.6, 0.25),
    (7914.7, 0.30), (7966.9, 0.30), (8346.8, 0.40), (8401.6, 0.40), (8432.4, 0.30),
    (8467.6, 0.35), (8507.3, 0.30), (8829.8, 0.50), (8887.0, 0.50), (8922.0, 0.40),
    (8945.6, 0.40), (8990.0, 0.30), (9002.7, 0.40), (9042.6, 0.30),
)

#: Telluric absorption bands in the observed frame (vacuum Angstrom):
#: (name, start, end, e-folding length to the red from the head or None for a smooth
#: band, depth at unit strength).
TELLURIC_BANDS_A = (
    ("O2_B", 6867.0, 6950.0, 30.0, 0.25),
    ("O2_A", 7594.0, 7700.0, 40.0, 0.9),
    ("H2O", 7160.0, 7340.0, None, 0.12),
    ("H2O", 8130.0, 8350.0, None, 0.15),
    ("H2O", 8940.0, 9300.0, None, 0.25),
)

#: Wavelength range (Angstrom) of each LAMOST "quasi-photometric" SNR band.
SNR_BANDS_A = {"u": (3600.0, 4000.0), "g": (4000.0, 5500.0), "r": (5500.0, 6900.0), "i": (6900.0, 8400.0), "z": (8400.0, 9200.0)}
_SNR_BAND_CENTRES_A = {"u": 3850.0, "g": 4750.0, "r": 6200.0, "i": 7650.0, "z": 8750.0}

#: The blue/red spectrograph join, Angstrom (observed frame).
JOIN_RANGE_A = (5800.0, 6000.0)
_INSTRUMENT_RESOLVING_POWER = 1800.0


@dataclass(frozen=True)
class ObservingConditions:
    """Everything about one observation except the random pixel positions.

    Attributes
    ----------
    band_snr : tuple of 5 float
        Target median flux/sigma in u, g, r, i, z (dimensionless, > 0).
    flux_scale : float
        Arbitrary flux scale of the relative flux calibration: the median flux over
        6000-8000 A before calibration errors and telluric absorption (flux units).
    throughput_coeffs : tuple of float
        Legendre coefficients (degree 1..k) of the multiplicative flux-calibration error
        over the file's log-wavelength range (dimensionless, a few 0.01).
    join_step : float
        Fractional flux step of the red arm relative to the blue arm (dimensionless).
    join_centre_a : float
        Wavelength of the join step, Angstrom.
    join_noise : float
        Extra noise factor at the join: sigma is multiplied by up to 1 + join_noise.
    o2_strength, h2o_strength : float
        Residual telluric O2 and H2O absorption strengths (0 = perfectly corrected).
    sky_amplitude : float
        Peak of the brightest sky line, in units of the median continuum sigma.
    sky_residual : float
        RMS fractional sky-subtraction residual of each line.
    blue_excess_amplitude : float
        Blue-excess flux at 4500 A in units of the median stellar flux over 6000-7000 A
        (0 = none).
    blue_excess_scale_a : float
        e-folding length (Angstrom) of the blue excess towards the red.
    n_cosmic_rays : int
        Number of cosmic-ray hits to add.
    """

    band_snr: tuple[float, float, float, float, float]
    flux_scale: float = 1.0
    throughput_coeffs: tuple[float, ...] = ()
    join_step: float = 0.0
    join_centre_a: float = 5900.0
    join_noise: float = 1.0
    o2_strength: float = 0.5
    h2o_strength: float = 0.5
    sky_amplitude: float = 5.0
    sky_residual: float = 0.3
    blue_excess_amplitude: float = 0.0
    blue_excess_scale_a: float = 400.0
    n_cosmic_rays: int = 0

    def __post_init__(self) -> None:
        if len(self.band_snr) != 5 or not all(np.isfinite(s) and s > 0 for s in self.band_snr):
            raise ValueError(f"band_snr must be 5 positive numbers (u, g, r, i, z), got {self.band_snr!r}")
        if not (np.isfinite(self.flux_scale) and self.flux_scale > 0):
            raise ValueError(f"flux_scale must be positive, got {self.flux_scale!r}")
        if self.n_cosmic_rays < 0 or self.blue_excess_amplitude < 0 or self.sky_amplitude < 0:
            raise ValueError("n_cosmic_rays, blue_excess_amplitude and sky_amplitude must be >= 0")


@dataclass
class ObservedSpectrum:
    """One simulated LAMOST spectrum on its native grid.

    Attributes
    ----------
    flux : numpy.ndarray
        Observed flux (arbitrary units), float32.
    ivar : numpy.ndarray
        Inverse variance, flux units^-2, float32; 0 marks bad pixels.
    andmask, ormask : numpy.ndarray
        LAMOST mask bits, float32 (as stored by LAMOST).
    subcontinuum : numpy.ndarray
        Flux divided by a smooth continuum (median ~1), float32 (DR1 row 2).
    model_flux : numpy.ndarray
        The noise-free model including every multiplicative/additive effect, float64.
    n_cosmic_rays : int
        Cosmic rays added.
    """

    flux: np.ndarray
    ivar: np.ndarray
    andmask: np.ndarray
    ormask: np.ndarray
    subcontinuum: np.ndarray
    model_flux: np.ndarray
    n_cosmic_rays: int


def native_wavelength(coeff0: float, coeff1: float, n_pixels: int) -> np.ndarray:
    """LAMOST log-linear wavelength grid, 10**(COEFF0 + COEFF1 * i).

    Parameters
    ----------
    coeff0 : float
        log10 of the first pixel's wavelength (log10 Angstrom).
    coeff1 : float
        Pixel step, dex.
    n_pixels : int
        NAXIS1.

    Returns
    -------
    numpy.ndarray
        Vacuum wavelength, Angstrom, float64.
    """
    if n_pixels <= 0 or coeff1 <= 0:
        raise ValueError(f"need n_pixels > 0 and coeff1 > 0, got {n_pixels}, {coeff1}")
    return 10.0 ** (coeff0 + coeff1 * np.arange(int(n_pixels), dtype=np.float64))


def _instrumental_sigma_a(wavelength_a: np.ndarray) -> np.ndarray:
    return wavelength_a / (_INSTRUMENT_RESOLVING_POWER * 2.0 * np.sqrt(2.0 * np.log(2.0)))


def telluric_transmission(wavelength_a: np.ndarray, o2_strength: float, h2o_strength: float) -> np.ndarray:
    """Atmospheric transmission (observed frame), at LAMOST resolution.

    Parameters
    ----------
    wavelength_a : numpy.ndarray
        Observed vacuum wavelength, Angstrom.
    o2_strength, h2o_strength : float
        Band strengths (>= 0): 1 is a typical uncorrected airmass-1.2 atmosphere.

    Returns
    -------
    numpy.ndarray
        Transmission in (0, 1], same shape as ``wavelength_a``.
    """
    wavelength = np.asarray(wavelength_a, dtype=np.float64)
    if o2_strength < 0 or h2o_strength < 0:
        raise ValueError("telluric strengths must be >= 0")
    tau = np.zeros_like(wavelength)
    for name, start, end, efold, depth in TELLURIC_BANDS_A:
        strength = o2_strength if name.startswith("O2") else h2o_strength
        inside = (wavelength >= start - 20) & (wavelength <= end + 20)
        if not inside.any() or strength == 0:
            continue
        wl = wavelength[inside]
        if efold is not None:
            profile = 0.5 * (1 + np.tanh((wl - start) / 1.5)) * np.exp(-np.clip(wl - start, 0, None) / efold)
            profile *= 0.5 * (1 - np.tanh((wl - end) / 3.0))
        else:
            window = 0.5 * (np.tanh((wl - start) / 15.0) - np.tanh((wl - end) / 15.0))
            profile = window * (0.6 + 0.4 * np.cos(2 * np.pi * (wl - start) / 23.0) ** 2)
        tau[inside] += strength * depth * profile
    return np.exp(-tau)


def blue_excess_flux(wavelength_a: np.ndarray, reference_flux: float, amplitude: float, scale_a: float) -> np.ndarray:
    """Additive "blue excess" component, amplitude * reference * exp(-(lambda - 4500 A) / scale).

    Parameters
    ----------
    wavelength_a : numpy.ndarray
        Wavelength, Angstrom.
    reference_flux : float
        Flux unit of the amplitude (the median stellar flux over 6000-7000 A).
    amplitude : float
        Excess at 4500 A in units of ``reference_flux`` (>= 0).
    scale_a : float
        e-folding length of the excess towards the red, Angstrom (> 0): the smaller, the
        more the excess is confined to the blue.

    Returns
    -------
    numpy.ndarray
        Flux to add, same units as ``reference_flux``.
    """
    if amplitude < 0 or scale_a <= 0:
        raise ValueError("blue-excess amplitude must be >= 0 and scale_a > 0")
    return amplitude * reference_flux * np.exp(-(np.asarray(wavelength_a, dtype=np.float64) - 4500.0) / scale_a)


def flux_calibration_factor(
    wavelength_a: np.ndarray, throughput_coeffs: tuple[float, ...], join_step: float, join_centre_a: float
) -> np.ndarray:
    """Multiplicative relative-flux-calibration error, with the blue/red arm step.

    Parameters
    ----------
    wavelength_a : numpy.ndarray
        Wavelength, Angstrom, increasing.
    throughput_coeffs : tuple of float
        Legendre coefficients of degrees 1, 2, ... over log wavelength mapped to [-1, 1].
    join_step : float
        Fractional step of the red arm (wavelength > ``join_centre_a``).
    join_centre_a : float
        Centre of the 10 A wide transition, Angstrom.

    Returns
    -------
    numpy.ndarray
        Positive factor, dimensionless.
    """
    wavelength = np.asarray(wavelength_a, dtype=np.float64)
    log_wl = np.log10(wavelength)
    x = 2.0 * (log_wl - log_wl[0]) / max(log_wl[-1] - log_wl[0], 1e-12) - 1.0
    poly = np.polynomial.legendre.legval(x, np.concatenate([[1.0], np.asarray(throughput_coeffs, dtype=np.float64)]))
    step = 1.0 + join_step * 0.5 * (1.0 + np.tanh((wavelength - join_centre_a) / 5.0))
    out = poly * step
    if np.any(out <= 0):
        raise ValueError("flux-calibration factor must stay positive; throughput coefficients are too large")
    return out


def noise_sigma(
    model_flux: np.ndarray,
    wavelength_a: np.ndarray,
    band_snr: tuple[float, ...],
    shape: np.ndarray | None = None,
    n_iterations: int = 4,
) -> np.ndarray:
    """Per-pixel flux uncertainty matching the requested ugriz band SNRs.

    The relative shape of sigma is ``shape`` (default sqrt(max(model, 0) + floor), with
    floor = 2 % of the median positive model flux: photon plus sky/read noise). It is
    multiplied by a smooth factor, linear in log wavelength between the band centres
    (constant beyond the outer ones), whose node values are adjusted iteratively until
    median(model / sigma) in each band equals the band SNR.

    Parameters
    ----------
    model_flux : numpy.ndarray
        Noise-free flux on the native grid (flux units).
    wavelength_a : numpy.ndarray
        Wavelength, Angstrom.
    band_snr : tuple of 5 float
        Target SNR in u, g, r, i, z (> 0).
    shape : numpy.ndarray, optional
        Relative noise shape (> 0, arbitrary units), e.g. with extra sky variance.
    n_iterations : int, optional
        Calibration iterations (the band medians converge to ~1 % in 3-4).

    Returns
    -------
    numpy.ndarray
        sigma, flux units, > 0 everywhere.
    """
    model = np.asarray(model_flux, dtype=np.float64)
    wavelength = np.asarray(wavelength_a, dtype=np.float64)
    if shape is None:
        positive = model[model > 0]
        floor = 0.02 * (np.median(positive) if positive.size else 1.0) + 1e-30
        shape = np.sqrt(np.clip(model, 0.0, None) + floor)
    shape = np.asarray(shape, dtype=np.float64)
    if shape.shape != model.shape or not np.all(shape > 0):
        raise ValueError("shape must be positive and match model_flux")
    log_wavelength = np.log10(wavelength)
    centres, targets, members = [], [], []
    for (band, (lo, hi)), snr in zip(SNR_BANDS_A.items(), band_snr):
        inside = (wavelength >= lo) & (wavelength < hi)
        if inside.sum() < 5:
            continue
        centres.append(np.log10(_SNR_BAND_CENTRES_A[band]))
        targets.append(float(snr))
        members.append(inside)
    if not centres:
        raise ValueError("the wavelength grid covers none of the ugriz SNR bands")
    log_nodes = np.zeros(len(centres))
    sigma = shape
    for _ in range(max(1, int(n_iterations))):
        sigma = shape * 10 ** np.interp(log_wavelength, centres, log_nodes)
        for k, (inside, target) in enumerate(zip(members, targets)):
            achieved = np.median(model[inside] / sigma[inside])
            if achieved > 0:
                log_nodes[k] += np.log10(achieved / target)
    return shape * 10 ** np.interp(log_wavelength, centres, log_nodes)


def measure_band_snr(flux: np.ndarray, ivar: np.ndarray, wavelength_a: np.ndarray) -> dict[str, float]:
    """Median flux * sqrt(ivar) over good pixels in each ugriz band (LAMOST's definition).

    Parameters
    ----------
    flux : numpy.ndarray
        Flux.
    ivar : numpy.ndarray
        Inverse variance; pixels with ivar <= 0 are ignored.
    wavelength_a : numpy.ndarray
        Wavelength, Angstrom.

    Returns
    -------
    dict
        Band name -> SNR (NaN if the band has no good pixel).
    """
    flux = np.asarray(flux, dtype=np.float64)
    ivar = np.asarray(ivar, dtype=np.float64)
    wavelength = np.asarray(wavelength_a, dtype=np.float64)
    out = {}
    for band, (lo, hi) in SNR_BANDS_A.items():
        good = (wavelength >= lo) & (wavelength < hi) & (ivar > 0)
        out[band] = float(np.median(flux[good] * np.sqrt(ivar[good]))) if good.any() else float("nan")
    return out


def _sky_lines(wavelength: np.ndarray) -> list[tuple[slice, float, np.ndarray]]:
    """Sky lines on this grid: (pixel window, relative brightness, Gaussian profile of peak 1)."""
    key = (float(wavelength[0]), float(wavelength[-1]), int(wavelength.size))
    cached = _SKY_CACHE.get(key)
    if cached is None:
        if len(_SKY_CACHE) > 256:
            _SKY_CACHE.clear()
        cached = _SKY_CACHE[key] = _compute_sky_lines(wavelength)
    return cached


_SKY_CACHE: dict[tuple[float, float, int], list[tuple[slice, float, np.ndarray]]] = {}


def _compute_sky_lines(wavelength: np.ndarray) -> list[tuple[slice, float, np.ndarray]]:
    sigma = _instrumental_sigma_a(wavelength)
    out = []
    for centre, bright in SKY_LINES_A:
        if centre < wavelength[0] or centre > wavelength[-1]:
            continue
        width = 6.0 * float(np.interp(centre, wavelength, sigma))
        lo, hi = np.searchsorted(wavelength, (centre - width, centre + width))
        window = slice(int(lo), int(hi))
        profile = np.exp(-0.5 * ((wavelength[window] - centre) / sigma[window]) ** 2)
        profile.setflags(write=False)
        out.append((window, bright, profile))
    return out


def _random_runs(rng: np.random.Generator, n_pixels: int, n_runs: int, min_len: int, max_len: int, lo: int, hi: int) -> list[slice]:
    runs = []
    if hi - lo <= max_len + 1:
        return runs
    for _ in range(n_runs):
        length = int(rng.integers(min_len, max_len + 1))
        start = int(rng.integers(lo, hi - length))
        runs.append(slice(start, start + length))
    return runs


def observe(
    stellar_flux: np.ndarray,
    wavelength_a: np.ndarray,
    conditions: ObservingConditions,
    rng: np.random.Generator,
) -> ObservedSpectrum:
    """Turn a noise-free observed-frame spectrum into a LAMOST-like one.

    Parameters
    ----------
    stellar_flux : numpy.ndarray
        Noise-free stellar flux on the native grid, already Doppler shifted (any units:
        it is rescaled so that its median over 6000-8000 A equals ``flux_scale``).
    wavelength_a : numpy.ndarray
        The native observed-frame vacuum wavelength grid, Angstrom.
    conditions : ObservingConditions
        Every non-random parameter of the observation.
    rng : numpy.random.Generator
        Source of the noise and of the artefact positions.

    Returns
    -------
    ObservedSpectrum

    Raises
    ------
    ValueError
        If the arrays differ in length or the flux is not finite.
    """
    wavelength = np.asarray(wavelength_a, dtype=np.float64)
    star = np.asarray(stellar_flux, dtype=np.float64)
    if star.shape != wavelength.shape or star.ndim != 1:
        raise ValueError(f"stellar_flux {star.shape} and wavelength {wavelength.shape} must be equal 1-D shapes")
    if not np.all(np.isfinite(star)):
        raise ValueError("stellar_flux must be finite")
    n_pixels = wavelength.size
    c = conditions
    # the flux scale refers to the stellar flux normalised to a median of 1 over 6000-8000 A
    red_window = (wavelength >= 6000.0) & (wavelength <= 8000.0)
    level = float(np.median(star[red_window] if red_window.any() else star))
    if not level > 0:
        raise ValueError("stellar_flux must be positive over 6000-8000 A")
    star = star / level

    # 1-3: atmosphere, blue excess, calibration, scale
    model = star * telluric_transmission(wavelength, c.o2_strength, c.h2o_strength)
    if c.blue_excess_amplitude > 0:
        red = (wavelength >= 6000.0) & (wavelength <= 7000.0)
        reference = float(np.median(star[red])) if red.any() else float(np.median(star))
        model = model + blue_excess_flux(wavelength, reference, c.blue_excess_amplitude, c.blue_excess_scale_a)
    model = model * flux_calibration_factor(wavelength, c.throughput_coeffs, c.join_step, c.join_centre_a)
    model = model * c.flux_scale

    # 4: noise. Relative shape: photons + sky/read floor, sky-line photons, noisy join;
    # then scaled so that the band medians of model / sigma equal the band SNRs.
    positive = model[model > 0]
    floor = 0.02 * (np.median(positive) if positive.size else 1.0) + 1e-30
    shape = np.sqrt(np.clip(model, 0.0, None) + floor)
    red = wavelength > 6000.0
    shape_continuum = float(np.median(shape[red] if red.any() else shape))
    sky_lines = _sky_lines(wavelength)
    sky_shape = np.zeros(n_pixels)
    for window, bright, profile in sky_lines:
        sky_shape[window] += c.sky_amplitude * bright * profile
    join_lo, join_hi = JOIN_RANGE_A
    join_window = 0.25 * (1 + np.tanh((wavelength - join_lo) / 15.0)) * (1 - np.tanh((wavelength - join_hi) / 15.0))
    shape = np.sqrt(shape**2 + 2.0 * sky_shape * shape_continuum**2) * (1.0 + c.join_noise * join_window)
    sigma = noise_sigma(model, wavelength, c.band_snr, shape=shape)
    sigma_continuum = float(np.median(sigma[red] if red.any() else sigma))
    sky_total = sky_shape * sigma_continuum  # sky-line flux, in flux units
    flux = model + sigma * rng.standard_normal(n_pixels)

    # 5: sky residuals
    ormask = np.zeros(n_pixels, dtype=np.int64)
    andmask = np.zeros(n_pixels, dtype=np.int64)
    if sky_lines:
        residual = c.sky_residual * rng.standard_normal(len(sky_lines))
        for (window, bright, profile), factor in zip(sky_lines, residual):
            flux[window] += factor * c.sky_amplitude * sigma_continuum * bright * profile
        ormask[sky_total > 3.0 * sigma_continuum] |= LAMOST_MASK_BITS["BRIGHTSKY"]
        andmask[sky_total > 15.0 * sigma_continuum] |= LAMOST_MASK_BITS["BRIGHTSKY"]

    # 6: ivar = 0 runs at both ends, bad pixels and masks
    lead = int(np.clip(rng.lognormal(np.log(220.0), 0.7), 15, 900))
    trail = int(rng.integers(20, 61)) if rng.random() < 0.9 else int(rng.integers(60, 220))
    lead, trail = min(lead, n_pixels // 4), min(trail, n_pixels // 4)

    ivar = 1.0 / sigma**2
    ivar[:lead] = 0.0
    ivar[n_pixels - trail:] = 0.0
    flux[n_pixels - min(trail, int(rng.integers(3, 12))):] = 0.0
    if rng.random() < 0.3:
        andmask[:lead] |= LAMOST_MASK_BITS["NODATA"]
        andmask[n_pixels - trail:] |= LAMOST_MASK_BITS["NODATA"]
    interior = (lead, n_pixels - trail)
    scattered = rng.choice(np.arange(*interior), size=int(rng.poisson(8)), replace=False)
    ivar[scattered] = 0.0
    zero_flux_bad = scattered[rng.random(scattered.size) < 0.3]
    flux[zero_flux_bad] = 0.0
    if rng.random() < 0.2:
        zero_good = rng.choice(np.arange(*interior), size=int(rng.integers(1, 6)), replace=False)
        flux[zero_good] = 0.0  # flux == 0 with ivar > 0, as in real files
    if rng.random() < 0.3:
        for run in _random_runs(rng, n_pixels, int(rng.integers(1, 4)), 3, 30, *interior):
            bit = LAMOST_MASK_BITS["BADCCD"] if rng.random() < 0.6 else LAMOST_MASK_BITS["BADPROFILE"]
            andmask[run] |= bit
            ormask[run] |= bit
            ivar[run] = 0.0
    if rng.random() < 0.15:
        for run in _random_runs(rng, n_pixels, int(rng.integers(1, 3)), 5, 60, *interior):
            ormask[run] |= LAMOST_MASK_BITS["NOSKY"] if rng.random() < 0.5 else LAMOST_MASK_BITS["BADCENTER"]
    if rng.random() < 0.3:
        a_band = (wavelength >= 7590.0) & (wavelength <= 7690.0)
        ivar[a_band] = 0.0
    if rng.random() < 0.03:
        gap = (wavelength >= float(rng.uniform(5560.0, 5700.0))) & (wavelength <= float(rng.uniform(5880.0, 5920.0)))
        ivar[gap] = 0.0
        flux[gap] = 0.0
    ormask |= andmask

    # 7: cosmic rays, unflagged, within the usable range; drawn last so that they do not
    # change any other random draw
    n_cr = int(c.n_cosmic_rays)
    if n_cr:
        positions = rng.choice(np.arange(lead + 2, n_pixels - trail - 2), size=n_cr, replace=False)
        for position in positions:
            amplitude = max(float(rng.uniform(8.0, 60.0)) * sigma[position], float(rng.uniform(0.3, 2.0)) * abs(model[position]))
            flux[position] += amplitude
            if rng.random() < 0.4:
                flux[position + 1] += amplitude * float(rng.uniform(0.2, 0.8))

    # smooth pipeline-like continuum: two passes of a 75-pixel running mean
    continuum = uniform_filter1d(uniform_filter1d(model, 75, mode="nearest"), 75, mode="nearest")
    with np.errstate(divide="ignore", invalid="ignore"):
        subcontinuum = np.where((ivar > 0) & (continuum > 0), flux / continuum, 1.0)

    return ObservedSpectrum(
        flux=flux.astype(np.float32),
        ivar=ivar.astype(np.float32),
        andmask=andmask.astype(np.float32),
        ormask=ormask.astype(np.float32),
        subcontinuum=subcontinuum.astype(np.float32),
        model_flux=model,
        n_cosmic_rays=n_cr,
    )
