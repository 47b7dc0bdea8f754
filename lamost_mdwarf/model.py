"""A trained Cannon model: coefficients, scatter, label scaling, error model; save/load.

A model is saved as a Zarr store (``model.zarr``) with a format version, so a model
trained once is applied to later releases. Its ``model_hash`` (SHA-256 of the arrays
and label scaling) identifies it in results' provenance.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from lamost_mdwarf._version import __version__
from lamost_mdwarf.io.storage import resolve_location
from lamost_mdwarf.kernels.cannon_design import quadratic_term_names
from lamost_mdwarf.kernels.error_model import QuadraticErrorModel

__all__ = ["MODEL_FORMAT", "MODEL_FORMAT_VERSION", "LABEL_UNITS", "LABEL_LONG_NAMES", "CannonModel",
           "ModelFormatError", "load_model", "save_model"]

MODEL_FORMAT = "lamost_mdwarf.cannon_model"
MODEL_FORMAT_VERSION = 1

#: Units of the known labels (others may be added with their unit).
LABEL_UNITS = {"teff": "K", "radius": "Rsun", "mass": "Msun", "luminosity": "Lsun", "feh": "dex"}
LABEL_LONG_NAMES = {
    "teff": "effective temperature",
    "radius": "stellar radius",
    "mass": "stellar mass",
    "luminosity": "bolometric luminosity",
    "feh": "metallicity [Fe/H]",
}


class ModelFormatError(ValueError):
    """A file that is not a readable model of a supported format version."""


@dataclass
class CannonModel:
    """A trained quadratic Cannon model.

    Attributes
    ----------
    label_names : tuple of str
        Labels in model order, e.g. ``("teff", "radius", "mass", "luminosity")``.
    pivots, scales : numpy.ndarray
        (K,) label scaling ``x = (label - pivot) / scale``, physical units.
    theta : numpy.ndarray
        (P, T) coefficients per pixel.
    s2 : numpy.ndarray
        (P,) intrinsic scatter variance per pixel (normalized-flux units squared).
    wavelength : numpy.ndarray
        (P,) rest-frame grid of the model, Angstrom.
    training_ids : numpy.ndarray
        Spectrum ids of the training set.
    training_labels : numpy.ndarray
        (N, K) training labels, physical units.
    pixel_converged : numpy.ndarray
        (P,) bool: the scatter optimisation converged.
    error_models : dict
        label -> :class:`QuadraticErrorModel` (after validation; empty before).
    settings : dict
        Preprocessing and training settings the model depends on.
    """

    label_names: tuple[str, ...]
    pivots: np.ndarray
    scales: np.ndarray
    theta: np.ndarray
    s2: np.ndarray
    wavelength: np.ndarray
    training_ids: np.ndarray
    training_labels: np.ndarray
    pixel_converged: np.ndarray
    error_models: dict[str, QuadraticErrorModel] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    code_version: str = __version__

    def __post_init__(self) -> None:
        k = len(self.label_names)
        n_terms = 1 + k + k * (k + 1) // 2
        if self.theta.shape != (self.wavelength.size, n_terms):
            raise ValueError(f"theta has shape {self.theta.shape}, expected ({self.wavelength.size}, {n_terms})")
        if self.pivots.shape != (k,) or self.scales.shape != (k,):
            raise ValueError("pivots and scales need one entry per label")

    @property
    def term_names(self) -> list[str]:
        """Names of the design terms (paper Eq. 5 order)."""
        return quadratic_term_names(self.label_names)

    @property
    def label_units(self) -> tuple[str, ...]:
        """Units of each label."""
        return tuple(LABEL_UNITS.get(name, "1") for name in self.label_names)

    @property
    def model_hash(self) -> str:
        """SHA-256 of the coefficients, scatter, scaling, grid and label names (first 16 hex)."""
        digest = hashlib.sha256()
        for array in (self.theta, self.s2, self.pivots, self.scales, self.wavelength):
            digest.update(np.ascontiguousarray(array, dtype=np.float64).tobytes())
        digest.update(",".join(self.label_names).encode())
        return digest.hexdigest()[:16]

    def with_error_models(self, error_models: dict[str, QuadraticErrorModel]) -> "CannonModel":
        """A copy carrying the validation error models."""
        return replace(self, error_models=dict(error_models))

    def to_dataset(self) -> xr.Dataset:
        """The model as an xarray Dataset (what :func:`save_model` writes)."""
        ids = np.asarray(self.training_ids).astype(str).astype(object)
        ds = xr.Dataset(
            {
                "theta": (("wavelength", "term"), self.theta.astype(np.float64),
                          {"long_name": "Cannon coefficients per pixel"}),
                "s2": ("wavelength", self.s2.astype(np.float64),
                       {"long_name": "intrinsic scatter variance per pixel", "units": "normalized flux**2"}),
                "pixel_converged": ("wavelength", self.pixel_converged.astype(bool)),
                "pivots": ("label", self.pivots.astype(np.float64), {"long_name": "label pivots (physical units)"}),
                "scales": ("label", self.scales.astype(np.float64), {"long_name": "label scales (physical units)"}),
                "training_labels": (("training_star", "label"), self.training_labels.astype(np.float64)),
                "training_ids": ("training_star", ids),
            },
            coords={
                "wavelength": ("wavelength", self.wavelength.astype(np.float64), {"units": "Angstrom"}),
                "label": ("label", np.asarray(self.label_names, dtype=object)),
                "label_unit": ("label", np.asarray(self.label_units, dtype=object)),
                "term": ("term", np.asarray(self.term_names, dtype=object)),
            },
            attrs={
                "format": MODEL_FORMAT,
                "format_version": MODEL_FORMAT_VERSION,
                "model_hash": self.model_hash,
                "code_version": self.code_version,
                "settings": json.dumps(self.settings, sort_keys=True, default=str),
                "error_models": json.dumps({k: v._asdict() for k, v in self.error_models.items()}, sort_keys=True),
            },
        )
        return ds

    @classmethod
    def from_dataset(cls, ds: xr.Dataset, source: str = "model") -> "CannonModel":
        """Inverse of :meth:`to_dataset`, with format checks."""
        if ds.attrs.get("format") != MODEL_FORMAT:
            raise ModelFormatError(f"{source} is not a lamost_mdwarf Cannon model")
        version = ds.attrs.get("format_version")
        if version != MODEL_FORMAT_VERSION:
            raise ModelFormatError(
                f"{source} has model format version {version}; this lamost_mdwarf ({__version__}) reads "
                f"version {MODEL_FORMAT_VERSION}. Retrain with this version or use a matching one."
            )
        errors = {k: QuadraticErrorModel(**v) for k, v in json.loads(ds.attrs.get("error_models", "{}")).items()}
        model = cls(
            label_names=tuple(str(x) for x in ds["label"].values),
            pivots=np.asarray(ds["pivots"].values, dtype=np.float64),
            scales=np.asarray(ds["scales"].values, dtype=np.float64),
            theta=np.asarray(ds["theta"].values, dtype=np.float64),
            s2=np.asarray(ds["s2"].values, dtype=np.float64),
            wavelength=np.asarray(ds["wavelength"].values, dtype=np.float64),
            training_ids=np.array([str(x) for x in ds["training_ids"].values], dtype=str),
            training_labels=np.asarray(ds["training_labels"].values, dtype=np.float64),
            pixel_converged=np.asarray(ds["pixel_converged"].values, dtype=bool),
            error_models=errors,
            settings=json.loads(ds.attrs.get("settings", "{}")),
            code_version=str(ds.attrs.get("code_version", "unknown")),
        )
        stored = ds.attrs.get("model_hash")
        if stored != model.model_hash:
            raise ModelFormatError(f"{source}: stored model_hash {stored} does not match its contents "
                                   f"({model.model_hash}); the model is corrupt")
        return model


def save_model(model: CannonModel, path: str | os.PathLike) -> str:
    """Write a model to a Zarr store; local writes are atomic (temporary dir + rename).

    Returns
    -------
    str
        The model hash.
    """
    ds = model.to_dataset()
    location = resolve_location(path)
    if location.is_local:
        target = Path(location.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            ds.to_zarr(tmp / "m.zarr", mode="w", zarr_format=3, consolidated=False)
            if target.exists():
                old = target.with_name(f".{target.name}.old")
                if old.exists():
                    shutil.rmtree(old)
                os.replace(target, old)
                os.replace(tmp / "m.zarr", target)
                shutil.rmtree(old)
            else:
                os.replace(tmp / "m.zarr", target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        ds.to_zarr(location.zarr_store(), mode="w", zarr_format=3, consolidated=False)
    return model.model_hash


def load_model(path: str | os.PathLike) -> CannonModel:
    """Read a model written by :func:`save_model`.

    Raises
    ------
    ModelFormatError
        Not a model, an unsupported format version, or corrupt contents.
    """
    location = resolve_location(path)
    if not location.exists():
        raise ModelFormatError(f"no model at {location.url}")
    try:
        ds = xr.open_zarr(location.zarr_store(read_only=True), consolidated=False, zarr_format=3).load()
    except Exception as exc:  # noqa: BLE001
        raise ModelFormatError(f"{location.url}: cannot read the model ({type(exc).__name__}: {exc})") from None
    return CannonModel.from_dataset(ds, source=location.url)
