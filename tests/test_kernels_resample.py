"""The rest-frame resampling kernel against a brute-force loop."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lamost_mdwarf.kernels.resample import NODATA_BIT, resample_to_rest_frame


def brute_force(wave, flux, ivar, andmask, ormask, z, grid):
    rest = wave / (1 + z)
    out_f = np.full(grid.size, np.nan)
    out_i = np.zeros(grid.size)
    out_a = np.zeros(grid.size, np.uint16)
    out_o = np.zeros(grid.size, np.uint16)
    for k, lam in enumerate(grid):
        if lam < rest[0] or lam > rest[-1]:
            out_a[k] = out_o[k] = NODATA_BIT
            continue
        i = max(j for j in range(rest.size - 1) if rest[j] <= lam) if lam < rest[-1] else rest.size - 2
        t = (lam - rest[i]) / (rest[i + 1] - rest[i])
        contrib = [(i, 1 - t), (i + 1, t)]
        f, var, bad = 0.0, 0.0, False
        for j, w in contrib:
            if w <= 0:
                continue
            f += w * flux[j]
            if not (np.isfinite(flux[j]) and np.isfinite(ivar[j]) and ivar[j] > 0):
                bad = True
            else:
                var += w * w / ivar[j]
            out_a[k] |= andmask[j]
            out_o[k] |= ormask[j]
        out_f[k] = f
        out_i[k] = 0.0 if bad or var <= 0 else 1 / var
    return out_f.astype(np.float32), out_i.astype(np.float32), out_a, out_o


def make_native(rng, n=400, coeff0=3.6532, bad_fraction=0.05):
    wave = 10 ** (coeff0 + 1e-4 * np.arange(n))
    flux = rng.normal(100, 10, n).astype(np.float32)
    ivar = rng.uniform(0.5, 2, n).astype(np.float32)
    ivar[rng.random(n) < bad_fraction] = 0
    andmask = (rng.random(n) < 0.05).astype(np.uint16) * 8
    ormask = (rng.random(n) < 0.05).astype(np.uint16) * 4
    return wave, flux, ivar, andmask, ormask


def test_matches_brute_force():
    rng = np.random.default_rng(1)
    wave, flux, ivar, am, om = make_native(rng)
    grid = np.arange(4480.0, 4900.0, 1.0)  # runs past both ends of the native coverage
    got = resample_to_rest_frame(wave, flux, ivar, am, om, 2.5e-4, grid)
    want = brute_force(wave, flux, ivar, am, om, 2.5e-4, grid)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5)
    np.testing.assert_array_equal(got[2], want[2])
    np.testing.assert_array_equal(got[3], want[3])


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(-1e-3, 1e-3))
def test_property_matches_brute_force(seed, z):
    rng = np.random.default_rng(seed)
    wave, flux, ivar, am, om = make_native(rng, n=60, bad_fraction=0.2)
    grid = np.linspace(wave[0] * 0.99, wave[-1] * 1.01, 50)
    got = resample_to_rest_frame(wave, flux, ivar, am, om, z, grid)
    want = brute_force(wave, flux, ivar, am, om, z, grid)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, equal_nan=True)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4)
    np.testing.assert_array_equal(got[2], want[2])


def test_rest_frame_shift_moves_a_line():
    wave = 10 ** (3.6532 + 1e-4 * np.arange(3000))
    z = 3e-4
    line_rest = 6564.6
    flux = 1 - 0.5 * np.exp(-0.5 * ((wave - line_rest * (1 + z)) / 2.0) ** 2)
    grid = np.arange(6500.0, 6600.0, 0.1)
    out, ivar, _, _ = resample_to_rest_frame(wave, flux, np.ones_like(flux), np.zeros(3000, np.uint16),
                                             np.zeros(3000, np.uint16), z, grid)
    # Observed at line*(1+z), 2 A redder; after the shift within half a native pixel (~0.75 A).
    assert abs(grid[np.argmin(out)] - line_rest) < 0.8
    assert np.all(ivar > 0)


def test_variance_propagation_monte_carlo():
    """ivar_out is the inverse of the actual variance of the interpolated flux."""
    rng = np.random.default_rng(3)
    n = 50
    wave = 10 ** (3.6532 + 1e-4 * np.arange(n))
    sigma = rng.uniform(0.5, 2, n)
    grid = np.linspace(wave[1], wave[-2], 37)
    draws = rng.normal(0, sigma, size=(4000, n))
    zeros = np.zeros(n, np.uint16)
    outs = np.array([resample_to_rest_frame(wave, d, 1 / sigma**2, zeros, zeros, 0.0, grid)[0] for d in draws])
    ivar = resample_to_rest_frame(wave, draws[0], 1 / sigma**2, zeros, zeros, 0.0, grid)[1]
    np.testing.assert_allclose(outs.var(axis=0) * ivar, 1.0, atol=0.1)


def test_inputs_not_modified_and_bad_z():
    rng = np.random.default_rng(2)
    arrays = make_native(rng)
    copies = [a.copy() for a in arrays]
    resample_to_rest_frame(*arrays, 1e-4, np.arange(4500.0, 4600.0))
    for a, b in zip(arrays, copies):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="redshift"):
        resample_to_rest_frame(*arrays, np.nan, np.arange(4500.0, 4600.0))
    with pytest.raises(ValueError, match="shape"):
        resample_to_rest_frame(arrays[0], arrays[1][:-1], *arrays[2:], 0.0, np.arange(4500.0, 4600.0))
