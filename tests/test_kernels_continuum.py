"""Tests of the pseudo-continuum kernels (lamost_mdwarf.kernels.continuum).

The fast kernel is checked against the dense brute-force reference (which builds the
n_pixel x n_pixel Gaussian weight matrix), itself checked against a pixel-by-pixel loop.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamost_mdwarf.kernels import continuum as cont_mod
from lamost_mdwarf.kernels.continuum import (
    gaussian_scale,
    gaussian_weight,
    normalize_by_continuum,
    pseudo_continuum,
    pseudo_continuum_dense,
    pseudo_continuum_normalize,
    uniform_grid_step,
)

GRID = 4500.0 + np.arange(3000, dtype=np.float64)  # the default 4500-7500 A, 1 A grid


def mdwarf_like(n_star: int, wavelength: np.ndarray, seed: int = 0,
                dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Red continuum with deep broad bands, noise, and a realistic ivar."""
    rng = np.random.default_rng(seed)
    x = (wavelength - wavelength[0]) / (wavelength[-1] - wavelength[0])
    level = rng.uniform(50, 500, (n_star, 1))
    tilt = rng.uniform(0.5, 3.0, (n_star, 1))
    smooth = level * (0.2 + tilt * x[None, :])
    bands = np.ones_like(x)
    for centre, width, depth in ((4955, 40, 0.4), (5450, 60, 0.3), (6200, 50, 0.5),
                                 (6700, 80, 0.45), (7100, 60, 0.6)):
        bands = bands * (1 - depth * np.exp(-0.5 * ((wavelength - centre) / width) ** 2))
    true = smooth * bands[None, :]
    sigma = 0.02 * true + 1.0
    flux = true + rng.normal(0.0, 1.0, true.shape) * sigma
    ivar = 1.0 / sigma**2
    return flux.astype(dtype), ivar.astype(dtype)


def loop_reference(wavelength, flux, ivar, width, convention):
    """Eq. 1 evaluated pixel by pixel in plain Python loops (tiny arrays only)."""
    scale = math.sqrt(2.0) * width if convention == "cannon" else width
    out = np.full(flux.shape, np.nan)
    for s in range(flux.shape[0]):
        for i in range(flux.shape[1]):
            num = den = 0.0
            for n in range(flux.shape[1]):
                if not (np.isfinite(flux[s, n]) and np.isfinite(ivar[s, n]) and ivar[s, n] >= 0):
                    continue
                w = math.exp(-((wavelength[i] - wavelength[n]) / scale) ** 2)
                num += float(flux[s, n]) * float(ivar[s, n]) * w
                den += float(ivar[s, n]) * w
            if den > 0 and num / den > 0:
                out[s, i] = num / den
    return out


def assert_close_or_both_nan(fast, dense, rtol):
    fast = np.asarray(fast, dtype=np.float64)
    assert np.array_equal(np.isnan(fast), np.isnan(dense)), "NaN patterns differ"
    ok = ~np.isnan(dense)
    if ok.any():
        rel = np.abs(fast[ok] - dense[ok]) / np.abs(dense[ok])
        assert rel.max() <= rtol, f"max relative difference {rel.max():.3g} > {rtol:g}"


# ----------------------------------------------------------------------------- weights


def test_conventions_differ_by_factor_two_in_exponent():
    dl = np.linspace(-300, 300, 61)
    assert np.allclose(gaussian_weight(dl, 50.0, "cannon"), np.exp(-0.5 * dl**2 / 50.0**2))
    assert np.allclose(gaussian_weight(dl, 50.0, "paper"), np.exp(-(dl**2) / 50.0**2))
    assert np.allclose(gaussian_weight(dl, 50.0, "paper"),
                       gaussian_weight(dl, 50.0 / math.sqrt(2.0), "cannon"))
    assert gaussian_scale(50.0, "cannon") == pytest.approx(math.sqrt(2) * 50.0)
    assert gaussian_scale(50.0, "paper") == pytest.approx(50.0)


def test_paper_convention_equals_cannon_with_width_over_sqrt2():
    flux, ivar = mdwarf_like(4, GRID, seed=3)
    paper = pseudo_continuum(GRID, flux, ivar, 50.0, "paper")
    cannon = pseudo_continuum(GRID, flux, ivar, 50.0 / math.sqrt(2.0), "cannon")
    np.testing.assert_allclose(paper, cannon, rtol=1e-6)
    # ... and the two conventions at the same L really differ.
    other = pseudo_continuum(GRID, flux, ivar, 50.0, "cannon")
    assert np.max(np.abs(other / paper - 1)) > 1e-2


