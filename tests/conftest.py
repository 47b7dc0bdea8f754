"""Shared fixtures: paths to the real LAMOST files in ../shared (skipped when absent)."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
REAL_LAMOST = SHARED / "data" / "real" / "lamost"
MANN15_CSV = SHARED / "data" / "real" / "catalogs" / "mann15.stars.csv"


@pytest.fixture(scope="session")
def real_lamost_dir() -> Path:
    """Directory of real LAMOST files (../shared/data/real/lamost), or skip."""
    if not REAL_LAMOST.is_dir():
        pytest.skip(f"real LAMOST files not found at {REAL_LAMOST} (../shared is not beside the checkout)")
    return REAL_LAMOST


def clone_real_spectra(src: Path, outdir: Path, n: int, start_fiber: int = 1) -> list[Path]:
    """Write ``n`` copies of a real LAMOST file as distinct observations (new FIBERID/LMJD).

    Used to build ingest fixtures of any size without the simulator; each clone's flux
    is scaled so the copies differ.
    """
    from astropy.io import fits

    outdir.mkdir(parents=True, exist_ok=True)
    with fits.open(src) as hdul:
        header = hdul[0].header.copy()
        data = hdul[0].data.copy()
    paths = []
    for k in range(n):
        fiber = start_fiber + k
        lmjd = int(header["LMJD"]) + fiber // 250
        fiber = fiber % 250 + 1
        head = header.copy()
        head["FIBERID"], head["LMJD"] = fiber, lmjd
        arr = data.copy()
        arr[0] = arr[0] * (1.0 + 0.001 * k)
        name = f"spec-{lmjd}-{head['PLANID'].strip()}_sp{int(head['SPID']):02d}-{fiber:03d}.fits"
        path = outdir / name
        fits.PrimaryHDU(data=arr, header=head).writeto(path, overwrite=True)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def small_survey(tmp_path_factory):
    """A simulated survey of 1200 stars (about 1,350 files), shared by the pipeline tests."""
    from lamost_mdwarf.simulate.survey import simulate_survey

    return simulate_survey(tmp_path_factory.mktemp("survey") / "sim", n_stars=1200, seed=11, n_workers=2)


@pytest.fixture(scope="session")
def dask_client():
    """An in-process Dask cluster of 2 workers (threads) for stage tests."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        yield client
