"""Ingest LAMOST FITS files into the survey store, in parallel on Dask.

Workers read and resample batches of files (:func:`read_and_resample_batch`); the client
is the store's single writer: it receives batch results in file order, drops spectra
already present, and commits rows chunk by chunk through :class:`SurveyStoreWriter`.
Files are processed in sorted path order, so an interrupted ingest resumed later gives
exactly the store an uninterrupted one would have.
"""
from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lamost_mdwarf.grid import WavelengthGrid
from lamost_mdwarf.io.lamost_fits import LamostReadError, read_lamost_spectrum
from lamost_mdwarf.io.survey_store import (
    INGEST_FLAGS,
    STAR_VARIABLES,
    SurveyStoreWriter,
    chunk_stars_for_memory,
)
from lamost_mdwarf.kernels.resample import NODATA_BIT, resample_to_rest_frame

__all__ = ["IngestSummary", "discover_files", "ingest", "read_and_resample_batch", "spectrum_to_row"]

FITS_SUFFIXES = (".fits", ".fits.gz", ".fit", ".fit.gz", ".fts")


@dataclass
class IngestSummary:
    """What one ingest did.

    Attributes
    ----------
    n_offered : int
        Files found on the given paths.
    n_skipped : int
        Files already offered to this store before (same path, size and mtime).
    counts : dict
        Files of this run per status: ingested, seen_again, rejected.
    rejected : list of (path, reason)
        The rejected files of this run.
    n_star_total : int
        Stars in the store afterwards.
    seconds : float
        Wall time.
    """

    n_offered: int = 0
    n_skipped: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {"ingested": 0, "seen_again": 0, "rejected": 0})
    rejected: list[tuple[str, str]] = field(default_factory=list)
    n_star_total: int = 0
    seconds: float = 0.0

    def format(self, max_rejected: int = 20) -> str:
        """Human-readable summary."""
        rate = self.counts["ingested"] / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"files found: {self.n_offered}; already in the store: {self.n_skipped}",
            f"ingested: {self.counts['ingested']}  seen again (already stored): {self.counts['seen_again']}  "
            f"rejected: {self.counts['rejected']}",
            f"stars in store: {self.n_star_total}; {self.seconds:.1f} s ({rate:.0f} spectra/s)",
        ]
        for path, reason in self.rejected[:max_rejected]:
            lines.append(f"  rejected {path}: {reason}")
        if len(self.rejected) > max_rejected:
            lines.append(f"  ... and {len(self.rejected) - max_rejected} more (see the store's file report)")
        return "\n".join(lines)