def test_dense_reference_matches_pixel_loop():
    rng = np.random.default_rng(5)
    wl = 5000.0 + 3.0 * np.arange(23)
    flux = rng.uniform(0.5, 2.0, (2, 23))
    ivar = rng.uniform(0.0, 4.0, (2, 23))
    ivar[0, :5] = 0.0
    flux[1, 7] = np.nan
    for convention in ("cannon", "paper"):
        dense = pseudo_continuum_dense(wl, flux, ivar, 7.0, convention)
        np.testing.assert_allclose(dense, loop_reference(wl, flux, ivar, 7.0, convention),
                                   rtol=1e-12)


# ------------------------------------------------------------------ fast == dense


@pytest.mark.parametrize("convention", ["cannon", "paper"])
def test_fast_equals_dense_on_mdwarf_spectra(convention):
    flux, ivar = mdwarf_like(24, GRID, seed=1)
    dense = pseudo_continuum_dense(GRID, flux, ivar, 50.0, convention)
    fast = pseudo_continuum(GRID, flux, ivar, 50.0, convention)
    assert fast.dtype == np.float32 and fast.shape == flux.shape
    assert np.all(np.isfinite(fast))
    assert_close_or_both_nan(fast, dense, rtol=1e-6)


@pytest.mark.parametrize("convention", ["cannon", "paper"])
def test_fast_equals_dense_with_masked_pixels_and_zero_ivar_ends(convention):
    flux, ivar = mdwarf_like(12, GRID, seed=2)
    ivar[:, 1300:1500] = 1e-5          # masked join region (tiny ivar)
    ivar[:, 2360:2540] = 1e-5          # masked H2O band
    ivar[0:4, :700] = 0.0              # long ivar = 0 runs at the blue end ...
    ivar[4:8, -900:] = 0.0             # ... and at the red end
    ivar[8, :40] = 0.0                 # short ones
    ivar[8, -40:] = 0.0
    flux[9, 100:300] = np.nan          # non-finite flux: zero weight
    ivar[10, 500:520] = -1.0           # negative ivar: zero weight
    dense = pseudo_continuum_dense(GRID, flux, ivar, 50.0, convention)
    fast = pseudo_continuum(GRID, flux, ivar, 50.0, convention)
    assert_close_or_both_nan(fast, dense, rtol=1e-6)
    assert np.all(np.isfinite(fast[:, 1000:2000]))


def test_fast_equals_dense_on_non_default_grid():
    wl = 3800.0 + 2.5 * np.arange(1600)  # 3800-7797.5 A at 2.5 A
    flux, ivar = mdwarf_like(10, wl, seed=4, dtype=np.float64)
    ivar[:3, :200] = 0.0
    for width, convention in ((50.0, "cannon"), (20.0, "paper"), (120.0, "cannon")):
        dense = pseudo_continuum_dense(wl, flux, ivar, width, convention)
        fast = pseudo_continuum(wl, flux, ivar, width, convention, method="fast")
        assert fast.dtype == np.float64
        assert_close_or_both_nan(fast, dense, rtol=1e-6)


def test_long_zero_ivar_run_uses_exact_fallback(monkeypatch):
    """Deep inside a 1000-pixel ivar = 0 run the low-rank error bound exceeds the
    target, so those pixels must be recomputed exactly; disabling that breaks it."""
    flux, ivar = mdwarf_like(2, GRID, seed=6, dtype=np.float64)
    ivar[:, :1000] = 0.0
    dense = pseudo_continuum_dense(GRID, flux, ivar)
    calls = []
    original = cont_mod._exact_sums

    def counting(*args):
        calls.append(args[1].size)
        return original(*args)

    monkeypatch.setattr(cont_mod, "_exact_sums", counting)
    fast = pseudo_continuum(GRID, flux, ivar)
    assert calls and sum(calls) > 100
    assert_close_or_both_nan(fast, dense, rtol=1e-6)

    # Without the fallback (no pixel ever flagged) the result is wrong deep in the run.
    monkeypatch.setattr(cont_mod, "_TARGET_RTOL", np.inf)
    broken = pseudo_continuum(GRID, flux, ivar).astype(np.float64)
    with np.errstate(invalid="ignore"):
        rel = np.abs(broken / dense - 1)
    assert not np.array_equal(np.isnan(broken), np.isnan(dense)) or np.nanmax(rel) > 1e-3


