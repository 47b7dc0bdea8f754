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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lamost-mdwarf")
def main() -> None:
    """M-dwarf Teff, radius, mass and luminosity from LAMOST spectra with The Cannon."""


@main.command()
@click.argument("outdir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--n-stars", default=5000, show_default=True, type=click.IntRange(min=1), help="Number of stars.")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed (same seed, same survey).")
@click.option("--n-workers", default=None, type=click.IntRange(min=1), help="Processes (default: all cores).")
def simulate(outdir: Path, n_stars: int, seed: int, n_workers: int | None) -> None:
    """Write a simulated LAMOST-like survey (FITS files, label table, truth) to OUTDIR."""
    from lamost_mdwarf.simulate.survey import simulate_survey

    result = simulate_survey(outdir, n_stars=n_stars, seed=seed, n_workers=n_workers)
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
