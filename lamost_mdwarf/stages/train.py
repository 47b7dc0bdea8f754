"""Stage ``train``: fit the Cannon model on the training subset and save it."""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import xarray as xr

from lamost_mdwarf.errors import PipelineError
from lamost_mdwarf.io.derived_groups import open_derived_group
from lamost_mdwarf.io.survey_store import open_survey_store
from lamost_mdwarf.kernels.cannon_design import DEFAULT_LABEL_NAMES, n_quadratic_terms
from lamost_mdwarf.model import CannonModel, save_model
from lamost_mdwarf.stages.preprocess import PREPROCESSED_GROUP
from lamost_mdwarf.stages.select import open_selection
from lamost_mdwarf.training import DEFAULT_PIXEL_CHUNK, train_model

__all__ = ["normalized_spectra", "subset_labels", "run_train"]


def normalized_spectra(store: str | os.PathLike, rows: np.ndarray | slice | None = None) -> tuple[xr.DataArray, xr.DataArray]:
    """Normalized flux and ivar of the store (lazy), with the wavelength coordinate."""
    ds = open_survey_store(store)
    pre = open_derived_group(store, PREPROCESSED_GROUP).assign_coords(wavelength=ds["wavelength"])
    flux, ivar = pre["norm_flux"], pre["norm_ivar"]
    if rows is not None:
        flux, ivar = flux.isel(star=rows), ivar.isel(star=rows)
    return flux, ivar


def subset_labels(selection: xr.Dataset, rows: np.ndarray, label_names: Sequence[str]) -> np.ndarray:
    """(N, K) catalog labels of the given rows of the selection group."""
    return np.column_stack([np.asarray(selection[f"label_{name}"].values)[rows] for name in label_names])


def run_train(
    store: str | os.PathLike,
    model_path: str | os.PathLike,
    label_names: Sequence[str] = DEFAULT_LABEL_NAMES,
    pixel_chunk: int = DEFAULT_PIXEL_CHUNK,
) -> CannonModel:
    """Train on the stars of the ``training`` subset and save the model.

    Runs on the current Dask client (pixel chunks are fitted by the workers).

    Parameters
    ----------
    store : str or path-like
        Survey store, preprocessed and selected.
    model_path : str or path-like
        Where to save the model (Zarr).
    label_names : sequence of str
        Labels of the model (catalog columns ``label_<name>`` of the selection).
    pixel_chunk : int
        Pixels per training task.
    """
    selection = open_selection(store)
    missing = [name for name in label_names if f"label_{name}" not in selection.variables]
    if missing:
        raise ValueError(f"the label catalog provides no {', '.join(missing)}")
    subset = np.asarray(selection["subset"].values).astype(str)
    rows = np.flatnonzero(subset == "training")
    n_terms = n_quadratic_terms(len(label_names))
    if rows.size <= n_terms:
        raise PipelineError(
            f"only {rows.size} training stars (matched, SNR_lambda above the training threshold, passing every "
            f"cut); a {n_terms}-term model needs more than {n_terms}. Ingest more spectra, use a larger label "
            "catalog, or lower the training SNR threshold (select --snr-training)."
        )
    labels = subset_labels(selection, rows, label_names)
    flux, ivar = normalized_spectra(store, rows)
    ids = np.asarray(open_survey_store(store)["spectrum_id"].values)[rows]
    model = train_model(flux, ivar, labels, label_names, ids, pixel_chunk=pixel_chunk, settings={
        "preprocess": open_derived_group(store, PREPROCESSED_GROUP).attrs.get("settings"),
        "selection": selection.attrs.get("settings"),
        "n_training": int(rows.size),
    })
    save_model(model, model_path)
    return model
