"""Modes: latent-label training, robust clipping, calibrated errors, and the paper mode unchanged."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from lamost_mdwarf.inference import infer_dataset
from lamost_mdwarf.ingest import ingest
from lamost_mdwarf.io.survey_store import open_survey_store
from lamost_mdwarf.kernels.cannon_design import compute_label_scaling, design_matrix, scale_labels
from lamost_mdwarf.kernels.cannon_infer import infer_labels, starting_points_from_training
from lamost_mdwarf.kernels.error_model import error_model_sigma, fit_error_model
from lamost_mdwarf.kernels.label_refinement import (
    PolynomialCalibration,
    anchor_coefficient_covariance,
    apply_calibration,
    calibration_leverage,
    calibration_variance,
    derived_coefficient_covariance,
    derived_label_uncertainty,
    fit_catalog_anchor,
    fit_derived_label,
    quadratic_features,
)
from lamost_mdwarf.kernels.robust import robust_infer_labels
from lamost_mdwarf.kernels.uncertainty import fit_systematic_variance, repeat_pair_scale, repeat_pairs
from lamost_mdwarf.model import load_model
from lamost_mdwarf.modes import MODES, get_mode, mode_from_settings
from lamost_mdwarf.stages.infer import open_results, run_infer
from lamost_mdwarf.stages.preprocess import run_preprocess
from lamost_mdwarf.stages.select import open_selection, run_select
from lamost_mdwarf.stages.train import normalized_spectra, run_train, subset_labels, training_pool_rows
from lamost_mdwarf.stages.validate import run_validate
from lamost_mdwarf.training import train_model

NAMES = ("teff", "radius", "mass", "luminosity")


@pytest.fixture(scope="module")
def both_modes(small_survey, tmp_path_factory, dask_client):
    """The small simulated survey through select, then train/validate/infer in each mode."""
    work = tmp_path_factory.mktemp("modes")
    store = work / "store.zarr"
    ingest(store, [small_survey.spectra_dir], client=dask_client, chunk_stars=256)
    run_preprocess(store)
    run_select(store, small_survey.labels_path)
    out = {"store": store, "work": work, "survey": small_survey}
    for mode in ("paper", "best"):
        model = run_train(store, work / f"model_{mode}.zarr", mode=mode)
        validation = run_validate(store, work / f"model_{mode}.zarr", work / f"validation_{mode}.zarr")
        run_infer(store, work / f"model_{mode}.zarr", work / f"results_{mode}.zarr")
        out[mode] = {"model": model, "validation": validation,
                     "results": open_results(work / f"results_{mode}.zarr").compute()}
    truth = pd.read_csv(small_survey.truth_path).drop_duplicates("spectrum_id").set_index("spectrum_id")
    ids = np.asarray(open_survey_store(store)["spectrum_id"].values).astype(str)
    out["truth"] = truth.loc[ids]
    return out


# --- modes -------------------------------------------------------------------------------

def test_modes_are_recorded_with_model_and_results(both_modes):
    for mode in ("paper", "best"):
        model = load_model(both_modes["work"] / f"model_{mode}.zarr")
        assert mode_from_settings(model.settings) == MODES[mode]
        assert both_modes[mode]["results"].attrs["mode"] == mode
    assert both_modes["best"]["model"].label_names == ("teff", "latent_1", "latent_2")
    assert both_modes["paper"]["model"].label_names == NAMES
    assert mode_from_settings({}) == MODES["paper"]  # models from before the modes existed
    with pytest.raises(ValueError, match="unknown mode"):
        get_mode("fastest")


# --- 1. label-noise-aware training -------------------------------------------------------

def test_latent_training_labels_are_closer_to_truth_than_the_catalog(both_modes):
    model = both_modes["best"]["model"]
    truth = both_modes["truth"]
    sel = open_selection(both_modes["store"])
    ids = np.asarray(open_survey_store(both_modes["store"])["spectrum_id"].values).astype(str)
    rows = np.array([np.flatnonzero(ids == sid)[0] for sid in model.training_ids])
    true_teff = truth["teff"].to_numpy(float)[rows]
    catalog_err = np.std(np.asarray(sel["label_teff"].values)[rows] - true_teff)
    refined_err = np.std(model.training_labels[:, 0] - true_teff)
    assert catalog_err > 100.0  # the catalog's Teff errors are 100-160 K
    assert refined_err < 0.5 * catalog_err, (refined_err, catalog_err)
    # the anchor keeps the scale: refined Teff against the truth has slope ~1, no offset
    slope, intercept = np.polyfit(true_teff, model.training_labels[:, 0], 1)
    assert abs(slope - 1) < 0.08 and abs(np.median(model.training_labels[:, 0] - true_teff)) < 25.0


def test_best_mode_labels_beat_the_paper_mode_against_truth(both_modes):
    truth = both_modes["truth"]
    single = (truth["kind"].astype(str).to_numpy() == "m_dwarf") & ~truth["is_binary"].astype(bool).to_numpy()
    scatter = {}
    for mode in ("paper", "best"):
        res = both_modes[mode]["results"]
        good = (res["flags"].values == 0) & single
        scatter[mode] = {name: np.std(res[name].values[good] - truth[name].to_numpy(float)[good]) for name in NAMES}
    assert scatter["best"]["teff"] < 0.6 * scatter["paper"]["teff"], scatter
    for name in ("radius", "mass", "luminosity"):
        assert scatter["best"][name] <= scatter["paper"][name], (name, scatter)


def test_catalog_anchor_undoes_regression_dilution():
    rng = np.random.default_rng(3)
    true = rng.normal(3450, 250, 4000)
    spectroscopic = true + rng.normal(0, 40, true.size)  # spectroscopic error, independent of the catalog
    err = rng.uniform(100, 160, true.size)
    catalog = true + err * rng.standard_normal(true.size)
    calibration, diagnostics = fit_catalog_anchor(spectroscopic[:, None], catalog, err)
    anchored = apply_calibration(calibration, spectroscopic[:, None])
    naive = np.polyfit(spectroscopic, catalog, 1)[0]  # E[catalog | spectroscopic]: diluted slope
    slope = np.polyfit(true, anchored, 1)[0]
    assert naive < 0.985 and abs(slope - 1) < 0.02, (naive, slope)
    assert 25 < diagnostics.sigma_spectroscopic < 55 and diagnostics.shrinkage < 1
    back = PolynomialCalibration.from_dict(calibration.to_dict())
    np.testing.assert_allclose(apply_calibration(back, spectroscopic[:5, None]), anchored[:5])


def test_derived_label_intrinsic_scatter_from_the_catalog_error_budget():
    rng = np.random.default_rng(4)
    teff = rng.normal(3450, 250, 3000)
    e_teff = rng.uniform(100, 160, teff.size)
    radius = 0.4 * (teff / 3450) ** 3
    dlnr = 3 / teff
    e_radius = radius * np.sqrt((dlnr * e_teff) ** 2 + 0.03**2)  # 3 % intrinsic
    _, intrinsic = fit_derived_label(teff[:, None], radius, e_radius, teff, e_teff)
    assert abs(intrinsic - 0.03) < 0.003


def test_anchor_coefficient_covariance_matches_refits_to_redrawn_catalogs():
    """Brute force: refit the anchor to many redrawn catalogs; the prediction scatter at
    fixed stars equals the propagated coefficient covariance (centre and edge alike)."""
    rng = np.random.default_rng(11)
    n = 600
    x = np.column_stack([rng.normal(3400, 250, n), rng.normal(0, 1, n)])
    truth = x[:, 0] + 30 * x[:, 1] + 20 * x[:, 1] ** 2
    err = rng.uniform(100, 160, n)
    probe = np.array([[3400.0, 0.0], [3900.0, 2.5], [2900.0, -2.5]])  # centre, two edges
    predictions, variances = [], []
    for _ in range(400):
        catalog = truth + err * rng.standard_normal(n)
        calibration, diagnostics = fit_catalog_anchor(x, catalog, err, degree=3)
        predictions.append(apply_calibration(calibration, probe))
        cov = anchor_coefficient_covariance(x, err, calibration, diagnostics)
        variances.append(calibration_variance(calibration, cov, probe))
    empirical = np.var(np.array(predictions), axis=0)
    predicted = np.mean(np.array(variances), axis=0)
    np.testing.assert_allclose(predicted, empirical, rtol=0.2)
    assert predicted[1] > 3 * predicted[0]  # larger at the edge of the calibrating stars
    # non-finite labels give NaN, not an error
    assert np.isnan(calibration_variance(calibration, cov, np.array([[np.nan, 0.0]])))[0]


def test_leverage_corrected_residuals_have_the_noise_variance():
    """A fitted regression absorbs part of its stars' noise; dividing by sqrt(1 - h) undoes it."""
    rng = np.random.default_rng(12)
    n = 60  # few stars per coefficient: the absorption is large
    x = np.column_stack([rng.normal(0, 1, n), rng.normal(0, 1, n)])
    raw, corrected = [], []
    for _ in range(300):
        y = 2.0 + x[:, 0] + rng.standard_normal(n)
        calibration, _ = fit_catalog_anchor(x, y, np.ones(n), degree=3, max_expansion=1.0)
        r = y - apply_calibration(calibration, x)
        raw.append(np.mean(r**2))
        corrected.append(np.mean(r**2 / (1 - calibration_leverage(calibration, x))))
    assert np.mean(raw) < 0.92  # 7 coefficients on 60 stars: ~12 % absorbed
    assert abs(np.mean(corrected) - 1.0) < 0.03


