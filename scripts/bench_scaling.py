"""Scaling of the pipeline with survey size and workers: time and peak memory per stage.

Usage::

    python scripts/bench_scaling.py [--sizes 10000 30000] [--workers 1 2]
                                    [--with-100k] [--memory-limit 2GiB]
                                    [--label-rows 1500] [--grid START:STOP:STEP]
                                    [--workdir DIR] [--seed 1]
                                    [--json FILE] [--keep]

For every survey size N (simulated once per size, then reused from ``--workdir``) and
every worker count W it starts a fresh local Dask cluster of W single-threaded worker
*processes* (each with ``--memory-limit``), runs the stages of ``lamost-mdwarf run`` in
the pipeline's order on a fresh work directory (ingest, preprocess, select, train,
validate, infer; catalog and figures are not timed), and records for each stage

* its wall time,
* the peak resident memory of the busiest worker process during the stage, read from the
  kernel's exact high-water mark (``VmHWM`` of ``/proc/<pid>/status``, reset before each
  stage by writing ``5`` to ``/proc/<pid>/clear_refs``), so no short peak is missed,
* the peak resident memory of the client process (which is also the scheduler of the
  local cluster, the single writer of the ingest, and where the label refinement of the
  ``best`` mode combines its fold results).

The label catalog is cut to ``--label-rows`` random rows (default 1,500; 0 keeps all):
a real label catalog (the TESS Cool Dwarf Catalog) is fixed while the survey grows, and the
training set of the default ``best`` mode is every catalog-matched spectrum that passes
the cuts, which training holds in memory on the client and on every worker. With the
simulator's full catalog (~92% of the stars) the training set would grow with N (~35% of
the spectra) and so would training time and memory; with a fixed catalog, train and
validate measure a fixed-size job and the other stages the survey's growth.

Then, for each stage and worker count, it fits ``log t = a + b log N`` over the sizes and
prints the exponent ``b`` (1 = linear in N) and the same for the peak worker memory
(0 = flat in N). It also checks that no worker process was restarted or killed (the
worker addresses and process ids are the same before and after every run).

Sizes (2 cores, otherwise idle; 3-5x longer when the machine is shared): 10,000 stars take
~40 s to simulate and 40-60 s per worker count; 30,000 ~80 s and 1.5-2.5 min. 100,000
stars (``--with-100k``) need ~8 GB of simulated FITS files and ~5 min of simulation plus
5-9 min per worker count: off by default.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

STAGES = ("ingest", "preprocess", "select", "train", "validate", "infer")
BIG_SIZE = 100_000


# --------------------------------------------------------------------------- memory probes
# These run inside the worker processes (client.run) and in the client itself.

def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS counter (``VmHWM``); False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident memory of this process since the last reset, bytes (``VmHWM``)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def worker_identity() -> tuple[int, float]:
    """(pid, process start time) of this process: changes when a worker is restarted."""
    import psutil

    proc = psutil.Process()
    return proc.pid, proc.create_time()


class StageMemory:
    """Peak RSS of every worker and of the client during one block (a context manager).

    Also polls the workers every ``interval`` seconds as a fallback when the kernel's
    high-water mark cannot be reset (then the polled maximum is reported).
    """

    def __init__(self, client, interval: float = 0.25) -> None:
        self.client, self.interval = client, interval
        self.worker_peak = 0
        self.client_peak = 0
        self._polled = 0
        self._stop = threading.Event()

    def _poll(self) -> None:
        import psutil

        while not self._stop.wait(self.interval):
            try:
                rss = self.client.run(lambda: psutil.Process().memory_info().rss)
                self._polled = max(self._polled, max(rss.values(), default=0))
            except Exception:  # noqa: BLE001 - a probe must never break the benchmark
                pass

    def __enter__(self) -> "StageMemory":
        self.exact = all(self.client.run(reset_peak_rss).values()) and reset_peak_rss()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        peaks = self.client.run(peak_rss)
        self.worker_peak = max(peaks.values(), default=0) if self.exact else self._polled
        self.client_peak = peak_rss()


# --------------------------------------------------------------------------- one run

def run_stages(client, spectra: Path, labels: Path, workdir: Path, grid=None) -> dict[str, dict[str, float]]:
    """Run the pipeline's stages in order on ``client``; seconds and peak memory per stage.

    ``grid`` (a :class:`~lamost_mdwarf.grid.WavelengthGrid`, default the store default) is
    the grid of the new survey store; its chunks are sized from the workers' memory limit
    as in ``lamost-mdwarf run``.
    """
    from lamost_mdwarf.ingest import ingest
    from lamost_mdwarf.modes import DEFAULT_MODE
    from lamost_mdwarf.pipeline import WorkdirLayout
    from lamost_mdwarf.preprocessing import PreprocessConfig
    from lamost_mdwarf.selection import SelectionConfig
    from lamost_mdwarf.stages.infer import InferSettings, run_infer
    from lamost_mdwarf.stages.preprocess import run_preprocess
    from lamost_mdwarf.stages.select import run_select
    from lamost_mdwarf.stages.train import run_train
    from lamost_mdwarf.stages.validate import run_validate

    layout = WorkdirLayout(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    calls = {
        "ingest": lambda: ingest(layout.store, [spectra], client=client, grid=grid),
        "preprocess": lambda: run_preprocess(layout.store, PreprocessConfig()),
        "select": lambda: run_select(layout.store, labels, None, 3.0, SelectionConfig()),
        "train": lambda: run_train(layout.store, layout.model, mode=DEFAULT_MODE),
        "validate": lambda: run_validate(layout.store, layout.model, layout.validation),
        "infer": lambda: run_infer(layout.store, layout.model, layout.results, InferSettings()),
    }
    return measure_stages(client, calls, lambda stage, r: print(
        f"    {stage:<10} {r['seconds']:8.1f} s   worker peak {r['worker_peak'] / 2**20:7.0f} MiB   "
        f"client peak {r['client_peak'] / 2**20:7.0f} MiB", flush=True))


def measure_stages(client, calls: dict, report=None) -> dict[str, dict[str, float]]:
    """Run ``calls`` (stage name -> no-argument callable) in order; seconds and peak memory of each.

    ``report(stage, record)`` is called after each stage (e.g. to print it).
    """
    out: dict[str, dict[str, float]] = {}
    for stage, call in calls.items():
        with StageMemory(client) as memory:
            start = time.perf_counter()
            call()
            seconds = time.perf_counter() - start
        out[stage] = {"seconds": seconds, "worker_peak": memory.worker_peak, "client_peak": memory.client_peak,
                      "exact_peak": memory.exact}
        if report is not None:
            report(stage, out[stage])
    return out


def store_bytes(store: Path) -> tuple[int, int]:
    """(decoded bytes of flux, ivar and the two masks; bytes on disk) of a survey store."""
    from lamost_mdwarf.io.survey_store import open_survey_store

    ds = open_survey_store(store)
    decoded = sum(int(ds[name].nbytes) for name in ("flux", "ivar", "andmask", "ormask"))
    on_disk = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    return decoded, on_disk


def label_subset(labels: Path, n_rows: int, out: Path, seed: int = 0) -> Path:
    """``n_rows`` random rows of a CSV label catalog (all of it for 0 or more rows than it has)."""
    lines = Path(labels).read_text().splitlines(keepends=True)
    header, rows = lines[0], lines[1:]
    if n_rows <= 0 or n_rows >= len(rows):
        return Path(labels)
    keep = np.sort(np.random.default_rng(seed).choice(len(rows), size=n_rows, replace=False))
    out.write_text(header + "".join(rows[i] for i in keep))
    return out


def one_run(n_stars: int, n_workers: int, spectra: Path, labels: Path, workdir: Path, memory_limit: str,
            grid=None) -> dict:
    """A fresh local cluster of ``n_workers`` processes, the stages, and restart checks."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, memory_limit=memory_limit,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.wait_for_workers(n_workers)
        before = client.run(worker_identity)
        stages = run_stages(client, spectra, labels, workdir, grid)
        after = client.run(worker_identity)
        limit = int(next(iter(client.scheduler_info()["workers"].values()))["memory_limit"])
    decoded, on_disk = store_bytes(workdir / "store.zarr")
    return {"n_stars": n_stars, "n_workers": n_workers, "stages": stages, "memory_limit": limit,
            "workers_unchanged": before == after, "store_decoded_bytes": decoded, "store_disk_bytes": on_disk,
            "n_spectra": _n_spectra(workdir / "store.zarr"), "n_training": _n_training(workdir / "model.zarr")}


