"""Stage ``infer``: labels for every usable spectrum, final cuts, and the results store.

The results store (``results.zarr``) is row-aligned with the survey store: one row per
stored spectrum. Stars excluded by the selection carry NaN labels and flag bit 1; every
other star is fitted. Rows are computed (on the Dask workers) and committed block by
block: an interrupted run resumes after the last committed block, and a rerun with the
same model and settings only computes rows added to the store since (a new release).
A different model or settings recompute everything.

Reported errors (``teff_err`` ...) come from the validation error model evaluated at
the star's SNR_lambda (the paper's choice, ``error_mode="error_model"``), or its
quadrature sum with the formal error (``"quadrature"``), or the larger of the two
(``"max"``). Before validation only the formal errors exist and are reported.

The model's mode (:mod:`lamost_mdwarf.modes`, recorded in its settings) decides the rest.
``best`` models: the robust test step (clipped pixels counted in ``n_clipped``), the
latent labels (``latent_1`` ...) next to Teff, R, M, L derived from them, and
``error_mode="calibrated"`` by default: the formal error and the cross-validated
systematic term in quadrature, propagated to R, M, L together with their intrinsic
scatter. ``paper`` models: as in the paper (``n_clipped`` is 0).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from lamost_mdwarf.errors import PipelineError
import lamost_mdwarf.query  # noqa: F401  (registers the ds.mdwarf accessor on opened results)
from lamost_mdwarf._version import __version__
from lamost_mdwarf.inference import infer_dataset, physical_labels
from lamost_mdwarf.io.derived_groups import (
    DerivedGroupSpec,
    block_rows_for,
    open_derived_group,
    prepare_derived_group,
    write_rows_in_blocks,
)
from lamost_mdwarf.io.storage import WriterLock, resolve_location
from lamost_mdwarf.io.survey_store import open_survey_store
from lamost_mdwarf.kernels.cannon_infer import InferenceStatus
from lamost_mdwarf.kernels.error_model import combine_errors, error_model_sigma
from lamost_mdwarf.model import LABEL_LONG_NAMES, LABEL_UNITS, CannonModel, load_model
from lamost_mdwarf.modes import mode_from_settings
from lamost_mdwarf.selection import SELECTION_BITS
from lamost_mdwarf.stages.select import open_selection
from lamost_mdwarf.stages.train import normalized_spectra

__all__ = ["RESULT_FLAGS", "InferSettings", "run_infer", "open_results", "results_spec"]

#: Bits of the results' ``flags`` variable (0 = passes every final cut).
RESULT_FLAGS: dict[str, int] = {
    "excluded": 1,          # failed a selection cut (see selection_reason)
    "chi2": 2,              # chi2 >= chi2_max
    "invalid_labels": 4,    # a non-finite or non-positive label
    "not_converged": 8,     # the optimiser did not converge
    "fit_failed": 16,       # non-finite chi2, singular Hessian or too few pixels
    "outside_subtypes": 32,  # best mode: the spectroscopic Teff implies a subtype outside the selected range
    "likely_binary": 64,    # best mode: the matched catalog R and M are off the Teff relations
    "outside_training": 128,  # best mode: model labels outside the range of the training labels
}

_FAILED = int(InferenceStatus.NON_FINITE | InferenceStatus.SINGULAR_HESSIAN | InferenceStatus.TOO_FEW_PIXELS)


@dataclass(frozen=True)
class InferSettings:
    """Final-cut and error settings of the inference stage.

    Attributes
    ----------
    chi2_max : float
        Final chi^2 cut (paper: 5000).
    error_mode : str, optional
        ``"error_model"``, ``"quadrature"``, ``"max"`` (see
        :func:`lamost_mdwarf.kernels.error_model.combine_errors`) or ``"calibrated"``
        (``best`` models only); ``None``: the model's mode decides (paper:
        ``"error_model"``, best: ``"calibrated"``).
    """

    chi2_max: float = 5000.0
    error_mode: str | None = None


def _reported_labels(model: CannonModel) -> list[tuple[str, str]]:
    """(name, unit) of every label the results report: the model's, then derived ones."""
    names = [(name, unit) for name, unit in zip(model.label_names, model.label_units)]
    for name, spec in (model.settings.get("derived_labels") or {}).items():
        names.append((name, str(spec.get("unit", LABEL_UNITS.get(name, "1")))))
    return names