def test_derived_label_error_includes_its_regression_uncertainty():
    rng = np.random.default_rng(13)
    n = 400
    labels = np.column_stack([rng.normal(3400, 250, n), rng.normal(0, 1, n)])
    radius = 0.4 * (labels[:, 0] / 3400) ** 3
    err = 0.03 * radius
    observed = radius * np.exp(0.03 * rng.standard_normal(n))
    calibration, _ = fit_derived_label(labels, observed, err, labels[:, 0], np.full(n, 120.0))
    cov = derived_coefficient_covariance(labels, observed, err, calibration)
    zero = np.zeros((n, 2, 2))
    _, without = derived_label_uncertainty(calibration, labels, zero, 0.0)
    value, with_cov = derived_label_uncertainty(calibration, labels, zero, 0.0, cov)
    np.testing.assert_allclose(without, 0.0)
    features = quadratic_features(labels, calibration.center, calibration.scale, calibration.degree)
    expected = value * np.sqrt(np.einsum("ni,ij,nj->n", features, cov, features))
    np.testing.assert_allclose(with_cov, expected, rtol=1e-10)
    # ~ sqrt(C / N) x 3 % on average
    assert 0.2 < np.mean(with_cov / value) / (0.03 * np.sqrt(features.shape[1] / n)) < 2.0


