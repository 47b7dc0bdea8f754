"""The ``lamost-mdwarf`` command line."""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import click

from lamost_mdwarf._version import __version__
from lamost_mdwarf.cluster import cluster_options, dask_client_from_options
from lamost_mdwarf.grid import WavelengthGrid


class _Progress:
    """A click progress bar driven by ``(done, total)`` callbacks."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar = None
        self.done = 0

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr, show_pos=True)
            self.bar.__enter__()
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


def _mode_option(default: str | None):
    """``--mode paper|best`` (see lamost_mdwarf.modes)."""
    from lamost_mdwarf.modes import MODES

    if default is None:
        help_text = ("Check that the model was trained in this mode (paper|best); default: the model's own mode, "
                     "recorded with it.")
    else:
        help_text = ("paper: Galgano et al. 2020 exactly (catalog labels, SNR>250 training set, SNR error model). "
                     "best: latent training labels anchored to the catalog (Teff + 2 latent labels, R/M/L derived), "
                     "robust clipped test step, cross-validated calibrated errors. See docs/bench_accuracy.md.")
    return click.option("--mode", type=click.Choice(list(MODES)), default=default, show_default=default is not None,
                        help=help_text)


def _check_model_mode(model_path: str, mode: str | None) -> None:
    """Refuse to validate/infer with a model trained in another mode than the one asked for."""
    if mode is None:
        return
    from lamost_mdwarf.model import load_model
    from lamost_mdwarf.modes import mode_from_settings

    trained = mode_from_settings(load_model(model_path).settings).name
    if trained != mode:
        raise click.ClickException(f"{model_path} was trained in mode {trained!r}, not {mode!r}; retrain with "
                                   f"`lamost-mdwarf train --mode {mode}`")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lamost-mdwarf")
def main() -> None:
    """M-dwarf Teff, radius, mass and luminosity from LAMOST spectra with The Cannon."""


@main.command()
@click.argument("outdir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--n-stars", default=5000, show_default=True, type=click.IntRange(min=1), help="Number of stars.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Random seed (same seed, same survey).")
@click.option("--n-workers", default=None, type=click.IntRange(min=1), help="Processes (default: all cores).")
@click.option("--overwrite", is_flag=True, help="Replace a survey already in OUTDIR.")
def simulate(outdir: Path, n_stars: int, seed: int, n_workers: int | None, overwrite: bool) -> None:
    """Write a simulated LAMOST-like survey (FITS files, label table, truth) to OUTDIR."""
    from lamost_mdwarf.simulate.survey import simulate_survey

    try:
        result = simulate_survey(outdir, n_stars=n_stars, seed=seed, n_workers=n_workers, overwrite=overwrite)
    except FileExistsError as exc:
        raise click.ClickException(f"{exc} (use --overwrite to replace it)") from None
    click.echo(f"simulated {result.n_stars} stars in {result.n_files} files")
    click.echo(f"  spectra: {result.spectra_dir}")
    click.echo(f"  labels:  {result.labels_path}")
    click.echo(f"  truth:   {result.truth_path}")


@main.command()
@click.argument("store", type=str)
@click.argument("paths", nargs=-1, required=True, type=str)
@click.option("--release", default=None, help="Release label for the new spectra (default: the file's DATA_V).")
@click.option("--grid", "grid_spec", default=None, metavar="START:STOP:STEP",
              help="Rest-frame grid of a NEW store in Angstrom (default 4500:7500:1).")
@click.option("--chunk-stars", default=None, type=click.IntRange(min=1),
              help="Stars per chunk of a NEW store (default: ~24 MB flux chunks).")
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1),
              help="Files read per worker task.")
@cluster_options
def ingest(store: str, paths: Sequence[str], release: str | None, grid_spec: str | None,
           chunk_stars: int | None, batch_size: int, **cluster_kwargs) -> None:
    """Ingest LAMOST FITS files (files, directories or globs in PATHS) into the survey STORE.

    Incremental and resumable: files already offered are skipped, spectra already stored
    (e.g. the same observation from another release) are recorded as seen again.
    """
    from lamost_mdwarf.ingest import ingest as run_ingest
    from lamost_mdwarf.io.storage import StoreLockedError
    from lamost_mdwarf.io.survey_store import StoreError

    grid = _parse_grid(grid_spec)
    progress = _Progress("reading spectra")
    try:
        with dask_client_from_options(**cluster_kwargs) as client:
            summary = run_ingest(store, paths, release=release, client=client, grid=grid,
                                 chunk_stars=chunk_stars, batch_size=batch_size, progress=progress)
    except (StoreLockedError, StoreError, FileNotFoundError) as exc:
        progress.close()
        raise click.ClickException(str(exc)) from None
    progress.close()
    click.echo(summary.format())


@main.command()
@click.argument("store", type=str)
@click.option("--continuum-convention", type=click.Choice(["cannon", "paper"]), default="cannon", show_default=True,
              help="Gaussian weight exp(-0.5 dl^2/L^2) (code the paper used) or exp(-dl^2/L^2) (paper Eq. 2).")
@click.option("--continuum-width", type=float, default=50.0, show_default=True, help="Smoothing width L, Angstrom.")
@click.option("--masked-ivar", type=float, default=1e-5, show_default=True, help="ivar given to masked pixels.")
@click.option("--lamost-mask", type=click.Choice(["and", "or", "both", "none"]), default="and", show_default=True,
              help="Which LAMOST pixel mask to honour.")
@click.option("--reset", is_flag=True, help="Recompute every spectrum, not only new ones.")
@cluster_options
def preprocess(store: str, continuum_convention: str, continuum_width: float, masked_ivar: float,
               lamost_mask: str, reset: bool, **cluster_kwargs) -> None:
    """Mask, pseudo-continuum-normalize and measure quality of every spectrum in STORE."""
    from lamost_mdwarf.stages.preprocess import run_preprocess

    config = _preprocess_config(continuum_convention, continuum_width, masked_ivar, lamost_mask)
    progress = _Progress("preprocessing")
    with _user_errors(), dask_client_from_options(**cluster_kwargs):
        summary = run_preprocess(store, config, reset=reset, progress=progress)
    progress.close()
    click.echo(f"preprocessed {summary.n_computed} spectra ({summary.stop} in store)")


def _preprocess_config(convention: str, width: float, masked_ivar: float, lamost_mask: str):
    import dataclasses

    from lamost_mdwarf.kernels.masking import MaskConfig
    from lamost_mdwarf.preprocessing import PreprocessConfig

    mask = dataclasses.replace(MaskConfig(), masked_ivar=masked_ivar, lamost_mask=lamost_mask)
    return PreprocessConfig(mask=mask, continuum_width=width, continuum_convention=convention)


def selection_options(command):
    """Options of the cross-match and the cuts (shared by select and run)."""
    options = [
        click.option("--label-columns", default=None, metavar="NAME=COL,...",
                     help="Map catalog columns, e.g. teff=TEFF,ra=RA_ICRS (defaults: VizieR names RAJ2000, "
                          "DEJ2000, Teff, e_Teff, Rad, e_Rad, Mass, e_Mass, Lum, e_Lum)."),
        click.option("--match-radius", type=float, default=3.0, show_default=True, help="Match radius, arcsec."),
        click.option("--snr-min", type=float, default=50.0, show_default=True, help="Keep SNR_lambda above this."),
        click.option("--snr-training", type=float, default=250.0, show_default=True,
                     help="Training set SNR_lambda above this."),
        click.option("--blue-slope-min", type=float, default=-3.0, show_default=True,
                     help="Blue-excess cut (normalized flux per 1000 A)."),
        click.option("--outlier-radius", type=float, default=0.01, show_default=True,
                     help="Training label outlier threshold vs the Mann et al. 2015 Teff-R relation, Rsun."),
        click.option("--outlier-mass", type=float, default=0.01, show_default=True,
                     help="Training label outlier threshold vs the Teff-M relation, Msun."),
        click.option("--outlier-rule", type=click.Choice(["both", "either"]), default="both", show_default=True,
                     help="Outlier if it deviates in R and M (paper) or in either."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _selection_args(kwargs: dict) -> dict:
    from lamost_mdwarf.io.label_catalog import parse_column_mapping
    from lamost_mdwarf.selection import SelectionConfig

    try:
        columns = parse_column_mapping(kwargs.pop("label_columns"))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--label-columns") from None
    config = SelectionConfig(
        snr_min=kwargs.pop("snr_min"), snr_training_min=kwargs.pop("snr_training"),
        blue_slope_min=kwargs.pop("blue_slope_min"), outlier_radius_rsun=kwargs.pop("outlier_radius"),
        outlier_mass_msun=kwargs.pop("outlier_mass"), outlier_rule=kwargs.pop("outlier_rule"))
    return {"columns": columns, "radius_arcsec": kwargs.pop("match_radius"), "config": config}


@main.command()
@click.argument("store", type=str)
@click.option("--labels", "labels_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Label catalog (CSV, FITS, VOTable, ECSV).")
@selection_options
def select(store: str, labels_path: str, **kwargs) -> None:
    """Cross-match STORE with a label catalog, apply the cuts and split training/validation/survey."""
    from lamost_mdwarf.selection import format_cut_table
    from lamost_mdwarf.stages.select import run_select

    args = _selection_args(kwargs)
    with _user_errors():
        result = run_select(store, labels_path, **args)
    click.echo(format_cut_table(result.cut_table))
    click.echo("subsets: " + ", ".join(f"{k} {v}" for k, v in result.counts().items()))


@main.command()
@click.argument("store", type=str)
@click.option("--model", "model_path", required=True, help="Where to write the model (Zarr).")
@click.option("--pixel-chunk", type=click.IntRange(min=1), default=250, show_default=True,
              help="Pixels per training task.")
@click.option("--labels-set", default="teff,radius,mass,luminosity", show_default=True,
              help="Comma-separated catalog labels (paper: the model's labels; best: teff plus the derived labels).")
@_mode_option("best")
@cluster_options
def train(store: str, model_path: str, pixel_chunk: int, labels_set: str, mode: str, **cluster_kwargs) -> None:
    """Train The Cannon on the training stars of STORE (mode paper: the training subset)."""
    from lamost_mdwarf.stages.train import run_train

    names = tuple(name.strip() for name in labels_set.split(",") if name.strip())
    progress = _Progress("label refinement")
    with _user_errors(), dask_client_from_options(**cluster_kwargs):
        model = run_train(store, model_path, names, pixel_chunk, mode=mode, progress=progress)
    progress.close()
    click.echo(f"model {model.model_hash}: {len(model.training_ids)} training stars, "
               f"{model.wavelength.size} pixels, {len(model.term_names)} terms -> {model_path}")
    click.echo(f"  pixels whose scatter did not converge: {int((~model.pixel_converged).sum())}")


@main.command()
@click.argument("store", type=str)
@click.option("--model", "model_path", required=True, help="Model to validate (updated with its error model).")
@click.option("--validation-out", default=None, help="Write per-star validation residuals here (Zarr).")
@click.option("--stars-per-bin", type=click.IntRange(min=5), default=None,
              help="Stars per SNR bin of the error model (paper mode; default: 1360, fewer for small sets).")
@_mode_option(None)
@cluster_options
def validate(store: str, model_path: str, validation_out: str | None, stars_per_bin: int | None, mode: str | None,
             **cluster_kwargs) -> None:
    """Apply the model to the validation subset; fit and store the error model (in the model's mode)."""
    from lamost_mdwarf.stages.validate import run_validate

    with _user_errors():
        _check_model_mode(model_path, mode)
    with _user_errors(), dask_client_from_options(**cluster_kwargs):
        summary = run_validate(store, model_path, validation_out, stars_per_bin)
    click.echo(summary.format())


@main.command()
@click.argument("store", type=str)
@click.option("--model", "model_path", required=True, help="Trained (and validated) model.")
@click.option("--results", "results_path", required=True, help="Results store to write/extend (Zarr).")
@click.option("--chi2-max", type=float, default=5000.0, show_default=True, help="Final chi^2 cut.")
@click.option("--error-mode", type=click.Choice(["error_model", "quadrature", "max", "calibrated"]), default=None,
              help="Reported errors: the SNR error model (paper mode's default), combined with the formal error, "
                   "or calibrated (best mode's default: formal and cross-validated systematic terms).")
@_mode_option(None)
@cluster_options
def infer(store: str, model_path: str, results_path: str, chi2_max: float, error_mode: str | None, mode: str | None,
          **cluster_kwargs) -> None:
    """Infer labels for every usable spectrum of STORE into a results store (in the model's mode)."""
    from lamost_mdwarf.stages.infer import InferSettings, run_infer

    with _user_errors():
        _check_model_mode(model_path, mode)
    progress = _Progress("inferring")
    with _user_errors(), dask_client_from_options(**cluster_kwargs):
        computed, total = run_infer(store, model_path, results_path, InferSettings(chi2_max, error_mode),
                                    progress=progress)
    progress.close()
    click.echo(f"inferred {computed} spectra; {total} rows in {results_path}")


@main.command()
@click.argument("results", type=str)
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Catalog file: .csv, .fits, .ecsv, .parquet or .vot.")
@click.option("--all", "include_flagged", is_flag=True, help="Include flagged rows (default: flags == 0 only).")
def catalog(results: str, out_path: str, include_flagged: bool) -> None:
    """Export RESULTS as a catalog table with units."""
    from lamost_mdwarf.io.catalog import results_to_table, write_catalog
    from lamost_mdwarf.stages.infer import open_results

    with _user_errors():
        table = results_to_table(open_results(results), include_flagged=include_flagged)
        path = write_catalog(table, out_path)
    click.echo(f"wrote {len(table)} rows to {path}")


@main.command(name="plot-star")
@click.argument("ids", nargs=-1, required=True, metavar="ID...")
@click.option("--workdir", default=None, type=click.Path(file_okay=False),
              help="Work directory of `run`/`demo` (its store.zarr, model.zarr, results.zarr).")
@click.option("--store", default=None, help="Survey store (instead of --workdir).")
@click.option("--model", "model_path", default=None, help="Model (instead of --workdir).")
@click.option("--results", "results_path", default=None, help="Results store (instead of --workdir).")
@click.option("--out", "out_path", default=None,
              help="Output file (.png or .pdf) for one ID, or a directory for several "
                   "[default: WORKDIR/figures/stars, else the current directory].")
@click.option("--format", "fmt", type=click.Choice(["png", "pdf"]), default="png", show_default=True,
              help="File format when --out is not a file name.")
def plot_star_command(ids: Sequence[str], workdir: str | None, store: str | None, model_path: str | None,
                      results_path: str | None, out_path: str | None, fmt: str) -> None:
    """Plot model vs observed normalized spectrum of each star ID.

    An ID is a spectrum id (e.g. 55927-M5055_sp09-114) or a designation (e.g.
    J035325.89+215003.1, with or without 'LAMOST '), which plots every spectrum of that object.

    Example: lamost-mdwarf plot-star 55927-M5055_sp09-114 --workdir work
    """
    import numpy as np

    from lamost_mdwarf.figures import SpectrumNotFoundError, plot_star
    from lamost_mdwarf.io.survey_store import open_survey_store
    from lamost_mdwarf.pipeline import WorkdirLayout

    layout = WorkdirLayout(Path(workdir)) if workdir else None
    paths = {"store": store, "model": model_path, "results": results_path}
    for name in paths:
        if paths[name] is None and layout is not None:
            paths[name] = str(getattr(layout, name))
    missing = [f"--{name}" for name, value in paths.items() if value is None]
    if missing:
        raise click.UsageError(f"give --workdir, or {', '.join(missing)}")

    with _user_errors():
        ds = open_survey_store(paths["store"])
        spectrum_ids = np.array([str(v) for v in np.asarray(ds["spectrum_id"].values, dtype=object)])
        designations = np.array([str(v).removeprefix("LAMOST ").strip()
                                 for v in np.asarray(ds["designation"].values, dtype=object)])
    targets: list[str] = []
    for ident in ids:
        ident = ident.strip()
        if ident in spectrum_ids:
            targets.append(ident)
            continue
        matches = spectrum_ids[designations == ident.removeprefix("LAMOST ").strip()]
        if matches.size == 0:
            raise click.ClickException(f"{ident!r} is neither a spectrum id nor a designation in {paths['store']} "
                                       f"({spectrum_ids.size} spectra)")
        targets.extend(matches.tolist())

    single_file = out_path is not None and Path(out_path).suffix.lower() in (".png", ".pdf") and len(targets) == 1
    if out_path is not None and Path(out_path).suffix and not single_file:
        if Path(out_path).suffix.lower() not in (".png", ".pdf"):
            raise click.BadParameter(f"unsupported format {Path(out_path).suffix!r} (use .png or .pdf)",
                                     param_hint="--out")
        raise click.BadParameter(f"{len(targets)} spectra to plot: give a directory, not a file",
                                 param_hint="--out")
    folder = Path(out_path) if out_path else (layout.figures / "stars" if layout else Path.cwd())
    for sid in targets:
        dest = Path(out_path) if single_file else folder / f"star_{_safe_file_name(sid)}.{fmt}"
        try:
            written = plot_star(paths["store"], paths["model"], paths["results"], sid, dest)
        except SpectrumNotFoundError as exc:
            raise click.ClickException(exc.args[0]) from None
        except (OSError, ValueError) as exc:
            raise click.ClickException(f"cannot plot {sid}: {exc}") from None
        click.echo(f"wrote {written}")


def _safe_file_name(text: str) -> str:
    """``text`` with every character outside [A-Za-z0-9._+-] replaced by '_'."""
    import re

    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


class _user_errors:
    """Turn the errors a user can act on into a one-line message instead of a traceback."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        from lamost_mdwarf.errors import PipelineError
        from lamost_mdwarf.io.label_catalog import LabelCatalogError
        from lamost_mdwarf.io.storage import StoreLockedError
        from lamost_mdwarf.io.survey_store import StoreError
        from lamost_mdwarf.model import ModelFormatError

        if exc_type is not None and issubclass(exc_type, (StoreError, StoreLockedError, LabelCatalogError,
                                                          ModelFormatError, FileNotFoundError, PipelineError)):
            raise click.ClickException(str(exc)) from None
        return False


@main.command()
@click.option("--spectra", "spectra", multiple=True, required=True,
              help="FITS files, directories or globs; several may follow one --spectra.")
@click.option("--labels", "labels_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Label catalog (CSV, FITS, VOTable, ECSV).")
@click.option("--workdir", required=True, type=click.Path(file_okay=False), help="Work directory.")
@click.option("--release", default=None, help="Release label for new spectra (default: the file's DATA_V).")
@click.option("--retrain", is_flag=True, help="Retrain the model even if one exists in the work directory.")
@click.option("--chi2-max", type=float, default=5000.0, show_default=True, help="Final chi^2 cut.")
@click.option("--no-figures", is_flag=True, help="Skip the figures.")
@_mode_option("best")
@selection_options
@cluster_options
@click.argument("more_spectra", nargs=-1, type=str)
def run(spectra, labels_path, workdir, release, retrain, chi2_max, no_figures, mode, more_spectra, **kwargs) -> None:
    """Run everything from FITS files to catalog and figures, skipping what is up to date.

    Example: lamost-mdwarf run --spectra dr1/ dr7/ --labels tcd.csv --workdir work
    """
    _run_pipeline(list(spectra) + list(more_spectra), labels_path, workdir, release, retrain, chi2_max,
                  not no_figures, kwargs, mode)


def _run_pipeline(spectra, labels_path, workdir, release, retrain, chi2_max, figures, kwargs, mode="best"):
    from lamost_mdwarf.pipeline import run_pipeline, setup_logging
    from lamost_mdwarf.stages.infer import InferSettings

    selection = _selection_args(kwargs)
    cluster_kwargs = {k: kwargs[k] for k in list(kwargs) if k in _CLUSTER_KEYS}
    setup_logging(echo=lambda msg: click.echo(msg, err=True))
    bars: list[_Progress] = []

    def progress_factory(label: str) -> _Progress:
        bar = _Progress(label)
        bars.append(bar)
        return bar

    try:
        with _user_errors(), dask_client_from_options(**cluster_kwargs) as client:
            summary = run_pipeline(
                list(spectra), labels_path, workdir, client, release=release, retrain=retrain,
                selection_config=selection["config"], label_columns=selection["columns"],
                match_radius_arcsec=selection["radius_arcsec"], infer_settings=InferSettings(chi2_max=chi2_max),
                make_figures=figures, progress_factory=progress_factory, mode=mode)
    finally:
        for bar in bars:
            bar.close()
    click.echo(summary.format())


_CLUSTER_KEYS = ("scheduler", "cluster", "cluster_config", "n_workers", "threads_per_worker", "memory_limit",
                 "adaptive")


@main.command()
@click.argument("directory", required=False, default="lamost_mdwarf_demo",
                type=click.Path(file_okay=False, path_type=Path))
@click.option("--n-stars", default=5000, show_default=True, type=click.IntRange(min=300),
              help="Stars in the simulated survey.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--no-figures", is_flag=True, help="Skip the figures.")
@_mode_option("best")
@selection_options
@cluster_options
def demo(directory: Path, n_stars: int, seed: int, no_figures: bool, mode: str, **kwargs) -> None:
    """Simulate a LAMOST-like survey in DIRECTORY and run the whole pipeline on it."""
    from lamost_mdwarf.simulate.survey import simulate_survey

    survey_dir = directory / "survey"
    if not (survey_dir / "truth.csv").exists():
        click.echo(f"simulating {n_stars} stars into {survey_dir} ...", err=True)
        simulate_survey(survey_dir, n_stars=n_stars, seed=seed, n_workers=kwargs.get("n_workers"),
                        overwrite=True)
    else:
        click.echo(f"using the simulated survey in {survey_dir}", err=True)
    _run_pipeline([str(survey_dir / "spectra")], str(survey_dir / "labels_tcd.csv"), str(directory / "work"),
                  None, False, 5000.0, not no_figures, kwargs, mode)


@main.command(name="store-info")
@click.argument("store", type=str)
@click.option("--rejected", is_flag=True, help="List every rejected file with its reason.")
def store_info(store: str, rejected: bool) -> None:
    """Summarise a survey STORE: stars, releases, the ingest report."""
    import numpy as np

    from lamost_mdwarf.io.survey_store import StoreError, file_summary, open_survey_store

    try:
        ds = open_survey_store(store)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    grid = WavelengthGrid.from_attrs(ds.attrs)
    click.echo(f"{store}: {ds.sizes['star']} spectra on {grid.n_pixels} pixels "
               f"({grid.start:g}-{grid.stop:g} A, step {grid.step:g} A), chunk {ds.attrs['chunk_stars']} stars")
    releases, counts = np.unique(np.asarray(ds["release"].values).astype(str), return_counts=True)
    for name, count in zip(releases, counts):
        click.echo(f"  release {name}: {count} spectra")
    click.echo("  files: " + ", ".join(f"{k} {v}" for k, v in file_summary(ds).items()))
    if rejected:
        status = np.asarray(ds["file_status"].values).astype(str)
        for path, reason in zip(ds["file_path"].values[status == "rejected"],
                                ds["file_reason"].values[status == "rejected"]):
            click.echo(f"  rejected {path}: {reason}")


def _parse_grid(spec: str | None) -> WavelengthGrid | None:
    if spec is None:
        return None
    try:
        start, stop, step = (float(part) for part in spec.split(":"))
        return WavelengthGrid(start, stop, step)
    except ValueError as exc:
        raise click.BadParameter(f"expected START:STOP:STEP in Angstrom, got {spec!r} ({exc})",
                                 param_hint="--grid") from None


if __name__ == "__main__":
    main()
