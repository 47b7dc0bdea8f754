"""Simulate a LAMOST-like M-dwarf survey on disk: FITS spectra, a label table, the truth.

:func:`simulate_survey` is the entry point (``lamost-mdwarf simulate``). Layout::

    OUTDIR/spectra/dr1/spec-LMJD-PLANID_spSS-FFF.fits      original DR1 layout
    OUTDIR/spectra/dr7/spec-LMJD-PLANID_spSS-FFF.fits.gz   DR5-DR8 5-row image layout
    OUTDIR/spectra/dr9/spec-LMJD-PLANID_spSS-FFF.fits.gz   DR9 COADD binary-table layout
    OUTDIR/labels_tcd.csv    TESS-Cool-Dwarf-Catalog-like labels (one row per object)
    OUTDIR/truth.csv         one row per FILE (see TRUTH_COLUMNS)
    OUTDIR/simulation.json   seed, sizes and package version

How it works: the population, the label table and the full observing plan are drawn
in the calling process from ``numpy.random.default_rng([seed, k])`` streams
(:mod:`~lamost_mdwarf.simulate.population`, :mod:`~lamost_mdwarf.simulate.catalog`,
:mod:`~lamost_mdwarf.simulate.plan`). The observations are then cut into fixed batches
of 64; each batch (spectral synthesis vectorised over its stars, then noise and
artefacts per spectrum, then FITS writing) runs in a process pool with its own stream
``default_rng([seed, 4, batch_index])``. Batches do not depend on the number of
workers, so a given seed gives byte-identical files for any ``n_workers``.
"""
from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lamost_mdwarf._version import __version__
from lamost_mdwarf.io.lamost_writer import write_lamost_spectrum
from lamost_mdwarf.simulate.catalog import LABEL_COLUMNS, LabelCatalog, draw_label_catalog
from lamost_mdwarf.simulate.headers import lamost_header_cards
from lamost_mdwarf.simulate.instrument import ObservingConditions, native_wavelength, observe
from lamost_mdwarf.simulate.plan import LAYOUT_OF_RELEASE, SurveyPlan, draw_plan
from lamost_mdwarf.simulate.population import StarPopulation, draw_population
from lamost_mdwarf.simulate.spectra import sample_fine_spectra, synthesize_fine

__all__ = ["TRUTH_COLUMNS", "BATCH_SIZE", "SimulatedSurvey", "simulate_survey"]

#: Observations per worker task. Fixed, so that results do not depend on the pool size.
BATCH_SIZE = 64

#: Columns of truth.csv (one row per file).
TRUTH_COLUMNS = (
    "spectrum_id", "star_id", "path", "layout", "data_release", "is_rereduction", "obsid", "lmjd", "planid",
    "spid", "fiberid", "designation", "ra", "dec", "kind", "subclass", "teff", "radius", "mass", "luminosity",
    "logg", "feh", "is_binary", "companion_teff", "halpha_ew", "blue_excess", "z_true", "z_header",
    "z_in_header", "z_missing", "snr_u", "snr_g", "snr_r", "snr_i", "snr_z", "snr_lambda", "snr_lambda_header",
    "n_cosmic_rays", "coeff0", "n_pixels", "n_ivar_zero", "in_label_catalog", "tic", "catalog_outlier",
)

_STREAM_POPULATION, _STREAM_PLAN, _STREAM_CATALOG, _STREAM_BATCH = 1, 2, 3, 4
_OUTPUTS = ("spectra", "labels_tcd.csv", "truth.csv", "simulation.json")


@dataclass(frozen=True)
class SimulatedSurvey:
    """Where a simulated survey was written and what it contains.

    Attributes
    ----------
    outdir : pathlib.Path
        The survey directory.
    spectra_dir : pathlib.Path
        ``outdir / "spectra"`` (sub-directories ``dr1``, ``dr7``, ``dr9``).
    labels_path : pathlib.Path
        The TCD-like label table (CSV).
    truth_path : pathlib.Path
        The truth table (CSV, one row per file; ``path`` is relative to ``outdir``).
    n_stars : int
        Simulated objects (all kinds).
    n_observations : int
        Distinct observations (a star observed twice counts twice).
    n_files : int
        FITS files written (observations plus re-reductions).
    n_label_rows : int
        Rows of the label table.
    seed : int
        The seed.
    elapsed_s : float
        Wall-clock time of the simulation, seconds.
    """

    outdir: Path
    spectra_dir: Path
    labels_path: Path
    truth_path: Path
    n_stars: int
    n_observations: int
    n_files: int
    n_label_rows: int
    seed: int
    elapsed_s: float

    def spectrum_paths(self) -> list[Path]:
        """Absolute paths of all FITS files, sorted."""
        return sorted(p for p in self.spectra_dir.rglob("spec-*.fits*") if p.is_file())


