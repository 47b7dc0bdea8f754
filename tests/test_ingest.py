"""Ingestion into the survey store: idempotence, releases, bad files, locking, dask."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from conftest import clone_real_spectra
from lamost_mdwarf.grid import WavelengthGrid
from lamost_mdwarf.ingest import discover_files, ingest
from lamost_mdwarf.io.lamost_fits import read_lamost_spectrum
from lamost_mdwarf.io.storage import StoreLockedError, WriterLock, resolve_location
from lamost_mdwarf.io.survey_store import (
    StoreError,
    SurveyStoreWriter,
    file_summary,
    open_survey_store,
)
from lamost_mdwarf.kernels.resample import resample_to_rest_frame


def load(ds: xr.Dataset) -> dict[str, np.ndarray]:
    return {name: np.asarray(ds[name].values) for name in ds.data_vars if name != "file_mtime_ns"}


def assert_stores_equal(a: xr.Dataset, b: xr.Dataset) -> None:
    la, lb = load(a), load(b)
    assert la.keys() == lb.keys()
    for name in la:
        if la[name].dtype.kind in "fc":
            np.testing.assert_array_equal(la[name], lb[name], err_msg=name)
        else:
            assert la[name].astype(str).tolist() == lb[name].astype(str).tolist(), name


def test_real_files_ingest_and_rerun_adds_nothing(real_lamost_dir, tmp_path):
    store = tmp_path / "survey.zarr"
    summary = ingest(store, [real_lamost_dir], chunk_stars=8)
    assert summary.counts == {"ingested": 23, "seen_again": 2, "rejected": 1}
    assert summary.rejected[0][0].endswith("med-58408-TD230151N343645T01_sp01-015.fits")
    assert "medium-resolution" in summary.rejected[0][1]
    ds = open_survey_store(store)
    assert ds.sizes["star"] == 23 and ds.sizes["file"] == 26
    ids = ds["spectrum_id"].values.astype(str)
    assert len(set(ids)) == 23 and "55859-F5902_sp01-001" in ids
    assert ds["flux"].dtype == np.float32 and ds["ivar"].dtype == np.float32
    assert ds["flux"].attrs["long_name"] and ds["ra"].attrs["units"] == "deg"
    assert ds["wavelength"].attrs["units"] == "Angstrom"
    np.testing.assert_array_equal(ds["wavelength"].values, WavelengthGrid().wavelength)
    before = load(ds)

    again = ingest(store, [real_lamost_dir])
    assert again.n_skipped == 26 and sum(again.counts.values()) == 0
    after = open_survey_store(store)
    assert after.sizes == ds.sizes
    for name, values in before.items():
        np.testing.assert_array_equal(np.asarray(after[name].values), values)


def test_store_rows_equal_reader_plus_kernel(real_lamost_dir, tmp_path):
    store = tmp_path / "s.zarr"
    ingest(store, [real_lamost_dir / "dr1_original"], chunk_stars=4)
    ds = open_survey_store(store)
    row = 5
    spec = read_lamost_spectrum(ds["source_path"].values[row])
    flux, ivar, am, om = resample_to_rest_frame(spec.wavelength, spec.flux, spec.ivar, spec.andmask,
                                                spec.ormask, spec.meta["z"], ds["wavelength"].values)
    np.testing.assert_array_equal(ds["flux"].values[row], flux)
    np.testing.assert_array_equal(ds["ivar"].values[row], ivar)
    assert ds["n_good_pixels"].values[row] == np.count_nonzero(ivar > 0)
    assert ds["snr_lambda"].values[row] == pytest.approx(spec.meta["snr_lambda"], rel=1e-6)


def test_incremental_release_adds_only_new_spectra(real_lamost_dir, tmp_path):
    store = tmp_path / "s.zarr"
    first = ingest(store, [real_lamost_dir / "later_releases" / "spec-55859-F5902_sp01-001_dr7.fits.gz",
                           real_lamost_dir / "later_releases" / "spec-55859-F5902_sp01-005_dr5.fits.gz"],
                   release="DR7-batch")
    assert first.counts["ingested"] == 2
    second = ingest(store, [real_lamost_dir / "later_releases"], release="DR9")
    # 7 files: 2 already offered, the DR9 copies of 101001/101005 seen again, 3 new.
    assert second.n_skipped == 2
    assert second.counts == {"ingested": 3, "seen_again": 2, "rejected": 0}
    ds = open_survey_store(store)
    assert ds.sizes["star"] == 5
    releases = dict(zip(ds["spectrum_id"].values.astype(str), ds["release"].values.astype(str)))
    assert releases["55859-F5902_sp01-001"] == "DR7-batch"
    assert releases["55859-F5902_sp01-002"] == "DR9"
    status = ds["file_status"].values.astype(str)
    seen = ds["file_path"].values.astype(str)[status == "seen_again"]
    assert sorted(Path(p).name for p in seen) == [
        "spec-55859-F5902_sp01-001_dr9.fits.gz", "spec-55859-F5902_sp01-005_dr9.fits.gz"]
    # A seen-again file points at the row of the stored spectrum.
    idx = ds["file_star_index"].values[status == "seen_again"]
    assert set(ds["spectrum_id"].values.astype(str)[idx]) == {"55859-F5902_sp01-001", "55859-F5902_sp01-005"}


def test_corrupt_files_reported_and_skipped(real_lamost_dir, tmp_path):
    data = tmp_path / "data"
    clone_real_spectra(real_lamost_dir / "dr1_original/spec-55862-B6212_sp06-099.fits", data, 5)
    good = sorted(data.glob("*.fits"))
    (data / "spec-55862-B6212_sp06-900.fits").write_bytes(good[0].read_bytes()[:20000])
    (data / "notes.fits").write_text("not fits")
    store = tmp_path / "s.zarr"
    summary = ingest(store, [data], chunk_stars=2)
    assert summary.counts == {"ingested": 5, "seen_again": 0, "rejected": 2}
    reasons = dict(summary.rejected)
    assert "not a FITS file" in reasons[str((data / "notes.fits").resolve())]
    assert "truncated" in reasons[str((data / "spec-55862-B6212_sp06-900.fits").resolve())]
    assert "rejected 2" in summary.format() or "rejected: 2" in summary.format()
    assert file_summary(open_survey_store(store)) == {"ingested": 5, "seen_again": 0, "rejected": 2}


def test_missing_redshift_kept_and_flagged(real_lamost_dir, tmp_path):
    from astropy.io import fits

    src = real_lamost_dir / "dr1_original/spec-55862-B6212_sp06-099.fits"
    path = tmp_path / src.name
    shutil.copy(src, path)
    with fits.open(path, mode="update") as hdul:
        hdul[0].header["Z"] = -9999.0
    store = tmp_path / "s.zarr"
    ingest(store, [path])
    ds = open_survey_store(store)
    assert ds.sizes["star"] == 1
    assert int(ds["ingest_flags"].values[0]) & 1
    assert np.all(np.isnan(ds["flux"].values[0])) and np.all(ds["ivar"].values[0] == 0)


def test_dask_client_gives_the_same_store(real_lamost_dir, tmp_path):
    from distributed import Client, LocalCluster

    local = tmp_path / "local.zarr"
    ingest(local, [real_lamost_dir], chunk_stars=4, batch_size=3)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        distributed_store = tmp_path / "dask.zarr"
        ingest(distributed_store, [real_lamost_dir], chunk_stars=4, batch_size=3, client=client)
    assert_stores_equal(open_survey_store(local), open_survey_store(distributed_store))


def test_second_writer_refused_and_stale_lock_taken_over(real_lamost_dir, tmp_path):
    store = tmp_path / "s.zarr"
    ingest(store, [real_lamost_dir / "dr1_original" / "non_M"])
    with SurveyStoreWriter(store):
        with pytest.raises(StoreLockedError, match="in use by another ingest"):
            ingest(store, [real_lamost_dir / "dr1_original"])
    # A lock left by a process that no longer exists is taken over.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    lock = WriterLock(resolve_location(store), "ingest")
    import json
    import socket
    Path(lock.path).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "since": 0}))
    summary = ingest(store, [real_lamost_dir / "dr1_original"])
    assert summary.counts["ingested"] == 13
    assert not Path(lock.path).exists()


def test_file_url_and_interrupted_resize_are_handled(real_lamost_dir, tmp_path):
    store = tmp_path / "s.zarr"
    url = "file://" + str(store)
    ingest(url, [real_lamost_dir / "dr1_original" / "non_M"], chunk_stars=2)
    ds = open_survey_store(url)
    assert ds.sizes["star"] == 3
    # Simulate a crash after some arrays were grown: readers ignore uncommitted rows.
    group = zarr.open_group(str(store), mode="r+")
    group["flux"].resize((7, group["flux"].shape[1]))
    group["spectrum_id"].resize((5,))
    ds = open_survey_store(store)
    assert ds.sizes["star"] == 3 and ds["flux"].shape == (3, 3000)
    # The next writer truncates the debris and carries on.
    summary = ingest(store, [real_lamost_dir / "dr1_original"])
    assert summary.counts["ingested"] == 13
    assert open_survey_store(store).sizes["star"] == 16


def test_incompatible_and_foreign_stores_rejected(tmp_path, real_lamost_dir):
    store = tmp_path / "s.zarr"
    ingest(store, [real_lamost_dir / "dr1_original" / "non_M"])
    group = zarr.open_group(str(store), mode="r+")
    group.attrs["format_version"] = 99
    with pytest.raises(StoreError, match="format version 99"):
        open_survey_store(store)
    with pytest.raises(StoreError, match="format version 99"):
        ingest(store, [real_lamost_dir / "dr1_original"])
    other = tmp_path / "other.zarr"
    zarr.open_group(str(other), mode="w").attrs["format"] = "something else"
    with pytest.raises(StoreError, match="not a lamost_mdwarf survey store"):
        open_survey_store(other)
    with pytest.raises(StoreError, match="no survey store"):
        open_survey_store(tmp_path / "missing.zarr")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_store_clear_error(tmp_path, real_lamost_dir):
    store = tmp_path / "s.zarr"
    ingest(store, [real_lamost_dir / "dr1_original" / "non_M"])
    os.chmod(store, 0o555)
    try:
        with pytest.raises(StoreError, match="not writable"):
            ingest(store, [real_lamost_dir / "dr1_original"])
    finally:
        os.chmod(store, 0o755)


def test_grid_conflict_refused(tmp_path, real_lamost_dir):
    store = tmp_path / "s.zarr"
    ingest(store, [real_lamost_dir / "dr1_original" / "non_M"], grid=WavelengthGrid(5000, 6000, 2))
    assert open_survey_store(store).sizes["wavelength"] == 500
    with pytest.raises(StoreError, match="grid"):
        ingest(store, [real_lamost_dir / "dr1_original"], grid=WavelengthGrid())


def test_discover_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.fits", "a/b/y.fits.gz", "a/b/z.txt", "w.fits"):
        (tmp_path / name).write_bytes(b"")
    found = discover_files([tmp_path / "a", str(tmp_path / "*.fits")])
    assert [Path(p).name for p in found] == ["x.fits", "y.fits.gz", "w.fits"] or \
        sorted(Path(p).name for p in found) == ["w.fits", "x.fits", "y.fits.gz"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        discover_files([tmp_path / "nothing*.fits"])


def _interrupted_after_24_of_40(real_lamost_dir, tmp_path):
    """40 spectra, a reference store of all of them and a store of the first 24 (3 chunks)."""
    data = tmp_path / "spectra"
    clone_real_spectra(real_lamost_dir / "dr1_original/spec-55862-B6212_sp06-099.fits", data, 40)
    reference, store = tmp_path / "ref.zarr", tmp_path / "interrupted.zarr"
    ingest(reference, [data], chunk_stars=8, batch_size=4)
    ingest(store, discover_files([data])[:24], chunk_stars=8, batch_size=4)
    return data, reference, store


def _assert_resume_completes(data, store, reference):
    """Resuming ingests the 24 missing files (none seen again) and equals the reference."""
    summary = ingest(store, [data], chunk_stars=8, batch_size=4)
    assert summary.counts["ingested"] == 24 and summary.counts["seen_again"] == 0
    a, b = open_survey_store(store), open_survey_store(reference)
    assert a.sizes == b.sizes
    for name in a.data_vars:
        if name != "file_mtime_ns":
            assert np.asarray(a[name].values).tolist() == np.asarray(b[name].values).tolist(), name


def test_resume_reclaims_stars_whose_file_report_lagged(real_lamost_dir, tmp_path):
    """Committed spectra whose file-report rows were not committed (an interrupted run):
    the resume re-reads those files and records them as ingested, not seen again, so the
    store equals an uninterrupted one."""
    data, reference, store = _interrupted_after_24_of_40(real_lamost_dir, tmp_path)
    group = zarr.open_group(str(store), mode="r+")
    assert group.attrs["n_star"] == 24 and group.attrs["n_file"] == 24
    group.attrs.update({"n_file": 16})  # the report of the last 8 committed spectra is missing
    _assert_resume_completes(data, store, reference)


def test_resume_rereads_files_whose_spectra_were_not_committed(real_lamost_dir, tmp_path):
    """The reverse lag: report rows for spectra beyond the committed ones are dropped on
    resume and their files read again, so no spectrum is lost."""
    data, reference, store = _interrupted_after_24_of_40(real_lamost_dir, tmp_path)
    zarr.open_group(str(store), mode="r+").attrs.update({"n_star": 16})  # last chunk of spectra lost
    _assert_resume_completes(data, store, reference)


def test_commits_write_attributes_in_one_metadata_write(real_lamost_dir, tmp_path, monkeypatch):
    """Regression: ``group.attrs.update({...})`` writes zarr.json once per key, so a kill
    between the writes left n_star committed and n_file not (a lagging file report). Every
    attribute write of the stores must go through one ``update_attributes`` call."""
    from zarr.core.attributes import Attributes

    def refuse(self, key, value):
        raise AssertionError(f"attribute {key!r} written on its own (not atomic with the others)")

    monkeypatch.setattr(Attributes, "__setitem__", refuse)
    data = tmp_path / "spectra"
    clone_real_spectra(real_lamost_dir / "dr1_original/spec-55862-B6212_sp06-099.fits", data, 20)
    store = tmp_path / "atomic.zarr"
    ingest(store, [data], chunk_stars=8, batch_size=4)
    attrs = zarr.open_group(str(store), mode="r").attrs
    assert attrs["n_star"] == attrs["n_file"] == 20
    from lamost_mdwarf.stages.preprocess import run_preprocess

    run_preprocess(store)  # a derived group's commits (n_star with its settings)
    assert zarr.open_group(str(store / "preprocessed"), mode="r").attrs["n_star"] == 20
