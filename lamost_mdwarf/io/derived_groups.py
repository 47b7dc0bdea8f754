"""Row-aligned per-star groups with a committed extent (``preprocessed``, ``selection``, results).

A derived group holds variables along ``star`` (aligned row by row with the survey store)
and optionally ``wavelength``. It lives either inside the survey store (a named
sub-group) or at the root of a store of its own (``name=None``, e.g. the results store).
Like the survey store it has a committed extent, the group attribute ``n_star``: rows are
computed and written block by block (by Dask workers, straight to Zarr), and ``n_star`` is
advanced in one atomic metadata write after each block. Readers only trust rows below
``n_star``; an interrupted step is redone from there.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import xarray as xr
import zarr

from lamost_mdwarf.io.storage import resolve_location
from lamost_mdwarf.io.survey_store import StoreError, as_object_strings, open_committed

__all__ = [
    "DerivedGroupSpec",
    "open_derived_group",
    "derived_group_extent",
    "prepare_derived_group",
    "write_derived_rows",
    "write_rows_in_blocks",
    "block_rows_for",
    "settings_fingerprint",
]


class DerivedGroupSpec:
    """Variables of a derived group.

    Parameters
    ----------
    name : str or None
        Group name inside the store, or None for the root group of a store of its own.
    variables : mapping
        name -> (dims, dtype, fill, attrs); dims is ``("star",)``, ``("star", "wavelength")``
        or ``("star", <other>)`` with the size of the other dimension given by ``extra_sizes``.
    extra_sizes : mapping, optional
        Sizes of dimensions other than ``star`` and ``wavelength``.
    """

    def __init__(self, name: str | None, variables: Mapping[str, tuple[tuple[str, ...], Any, Any, dict]],
                 extra_sizes: Mapping[str, int] | None = None) -> None:
        self.name = name
        self.variables = dict(variables)
        self.extra_sizes = dict(extra_sizes or {})


def settings_fingerprint(settings: Mapping[str, Any]) -> str:
    """A stable JSON string of the settings a group was computed with."""
    return json.dumps(settings, sort_keys=True, default=str)


def _root(store: str | os.PathLike, mode: str, create: bool = False) -> zarr.Group:
    location = resolve_location(store)
    if not location.exists():
        if not create:
            raise StoreError(f"no store at {location.url}")
        return zarr.open_group(location.zarr_store(), mode="a", zarr_format=3)
    return zarr.open_group(location.zarr_store(read_only=(mode == "r")), mode=mode, zarr_format=3)


def _get(root: zarr.Group, name: str | None) -> zarr.Group | None:
    if name is None:
        return root if "n_star" in root.attrs else None
    try:
        return root[name]
    except KeyError:
        return None


def derived_group_extent(store: str | os.PathLike, name: str | None) -> tuple[int, dict[str, Any]]:
    """Committed rows and attributes of a derived group ((0, {}) when it does not exist)."""
    location = resolve_location(store)
    if not location.exists():
        return 0, {}
    group = _get(_root(store, "r"), name)
    if group is None:
        return 0, {}
    attrs = dict(group.attrs)
    return int(attrs.get("n_star", 0)), attrs


def prepare_derived_group(
    store: str | os.PathLike,
    spec: DerivedGroupSpec,
    n_star: int,
    chunk_stars: int,
    n_pixels: int,
    settings: Mapping[str, Any],
    reset: bool = False,
    attrs: Mapping[str, Any] | None = None,
) -> int:
    """Create the group if needed and size its arrays for ``n_star`` rows.

    If the group exists but was computed with different ``settings`` (or ``reset``), its
    contents are discarded. Returns the committed extent rows can be appended from.
    """
    root = _root(store, "r+", create=spec.name is None)
    fingerprint = settings_fingerprint(settings)
    group = _get(root, spec.name)
    stale = group is not None and (reset or group.attrs.get("settings") != fingerprint
                                   or set(spec.variables) - set(group.array_keys()))
    if stale:
        if spec.name is None:
            for key in list(group.array_keys()):
                del group[key]
            group.update_attributes({"n_star": 0})
        else:
            del root[spec.name]
            group = None
    if group is None:
        group = root if spec.name is None else root.create_group(spec.name)
    if stale or "settings" not in group.attrs or not set(spec.variables) <= set(group.array_keys()):
        sizes = {"wavelength": n_pixels, **spec.extra_sizes}
        for var, (dims, dtype, fill, var_attrs) in spec.variables.items():
            if var in group.array_keys():
                continue
            shape = tuple(0 if d == "star" else sizes[d] for d in dims)
            chunks = tuple(chunk_stars if d == "star" else sizes[d] for d in dims)
            group.create_array(var, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill,
                               dimension_names=dims, attributes=var_attrs)
        group.update_attributes({"n_star": 0, "settings": fingerprint, **dict(attrs or {})})
    elif attrs:
        group.update_attributes(dict(attrs))
    committed = int(group.attrs.get("n_star", 0))
    for var in spec.variables:
        arr = group[var]
        if arr.shape[0] != n_star:
            arr.resize((n_star,) + arr.shape[1:])
    return committed


def write_derived_rows(
    store: str | os.PathLike,
    name: str | None,
    rows: xr.Dataset | None,
    start: int,
    stop: int,
    extra_attrs: Mapping[str, Any] | None = None,
) -> None:
    """Write ``rows`` (a Dataset of rows [start, stop), lazy or not) and commit them.

    With dask-backed variables the chunks are computed and written by the workers of the
    current Dask client. The group's ``n_star`` becomes ``stop`` only after every chunk
    is written.
    """
    location = resolve_location(store)
    if rows is not None and stop > start:
        payload = rows.drop_vars([v for v in rows.coords], errors="ignore")
        for var in payload.variables.values():
            var.encoding = {}
            var.attrs = {}
        payload.attrs = {}
        payload.to_zarr(
            location.zarr_store(), group=name, region={"star": slice(start, stop)}, mode="r+",
            zarr_format=3, consolidated=False, align_chunks=True,
        )
    group = _get(_root(store, "r+"), name)
    group.update_attributes({"n_star": int(stop), **(dict(extra_attrs) if extra_attrs else {})})


def block_rows_for(chunk_stars: int, chunks_per_block: int, n_threads: int | None = None) -> int:
    """Rows per committed block: ``chunks_per_block`` chunks, or two per worker thread if more.

    Each block is one Dask computation followed by a commit on the client, so a block of
    fewer chunks than worker threads would leave workers idle. Tasks stay one chunk each,
    so worker memory does not depend on the block size.

    Parameters
    ----------
    chunk_stars : int
        Stars per chunk of the store.
    chunks_per_block : int
        Smallest number of chunks per block.
    n_threads : int, optional
        Worker threads of the cluster; default: those of the current Dask client (1 when
        there is none).

    Returns
    -------
    int
        A multiple of ``chunk_stars``.
    """
    if n_threads is None:
        n_threads = _client_threads()
    return max(1, int(chunk_stars)) * max(1, int(chunks_per_block), 2 * int(n_threads))


def _client_threads() -> int:
    """Worker threads of the current distributed client (1 without one)."""
    try:
        from distributed import default_client

        return max(1, sum(default_client().nthreads().values()))
    except (ImportError, ValueError):
        return 1


def write_rows_in_blocks(
    store: str | os.PathLike,
    name: str | None,
    compute_rows: Callable[[int, int], xr.Dataset],
    start: int,
    stop: int,
    block_rows: int,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Compute and commit rows [start, stop) in blocks, so an interruption loses one block.

    Parameters
    ----------
    compute_rows : callable
        ``compute_rows(a, b)`` returns the lazy Dataset of rows [a, b).
    block_rows : int
        Rows per block (a multiple of the chunk size keeps blocks chunk-aligned).
    progress : callable, optional
        ``progress(rows_done, rows_total)`` after each block.
    """
    block_rows = max(1, int(block_rows))
    a = start
    while a < stop:
        # End blocks on a multiple of block_rows so that later blocks stay chunk-aligned.
        b = min(stop, (a // block_rows + 1) * block_rows)
        write_derived_rows(store, name, compute_rows(a, b), a, b)
        if progress is not None:
            progress(b - start, stop - start)
        a = b


def open_derived_group(store: str | os.PathLike, name: str | None, chunks: dict | None = None) -> xr.Dataset:
    """Open the committed rows of a derived group lazily.

    Raises
    ------
    StoreError
        When the group does not exist (the step that writes it has not run).
    """
    location = resolve_location(store)
    n_star, attrs = derived_group_extent(store, name)
    if not attrs:
        what = f"'{name}' group" if name else "results"
        raise StoreError(f"{location.url} has no {what} yet: run the step that computes it first")
    root = _root(store, "r")
    group = _get(root, name)
    ds = open_committed(location.zarr_store(read_only=True), group, name, {"star": n_star}, chunks)
    ds.attrs = attrs
    return as_object_strings(ds)
