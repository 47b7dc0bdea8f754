"""Dask training/inference layers equal the numpy kernels; model save/load round trip."""
from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
import zarr

from lamost_mdwarf.inference import NOT_INFERRED, infer_dataset
from lamost_mdwarf.kernels.cannon_design import compute_label_scaling, design_matrix, scale_labels
from lamost_mdwarf.kernels.cannon_infer import infer_labels, starting_points_from_training
from lamost_mdwarf.kernels.cannon_train import train_pixels
from lamost_mdwarf.kernels.error_model import PAPER_ERROR_MODEL
from lamost_mdwarf.model import CannonModel, ModelFormatError, load_model, save_model
from lamost_mdwarf.training import train_model

NAMES = ("teff", "radius", "mass", "luminosity")


def labels_for(rng, n):
    teff = rng.uniform(2950, 4050, n)
    x = teff / 3500
    radius = -5.63 + 8.53 * x - 3.29 * x**2 + rng.normal(0, 0.01, n)
    mass = -7.06 + 10.84 * x - 4.20 * x**2 + rng.normal(0, 0.01, n)
    lum = radius**2 * (teff / 5772) ** 4
    return np.column_stack([teff, radius, mass, lum])


def simulated(rng, n_train=150, n_test=120, n_pix=240, snr=150.0):
    train_labels, test_labels = labels_for(rng, n_train), labels_for(rng, n_test)
    scaling = compute_label_scaling(train_labels)
    n_terms = design_matrix(np.zeros((1, 4))).shape[1]
    theta = rng.normal(0, 0.02, (n_pix, n_terms))
    theta[:, 0] = 1.0
    theta[:, 1] = rng.normal(0, 0.1, n_pix)
    s2 = (0.003 * rng.random(n_pix)) ** 2

    def draw(labels):
        design = design_matrix(scale_labels(labels, scaling.pivots, scaling.scales))
        mean = design @ theta.T
        sigma = 1 / snr
        flux = mean + rng.normal(0, 1, mean.shape) * np.sqrt(sigma**2 + s2)
        ivar = np.full(mean.shape, 1 / sigma**2)
        ivar[:, rng.choice(n_pix, 10, replace=False)] = 1e-5
        return flux.astype(np.float32), ivar.astype(np.float32)

    return train_labels, draw(train_labels), test_labels, draw(test_labels)


def as_da(array, n_chunk):
    wave = 4500.0 + np.arange(array.shape[1])
    return xr.DataArray(array, dims=("star", "wavelength"), coords={"wavelength": wave}).chunk({"star": n_chunk})


def test_dask_training_equals_numpy_kernel():
    rng = np.random.default_rng(0)
    labels, (flux, ivar), _, _ = simulated(rng)
    model = train_model(as_da(flux, 40), as_da(ivar, 40), labels, NAMES, [f"s{i}" for i in range(len(labels))],
                        pixel_chunk=70)
    scaling = compute_label_scaling(labels)
    direct = train_pixels(design_matrix(scale_labels(labels, scaling.pivots, scaling.scales)), flux, ivar)
    # Equal within the scatter optimiser's tolerance: BLAS sums over sub-blocks round
    # differently, and the s2 root search (tolerance 1e-8 in ln s2) propagates that.
    np.testing.assert_allclose(model.theta, direct.theta, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(model.s2, direct.s2, rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(model.pivots, scaling.pivots)
    assert model.pixel_converged.all()


def test_dask_inference_equals_numpy_kernel_and_skips_inactive():
    rng = np.random.default_rng(1)
    labels, (flux, ivar), test_labels, (tflux, tivar) = simulated(rng)
    model = train_model(as_da(flux, 50), as_da(ivar, 50), labels, NAMES, [f"s{i}" for i in range(len(labels))])
    active = np.ones(len(test_labels), dtype=bool)
    active[[3, 50]] = False
    ds = infer_dataset(as_da(tflux, 25), as_da(tivar, 25), xr.DataArray(active, dims="star"), model).compute()
    starts = starting_points_from_training(model.training_labels)
    direct = infer_labels(tflux[active], tivar[active], model.theta, model.s2, model.pivots, model.scales, starts)
    got = np.column_stack([ds[name].values for name in NAMES])
    np.testing.assert_allclose(got[active], direct.labels, rtol=1e-10)
    np.testing.assert_allclose(ds["chi2"].values[active], direct.chi2, rtol=1e-10)
    np.testing.assert_allclose(ds["teff_err_formal"].values[active], np.sqrt(direct.covariance[:, 0, 0]), rtol=1e-10)
    assert np.all(np.isnan(got[~active])) and np.all(ds["fit_status"].values[~active] == NOT_INFERRED)
    assert ds["teff"].attrs["units"] == "K" and ds["radius_err_formal"].attrs["units"] == "Rsun"
    # Labels recovered to the noise: pulls of order 1.
    pulls = (got[active, 0] - test_labels[active, 0]) / ds["teff_err_formal"].values[active]
    assert 0.6 < np.std(pulls) < 1.6


def test_grid_mismatch_refused():
    rng = np.random.default_rng(2)
    labels, (flux, ivar), _, _ = simulated(rng, n_pix=60)
    model = train_model(as_da(flux, 50), as_da(ivar, 50), labels, NAMES, ["x"] * len(labels))
    other = as_da(flux, 50).assign_coords(wavelength=np.arange(60) + 5000.0)
    with pytest.raises(ValueError, match="grid"):
        infer_dataset(other, other, xr.DataArray(np.ones(len(labels), bool), dims="star"), model)
    with pytest.raises(ValueError, match="cannot constrain"):
        train_model(as_da(flux[:10], 5), as_da(ivar[:10], 5), labels[:10], NAMES, ["x"] * 10)


def test_model_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    labels, (flux, ivar), _, _ = simulated(rng, n_pix=50)
    model = train_model(as_da(flux, 50), as_da(ivar, 50), labels, NAMES, [f"s{i}" for i in range(len(labels))],
                        settings={"continuum": "cannon"})
    model = model.with_error_models({"teff": PAPER_ERROR_MODEL["teff"]})
    path = tmp_path / "model.zarr"
    digest = save_model(model, path)
    back = load_model(path)
    assert back.model_hash == digest == model.model_hash
    np.testing.assert_array_equal(back.theta, model.theta)
    np.testing.assert_array_equal(back.training_labels, model.training_labels)
    assert back.error_models["teff"] == PAPER_ERROR_MODEL["teff"]
    assert back.settings["continuum"] == "cannon" and back.label_names == NAMES
    assert list(back.training_ids[:2]) == ["s0", "s1"]
    save_model(back, path)  # overwriting in place works
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["format_version"] = 7
    with pytest.raises(ModelFormatError, match="format version 7"):
        load_model(path)
    group.attrs["format_version"] = 1
    group["s2"][0] = 123.0
    with pytest.raises(ModelFormatError, match="corrupt"):
        load_model(path)
    with pytest.raises(ModelFormatError, match="no model"):
        load_model(tmp_path / "nothing.zarr")


def test_model_shape_checks():
    with pytest.raises(ValueError, match="theta"):
        CannonModel(NAMES, np.zeros(4), np.ones(4), np.zeros((5, 14)), np.zeros(5), np.arange(5.0),
                    np.array([]), np.zeros((0, 4)), np.ones(5, bool))