# --------------------------------------------------------------------------- workers


def _batch_tasks(
    outdir: Path, seed: int, plan: SurveyPlan, population: StarPopulation
) -> list[dict[str, Any]]:
    files_of_obs: dict[int, list[tuple[int, str, str]]] = {}
    for file_index in range(plan.n_files):
        obs = int(plan.files["observation"][file_index])
        files_of_obs.setdefault(obs, []).append(
            (file_index, str(plan.files["release"][file_index]), plan.file_name(file_index))
        )
    tasks = []
    for batch_index, start in enumerate(range(0, plan.n_observations, BATCH_SIZE)):
        obs_indices = list(range(start, min(start + BATCH_SIZE, plan.n_observations)))
        stars = plan.observations["star_id"][obs_indices]
        tasks.append(
            {
                "outdir": str(outdir),
                "seed": seed,
                "batch_index": batch_index,
                "observations": [plan.observation_row(i) for i in obs_indices],
                "files": [files_of_obs[i] for i in obs_indices],
                "teff": population.teff[stars],
                "radius": population.radius[stars],
                "mass": population.mass[stars],
                "feh": population.feh[stars],
                "halpha_ew": population.halpha_ew[stars],
                "is_binary": population.is_binary[stars],
                "companion_teff": population.companion_teff[stars],
                "companion_radius": population.companion_radius[stars],
                "companion_mass": population.companion_mass[stars],
            }
        )
    return tasks


def _conditions(obs: dict[str, Any]) -> ObservingConditions:
    band_snr = tuple(max(float(obs[f"snr_{band}"]), 0.3) for band in "ugriz")
    return ObservingConditions(
        band_snr=band_snr,
        flux_scale=float(obs["flux_scale"]),
        throughput_coeffs=tuple(float(v) for v in obs["throughput"]),
        join_step=float(obs["join_step"]),
        join_centre_a=float(obs["join_centre"]),
        join_noise=float(obs["join_noise"]),
        o2_strength=float(obs["o2_strength"]),
        h2o_strength=float(obs["h2o_strength"]),
        sky_amplitude=float(obs["sky_amplitude"]),
        sky_residual=float(obs["sky_residual"]),
        blue_excess_amplitude=float(obs["blue_excess_amplitude"]),
        blue_excess_scale_a=float(obs["blue_excess_scale"]),
        n_cosmic_rays=int(obs["n_cosmic_rays"]),
    )


def _simulate_batch(task: dict[str, Any]) -> list[tuple[int, int]]:
    """Synthesise, observe and write one batch; returns (file index, n ivar==0) pairs."""
    rng = np.random.default_rng([task["seed"], _STREAM_BATCH, task["batch_index"]])
    fine = synthesize_fine(task["teff"], task["radius"], task["mass"], feh_dex=task["feh"], halpha_ew_a=task["halpha_ew"])
    binary = np.flatnonzero(task["is_binary"])
    if binary.size:
        fine[binary] += synthesize_fine(
            task["companion_teff"][binary], task["companion_radius"][binary], task["companion_mass"][binary],
            feh_dex=task["feh"][binary],
        )
    outdir = Path(task["outdir"])
    results = []
    for row, (obs, files) in enumerate(zip(task["observations"], task["files"])):
        wavelength = native_wavelength(obs["coeff0"], obs["coeff1"], obs["n_pixels"])
        stellar = sample_fine_spectra(fine[row : row + 1], np.log10(wavelength), obs["z_true"])[0]
        spectrum = observe(stellar, wavelength, _conditions(obs), rng)
        n_bad = int(np.count_nonzero(spectrum.ivar == 0))
        for file_index, release, relative in files:
            layout = LAYOUT_OF_RELEASE[release]
            name = relative.rsplit("/", 1)[-1].removesuffix(".gz")
            extra: dict[str, np.ndarray] = {}
            if layout == "dr1_image":
                extra["subcontinuum"] = spectrum.subcontinuum
            else:
                extra["wavelength"] = wavelength.astype(np.float32)
            if layout == "coadd_table":
                extra["normalization"] = (
                    spectrum.subcontinuum if int(obs["norm"]) else np.full(wavelength.size, -9999.0, dtype=np.float32)
                )
            write_lamost_spectrum(
                outdir / relative,
                layout,
                flux=spectrum.flux,
                ivar=spectrum.ivar,
                andmask=spectrum.andmask,
                ormask=spectrum.ormask,
                header_cards=lamost_header_cards(obs, release, name),
                **extra,
            )
            results.append((file_index, n_bad))
    return results


