"""Tests of the per-star quality kernels (lamost_mdwarf.kernels.quality)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lamost_mdwarf.kernels.masking import MaskBit
from lamost_mdwarf.kernels.quality import (
    QualityConfig,
    blue_excess_flag,
    continuum_blue_slope,
    count_good_pixels,
    count_invalid_continuum,
    median_pixel_snr,
    star_quality,
)

GRID = 4500.0 + np.arange(3000, dtype=np.float64)
REAL_DR1 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real" / \
    "lamost" / "dr1_original"


def linear_continuum(slopes_per_1000a: np.ndarray, median_level: float = 100.0):
    """Continua whose median over the grid is ``median_level`` and whose slope, once
    divided by that median, is ``slopes_per_1000a`` per 1000 A."""
    x = (GRID - np.median(GRID)) / 1000.0
    slopes = np.asarray(slopes_per_1000a, dtype=np.float64)[:, None]
    # The median of a linear function over a symmetric grid is its value at the centre;
    # keep the continuum positive by working well within |slope| * 1.5 < 1.
    return median_level * (1.0 + slopes * x[None, :])


def test_count_good_pixels():
    bits = np.zeros((3, 50), dtype=np.uint16)
    bits[0, :10] = MaskBit.TELLURIC
    bits[1] = MaskBit.BAD_IVAR
    bits[2, 7] = MaskBit.SKY_LINE | MaskBit.LAMOST_AND
    np.testing.assert_array_equal(count_good_pixels(bits), [40, 0, 49])
    assert count_good_pixels(bits).dtype == np.int32
    with pytest.raises(ValueError, match="integer"):
        count_good_pixels(bits.astype(float))


def test_count_invalid_continuum():
    continuum = np.ones((2, 10), dtype=np.float32)
    continuum[0, [1, 2, 3, 4]] = [np.nan, 0.0, -1.0, np.inf]
    continuum[1] = np.nan
    np.testing.assert_array_equal(count_invalid_continuum(continuum), [4, 10])


@pytest.mark.parametrize("weighting", ["ivar", "uniform"])
def test_slope_of_linear_continuum_is_recovered(weighting):
    slopes = np.array([-0.5, 0.0, 0.3, 0.6])
    continuum = linear_continuum(slopes).astype(np.float32)
    ivar = np.random.default_rng(0).uniform(0.5, 2.0, continuum.shape)
    weights = ivar if weighting == "ivar" else None
    got = continuum_blue_slope(GRID, continuum, weights)
    np.testing.assert_allclose(got, slopes, atol=1e-6)
    # The wavelength unit is a parameter: per Angstrom the slope is 1000 times smaller.
    per_angstrom = continuum_blue_slope(GRID, continuum, weights, wavelength_unit=1.0)
    np.testing.assert_allclose(per_angstrom, slopes / 1000.0, atol=1e-9)


def test_slope_matches_weighted_polyfit_reference():
    rng = np.random.default_rng(1)
    continuum = 50 + 30 * np.sin(GRID / 300.0)[None, :] + rng.uniform(0, 5, (3, 3000))
    ivar = rng.uniform(0.1, 3.0, (3, 3000))
    ivar[0, 100:300] = 1e-5
    got = continuum_blue_slope(GRID, continuum, ivar, fit_range=(4600.0, 5400.0))
    sel = (GRID >= 4600) & (GRID <= 5400)
    for s in range(3):
        y = continuum[s] / np.median(continuum[s])
        # polyfit's w multiplies the residuals: w = sqrt(ivar) gives ivar weights.
        slope, _ = np.polyfit((GRID[sel] - 5000.0) / 1000.0, y[sel], 1, w=np.sqrt(ivar[s, sel]))
        assert got[s] == pytest.approx(slope, rel=1e-9)


def test_masked_pixels_barely_weigh_in_the_slope():
    continuum = linear_continuum(np.array([0.4]))
    ivar = np.ones_like(continuum)
    spoiled = continuum.copy()
    # Garbage continuum on masked pixels (kept below the median, which is over all
    # defined pixels and so would move if they crossed it) ...
    spoiled[0, 10:200] *= 0.2
    ivar[0, 10:200] = 1e-5               # ... which carry the tiny masked ivar
    assert continuum_blue_slope(GRID, spoiled, ivar)[0] == pytest.approx(0.4, abs=1e-3)
    assert abs(continuum_blue_slope(GRID, spoiled, None)[0] - 0.4) > 0.2


def test_undefined_continuum_gives_nan_slope():
    continuum = linear_continuum(np.array([0.2, 0.2, 0.2]))
    continuum[0] = np.nan                                    # fully masked star
    continuum[1, (GRID >= 4500) & (GRID <= 5500)] = np.nan   # nothing in the fit range
    in_range = np.flatnonzero((GRID >= 4500) & (GRID <= 5500))
    continuum[2, in_range[1:]] = np.nan                      # a single usable pixel
    slope = continuum_blue_slope(GRID, continuum)
    assert np.all(np.isnan(slope))
    assert not blue_excess_flag(slope).any()


def test_blue_excess_flag_flips_at_threshold():
    slopes = np.array([-3.2, -3.0 - 1e-6, -3.0 + 1e-6, -2.8])
    # Slopes of -3 per 1000 A would make a linear continuum negative on the grid, so
    # build slopes / 10 per 1000 A, i.e. `slopes` per 10000 A, and measure in that unit.
    continuum = linear_continuum(slopes / 10.0)
    got = continuum_blue_slope(GRID, continuum, wavelength_unit=10000.0)
    np.testing.assert_allclose(got, slopes, atol=1e-5)
    np.testing.assert_array_equal(blue_excess_flag(got), [True, True, False, False])
    np.testing.assert_array_equal(blue_excess_flag(got, threshold=-3.1),
                                  [True, False, False, False])


def test_blue_excess_of_a_blue_rising_continuum_with_default_units():
    x = (GRID - 4500.0) / 1000.0
    blue = np.where(GRID < 5500, 10.0 - 8.0 * x, 2.0)        # steeply rising to the blue
    red = 0.5 + 0.3 * x                                       # ordinary M dwarf
    q = star_quality(GRID, np.vstack([blue, red]), np.ones((2, 3000)),
                     np.zeros((2, 3000), dtype=np.uint16), np.vstack([blue, red]))
    assert q.continuum_slope[0] == pytest.approx(-4.0, rel=1e-6)  # -8 / median 2
    np.testing.assert_array_equal(q.blue_excess, [True, False])


def test_median_pixel_snr():
    flux = np.full((3, 100), 50.0)
    ivar = np.full((3, 100), 4.0)                # SNR 100 everywhere
    flux[0, :40] = 5.0                           # SNR 10 on 40 % of pixels
    bits = np.zeros((3, 100), dtype=np.uint16)
    bits[1, :60] = MaskBit.TELLURIC              # masked pixels excluded ...
    flux[1, :60] = 1.0                           # ... even though their SNR is low
    ivar[2] = 0.0                                # no good pixel at all
    snr = median_pixel_snr(flux, ivar, bits)
    assert snr[0] == pytest.approx(100.0) and snr[1] == pytest.approx(100.0)
    assert np.isnan(snr[2])
    assert median_pixel_snr(flux, ivar)[1] == pytest.approx(2.0)  # without the mask


def test_star_quality_bundle():
    continuum = linear_continuum(np.array([0.1, 0.2]))
    continuum[1, [0, 1, 2, -3, -2, -1]] = np.nan  # symmetric: the median is unchanged
    bits = np.zeros(continuum.shape, dtype=np.uint16)
    bits[0, :30] = MaskBit.SPECTROGRAPH_JOIN
    ivar = np.ones_like(continuum)
    q = star_quality(GRID, continuum, ivar, bits, continuum, QualityConfig())
    np.testing.assert_array_equal(q.n_good_pixels, [2970, 3000])
    np.testing.assert_array_equal(q.n_invalid_continuum, [0, 6])
    np.testing.assert_allclose(q.continuum_slope, [0.1, 0.2], atol=1e-6)
    assert not q.blue_excess.any()
    assert q.median_snr.shape == (2,)


@pytest.mark.parametrize("kwargs", [
    {"slope_range": (5500.0, 4500.0)},
    {"slope_wavelength_unit": 0.0},
    {"blue_excess_threshold": float("nan")},
    {"slope_weighting": "snr"},
])
def test_invalid_config_raises(kwargs):
    with pytest.raises(ValueError):
        QualityConfig(**kwargs)


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="wavelength"):
        continuum_blue_slope(GRID[:-1], np.ones((1, 3000)))
    with pytest.raises(ValueError, match="shape"):
        median_pixel_snr(np.ones((1, 10)), np.ones((2, 10)))
    with pytest.raises(ValueError, match="2-D"):
        count_invalid_continuum(np.ones(10))


@pytest.mark.skipif(not REAL_DR1.is_dir(), reason="shared real LAMOST data not available")
def test_real_dr1_m_dwarfs_end_to_end():
    """Real DR1 M dwarfs: resample, mask, normalize, quality. Fast == dense continuum,
    no NaN reaches the normalized spectra, no blue excess, plausible per-pixel SNR."""
    from lamost_mdwarf.grid import DEFAULT_GRID
    from lamost_mdwarf.io.lamost_fits import read_lamost_spectrum
    from lamost_mdwarf.kernels.continuum import (pseudo_continuum_dense,
                                                 pseudo_continuum_normalize)
    from lamost_mdwarf.kernels.masking import mask_spectra
    from lamost_mdwarf.kernels.resample import resample_to_rest_frame

    wl = DEFAULT_GRID.wavelength
    rows = []
    for path in sorted(REAL_DR1.glob("spec-*.fits*")):
        spec = read_lamost_spectrum(path)
        rows.append(resample_to_rest_frame(spec.wavelength, spec.flux, spec.ivar,
                                           spec.andmask, spec.ormask, spec.meta["z"], wl)
                    + (spec.meta["z"],))
    assert len(rows) >= 10
    flux, ivar, andmask, ormask, z = (np.array(col) for col in zip(*rows))
    masked = mask_spectra(wl, flux, ivar, andmask, ormask, z)
    norm = pseudo_continuum_normalize(wl, masked.flux, masked.ivar)
    dense = pseudo_continuum_dense(wl, masked.flux, masked.ivar)
    np.testing.assert_allclose(norm.continuum, dense, rtol=1e-5)
    assert np.all(np.isfinite(norm.flux)) and np.all(np.isfinite(norm.ivar))
    q = star_quality(wl, flux, ivar, masked.bitmask, norm.continuum)
    assert np.all(q.n_invalid_continuum == 0)
    assert np.all(np.isfinite(q.continuum_slope)) and not q.blue_excess.any()
    assert np.all((q.median_snr > 3) & (q.median_snr < 100))
    assert np.all(q.n_good_pixels > 1000)
