"""Out of core: workers limited to 512 MiB each run the whole pipeline on a survey whose
spectra total more than three times that, and none of them is killed or restarted or
reaches the nanny's kill threshold (95% of its limit).

Design (CI-affordable, honest about what is measured):

* The survey is a simulated one of 7,600 stars (~8,600 spectra) ingested on LAMOST's full
  range, 3700-9100 A, at 1/3 A (16,200 pixels per spectrum): the store's flux, ivar and
  two masks decode to ~1.6 GiB, > 3x the limit of one worker and > 1.5x the memory of the
  whole 2-worker cluster. Many bytes per spectrum make the survey large without the
  ~45,000 files the default 3,000-pixel grid would need; every row is 5x the default's,
  so the memory-derived chunk size is exercised too. (Finer steps are not used: the
  pseudo-continuum operator's one-off set-up grows as (L / step)^2, ~215 MiB per worker
  at 0.2 A, which alone does not fit next to a 512 MiB worker's ~190 MiB footprint.)
* The label catalog keeps every 30th row: the training set of the default (``best``)
  mode is every matched spectrum passing the cuts, and training holds it in memory (on
  the client and on each worker), so its size, not the survey's, bounds training memory.
  Real catalogs match a small fraction of LAMOST spectra (the paper trained on 1,388
  stars); here ~90 training stars keep training at the scale of a real run.
* Workers are real processes (``LocalCluster(processes=True)``), each under a nanny that
  restarts it above 95% of its limit. Memory is the kernel's exact high-water mark
  (``VmHWM``, reset through ``/proc/self/clear_refs`` before the run), so a short peak
  between samples cannot be missed; a polling thread cross-checks it.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

import lamost_mdwarf
from lamost_mdwarf.grid import WavelengthGrid
from lamost_mdwarf.io.survey_store import chunk_stars_for_memory, default_chunk_stars
from lamost_mdwarf.pipeline import run_pipeline

MEMORY_LIMIT = 512 * 2**20
GRID = WavelengthGrid(3700.0, 9100.0, 1 / 3)
N_STARS = 7600
LABEL_EVERY = 30
PIXEL_VARIABLES = ("flux", "ivar", "andmask", "ormask")

pytestmark = pytest.mark.slow


def reset_peak_rss() -> bool:
    """Reset this process's peak resident memory (``VmHWM``); False where Linux forbids it."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident memory of this process since the last reset, bytes."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def current_rss() -> int:
    """Resident memory of this process now, bytes."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def worker_identity() -> tuple[int, float]:
    """(pid, start time) of this process: a restarted worker has another one."""
    import psutil

    proc = psutil.Process()
    return proc.pid, proc.create_time()


class RssPoller:
    """Polls every worker's resident memory in a thread (a cross-check of ``VmHWM``)."""

    def __init__(self, client, interval: float = 0.2) -> None:
        self.client, self.interval = client, interval
        self.peak: dict[str, int] = {}
        self.n_samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                sample = self.client.run(current_rss)
            except Exception:  # noqa: BLE001 - a probe failing is reported by the counts below
                continue
            self.n_samples += 1
            for address, rss in sample.items():
                self.peak[address] = max(self.peak.get(address, 0), rss)

    def __enter__(self) -> "RssPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def big_survey(tmp_path_factory):
    """A simulated 7,600-star survey and a label catalog of every 30th row of its catalog."""
    from lamost_mdwarf.simulate.survey import simulate_survey

    root = tmp_path_factory.mktemp("out_of_core")
    survey = simulate_survey(root / "sim", n_stars=N_STARS, seed=21, n_workers=2)
    lines = Path(survey.labels_path).read_text().splitlines(keepends=True)
    labels = root / "labels_subset.csv"
    labels.write_text(lines[0] + "".join(lines[1::LABEL_EVERY]))
    return survey, labels