# --------------------------------------------------------------------------- tables


def _fmt(value: float, spec: str) -> str:
    return "" if value is None or not math.isfinite(value) else format(value, spec)


def _write_labels(path: Path, catalog: LabelCatalog) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(LABEL_COLUMNS)
        writer.writerows(catalog.rows())


def _write_truth(
    path: Path, plan: SurveyPlan, population: StarPopulation, catalog: LabelCatalog, n_ivar_zero: dict[int, int]
) -> None:
    star_tic = np.full(len(population), -1, dtype=np.int64)
    star_outlier = np.zeros(len(population), dtype=bool)
    observed_rows = catalog.star_id >= 0
    star_tic[catalog.star_id[observed_rows]] = catalog.tic[observed_rows]
    star_outlier[catalog.star_id[observed_rows]] = catalog.is_outlier[observed_rows]
    o = plan.observations
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(TRUTH_COLUMNS)
        for file_index in range(plan.n_files):
            i = int(plan.files["observation"][file_index])
            release = str(plan.files["release"][file_index])
            s = int(o["star_id"][i])
            snr = [float(o[f"snr_{band}"][i]) for band in "ugriz"]
            header_snr = [min(v, 99.0) for v in snr] if release == "DR1" else snr
            z_in_header = o["z_missing"][i] == ""
            writer.writerow(
                (
                    plan.base_name(i).removeprefix("spec-"), s, plan.file_name(file_index), LAYOUT_OF_RELEASE[release],
                    release, bool(plan.files["is_rereduction"][file_index]), int(o["obsid"][i]), int(o["lmjd"][i]),
                    o["planid"][i], int(o["spid"][i]), int(o["fiberid"][i]), o["designation"][i],
                    f"{o['ra'][i]:.10f}", f"{o['dec'][i]:.10f}", population.kind[s], o["subclass"][i],
                    f"{population.teff[s]:.2f}", f"{population.radius[s]:.6f}", f"{population.mass[s]:.6f}",
                    f"{population.luminosity[s]:.8f}", f"{population.logg[s]:.5f}", f"{population.feh[s]:.4f}",
                    bool(population.is_binary[s]), _fmt(population.companion_teff[s], ".2f"),
                    f"{population.halpha_ew[s]:.3f}", bool(o["blue_excess"][i]), f"{o['z_true'][i]:.10f}",
                    _fmt(round(o["z_header"][i], 8), ".8f") if z_in_header else "", bool(z_in_header),
                    o["z_missing"][i], *(f"{v:.2f}" for v in snr), f"{sum(snr):.2f}", f"{sum(header_snr):.2f}",
                    int(o["n_cosmic_rays"][i]), f"{o['coeff0'][i]:.4f}", int(o["n_pixels"][i]),
                    n_ivar_zero[file_index], bool(star_tic[s] >= 0), int(star_tic[s]), bool(star_outlier[s]),
                )
            )


# --------------------------------------------------------------------------- entry point


