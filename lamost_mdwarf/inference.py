"""The Cannon test step on Dask: every star chunk is one batched inference task.

:func:`infer_dataset` maps :func:`lamost_mdwarf.kernels.cannon_infer.infer_labels` over star
chunks of the normalized spectra with :func:`xarray.apply_ufunc` and returns a lazy
Dataset (labels, formal covariance in physical units, chi^2, status). Stars not selected
(``active`` False) are not fitted: NaN labels and :data:`NOT_INFERRED` status.

With ``clip_sigma`` the robust test step
(:func:`lamost_mdwarf.kernels.robust.robust_infer_labels`) is used instead: pixels more
than ``clip_sigma`` from the best fit are clipped and the star refitted; ``n_clipped``
counts them (0 without clipping).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import xarray as xr

from lamost_mdwarf.kernels.cannon_infer import (
    DEFAULT_MASKED_IVAR_THRESHOLD,
    infer_labels,
    starting_points_from_training,
)
from lamost_mdwarf.kernels.label_refinement import (
    PolynomialCalibration,
    apply_calibration,
    calibration_gradient,
    calibration_variance,
    derived_label_uncertainty,
    label_starting_points,
)
from lamost_mdwarf.kernels.robust import robust_infer_labels
from lamost_mdwarf.model import LABEL_LONG_NAMES, CannonModel

__all__ = ["NOT_INFERRED", "PhysicalLabel", "default_starting_points", "infer_dataset", "physical_labels"]

#: Status bit of stars that were not fitted (excluded by the selection).
NOT_INFERRED = 1 << 8

#: Stars fitted at once inside a task (bounds working memory whatever the chunk size).
ROWS_PER_BATCH = 512

_OUTPUTS = ("labels", "covariance", "chi2", "reduced_chi2", "n_good_pixels", "converged", "status", "n_iterations",
            "n_clipped")


def _infer_block(flux, ivar, active, theta, s2, pivots, scales, starts, masked_ivar_threshold, clip=None):
    n, k = flux.shape[0], pivots.size
    labels = np.full((n, k), np.nan)
    cov = np.full((n, k, k), np.nan)
    chi2 = np.full(n, np.nan)
    rchi2 = np.full(n, np.nan)
    n_good = np.zeros(n, dtype=np.int32)
    converged = np.zeros(n, dtype=bool)
    status = np.full(n, NOT_INFERRED, dtype=np.int32)
    n_iter = np.zeros(n, dtype=np.int32)
    n_clipped = np.zeros(n, dtype=np.int32)
    active_rows = np.flatnonzero(np.asarray(active, dtype=bool))
    for a in range(0, active_rows.size, ROWS_PER_BATCH):  # bounded working memory per task
        rows = active_rows[a:a + ROWS_PER_BATCH]
        if clip is None:
            res = infer_labels(np.asarray(flux)[rows], np.asarray(ivar)[rows], theta, s2, pivots, scales, starts,
                               masked_ivar_threshold=masked_ivar_threshold)
        else:
            robust = robust_infer_labels(np.asarray(flux)[rows], np.asarray(ivar)[rows], theta, s2, pivots, scales,
                                         starts, clip_sigma=clip[0], grow=clip[1], max_rounds=clip[2],
                                         masked_ivar_threshold=masked_ivar_threshold)
            res = robust.result
            n_clipped[rows] = robust.n_clipped
        labels[rows], cov[rows] = res.labels, res.covariance
        chi2[rows], rchi2[rows] = res.chi2, res.reduced_chi2
        n_good[rows], converged[rows] = res.n_good_pixels, res.converged
        status[rows], n_iter[rows] = res.status, res.n_iterations
    return labels, cov, chi2, rchi2, n_good, converged, status, n_iter, n_clipped


class PhysicalLabel(NamedTuple):
    """A reported label of a set of stars (see :func:`physical_labels`).

    Attributes
    ----------
    value : numpy.ndarray
        Shape (N,), label units.
    error : numpy.ndarray
        Shape (N,): total 1-sigma uncertainty (formal and systematic terms), label units.
    error_formal : numpy.ndarray
        Shape (N,): the part propagated from the formal covariance only, label units.
    """

    value: np.ndarray
    error: np.ndarray
    error_formal: np.ndarray


def default_starting_points(model: CannonModel) -> np.ndarray:
    """Starting points of the test step for a model: spread over its training labels.

    Catalog-label models (paper): :func:`~lamost_mdwarf.kernels.cannon_infer.starting_points_from_training`
    (unchanged). Latent-label models: the median and training stars at Teff quantiles
    (:func:`~lamost_mdwarf.kernels.label_refinement.label_starting_points`), since the
    whitened latent labels have no preferred direction.
    """
    if model.settings.get("derived_labels") is not None:
        return label_starting_points(model.training_labels)
    return starting_points_from_training(model.training_labels)


def physical_labels(
    model: CannonModel,
    labels: np.ndarray,
    covariance: np.ndarray,
    systematic: dict[str, float] | None = None,
    formal_scale: float = 1.0,
) -> dict[str, PhysicalLabel]:
    """Reported labels of a latent-label (``best``-mode) model, with uncertainties.

    Parameters
    ----------
    model : CannonModel
        A model whose settings carry ``derived_labels`` (R, M, L as functions of Teff
        and the latent labels).
    labels : numpy.ndarray
        Shape (N, K): the model labels (Teff in K, latent labels).
    covariance : numpy.ndarray
        Shape (N, K, K): their formal covariance.
    systematic : dict, optional
        label name -> systematic 1-sigma error of a *model* label (e.g. ``{"teff": 22.}``
        in K), added in quadrature to the diagonal before propagation.
    formal_scale : float
        Factor applied to the formal errors in the total error (the noise calibration
        from repeat observations: resampled pixels are correlated, the inverse-Hessian
        errors assume they are not); ``error_formal`` stays unscaled.

    Returns
    -------
    dict
        label name -> :class:`PhysicalLabel`, for the model labels then the derived ones.
        Derived labels' errors include their intrinsic scatter (``error``) or not
        (``error_formal``). When the model carries a ``teff_calibration`` (fitted by the
        validation stage on cross-validated labels), the reported Teff is that
        calibration of the model labels and its formal error the propagated covariance.
        The calibrations' own uncertainty (their ``coefficient_covariance``, from the
        catalog noise of the stars they were fitted on) is part of ``error``: it grows
        where a star's labels lie at the edge of the calibrating stars.
    """
    labels = np.asarray(labels, dtype=np.float64)
    covariance = np.asarray(covariance, dtype=np.float64)
    systematic = systematic or {}
    total = covariance * float(formal_scale) ** 2
    for j, name in enumerate(model.label_names):
        if name in systematic:
            total[:, j, j] += float(systematic[name]) ** 2
    out: dict[str, PhysicalLabel] = {}
    teff_calibration = (model.settings.get("teff_calibration") or {}).get("calibration")
    for j, name in enumerate(model.label_names):
        if name == "teff" and teff_calibration is not None:
            calibration = PolynomialCalibration.from_dict(teff_calibration)
            value = apply_calibration(calibration, labels)
            grad = calibration_gradient(calibration, labels)
            formal = np.sqrt(np.maximum(np.einsum("nk,nkl,nl->n", grad, covariance, grad), 0.0))
            coefficient_cov = model.settings["teff_calibration"].get("coefficient_covariance")
            regression = 0.0 if coefficient_cov is None else calibration_variance(calibration, coefficient_cov, labels)
            error = np.sqrt((formal_scale * formal) ** 2 + float(systematic.get(name, 0.0)) ** 2 + regression)
            out[name] = PhysicalLabel(value, error, formal)
        else:
            out[name] = PhysicalLabel(labels[:, j], np.sqrt(total[:, j, j]), np.sqrt(covariance[:, j, j]))
    for name, spec in (model.settings.get("derived_labels") or {}).items():
        calibration = PolynomialCalibration.from_dict(spec["calibration"])
        value, error = derived_label_uncertainty(calibration, labels, total, float(spec["relative_intrinsic"]),
                                                 spec.get("coefficient_covariance"))
        _, formal = derived_label_uncertainty(calibration, labels, covariance, 0.0)
        out[name] = PhysicalLabel(value, error, formal)
    return out


def infer_dataset(
    norm_flux: xr.DataArray,
    norm_ivar: xr.DataArray,
    active: xr.DataArray,
    model: CannonModel,
    masked_ivar_threshold: float = DEFAULT_MASKED_IVAR_THRESHOLD,
    starting_points: np.ndarray | None = None,
    clip_sigma: float | None = None,
    clip_grow: int = 1,
    clip_rounds: int = 3,
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
    clip_sigma : float, optional
        Robust test step: clip pixels more than ``clip_sigma`` total standard deviations
        from the best fit and refit (``None``: the ordinary test step).
    clip_grow, clip_rounds : int
        Neighbours clipped on each side of an outlier; maximum clip-and-refit rounds.

    Returns
    -------
    xarray.Dataset
        Variables per label name (e.g. ``teff``), ``<label>_err_formal``, ``covariance``
        (star, label, label_b), ``chi2``, ``rchi2``, ``n_good_pixels``, ``converged``,
        ``status``, ``n_iterations``, ``n_clipped``.
    """
    grid = np.asarray(norm_flux["wavelength"].values)
    if grid.shape != model.wavelength.shape or not np.allclose(grid, model.wavelength, rtol=0, atol=1e-6):
        raise ValueError("the spectra's wavelength grid differs from the model's; preprocess on the model grid")
    starts = default_starting_points(model) if starting_points is None else starting_points
    flux = norm_flux.chunk({"wavelength": -1})
    ivar = norm_ivar.chunk({"wavelength": -1})
    act = active.chunk({"star": flux.chunks[0]}) if flux.chunks is not None else active
    k = len(model.label_names)
    outputs = xr.apply_ufunc(
        _infer_block, flux, ivar, act,
        kwargs=dict(theta=model.theta, s2=model.s2, pivots=model.pivots, scales=model.scales, starts=starts,
                    masked_ivar_threshold=masked_ivar_threshold,
                    clip=None if clip_sigma is None else (float(clip_sigma), int(clip_grow), int(clip_rounds))),
        input_core_dims=[["wavelength"], ["wavelength"], []],
        output_core_dims=[["label"], ["label", "label_b"], [], [], [], [], [], [], []],
        dask="parallelized",
        output_dtypes=[np.float64, np.float64, np.float64, np.float64, np.int32, bool, np.int32, np.int32, np.int32],
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
    ds["n_clipped"] = parts["n_clipped"].assign_attrs(
        long_name="pixels clipped by the robust test step (0 without clipping)")
    return ds
