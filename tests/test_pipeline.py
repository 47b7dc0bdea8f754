"""The whole pipeline: run, rerun does nothing, new release appends, interruption resumes, queries."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

import lamost_mdwarf
from lamost_mdwarf.pipeline import run_pipeline


@pytest.fixture(scope="module")
def two_releases(small_survey, tmp_path_factory, dask_client):
    """First run on DR1+DR7 files, then a second release (the DR9 files)."""
    work = tmp_path_factory.mktemp("pipeline") / "work"
    spectra = small_survey.spectra_dir
    first = run_pipeline([spectra / "dr1", spectra / "dr7"], small_survey.labels_path, work, dask_client,
                         make_figures=False)
    rows_first = lamost_mdwarf.open_results(work / "results.zarr").compute()
    again = run_pipeline([spectra / "dr1", spectra / "dr7"], small_survey.labels_path, work, dask_client,
                         make_figures=False)
    second = run_pipeline([spectra], small_survey.labels_path, work, dask_client, release="DR9-test",
                          make_figures=False)
    return dict(work=work, first=first, again=again, second=second, rows_first=rows_first, survey=small_survey)


def test_first_run_runs_every_stage(two_releases):
    first = two_releases["first"]
    assert first.stages_run == ["ingest", "preprocess", "select", "train", "validate", "infer", "catalog"]
    work = two_releases["work"]
    for name in ("store.zarr", "model.zarr", "validation.zarr", "results.zarr", "catalog.fits", "catalog.csv",
                 "run.log"):
        assert (work / name).exists(), name
    assert "validation:" in first.validation_text and "paper" in first.validation_text
    assert "no redshift" in first.format()


def test_rerun_does_nothing(two_releases):
    again = two_releases["again"]
    assert again.stages_run == []
    assert "everything up to date" in again.format()


def test_new_release_appends_only_new_rows(two_releases):
    second, work = two_releases["second"], two_releases["work"]
    assert "train" not in second.stages_run and "validate" not in second.stages_run
    assert "ingest" in second.stages_run and "infer" in second.stages_run
    before = two_releases["rows_first"]
    after = lamost_mdwarf.open_results(work / "results.zarr").compute()
    n0 = before.sizes["star"]
    assert after.sizes["star"] == n0 + second.n_new_spectra > n0
    # The rows of the first release are unchanged; the new ones carry the new release label.
    for name in ("teff", "radius", "chi2", "flags"):
        np.testing.assert_array_equal(after[name].values[:n0], before[name].values, err_msg=name)
    assert set(after["release"].values[n0:].astype(str)) == {"DR9-test"}
    assert set(after["release"].values[:n0].astype(str)) <= {"DR1", "DR7"}
    assert len(set(after["model_version"].values.astype(str))) == 1
    catalog = Table.read(work / "catalog.csv")
    assert len(catalog) == int((after["flags"].values == 0).sum())
    assert list(catalog.colnames[:16]) == ["designation", "spectrum_id", "obsid", "teff", "teff_err", "radius",
                                           "radius_err", "mass", "mass_err", "luminosity", "luminosity_err",
                                           "snr_lambda", "subclass", "chi2", "subset", "flags"]


def test_accessor_selections(two_releases):
    res = lamost_mdwarf.open_results(two_releases["work"] / "results.zarr")
    good = res.mdwarf.quality_sample()
    assert good.sizes["star"] > 0 and np.all(good["flags"].values == 0)
    mid = good.mdwarf.snr_between(60, 200)
    snr = mid["snr_lambda"].values
    assert np.all((snr >= 60) & (snr < 200))
    m3 = good.mdwarf.subtype("M3")
    assert set(m3["subclass"].values.astype(str)) <= {"M3"}
    ra0, dec0 = float(good["ra"].values[0]), float(good["dec"].values[0])
    cone = res.mdwarf.cone(ra0, dec0, 5.0)
    assert good["spectrum_id"].values[0] in set(cone["spectrum_id"].values)
    assert res.mdwarf.cone(ra0, dec0, 5.0).sizes["star"] < res.sizes["star"]
    assert set(res.mdwarf.subset("training")["subset"].values.astype(str)) == {"training"}
    spec = res.mdwarf.spectrum(str(good["spectrum_id"].values[0]))
    good_px = spec["pixel_mask"].values == 0
    resid = (spec["norm_flux"].values - spec["model_flux"].values)[good_px]
    assert np.nanstd(resid) < 0.2 and spec.sizes["wavelength"] == 3000
    with pytest.raises(KeyError):
        res.mdwarf.spectrum("nope")


@pytest.mark.reliability
def test_interrupted_run_resumes(small_survey, tmp_path):
    """kill -9 a `lamost-mdwarf run` during inference; the rerun finishes with the same catalog."""
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "lamost_mdwarf.cli", "run", "--spectra", str(small_survey.spectra_dir),
           "--labels", str(small_survey.labels_path), "--workdir", str(work), "--no-figures", "--n-workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    state = work / "pipeline_state.json"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if state.exists() and "validation_text" in json.loads(state.read_text() or "{}"):
            break  # validated: inference is starting
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "train" not in resumed.stdout.split("stages run:")[1].split("\n")[0]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert "everything up to date" in again.stdout
    res = lamost_mdwarf.open_results(work / "results.zarr").compute()
    assert res.sizes["star"] == lamost_mdwarf.open_survey_store(work / "store.zarr").sizes["star"]
    usable = res["subset"].values.astype(str) != "excluded"
    assert np.all(np.isfinite(res["chi2"].values[usable]) | (res["flags"].values[usable] != 0))