def effective_error_mode(model: CannonModel, settings: InferSettings) -> str:
    """The error mode used for a model (see :class:`InferSettings`)."""
    mode = mode_from_settings(model.settings)
    chosen = settings.error_mode or mode.error_mode
    if chosen == "calibrated" and mode.label_model != "latent":
        raise PipelineError(f"error mode 'calibrated' needs a model trained in mode 'best' (this one: {mode.name!r})")
    return chosen


def results_spec(model: CannonModel) -> DerivedGroupSpec:
    """Variables of the results store for a model."""
    k = len(model.label_names)
    variables: dict[str, tuple] = {}
    for name, unit in _reported_labels(model):
        long = LABEL_LONG_NAMES.get(name, name)
        variables[name] = (("star",), "float64", float("nan"), {"units": unit, "long_name": long})
        variables[f"{name}_err"] = (("star",), "float64", float("nan"),
                                    {"units": unit, "long_name": f"1-sigma uncertainty of {name}"})
        variables[f"{name}_err_formal"] = (("star",), "float64", float("nan"),
                                           {"units": unit, "long_name": f"formal (inverse-Hessian) error of {name}"})
    variables.update({
        "covariance_formal": (("star", "label", "label_b"), "float64", float("nan"),
                              {"long_name": "formal label covariance in physical units (label order: "
                                            + ", ".join(model.label_names) + ")"}),
        "chi2": (("star",), "float64", float("nan"), {"long_name": "chi^2 of the Cannon fit"}),
        "rchi2": (("star",), "float64", float("nan"), {"long_name": "reduced chi^2"}),
        "n_good_pixels": (("star",), "int32", 0, {"long_name": "unmasked pixels used in the fit"}),
        "converged": (("star",), "bool", False, {"long_name": "optimiser converged"}),
        "n_clipped": (("star",), "int32", 0, {"long_name": "pixels clipped by the robust test step (best mode)"}),
        "fit_status": (("star",), "int32", 0, {"long_name": "test-step status bits (see lamost_mdwarf.inference)"}),
        "flags": (("star",), "uint32", 0, {"long_name": "result flags: 1 excluded by selection, 2 chi2 cut, "
                                                       "4 invalid labels, 8 not converged, 16 fit failed, "
                                                       "32 Teff outside the selected subtypes (best mode), "
                                                       "64 likely unresolved binary (best mode), "
                                                       "128 labels outside the training range (best mode)"}),
        "flag_reason": (("star",), str, "", {"long_name": "why the star is flagged"}),
        "spectrum_id": (("star",), str, "", {"long_name": "stable LAMOST observation id"}),
        "obsid": (("star",), "int64", -1, {"long_name": "LAMOST OBSID (-1 when absent)"}),
        "designation": (("star",), str, "", {"long_name": "LAMOST designation"}),
        "ra": (("star",), "float64", float("nan"), {"units": "deg", "long_name": "right ascension (J2000)"}),
        "dec": (("star",), "float64", float("nan"), {"units": "deg", "long_name": "declination (J2000)"}),
        "snr_lambda": (("star",), "float32", float("nan"), {"long_name": "sum of the ugriz SNRs"}),
        "subclass": (("star",), str, "", {"long_name": "LAMOST subclass"}),
        "release": (("star",), str, "", {"long_name": "release the spectrum came from"}),
        "subset": (("star",), str, "", {"long_name": "training, validation, survey or excluded"}),
        "model_version": (("star",), str, "", {"long_name": "hash of the model that produced the row"}),
    })
    return DerivedGroupSpec(None, variables, extra_sizes={"label": k, "label_b": k})


