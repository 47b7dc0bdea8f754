"""Tests of the bad-pixel mask kernels (lamost_mdwarf.kernels.masking)."""
from __future__ import annotations

import numpy as np
import pytest

from lamost_mdwarf.kernels.masking import (
    DEFAULT_SKY_LINES_VACUUM,
    LAMOST_MASK_BITS,
    MaskBit,
    MaskConfig,
    air_to_vacuum,
    apply_mask,
    mask_spectra,
    pixel_bitmask,
)

GRID = 4500.0 + np.arange(3000, dtype=np.float64)
# A config with no wavelength-based masking, to test the data-driven bits alone.
NO_REGIONS = MaskConfig(telluric_bands=(), spectrograph_join=None, sky_lines=())


def clean_chunk(n_star: int = 3, wavelength: np.ndarray = GRID):
    shape = (n_star, wavelength.size)
    flux = np.full(shape, 100.0, dtype=np.float32)
    ivar = np.full(shape, 0.01, dtype=np.float32)
    andmask = np.zeros(shape, dtype=np.uint16)
    ormask = np.zeros(shape, dtype=np.uint16)
    return flux, ivar, andmask, ormask


def pixel(wavelength: float, grid: np.ndarray = GRID) -> int:
    return int(np.argmin(np.abs(grid - wavelength)))


def has_bit(bits: np.ndarray, bit: MaskBit) -> np.ndarray:
    return (bits & np.uint16(bit)) != 0


# ------------------------------------------------------------------ LAMOST masks


@pytest.mark.parametrize("mode, expect_and, expect_or", [
    ("and", True, False), ("or", False, True), ("both", True, True), ("none", False, False),
])
def test_lamost_mask_modes(mode, expect_and, expect_or):
    flux, ivar, andmask, ormask = clean_chunk()
    andmask[0, 10] = LAMOST_MASK_BITS["BADCCD"]
    ormask[1, 20] = LAMOST_MASK_BITS["BRIGHTSKY"]
    bits = pixel_bitmask(GRID, flux, ivar, andmask, ormask, np.zeros(3),
                         MaskConfig(lamost_mask=mode, telluric_bands=(),
                                    spectrograph_join=None, sky_lines=()))
    assert bits.dtype == np.uint16 and bits.shape == flux.shape
    assert bool(has_bit(bits, MaskBit.LAMOST_AND)[0, 10]) is expect_and
    assert bool(has_bit(bits, MaskBit.LAMOST_OR)[1, 20]) is expect_or
    # Nothing else is flagged.
    bits[0, 10] = bits[1, 20] = 0
    assert not bits.any()


def test_default_lamost_mode_is_and():
    assert MaskConfig().lamost_mask == "and"


def test_lamost_bit_selection_and_float_masks():
    flux, ivar, _, _ = clean_chunk(1)
    andmask = np.zeros(flux.shape, dtype=np.float32)  # LAMOST stores masks as floats
    andmask[0, 5] = LAMOST_MASK_BITS["NOSKY"]
    andmask[0, 6] = LAMOST_MASK_BITS["NODATA"]
    andmask[0, 7] = np.nan
    config = MaskConfig(lamost_bits=LAMOST_MASK_BITS["NOSKY"], telluric_bands=(),
                        spectrograph_join=None, sky_lines=())
    bits = pixel_bitmask(GRID, flux, ivar, andmask, np.zeros_like(andmask), None, config)
    flagged = np.flatnonzero(has_bit(bits[0], MaskBit.LAMOST_AND))
    assert flagged.tolist() == [5]


# ------------------------------------------------------------ data-driven bits


def test_bad_ivar_bit():
    flux, ivar, andmask, ormask = clean_chunk(1)
    ivar[0, [1, 2, 3, 4]] = [0.0, -1.0, np.nan, np.inf]
    bits = pixel_bitmask(GRID, flux, ivar, andmask, ormask, None, NO_REGIONS)
    assert np.flatnonzero(bits[0]).tolist() == [1, 2, 3, 4]
    assert np.all(bits[0, [1, 2, 3, 4]] == MaskBit.BAD_IVAR)


def test_bad_flux_bit_and_nonpositive_option():
    flux, ivar, andmask, ormask = clean_chunk(1)
    flux[0, [1, 2, 3, 4]] = [np.nan, np.inf, 0.0, -5.0]
    bits = pixel_bitmask(GRID, flux, ivar, andmask, ormask, None, NO_REGIONS)
    assert np.flatnonzero(has_bit(bits[0], MaskBit.BAD_FLUX)).tolist() == [1, 2, 3, 4]
    lenient = MaskConfig(mask_nonpositive_flux=False, telluric_bands=(),
                         spectrograph_join=None, sky_lines=())
    bits = pixel_bitmask(GRID, flux, ivar, andmask, ormask, None, lenient)
    assert np.flatnonzero(has_bit(bits[0], MaskBit.BAD_FLUX)).tolist() == [1, 2]


# ------------------------------------------------------- wavelength-based bits


