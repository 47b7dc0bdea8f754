"""Stage ``train``: fit the Cannon model on the training stars and save it.

``paper`` mode: the selection's ``training`` subset and its catalog labels. ``best``
mode: every usable catalog-matched object (:func:`training_pool_rows`), with Teff and
latent labels refined against the catalog (:func:`lamost_mdwarf.training.refine_latent_labels`)
and R, M, L derived from them (settings ``derived_labels`` of the model). See
:mod:`lamost_mdwarf.modes`.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence

import numpy as np
import xarray as xr

from lamost_mdwarf.errors import PipelineError
from lamost_mdwarf.io.derived_groups import open_derived_group
from lamost_mdwarf.io.survey_store import open_survey_store
from lamost_mdwarf.kernels.cannon_design import DEFAULT_LABEL_NAMES, n_quadratic_terms
from lamost_mdwarf.kernels.label_refinement import derived_coefficient_covariance, fit_derived_label
from lamost_mdwarf.model import LABEL_UNITS, CannonModel, save_model
from lamost_mdwarf.modes import DEFAULT_MODE, ModeSettings, get_mode
from lamost_mdwarf.selection import SELECTION_BITS, SelectionConfig, subtype_number
from lamost_mdwarf.stages.preprocess import PREPROCESSED_GROUP
from lamost_mdwarf.stages.select import open_selection
from lamost_mdwarf.training import DEFAULT_PIXEL_CHUNK, refine_latent_labels, train_model

__all__ = ["latent_label_names", "normalized_spectra", "subset_labels", "run_train", "training_pool_rows"]

logger = logging.getLogger("lamost_mdwarf")


def latent_label_names(n_latent: int) -> tuple[str, ...]:
    """Names of the latent labels of a ``best``-mode model: ``latent_1``, ``latent_2``, ..."""
    return tuple(f"latent_{i + 1}" for i in range(int(n_latent)))


def training_pool_rows(selection: xr.Dataset, snr_lambda: np.ndarray, mode: ModeSettings,
                       label_names: Sequence[str] = DEFAULT_LABEL_NAMES) -> np.ndarray:
    """Store rows of the training stars of a mode.

    Parameters
    ----------
    selection : xarray.Dataset
        The ``selection`` group.
    snr_lambda : numpy.ndarray
        SNR_lambda of every stored spectrum.
    mode : ModeSettings
        ``training_pool == "training"``: the ``training`` subset; ``"matched"``: every
        spectrum of the ``training`` or ``validation`` subsets whose catalog labels are
        finite, positive, with positive errors and not flagged as relation outliers, one
        per catalog object (the highest SNR_lambda); a random subset of
        ``mode.max_training_stars`` of them when there are more.
    label_names : sequence of str
        Catalog labels that must be usable.

    Returns
    -------
    numpy.ndarray
        Sorted row indices.
    """
    subset = np.asarray(selection["subset"].values).astype(str)
    if mode.training_pool == "training":
        return np.flatnonzero(subset == "training")
    flags = np.asarray(selection["selection_flags"].values).astype(np.int64)
    bad = SELECTION_BITS["label_outlier"] | SELECTION_BITS["bad_labels"]
    usable = np.isin(subset, ("training", "validation")) & ((flags & bad) == 0)
    for name in label_names:
        value = np.asarray(selection[f"label_{name}"].values, dtype=np.float64)
        error = np.asarray(selection[f"label_{name}_err"].values, dtype=np.float64)
        usable &= np.isfinite(value) & (value > 0) & np.isfinite(error) & (error > 0)
    rows = np.flatnonzero(usable)
    label_index = np.asarray(selection["label_index"].values)[rows]
    snr = np.nan_to_num(np.asarray(snr_lambda, dtype=np.float64)[rows], nan=-np.inf)
    order = np.lexsort((-snr, label_index))
    first = np.ones(rows.size, dtype=bool)
    first[1:] = label_index[order][1:] != label_index[order][:-1]
    chosen = np.sort(rows[order][first])
    if mode.max_training_stars is not None and chosen.size > mode.max_training_stars:
        rng = np.random.default_rng(mode.seed)
        chosen = np.sort(rng.choice(chosen, size=mode.max_training_stars, replace=False))
    return chosen


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
    mode: str | ModeSettings = DEFAULT_MODE,
    progress: Callable[[int, int], None] | None = None,
) -> CannonModel:
    """Train on the training stars of the mode and save the model.

    Runs on the current Dask client (pixel chunks, and in ``best`` mode the folds of the
    label refinement, are fitted by the workers).

    Parameters
    ----------
    store : str or path-like
        Survey store, preprocessed and selected.
    model_path : str or path-like
        Where to save the model (Zarr).
    label_names : sequence of str
        Catalog labels (columns ``label_<name>`` of the selection). ``paper``: the
        model's labels. ``best``: must contain ``teff``; the model's labels are Teff and
        the latent labels, the others are derived labels.
    pixel_chunk : int
        Pixels per training task.
    mode : str or ModeSettings
        ``"paper"`` or ``"best"`` (:mod:`lamost_mdwarf.modes`); stored in the model's
        settings.
    progress : callable, optional
        ``progress(done, total)`` over the label-refinement iterations (``best``).
    """
    mode = get_mode(mode)
    selection = open_selection(store)
    missing = [name for name in label_names if f"label_{name}" not in selection.variables]
    if missing:
        raise ValueError(f"the label catalog provides no {', '.join(missing)}")
    snr = np.asarray(open_survey_store(store)["snr_lambda"].values, dtype=np.float64)
    rows = training_pool_rows(selection, snr, mode, label_names)
    n_model_labels = len(label_names) if mode.label_model == "catalog" else 1 + mode.n_latent
    n_terms = n_quadratic_terms(n_model_labels)
    needed = n_terms if mode.label_model == "catalog" else max(n_terms * mode.n_folds // (mode.n_folds - 1) + 1,
                                                                  4 * n_terms)
    if rows.size <= needed:
        what = ("matched, SNR_lambda above the training threshold, passing every cut" if mode.training_pool ==
                "training" else "catalog-matched objects passing every cut with usable, non-outlier labels")
        raise PipelineError(
            f"only {rows.size} training stars ({what}); a {n_terms}-term model in mode {mode.name!r} needs more "
            f"than {needed}. Ingest more spectra, use a larger label catalog, or lower the training SNR threshold "
            "(select --snr-training)."
        )
    labels = subset_labels(selection, rows, label_names)
    flux, ivar = normalized_spectra(store, rows)
    ids = np.asarray(open_survey_store(store)["spectrum_id"].values)[rows]
    settings = {
        "preprocess": open_derived_group(store, PREPROCESSED_GROUP).attrs.get("settings"),
        "selection": selection.attrs.get("settings"),
        "n_training": int(rows.size),
        "mode": mode.to_dict(),
    }
    if mode.label_model == "catalog":
        model = train_model(flux, ivar, labels, label_names, ids, pixel_chunk=pixel_chunk, settings=settings)
    else:
        model = _train_latent(flux, ivar, labels, label_names, ids, pixel_chunk, mode, settings,
                              subset_labels(selection, rows, [f"{name}_err" for name in label_names]), progress)
        subclass = np.asarray(open_survey_store(store)["subclass"].values)[rows]
        model.settings["subtype_relation"] = _subtype_relation(model.training_labels[:, 0], subclass, selection)
        model.settings["label_domain"] = {"min": model.training_labels.min(axis=0).tolist(),
                                          "max": model.training_labels.max(axis=0).tolist()}
    save_model(model, model_path)
    return model


def _train_latent(flux: xr.DataArray, ivar: xr.DataArray, catalog: np.ndarray, catalog_names: Sequence[str],
                  ids: np.ndarray, pixel_chunk: int, mode: ModeSettings, settings: dict,
                  catalog_err: np.ndarray, progress: Callable[[int, int], None] | None) -> CannonModel:
    """``best`` mode: refined Teff + latent labels, then the derived labels' regressions."""
    names = list(catalog_names)
    if "teff" not in names:
        raise ValueError("a latent-label model needs the catalog's teff (label set must contain 'teff')")
    t = names.index("teff")
    flux_np = np.asarray(flux.values, dtype=np.float64)
    ivar_np = np.asarray(ivar.values, dtype=np.float64)
    refined = refine_latent_labels(flux_np, ivar_np, catalog[:, t], catalog_err[:, t], n_latent=mode.n_latent,
                                   n_iterations=mode.refine_iterations, n_folds=mode.n_folds, damping=mode.damping,
                                   seed=mode.seed, clip_sigma=mode.clip_sigma, clip_rounds=mode.clip_rounds,
                                   progress=progress)
    model_names = ("teff",) + latent_label_names(mode.n_latent)
    derived = {}
    for j, name in enumerate(names):
        if name == "teff":
            continue
        calibration, intrinsic = fit_derived_label(refined.labels, catalog[:, j], catalog_err[:, j],
                                                   catalog[:, t], catalog_err[:, t])
        covariance = derived_coefficient_covariance(refined.labels, catalog[:, j], catalog_err[:, j], calibration)
        derived[name] = {"calibration": calibration.to_dict(), "relative_intrinsic": intrinsic,
                         "coefficient_covariance": covariance.tolist(),
                         "unit": LABEL_UNITS.get(name, "1"), "space": "log"}
        logger.info(f"derived label {name}: intrinsic scatter {100 * intrinsic:.2f}% (catalog error budget)")
    settings = {**settings, "label_refinement": refined.history, "derived_labels": derived,
                "catalog_label_names": names}
    return train_model(flux, ivar, refined.labels, model_names, ids, pixel_chunk=pixel_chunk, settings=settings)


