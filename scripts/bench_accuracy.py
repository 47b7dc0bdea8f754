"""Accuracy benchmark: ``--mode paper`` against ``--mode best`` on simulated surveys, against the truth.

For each seed a LAMOST-like survey is simulated (``lamost_mdwarf.simulate``; its label
catalog is TESS-Cool-Dwarf-like: Teff errors 100-160 K, R/M/L from the noisy Teff through
the Mann relations, ~5 % unresolved binaries, ~1 % photometry outliers) and the whole
pipeline (``run_pipeline``) runs once per mode on it (the second mode reuses the first's
survey store: ingest, preprocessing and selection do not depend on the mode). The
results are compared with the simulator's truth:

* scatter: standard deviation (and 1.4826 MAD) of ``result - truth`` for the quality
  sample (``flags == 0``) restricted to single M0-M6 dwarfs (truth ``kind == m_dwarf``,
  not binary), per label and per SNR_lambda bin;
* pull width: standard deviation of ``(result - truth) / reported error`` on the same
  stars (1 = calibrated errors), per SNR_lambda bin and per true-Teff bin; for the
  ``best`` mode also the range of the Teff pull width implied by the statistical
  uncertainty of its systematic error term (``variance_error``, estimated from residuals
  against catalog labels with 100-160 K errors: +-1 sigma of that variance);
* completeness: among eligible spectra (passing the selection cuts, true M dwarfs of
  kind ``m_dwarf``, single), the fraction with finite positive labels, and the fraction
  in the quality sample (``flags == 0``);
* contamination: among the quality sample, the stars that are not M dwarfs at all
  (truth ``kind == "contaminant"``: K/G stars); reported separately, the late M dwarfs
  (``kind == "late_m"``, M7-M9: true Teff < 2900 K, outside the M0-M6 range the method is
  for; the simulator's header subclasses put the M6/M7 boundary at 2875 K, so stars of
  2875-2900 K are M6 by the survey's own convention) and the unresolved binaries.

Usage::

    python scripts/bench_accuracy.py --out /tmp/bench_accuracy --n-stars 4000 --seeds 101 202 303

Prints per-survey and pooled tables (markdown) and the total run time.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

LABELS = ("teff", "radius", "mass", "luminosity")
UNITS = {"teff": "K", "radius": "Rsun", "mass": "Msun", "luminosity": "Lsun"}
SNR_BINS = ((50, 75), (75, 100), (100, 150), (150, 250), (250, np.inf))
TEFF_BINS = ((2900, 3100), (3100, 3300), (3300, 3500), (3500, 3700), (3700, 3900), (3900, 4300))


def robust_std(x: np.ndarray) -> float:
    """1.4826 x median absolute deviation (NaN-free input)."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return float("nan")
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


def load_comparison(results_path: Path, truth_path: Path) -> pd.DataFrame:
    """One row per stored spectrum: results next to the truth."""
    import lamost_mdwarf

    res = lamost_mdwarf.open_results(results_path)
    columns = ["spectrum_id", "subset", "flags", "snr_lambda", "n_clipped"]
    for name in LABELS:
        columns += [name, f"{name}_err"]
    data = {name: np.asarray(res[name].values) for name in columns if name in res.variables}
    frame = pd.DataFrame(data)
    frame["spectrum_id"] = frame["spectrum_id"].astype(str)
    frame["subset"] = frame["subset"].astype(str)
    truth = pd.read_csv(truth_path).drop_duplicates("spectrum_id").set_index("spectrum_id")
    truth = truth.loc[frame["spectrum_id"]]
    for name in LABELS:
        frame[f"true_{name}"] = truth[name].to_numpy(float)
    frame["kind"] = truth["kind"].astype(str).to_numpy()
    frame["is_binary"] = truth["is_binary"].astype(bool).to_numpy()
    frame["n_cosmic_rays"] = truth["n_cosmic_rays"].to_numpy()
    return frame


