"""Derived per-star groups inside a survey store (``preprocessed``, ``selection``, ...).

A derived group holds variables along ``star`` (aligned row by row with the survey store)
and optionally ``wavelength``. Like the store itself it has a committed extent, the
group attribute ``n_star``: rows are computed and written region by region (by Dask
workers, straight to Zarr), and ``n_star`` is advanced in one atomic metadata write
afterwards. Readers only trust rows below ``n_star``; an interrupted step is simply
redone from there.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
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
    "settings_fingerprint",
]


class DerivedGroupSpec:
    """Variables of a derived group.

    Parameters
    ----------
    name : str
        Group name inside the store.
    variables : mapping
        name -> (dims, dtype, fill, attrs); dims is ``("star",)`` or ``("star", "wavelength")``.
    """

    def __init__(self, name: str, variables: Mapping[str, tuple[tuple[str, ...], Any, Any, dict]]) -> None:
        self.name = name
        self.variables = dict(variables)


def settings_fingerprint(settings: Mapping[str, Any]) -> str:
    """A stable JSON string of the settings a group was computed with."""
    return json.dumps(settings, sort_keys=True, default=str)


def _root(store: str | os.PathLike, mode: str) -> zarr.Group:
    location = resolve_location(store)
    if not location.exists():
        raise StoreError(f"no survey store at {location.url}")
    return zarr.open_group(location.zarr_store(read_only=(mode == "r")), mode=mode, zarr_format=3)


def derived_group_extent(store: str | os.PathLike, name: str) -> tuple[int, dict[str, Any]]:
    """Committed rows and attributes of a derived group ((0, {}) when it does not exist)."""
    root = _root(store, "r")
    try:
        group = root[name]
    except KeyError:
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
) -> int:
    """Create the group if needed and size its arrays for ``n_star`` rows.

    If the group exists but was computed with different ``settings`` (or ``reset``), it
    is recreated empty. Returns the committed extent rows can be appended from.
    """
    root = _root(store, "r+")
    fingerprint = settings_fingerprint(settings)
    group = root.get(spec.name)
    if group is not None and (reset or group.attrs.get("settings") != fingerprint
                              or set(spec.variables) - set(group.array_keys())):
        del root[spec.name]
        group = None
    if group is None:
        group = root.create_group(spec.name)
        for var, (dims, dtype, fill, attrs) in spec.variables.items():
            shape = tuple(0 if d == "star" else n_pixels for d in dims)
            chunks = tuple(chunk_stars if d == "star" else n_pixels for d in dims)
            group.create_array(var, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill,
                               dimension_names=dims, attributes=attrs)
        group.attrs.update({"n_star": 0, "settings": fingerprint})
    committed = int(group.attrs.get("n_star", 0))
    for var in spec.variables:
        arr = group[var]
        if arr.shape[0] != n_star:
            arr.resize((n_star,) + arr.shape[1:])
    return committed


def write_derived_rows(
    store: str | os.PathLike,
    name: str,
    rows: xr.Dataset,
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
    if stop > start:
        payload = rows.drop_vars([v for v in rows.coords if v != "star"], errors="ignore")
        payload = payload.drop_vars(["wavelength"], errors="ignore")
        for var in payload.variables.values():
            var.encoding = {}
            var.attrs = {}
        payload.to_zarr(
            location.zarr_store(), group=name, region={"star": slice(start, stop)}, mode="r+",
            zarr_format=3, consolidated=False, align_chunks=True,
        )
    group = _root(store, "r+")[name]
    group.attrs.update({"n_star": int(stop), **(dict(extra_attrs) if extra_attrs else {})})


def open_derived_group(store: str | os.PathLike, name: str, chunks: dict | None = None) -> xr.Dataset:
    """Open the committed rows of a derived group lazily.

    Raises
    ------
    StoreError
        When the group does not exist (the step that writes it has not run).
    """
    location = resolve_location(store)
    n_star, attrs = derived_group_extent(store, name)
    if not attrs:
        raise StoreError(f"{location.url} has no '{name}' group yet: run the step that computes it first")
    root = _root(store, "r")
    ds = open_committed(location.zarr_store(read_only=True), root[name], name, {"star": n_star}, chunks)
    ds.attrs = attrs
    return as_object_strings(ds)

