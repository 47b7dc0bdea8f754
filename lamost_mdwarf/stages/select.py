"""Stage ``select``: cross-match with the label catalog, quality cuts, and the split.

Writes the ``selection`` group of the survey store (row-aligned with it): matched catalog
row and labels, the selection bitmask, a readable reason, and the subset of each star
(training / validation / survey / excluded). The group is recomputed in full each run
(it is one small row per star); its attributes keep the cut table and the settings.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any

import numpy as np
import xarray as xr

from lamost_mdwarf.errors import PipelineError
from lamost_mdwarf.crossmatch import crossmatch_positions
from lamost_mdwarf.io.derived_groups import (
    DerivedGroupSpec,
    open_derived_group,
    prepare_derived_group,
    write_derived_rows,
)
from lamost_mdwarf.io.label_catalog import LABEL_UNITS, read_label_catalog
from lamost_mdwarf.io.storage import WriterLock, resolve_location
from lamost_mdwarf.io.survey_store import INGEST_FLAGS, open_survey_store
from lamost_mdwarf.selection import SelectionConfig, SelectionResult, select_subsets
from lamost_mdwarf.stages.preprocess import PREPROCESSED_GROUP

__all__ = ["SELECTION_GROUP", "SELECTION_VARIABLES", "run_select", "open_selection"]

SELECTION_GROUP = "selection"
_LABEL_COLUMNS = ("teff", "teff_err", "radius", "radius_err", "mass", "mass_err", "luminosity", "luminosity_err")

SELECTION_VARIABLES: dict[str, tuple[tuple[str, ...], Any, Any, dict]] = {
    "label_index": (("star",), "int64", -1, {"long_name": "matched row of the label catalog (-1: none)"}),
    "match_separation": (("star",), "float32", float("nan"),
                         {"long_name": "separation to the matched catalog entry", "units": "arcsec"}),
    **{f"label_{name}": (("star",), "float64", float("nan"),
                         {"long_name": f"catalog {name} of the matched entry", "units": str(LABEL_UNITS[name])})
       for name in _LABEL_COLUMNS},
    "selection_flags": (("star",), "uint16", 0,
                        {"long_name": "selection bits: 1 no redshift, 2 blue excess, 4 low SNR, 8 subtype, "
                                      "16 few good pixels, 32 bad continuum, 64 label outlier, "
                                      "128 below training SNR, 256 repeat observation, 512 bad labels"}),
    "subset": (("star",), str, "", {"long_name": "training, validation, survey or excluded"}),
    "selection_reason": (("star",), str, "", {"long_name": "names of the set selection bits"}),
}


def run_select(
    store: str | os.PathLike,
    labels: str | os.PathLike,
    columns: dict[str, str] | None = None,
    radius_arcsec: float = 3.0,
    config: SelectionConfig = SelectionConfig(),
) -> SelectionResult:
    """Cross-match, cut and split the store's stars; write the ``selection`` group.

    Parameters
    ----------
    store : str or path-like
        Survey store, already preprocessed.
    labels : str or path-like
        Label catalog (see :func:`lamost_mdwarf.io.label_catalog.read_label_catalog`).
    columns : dict, optional
        Catalog column mapping.
    radius_arcsec : float
        Match radius.
    config : SelectionConfig
        Cut thresholds.

    Returns
    -------
    SelectionResult
    """
    catalog = read_label_catalog(labels, columns)
    location = resolve_location(store)
    with WriterLock(location, "select"):
        ds = open_survey_store(store)
        pre = open_derived_group(store, PREPROCESSED_GROUP)
        n = ds.sizes["star"]
        if pre.sizes["star"] != n:
            raise PipelineError(f"{location.url}: {n - pre.sizes['star']} spectra are not preprocessed yet; "
                               "run `lamost-mdwarf preprocess` first")
        meta = xr.Dataset({
            "ra": ds["ra"], "dec": ds["dec"], "snr_lambda": ds["snr_lambda"], "subclass": ds["subclass"],
            "ingest_flags": ds["ingest_flags"], "good_fraction": pre["good_fraction"],
            "continuum_ok": pre["continuum_ok"], "blue_slope": pre["blue_slope"],
        }).compute()
        match = crossmatch_positions(meta["ra"].values, meta["dec"].values,
                                     catalog["ra"].value, catalog["dec"].value, radius_arcsec)
        matched = match.matched
        label_values = {}
        for name in _LABEL_COLUMNS:
            values = np.full(n, np.nan)
            values[matched] = catalog[name].value[match.label_index[matched]]
            label_values[name] = values
        result = select_subsets(
            has_redshift=(meta["ingest_flags"].values & INGEST_FLAGS["no_redshift"]) == 0,
            blue_slope=meta["blue_slope"].values,
            snr_lambda=meta["snr_lambda"].values,
            subclass=meta["subclass"].values,
            good_fraction=meta["good_fraction"].values,
            continuum_ok=meta["continuum_ok"].values,
            label_index=match.label_index,
            teff=label_values["teff"], radius=label_values["radius"],
            mass=label_values["mass"], luminosity=label_values["luminosity"],
            config=config,
        )
        rows = xr.Dataset({
            "label_index": ("star", match.label_index),
            "match_separation": ("star", match.separation_arcsec.astype(np.float32)),
            **{f"label_{name}": ("star", values) for name, values in label_values.items()},
            "selection_flags": ("star", result.flags),
            "subset": ("star", result.subset.astype(object)),
            "selection_reason": ("star", result.reason.astype(object)),
        })
        settings = {
            "labels": str(os.path.abspath(labels)),
            "columns": catalog.meta["column_mapping"],
            "radius_arcsec": radius_arcsec,
            "selection": asdict(config),
            "preprocess": pre.attrs.get("settings"),
        }
        spec = DerivedGroupSpec(SELECTION_GROUP, SELECTION_VARIABLES)
        prepare_derived_group(store, spec, n, int(ds.attrs["chunk_stars"]), ds.sizes["wavelength"], settings,
                              reset=True)
        write_derived_rows(store, SELECTION_GROUP, rows, 0, n, extra_attrs={
            "cut_table": json.dumps(result.cut_table),
            "counts": json.dumps(result.counts()),
            "n_label_rows": len(catalog),
        })
    return result


def open_selection(store: str | os.PathLike) -> xr.Dataset:
    """The ``selection`` group (lazy), with its cut table decoded in ``attrs``."""
    ds = open_derived_group(store, SELECTION_GROUP)
    ds.attrs["cut_table"] = [tuple(row) for row in json.loads(ds.attrs.get("cut_table", "[]"))]
    ds.attrs["counts"] = json.loads(ds.attrs.get("counts", "{}"))
    return ds