def discover_files(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Expand files, directories (recursively) and glob patterns into FITS file paths.

    Parameters
    ----------
    paths : iterable of str or path-like
        Files (taken as given, whatever their suffix), directories (scanned recursively
        for ``*.fits``, ``*.fits.gz``, ``*.fit``), or glob patterns.

    Returns
    -------
    list of str
        Absolute paths, unique, sorted.

    Raises
    ------
    FileNotFoundError
        When a path is neither an existing file or directory nor a matching glob.
    """
    found: set[str] = set()
    for raw in paths:
        text = os.fspath(raw)
        path = Path(text).expanduser()
        if path.is_file():
            found.add(str(path.resolve()))
        elif path.is_dir():
            for root, _dirs, files in os.walk(path):
                for name in files:
                    if name.lower().endswith(FITS_SUFFIXES):
                        found.add(str((Path(root) / name).resolve()))
        else:
            matches = glob.glob(os.path.expanduser(text), recursive=True)
            if not matches:
                raise FileNotFoundError(f"no such file, directory or matching glob: {text}")
            found.update(discover_files(matches))
    return sorted(found)


def spectrum_to_row(spectrum: Any, grid: np.ndarray, release: str | None) -> dict[str, Any]:
    """Resample a :class:`~lamost_mdwarf.io.lamost_fits.LamostSpectrum` and build its store row."""
    meta = spectrum.meta
    row: dict[str, Any] = {name: meta.get(name, spec.fill) for name, spec in STAR_VARIABLES.items()}
    row["release"] = release or meta["data_release"]
    row["n_pixels_native"] = meta["n_pixels"]
    flags = 0
    z = meta["z"]
    if np.isfinite(z) and z > -1:
        flux, ivar, andmask, ormask = resample_to_rest_frame(
            spectrum.wavelength, spectrum.flux, spectrum.ivar, spectrum.andmask, spectrum.ormask, z, grid
        )
    else:
        flags |= INGEST_FLAGS["no_redshift"]
        n = grid.size
        flux = np.full(n, np.nan, dtype=np.float32)
        ivar = np.zeros(n, dtype=np.float32)
        andmask = np.full(n, NODATA_BIT, dtype=np.uint16)
        ormask = andmask.copy()
    n_good = int(np.count_nonzero(ivar > 0))
    if n_good == 0:
        flags |= INGEST_FLAGS["no_coverage"]
    row.update(flux=flux, ivar=ivar, andmask=andmask, ormask=ormask, n_good_pixels=n_good, ingest_flags=flags)
    return row


def read_and_resample_batch(
    paths: Sequence[str], grid_attrs: dict[str, float], release: str | None
) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    """Read and resample a batch of files (runs on a worker).

    Returns, per file in order, ``(file_row, star_row)``; ``star_row`` is None for a
    rejected file, whose ``file_row`` carries the reason. Never raises for a bad file.
    """
    grid = WavelengthGrid.from_attrs(grid_attrs).wavelength
    out = []
    for path in paths:
        try:
            stat = os.stat(path)
            size, mtime = int(stat.st_size), int(stat.st_mtime_ns)
        except OSError as exc:
            size, mtime = -1, -1
            reason = f"cannot stat file ({exc.strerror or exc})"
        else:
            reason = ""
        file_row = {"file_path": path, "file_size": size, "file_mtime_ns": mtime,
                    "file_release": release or "", "file_status": "rejected"}
        star_row = None
        if not reason:
            try:
                spectrum = read_lamost_spectrum(path)
                star_row = spectrum_to_row(spectrum, grid, release)
                file_row["file_release"] = star_row["release"]
            except LamostReadError as exc:
                reason = exc.reason
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch
                reason = f"unexpected error while reading: {type(exc).__name__}: {exc}"
        file_row["file_reason"] = reason
        out.append((file_row, star_row))
    return out


def ingest(
    store: str | os.PathLike,
    paths: Sequence[str | os.PathLike],
    release: str | None = None,
    client: Any | None = None,
    grid: WavelengthGrid | None = None,
    chunk_stars: int | None = None,
    batch_size: int = 128,
    progress: Callable[[int, int], None] | None = None,
) -> IngestSummary:
    """Ingest FITS files into a survey store; incremental, resumable, single-writer.

    Parameters
    ----------
    store : str or path-like
        Survey store location (created when missing).
    paths : sequence of str or path-like
        Files, directories or globs (see :func:`discover_files`).
    release : str, optional
        Release label recorded with each new spectrum; default: the file's data release.
    client : distributed.Client, optional
        Dask client whose workers read the files; None reads in this process.
    grid : WavelengthGrid, optional
        Grid of a new store (ignored for existing stores unless it conflicts).
    chunk_stars : int, optional
        Stars per chunk of a new store. Default: sized from the memory limit of the
        client's workers (:func:`~lamost_mdwarf.io.survey_store.chunk_stars_for_memory`),
        or ~24 MB flux chunks without a client or without a limit.
    batch_size : int
        Files per worker task.
    progress : callable, optional
        Called as ``progress(n_files_done, n_files_total)`` after each batch.

    Returns
    -------
    IngestSummary
    """
    started = time.perf_counter()
    files = discover_files(paths)
    if chunk_stars is None and client is not None:
        chunk_stars = _chunk_stars_for_workers(client, (grid or WavelengthGrid()).n_pixels)
    summary = IngestSummary(n_offered=len(files))
    with SurveyStoreWriter(store, grid=grid, chunk_stars=chunk_stars, purpose="ingest") as writer:
        todo = []
        for path in files:
            try:
                stat = os.stat(path)
                if writer.is_known_file(path, int(stat.st_size), int(stat.st_mtime_ns)):
                    summary.n_skipped += 1
                    continue
            except OSError:
                pass
            todo.append(path)
        batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
        grid_attrs = writer.grid.to_attrs()
        done = 0
        for results in _run_batches(batches, grid_attrs, release, client):
            for file_row, star_row in results:
                status = writer.add_file(file_row, star_row)
                summary.counts[status] += 1
                if status == "rejected":
                    summary.rejected.append((file_row["file_path"], file_row["file_reason"]))
            done += len(results)
            if progress is not None:
                progress(done, len(todo))
        writer.flush(final=True)
        summary.n_star_total = writer.n_star
    summary.seconds = time.perf_counter() - started
    return summary


def _chunk_stars_for_workers(client: Any, n_pixels: int) -> int:
    """Chunk size of a new store that fits the memory of the client's workers (one task per thread)."""
    from lamost_mdwarf.cluster import cluster_resources

    resources = cluster_resources(client)
    limit = resources.memory_limit_per_worker
    per_task = None if limit is None else limit // max(1, resources.threads_per_worker)
    return chunk_stars_for_memory(n_pixels, per_task)


def _run_batches(
    batches: list[list[str]], grid_attrs: dict[str, float], release: str | None, client: Any | None
) -> Iterable[list]:
    """Yield batch results in batch order, computing them on the client's workers."""
    if client is None:
        for batch in batches:
            yield read_and_resample_batch(batch, grid_attrs, release)
        return
    from distributed import as_completed

    n_workers = max(1, len(client.scheduler_info(n_workers=-1).get("workers", {})))
    max_in_flight = 2 * n_workers + 2
    pending: dict[int, Any] = {}
    ready: dict[int, list] = {}
    next_submit, next_yield = 0, 0
    futures = as_completed()

    def submit_more() -> None:
        nonlocal next_submit
        while next_submit < len(batches) and len(pending) + len(ready) < max_in_flight:
            future = client.submit(read_and_resample_batch, batches[next_submit], grid_attrs, release,
                                   key=f"ingest-batch-{next_submit}-{os.getpid()}-{time.time_ns()}")
            future.batch_index = next_submit  # type: ignore[attr-defined]
            pending[next_submit] = future
            futures.add(future)
            next_submit += 1

    submit_more()
    while next_yield < len(batches):
        future = next(futures)
        index = future.batch_index  # type: ignore[attr-defined]
        ready[index] = future.result()
        del pending[index]
        future.release()
        while next_yield in ready:
            yield ready.pop(next_yield)
            next_yield += 1
        submit_more()
