"""A LAMOST-DR1-size run end to end: 122,677 simulated spectra on 2 workers of 2 GiB each.

Usage::

    python scripts/bench_dr1_scale.py [--workdir /tmp/bench_dr1] [--n-spectra 122677]
                                      [--workers 2] [--memory-limit 2GiB]
                                      [--label-rows 30152] [--json FILE] [--no-figures]

It simulates a survey with enough stars for ``--n-spectra`` files (once; reused from
``--workdir`` afterwards), takes exactly ``--n-spectra`` of its FITS files (sorted by
path, all three layouts), and runs every stage of ``lamost-mdwarf run`` in order on a
fresh work directory with a fresh local cluster of ``--workers`` single-threaded worker
*processes* limited to ``--memory-limit`` each: ingest, preprocess, select, train,
validate, infer, catalog, figures. For each stage it prints

* the wall time and the throughput in spectra per second,
* the peak resident memory of the busiest worker process and of the client process
  (the kernel's exact high-water mark ``VmHWM``, reset before each stage),

then the total (simulation excluded) against the 10-minute target, the store sizes (the
survey store decoded and on disk, the results store, the catalog) and whether any worker
was restarted or killed (worker pids and start times before and after the run).

The label catalog is cut to ``--label-rows`` random rows of the simulator's
TESS-Cool-Dwarf-Catalog-like table (default 30,152: in the paper, 30,152 of the 122,677
DR1 M-dwarf spectra were cross-matched with the TCD); ``--label-rows 0`` keeps all of it
(~92 % of the stars, a harder case: a training set of ~50,000 spectra in the ``best``
mode).

Simulating 122,677 spectra writes ~9 GB of FITS files and takes ~7 min on 2 idle cores.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_accuracy import evaluate, load_comparison  # noqa: E402
from bench_scaling import label_subset, measure_stages, store_bytes, worker_identity  # noqa: E402

DR1_SPECTRA = 122_677
FILES_PER_STAR = 1.13  # simulated objects are observed ~1.13 times on average
TARGET_SECONDS = 600.0


def simulated_files(survey_dir: Path) -> list[Path]:
    """Every simulated FITS file of a survey, sorted by path."""
    return sorted(p for p in (survey_dir / "spectra").rglob("*") if p.name.endswith((".fits", ".fits.gz")))


def ensure_survey(root: Path, n_spectra: int, seed: int, n_workers: int) -> tuple[list[Path], Path, float]:
    """(exactly ``n_spectra`` FITS files, the label catalog, simulation seconds or 0 if reused)."""
    from lamost_mdwarf.simulate.survey import simulate_survey

    survey_dir = root / f"survey-{n_spectra}-seed{seed}"
    seconds = 0.0
    if not (survey_dir / "truth.csv").exists():
        n_stars = int(n_spectra / FILES_PER_STAR * 1.03) + 50
        print(f"simulating {n_stars:,} stars into {survey_dir} (for {n_spectra:,} spectra) ...", flush=True)
        start = time.perf_counter()
        simulate_survey(survey_dir, n_stars=n_stars, seed=seed, n_workers=n_workers, overwrite=True)
        seconds = time.perf_counter() - start
        print(f"simulated in {seconds:.0f} s", flush=True)
    else:
        print(f"reusing the simulated survey in {survey_dir}", flush=True)
    files = simulated_files(survey_dir)
    if len(files) < n_spectra:
        raise SystemExit(f"{survey_dir} holds {len(files):,} FITS files, fewer than {n_spectra:,}: "
                         "delete it and rerun to simulate a larger survey")
    return files[:n_spectra], survey_dir / "labels_tcd.csv", seconds


def run_all_stages(client, files: list[Path], labels: Path, workdir: Path, figures: bool) -> dict[str, dict]:
    """Every stage of ``lamost-mdwarf run`` in order; seconds and peak memory per stage."""
    from lamost_mdwarf.figures import make_figures
    from lamost_mdwarf.ingest import ingest
    from lamost_mdwarf.io.catalog import results_to_table, write_catalog
    from lamost_mdwarf.modes import DEFAULT_MODE
    from lamost_mdwarf.pipeline import WorkdirLayout
    from lamost_mdwarf.preprocessing import PreprocessConfig
    from lamost_mdwarf.selection import SelectionConfig
    from lamost_mdwarf.stages.infer import InferSettings, open_results, run_infer
    from lamost_mdwarf.stages.preprocess import run_preprocess
    from lamost_mdwarf.stages.select import run_select
    from lamost_mdwarf.stages.train import run_train
    from lamost_mdwarf.stages.validate import run_validate

    layout = WorkdirLayout(workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    def catalog() -> None:
        table = results_to_table(open_results(layout.results))
        write_catalog(table, layout.catalog)
        write_catalog(table, layout.catalog.with_suffix(".csv"))

    calls = {
        "ingest": lambda: ingest(layout.store, [str(f) for f in files], client=client),
        "preprocess": lambda: run_preprocess(layout.store, PreprocessConfig()),
        "select": lambda: run_select(layout.store, labels, None, 3.0, SelectionConfig()),
        "train": lambda: run_train(layout.store, layout.model, mode=DEFAULT_MODE),
        "validate": lambda: run_validate(layout.store, layout.model, layout.validation),
        "infer": lambda: run_infer(layout.store, layout.model, layout.results, InferSettings()),
        "catalog": catalog,
        "figures": lambda: make_figures(layout.store, layout.model, layout.results, layout.validation,
                                        layout.figures),
    }
    if not figures:
        del calls["figures"]
    return measure_stages(client, calls, lambda stage, r: print(
        f"  {stage:<10} {r['seconds']:8.1f} s  {len(files) / r['seconds']:9.0f} spectra/s   worker peak "
        f"{r['worker_peak'] / 2**20:6.0f} MiB   client peak {r['client_peak'] / 2**20:6.0f} MiB", flush=True))


def accuracy_against_truth(results: Path, truth: Path) -> dict:
    """Scatter and pull widths of the quality sample's single M dwarfs against the simulator's truth."""
    metrics = evaluate(load_comparison(results, truth))
    print(f"against the simulator's truth ({metrics['n_sample']:,} single M dwarfs with flags == 0; "
          f"completeness {100 * metrics['completeness_quality']:.1f} %):")
    for name, entry in metrics["labels"].items():
        bins = ", ".join(f"{b['lo']}-{b['hi']:g}: {b['pull']:.2f}" for b in entry["bins"])
        print(f"  {name:<11} scatter {entry['std']:.4g} (robust {entry['robust']:.4g}); pull width "
              f"{entry['pull']:.2f} (robust {entry['pull_robust']:.2f}); per SNR bin {bins}")
    return metrics


def tree_bytes(path: Path) -> int:
    """Bytes on disk of a file or of every file under a directory."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_dr1"),
                        help="simulated survey (kept, reused) and run directory (default /tmp/bench_dr1)")
    parser.add_argument("--n-spectra", type=int, default=DR1_SPECTRA,
                        help=f"spectra to process (default {DR1_SPECTRA:,}, the DR1 M-dwarf catalogue)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--memory-limit", default="2GiB", help="memory limit per worker (default 2GiB)")
    parser.add_argument("--label-rows", type=int, default=30_152,
                        help="random rows of the label catalog kept (default 30152, the paper's DR1 x TCD "
                             "matches; 0 keeps all)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-figures", action="store_true", help="skip the figures stage")
    parser.add_argument("--json", type=Path, default=None, help="write the measurements here")
    args = parser.parse_args(argv)

    from distributed import Client, LocalCluster

    import lamost_mdwarf
    from lamost_mdwarf.model import load_model

    args.workdir.mkdir(parents=True, exist_ok=True)
    files, labels, sim_seconds = ensure_survey(args.workdir, args.n_spectra, args.seed, args.workers)
    input_bytes = sum(f.stat().st_size for f in files)
    run_dir = args.workdir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    labels = label_subset(labels, args.label_rows, run_dir / "labels_subset.csv")
    print(f"{len(files):,} FITS files ({input_bytes / 2**30:.2f} GiB); {args.workers} workers x "
          f"{args.memory_limit}, 1 thread each", flush=True)

    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      memory_limit=args.memory_limit, dashboard_address=None) as cluster, Client(cluster) as client:
        client.wait_for_workers(args.workers)
        before = client.run(worker_identity)
        limit = int(next(iter(client.scheduler_info()["workers"].values()))["memory_limit"])
        stages = run_all_stages(client, files, labels, run_dir / "work", not args.no_figures)
        after = client.run(worker_identity)

    work = run_dir / "work"
    store = lamost_mdwarf.open_survey_store(work / "store.zarr")
    results = lamost_mdwarf.open_results(work / "results.zarr")
    decoded, store_disk = store_bytes(work / "store.zarr")
    n_star = int(store.sizes["star"])
    n_catalog = int((results["flags"].values == 0).sum())
    total = sum(s["seconds"] for s in stages.values())
    sizes = {"store_decoded": decoded, "store_disk": store_disk,
             "model_disk": tree_bytes(work / "model.zarr"), "results_disk": tree_bytes(work / "results.zarr"),
             "catalog_fits": tree_bytes(work / "catalog.fits"), "input_fits": input_bytes}
    restarted = before != after
    print(f"\ntotal (simulation excluded): {total:.0f} s = {total / 60:.1f} min for {n_star:,} spectra "
          f"({n_star / total:.0f} spectra/s); target < {TARGET_SECONDS / 60:.0f} min: "
          f"{'met' if total < TARGET_SECONDS else 'NOT met'}")
    print(f"peak worker RSS {max(s['worker_peak'] for s in stages.values()) / 2**20:.0f} MiB of "
          f"{limit / 2**20:.0f} MiB; peak client RSS {max(s['client_peak'] for s in stages.values()) / 2**20:.0f} MiB; "
          f"workers restarted or killed: {'YES' if restarted else 'none'}")
    print(f"stored spectra {n_star:,}; catalog rows (flags == 0) {n_catalog:,}; training stars "
          f"{len(load_model(work / 'model.zarr').training_ids):,}")
    print("sizes: " + ", ".join(f"{k} {v / 2**20:,.0f} MiB" for k, v in sizes.items()))
    if sim_seconds:
        print(f"(simulation: {sim_seconds:.0f} s)")
    accuracy = accuracy_against_truth(work / "results.zarr",
                                      args.workdir / f"survey-{args.n_spectra}-seed{args.seed}" / "truth.csv")
    if args.json:
        args.json.write_text(json.dumps({"n_spectra": n_star, "stages": stages, "total_seconds": total,
                                         "memory_limit": limit, "workers_restarted": restarted, "sizes": sizes,
                                         "n_catalog": n_catalog, "simulation_seconds": sim_seconds,
                                         "accuracy": accuracy}, indent=1))
    return 0 if (total < TARGET_SECONDS and not restarted) else 1


if __name__ == "__main__":
    sys.exit(main())