def test_error_bound_of_low_rank_operator_holds():
    """|fast sums - exact sums| <= K max|x| for the operator's own bound K."""
    rng = np.random.default_rng(7)
    scale_px = 50.0 * math.sqrt(2.0)
    n_pixel = 3000
    block, reach, n_block = cont_mod._block_layout(scale_px, n_pixel)
    op = cont_mod._gaussian_sum_operator(scale_px, block, reach)
    super_matrix = cont_mod._super_block_translation(scale_px, block, reach)
    x = rng.standard_normal((4, n_block * block))
    x[:, n_pixel:] = 0.0
    x[1] = np.abs(x[1]) * 1e6
    moments = (x.reshape(-1, block) @ op.basis).reshape(4, n_block, -1)
    local = cont_mod._translate(op, super_matrix, moments)
    fast = (local.reshape(-1, op.basis.shape[1]) @ op.basis.T).reshape(4, -1)[:, :n_pixel]
    idx = np.arange(n_pixel)
    exact = x[:, :n_pixel] @ np.exp(-(((idx[:, None] - idx[None, :]) / scale_px) ** 2))
    bound = op.error_per_max * np.abs(x).max(axis=1)
    assert np.all(np.abs(fast - exact).max(axis=1) <= bound)
    assert op.error_per_max < 1e-9 * scale_px * math.sqrt(math.pi)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_star=st.integers(1, 4),
    n_pixel=st.integers(1, 90),
    width_px=st.floats(0.3, 25.0),
    step=st.sampled_from([0.5, 1.0, 2.0]),
    convention=st.sampled_from(["cannon", "paper"]),
    method=st.sampled_from(["fast", "auto", "direct"]),
    seed=st.integers(0, 2**32 - 1),
    zero_fraction=st.floats(0.0, 0.9),
)
def test_property_fast_equals_dense(n_star, n_pixel, width_px, step, convention, method,
                                    seed, zero_fraction):
    rng = np.random.default_rng(seed)
    wl = 6000.0 + step * np.arange(n_pixel)
    flux = rng.uniform(0.1, 10.0, (n_star, n_pixel))
    ivar = rng.uniform(0.0, 5.0, (n_star, n_pixel))
    ivar[rng.random((n_star, n_pixel)) < zero_fraction] = 0.0
    if n_pixel > 4 and rng.random() < 0.3:
        ivar[0, : n_pixel // 2] = 0.0  # a long zero run at one end
    if rng.random() < 0.2:
        ivar[-1] = 1e-5 * ivar[-1]     # a star with only tiny (masked-like) ivar
    width = width_px * step
    dense = pseudo_continuum_dense(wl, flux, ivar, width, convention)
    fast = pseudo_continuum(wl, flux, ivar, width, convention, method=method)
    assert fast.shape == flux.shape
    assert_close_or_both_nan(fast, dense, rtol=1e-6)


# ------------------------------------------------------------- robustness, contract


def test_fully_masked_and_empty_spectra_give_nan_rows_without_error():
    flux, ivar = mdwarf_like(5, GRID, seed=8)
    flux[1] = np.nan                   # no data at all (e.g. no redshift)
    ivar[2] = 0.0                      # every pixel bad
    flux[3] = 0.0                      # all-zero flux: continuum 0 -> undefined
    fast = pseudo_continuum(GRID, flux, ivar)
    assert np.all(np.isnan(fast[1:4]))
    assert np.all(np.isfinite(fast[[0, 4]]))
    result = pseudo_continuum_normalize(GRID, flux, ivar)
    assert np.all(result.flux[1:4] == 1.0) and np.all(result.ivar[1:4] == 0.0)
    assert np.all(np.isfinite(result.flux)) and np.all(np.isfinite(result.ivar))


def test_inputs_not_modified():
    flux, ivar = mdwarf_like(6, GRID, seed=9)
    flux[0, :50] = np.nan
    ivar[1, :30] = -1.0
    ivar[2, 10] = np.inf
    wl = GRID.copy()
    before = (flux.copy(), ivar.copy(), wl.copy())
    for method in ("fast", "direct"):
        pseudo_continuum_normalize(wl, flux, ivar, method=method)
    pseudo_continuum_dense(wl, flux, ivar)
    np.testing.assert_array_equal(flux, before[0])
    np.testing.assert_array_equal(ivar, before[1])
    np.testing.assert_array_equal(wl, before[2])


def test_normalization_formulas():
    rng = np.random.default_rng(10)
    flux = rng.uniform(1, 5, (3, 40)).astype(np.float32)
    ivar = rng.uniform(0.1, 2, (3, 40)).astype(np.float32)
    continuum = rng.uniform(0.5, 3, (3, 40)).astype(np.float32)
    continuum[1, 5] = np.nan
    continuum[2, 7] = -1.0
    norm_flux, norm_ivar = normalize_by_continuum(flux, ivar, continuum)
    assert norm_flux.dtype == np.float32 and norm_ivar.dtype == np.float32
    good = np.isfinite(continuum) & (continuum > 0)
    c64 = continuum.astype(np.float64)
    np.testing.assert_allclose(norm_flux[good], (flux / c64)[good], rtol=1e-6)
    np.testing.assert_allclose(norm_ivar[good], (ivar * c64**2)[good], rtol=1e-6)
    assert norm_flux[1, 5] == 1.0 and norm_ivar[1, 5] == 0.0
    assert norm_flux[2, 7] == 1.0 and norm_ivar[2, 7] == 0.0


def test_normalize_returns_consistent_triplet():
    flux, ivar = mdwarf_like(3, GRID, seed=11)
    result = pseudo_continuum_normalize(GRID, flux, ivar)
    c = result.continuum.astype(np.float64)
    np.testing.assert_allclose(result.flux, flux / c, rtol=1e-6)
    np.testing.assert_allclose(result.ivar, ivar * c**2, rtol=1e-6)
    # The normalized flux of a smooth spectrum scatters around 1.
    assert abs(float(np.median(result.flux)) - 1.0) < 0.1


def test_output_dtypes_follow_inputs():
    flux, ivar = mdwarf_like(2, GRID[:400], seed=12)
    assert pseudo_continuum(GRID[:400], flux, ivar).dtype == np.float32
    assert pseudo_continuum(GRID[:400], flux.astype(np.float64), ivar).dtype == np.float64
    assert pseudo_continuum_dense(GRID[:400], flux, ivar).dtype == np.float64


def test_zero_stars_and_one_pixel():
    assert pseudo_continuum(GRID, np.zeros((0, 3000), np.float32),
                            np.zeros((0, 3000), np.float32)).shape == (0, 3000)
    one = pseudo_continuum(np.array([5000.0]), np.array([[2.0]]), np.array([[1.0]]))
    assert one[0, 0] == pytest.approx(2.0)


def test_non_uniform_grid_is_rejected_but_dense_accepts_it():
    wl = np.sort(np.random.default_rng(13).uniform(4500, 7500, 500))
    flux, ivar = mdwarf_like(2, wl, seed=13)
    with pytest.raises(ValueError, match="not uniform"):
        pseudo_continuum(wl, flux, ivar)
    assert np.all(np.isfinite(pseudo_continuum_dense(wl, flux, ivar)))


@pytest.mark.parametrize("bad_grid, message", [
    (np.array([3.0, 2.0, 1.0]), "strictly increasing"),
    (np.array([1.0, np.nan, 3.0]), "non-finite"),
    (np.zeros((2, 3)), "1-D"),
])
def test_uniform_grid_step_errors(bad_grid, message):
    with pytest.raises(ValueError, match=message):
        uniform_grid_step(bad_grid)


def test_uniform_grid_step_tolerates_rounding():
    wl = 4500.0 + 0.1 * np.arange(30000)
    assert uniform_grid_step(wl) == pytest.approx(0.1)


def test_invalid_arguments_raise_value_error():
    flux, ivar = mdwarf_like(2, GRID[:300], seed=14)
    wl = GRID[:300]
    with pytest.raises(ValueError, match="width"):
        pseudo_continuum(wl, flux, ivar, width=0.0)
    with pytest.raises(ValueError, match="convention"):
        pseudo_continuum(wl, flux, ivar, convention="gauss")
    with pytest.raises(ValueError, match="method"):
        pseudo_continuum(wl, flux, ivar, method="fft")
    with pytest.raises(ValueError, match="2-D"):
        pseudo_continuum(wl, flux[0], ivar[0])
    with pytest.raises(ValueError, match="ivar shape"):
        pseudo_continuum(wl, flux, ivar[:1])
    with pytest.raises(ValueError, match="wavelength"):
        pseudo_continuum(wl[:-1], flux, ivar)
    with pytest.raises(ValueError, match="same shape"):
        normalize_by_continuum(flux, ivar, flux[:1])