# --- 2. robust inference -----------------------------------------------------------------

def _synthetic(rng, n_train=200, n_test=60, n_pix=400, snr=100.0):
    teff = rng.uniform(3000, 4000, n_train + n_test)
    other = rng.normal(0, 1, teff.size)
    labels = np.column_stack([teff, other])
    scaling = compute_label_scaling(labels[:n_train])
    theta = rng.normal(0, 0.02, (n_pix, 6))
    theta[:, 0] = 1.0
    theta[:, 1] = rng.normal(0, 0.1, n_pix)
    mean = design_matrix(scale_labels(labels, scaling.pivots, scaling.scales)) @ theta.T
    flux = mean + rng.normal(0, 1 / snr, mean.shape)
    ivar = np.full(mean.shape, snr**2)
    return labels, flux, ivar, n_train


def test_clipping_removes_injected_cosmic_rays_and_leaves_clean_spectra_untouched():
    rng = np.random.default_rng(7)
    labels, flux, ivar, n_train = _synthetic(rng)
    model = train_model(xr.DataArray(flux[:n_train], dims=("star", "wavelength"),
                                     coords={"wavelength": 4500.0 + np.arange(flux.shape[1])}),
                        xr.DataArray(ivar[:n_train], dims=("star", "wavelength")), labels[:n_train],
                        ("teff", "latent_1"), [str(i) for i in range(n_train)])
    test_flux, test_ivar = flux[n_train:], ivar[n_train:]
    hit = np.zeros(test_flux.shape, dtype=bool)
    spiked_flux = test_flux.copy()
    struck = np.arange(test_flux.shape[0]) % 2 == 0
    for i in np.flatnonzero(struck):
        for pos in rng.choice(np.arange(5, test_flux.shape[1] - 5), size=3, replace=False):
            amplitude = rng.uniform(10, 60) / 100.0  # 10-60 sigma at SNR 100
            spiked_flux[i, pos] += amplitude
            hit[i, pos] = True
            if rng.random() < 0.5:
                spiked_flux[i, pos + 1] += 0.5 * amplitude
                hit[i, pos + 1] = True
    starts = starting_points_from_training(labels[:n_train])
    args = (model.theta, model.s2, model.pivots, model.scales, starts)
    robust = robust_infer_labels(spiked_flux, test_ivar, *args)
    clean = infer_labels(test_flux, test_ivar, *args)
    plain = infer_labels(spiked_flux, test_ivar, *args)
    assert np.all(robust.clipped[hit])  # every injected pixel is clipped
    assert np.all(robust.n_clipped[~struck] == 0)  # clean spectra untouched ...
    np.testing.assert_array_equal(robust.result.labels[~struck], plain.labels[~struck])  # ... and unchanged
    assert np.all(robust.n_clipped[struck] >= hit[struck].sum(axis=1))
    assert np.all(robust.n_clipped[struck] <= hit[struck].sum(axis=1) * 3)  # the hit and its neighbours only
    # the refit recovers the clean-spectrum labels; the unclipped fit does not
    err_robust = np.abs(robust.result.labels[struck, 0] - clean.labels[struck, 0])
    err_plain = np.abs(plain.labels[struck, 0] - clean.labels[struck, 0])
    assert np.median(err_robust) < 0.2 * np.median(err_plain)
    assert np.all(robust.result.chi2[struck] < plain.chi2[struck])