def test_telluric_bands_follow_the_redshift():
    flux, ivar, andmask, ormask = clean_chunk(3)
    z = np.array([0.0, 0.001, np.nan])
    config = MaskConfig(sky_lines=(), spectrograph_join=None)
    bits = pixel_bitmask(GRID, flux, ivar, andmask, ormask, z, config)
    tell = has_bit(bits, MaskBit.TELLURIC)
    # Observed band 6860-6960 A: rest frame [6853.1, 6953.0] A for z = 0.001.
    assert tell[0, pixel(6900)] and tell[1, pixel(6900)]
    assert not tell[0, pixel(6855)] and tell[1, pixel(6855)]
    assert tell[0, pixel(6958)] and not tell[1, pixel(6958)]
    # Unknown z: widened by 300 km/s on both sides ([6853.1, 6967.0] A).
    assert tell[2, pixel(6855)] and tell[2, pixel(6966)] and not tell[2, pixel(6969)]
    # Other default bands in range, and a clean region.
    for wl in (6300.0, 7250.0):
        assert tell[0, pixel(wl)]
    assert not tell[:, pixel(6500)].any()
    assert not (bits & ~np.uint16(MaskBit.TELLURIC)).any()


def test_spectrograph_join():
    flux, ivar, andmask, ormask = clean_chunk(2)
    config = MaskConfig(sky_lines=(), telluric_bands=())
    bits = pixel_bitmask(GRID, flux, ivar, andmask, ormask, np.array([0.0, 0.002]), config)
    join = has_bit(bits, MaskBit.SPECTROGRAPH_JOIN)
    assert join[0, pixel(5800)] and join[0, pixel(6000)] and not join[0, pixel(6001)]
    assert not join[0, pixel(5790)]
    assert join[1, pixel(5790)] and not join[1, pixel(5999)]  # [5788.4, 5988.0] A
    off = pixel_bitmask(GRID, flux, ivar, andmask, ormask, None,
                        MaskConfig(sky_lines=(), telluric_bands=(), spectrograph_join=None))
    assert not off.any()


def test_sky_lines_with_configurable_half_width():
    flux, ivar, andmask, ormask = clean_chunk(1)
    config = MaskConfig(telluric_bands=(), spectrograph_join=None)
    bits = pixel_bitmask(GRID, flux, ivar, andmask, ormask, np.zeros(1), config)
    sky = has_bit(bits[0], MaskBit.SKY_LINE)
    # [O I] 5577.34 air = 5578.89 vacuum; +-3 A -> pixels 5576..5581.
    assert sky[pixel(5576)] and sky[pixel(5581)] and not sky[pixel(5583)]
    wide = MaskConfig(telluric_bands=(), spectrograph_join=None, sky_line_half_width=6.0)
    bits = pixel_bitmask(GRID, flux, ivar, andmask, ormask, np.zeros(1), wide)
    assert has_bit(bits[0], MaskBit.SKY_LINE)[pixel(5583)]
    only_one = MaskConfig(telluric_bands=(), spectrograph_join=None, sky_lines=(6000.0,),
                          sky_line_half_width=0.5)
    bits = pixel_bitmask(GRID, flux, ivar, andmask, ormask, np.zeros(1), only_one)
    assert np.flatnonzero(bits[0]).tolist() == [pixel(6000)]


def test_default_sky_lines_include_the_strong_vacuum_lines():
    for line in (5578.9, 5891.6, 5897.6, 6302.0, 6365.5):
        assert np.min(np.abs(np.array(DEFAULT_SKY_LINES_VACUUM) - line)) < 0.1
    assert list(DEFAULT_SKY_LINES_VACUUM) == sorted(DEFAULT_SKY_LINES_VACUUM)


def test_air_to_vacuum():
    assert air_to_vacuum(5577.34) == pytest.approx(5578.89, abs=0.01)
    assert air_to_vacuum(6562.80) == pytest.approx(6564.61, abs=0.01)  # H alpha


def test_default_mask_fraction_is_modest():
    flux, ivar, andmask, ormask = clean_chunk(1)
    bits = pixel_bitmask(GRID, flux, ivar, andmask, ormask, np.zeros(1))
    fraction = np.count_nonzero(bits) / bits.size
    assert 0.1 < fraction < 0.3  # join 200 + tellurics ~340 + sky lines, of 3000


# ---------------------------------------------------------------- apply_mask


def test_apply_mask_sets_tiny_ivar_and_keeps_inputs():
    flux, ivar, andmask, ormask = clean_chunk(2)
    andmask[0, 100:110] = 1
    flux[1, 200] = np.nan
    raw = [a.copy() for a in (flux, ivar, andmask, ormask)]
    result = mask_spectra(GRID, flux, ivar, andmask, ormask, np.zeros(2))
    for before, after in zip(raw, (flux, ivar, andmask, ormask)):
        np.testing.assert_array_equal(before, after)
    masked = result.bitmask != 0
    assert np.all(result.ivar[masked] == np.float32(1e-5))
    np.testing.assert_array_equal(result.ivar[~masked], ivar[~masked])
    assert result.ivar.dtype == np.float32 and result.flux.dtype == np.float32
    assert np.all(np.isfinite(result.flux))


