"""Stage ``validate``: apply the model to the validation set, residual statistics, error model.

``paper`` mode: the per-label error model (std of residuals in equal-count SNR_lambda bins
fitted by a quadratic with a floor above an SNR threshold, paper Table 2) is stored with
the model. ``best`` mode (:func:`_validate_latent`): the training stars are predicted
k-fold out of fold (each by a model that did not see it) and the other validation stars
by the model; the systematic Teff error is the maximum-likelihood / posterior-mean
excess of the cross-validated residuals over the formal and catalog errors
(:func:`lamost_mdwarf.kernels.uncertainty.fit_systematic_variance`; residuals
leverage-corrected for the final Teff calibration fitted on the same stars), stored as a
constant (SNR-independent) error model added in quadrature to the formal errors. The
final Teff calibration's coefficient covariance (from the catalog noise) is stored too:
each star's reported error adds its variance at the star's labels, largest at the edges
of the calibrating stars. The
per-star residuals are written to a small Zarr dataset for figures and checks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from lamost_mdwarf.errors import PipelineError
from lamost_mdwarf.inference import infer_dataset, physical_labels
from lamost_mdwarf.io.survey_store import open_survey_store
from lamost_mdwarf.kernels.cannon_infer import InferenceStatus
from lamost_mdwarf.kernels.error_model import DEFAULT_SNR_THRESHOLD, QuadraticErrorModel, fit_error_model
from lamost_mdwarf.kernels.label_refinement import (
    anchor_coefficient_covariance,
    calibration_leverage,
    fit_catalog_anchor,
)
from lamost_mdwarf.kernels.uncertainty import (
    RepeatScale,
    SystematicFit,
    binned_systematic_scatter,
    fit_systematic_variance,
    repeat_pair_scale,
    repeat_pairs,
)
from lamost_mdwarf.model import CannonModel, load_model, save_model
from lamost_mdwarf.modes import ModeSettings, mode_from_settings
from lamost_mdwarf.stages.select import open_selection
from lamost_mdwarf.stages.train import normalized_spectra, subset_labels
from lamost_mdwarf.training import cross_validated_labels

__all__ = ["PAPER_TYPICAL_SCATTER", "ValidationSummary", "run_validate", "robust_std", "default_stars_per_bin"]

#: Highest power of the Cannon Teff in the ``best`` mode's final Teff calibration.
TEFF_CALIBRATION_DEGREE = 3

#: The paper's typical uncertainties (abstract): 110 K, 0.065 Rsun, 0.054 Msun, 0.012 Lsun.
PAPER_TYPICAL_SCATTER = {"teff": 110.0, "radius": 0.065, "mass": 0.054, "luminosity": 0.012}


def robust_std(values: np.ndarray) -> float:
    """1.4826 x the median absolute deviation (a standard deviation robust to outliers)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan")
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def default_stars_per_bin(n_stars: int) -> int:
    """The paper's 1360 stars per SNR bin, reduced so that small sets still get >= 8 bins."""
    return int(max(20, min(1360, n_stars // 8)))


@dataclass
class ValidationSummary:
    """Residual statistics per label and the fitted error models."""

    n_stars: int
    bias: dict[str, float] = field(default_factory=dict)
    scatter: dict[str, float] = field(default_factory=dict)
    robust_scatter: dict[str, float] = field(default_factory=dict)
    error_models: dict[str, QuadraticErrorModel] = field(default_factory=dict)
    mode: str = "paper"
    systematic: dict[str, SystematicFit] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        """A table of the validation scatter (against the catalog) next to the paper's typical uncertainties."""
        lines = [f"validation: {self.n_stars} spectra ({self.mode} mode), residuals against the catalog",
                 f"{'label':<11}{'bias':>10}{'std':>10}{'robust std':>12}{'paper':>9}{'floor':>9}"]
        for name in self.scatter:
            model = self.error_models.get(name)
            lines.append(
                f"{name:<11}{self.bias[name]:>10.4g}{self.scatter[name]:>10.4g}{self.robust_scatter[name]:>12.4g}"
                f"{PAPER_TYPICAL_SCATTER.get(name, float('nan')):>9.4g}"
                f"{(model.floor if model else float('nan')):>9.4g}")
        for name, fit in self.systematic.items():
            lines.append(f"systematic {name} error (k-fold cross-validated, catalog errors removed): "
                         f"{fit.sigma:.4g} (maximum likelihood {fit.sigma_ml:.4g}, "
                         f"variance +- {fit.variance_error:.3g}, "
                         f"{fit.n_stars} stars)")
        lines += self.notes
        return "\n".join(lines)


def run_validate(
    store: str | os.PathLike,
    model_path: str | os.PathLike,
    validation_path: str | os.PathLike | None = None,
    stars_per_bin: int | None = None,
    snr_threshold: float = DEFAULT_SNR_THRESHOLD,
    floor_method: str = "quadratic_minimum",
) -> ValidationSummary:
    """Validate the model, fit the SNR error model and store it with the model.

    Parameters
    ----------
    store : str or path-like
        Survey store (preprocessed and selected).
    model_path : str or path-like
        Model to validate; rewritten with its error models.
    validation_path : str or path-like, optional
        Where to write the per-star validation residuals (Zarr).
    stars_per_bin : int, optional
        Stars per equal-count SNR bin (default :func:`default_stars_per_bin`).
    snr_threshold : float
        SNR_lambda above which the error floor applies (225).
    floor_method : str
        How the floor is derived (see :func:`lamost_mdwarf.kernels.error_model.fit_error_model`).
    """
    model = load_model(model_path)
    mode = mode_from_settings(model.settings)
    if mode.label_model == "latent":
        return _validate_latent(store, model, model_path, mode, validation_path)
    selection = open_selection(store)
    ds = open_survey_store(store)
    subset = np.asarray(selection["subset"].values).astype(str)
    rows = np.flatnonzero(subset == "validation")
    if rows.size < 3 * 20:
        raise PipelineError(f"only {rows.size} validation spectra: too few to fit the SNR error model (need 60)")
    flux, ivar = normalized_spectra(store, rows)
    active = xr.DataArray(np.ones(rows.size, dtype=bool), dims="star")
    fit = infer_dataset(flux, ivar, active, model).compute()
    reference = subset_labels(selection, rows, model.label_names)
    inferred = np.column_stack([fit[name].values for name in model.label_names])
    residual = inferred - reference
    snr = np.asarray(ds["snr_lambda"].values, dtype=np.float64)[rows]
    usable = np.all(np.isfinite(residual), axis=1) & (fit["fit_status"].values & 0b1110 == 0)
    per_bin = stars_per_bin or default_stars_per_bin(int(usable.sum()))

    summary = ValidationSummary(n_stars=int(usable.sum()))
    error_models = {}
    fallbacks: dict[str, str] = {}
    for j, (name, unit) in enumerate(zip(model.label_names, model.label_units)):
        res = residual[usable, j]
        summary.bias[name] = float(np.median(res))
        summary.scatter[name] = float(np.std(res, ddof=1))
        summary.robust_scatter[name] = robust_std(res)
        error_models[name], used = _fit_error_model_with_fallback(res, snr[usable], per_bin, snr_threshold,
                                                                  floor_method, unit, name)
        if used != floor_method:
            fallbacks[name] = used
            summary.notes.append(f"{name}: the quadratic's floor was not positive (too few or too noisy "
                                 f"validation stars); floor method {used!r} used instead")
    summary.error_models = error_models
    validated = model.with_error_models(error_models)
    validated.settings = {**validated.settings, "validation": {
        "n_stars": summary.n_stars, "stars_per_bin": per_bin, "snr_threshold": snr_threshold,
        "floor_method": floor_method, "floor_method_fallbacks": fallbacks}}
    save_model(validated, model_path)

    if validation_path is not None:
        out = xr.Dataset(
            {
                "spectrum_id": ("star", np.asarray(ds["spectrum_id"].values)[rows].astype(object)),
                "store_row": ("star", rows.astype(np.int64)),
                "snr_lambda": ("star", snr),
                "usable": ("star", usable),
                "chi2": ("star", fit["chi2"].values),
                **{f"{name}_model": ("star", inferred[:, j]) for j, name in enumerate(model.label_names)},
                **{f"{name}_catalog": ("star", reference[:, j]) for j, name in enumerate(model.label_names)},
                **{f"{name}_err_formal": ("star", fit[f"{name}_err_formal"].values) for name in model.label_names},
            },
            attrs={"model_hash": model.model_hash, "stars_per_bin": per_bin},
        )
        out.to_zarr(os.fspath(validation_path), mode="w", zarr_format=3, consolidated=False)
    return summary


def _fit_error_model_with_fallback(residual: np.ndarray, snr: np.ndarray, stars_per_bin: int,
                                   snr_threshold: float, floor_method: str, unit: str,
                                   name: str) -> tuple[QuadraticErrorModel, str]:
    """The paper's error model; when its floor comes out non-positive, a data-driven floor.

    On small or noisy validation sets the quadratic through the binned scatter can dip
    below zero before the SNR threshold. The floor then falls back to ``"empirical"``
    (the residual std above the threshold) and, with fewer than two such stars, to
    ``"min_binned"`` (the smallest binned scatter). Returns the model and the floor
    method actually used.
    """
    error = ""
    for method in dict.fromkeys((floor_method, "empirical", "min_binned")):
        try:
            return fit_error_model(residual, snr, stars_per_bin=stars_per_bin, snr_threshold=snr_threshold,
                                   floor_method=method, unit=unit)[0], method
        except ValueError as exc:
            error = str(exc)
            if "floor" not in error:
                break
    raise PipelineError(f"cannot fit the SNR error model of {name}: {error}")


_FAILED = int(InferenceStatus.NON_FINITE | InferenceStatus.SINGULAR_HESSIAN | InferenceStatus.TOO_FEW_PIXELS)


def _validate_latent(store: str | os.PathLike, model: CannonModel, model_path: str | os.PathLike,
                     mode: ModeSettings, validation_path: str | os.PathLike | None) -> ValidationSummary:
    """``best`` mode: k-fold cross-validated residuals, systematic error, stored with the model."""
    selection = open_selection(store)
    ds = open_survey_store(store)
    ids = np.asarray(ds["spectrum_id"].values).astype(str)
    subset = np.asarray(selection["subset"].values).astype(str)
    catalog_names = list(model.settings.get("catalog_label_names") or ["teff", *model.settings["derived_labels"]])
    position = {sid: i for i, sid in enumerate(ids)}
    train_rows = np.array([position[str(sid)] for sid in model.training_ids], dtype=np.int64)
    other_rows = np.setdiff1d(np.flatnonzero(np.isin(subset, ("training", "validation"))), train_rows)
    flux, ivar = normalized_spectra(store, train_rows)
    cv = cross_validated_labels(np.asarray(flux.values, dtype=np.float64), np.asarray(ivar.values, dtype=np.float64),
                                model.training_labels, mode.validation_folds, seed=mode.seed + 1000,
                                clip_sigma=mode.clip_sigma, clip_rounds=mode.clip_rounds)
    labels, cov, status = cv.labels, cv.covariance, cv.status
    source = np.zeros(train_rows.size, dtype=np.int8)  # 0 = out of fold
    if other_rows.size:
        flux_o, ivar_o = normalized_spectra(store, other_rows)
        active = xr.DataArray(np.ones(other_rows.size, dtype=bool), dims="star")
        fit = infer_dataset(flux_o, ivar_o, active, model, clip_sigma=mode.clip_sigma, clip_grow=mode.clip_grow,
                            clip_rounds=mode.clip_rounds).compute()
        labels = np.concatenate([labels, np.column_stack([fit[name].values for name in model.label_names])])
        cov = np.concatenate([cov, fit["covariance"].values])
        status = np.concatenate([status, fit["fit_status"].values])
        source = np.concatenate([source, np.ones(other_rows.size, dtype=np.int8)])
    rows = np.concatenate([train_rows, other_rows])
    formal_scale = _repeat_scale(store, model, mode, selection, rows, labels, cov, source)
    reference = subset_labels(selection, rows, catalog_names)
    reference_err = subset_labels(selection, rows, [f"{name}_err" for name in catalog_names])
    snr = np.asarray(ds["snr_lambda"].values, dtype=np.float64)[rows]
    usable = np.all(np.isfinite(labels), axis=1) & ((status & _FAILED) == 0)

    t = catalog_names.index("teff")
    in_fit = usable & (source == 0)  # the cross-validated training stars: unique objects, clean labels
    # final Teff calibration on the cross-validated labels (cubic in Teff, quadratic in the latent
    # labels, de-shrunk): corrects the quadratic Cannon's compression at the ends of the Teff range
    calibration, anchor = fit_catalog_anchor(labels[in_fit], reference[in_fit, t], reference_err[in_fit, t],
                                             degree=TEFF_CALIBRATION_DEGREE)
    # the calibration's own uncertainty (catalog noise of its ~N stars), reported per star
    coefficient_cov = anchor_coefficient_covariance(labels[in_fit], reference_err[in_fit, t], calibration, anchor)
    model.settings = {**model.settings, "teff_calibration": {
        "calibration": calibration.to_dict(), "shrinkage": anchor.shrinkage,
        "sigma_spectroscopic": anchor.sigma_spectroscopic, "n_stars": anchor.n_stars,
        "coefficient_covariance": coefficient_cov.tolist()}}
    calibrated = physical_labels(model, labels, cov)["teff"]
    teff_resid = calibrated.value - reference[:, t]
    # the calibration was fitted on these stars and absorbed part of their catalog noise:
    # leverage-corrected residuals have the variance of an independent star's
    teff_resid[in_fit] /= np.sqrt(1.0 - calibration_leverage(calibration, labels[in_fit]))
    formal_teff = formal_scale.scale * calibrated.error_formal
    systematic = fit_systematic_variance(teff_resid[in_fit], reference_err[in_fit, t], formal_teff[in_fit])
    physical = physical_labels(model, labels, cov, {"teff": systematic.sigma}, formal_scale.scale)

    summary = ValidationSummary(n_stars=int(usable.sum()), mode=mode.name, systematic={"teff": systematic})
    summary.notes.append(f"formal errors x {formal_scale.scale:.3g} (+- {formal_scale.scale_error:.2g}; the scatter "
                         f"of {formal_scale.n_pairs} repeat-observation pairs)")
    error_models: dict[str, QuadraticErrorModel] = {}
    per_star: dict[str, np.ndarray] = {}
    for j, name in enumerate(catalog_names):
        value = physical[name]
        res = value.value - reference[:, j]
        summary.bias[name] = float(np.median(res[usable]))
        summary.scatter[name] = float(np.std(res[usable], ddof=1))
        summary.robust_scatter[name] = robust_std(res[usable])
        # constant (SNR-independent) systematic term: exact for teff, the median for derived labels
        excess = np.sqrt(np.maximum(value.error**2 - value.error_formal**2, 0.0))
        typical = float(np.median(excess[usable]))
        error_models[name] = QuadraticErrorModel(c0=typical, c1=0.0, c2=0.0, floor=typical,
                                                 snr_threshold=DEFAULT_SNR_THRESHOLD, unit=model_unit(name))
        per_star[f"{name}_model"] = value.value
        per_star[f"{name}_catalog"] = reference[:, j]
        per_star[f"{name}_err_formal"] = value.error_formal
        per_star[f"{name}_err"] = value.error
    try:
        bins = binned_systematic_scatter(teff_resid[in_fit], reference_err[in_fit, t], formal_teff[in_fit],
                                         snr[in_fit], n_bins=4)
        summary.notes.append("systematic teff error per SNR_lambda bin (moment estimate; its variance is "
                             "uncertain by +- the value in brackets): " + ", ".join(
                                 f"SNR {m:.0f}: {s_:.3g} K ({v:.3g} K^2)"
                                 for m, s_, v in zip(bins.snr_mean, bins.sigma, bins.variance_error)))
    except ValueError:
        pass
    summary.error_models = error_models
    validated = model.with_error_models(error_models)
    validated.settings = {**validated.settings, "validation": {
        "n_stars": summary.n_stars, "n_cross_validated": int(in_fit.sum()), "n_folds": mode.validation_folds,
        "systematic": {"teff": systematic._asdict()}, "error_mode": "calibrated",
        "formal_scale": formal_scale.scale, "repeat_pairs": formal_scale._asdict()}}
    save_model(validated, model_path)

    if validation_path is not None:
        for j, name in enumerate(model.label_names):
            if name not in per_star:
                per_star[f"{name}_model"] = labels[:, j]
        out = xr.Dataset(
            {
                "spectrum_id": ("star", ids[rows].astype(object)),
                "store_row": ("star", rows.astype(np.int64)),
                "snr_lambda": ("star", snr),
                "usable": ("star", usable),
                "out_of_fold": ("star", source == 0),
                **{name: ("star", values) for name, values in per_star.items()},
            },
            attrs={"model_hash": validated.model_hash, "mode": mode.name, "label_names": catalog_names,
                   "n_folds": mode.validation_folds},
        )
        out.to_zarr(os.fspath(validation_path), mode="w", zarr_format=3, consolidated=False)
    return summary


def model_unit(name: str) -> str:
    """Unit of a label name (``"1"`` when unknown)."""
    from lamost_mdwarf.model import LABEL_UNITS

    return LABEL_UNITS.get(name, "1")


def _repeat_scale(store, model: CannonModel, mode: ModeSettings, selection: xr.Dataset, rows: np.ndarray,
                  labels: np.ndarray, cov: np.ndarray, source: np.ndarray) -> RepeatScale:
    """Formal-error scale from pairs of spectra of the same catalog object, both fitted by the model.

    Training stars were predicted out of fold; the ones in a pair are refitted with the full
    model so that both members of every pair come from the same model. The scale is not
    allowed below 1 (the formal errors are a lower bound of the noise).
    """
    label_index = np.asarray(selection["label_index"].values)[rows]
    usable = np.all(np.isfinite(labels), axis=1) & np.isfinite(cov[:, 0, 0])
    i, j = repeat_pairs(np.where(usable, label_index, -1))
    if i.size == 0:
        return RepeatScale(1.0, float("nan"), 0)
    full_labels, full_cov = labels.copy(), cov.copy()
    refit = np.unique(np.concatenate([i, j])[source[np.concatenate([i, j])] == 0])
    if refit.size:
        flux, ivar = normalized_spectra(store, rows[refit])
        active = xr.DataArray(np.ones(refit.size, dtype=bool), dims="star")
        fit = infer_dataset(flux, ivar, active, model, clip_sigma=mode.clip_sigma, clip_grow=mode.clip_grow,
                            clip_rounds=mode.clip_rounds).compute()
        full_labels[refit, 0] = fit["teff"].values
        full_cov[refit] = fit["covariance"].values
    measured = repeat_pair_scale(full_labels[i, 0], full_labels[j, 0], np.sqrt(full_cov[i, 0, 0]),
                                 np.sqrt(full_cov[j, 0, 0]))
    return measured._replace(scale=max(1.0, measured.scale))