def test_512mib_workers_process_a_survey_several_times_their_memory(big_survey, tmp_path):
    from distributed import Client, LocalCluster

    survey, labels = big_survey
    work = tmp_path / "work"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit=MEMORY_LIMIT,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        workers_before = client.run(worker_identity)
        limits = {a: w["memory_limit"] for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}
        assert set(limits.values()) == {MEMORY_LIMIT}
        exact = all(client.run(reset_peak_rss).values()) and reset_peak_rss()
        # This process also holds what earlier tests of the session left: measure the growth.
        client_baseline = current_rss()
        with RssPoller(client) as poller:
            summary = run_pipeline([survey.spectra_dir], labels, work, client, make_figures=False, grid=GRID)
        worker_peaks = client.run(peak_rss) if exact else dict(poller.peak)
        client_peak = peak_rss() if exact else current_rss()
        workers_after = client.run(worker_identity)
        logs = "\n".join(line for lines in client.get_worker_logs().values() for _level, line in lines)
    memory = (f"worker peak RSS (MiB): {({a: round(v / 2**20) for a, v in worker_peaks.items()})} "
              f"(polled: {({a: round(v / 2**20) for a, v in poller.peak.items()})}, {poller.n_samples} samples); "
              f"client+scheduler peak {client_peak / 2**20:.0f} MiB (from {client_baseline / 2**20:.0f} MiB before "
              f"the run); exact peaks: {exact}")
    print("\n" + memory)

    # The whole pipeline ran on the memory-limited cluster.
    assert summary.stages_run[:6] == ["ingest", "preprocess", "select", "train", "validate", "infer"]
    store = lamost_mdwarf.open_survey_store(work / "store.zarr")
    results = lamost_mdwarf.open_results(work / "results.zarr")
    n_star = store.sizes["star"]
    assert store.sizes["wavelength"] == GRID.n_pixels == 16200
    assert results.sizes["star"] == n_star > 8000
    usable = results["subset"].values.astype(str) != "excluded"
    assert usable.sum() > 3000
    assert np.all(np.isfinite(results["chi2"].values[usable]) | (results["flags"].values[usable] != 0))

    # The survey is several times one worker's memory (and more than the whole cluster's).
    decoded = sum(int(store[name].nbytes) for name in PIXEL_VARIABLES)
    on_disk = sum(f.stat().st_size for f in (work / "store.zarr").rglob("*") if f.is_file())
    print(f"store: {n_star} spectra x {GRID.n_pixels} px, flux+ivar+masks {decoded / 2**20:.0f} MiB decoded "
          f"({decoded / MEMORY_LIMIT:.2f}x one worker's limit), {on_disk / 2**20:.0f} MiB on disk")
    assert decoded >= 3 * MEMORY_LIMIT
    assert decoded >= 1.5 * 2 * MEMORY_LIMIT

    # Chunks followed the workers' memory: smaller than the default, and a chunk of every
    # pixel variable is a small fraction of a worker's memory.
    chunk = int(store.attrs["chunk_stars"])
    assert chunk == chunk_stars_for_memory(GRID.n_pixels, MEMORY_LIMIT) < default_chunk_stars(GRID.n_pixels)
    assert chunk * GRID.n_pixels * 12 < MEMORY_LIMIT / 16

    # No worker was killed or restarted, and none reached the nanny's kill threshold.
    assert workers_after == workers_before, (workers_before, workers_after)
    assert len(worker_peaks) == 2, memory
    terminate = 0.95  # distributed.worker.memory.terminate: the nanny kills the worker above it
    for address, peak in worker_peaks.items():
        assert peak < terminate * MEMORY_LIMIT, memory
    # (Pausing at 80% is not a failure: a paused worker resumes when its task ends.)
    paused = [line for line in logs.splitlines() if "Pausing worker" in line]
    print(f"worker pauses: {len(paused)}")
    # The client (also the local cluster's scheduler and the store's single writer) never
    # held the survey either: its growth during the run stays well below the survey's size.
    assert client_peak - client_baseline < decoded / 2, memory