def _finalize(fit: xr.Dataset, meta: dict[str, np.ndarray], model: CannonModel,
              settings: InferSettings) -> xr.Dataset:
    """Errors, final cuts and flags for a block of computed fits (numpy, on the client)."""
    n = fit.sizes["star"]
    snr = np.asarray(meta["snr_lambda"], dtype=np.float64)
    flags = np.zeros(n, dtype=np.uint32)
    reasons: list[list[str]] = [[] for _ in range(n)]

    def flag(name: str, where: np.ndarray, text: str | np.ndarray) -> None:
        flags[where] |= np.uint32(RESULT_FLAGS[name])
        for i in np.flatnonzero(where):
            reasons[i].append(text if isinstance(text, str) else str(text[i]))

    excluded = meta["subset"] == "excluded"
    flag("excluded", excluded, np.array([f"excluded: {r}" for r in meta["selection_reason"]], dtype=object))
    status = fit["fit_status"].values
    fitted = ~excluded
    flag("fit_failed", fitted & ((status & _FAILED) != 0), "fit failed")
    flag("not_converged", fitted & ((status & int(InferenceStatus.NOT_CONVERGED)) != 0), "not converged")
    chi2 = fit["chi2"].values
    flag("chi2", fitted & ~(chi2 < settings.chi2_max), f"chi2>={settings.chi2_max:g}")
    labels = np.column_stack([fit[name].values for name in model.label_names])
    physical = [j for j, name in enumerate(model.label_names) if name in LABEL_UNITS]  # latent labels may be < 0
    invalid = fitted & ~np.all(np.isfinite(labels) & ((labels > 0) | ~np.isin(np.arange(labels.shape[1]), physical)),
                               axis=1)
    flag("invalid_labels", invalid, "invalid labels (non-finite or <= 0)")

    out = {}
    error_mode = effective_error_mode(model, settings)
    if model.settings.get("derived_labels") is not None:  # best mode: Teff, latent and derived labels
        systematic, formal_scale = {}, 1.0
        if error_mode == "calibrated":
            validation = model.settings.get("validation") or {}
            systematic = {name: float(value["sigma"]) for name, value in (validation.get("systematic") or {}).items()}
            formal_scale = float(validation.get("formal_scale", 1.0))
        labels_fit = np.column_stack([fit[name].values for name in model.label_names])
        reported = physical_labels(model, labels_fit, fit["covariance"].values, systematic, formal_scale)
        for name, value in reported.items():
            err = value.error
            if error_mode != "calibrated" and name in model.error_models:
                err = combine_errors(value.error_formal, error_model_sigma(model.error_models[name], snr),
                                     mode=error_mode)
            out[name] = value.value
            out[f"{name}_err"] = np.where(excluded, np.nan, err)
            out[f"{name}_err_formal"] = value.error_formal
        derived = np.column_stack([reported[name].value for name in model.settings["derived_labels"]])
        bad_derived = fitted & ~invalid & ~np.all(np.isfinite(derived) & (derived > 0), axis=1)
        flag("invalid_labels", bad_derived, "invalid labels (non-finite or <= 0)")
        relation = model.settings.get("subtype_relation")
        if relation:
            subtype = relation["intercept"] + relation["slope"] * reported["teff"].value
            outside = fitted & np.isfinite(subtype) & ((subtype < relation["subtype_min"] - 0.5)
                                                       | (subtype > relation["subtype_max"] + 0.5))
            flag("outside_subtypes", outside, np.array([f"Teff implies subtype {v:.1f}" for v in subtype],
                                                       dtype=object))
        domain = model.settings.get("label_domain")
        if domain:
            lo, hi = np.asarray(domain["min"]), np.asarray(domain["max"])
            with np.errstate(invalid="ignore"):
                off = fitted & ~invalid & np.any((labels_fit < lo) | (labels_fit > hi), axis=1)
            flag("outside_training", off, "labels outside the training-label range")
        outlier_bit = int(SELECTION_BITS["label_outlier"])
        binary = fitted & ((np.asarray(meta["selection_flags"]).astype(np.int64) & outlier_bit) != 0)
        flag("likely_binary", binary, "catalog R and M off the Teff relations (likely unresolved binary)")
    else:
        for name in model.label_names:
            formal = fit[f"{name}_err_formal"].values
            if name in model.error_models:
                model_err = error_model_sigma(model.error_models[name], snr)
                err = combine_errors(formal, model_err, mode=error_mode)
            else:
                err = formal
            out[name] = fit[name].values
            out[f"{name}_err"] = np.where(excluded, np.nan, err)
            out[f"{name}_err_formal"] = formal
    out.update({
        "covariance_formal": fit["covariance"].values,
        "chi2": chi2, "rchi2": fit["rchi2"].values, "n_good_pixels": fit["n_good_pixels"].values,
        "converged": fit["converged"].values, "n_clipped": fit["n_clipped"].values, "fit_status": status,
        "flags": flags,
        "flag_reason": np.array(["; ".join(r) for r in reasons], dtype=object),
        "model_version": np.full(n, model.model_hash, dtype=object),
    })
    for name in ("spectrum_id", "obsid", "designation", "ra", "dec", "snr_lambda", "subclass", "release", "subset"):
        out[name] = meta[name]
    data = {}
    for name, values in out.items():
        dims = ("star", "label", "label_b") if name == "covariance_formal" else ("star",)
        values = np.asarray(values)
        data[name] = (dims, values.astype(object) if values.dtype.kind in "OUT" else values)
    return xr.Dataset(data)


