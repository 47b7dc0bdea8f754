"""The Cannon test step on Dask: every star chunk is one batched inference task.

:func:`infer_dataset` maps :func:`lamost_mdwarf.kernels.cannon_infer.infer_labels` over star
chunks of the normalized spectra with :func:`xarray.apply_ufunc` and returns a lazy
Dataset (labels, formal covariance in physical units, chi^2, status). Stars not selected
(``active`` False) are not fitted: NaN labels and :data:`NOT_INFERRED` status.
"""
from __future__ import annotations

import numpy as np
import xarray as xr

from lamost_mdwarf.kernels.cannon_infer import (
    DEFAULT_MASKED_IVAR_THRESHOLD,
    infer_labels,
    starting_points_from_training,
)
from lamost_mdwarf.model import LABEL_LONG_NAMES, CannonModel

__all__ = ["NOT_INFERRED", "infer_dataset"]

#: Status bit of stars that were not fitted (excluded by the selection).
NOT_INFERRED = 1 << 8

#: Stars fitted at once inside a task (bounds working memory whatever the chunk size).
ROWS_PER_BATCH = 512

_OUTPUTS = ("labels", "covariance", "chi2", "reduced_chi2", "n_good_pixels", "converged", "status", "n_iterations")


def _infer_block(flux, ivar, active, theta, s2, pivots, scales, starts, masked_ivar_threshold):
    n, k = flux.shape[0], pivots.size
    labels = np.full((n, k), np.nan)
    cov = np.full((n, k, k), np.nan)
    chi2 = np.full(n, np.nan)
    rchi2 = np.full(n, np.nan)
    n_good = np.zeros(n, dtype=np.int32)
    converged = np.zeros(n, dtype=bool)
    status = np.full(n, NOT_INFERRED, dtype=np.int32)
    n_iter = np.zeros(n, dtype=np.int32)
    active_rows = np.flatnonzero(np.asarray(active, dtype=bool))
    for a in range(0, active_rows.size, ROWS_PER_BATCH):  # bounded working memory per task
        rows = active_rows[a:a + ROWS_PER_BATCH]
        res = infer_labels(np.asarray(flux)[rows], np.asarray(ivar)[rows], theta, s2, pivots, scales, starts,
                           masked_ivar_threshold=masked_ivar_threshold)
        labels[rows], cov[rows] = res.labels, res.covariance
        chi2[rows], rchi2[rows] = res.chi2, res.reduced_chi2
        n_good[rows], converged[rows] = res.n_good_pixels, res.converged
        status[rows], n_iter[rows] = res.status, res.n_iterations
    return labels, cov, chi2, rchi2, n_good, converged, status, n_iter


def infer_dataset(
    norm_flux: xr.DataArray,
    norm_ivar: xr.DataArray,
    active: xr.DataArray,
    model: CannonModel,
    masked_ivar_threshold: float = DEFAULT_MASKED_IVAR_THRESHOLD,
    starting_points: np.ndarray | None = None,
) -> xr.Dataset:
    """Lazy Cannon test step over all stars.

    Parameters
    ----------
    norm_flux, norm_ivar : xarray.DataArray
        (star, wavelength) normalized spectra, chunked along ``star``; the grid must equal
        the model's.
    active : xarray.DataArray
        (star,) bool: stars to fit.
    model : CannonModel
    masked_ivar_threshold : float
        ivar at or below which a pixel is not counted as good (for reduced chi^2).
    starting_points : numpy.ndarray, optional
        (M, K) physical starting points; default: spread over the training labels.

    Returns
    -------
    xarray.Dataset
        Variables per label name (e.g. ``teff``), ``<label>_err_formal``, ``covariance``
        (star, label, label_b), ``chi2``, ``rchi2``, ``n_good_pixels``, ``converged``,
        ``status``, ``n_iterations``.
    """
    grid = np.asarray(norm_flux["wavelength"].values)
    if grid.shape != model.wavelength.shape or not np.allclose(grid, model.wavelength, rtol=0, atol=1e-6):
        raise ValueError("the spectra's wavelength grid differs from the model's; preprocess on the model grid")
    starts = starting_points_from_training(model.training_labels) if starting_points is None else starting_points
    flux = norm_flux.chunk({"wavelength": -1})
    ivar = norm_ivar.chunk({"wavelength": -1})
    act = active.chunk({"star": flux.chunks[0]}) if flux.chunks is not None else active
    k = len(model.label_names)
    outputs = xr.apply_ufunc(
        _infer_block, flux, ivar, act,
        kwargs=dict(theta=model.theta, s2=model.s2, pivots=model.pivots, scales=model.scales, starts=starts,
                    masked_ivar_threshold=masked_ivar_threshold),
        input_core_dims=[["wavelength"], ["wavelength"], []],
        output_core_dims=[["label"], ["label", "label_b"], [], [], [], [], [], []],
        dask="parallelized",
        output_dtypes=[np.float64, np.float64, np.float64, np.float64, np.int32, bool, np.int32, np.int32],
        dask_gufunc_kwargs={"output_sizes": {"label": k, "label_b": k}},
    )
    parts = dict(zip(_OUTPUTS, outputs))
    ds = xr.Dataset(coords={"label": list(model.label_names)})
    for j, (name, unit) in enumerate(zip(model.label_names, model.label_units)):
        ds[name] = parts["labels"].isel(label=j, drop=True).assign_attrs(
            units=unit, long_name=LABEL_LONG_NAMES.get(name, name))
        ds[f"{name}_err_formal"] = np.sqrt(parts["covariance"].isel(label=j, label_b=j, drop=True)).assign_attrs(
            units=unit, long_name=f"formal 1-sigma error of {name} (inverse Hessian)")
    ds["covariance"] = parts["covariance"].assign_attrs(long_name="formal label covariance, physical units")
    ds["chi2"] = parts["chi2"].assign_attrs(long_name="chi^2 of the best fit")
    ds["rchi2"] = parts["reduced_chi2"].assign_attrs(long_name="chi^2 / (n_good_pixels - n_labels)")
    ds["n_good_pixels"] = parts["n_good_pixels"].assign_attrs(long_name="pixels with ivar above the masked value")
    ds["converged"] = parts["converged"].assign_attrs(long_name="optimiser converged")
    ds["fit_status"] = parts["status"].assign_attrs(
        long_name="test-step status bits: 1 not converged, 2 non-finite, 4 singular Hessian, "
                  "8 too few pixels, 16 bad input, 256 not inferred (excluded)")
    ds["n_iterations"] = parts["n_iterations"]
    return ds
