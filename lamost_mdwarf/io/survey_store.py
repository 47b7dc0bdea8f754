"""The survey store: every ingested spectrum on one rest-frame grid, in Zarr.

Layout (a Zarr v3 group, readable with ``xarray.open_zarr``; use :func:`open_survey_store`,
which also hides rows of an interrupted write):

- dimension ``wavelength``: the common rest-frame vacuum grid (coordinate, Angstrom);
- dimension ``star``: one row per distinct LAMOST observation, chunked by star;
  2-D variables ``flux``, ``ivar`` (float32), ``andmask``, ``ormask`` (uint16), and 1-D
  per-star metadata (see :data:`STAR_VARIABLES`);
- dimension ``file``: the ingest report, one row per file ever offered to the store
  (accepted, seen again, or rejected with the reason; see :data:`FILE_VARIABLES`).

Commit protocol (crash safety): only one writer at a time (a lock file); rows are
appended by (1) resizing the arrays, (2) writing the new rows, (3) rewriting the group
attributes ``n_star`` / ``n_file`` in one atomic write. Readers and resumed writers only
trust rows below ``n_star`` / ``n_file``; anything beyond is the debris of an interrupted
write and is truncated by the next writer. Rows are committed at star-chunk boundaries.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr
import zarr
import zarr.codecs

from lamost_mdwarf._version import __version__
from lamost_mdwarf.grid import WavelengthGrid
from lamost_mdwarf.io.storage import StoreLocation, WriterLock, resolve_location

__all__ = [
    "STORE_FORMAT",
    "STORE_FORMAT_VERSION",
    "STAR_VARIABLES",
    "PIXEL_VARIABLES",
    "FILE_VARIABLES",
    "INGEST_FLAGS",
    "StoreError",
    "SurveyStoreWriter",
    "open_survey_store",
    "default_chunk_stars",
    "chunk_stars_for_memory",
    "as_object_strings",
    "open_committed",
]

STORE_FORMAT = "lamost_mdwarf.survey_store"
STORE_FORMAT_VERSION = 1

#: Bits of the per-star ``ingest_flags`` variable.
INGEST_FLAGS = {
    "no_redshift": 1,  # header Z missing: not shifted, flux is NaN
    "no_coverage": 2,  # no good pixel on the common grid
}


@dataclass(frozen=True)
class VariableSpec:
    """dtype, fill value and CF attributes of one stored variable."""

    dtype: Any
    fill: Any
    long_name: str
    units: str | None = None

    def attrs(self) -> dict[str, Any]:
        out = {"long_name": self.long_name}
        if self.units is not None:
            out["units"] = self.units
        return out


_STR = str

PIXEL_VARIABLES: dict[str, VariableSpec] = {
    "flux": VariableSpec("float32", float("nan"), "rest-frame flux, relative calibration", "arbitrary"),
    "ivar": VariableSpec("float32", 0.0, "inverse variance of flux (0 = bad pixel)", "arbitrary**-2"),
    "andmask": VariableSpec("uint16", 0, "LAMOST andmask bits OR-ed over contributing native pixels "
                            "(1 BADCCD, 2 BADPROFILE, 4 NOSKY, 8 BRIGHTSKY, 16 BADCENTER, 32 NODATA)"),
    "ormask": VariableSpec("uint16", 0, "LAMOST ormask bits OR-ed over contributing native pixels"),
}

STAR_VARIABLES: dict[str, VariableSpec] = {
    "spectrum_id": VariableSpec(_STR, "", "stable LAMOST observation id LMJD-PLANID_spSS-FFF"),
    "obsid": VariableSpec("int64", -1, "LAMOST OBSID (-1 when absent, e.g. original DR1)"),
    "designation": VariableSpec(_STR, "", "LAMOST designation"),
    "ra": VariableSpec("float64", float("nan"), "right ascension (J2000)", "deg"),
    "dec": VariableSpec("float64", float("nan"), "declination (J2000)", "deg"),
    "z": VariableSpec("float64", float("nan"), "LAMOST pipeline redshift (NaN when missing)", "1"),
    "z_err": VariableSpec("float64", float("nan"), "redshift uncertainty", "1"),
    "snr_u": VariableSpec("float32", float("nan"), "pipeline SNR in the u band", "1"),
    "snr_g": VariableSpec("float32", float("nan"), "pipeline SNR in the g band", "1"),
    "snr_r": VariableSpec("float32", float("nan"), "pipeline SNR in the r band", "1"),
    "snr_i": VariableSpec("float32", float("nan"), "pipeline SNR in the i band", "1"),
    "snr_z": VariableSpec("float32", float("nan"), "pipeline SNR in the z band", "1"),
    "snr_lambda": VariableSpec("float32", float("nan"), "SNR_lambda: sum of the ugriz SNRs", "1"),
    "class": VariableSpec(_STR, "", "LAMOST CLASS"),
    "subclass": VariableSpec(_STR, "", "LAMOST SUBCLASS, normalised ('dM5' -> 'M5')"),
    "data_release": VariableSpec(_STR, "", "LAMOST data release of the file (DATA_V)"),
    "release": VariableSpec(_STR, "", "ingest release label (--release, default data_release)"),
    "layout": VariableSpec(_STR, "", "file layout: dr1_image, image or coadd_table"),
    "source_path": VariableSpec(_STR, "", "file the spectrum was read from"),
    "lmjd": VariableSpec("int32", -1, "local modified Julian day", "d"),
    "planid": VariableSpec(_STR, "", "LAMOST plan id"),
    "spid": VariableSpec("int16", -1, "spectrograph id"),
    "fiberid": VariableSpec("int16", -1, "fiber id"),
    "coeff0": VariableSpec("float64", float("nan"), "log10 wavelength of the first native pixel", "log10(Angstrom)"),
    "coeff1": VariableSpec("float64", float("nan"), "log10 dispersion per native pixel", "log10(Angstrom)"),
    "n_pixels_native": VariableSpec("int32", -1, "number of native pixels"),
    "n_good_pixels": VariableSpec("int32", -1, "pixels with ivar > 0 on the common grid"),
    "ingest_flags": VariableSpec("uint8", 0, "ingest flag bits: 1 no_redshift, 2 no_coverage"),
}

FILE_VARIABLES: dict[str, VariableSpec] = {
    "file_path": VariableSpec(_STR, "", "absolute path of the file offered for ingestion"),
    "file_size": VariableSpec("int64", -1, "file size", "byte"),
    "file_mtime_ns": VariableSpec("int64", -1, "file modification time", "nanoseconds since 1970-01-01"),
    "file_status": VariableSpec(_STR, "", "ingested | seen_again | rejected"),
    "file_reason": VariableSpec(_STR, "", "why the file was rejected or seen again"),
    "file_spectrum_id": VariableSpec(_STR, "", "spectrum id read from the file ('' if unreadable)"),
    "file_release": VariableSpec(_STR, "", "release label of the ingest that offered the file"),
    "file_star_index": VariableSpec("int64", -1, "row of the spectrum in the star dimension (-1 if none)"),
}

FILE_STATUSES = ("ingested", "seen_again", "rejected")

_PIXEL_COMPRESSOR = zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


class StoreError(RuntimeError):
    """A store that cannot be used as asked (wrong format, version, read-only ...)."""


def default_chunk_stars(n_pixels: int, target_bytes: int = 24 * 2**20) -> int:
    """Stars per chunk so that one float32 pixel chunk holds about ``target_bytes``."""
    return max(1, int(target_bytes // (4 * n_pixels)))


#: Resident bytes per pixel of a star chunk while a preprocess or inference task runs on it
#: (its raw and normalized arrays, the outputs and the row-batch working set; measured as
#: the peak RSS of one task: 36-63 B per pixel on top of a fixed 20-100 MiB, for 3,000- to
#: 16,200-pixel grids).
TASK_BYTES_PER_PIXEL = 80
#: Memory a worker process needs besides its task (interpreter, libraries, kernel set-up).
WORKER_OVERHEAD_BYTES = 256 * 2**20


def chunk_stars_for_memory(n_pixels: int, memory_per_task: int | None, minimum: int = 16) -> int:
    """Stars per chunk so that a task on one chunk fits a worker's memory.

    Parameters
    ----------
    n_pixels : int
        Pixels per spectrum on the store's grid.
    memory_per_task : int or None
        Memory limit of one worker divided by its threads, bytes; None (no limit) gives
        :func:`default_chunk_stars`.
    minimum : int
        Smallest chunk returned.

    Returns
    -------
    int
        ``min(default_chunk_stars(n_pixels), 0.5 * (memory_per_task - 256 MiB) /
        (80 B * n_pixels))``, at least ``minimum``: a task then uses about half of what
        the worker has left besides its own footprint, well below Dask's pause (80%)
        and terminate (95%) thresholds. 512 MiB workers get ~560-star chunks on the
        default 3000-pixel grid; 2 GiB workers the default ~24 MB chunks.
    """
    default = default_chunk_stars(n_pixels)
    if not memory_per_task:
        return default
    budget = 0.5 * (int(memory_per_task) - WORKER_OVERHEAD_BYTES)
    rows = int(budget // (TASK_BYTES_PER_PIXEL * n_pixels)) if budget > 0 else 0
    return max(int(minimum), min(default, rows))


def _check_format(attrs: Mapping[str, Any], url: str) -> None:
    fmt = attrs.get("format")
    if fmt != STORE_FORMAT:
        raise StoreError(f"{url} is not a lamost_mdwarf survey store (format attribute {fmt!r})")
    version = attrs.get("format_version")
    if version != STORE_FORMAT_VERSION:
        raise StoreError(
            f"{url} was written with survey-store format version {version}; this lamost_mdwarf "
            f"({__version__}) reads version {STORE_FORMAT_VERSION}. Re-ingest the spectra into a new store "
            "or use a matching lamost_mdwarf version."
        )


def _open_group(location: StoreLocation, mode: str) -> zarr.Group:
    try:
        return zarr.open_group(location.zarr_store(read_only=(mode == "r")), mode=mode, zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:  # type: ignore[attr-defined]
        raise StoreError(f"no survey store at {location.url}") from exc


def open_survey_store(url: str | os.PathLike, chunks: dict | None = None) -> xr.Dataset:
    """Open the committed part of a survey store as a lazy :class:`xarray.Dataset`.

    Parameters
    ----------
    url : str or path-like
        Local path or fsspec URL of the store.
    chunks : dict, optional
        Dask chunks to use; default: the stored chunks.

    Returns
    -------
    xarray.Dataset
        Dimensions ``star``, ``wavelength`` and ``file``; dask-backed variables. Rows of
        an interrupted write are excluded.
    """
    location = resolve_location(url)
    if not location.exists():
        raise StoreError(f"no survey store at {location.url}")
    group = _open_group(location, "r")
    attrs = dict(group.attrs)
    _check_format(attrs, location.url)
    limits = {"star": int(attrs["n_star"]), "file": int(attrs["n_file"])}
    ds = open_committed(location.zarr_store(read_only=True), group, None, limits, chunks)
    ds.attrs = attrs
    return as_object_strings(ds)


def open_committed(
    store: Any, group: zarr.Group, group_path: str | None, limits: Mapping[str, int], chunks: dict | None = None
) -> xr.Dataset:
    """Open a zarr group with xarray, keeping only rows below ``limits`` along each dimension.

    Arrays of one dimension may have different lengths after an interrupted resize (rows
    beyond the committed extent); they are then opened in groups of equal length and
    merged, which ``xarray.open_zarr`` alone refuses to do.
    """
    kwargs = dict(consolidated=False, zarr_format=3, chunks=chunks if chunks is not None else {}, group=group_path)
    arrays = dict(group.arrays())
    dims = {name: tuple(arr.metadata.dimension_names or ()) for name, arr in arrays.items()}
    by_dim: dict[str, dict[int, list[str]]] = {}
    for name, arr in arrays.items():
        if dims[name] and dims[name][0] in limits:
            by_dim.setdefault(dims[name][0], {}).setdefault(arr.shape[0], []).append(name)
    if all(len(sizes) <= 1 for sizes in by_dim.values()):
        ds = xr.open_zarr(store, **kwargs)
    else:
        parts = []
        for dim, sizes in by_dim.items():
            for names in sizes.values():
                drop = [n for n in arrays if n not in names and (dims[n][:1] != ("wavelength",))]
                part = xr.open_zarr(store, drop_variables=drop, **kwargs)
                parts.append(part.isel({dim: slice(0, limits[dim])}))
        ds = xr.merge(parts, compat="override", combine_attrs="override", join="outer")
    return ds.isel({dim: slice(0, limit) for dim, limit in limits.items() if dim in ds.dims})


def as_object_strings(ds: xr.Dataset) -> xr.Dataset:
    """Present variable-length string variables as numpy object arrays (lazily).

    Zarr v3 strings come back as numpy ``StringDType``, which ``.astype(str)`` and many
    libraries do not handle yet; object arrays of ``str`` work everywhere.
    """
    converted = {
        name: var.astype(object)
        for name, var in ds.variables.items()
        if isinstance(var.dtype, np.dtypes.StringDType)
    }
    return ds.assign(converted) if converted else ds


class SurveyStoreWriter:
    """The single writer of a survey store (use as a context manager).

    Parameters
    ----------
    url : str or path-like
        Store location; created when missing.
    grid : WavelengthGrid, optional
        Grid of a new store (default 4500-7500 A at 1 A). For an existing store it must
        match the stored grid or be None.
    chunk_stars : int, optional
        Stars per chunk of a new store (default :func:`default_chunk_stars`).
    purpose : str
        Recorded in the lock (shown to a second writer).
    """

    def __init__(
        self,
        url: str | os.PathLike,
        grid: WavelengthGrid | None = None,
        chunk_stars: int | None = None,
        purpose: str = "ingest",
    ) -> None:
        self.location = resolve_location(url)
        self._requested_grid = grid
        self._requested_chunk = chunk_stars
        self._lock = WriterLock(self.location, purpose)
        self.group: zarr.Group | None = None
        self._star_buffer: dict[str, list[Any]] = {}
        self._file_buffer: list[dict[str, Any]] = []
        self._n_buffered_stars = 0

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "SurveyStoreWriter":
        self.open()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if exc_type is None:
                self.flush(final=True)
        finally:
            self._lock.release()

    def open(self) -> None:
        """Take the lock, create or check the store, and repair an interrupted write."""
        if not self.location.writable():
            raise StoreError(f"store {self.location.url} is not writable (read-only filesystem or permissions)")
        try:
            self._lock.acquire()
        except PermissionError as exc:
            raise StoreError(f"store {self.location.url} is not writable ({exc})") from exc
        try:
            if self.location.exists():
                self.group = _open_group(self.location, "r+")
                _check_format(self.group.attrs, self.location.url)
                stored_grid = WavelengthGrid.from_attrs(self.group.attrs)
                if self._requested_grid is not None and self._requested_grid != stored_grid:
                    raise StoreError(
                        f"store {self.location.url} uses grid {stored_grid}; cannot ingest on {self._requested_grid}"
                    )
                self._truncate_to_committed()
            else:
                self._create()
        except BaseException:
            self._lock.release()
            raise
        self.grid = WavelengthGrid.from_attrs(self.group.attrs)
        self.chunk_stars = int(self.group.attrs["chunk_stars"])
        self._load_index()

    def _create(self) -> None:
        grid = self._requested_grid or WavelengthGrid()
        chunk = int(self._requested_chunk or default_chunk_stars(grid.n_pixels))
        if chunk < 1:
            raise StoreError(f"chunk_stars must be >= 1, got {chunk}")
        group = zarr.open_group(self.location.zarr_store(), mode="a", zarr_format=3)
        n_pix = grid.n_pixels
        wave = group.create_array(
            "wavelength", shape=(n_pix,), chunks=(n_pix,), dtype="float64", fill_value=float("nan"),
            dimension_names=("wavelength",),
            attributes={"units": "Angstrom", "long_name": "rest-frame vacuum wavelength",
                        "standard_name": "radiation_wavelength"},
        )
        wave[:] = grid.wavelength
        for name, spec in PIXEL_VARIABLES.items():
            group.create_array(
                name, shape=(0, n_pix), chunks=(chunk, n_pix), dtype=spec.dtype, fill_value=spec.fill,
                dimension_names=("star", "wavelength"), attributes=spec.attrs(),
                compressors=_PIXEL_COMPRESSOR,
            )
        for name, spec in STAR_VARIABLES.items():
            group.create_array(
                name, shape=(0,), chunks=(chunk,), dtype=spec.dtype, fill_value=spec.fill,
                dimension_names=("star",), attributes=spec.attrs(),
            )
        file_chunk = max(chunk, 4096)
        for name, spec in FILE_VARIABLES.items():
            group.create_array(
                name, shape=(0,), chunks=(file_chunk,), dtype=spec.dtype, fill_value=spec.fill,
                dimension_names=("file",), attributes=spec.attrs(),
            )
        group.update_attributes(
            {
                "format": STORE_FORMAT,
                "format_version": STORE_FORMAT_VERSION,
                "title": "LAMOST low-resolution spectra on a common rest-frame grid",
                "Conventions": "CF-1.10",
                "created_by": f"lamost_mdwarf {__version__}",
                "resampling": "linear interpolation in rest-frame wavelength; ivar propagated as "
                              "1/((1-t)^2/ivar_i + t^2/ivar_i+1); bad if any contributing pixel is bad",
                "chunk_stars": chunk,
                "n_star": 0,
                "n_file": 0,
                **grid.to_attrs(),
            }
        )
        self.group = group

    def _arrays(self, names: Iterable[str]) -> list[zarr.Array]:
        return [self.group[name] for name in names]

    def _truncate_to_committed(self) -> None:
        n_star, n_file = int(self.group.attrs["n_star"]), int(self.group.attrs["n_file"])
        for name in list(PIXEL_VARIABLES) + list(STAR_VARIABLES):
            arr = self.group[name]
            if arr.shape[0] != n_star:
                arr.resize((n_star,) + arr.shape[1:])
        for arr in self._arrays(FILE_VARIABLES):
            if arr.shape[0] != n_file:
                arr.resize((n_file,))

    def _load_index(self) -> None:
        n_star, n_file = self.n_star, self.n_file
        ids = self.group["spectrum_id"][:n_star] if n_star else []
        self.known_spectrum_ids: dict[str, int] = {str(s): i for i, s in enumerate(ids)}
        claimed: set[int] = set()
        self.known_files = {}
        if n_file:
            status = np.asarray(self.group["file_status"][:n_file], dtype=object)
            index = np.asarray(self.group["file_star_index"][:n_file])
            # A report row claiming a spectrum beyond the committed ones (the spectra lagged the
            # report when a run was interrupted) and every row after it are not committed: their
            # files are read again, so no spectrum is lost.
            ahead = np.flatnonzero((status == "ingested") & (index >= n_star))
            if ahead.size:
                n_file = int(ahead[0])
                self.group.update_attributes({"n_file": n_file})
                status, index = status[:n_file], index[:n_file]
            claimed = {int(i) for i in index[status == "ingested"]}
            paths = self.group["file_path"][:n_file]
            sizes = self.group["file_size"][:n_file]
            mtimes = self.group["file_mtime_ns"][:n_file]
            self.known_files = {str(p): (int(s), int(m)) for p, s, m in zip(paths, sizes, mtimes)}
        #: Committed stars whose ingesting file has no committed report row (the report
        #: lagged the spectra when a run was interrupted): the file is re-read on resume and
        #: reclaims its star instead of being reported as seen again.
        self.unclaimed_stars: set[int] = set(range(n_star)) - claimed

    # ------------------------------------------------------------------ state
    @property
    def n_star(self) -> int:
        """Committed number of stars."""
        return int(self.group.attrs["n_star"])

    @property
    def n_file(self) -> int:
        """Committed number of file-report rows."""
        return int(self.group.attrs["n_file"])

    def is_known_file(self, path: str, size: int, mtime_ns: int) -> bool:
        """Whether this exact file (path, size, mtime) was already offered to the store."""
        return self.known_files.get(path) == (size, mtime_ns)

    # ------------------------------------------------------------------ appending
    def add_file(self, file_row: Mapping[str, Any], star_row: Mapping[str, Any] | None = None) -> str:
        """Buffer one file's outcome, and its spectrum when it is new.

        Parameters
        ----------
        file_row : mapping
            Values for :data:`FILE_VARIABLES` (``file_status``/``file_star_index`` are set here
            when a star row is given).
        star_row : mapping, optional
            Values for :data:`STAR_VARIABLES` and :data:`PIXEL_VARIABLES` of an accepted
            spectrum. A spectrum id already in the store (or buffered) is not added again:
            the file is recorded as ``seen_again``.

        Returns
        -------
        str
            The status recorded for the file.
        """
        row = {name: file_row.get(name, spec.fill) for name, spec in FILE_VARIABLES.items()}
        if star_row is not None:
            sid = str(star_row["spectrum_id"])
            row["file_spectrum_id"] = sid
            if self.known_spectrum_ids.get(sid) in self.unclaimed_stars:
                index = self.known_spectrum_ids[sid]
                self.unclaimed_stars.discard(index)
                row["file_status"] = "ingested"
                row["file_star_index"] = index
                star_row = None
            elif sid in self.known_spectrum_ids:
                row["file_status"] = "seen_again"
                row["file_star_index"] = self.known_spectrum_ids[sid]
                row["file_reason"] = f"spectrum {sid} already in the store (row {self.known_spectrum_ids[sid]})"
                star_row = None
            else:
                index = self.n_star + self._n_buffered_stars
                self.known_spectrum_ids[sid] = index
                row["file_status"] = "ingested"
                row["file_star_index"] = index
                for name in list(STAR_VARIABLES) + list(PIXEL_VARIABLES):
                    self._star_buffer.setdefault(name, []).append(star_row[name])
                self._n_buffered_stars += 1
        elif row["file_status"] not in FILE_STATUSES:
            raise ValueError(f"file status must be one of {FILE_STATUSES}, got {row['file_status']!r}")
        row["_has_star"] = star_row is not None
        self._file_buffer.append(row)
        self.known_files[str(row["file_path"])] = (int(row["file_size"]), int(row["file_mtime_ns"]))
        self.flush(final=False)
        return row["file_status"]

    def flush(self, final: bool = False) -> None:
        """Commit buffered rows up to the next star-chunk boundary (all of them if ``final``)."""
        while True:
            boundary = (self.n_star // self.chunk_stars + 1) * self.chunk_stars
            n_fill = boundary - self.n_star
            if self._n_buffered_stars >= n_fill:
                self._commit(n_fill)
            elif final and (self._n_buffered_stars or self._file_buffer):
                self._commit(self._n_buffered_stars)
                return
            else:
                return

    def _commit(self, n_stars: int) -> None:
        try:
            self._write_rows(n_stars)
        except OSError as exc:
            raise StoreError(
                f"writing to {self.location.url} failed ({exc}); the store keeps its {self.n_star} committed "
                "spectra intact. Fix the cause (disk full? permissions?) and rerun to continue."
            ) from exc

    def _write_rows(self, n_stars: int) -> None:
        # File rows that go with the first n_stars buffered stars, plus the star-less rows
        # (rejections, repeats) that follow them up to the next accepted file.
        seen, n_files = 0, 0
        for row in self._file_buffer:
            if row["_has_star"]:
                if seen == n_stars:
                    break
                seen += 1
            n_files += 1
        if n_stars == self._n_buffered_stars:
            n_files = len(self._file_buffer)
        a, b = self.n_star, self.n_star + n_stars
        fa, fb = self.n_file, self.n_file + n_files
        if n_stars:
            for name in list(PIXEL_VARIABLES) + list(STAR_VARIABLES):
                arr = self.group[name]
                values = self._star_buffer[name][:n_stars]
                del self._star_buffer[name][:n_stars]
                data = np.stack(values) if name in PIXEL_VARIABLES else np.asarray(
                    values, dtype=object if STAR_VARIABLES[name].dtype is _STR else STAR_VARIABLES[name].dtype
                )
                if arr.shape[0] != b:
                    arr.resize((b,) + arr.shape[1:])
                arr[a:b] = data
        if n_files:
            rows = self._file_buffer[:n_files]
            del self._file_buffer[:n_files]
            for name, spec in FILE_VARIABLES.items():
                arr = self.group[name]
                dtype = object if spec.dtype is _STR else spec.dtype
                data = np.asarray([r[name] for r in rows], dtype=dtype)
                if arr.shape[0] != fb:
                    arr.resize((fb,))
                arr[fa:fb] = data
        self._n_buffered_stars -= n_stars
        self.group.update_attributes({"n_star": b, "n_file": fb})


def file_summary(ds: xr.Dataset) -> dict[str, int]:
    """Counts of file-report statuses in an opened store."""
    status = np.asarray(ds["file_status"].values).astype(str)
    return {s: int(np.sum(status == s)) for s in FILE_STATUSES}
