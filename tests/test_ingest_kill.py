"""A real ``lamost-mdwarf ingest`` process killed with SIGKILL mid-write, then resumed."""
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

from conftest import clone_real_spectra
from lamost_mdwarf.ingest import ingest
from lamost_mdwarf.io.survey_store import open_survey_store

CHUNK, BATCH = 16, 8


def committed_stars(store: Path) -> int:
    try:
        return int(json.loads((store / "zarr.json").read_text())["attributes"]["n_star"])
    except (FileNotFoundError, KeyError, ValueError):
        return 0


def run_cli(store: Path, data: Path, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lamost_mdwarf.cli", "ingest", str(store), str(data),
           "--chunk-stars", str(CHUNK), "--batch-size", str(BATCH), "--n-workers", "2"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


@pytest.fixture(scope="module")
def many_files(real_lamost_dir, tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("kill") / "spectra"
    clone_real_spectra(real_lamost_dir / "dr1_original/spec-55862-B6212_sp06-221.fits", data, 400)
    return data


@pytest.fixture(scope="module")
def reference_store(many_files, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("ref") / "ref.zarr"
    ingest(store, [many_files], chunk_stars=CHUNK, batch_size=BATCH)
    return store


def assert_same(a: Path, b: Path) -> None:
    da, db = open_survey_store(a), open_survey_store(b)
    assert da.sizes == db.sizes
    for name in da.data_vars:
        if name == "file_mtime_ns":
            continue
        va, vb = np.asarray(da[name].values), np.asarray(db[name].values)
        if va.dtype.kind in "fc":
            np.testing.assert_array_equal(va, vb, err_msg=name)
        else:
            assert va.tolist() == vb.tolist(), name


@pytest.mark.reliability
@pytest.mark.parametrize("kill_after_stars", [1, 150])
def test_sigkill_mid_ingest_then_resume(many_files, reference_store, tmp_path, kill_after_stars):
    store = tmp_path / "killed.zarr"
    proc = run_cli(store, many_files, start_new_session=True)
    deadline = time.time() + 120
    while committed_stars(store) < kill_after_stars and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    if proc.poll() is not None:
        out, err = proc.communicate()
        pytest.fail(f"ingest finished before it could be killed (rc={proc.returncode}): {err[-2000:]}")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = committed_stars(store)
    assert 0 < killed_at < 400, killed_at

    # The killed store opens and holds no partial or duplicated stars.
    ds = open_survey_store(store)
    ids = ds["spectrum_id"].values.astype(str)
    assert len(ids) == len(set(ids)) == ds.sizes["star"]
    assert np.all(ds["n_good_pixels"].values > 0)

    # Resuming completes the ingestion and gives exactly the uninterrupted store.
    resumed = run_cli(store, many_files)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "stars in store: 400" in out
    assert_same(store, reference_store)


@pytest.mark.reliability
def test_concurrent_ingest_refused(many_files, tmp_path):
    store = tmp_path / "busy.zarr"
    first = run_cli(store, many_files, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not Path(str(store) + ".lock").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert first.poll() is None, "first ingest ended too early"
        second = run_cli(store, many_files)
        out, err = second.communicate(timeout=120)
        assert second.returncode != 0
        assert "in use by another ingest" in err and str(first.pid) in err
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)


@pytest.mark.reliability
def test_ten_sigkills_at_random_moments_then_resume(many_files, reference_store, tmp_path):
    """kill -9 at random moments (cluster start, reading, committing), resume each time.

    Wall-clock delays alone are at the mercy of the machine's load, so the kill moments
    are drawn in two kinds: a random delay within the start-up (before any row can be
    committed), and a random number of newly committed stars plus a random extra delay
    (while rows are being read and committed).
    """
    rng = np.random.default_rng(2026)
    store = tmp_path / "random.zarr"
    killed_with_rows = 0
    for trial in range(10):
        before = committed_stars(store)
        proc = run_cli(store, many_files, start_new_session=True)
        if trial % 3 == 0:
            time.sleep(float(rng.uniform(0.2, 2.0)))
        else:
            target = before + int(rng.integers(1, 40))
            deadline = time.time() + 120
            while committed_stars(store) < target and proc.poll() is None and time.time() < deadline:
                time.sleep(0.005)
            time.sleep(float(rng.uniform(0.0, 0.3)))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        ds = open_survey_store(store) if (store / "zarr.json").exists() else None
        if ds is not None:
            ids = ds["spectrum_id"].values.astype(str)
            assert len(ids) == len(set(ids)) == ds.sizes["star"], f"trial {trial}: duplicated stars"
            assert ds.sizes["star"] == committed_stars(store)
            killed_with_rows += 0 < ds.sizes["star"] < 400
    assert killed_with_rows >= 3, "the kills should land while rows are being committed"
    resumed = run_cli(store, many_files)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert_same(store, reference_store)
