"""Numerical edge cases: every pixel masked, constant flux, extreme SNR, labels at the edges.

Each must come out flagged with a reason (never a NaN without a flag, never an exception
that stops a chunk).
"""
from __future__ import annotations

import numpy as np
import xarray as xr

from lamost_mdwarf.grid import WavelengthGrid
from lamost_mdwarf.inference import NOT_INFERRED, infer_dataset
from lamost_mdwarf.kernels.cannon_infer import InferenceStatus
from lamost_mdwarf.preprocessing import preprocess_chunk, PreprocessConfig
from lamost_mdwarf.selection import SELECTION_BITS, select_subsets
from lamost_mdwarf.simulate.spectra import synthesize_rest_frame
from lamost_mdwarf.relations import mass_from_teff, radius_from_teff, luminosity_from_radius_teff
from lamost_mdwarf.training import train_model

WAVE = WavelengthGrid().wavelength
NAMES = ("teff", "radius", "mass", "luminosity")


def _edge_spectra():
    n = WAVE.size
    base = synthesize_rest_frame(3400.0, 0.35, 0.35, WAVE) * 100.0
    flux = np.tile(base, (6, 1)).astype(np.float32)
    ivar = np.full((6, n), 1.0, dtype=np.float32)
    ivar[0] = 0.0                      # every pixel masked
    flux[1] = 50.0                     # constant flux
    ivar[2] = 1e12                     # extreme SNR
    flux[3] = np.nan                   # no data at all (e.g. no redshift)
    ivar[3] = 0.0
    flux[4, ::7] = -5.0                # many non-positive pixels
    zeros = np.zeros((6, n), dtype=np.uint16)
    return flux, ivar, zeros, np.zeros(6)


def test_preprocess_edge_cases_never_raise_and_are_flagged():
    flux, ivar, masks, z = _edge_spectra()
    out = preprocess_chunk(WAVE, flux, ivar, masks, masks, z, PreprocessConfig())
    norm_flux, norm_ivar, pixel_mask, slope, n_good, good_fraction, continuum_ok, _ = out
    assert norm_flux.shape == flux.shape and norm_ivar.dtype == np.float32
    assert n_good[0] == 0 and good_fraction[0] == 0 and not continuum_ok[0]
    assert n_good[3] == 0 and not continuum_ok[3]
    assert continuum_ok[1] and np.allclose(norm_flux[1][pixel_mask[1] == 0], 1.0, rtol=1e-5)
    assert continuum_ok[2] and np.all(np.isfinite(norm_ivar[2]))
    assert np.all(norm_ivar >= 0) and not np.any(np.isnan(norm_ivar))
    # NaN normalized flux only where the pixel carries no weight.
    assert np.all(norm_ivar[np.isnan(norm_flux)] == 0)
    # The selection turns the undefined cases into excluded stars with a reason.
    labels = np.full(6, np.nan)
    res = select_subsets(has_redshift=np.ones(6, bool), blue_slope=slope, snr_lambda=np.full(6, 300.0),
                         subclass=np.array(["M3"] * 6, dtype=object), good_fraction=good_fraction,
                         continuum_ok=continuum_ok, label_index=np.full(6, -1), teff=labels, radius=labels,
                         mass=labels, luminosity=labels)
    for row in (0, 3):
        assert res.subset[row] == "excluded"
        assert res.flags[row] & SELECTION_BITS["few_good_pixels"] and "few_good_pixels" in res.reason[row]


def _model(rng):
    teff = rng.uniform(3000, 3900, 200)
    radius, mass = radius_from_teff(teff), mass_from_teff(teff)
    labels = np.column_stack([teff, radius, mass, luminosity_from_radius_teff(radius, teff)])
    flux = np.array([synthesize_rest_frame(t, r, m, WAVE) for t, r, m in labels[:, :3]])
    flux = flux / np.median(flux, axis=1, keepdims=True)
    flux = flux + rng.normal(0, 0.01, flux.shape)
    ivar = np.full(flux.shape, 1e4)
    wave = {"wavelength": WAVE}
    da = lambda a: xr.DataArray(a.astype(np.float32), dims=("star", "wavelength"), coords=wave).chunk({"star": 100})
    return train_model(da(flux), da(ivar), labels, NAMES, [str(i) for i in range(200)]), labels


def test_inference_edge_cases_are_flagged_not_raised():
    rng = np.random.default_rng(0)
    model, labels = _model(rng)
    n = WAVE.size
    good = synthesize_rest_frame(3500.0, 0.4, 0.4, WAVE)
    good = good / np.median(good)
    flux = np.tile(good, (6, 1))
    ivar = np.full((6, n), 1e4)
    ivar[0] = 1e-5                     # every pixel masked (tiny ivar)
    flux[1] = 1.0                      # constant normalized flux
    ivar[2] = 1e14                     # extreme SNR
    flux[3] = np.nan                   # no data
    ivar[3] = 0.0
    edge = labels[np.argmin(labels[:, 0])]
    flux[4] = synthesize_rest_frame(edge[0], edge[1], edge[2], WAVE) / np.median(
        synthesize_rest_frame(edge[0], edge[1], edge[2], WAVE))  # at the cool edge of the training set
    active = np.array([True, True, True, True, True, False])
    da = lambda a: xr.DataArray(a, dims=("star", "wavelength"), coords={"wavelength": WAVE}).chunk({"star": 3})
    ds = infer_dataset(da(flux), da(ivar), xr.DataArray(active, dims="star"), model).compute()
    status = ds["fit_status"].values
    values = np.column_stack([ds[name].values for name in NAMES])
    for row in range(6):
        if not np.all(np.isfinite(values[row])):
            assert status[row] != 0, f"row {row}: NaN labels without a status flag"
    assert status[0] & InferenceStatus.TOO_FEW_PIXELS and status[3] & InferenceStatus.TOO_FEW_PIXELS
    assert status[5] == NOT_INFERRED
    assert np.all(np.isfinite(values[4])) and abs(values[4, 0] - edge[0]) < 150
    assert np.isfinite(ds["chi2"].values[2])