def _n_training(model: Path) -> int:
    from lamost_mdwarf.model import load_model

    return len(load_model(model).training_ids)


def _n_spectra(store: Path) -> int:
    from lamost_mdwarf.io.survey_store import open_survey_store

    return int(open_survey_store(store).sizes["star"])


# --------------------------------------------------------------------------- report

def loglog_slope(x: list[float], y: list[float]) -> float:
    """Least-squares slope of log y against log x (NaN with fewer than two sizes)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = (x > 0) & (y > 0)
    if np.unique(x[ok]).size < 2:
        return float("nan")
    return float(np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)[0])


def format_report(runs: list[dict]) -> str:
    """The per-stage table (time and peak memory per size and worker count) and the fitted exponents."""
    sizes = sorted({r["n_stars"] for r in runs})
    workers = sorted({r["n_workers"] for r in runs})
    by = {(r["n_stars"], r["n_workers"]): r for r in runs}
    lines = []
    for w in workers:
        present = [n for n in sizes if (n, w) in by]
        lines.append(f"\n{w} worker{'s' if w > 1 else ''}: seconds | peak worker RSS MiB | peak client RSS MiB")
        head = f"{'stage':<11}" + "".join(f"{f'N={n:,}':>26}" for n in present)
        head += f"{'t ~ N^b':>10}{'mem ~ N^b':>11}"
        lines.append(head)
        for stage in (*STAGES, "total"):
            cells, t, m = [], [], []
            for n in present:
                st = by[(n, w)]["stages"]
                if stage == "total":
                    sec = sum(s["seconds"] for s in st.values())
                    wpk = max(s["worker_peak"] for s in st.values())
                    cpk = max(s["client_peak"] for s in st.values())
                else:
                    sec, wpk, cpk = st[stage]["seconds"], st[stage]["worker_peak"], st[stage]["client_peak"]
                t.append(sec)
                m.append(wpk)
                cells.append(f"{sec:9.1f} |{wpk / 2**20:6.0f} |{cpk / 2**20:6.0f}")
            spectra = [by[(n, w)]["n_spectra"] for n in present]
            lines.append(f"{stage:<11}" + "".join(f"{c:>26}" for c in cells)
                         + f"{loglog_slope(spectra, t):>10.2f}{loglog_slope(spectra, m):>11.2f}")
        lines.append(f"{'spectra':<11}" + "".join(f"{by[(n, w)]['n_spectra']:>26,}" for n in present))
        lines.append(f"{'training':<11}" + "".join(f"{by[(n, w)]['n_training']:>26,}" for n in present))
        lines.append(f"{'store MiB':<11}" + "".join(
            f"{by[(n, w)]['store_decoded_bytes'] / 2**20:>15,.0f} decoded,{by[(n, w)]['store_disk_bytes'] / 2**20:>6,.0f} disk"
            .rjust(26) for n in present))
    if len(workers) > 1:
        lines.append("\nspeed-up of the total time, " + " vs ".join(f"{w}" for w in workers) + " workers: " + ", ".join(
            f"N={n:,}: " + "/".join(f"{sum(s['seconds'] for s in by[(n, workers[0])]['stages'].values()) / sum(s['seconds'] for s in by[(n, w)]['stages'].values()):.2f}x"
                                    for w in workers[1:])
            for n in sizes if all((n, w) in by for w in workers)))
    limits = {r["memory_limit"] for r in runs}
    unchanged = all(r["workers_unchanged"] for r in runs)
    lines.append(f"worker memory limit: {', '.join(f'{v / 2**20:.0f} MiB' for v in sorted(limits))}; "
                 f"workers restarted or killed: {'none' if unchanged else 'YES (see the JSON)'}")
    lines.append("exponent b: least-squares slope of log(value) against log(number of spectra) over the sizes")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000],
                        help="simulated stars per survey (default: 10000 30000)")
    parser.add_argument("--with-100k", action="store_true",
                        help="also run 100,000 stars (~8 GB of FITS files; about 1.5-2.5 h on 2 cores)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default: 1 2)")
    parser.add_argument("--memory-limit", default="2GiB", help="memory limit per worker (default 2GiB)")
    parser.add_argument("--label-rows", type=int, default=1500,
                        help="random rows of the label catalog kept (default 1500; 0 keeps all, see above)")
    parser.add_argument("--grid", default=None, metavar="START:STOP:STEP",
                        help="rest-frame grid of the stores, Angstrom (default 4500:7500:1)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where simulated surveys are kept (reused) and runs are done (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directories of the runs")
    parser.add_argument("--json", type=Path, default=None, help="write the raw measurements here")
    args = parser.parse_args(argv)

    sizes = sorted(set(args.sizes) | ({BIG_SIZE} if args.with_100k else set()))
    if max(sizes) >= BIG_SIZE:
        print(f"note: {max(sizes):,} stars need ~{max(sizes) * 80 / 1e6:.0f} GB of simulated FITS files and take "
              "~20 min on 2 idle cores (about an hour on a shared machine): simulation plus one run per worker "
              "count", file=sys.stderr)
    else:
        print(f"sizes {', '.join(f'{n:,}' for n in sizes)}; add --with-100k for 100,000 stars "
              "(~8 GB of FITS files, ~20 min more on 2 idle cores)", file=sys.stderr)

    from lamost_mdwarf.simulate.survey import simulate_survey

    grid = None
    if args.grid:
        from lamost_mdwarf.grid import WavelengthGrid

        start, stop, step = (float(v) for v in args.grid.split(":"))
        grid = WavelengthGrid(start, stop, step)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench_scaling_"))
    root.mkdir(parents=True, exist_ok=True)
    runs = []
    for n in sizes:
        survey_dir = root / f"survey-{n}-seed{args.seed}"
        start = time.perf_counter()
        if (survey_dir / "truth.csv").exists():
            survey = _existing_survey(survey_dir)
            print(f"N={n:,}: reusing {survey_dir}", flush=True)
        else:
            survey = simulate_survey(survey_dir, n_stars=n, seed=args.seed, n_workers=max(args.workers),
                                     overwrite=True)
            print(f"N={n:,}: simulated in {time.perf_counter() - start:.0f} s", flush=True)
        for w in args.workers:
            run_dir = root / f"run-{n}-w{w}"
            shutil.rmtree(run_dir, ignore_errors=True)
            print(f"  N={n:,}, {w} worker(s), {args.memory_limit} each", flush=True)
            run_dir.mkdir(parents=True)
            labels = label_subset(Path(survey.labels_path), args.label_rows, run_dir / "labels_subset.csv")
            runs.append(one_run(n, w, Path(survey.spectra_dir), labels, run_dir / "work", args.memory_limit,
                                grid))
            if not args.keep:
                shutil.rmtree(run_dir, ignore_errors=True)
    report = format_report(runs)
    print(report)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    if not args.workdir and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if all(r["workers_unchanged"] for r in runs) else 1


def _existing_survey(survey_dir: Path):
    """A :class:`SimulatedSurvey`-like record of a survey simulated earlier in ``survey_dir``."""
    from types import SimpleNamespace

    return SimpleNamespace(spectra_dir=survey_dir / "spectra", labels_path=survey_dir / "labels_tcd.csv")


if __name__ == "__main__":
    sys.exit(main())