def quality_and_single(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Quality sample (``flags == 0``) and single M0-M6 dwarfs (truth), as boolean arrays."""
    good = frame["flags"].to_numpy() == 0
    single = (frame["kind"].to_numpy() == "m_dwarf") & ~frame["is_binary"].to_numpy()
    return good, single


def evaluate(frame: pd.DataFrame) -> dict:
    """Scatter, pulls, completeness and contamination of one results/truth table."""
    good, single_m = quality_and_single(frame)
    eligible = (frame["subset"].to_numpy() != "excluded") & single_m
    labels = frame[list(LABELS)].to_numpy(float)
    finite = np.all(np.isfinite(labels) & (labels > 0), axis=1)
    sample = good & single_m
    snr = frame["snr_lambda"].to_numpy(float)
    out: dict = {
        "n_eligible": int(eligible.sum()),
        "completeness_finite": float(finite[eligible].mean()),
        "completeness_quality": float(good[eligible].mean()),
        "n_quality": int(good.sum()),
        "n_sample": int(sample.sum()),
        "contamination_non_m": float((frame["kind"].to_numpy()[good] == "contaminant").mean()),
        "n_non_m": int((frame["kind"].to_numpy()[good] == "contaminant").sum()),
        "n_late_m": int((frame["kind"].to_numpy()[good] == "late_m").sum()),
        "late_m_true_teff": [float(v) for v in frame["true_teff"].to_numpy()[good & (frame["kind"].to_numpy()
                                                                                        == "late_m")]],
        "binary_fraction": float(frame["is_binary"].to_numpy()[good].mean()),
        "labels": {},
    }
    for name in LABELS:
        resid = frame[name].to_numpy(float) - frame[f"true_{name}"].to_numpy(float)
        pull = resid / frame[f"{name}_err"].to_numpy(float)
        entry = {"std": float(np.std(resid[sample], ddof=1)), "robust": robust_std(resid[sample]),
                 "bias": float(np.median(resid[sample])), "pull": float(np.std(pull[sample], ddof=1)),
                 "pull_robust": robust_std(pull[sample]), "bins": []}
        entry["bins"] = _binned(resid, pull, sample, snr, SNR_BINS)
        entry["teff_bins"] = _binned(resid, pull, sample, frame["true_teff"].to_numpy(float), TEFF_BINS)
        out["labels"][name] = entry
    return out


def _binned(resid: np.ndarray, pull: np.ndarray, sample: np.ndarray, value: np.ndarray,
            bins: tuple[tuple[float, float], ...]) -> list[dict]:
    """Scatter and pull width of ``sample`` stars in bins of ``value``."""
    out = []
    for lo, hi in bins:
        in_bin = sample & (value >= lo) & (value < hi)
        n = int(in_bin.sum())
        out.append({"lo": lo, "hi": hi, "n": n,
                    "std": float(np.std(resid[in_bin], ddof=1)) if n > 2 else float("nan"),
                    "pull": float(np.std(pull[in_bin], ddof=1)) if n > 2 else float("nan")})
    return out


def teff_pull_range(frame: pd.DataFrame, model_path: Path) -> dict | None:
    """Teff pull width if the model's systematic variance were +-1 sigma of its estimate.

    The ``best`` mode's systematic Teff term is estimated from residuals against catalog
    labels whose errors (100-160 K) are several times the term itself; its variance is
    uncertain by ``variance_error`` (K^2). Returns the pull widths with that variance
    added to / removed from every star's reported variance (removal clipped at the
    formal part), or ``None`` for models without the term.
    """
    from lamost_mdwarf.model import load_model

    validation = load_model(model_path).settings.get("validation") or {}
    fit = (validation.get("systematic") or {}).get("teff")
    if fit is None:
        return None
    good, single = quality_and_single(frame)
    sample = good & single
    resid = (frame["teff"].to_numpy(float) - frame["true_teff"].to_numpy(float))[sample]
    err2 = frame["teff_err"].to_numpy(float)[sample] ** 2
    delta = float(fit["variance_error"])
    removable = np.minimum(delta, float(fit["sigma"]) ** 2)
    return {"sigma": float(fit["sigma"]), "variance_error": delta,
            "pull": float(np.std(resid / np.sqrt(err2), ddof=1)),
            "pull_if_lower": float(np.std(resid / np.sqrt(err2 - removable), ddof=1)),
            "pull_if_higher": float(np.std(resid / np.sqrt(err2 + delta), ddof=1))}


def pooled(frames: list[pd.DataFrame]) -> dict:
    """Evaluate the concatenation of several surveys."""
    return evaluate(pd.concat(frames, ignore_index=True))


def _binned_table(metrics: dict[str, dict], key: str, quantity: str, headers: list[str]) -> list[str]:
    """Markdown rows: scatter / pull width (n stars) per bin ``metrics[mode]["labels"][label][key]``."""
    lines = ["", f"Per {quantity} bin (scatter / pull width; n stars):", "",
             "| label | mode | " + " | ".join(headers) + " |", "|---|---|" + "---|" * len(headers)]
    for label in LABELS:
        for m in metrics:
            cells = [f"{b['std']:.3g} / {b['pull']:.2f} ({b['n']})" for b in metrics[m]["labels"][label][key]]
            lines.append(f"| {label} | {m} | " + " | ".join(cells) + " |")
    return lines


def format_tables(name: str, metrics: dict[str, dict]) -> str:
    """Markdown tables comparing modes for one survey (or the pooled surveys)."""
    modes = list(metrics)
    lines = [f"### {name}", "",
             "| label | " + " | ".join(f"{m} std | {m} robust | {m} pull" for m in modes) + " |",
             "|---|" + "---|---|---|" * len(modes)]
    for label in LABELS:
        row = [f"{label} ({UNITS[label]})"]
        for m in modes:
            e = metrics[m]["labels"][label]
            row += [f"{e['std']:.4g}", f"{e['robust']:.4g}", f"{e['pull']:.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines += _binned_table(metrics, "bins", "SNR_lambda", [f"{lo}-{hi:g}" for lo, hi in SNR_BINS])
    lines += _binned_table(metrics, "teff_bins", "true-Teff", [f"{lo}-{hi} K" for lo, hi in TEFF_BINS])
    for m in modes:
        span = metrics[m].get("teff_pull_range")
        if span:
            lines += ["", f"{m}: systematic Teff term {span['sigma']:.1f} K, its variance uncertain by "
                          f"+-{span['variance_error']:.0f} K^2 (catalog noise); Teff pull width {span['pull']:.2f}, "
                          f"{span['pull_if_higher']:.2f}-{span['pull_if_lower']:.2f} within +-1 sigma of that term"]
    lines += ["", "| mode | eligible | finite labels | flags == 0 | quality sample | not M dwarfs (contamination) "
                  "| late M (true Teff) | binaries in quality sample |", "|---|---|---|---|---|---|---|---|"]
    for m in modes:
        e = metrics[m]
        late = ", ".join(f"{t:.0f}" for t in sorted(e["late_m_true_teff"])[:6])
        late += ", ..." if len(e["late_m_true_teff"]) > 6 else ""
        lines.append(f"| {m} | {e['n_eligible']} | {100 * e['completeness_finite']:.2f}% | "
                     f"{100 * e['completeness_quality']:.1f}% | {e['n_quality']} | "
                     f"{e['n_non_m']} ({100 * e['contamination_non_m']:.2f}%) | {e['n_late_m']} ({late}) | "
                     f"{100 * e['binary_fraction']:.1f}% |")
    return "\n".join(lines)


def run_survey(out: Path, seed: int, n_stars: int, modes: list[str], client, workers: int) -> dict[str, Path]:
    """Simulate (if needed) and run the pipeline in every mode; returns results paths."""
    from lamost_mdwarf.pipeline import run_pipeline
    from lamost_mdwarf.simulate.survey import simulate_survey

    survey_dir = out / f"survey_{seed}"
    if not (survey_dir / "truth.csv").exists():
        simulate_survey(survey_dir, n_stars=n_stars, seed=seed, n_workers=workers, overwrite=True)
    paths = {}
    first_store: Path | None = None
    for mode in modes:
        work = out / f"work_{seed}_{mode}"
        if first_store is not None and not (work / "store.zarr").exists():
            work.mkdir(parents=True, exist_ok=True)
            shutil.copytree(first_store, work / "store.zarr")
        t0 = time.perf_counter()
        run_pipeline([survey_dir / "spectra"], survey_dir / "labels_tcd.csv", work, client, mode=mode,
                     make_figures=False)
        print(f"  seed {seed} mode {mode}: pipeline {time.perf_counter() - t0:.1f} s", flush=True)
        first_store = first_store or work / "store.zarr"
        paths[mode] = work / "results.zarr"
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_accuracy"))
    parser.add_argument("--n-stars", type=int, default=4000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[101, 202, 303])
    parser.add_argument("--modes", nargs="+", default=["paper", "best"])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    frames: dict[str, list[pd.DataFrame]] = {m: [] for m in args.modes}
    report = []
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        for seed in args.seeds:
            paths = run_survey(args.out, seed, args.n_stars, args.modes, client, args.workers)
            metrics = {}
            for mode, path in paths.items():
                frame = load_comparison(path, args.out / f"survey_{seed}" / "truth.csv")
                frames[mode].append(frame)
                metrics[mode] = evaluate(frame)
                metrics[mode]["teff_pull_range"] = teff_pull_range(frame, path.parent / "model.zarr")
            (args.out / f"metrics_{seed}.json").write_text(json.dumps(metrics, indent=1))
            text = format_tables(f"survey seed {seed} ({args.n_stars} stars)", metrics)
            report.append(text)
            print(text + "\n", flush=True)
    metrics = {mode: pooled(f) for mode, f in frames.items()}
    (args.out / "metrics_pooled.json").write_text(json.dumps(metrics, indent=1))
    text = format_tables(f"all {len(args.seeds)} surveys pooled", metrics)
    report.append(text)
    print(text)
    elapsed = time.perf_counter() - start
    print(f"\ntotal run time: {elapsed:.0f} s ({len(args.seeds)} surveys x {len(args.modes)} modes, "
          f"{args.workers} workers)")
    (args.out / "report.md").write_text("\n\n".join(report) + f"\n\ntotal run time: {elapsed:.0f} s\n")


if __name__ == "__main__":
    main()