def test_pipeline_clips_the_simulated_cosmic_rays(both_modes):
    res = both_modes["best"]["results"]
    truth = both_modes["truth"]
    fitted = res["subset"].values.astype(str) != "excluded"
    rays = truth["n_cosmic_rays"].to_numpy()
    clipped = res["n_clipped"].values > 0
    # about half of the native range lies outside the 4500-7500 A grid, so one ray is on the
    # grid about half the time; with 3-4 rays nearly always
    assert clipped[fitted & (rays >= 3)].mean() > 0.85
    assert clipped[fitted & (rays == 0)].mean() < 0.35  # (emission lines, sky residuals)
    assert np.all(both_modes["paper"]["results"]["n_clipped"].values == 0)
    # after clipping the chi2 cut no longer removes stars for cosmic rays
    chi2_flagged = (res["flags"].values & 2) != 0
    assert chi2_flagged[fitted].mean() < 0.01


# --- 4. calibrated uncertainties ---------------------------------------------------------

def test_systematic_error_is_recovered_through_a_noisy_catalog():
    rng = np.random.default_rng(11)
    n = 20000
    formal = rng.uniform(3, 15, n)
    sys_true = 25.0
    model_error = np.hypot(formal, sys_true) * rng.standard_normal(n)
    catalog_err = rng.uniform(100, 160, n)
    residual = model_error - catalog_err * rng.standard_normal(n)  # model - catalog
    fit = fit_systematic_variance(residual, catalog_err, formal)
    reported = np.hypot(formal, fit.sigma)
    pull = model_error / reported  # against the truth
    assert 0.9 < np.std(pull) < 1.1
    for lo, hi in ((3, 6), (6, 10), (10, 15)):
        sel = (formal >= lo) & (formal < hi)
        assert 0.9 < np.std(pull[sel]) < 1.1
    # ignoring the catalog errors would inflate the error ~5x
    assert np.std(residual) > 4 * fit.sigma
    # a maximum at the boundary still gives a positive posterior-mean estimate
    small = fit_systematic_variance(residual[:300], catalog_err[:300], formal[:300])
    assert small.sigma > 0 and small.variance_error > 0


def test_repeat_pairs_measure_the_formal_error_scale():
    rng = np.random.default_rng(12)
    n = 400
    truth = rng.normal(3400, 250, n)
    systematic = rng.normal(0, 25, n)  # shared by both spectra of a star: cancels in the difference
    formal = rng.uniform(3, 15, (2, n))
    observed = truth + systematic + 1.4 * formal * rng.standard_normal((2, n))  # errors 1.4x the formal
    measured = repeat_pair_scale(observed[0], observed[1], formal[0], formal[1])
    assert abs(measured.scale - 1.4) < 3 * measured.scale_error and measured.n_pairs == n
    assert repeat_pair_scale(observed[0, :5], observed[1, :5], formal[0, :5], formal[1, :5]).scale == 1.0
    i, j = repeat_pairs(np.array([5, 3, 5, -1, 3, 7, 5]))
    assert sorted(zip(i.tolist(), j.tolist())) == [(0, 2), (1, 4)]


def test_best_mode_pulls_against_truth(both_modes):
    """Pulls of the calibrated errors against the simulator's truth (small survey: loose bounds)."""
    res = both_modes["best"]["results"]
    truth = both_modes["truth"]
    single = (truth["kind"].astype(str).to_numpy() == "m_dwarf") & ~truth["is_binary"].astype(bool).to_numpy()
    good = (res["flags"].values == 0) & single
    widths = {}
    for name in NAMES:
        pull = (res[name].values - truth[name].to_numpy(float)) / res[f"{name}_err"].values
        widths[name] = float(np.std(pull[good]))
    paper = both_modes["paper"]["results"]
    good_p = (paper["flags"].values == 0) & single
    paper_pull = (paper["teff"].values - truth["teff"].to_numpy(float)) / paper["teff_err"].values
    paper_teff = float(np.std(paper_pull[good_p]))
    assert paper_teff < 0.8  # the paper's error model includes the catalog's own noise
    for name, width in widths.items():
        assert 0.6 < width < 1.5, widths
    validation = both_modes["best"]["validation"]
    assert validation.systematic["teff"].sigma > 0 and "systematic teff" in validation.format()


