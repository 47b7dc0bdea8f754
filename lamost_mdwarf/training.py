"""Train a Cannon model on Dask: the training set rechunked to pixel chunks.

The per-pixel maximum-likelihood fit (:func:`lamost_mdwarf.kernels.cannon_train.train_pixels`)
is independent between pixels, so the training spectra (star x wavelength) are
rechunked to all stars x ``pixel_chunk`` pixels and every chunk is fitted by one task.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dask
import numpy as np
import xarray as xr

from lamost_mdwarf.kernels.cannon_design import compute_label_scaling, design_matrix, scale_labels
from lamost_mdwarf.kernels.cannon_train import train_pixels
from lamost_mdwarf.model import CannonModel

__all__ = ["train_model", "DEFAULT_PIXEL_CHUNK"]

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
