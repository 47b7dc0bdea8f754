"""Storage faults: a full disk mid-ingest, fsspec URLs, read-only stores."""
from __future__ import annotations

import errno

import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import register_implementation

from conftest import clone_real_spectra
from lamost_mdwarf.ingest import ingest
from lamost_mdwarf.io.survey_store import StoreError, open_survey_store


class FullDiskFileSystem(MemoryFileSystem):
    """An in-memory filesystem that fails writes (ENOSPC) once ``capacity`` bytes are used."""

    protocol = "fulldisk"
    capacity = 10**12
    used = 0
    store: dict = {}  # its own namespace, separate from memory://
    pseudo_dirs = [""]

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        FullDiskFileSystem.used += len(value)
        if FullDiskFileSystem.used > FullDiskFileSystem.capacity:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return super().pipe_file(path, value, mode=mode, **kwargs)


register_implementation("fulldisk", FullDiskFileSystem, clobber=True)


@pytest.mark.reliability
def test_full_disk_gives_clear_error_and_keeps_committed_rows(real_lamost_dir, tmp_path):
    data = tmp_path / "spectra"
    clone_real_spectra(real_lamost_dir / "dr1_original/spec-55862-B6212_sp06-099.fits", data, 40)
    FullDiskFileSystem.store.clear()
    FullDiskFileSystem.used, FullDiskFileSystem.capacity = 0, 10**12
    url = "fulldisk://full/store.zarr"
    ingest(url, [data / f"spec-55862-B6212_sp06-{k:03d}.fits" for k in range(2, 12)], chunk_stars=4)
    before = open_survey_store(url)
    flux_before = before["flux"].values.copy()
    FullDiskFileSystem.capacity = FullDiskFileSystem.used + 150_000  # room for about one more chunk
    with pytest.raises(StoreError, match="No space left on device.*committed spectra intact"):
        ingest(url, [data], chunk_stars=4, batch_size=4)
    after = open_survey_store(url)
    assert after.sizes["star"] >= 10
    np.testing.assert_array_equal(after["flux"].values[:10], flux_before)
    ids = after["spectrum_id"].values.astype(str)
    assert len(set(ids)) == len(ids)
    # Once there is space again, a rerun completes the ingestion.
    FullDiskFileSystem.capacity = 10**12
    ingest(url, [data], chunk_stars=4)
    assert open_survey_store(url).sizes["star"] == 40


def test_memory_url_store(real_lamost_dir):
    url = "memory://lamost-test/store.zarr"
    summary = ingest(url, [real_lamost_dir / "dr1_original" / "non_M"], chunk_stars=2)
    assert summary.counts["ingested"] == 3
    assert open_survey_store(url).sizes["star"] == 3
    assert ingest(url, [real_lamost_dir / "dr1_original" / "non_M"]).n_skipped == 3


def test_read_only_location_refused(real_lamost_dir, tmp_path, monkeypatch):
    store = tmp_path / "s.zarr"
    ingest(store, [real_lamost_dir / "dr1_original" / "non_M"])
    import lamost_mdwarf.io.storage as storage

    monkeypatch.setattr(storage.os, "access", lambda path, mode: False)  # as on a read-only mount
    with pytest.raises(StoreError, match="not writable"):
        ingest(store, [real_lamost_dir / "dr1_original"])
    monkeypatch.undo()
    assert open_survey_store(store).sizes["star"] == 3
