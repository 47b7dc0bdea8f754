"""Ingest throughput against a bare read loop over the same files, in one run.

Usage::

    python scripts/bench_ingest.py [--n-stars 18000] [--workdir DIR] [--n-workers 2]

Simulates a survey (>= 20,000 files by default: repeats and re-reductions add files
to the stars), warms the page cache, then measures on the same files:

1. a bare single-core read loop with astropy only (open, header, data; no parsing,
   no resampling, no writing),
2. the same loop through ``read_lamost_spectrum`` (our reader, single core),
3. ``lamost_mdwarf.ingest.ingest`` on a local Dask cluster of ``--n-workers``
   processes (read, resample, dedupe, write to Zarr).

Prints spectra/s for each and the ratios; the target is ingest >= 1.0x the bare read
rate. Exits non-zero when the target is missed.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def bare_astropy_read(paths: list[str]) -> float:
    """Seconds to open every file and touch its header and data with astropy only."""
    from astropy.io import fits

    start = time.perf_counter()
    for path in paths:
        with fits.open(path, memmap=False) as hdul:
            header = hdul[0].header
            _ = header.get("Z")
            for hdu in hdul:
                if hdu.data is not None:
                    _ = hdu.data[0] if hdu.data.ndim else hdu.data
    return time.perf_counter() - start


def reader_loop(paths: list[str]) -> float:
    """Seconds to read every file with ``read_lamost_spectrum`` (single core)."""
    from lamost_mdwarf.io.lamost_fits import LamostReadError, read_lamost_spectrum

    start = time.perf_counter()
    for path in paths:
        try:
            read_lamost_spectrum(path)
        except LamostReadError:
            pass
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-stars", type=int, default=18000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--n-workers", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the simulated survey and store")
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    from lamost_mdwarf.ingest import discover_files, ingest
    from lamost_mdwarf.simulate.survey import simulate_survey

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_ingest_"))
    workdir.mkdir(parents=True, exist_ok=True)
    survey_dir = workdir / "survey"
    t0 = time.perf_counter()
    if not (survey_dir / "truth.csv").exists():
        simulate_survey(survey_dir, n_stars=args.n_stars, seed=args.seed, n_workers=args.n_workers)
    paths = discover_files([survey_dir / "spectra"])
    print(f"survey: {len(paths)} files ({time.perf_counter() - t0:.1f} s to simulate/list)")

    bare_astropy_read(paths)  # warm the page cache: every measurement reads from memory
    t_bare = bare_astropy_read(paths)
    t_reader = reader_loop(paths)

    store = workdir / "bench_store.zarr"
    if store.exists():
        shutil.rmtree(store)
    with LocalCluster(n_workers=args.n_workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(lambda: None)  # workers up before timing
        t_start = time.perf_counter()
        summary = ingest(store, [survey_dir / "spectra"], client=client)
        t_ingest = time.perf_counter() - t_start
    n = len(paths)
    rate_bare, rate_reader, rate_ingest = n / t_bare, n / t_reader, n / t_ingest
    print(f"bare astropy read, 1 core : {rate_bare:8.0f} files/s ({t_bare:.1f} s)")
    print(f"our reader, 1 core        : {rate_reader:8.0f} files/s ({t_reader:.1f} s)")
    print(f"ingest, {args.n_workers} workers          : {rate_ingest:8.0f} files/s ({t_ingest:.1f} s; "
          f"{summary.counts['ingested']} ingested, {summary.counts['seen_again']} seen again, "
          f"{summary.counts['rejected']} rejected)")
    print(f"ratio ingest / bare astropy read : {rate_ingest / rate_bare:.2f}x (target >= 1.0x)")
    print(f"ratio ingest / our reader        : {rate_ingest / rate_reader:.2f}x")
    store_bytes = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    print(f"store size: {store_bytes / 2**20:.0f} MiB for {summary.n_star_total} spectra")
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir)
    return 0 if rate_ingest >= rate_bare else 1


if __name__ == "__main__":
    raise SystemExit(main())