def _subtype_relation(teff: np.ndarray, subclass: np.ndarray, selection: xr.Dataset) -> dict[str, float] | None:
    """Linear LAMOST subtype-Teff relation of the training stars, and the selected subtype range.

    Used by the ``best`` mode's inference to flag stars whose spectroscopic Teff implies a
    subtype outside the range the selection keeps (e.g. M7-M9 stars whose header subclass
    said M6 or earlier): the relation is the survey's own subclass convention, learned
    from the training stars' header subclasses against their refined Teff.
    """
    subtype = subtype_number(np.asarray(subclass))
    ok = np.isfinite(subtype) & np.isfinite(teff)
    if ok.sum() < 10 or np.ptp(teff[ok]) <= 0:
        return None
    slope, intercept = np.polyfit(teff[ok], subtype[ok], 1)
    config = SelectionConfig()
    try:
        stored = json.loads(selection.attrs.get("settings") or "{}").get("selection") or {}
        lo = float(stored.get("subtype_min", config.subtype_min))
        hi = float(stored.get("subtype_max", config.subtype_max))
    except (TypeError, ValueError):
        lo, hi = config.subtype_min, config.subtype_max
    return {"intercept": float(intercept), "slope": float(slope), "subtype_min": lo, "subtype_max": hi,
            "scatter": float(np.std(subtype[ok] - (intercept + slope * teff[ok])))}
