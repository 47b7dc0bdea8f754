"""Stage ``validate``: apply the model to the validation set, residual statistics, error model.

The per-label error model (std of residuals in equal-count SNR_lambda bins fitted by a
quadratic with a floor above an SNR threshold, paper Table 2) is stored with the model;
the per-star residuals are written to a small Zarr dataset for figures and checks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from lamost_mdwarf.errors import PipelineError
from lamost_mdwarf.inference import infer_dataset
from lamost_mdwarf.io.survey_store import open_survey_store
from lamost_mdwarf.kernels.error_model import DEFAULT_SNR_THRESHOLD, QuadraticErrorModel, fit_error_model
from lamost_mdwarf.model import load_model, save_model
from lamost_mdwarf.stages.select import open_selection
from lamost_mdwarf.stages.train import normalized_spectra, subset_labels

__all__ = ["PAPER_TYPICAL_SCATTER", "ValidationSummary", "run_validate", "robust_std", "default_stars_per_bin"]

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

    def format(self) -> str:
        """A table of the validation scatter next to the paper's typical uncertainties."""
        lines = [f"validation: {self.n_stars} spectra",
                 f"{'label':<11}{'bias':>10}{'std':>10}{'robust std':>12}{'paper':>9}{'floor':>9}"]
        for name in self.scatter:
            model = self.error_models.get(name)
            lines.append(
                f"{name:<11}{self.bias[name]:>10.4g}{self.scatter[name]:>10.4g}{self.robust_scatter[name]:>12.4g}"
                f"{PAPER_TYPICAL_SCATTER.get(name, float('nan')):>9.4g}"
                f"{(model.floor if model else float('nan')):>9.4g}")
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
    for j, (name, unit) in enumerate(zip(model.label_names, model.label_units)):
        res = residual[usable, j]
        summary.bias[name] = float(np.median(res))
        summary.scatter[name] = float(np.std(res, ddof=1))
        summary.robust_scatter[name] = robust_std(res)
        error_models[name], _ = fit_error_model(res, snr[usable], stars_per_bin=per_bin,
                                                snr_threshold=snr_threshold, floor_method=floor_method, unit=unit)
    summary.error_models = error_models
    validated = model.with_error_models(error_models)
    validated.settings = {**validated.settings, "validation": {
        "n_stars": summary.n_stars, "stars_per_bin": per_bin, "snr_threshold": snr_threshold,
        "floor_method": floor_method}}
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
