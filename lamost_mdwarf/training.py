"""Train a Cannon model on Dask: the training set rechunked to pixel chunks.

The per-pixel maximum-likelihood fit (:func:`lamost_mdwarf.kernels.cannon_train.train_pixels`)
is independent between pixels, so the training spectra (star x wavelength) are
rechunked to all stars x ``pixel_chunk`` pixels and every chunk is fitted by one task.

The label-noise-aware training of the ``best`` mode (:func:`refine_latent_labels`) and
the cross-validated labels of its error model (:func:`cross_validated_labels`) run one
Dask task per fold (:func:`lamost_mdwarf.kernels.label_refinement.fold_out_of_sample`:
train on the other folds, infer the fold); the training spectra are sent to the workers
once per call.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import dask
import numpy as np
import xarray as xr

from lamost_mdwarf.kernels.cannon_design import compute_label_scaling, design_matrix, scale_labels
from lamost_mdwarf.kernels.cannon_train import train_pixels
from lamost_mdwarf.kernels.label_refinement import (
    apply_calibration,
    combine_iterations,
    fit_catalog_anchor,
    fold_assignments,
    fold_out_of_sample,
    residual_components,
)
from lamost_mdwarf.model import CannonModel

__all__ = ["DEFAULT_PIXEL_CHUNK", "CrossValidatedLabels", "LatentRefinement", "cross_validated_labels",
           "refine_latent_labels", "train_model"]

logger = logging.getLogger("lamost_mdwarf")

DEFAULT_PIXEL_CHUNK = 250


def _train_block(flux: np.ndarray, ivar: np.ndarray, design: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """apply_ufunc adapter: blocks arrive as (pixel, star); the kernel wants (star, pixel)."""
    result = train_pixels(design, np.asarray(flux).T, np.asarray(ivar).T)
    return result.theta, result.s2, result.converged


def train_model(
    norm_flux: xr.DataArray,
    norm_ivar: xr.DataArray,
    labels: np.ndarray,
    label_names: Sequence[str],
    training_ids: Sequence[str],
    pixel_chunk: int = DEFAULT_PIXEL_CHUNK,
    settings: dict[str, Any] | None = None,
) -> CannonModel:
    """Fit (theta, s^2) per pixel on the training spectra.

    Parameters
    ----------
    norm_flux, norm_ivar : xarray.DataArray
        (star, wavelength) pseudo-continuum-normalized training spectra (masked pixels
        carry the tiny ivar); numpy- or dask-backed.
    labels : numpy.ndarray
        (N, K) training labels in physical units, rows matching ``star``.
    label_names : sequence of str
        Names of the K labels.
    training_ids : sequence of str
        Spectrum ids of the training stars (provenance).
    pixel_chunk : int
        Pixels per task.
    settings : dict, optional
        Preprocessing settings stored with the model.

    Returns
    -------
    CannonModel
    """
    labels = np.asarray(labels, dtype=np.float64)
    n_star = norm_flux.sizes["star"]
    if labels.shape != (n_star, len(label_names)):
        raise ValueError(f"labels have shape {labels.shape}, expected ({n_star}, {len(label_names)})")
    if not np.all(np.isfinite(labels)):
        raise ValueError("training labels must be finite")
    n_terms = 1 + len(label_names) + len(label_names) * (len(label_names) + 1) // 2
    if n_star <= n_terms:
        raise ValueError(f"{n_star} training stars cannot constrain a {n_terms}-term model; need more than {n_terms}")
    scaling = compute_label_scaling(labels)
    design = design_matrix(scale_labels(labels, scaling.pivots, scaling.scales))

    flux = norm_flux.chunk({"star": -1, "wavelength": pixel_chunk})
    ivar = norm_ivar.chunk({"star": -1, "wavelength": pixel_chunk})
    theta, s2, converged = xr.apply_ufunc(
        _train_block, flux, ivar,
        kwargs={"design": design},
        input_core_dims=[["star"], ["star"]],
        output_core_dims=[["term"], [], []],
        dask="parallelized",
        output_dtypes=[np.float64, np.float64, bool],
        dask_gufunc_kwargs={"output_sizes": {"term": n_terms}},
    )
    theta, s2, converged = dask.compute(theta, s2, converged)
    return CannonModel(
        label_names=tuple(label_names),
        pivots=np.asarray(scaling.pivots, dtype=np.float64),
        scales=np.asarray(scaling.scales, dtype=np.float64),
        theta=np.asarray(theta.transpose("wavelength", "term").values),
        s2=np.asarray(s2.values),
        wavelength=np.asarray(norm_flux["wavelength"].values, dtype=np.float64),
        training_ids=np.asarray(training_ids).astype(str),
        training_labels=labels,
        pixel_converged=np.asarray(converged.values, dtype=bool),
        settings={**(settings or {}), "pivot_method": scaling.pivot_method, "scale_method": scaling.scale_method},
    )


class CrossValidatedLabels(NamedTuple):
    """Out-of-fold labels of every training star (each from a model that did not see it).

    Attributes
    ----------
    labels : numpy.ndarray
        Shape (N, K), physical units.
    covariance : numpy.ndarray
        Shape (N, K, K), formal covariance, physical units.
    status : numpy.ndarray
        Shape (N,), test-step status bits.
    n_clipped : numpy.ndarray
        Shape (N,), pixels clipped by the robust test step.
    folds : numpy.ndarray
        Shape (N,), fold of each star.
    """

    labels: np.ndarray
    covariance: np.ndarray
    status: np.ndarray
    n_clipped: np.ndarray
    folds: np.ndarray


class LatentRefinement(NamedTuple):
    """Result of :func:`refine_latent_labels`.

    Attributes
    ----------
    labels : numpy.ndarray
        Shape (N, 1 + n_latent): refined Teff (K) and latent labels (dimensionless).
    history : list of dict
        Per iteration: the anchor's ``sigma_spectroscopic`` (K), ``shrinkage`` and the
        rms change of the Teff labels (K).
    """

    labels: np.ndarray
    history: list[dict[str, float]]


def _on_workers(array: np.ndarray) -> Any:
    """Send a large array to the Dask workers once (a future), if a distributed client runs."""
    try:
        from distributed import default_client

        return default_client().scatter(array, broadcast=True)
    except (ImportError, ValueError):
        return array


def cross_validated_labels(
    flux: np.ndarray,
    ivar: np.ndarray,
    labels: np.ndarray,
    n_folds: int,
    seed: int = 0,
    clip_sigma: float | None = None,
    clip_rounds: int = 3,
    _shared: tuple[Any, Any] | None = None,
) -> CrossValidatedLabels:
    """k-fold out-of-fold labels of the training stars, one Dask task per fold.

    Parameters
    ----------
    flux, ivar : numpy.ndarray
        Shape (N, P), normalized training spectra.
    labels : numpy.ndarray
        Shape (N, K), training labels (physical units).
    n_folds : int
        Number of folds (>= 2).
    seed : int
        Seed of the fold assignment.
    clip_sigma : float, optional
        Robust test step threshold; ``None`` for the ordinary test step.
    clip_rounds : int
        Clip-and-refit rounds of the robust test step.

    Returns
    -------
    CrossValidatedLabels
    """
    labels = np.asarray(labels, dtype=np.float64)
    folds = fold_assignments(labels.shape[0], n_folds, seed)
    flux_ref, ivar_ref = _shared if _shared is not None else (_on_workers(flux), _on_workers(ivar))
    kwargs = {"clip_sigma": clip_sigma if clip_sigma is not None else 5.0,
              "clip_rounds": clip_rounds if clip_sigma is not None else 0}
    tasks = [dask.delayed(fold_out_of_sample)(flux_ref, ivar_ref, labels, np.flatnonzero(folds == f), **kwargs)
             for f in range(n_folds)]
    results = dask.compute(*tasks)
    k = labels.shape[1]
    out_labels = np.full(labels.shape, np.nan)
    out_cov = np.full(labels.shape + (k,), np.nan)
    status = np.zeros(labels.shape[0], dtype=np.int64)
    n_clipped = np.zeros(labels.shape[0], dtype=np.int64)
    for res in results:
        out_labels[res.rows], out_cov[res.rows] = res.labels, res.covariance
        status[res.rows], n_clipped[res.rows] = res.status, res.n_clipped
    return CrossValidatedLabels(out_labels, out_cov, status, n_clipped, folds)


def refine_latent_labels(
    flux: np.ndarray,
    ivar: np.ndarray,
    catalog_teff: np.ndarray,
    catalog_teff_err: np.ndarray,
    n_latent: int = 2,
    n_iterations: int = 4,
    n_folds: int = 5,
    damping: float = 0.5,
    seed: int = 0,
    clip_sigma: float | None = 5.0,
    clip_rounds: int = 3,
    progress: Callable[[int, int], None] | None = None,
) -> LatentRefinement:
    """Label-noise-aware training labels: Teff and latent labels anchored to the catalog.

    The algorithm is described in :mod:`lamost_mdwarf.kernels.label_refinement`; every
    iteration runs ``n_folds`` fold tasks (train on the other folds, robust test step on
    the fold) on the Dask workers, then the anchor and the update on the client.

    Parameters
    ----------
    flux, ivar : numpy.ndarray
        Shape (N, P), normalized spectra of the training stars.
    catalog_teff, catalog_teff_err : numpy.ndarray
        Shape (N,): catalog Teff and its 1-sigma errors, K.
    n_latent : int
        Latent labels besides Teff.
    n_iterations : int
        Refinement iterations (>= 1).
    n_folds : int
        Folds of the out-of-fold estimates.
    damping : float
        Weight of the previous labels in each update.
    seed : int
        Seed of the fold assignments (iteration ``i`` uses ``seed + i``).
    clip_sigma, clip_rounds
        Robust test step of the fold inferences (``clip_sigma=None``: none).
    progress : callable, optional
        ``progress(done, total)`` after each iteration.

    Returns
    -------
    LatentRefinement
    """
    flux = np.asarray(flux, dtype=np.float64)
    ivar = np.asarray(ivar, dtype=np.float64)
    catalog_teff = np.asarray(catalog_teff, dtype=np.float64)
    catalog_teff_err = np.asarray(catalog_teff_err, dtype=np.float64)
    if not (np.all(np.isfinite(catalog_teff)) and np.all(catalog_teff_err > 0)):
        raise ValueError("catalog Teff must be finite and its errors > 0 for every training star")
    if int(n_iterations) < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations!r}")
    shared = (_on_workers(flux), _on_workers(ivar))
    labels = catalog_teff[:, None].copy()
    history: list[dict[str, float]] = []
    for iteration in range(int(n_iterations)):
        oof = cross_validated_labels(flux, ivar, labels, n_folds, seed + iteration, clip_sigma, clip_rounds,
                                     _shared=shared)
        ok = np.all(np.isfinite(oof.labels), axis=1)
        anchor, diagnostics = fit_catalog_anchor(oof.labels[ok], catalog_teff[ok], catalog_teff_err[ok])
        fallback = np.where(ok[:, None], oof.labels, labels if labels.shape[1] == oof.labels.shape[1]
                            else np.median(oof.labels[ok], axis=0))
        teff = apply_calibration(anchor, fallback)
        if labels.shape[1] == 1:
            if n_latent == 0:
                latent = np.zeros((labels.shape[0], 0))
            else:  # latent labels from the residuals of a Teff-only model on the anchored Teff
                scaling = compute_label_scaling(teff[:, None])
                trained = train_pixels(design_matrix(scale_labels(teff[:, None], scaling.pivots, scaling.scales)),
                                       flux, ivar)
                latent = residual_components(flux, ivar, trained.theta, trained.s2, scaling.pivots,
                                             scaling.scales, teff[:, None], n_latent)
        else:
            latent = np.where(ok[:, None], oof.labels[:, 1:], labels[:, 1:])
        previous = labels[:, 0].copy()
        labels = combine_iterations(labels, teff, latent, damping) if n_latent > 0 else teff[:, None]
        change = float(np.sqrt(np.mean((labels[:, 0] - previous) ** 2)))
        history.append({"iteration": iteration, "sigma_spectroscopic": diagnostics.sigma_spectroscopic,
                        "shrinkage": diagnostics.shrinkage, "teff_change_rms": change,
                        "n_failed": int((~ok).sum())})
        logger.info(f"label refinement {iteration + 1}/{n_iterations}: anchor sigma_spec "
                    f"{diagnostics.sigma_spectroscopic:.1f} K, shrinkage {diagnostics.shrinkage:.3f}, "
                    f"Teff change {change:.1f} K rms")
        if progress is not None:
            progress(iteration + 1, int(n_iterations))
    return LatentRefinement(labels, history)