def test_masked_ivar_is_configurable():
    flux, ivar, andmask, ormask = clean_chunk(1)
    ivar[0, 5] = 0.0
    for value in (1e-8, 0.0, 1e-3):
        config = MaskConfig(masked_ivar=value, telluric_bands=(), spectrograph_join=None,
                            sky_lines=())
        out = mask_spectra(GRID, flux, ivar, andmask, ormask, None, config)
        assert out.ivar[0, 5] == np.float32(value)
        np.testing.assert_array_equal(np.delete(out.ivar[0], 5), np.delete(ivar[0], 5))


def test_flux_fill_interpolates_placeholders_and_keeps_masked_measurements():
    wl = GRID[:20]
    flux = np.linspace(10.0, 29.0, 20)[None, :].copy()
    ivar = np.ones_like(flux)
    flux[0, 5] = np.nan      # no data
    flux[0, 6] = 0.0         # LAMOST placeholder zero
    flux[0, 12] = 999.0      # a finite measurement on a masked pixel: kept
    bitmask = np.zeros(flux.shape, dtype=np.uint16)
    bitmask[0, 5] = bitmask[0, 6] = MaskBit.BAD_FLUX
    bitmask[0, 12] = MaskBit.SKY_LINE
    out_flux, out_ivar = apply_mask(flux, ivar, bitmask, MaskConfig(), wl)
    np.testing.assert_allclose(out_flux[0, [5, 6]], [15.0, 16.0])
    assert out_flux[0, 12] == 999.0
    np.testing.assert_array_equal(np.flatnonzero(out_ivar[0] != 1.0), [5, 6, 12])
    zero_flux, _ = apply_mask(flux, ivar, bitmask, MaskConfig(flux_fill="zero"), wl)
    assert zero_flux[0, 5] == 0.0 and zero_flux[0, 6] == 0.0 and zero_flux[0, 12] == 999.0


def test_flux_fill_edge_cases():
    flux = np.full((3, 10), np.nan)
    flux[1, 3] = 7.0              # one finite value, on a masked pixel
    flux[2, :4] = 5.0             # holes at the end: constant extrapolation
    flux[2, 4:] = np.nan
    ivar = np.ones_like(flux)
    bitmask = np.zeros(flux.shape, dtype=np.uint16)
    bitmask[1, 3] = MaskBit.LAMOST_AND
    out_flux, out_ivar = apply_mask(flux, ivar, bitmask)
    assert np.all(out_flux[0] == 0.0)
    assert np.all(out_flux[1] == 7.0)
    assert np.all(out_flux[2] == 5.0)
    # Non-finite flux masks the pixel even if the bitmask does not say so.
    assert np.all(out_ivar[0] == 1e-5) and out_ivar[2, 0] == 1.0 and out_ivar[2, 9] == 1e-5


def test_output_of_mask_spectra_has_no_nan_for_a_star_without_data():
    flux, ivar, andmask, ormask = clean_chunk(2)
    flux[1] = np.nan
    ivar[1] = 0.0
    andmask[1] = ormask[1] = LAMOST_MASK_BITS["NODATA"]
    out = mask_spectra(GRID, flux, ivar, andmask, ormask, np.array([0.0, np.nan]))
    assert np.all(out.bitmask[1] != 0)
    assert np.all(np.isfinite(out.flux)) and np.all(out.ivar[1] == np.float32(1e-5))


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs", [
    {"lamost_mask": "xor"},
    {"lamost_bits": 70000},
    {"telluric_bands": ((7000.0, 6900.0),)},
    {"spectrograph_join": (6000.0, 5800.0)},
    {"sky_lines": (-1.0,)},
    {"sky_line_half_width": -1.0},
    {"unknown_redshift_margin_kms": float("nan")},
    {"masked_ivar": -1e-5},
    {"flux_fill": "spline"},
])
def test_invalid_config_raises(kwargs):
    with pytest.raises(ValueError):
        MaskConfig(**kwargs)


def test_invalid_inputs_raise():
    flux, ivar, andmask, ormask = clean_chunk(2)
    with pytest.raises(ValueError, match="shape"):
        pixel_bitmask(GRID, flux, ivar[:1], andmask, ormask)
    with pytest.raises(ValueError, match="wavelength"):
        pixel_bitmask(GRID[:-1], flux, ivar, andmask, ormask)
    with pytest.raises(ValueError, match="redshift"):
        pixel_bitmask(GRID, flux, ivar, andmask, ormask, np.array([0.0, -1.0]))
    with pytest.raises(ValueError, match="redshift"):
        pixel_bitmask(GRID, flux, ivar, andmask, ormask, np.zeros(3))
    with pytest.raises(ValueError, match="2-D"):
        pixel_bitmask(GRID, flux[0], ivar[0], andmask[0], ormask[0])
    with pytest.raises(ValueError, match="integer"):
        apply_mask(flux, ivar, np.zeros(flux.shape))
