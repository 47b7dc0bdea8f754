"""Bad-pixel masks for rest-frame LAMOST spectra, and the masked inverse variance (numpy).

Every pixel of a chunk (n_star, n_pixel) gets a uint16 bitmask; a pixel is *masked* when
any bit is set. The bits (:class:`MaskBit`) are:

====  ======================  ==========================================================
bit   name                    set when
====  ======================  ==========================================================
1     ``LAMOST_AND``          the LAMOST ``andmask`` has a counted bit (``"and"``/``"both"``)
2     ``LAMOST_OR``           the LAMOST ``ormask`` has a counted bit (``"or"``/``"both"``)
4     ``BAD_IVAR``            ``ivar <= 0`` or not finite
8     ``BAD_FLUX``            flux not finite, or ``<= 0`` (the latter configurable)
16    ``TELLURIC``            inside a telluric band (O2 gamma, O2 B, H2O, O2 A)
32    ``SPECTROGRAPH_JOIN``   inside the blue/red arm join (5800-6000 A)
64    ``SKY_LINE``            within a half-width of a strong night-sky line
====  ======================  ==========================================================

Which LAMOST mask is honoured is configurable (:attr:`MaskConfig.lamost_mask`). The
default, ``"and"`` (a pixel bad in *every* exposure), is what the code the paper used
does: TheCannon's LAMOST loader (``annayqho/TheCannon``, ``lamost.get_pixmask``) flags
``andmask > 0`` (row 3 of the file) together with non-finite flux, ``ivar <= 0``, the
5800-6000 A join and sky lines (+-3 A, observed frame); it never reads the ormask (bad in
*any* exposure), which can only flag more. (A comment there says the andmask flagged
"over a third of the spectrum" of their DR2 files, and the PyPI release 0.7.3 returns
only the non-finite/``ivar <= 0`` part; the paper states it masked the LAMOST flags,
tellurics and the join, which is what is reproduced here.) In the real DR1 M-dwarf files
of ``shared/data/real`` both masks are almost always 0, and where set the ivar is 0 too.

Telluric bands, the spectrograph join and sky lines are fixed in the *observed* frame,
while the chunk is on a rest-frame grid (``lambda_rest = lambda_obs / (1 + z)``). With
the star's redshift ``z`` each observed interval ``[lo, hi]`` is masked at
``[lo / (1 + z), hi / (1 + z)]``; when ``z`` is NaN it is widened by
:attr:`MaskConfig.unknown_redshift_margin_kms` on both sides instead.

:func:`apply_mask` turns the bitmask into the arrays the continuum and the model use:
masked pixels get a tiny inverse variance (paper: 1e-5) instead of 0, and placeholder
fluxes (non-finite, or LAMOST's zeros at bad pixels) are replaced by values interpolated
from the star's good pixels, so downstream arithmetic meets no NaN and long masked runs
do not drag the pseudo-continuum toward 0. Inputs are never modified.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

__all__ = [
    "DEFAULT_SKY_LINES_VACUUM",
    "DEFAULT_TELLURIC_BANDS_VACUUM",
    "LAMOST_MASK_BITS",
    "MaskBit",
    "MaskConfig",
    "MaskedSpectra",
    "air_to_vacuum",
    "apply_mask",
    "mask_spectra",
    "pixel_bitmask",
]

#: Speed of light, km/s.
_C_KMS = 299_792.458


class MaskBit(enum.IntFlag):
    """Bits of the per-pixel mask (uint16). See the module docstring."""

    LAMOST_AND = 1
    LAMOST_OR = 2
    BAD_IVAR = 4
    BAD_FLUX = 8
    TELLURIC = 16
    SPECTROGRAPH_JOIN = 32
    SKY_LINE = 64


#: LAMOST pixel mask bits (both andmask and ormask): name -> value.
LAMOST_MASK_BITS: dict[str, int] = {
    "BADCCD": 1,
    "BADPROFILE": 2,
    "NOSKY": 4,
    "BRIGHTSKY": 8,
    "BADCENTER": 16,
    "NODATA": 32,
}


def air_to_vacuum(wavelength_air: np.ndarray | float) -> np.ndarray:
    """Convert air wavelengths to vacuum (IAU standard; Morton 2000, via VALD).

    Parameters
    ----------
    wavelength_air : array_like
        Air wavelengths, Angstrom (valid above ~2000 A).

    Returns
    -------
    numpy.ndarray
        Vacuum wavelengths, Angstrom, float64.
    """
    lam = np.asarray(wavelength_air, dtype=np.float64)
    s2 = (1e4 / lam) ** 2
    n = (1.0 + 8.336624212083e-5 + 2.408926869968e-2 / (130.1065924522 - s2)
         + 1.599740894897e-4 / (38.92568793293 - s2))
    return lam * n


# Night-sky emission lines that leave residuals in LAMOST spectra, AIR wavelengths (A):
# [O I] 5577.34, Na I D 5889.95/5895.92, [O I] 6300.30/6363.78, Hg I 4358.34/5460.74
# (street lights; TheCannon masked 4358 and 5460), and the brightest OH Meinel lines
# between 6250 and 7500 A (Osterbrock et al. 1996, rounded to 0.01 A).
_SKY_LINES_AIR = (
    4358.34, 5460.74, 5577.34, 5889.95, 5895.92, 6300.30, 6363.78,
    6257.96, 6287.43, 6306.98, 6329.93, 6498.73, 6533.04, 6553.62, 6577.28, 6604.28,
    6834.01, 6863.96, 6912.62, 6923.22, 6939.52, 6948.94, 6978.45,
    7276.41, 7316.28, 7340.89, 7369.25, 7401.69,
)
#: Default strong sky lines, vacuum Angstrom, observed frame (sorted).
DEFAULT_SKY_LINES_VACUUM: tuple[float, ...] = tuple(
    sorted(round(float(x), 2) for x in air_to_vacuum(np.array(_SKY_LINES_AIR))))

#: Default telluric absorption bands, vacuum Angstrom, observed frame: O2 gamma,
#: O2 B, H2O, and O2 A (the last lies beyond the default 4500-7500 A grid and only
#: matters for a wider grid).
DEFAULT_TELLURIC_BANDS_VACUUM: tuple[tuple[float, float], ...] = (
    (6270.0, 6330.0),
    (6860.0, 6960.0),
    (7160.0, 7340.0),
    (7590.0, 7705.0),
)

_LAMOST_MODES = ("and", "or", "both", "none")
_FLUX_FILLS = ("interpolate", "zero")


@dataclass(frozen=True)
class MaskConfig:
    """Settings of the bad-pixel mask. All wavelengths are vacuum Angstrom.

    Attributes
    ----------
    lamost_mask : {"and", "or", "both", "none"}
        Which LAMOST pixel mask to honour. Default ``"and"`` (TheCannon's LAMOST loader,
        used by the paper): a pixel bad in *every* exposure.
    lamost_bits : int
        Which LAMOST bits count (bitwise OR of :data:`LAMOST_MASK_BITS` values);
        default all of them (``andmask > 0`` as in TheCannon).
    mask_nonpositive_flux : bool
        Also flag finite fluxes ``<= 0`` (``BAD_FLUX``). Default True: LAMOST writes
        flux 0 with ivar > 0 for bad pixels, and an M dwarf has positive flux everywhere
        on the 4500-7500 A grid.
    telluric_bands : tuple of (float, float)
        Observed-frame telluric intervals ``(lo, hi)``, Angstrom.
    spectrograph_join : (float, float) or None
        Observed-frame blue/red arm join to mask (paper: 5800-6000 A); None disables.
    sky_lines : tuple of float
        Observed-frame centres of strong sky lines, Angstrom.
    sky_line_half_width : float
        Half-width masked around each sky line, Angstrom (default 3, as TheCannon;
        about one LAMOST resolution element).
    unknown_redshift_margin_kms : float
        When a star's redshift is NaN, observed-frame intervals are widened by this
        velocity on each side, km/s (default 300: covers M-dwarf radial velocities).
    masked_ivar : float
        Inverse variance given to masked pixels by :func:`apply_mask` (paper: 1e-5), in
        the flux units^-2 of the chunk; must be >= 0 and should be much smaller than
        the ivar of good pixels.
    flux_fill : {"interpolate", "zero"}
        How :func:`apply_mask` treats fluxes that are not measurements. ``"interpolate"``
        (default): every ``BAD_FLUX`` pixel (non-finite flux, or flux <= 0 when
        ``mask_nonpositive_flux``; LAMOST writes flux 0 at its bad pixels) gets the
        linear interpolation between the nearest unmasked pixels of the star (constant
        beyond the ends), so that long masked runs do not drag the pseudo-continuum
        toward 0 around them. ``"zero"``: only non-finite fluxes are replaced, by 0, and
        placeholder zeros are kept, as in the paper's code.
    """

    lamost_mask: Literal["and", "or", "both", "none"] = "and"
    lamost_bits: int = 0xFFFF
    mask_nonpositive_flux: bool = True
    telluric_bands: tuple[tuple[float, float], ...] = DEFAULT_TELLURIC_BANDS_VACUUM
    spectrograph_join: tuple[float, float] | None = (5800.0, 6000.0)
    sky_lines: tuple[float, ...] = DEFAULT_SKY_LINES_VACUUM
    sky_line_half_width: float = 3.0
    unknown_redshift_margin_kms: float = 300.0
    masked_ivar: float = 1e-5
    flux_fill: Literal["interpolate", "zero"] = "interpolate"

    def __post_init__(self) -> None:
        if self.lamost_mask not in _LAMOST_MODES:
            raise ValueError(
                f"lamost_mask must be one of {_LAMOST_MODES}, got {self.lamost_mask!r}")
        if not (isinstance(self.lamost_bits, (int, np.integer))
                and 0 <= int(self.lamost_bits) <= 0xFFFF):
            raise ValueError(
                f"lamost_bits must be an integer in [0, 65535], got {self.lamost_bits!r}")
        for lo, hi in self.telluric_bands:
            _check_interval("telluric band", lo, hi)
        if self.spectrograph_join is not None:
            _check_interval("spectrograph join", *self.spectrograph_join)
        for line in self.sky_lines:
            if not (math.isfinite(line) and line > 0):
                raise ValueError(f"sky line wavelengths must be finite and > 0 A, got {line!r}")
        _check_non_negative("sky_line_half_width", self.sky_line_half_width)
        _check_non_negative("unknown_redshift_margin_kms", self.unknown_redshift_margin_kms)
        _check_non_negative("masked_ivar", self.masked_ivar)
        if self.flux_fill not in _FLUX_FILLS:
            raise ValueError(f"flux_fill must be one of {_FLUX_FILLS}, got {self.flux_fill!r}")


def _check_interval(what: str, lo: float, hi: float) -> None:
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
        raise ValueError(f"{what} must satisfy 0 < lo < hi (Angstrom), got ({lo!r}, {hi!r})")


def _check_non_negative(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")


class MaskedSpectra(NamedTuple):
    """Output of :func:`mask_spectra`; arrays (n_star, n_pixel).

    Attributes
    ----------
    flux : numpy.ndarray
        Fluxes with every non-finite value replaced (same dtype as the input flux).
    ivar : numpy.ndarray
        Inverse variances with masked pixels set to ``MaskConfig.masked_ivar``.
    bitmask : numpy.ndarray
        uint16 :class:`MaskBit` flags.
    """

    flux: np.ndarray
    ivar: np.ndarray
    bitmask: np.ndarray


def _check_chunk(wavelength: np.ndarray, **arrays: np.ndarray) -> tuple[int, int]:
    wavelength = np.asarray(wavelength)
    shape = None
    for name, arr in arrays.items():
        arr = np.asarray(arr)
        if arr.ndim != 2:
            raise ValueError(f"{name} must be 2-D (n_star, n_pixel), got shape {arr.shape}")
        if shape is None:
            shape = arr.shape
        elif arr.shape != shape:
            raise ValueError(f"{name} has shape {arr.shape}, expected {shape}")
    assert shape is not None
    if wavelength.shape != (shape[1],):
        raise ValueError(f"wavelength must have shape ({shape[1]},), got {wavelength.shape}")
    if not np.all(np.isfinite(wavelength)):
        raise ValueError("wavelength grid contains non-finite values")
    return shape


def _observed_interval_mask(wavelength: np.ndarray, redshift: np.ndarray,
                            intervals: np.ndarray, margin_kms: float) -> np.ndarray:
    """Pixels of a rest-frame grid inside observed-frame intervals, per star.

    Parameters
    ----------
    wavelength : (n_pixel,) rest-frame wavelengths, A.
    redshift : (n_star,) z; NaN = unknown (then intervals widened by ``margin_kms``).
    intervals : (k, 2) observed-frame (lo, hi), A.

    Returns
    -------
    (n_star, n_pixel) bool.
    """
    n_star = redshift.shape[0]
    inside = np.zeros((n_star, wavelength.size), dtype=bool)
    if intervals.size == 0 or wavelength.size == 0:
        return inside
    known = np.isfinite(redshift)
    factor = np.where(known, 1.0 + np.where(known, redshift, 0.0), 1.0)
    beta = margin_kms / _C_KMS
    widen_lo = np.where(known, 1.0, 1.0 - beta)
    widen_hi = np.where(known, 1.0, 1.0 + beta)
    lo = intervals[:, 0][None, :] * widen_lo[:, None] / factor[:, None]   # (n_star, k)
    hi = intervals[:, 1][None, :] * widen_hi[:, None] / factor[:, None]
    # Intervals are few (tens): a loop over them keeps memory at n_star x n_pixel.
    for k in range(intervals.shape[0]):
        inside |= (wavelength[None, :] >= lo[:, k:k + 1]) & (wavelength[None, :] <= hi[:, k:k + 1])
    return inside


def pixel_bitmask(wavelength: np.ndarray, flux: np.ndarray, ivar: np.ndarray,
                  andmask: np.ndarray, ormask: np.ndarray,
                  redshift: np.ndarray | None = None,
                  config: MaskConfig = MaskConfig()) -> np.ndarray:
    """Per-pixel bad-pixel flags of a chunk of rest-frame spectra.

    Parameters
    ----------
    wavelength : numpy.ndarray
        Rest-frame vacuum wavelengths, Angstrom, shape (n_pixel,).
    flux : numpy.ndarray
        Fluxes, shape (n_star, n_pixel) (NaN where there is no data).
    ivar : numpy.ndarray
        Inverse variances, flux units^-2, shape (n_star, n_pixel).
    andmask, ormask : numpy.ndarray
        LAMOST pixel masks (integer or float), shape (n_star, n_pixel).
    redshift : numpy.ndarray or None
        Redshift z per star, shape (n_star,) (NaN = unknown); None means all unknown.
    config : MaskConfig
        Mask settings.

    Returns
    -------
    numpy.ndarray
        uint16 flags (:class:`MaskBit`), shape (n_star, n_pixel); 0 = good pixel.

    Raises
    ------
    ValueError
        On inconsistent shapes, a non-finite grid or a redshift <= -1.
    """
    n_star, n_pixel = _check_chunk(wavelength, flux=flux, ivar=ivar, andmask=andmask,
                                   ormask=ormask)
    wavelength = np.asarray(wavelength, dtype=np.float64)
    if redshift is None:
        redshift = np.full(n_star, np.nan)
    redshift = np.asarray(redshift, dtype=np.float64)
    if redshift.shape != (n_star,):
        raise ValueError(f"redshift must have shape ({n_star},), got {redshift.shape}")
    if np.any(redshift[np.isfinite(redshift)] <= -1.0) or np.any(np.isinf(redshift)):
        raise ValueError("redshift must be > -1 (or NaN when unknown)")

    bits = np.zeros((n_star, n_pixel), dtype=np.uint16)
    counted = np.uint16(config.lamost_bits)
    if config.lamost_mask in ("and", "both"):
        bits[(_as_mask_bits(andmask) & counted) != 0] |= np.uint16(MaskBit.LAMOST_AND)
    if config.lamost_mask in ("or", "both"):
        bits[(_as_mask_bits(ormask) & counted) != 0] |= np.uint16(MaskBit.LAMOST_OR)

    ivar = np.asarray(ivar)
    flux = np.asarray(flux)
    with np.errstate(invalid="ignore"):
        bits[~(np.isfinite(ivar) & (ivar > 0))] |= np.uint16(MaskBit.BAD_IVAR)
        bad_flux = ~np.isfinite(flux)
        if config.mask_nonpositive_flux:
            bad_flux |= ~(flux > 0)
    bits[bad_flux] |= np.uint16(MaskBit.BAD_FLUX)

    margin = config.unknown_redshift_margin_kms
    tellurics = np.asarray(config.telluric_bands, dtype=np.float64).reshape(-1, 2)
    bits[_observed_interval_mask(wavelength, redshift, tellurics, margin)] |= \
        np.uint16(MaskBit.TELLURIC)
    if config.spectrograph_join is not None:
        join = np.asarray([config.spectrograph_join], dtype=np.float64)
        bits[_observed_interval_mask(wavelength, redshift, join, margin)] |= \
            np.uint16(MaskBit.SPECTROGRAPH_JOIN)
    lines = np.asarray(config.sky_lines, dtype=np.float64)
    if lines.size:
        half = config.sky_line_half_width
        sky = np.stack([lines - half, lines + half], axis=1)
        bits[_observed_interval_mask(wavelength, redshift, sky, margin)] |= \
            np.uint16(MaskBit.SKY_LINE)
    return bits


def _as_mask_bits(mask: np.ndarray) -> np.ndarray:
    """LAMOST masks as uint16 (they are stored as floats in the files; NaN -> 0)."""
    mask = np.asarray(mask)
    if np.issubdtype(mask.dtype, np.floating):
        mask = np.where(np.isfinite(mask) & (mask > 0), mask, 0.0)
        mask = np.minimum(mask, 0xFFFF)
    return mask.astype(np.uint16)


def apply_mask(flux: np.ndarray, ivar: np.ndarray, bitmask: np.ndarray,
               config: MaskConfig = MaskConfig(),
               wavelength: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Masked inverse variance and finite fluxes for downstream arithmetic.

    Parameters
    ----------
    flux : numpy.ndarray
        Fluxes, shape (n_star, n_pixel). Not modified.
    ivar : numpy.ndarray
        Inverse variances, flux units^-2, same shape. Not modified.
    bitmask : numpy.ndarray
        Flags from :func:`pixel_bitmask` (any non-zero value = masked), same shape.
    config : MaskConfig
        Uses ``masked_ivar`` and ``flux_fill``.
    wavelength : numpy.ndarray or None
        Wavelengths, Angstrom, shape (n_pixel,), for ``flux_fill="interpolate"``; None
        interpolates in pixel index (identical on a uniform grid).

    Returns
    -------
    flux_out : numpy.ndarray
        Copy of ``flux`` (same floating dtype) without placeholder fluxes. With
        ``flux_fill="interpolate"`` every pixel with a non-finite flux or the
        ``BAD_FLUX`` bit gets the linear interpolation (in wavelength) between the
        nearest unmasked pixels of the same star, constant beyond the ends; if the star
        has no unmasked pixel, between its non-placeholder fluxes; if it has none, 0.
        With ``"zero"`` only non-finite fluxes are replaced, by 0. Other fluxes are
        kept, masked or not (as in the paper: masked pixels keep their flux).
    ivar_out : numpy.ndarray
        Copy of ``ivar`` (same floating dtype) with ``config.masked_ivar`` at masked
        pixels, and at any pixel whose flux or ivar is non-finite or whose ivar is <= 0
        even if ``bitmask`` does not flag it.
    """
    flux = np.asarray(flux)
    ivar = np.asarray(ivar)
    bitmask = np.asarray(bitmask)
    if flux.ndim != 2 or ivar.shape != flux.shape or bitmask.shape != flux.shape:
        raise ValueError(
            f"flux {flux.shape}, ivar {ivar.shape} and bitmask {bitmask.shape} must be "
            "equal 2-D shapes (n_star, n_pixel)")
    if not np.issubdtype(bitmask.dtype, np.integer):
        raise ValueError(f"bitmask must be an integer array, got dtype {bitmask.dtype}")
    n_star, n_pixel = flux.shape
    if wavelength is None:
        position = np.arange(n_pixel, dtype=np.float64)
    else:
        position = np.asarray(wavelength, dtype=np.float64)
        if position.shape != (n_pixel,):
            raise ValueError(f"wavelength must have shape ({n_pixel},), got {position.shape}")

    finite_flux = np.isfinite(flux)
    with np.errstate(invalid="ignore"):
        good_ivar = np.isfinite(ivar) & (ivar > 0)
    masked = (bitmask != 0) | ~finite_flux | ~good_ivar

    ivar_dtype = ivar.dtype if np.issubdtype(ivar.dtype, np.floating) else np.float64
    ivar_out = np.where(masked, config.masked_ivar, ivar).astype(ivar_dtype, copy=False)

    flux_dtype = flux.dtype if np.issubdtype(flux.dtype, np.floating) else np.float64
    flux_out = flux.astype(flux_dtype, copy=True)
    if config.flux_fill == "zero":
        flux_out[~finite_flux] = 0.0
        return flux_out, ivar_out

    placeholder = ~finite_flux | ((bitmask & int(MaskBit.BAD_FLUX)) != 0)
    for star in np.flatnonzero(placeholder.any(axis=1)):
        holes = placeholder[star]
        anchors = ~masked[star] & ~holes
        if not anchors.any():
            anchors = ~holes
        if not anchors.any():
            flux_out[star] = 0.0
            continue
        flux_out[star, holes] = np.interp(position[holes], position[anchors],
                                          flux[star, anchors].astype(np.float64))
    return flux_out, ivar_out


def mask_spectra(wavelength: np.ndarray, flux: np.ndarray, ivar: np.ndarray,
                 andmask: np.ndarray, ormask: np.ndarray,
                 redshift: np.ndarray | None = None,
                 config: MaskConfig = MaskConfig()) -> MaskedSpectra:
    """Bitmask plus masked flux and ivar of a chunk, in one call.

    Parameters
    ----------
    wavelength, flux, ivar, andmask, ormask, redshift, config
        As for :func:`pixel_bitmask`.

    Returns
    -------
    MaskedSpectra
        ``(flux, ivar, bitmask)``; see :func:`apply_mask` and :func:`pixel_bitmask`.
    """
    bitmask = pixel_bitmask(wavelength, flux, ivar, andmask, ormask, redshift, config)
    flux_out, ivar_out = apply_mask(flux, ivar, bitmask, config, wavelength)
    return MaskedSpectra(flux_out, ivar_out, bitmask)