def run_infer(
    store: str | os.PathLike,
    model_path: str | os.PathLike,
    results_path: str | os.PathLike,
    settings: InferSettings = InferSettings(),
    chunks_per_block: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[int, int]:
    """Infer labels for the store's spectra into the results store.

    Parameters
    ----------
    store : str or path-like
        Survey store, preprocessed and selected.
    model_path : str or path-like
        Trained (and normally validated) model.
    results_path : str or path-like
        Results store (created, or resumed from its committed extent).
    settings : InferSettings
        Final cuts and error mode.
    chunks_per_block : int
        Star chunks computed and committed together (an interruption loses one block);
        more when the store's chunks are smaller than the default (see
        :func:`~lamost_mdwarf.io.derived_groups.block_rows_for`).
    progress : callable, optional
        ``progress(rows_done, rows_total)`` after each block.

    Returns
    -------
    (int, int)
        Rows computed by this run and rows in the results store.
    """
    model = load_model(model_path)
    mode = mode_from_settings(model.settings)
    error_mode = effective_error_mode(model, settings)
    ds = open_survey_store(store)
    selection = open_selection(store)
    n_star = ds.sizes["star"]
    if selection.sizes["star"] != n_star:
        raise PipelineError(f"{n_star - selection.sizes['star']} spectra have no selection yet; run select first")
    chunk = int(ds.attrs["chunk_stars"])
    run_settings: dict[str, Any] = {
        "model_hash": model.model_hash,
        "error_models": {k: v._asdict() for k, v in model.error_models.items()},
        "chi2_max": settings.chi2_max,
        "error_mode": error_mode,
        "selection": selection.attrs.get("settings"),
        "mode": mode.to_dict(),
    }
    if mode.label_model == "latent":
        run_settings["systematic"] = (model.settings.get("validation") or {}).get("systematic")
        run_settings["formal_scale"] = (model.settings.get("validation") or {}).get("formal_scale")
    spec = results_spec(model)
    location = resolve_location(results_path)
    with WriterLock(location, "infer"):
        start = prepare_derived_group(results_path, spec, n_star, chunk, ds.sizes["wavelength"], run_settings,
                                      attrs={
                                          "title": "M-dwarf parameters from LAMOST spectra (The Cannon)",
                                          "Conventions": "CF-1.10",
                                          "model_hash": model.model_hash,
                                          "label_names": list(model.label_names),
                                          "code_version": __version__,
                                          "training_ids": list(map(str, model.training_ids)),
                                          "survey_store": os.path.abspath(store) if "://" not in str(store)
                                          else str(store),
                                          "model_path": os.path.abspath(model_path) if "://" not in str(model_path)
                                          else str(model_path),
                                          "chi2_max": settings.chi2_max,
                                          "error_mode": error_mode,
                                          "mode": mode.name,
                                          "mode_settings": json.dumps(mode.to_dict(), sort_keys=True),
                                      })
        flux, ivar = normalized_spectra(store)
        meta_names = ("spectrum_id", "obsid", "designation", "ra", "dec", "snr_lambda", "subclass", "release")

        def compute_rows(a: int, b: int) -> xr.Dataset:
            # Read only rows [a, b) of the per-star columns (``.values[a:b]`` would read whole
            # columns for every block: quadratic in the number of stars).
            rows = {"star": slice(a, b)}
            subset = np.asarray(selection["subset"].isel(rows).values).astype(str)
            active = xr.DataArray(subset != "excluded", dims="star")
            fit = infer_dataset(flux.isel(rows), ivar.isel(rows), active, model,
                                clip_sigma=mode.clip_sigma, clip_grow=mode.clip_grow,
                                clip_rounds=mode.clip_rounds).compute()
            meta = {name: np.asarray(ds[name].isel(rows).values) for name in meta_names}
            meta["subset"] = subset.astype(object)
            meta["selection_reason"] = np.asarray(selection["selection_reason"].isel(rows).values).astype(str)
            meta["selection_flags"] = np.asarray(selection["selection_flags"].isel(rows).values)
            return _finalize(fit, meta, model, settings)

        write_rows_in_blocks(results_path, None, compute_rows, start, n_star,
                             block_rows_for(chunk, chunks_per_block), progress)
    return n_star - start, n_star


def open_results(path: str | os.PathLike) -> xr.Dataset:
    """Open a results store lazily (committed rows only), with ``label`` coordinates."""
    ds = open_derived_group(path, None)
    names = ds.attrs.get("label_names")
    if names and "label" in ds.dims:
        ds = ds.assign_coords(label=list(names), label_b=list(names))
    return ds
