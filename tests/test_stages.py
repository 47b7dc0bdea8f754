"""The stages end to end on a small simulated survey: preprocess, select, train, validate, infer."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lamost_mdwarf.errors import PipelineError
from lamost_mdwarf.ingest import ingest
from lamost_mdwarf.io.derived_groups import open_derived_group
from lamost_mdwarf.io.survey_store import open_survey_store
from lamost_mdwarf.kernels.continuum import pseudo_continuum_normalize
from lamost_mdwarf.kernels.masking import mask_spectra
from lamost_mdwarf.model import load_model
from lamost_mdwarf.preprocessing import PreprocessConfig
from lamost_mdwarf.stages.infer import RESULT_FLAGS, open_results, run_infer
from lamost_mdwarf.stages.preprocess import run_preprocess
from lamost_mdwarf.stages.select import open_selection, run_select
from lamost_mdwarf.stages.train import run_train
from lamost_mdwarf.stages.validate import run_validate


@pytest.fixture(scope="module")
def pipeline(small_survey, tmp_path_factory, dask_client):
    work = tmp_path_factory.mktemp("work")
    store = work / "store.zarr"
    ingest(store, [small_survey.spectra_dir], client=dask_client, chunk_stars=256)
    pre = run_preprocess(store)
    selection = run_select(store, small_survey.labels_path)
    model = run_train(store, work / "model.zarr")
    validation = run_validate(store, work / "model.zarr", work / "validation.zarr")
    inferred = run_infer(store, work / "model.zarr", work / "results.zarr")
    return dict(work=work, store=store, pre=pre, selection=selection, model=model, validation=validation,
                inferred=inferred, survey=small_survey)


def test_preprocessed_equals_numpy_kernels(pipeline):
    store = pipeline["store"]
    ds = open_survey_store(store)
    pre = open_derived_group(store, "preprocessed")
    rows = slice(250, 262)  # straddles a chunk boundary
    config = PreprocessConfig()
    wave = ds["wavelength"].values
    masked = mask_spectra(wave, ds["flux"].values[rows], ds["ivar"].values[rows], ds["andmask"].values[rows],
                          ds["ormask"].values[rows], redshift=ds["z"].values[rows], config=config.mask)
    norm = pseudo_continuum_normalize(wave, masked.flux, masked.ivar)
    np.testing.assert_array_equal(pre["pixel_mask"].values[rows], masked.bitmask)
    np.testing.assert_allclose(pre["norm_flux"].values[rows], norm.flux, rtol=1e-6, equal_nan=True)
    # the raw spectra are untouched by preprocessing
    assert np.isnan(ds["flux"].values).any() or np.all(ds["ivar"].values >= 0)


def test_preprocess_is_incremental(pipeline):
    summary = run_preprocess(pipeline["store"])
    assert summary.n_computed == 0


def test_selection_counts_add_up(pipeline):
    sel = open_selection(pipeline["store"])
    counts = sel.attrs["counts"]
    assert sum(counts.values()) == sel.sizes["star"]
    assert counts["training"] > 15 and counts["validation"] > 60 and counts["survey"] > 0
    table = sel.attrs["cut_table"]
    names = [row[0] for row in table]
    assert "no redshift" in names and "blue excess" in names and "training: label outlier" in names


def test_crossmatch_recovers_truth(pipeline):
    survey = pipeline["survey"]
    truth = pd.read_csv(survey.truth_path)
    ds = open_survey_store(pipeline["store"])
    sel = open_selection(pipeline["store"])
    matched = dict(zip(ds["spectrum_id"].values, sel["label_index"].values))
    in_catalog = dict(zip(truth["spectrum_id"], truth["in_label_catalog"]))
    for sid, index in matched.items():
        assert (index >= 0) == bool(in_catalog[sid]), sid


def test_outlier_removal_removes_binaries(pipeline):
    truth = pd.read_csv(pipeline["survey"].truth_path).drop_duplicates("spectrum_id").set_index("spectrum_id")
    ds = open_survey_store(pipeline["store"])
    sel = open_selection(pipeline["store"])
    subset = sel["subset"].values.astype(str)
    ids = ds["spectrum_id"].values.astype(str)
    binary = truth.loc[ids, "is_binary"].to_numpy(bool)
    matched = sel["label_index"].values >= 0
    assert not np.any(binary & (subset == "training"))
    flagged = (sel["selection_flags"].values & 64) != 0
    assert np.all(flagged[binary & matched & ~np.isnan(sel["label_teff"].values)] | ~binary[binary & matched & ~np.isnan(sel["label_teff"].values)])


def test_model_and_validation(pipeline):
    model = load_model(pipeline["work"] / "model.zarr")
    assert set(model.error_models) == {"teff", "radius", "mass", "luminosity"}
    assert model.model_hash == pipeline["model"].model_hash
    summary = pipeline["validation"]
    assert summary.n_stars > 60
    assert 20 < summary.robust_scatter["teff"] < 400
    assert "paper" in summary.format()


def test_every_usable_star_has_finite_labels_or_a_flag(pipeline):
    res = open_results(pipeline["work"] / "results.zarr").compute()
    sel = open_selection(pipeline["store"])
    n = res.sizes["star"]
    assert pipeline["inferred"] == (n, n)
    assert n == open_survey_store(pipeline["store"]).sizes["star"]
    usable = res["subset"].values.astype(str) != "excluded"
    labels = np.column_stack([res[k].values for k in ("teff", "radius", "mass", "luminosity")])
    good = res["flags"].values == 0
    assert good.sum() > 0.5 * usable.sum()
    assert np.all(np.isfinite(labels[good])) and np.all(labels[good] > 0)
    assert np.all(np.isfinite(res["teff_err"].values[good]))
    bad = usable & ~np.all(np.isfinite(labels) & (labels > 0), axis=1)
    assert np.all(res["flags"].values[bad] & RESULT_FLAGS["invalid_labels"])
    assert np.all(res["flag_reason"].values[~good] != "")
    np.testing.assert_array_equal(res["subset"].values.astype(str), sel["subset"].values.astype(str))
    assert res["teff"].attrs["units"] == "K"
    assert res.attrs["model_hash"] == pipeline["model"].model_hash


def test_rerun_infer_computes_nothing(pipeline):
    assert run_infer(pipeline["store"], pipeline["work"] / "model.zarr", pipeline["work"] / "results.zarr") == (0, open_results(pipeline["work"] / "results.zarr").sizes["star"])


def test_missing_stage_errors(tmp_path, small_survey, real_lamost_dir):
    store = tmp_path / "s.zarr"
    ingest(store, [real_lamost_dir / "dr1_original"])
    with pytest.raises(Exception, match="no 'preprocessed' group yet"):
        run_select(store, small_survey.labels_path)
    with pytest.raises(Exception, match="no 'selection' group yet"):
        run_train(store, tmp_path / "m.zarr")
    run_preprocess(store)
    run_select(store, small_survey.labels_path)
    with pytest.raises(PipelineError, match="training stars"):
        run_train(store, tmp_path / "m.zarr")


def test_error_model_floor_falls_back_when_the_quadratic_dips_below_zero():
    """A tiny or noisy validation set must not stop the run: the floor becomes data-driven."""
    from lamost_mdwarf.kernels.error_model import fit_error_model
    from lamost_mdwarf.stages.validate import _fit_error_model_with_fallback

    rng = np.random.default_rng(4)
    snr = np.concatenate([rng.uniform(50, 70, 40), rng.uniform(90, 110, 40), rng.uniform(140, 160, 40),
                          rng.uniform(230, 400, 40)])
    width = np.interp(snr, [50, 100, 150, 230, 400], [300.0, 120.0, 15.0, 15.0, 15.0])
    residual = rng.standard_normal(snr.size) * width
    with pytest.raises(ValueError, match="floor"):
        fit_error_model(residual, snr, stars_per_bin=40)
    model, used = _fit_error_model_with_fallback(residual, snr, 40, 225.0, "quadratic_minimum", "K", "teff")
    assert used == "empirical"
    assert model.floor == pytest.approx(np.std(residual[snr > 225], ddof=1))
    few_high = snr < 225  # no star above the threshold: the smallest binned scatter
    model, used = _fit_error_model_with_fallback(residual[few_high], snr[few_high], 40, 225.0, "quadratic_minimum",
                                                 "K", "teff")
    assert used == "min_binned" and 0 < model.floor < 60