def test_best_mode_training_pool_is_capped(both_modes):
    """max_training_stars keeps a seeded random subset of the matched objects (bounded memory)."""
    import dataclasses

    selection = open_selection(both_modes["store"])
    snr = np.asarray(open_survey_store(both_modes["store"])["snr_lambda"].values, dtype=float)
    full = training_pool_rows(selection, snr, dataclasses.replace(MODES["best"], max_training_stars=None))
    assert MODES["best"].max_training_stars == 10_000 and full.size < 10_000
    np.testing.assert_array_equal(training_pool_rows(selection, snr, MODES["best"]), full)
    capped_mode = dataclasses.replace(MODES["best"], max_training_stars=full.size // 2)
    capped = training_pool_rows(selection, snr, capped_mode)
    assert capped.size == full.size // 2 and np.all(np.diff(capped) > 0) and np.isin(capped, full).all()
    np.testing.assert_array_equal(capped, training_pool_rows(selection, snr, capped_mode))  # reproducible
    with pytest.raises(ValueError, match="max_training_stars"):
        dataclasses.replace(MODES["best"], max_training_stars=1)


# --- 3. the paper mode is the paper ------------------------------------------------------

def test_paper_mode_reproduces_the_paper_pipeline(both_modes):
    store, work = both_modes["store"], both_modes["work"]
    model = load_model(work / "model_paper.zarr")
    selection = open_selection(store)
    rows = np.flatnonzero(np.asarray(selection["subset"].values).astype(str) == "training")
    np.testing.assert_array_equal(training_pool_rows(selection, np.zeros(selection.sizes["star"]), MODES["paper"]),
                                  rows)
    flux, ivar = normalized_spectra(store, rows)
    direct = train_model(flux, ivar, subset_labels(selection, rows, NAMES), NAMES, model.training_ids)
    assert direct.model_hash == model.model_hash  # the same model, bit for bit
    # validation: the paper's SNR error model fitted on the plain test step's residuals
    val_rows = np.flatnonzero(np.asarray(selection["subset"].values).astype(str) == "validation")
    vflux, vivar = normalized_spectra(store, val_rows)
    fit = infer_dataset(vflux, vivar, xr.DataArray(np.ones(val_rows.size, bool), dims="star"), direct).compute()
    resid = fit["teff"].values - subset_labels(selection, val_rows, ["teff"])[:, 0]
    snr = np.asarray(open_survey_store(store)["snr_lambda"].values, dtype=float)[val_rows]
    usable = np.isfinite(resid) & (fit["fit_status"].values & 0b1110 == 0)
    expected, _ = fit_error_model(resid[usable], snr[usable],
                                  stars_per_bin=model.settings["validation"]["stars_per_bin"])
    stored = model.error_models["teff"]
    np.testing.assert_allclose([stored.c0, stored.c1, stored.c2, stored.floor],
                               [expected.c0, expected.c1, expected.c2, expected.floor], rtol=1e-12)
    # inference: the plain test step, the SNR error model, no clipping
    res = both_modes["paper"]["results"]
    active = res["subset"].values.astype(str) != "excluded"
    aflux, aivar = normalized_spectra(store)
    plain = infer_labels(np.asarray(aflux.values, float)[active], np.asarray(aivar.values, float)[active],
                         model.theta, model.s2, model.pivots, model.scales,
                         starting_points_from_training(model.training_labels))
    stage = infer_dataset(aflux, aivar, xr.DataArray(active, dims="star"), model).compute()  # the pre-mode path
    for j, name in enumerate(NAMES):
        np.testing.assert_array_equal(res[name].values, stage[name].values)
        # (batches of different sizes stop the optimiser at the same optimum to ~1e-10)
        np.testing.assert_allclose(res[name].values[active], plain.labels[:, j], rtol=1e-8)
        np.testing.assert_allclose(res[f"{name}_err"].values[active],
                                   error_model_sigma(model.error_models[name], res["snr_lambda"].values[active]))
    assert res.attrs["error_mode"] == "error_model"
    assert not np.any(res["flags"].values & (32 | 64))  # best-mode flags never set in paper mode