def _prepare_outdir(outdir: Path, overwrite: bool) -> None:
    existing = [outdir / name for name in _OUTPUTS if (outdir / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{outdir} already holds a simulated survey ({', '.join(p.name for p in existing)}); "
            "choose another directory or pass overwrite=True"
        )
    for path in existing:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    for release in ("dr1", "dr7", "dr9"):
        (outdir / "spectra" / release).mkdir(parents=True, exist_ok=True)


def simulate_survey(
    outdir: str | os.PathLike,
    n_stars: int = 5000,
    seed: int = 0,
    n_workers: int | None = None,
    *,
    overwrite: bool = False,
) -> SimulatedSurvey:
    """Write a LAMOST-like M-dwarf survey (spectra, label table, truth table).

    Parameters
    ----------
    outdir : str or path-like
        Output directory (created if needed).
    n_stars : int, optional
        Number of simulated objects (M dwarfs, late M dwarfs and non-M contaminants);
        ~10 % are observed two or three times, so there are ~1.13 files per object.
    seed : int, optional
        Non-negative seed; the same seed gives byte-identical files and tables.
    n_workers : int, optional
        Worker processes (default: the CPUs available to this process); 1 runs in this
        process. Workers are started with the ``spawn`` method.
    overwrite : bool, optional
        Replace an existing simulated survey in ``outdir``: ``spectra/`` (the whole
        tree), ``labels_tcd.csv``, ``truth.csv`` and ``simulation.json`` are removed first;
        nothing else is touched. Without it, any of them existing raises
        ``FileExistsError``.

    Returns
    -------
    SimulatedSurvey

    Raises
    ------
    ValueError
        For ``n_stars < 1``, a negative or non-integer seed, or ``n_workers < 1``.
    FileExistsError
        If ``outdir`` already contains a survey and ``overwrite`` is false.
    """
    if isinstance(n_stars, bool) or int(n_stars) != n_stars or n_stars < 1:
        raise ValueError(f"n_stars must be a positive integer, got {n_stars!r}")
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if n_workers is not None and (int(n_workers) != n_workers or n_workers < 1):
        raise ValueError(f"n_workers must be a positive integer or None, got {n_workers!r}")
    n_stars, seed = int(n_stars), int(seed)
    if n_workers is None:
        n_workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n_workers = int(n_workers)
    started = time.perf_counter()
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    _prepare_outdir(outdir, overwrite)

    population = draw_population(n_stars, np.random.default_rng([seed, _STREAM_POPULATION]))
    plan = draw_plan(population, np.random.default_rng([seed, _STREAM_PLAN]))
    catalog = draw_label_catalog(
        population, plan.star_ra, plan.star_dec, np.random.default_rng([seed, _STREAM_CATALOG])
    )
    ids = {(int(plan.observations["lmjd"][i]), plan.observations["planid"][i], int(plan.observations["spid"][i]),
            int(plan.observations["fiberid"][i])) for i in range(plan.n_observations)}
    if len(ids) != plan.n_observations:  # pragma: no cover - guards the plan's construction
        raise RuntimeError("simulated observation identifiers are not unique")

    tasks = _batch_tasks(outdir, seed, plan, population)
    n_ivar_zero: dict[int, int] = {}
    workers = min(n_workers, len(tasks))
    if workers <= 1:
        batches = map(_simulate_batch, tasks)
        for batch in batches:
            n_ivar_zero.update(batch)
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            for batch in pool.map(_simulate_batch, tasks):
                n_ivar_zero.update(batch)

    labels_path = outdir / "labels_tcd.csv"
    truth_path = outdir / "truth.csv"
    _write_labels(labels_path, catalog)
    _write_truth(truth_path, plan, population, catalog, n_ivar_zero)
    elapsed = time.perf_counter() - started
    summary = {
        "generator": "lamost_mdwarf.simulate.survey.simulate_survey",
        "version": __version__,
        "seed": seed,
        "n_stars": n_stars,
        "n_observations": plan.n_observations,
        "n_files": plan.n_files,
        "n_label_rows": len(catalog),
        "batch_size": BATCH_SIZE,
    }
    (outdir / "simulation.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return SimulatedSurvey(
        outdir=outdir,
        spectra_dir=outdir / "spectra",
        labels_path=labels_path,
        truth_path=truth_path,
        n_stars=n_stars,
        n_observations=plan.n_observations,
        n_files=plan.n_files,
        n_label_rows=len(catalog),
        seed=seed,
        elapsed_s=elapsed,
    )
