"""Masking, pseudo-continuum normalization and per-star quality, mapped over star chunks.

:func:`preprocess_spectra` applies the numpy kernels
(:mod:`lamost_mdwarf.kernels.masking`, :mod:`~lamost_mdwarf.kernels.continuum`,
:mod:`~lamost_mdwarf.kernels.quality`) to each star chunk of a survey-store Dataset with
:func:`xarray.apply_ufunc` (``dask="parallelized"``) and returns a lazy Dataset. The raw
spectra are only read.

Normalized inverse variance of masked pixels: masked pixels get the tiny ivar (1e-5)
before the continuum is computed (so they barely weigh in it), and again after the
normalization (``ivar * continuum^2`` would otherwise scale it by the squared flux
level), so every masked pixel enters the Cannon with ``norm_ivar = masked_ivar``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from lamost_mdwarf.kernels.continuum import DEFAULT_SMOOTHING_WIDTH, pseudo_continuum_normalize
from lamost_mdwarf.kernels.masking import MaskConfig, mask_spectra
from lamost_mdwarf.kernels.quality import QualityConfig, star_quality

__all__ = ["PreprocessConfig", "preprocess_chunk", "preprocess_spectra", "PREPROCESSED_VARIABLES"]


@dataclass(frozen=True)
class PreprocessConfig:
    """Settings of the preprocessing step.

    Attributes
    ----------
    mask : MaskConfig
        Pixel masking (LAMOST bits, tellurics, join, sky lines, masked ivar).
    continuum_width : float
        Gaussian smoothing width L, Angstrom (paper: 50).
    continuum_convention : {"cannon", "paper"}
        ``exp(-0.5 dl^2/L^2)`` (the code the paper used) or ``exp(-dl^2/L^2)`` (Eq. 2).
    quality : QualityConfig
        Blue-slope range and units, blue-excess threshold.
    """

    mask: MaskConfig = field(default_factory=MaskConfig)
    continuum_width: float = DEFAULT_SMOOTHING_WIDTH
    continuum_convention: str = "cannon"
    quality: QualityConfig = field(default_factory=QualityConfig)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable settings (for provenance and up-to-date checks)."""
        return asdict(self)


#: name -> (dims, dtype, fill, attrs) of the ``preprocessed`` group.
PREPROCESSED_VARIABLES: dict[str, tuple[tuple[str, ...], Any, Any, dict]] = {
    "norm_flux": (("star", "wavelength"), "float32", float("nan"),
                  {"long_name": "pseudo-continuum-normalized flux", "units": "1"}),
    "norm_ivar": (("star", "wavelength"), "float32", 0.0,
                  {"long_name": "inverse variance of norm_flux (masked pixels: the tiny masked ivar)", "units": "1"}),
    "pixel_mask": (("star", "wavelength"), "uint16", 0,
                   {"long_name": "pixel mask bits: 1 LAMOST and, 2 LAMOST or, 4 bad ivar, 8 bad flux, "
                                 "16 telluric, 32 spectrograph join, 64 sky line"}),
    "blue_slope": (("star",), "float32", float("nan"),
                   {"long_name": "pseudo-continuum slope over the blue range, median-normalized",
                    "units": "normalized flux per 1000 Angstrom"}),
    "n_good_pixels_masked": (("star",), "int32", -1, {"long_name": "unmasked pixels"}),
    "good_fraction": (("star",), "float32", float("nan"), {"long_name": "fraction of unmasked pixels"}),
    "continuum_ok": (("star",), "bool", False,
                     {"long_name": "pseudo-continuum finite and positive everywhere, from unmasked pixels"}),
    "median_pixel_snr": (("star",), "float32", float("nan"),
                         {"long_name": "median flux*sqrt(ivar) over unmasked pixels", "units": "1"}),
}


def preprocess_chunk(
    wavelength: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    andmask: np.ndarray,
    ormask: np.ndarray,
    redshift: np.ndarray,
    config: PreprocessConfig,
) -> tuple[np.ndarray, ...]:
    """Preprocess one chunk of spectra (numpy in, numpy out).

    Returns
    -------
    tuple
        norm_flux, norm_ivar (float32), pixel_mask (uint16) of shape (n_star, n_pixel);
        blue_slope, n_good_pixels_masked, good_fraction, continuum_ok, median_pixel_snr of
        shape (n_star,).
    """
    masked = mask_spectra(wavelength, flux, ivar, andmask, ormask, redshift=redshift, config=config.mask)
    norm = pseudo_continuum_normalize(wavelength, masked.flux, masked.ivar, config.continuum_width,
                                      config.continuum_convention)
    quality = star_quality(wavelength, masked.flux, masked.ivar, masked.bitmask, norm.continuum, config.quality)
    bad = masked.bitmask != 0
    # A continuum built only from masked (tiny-ivar) pixels is finite but meaningless.
    continuum_ok = (quality.n_invalid_continuum == 0) & (quality.n_good_pixels > 0)
    norm_ivar = np.where(bad, np.float32(config.mask.masked_ivar), norm.ivar).astype(np.float32)
    norm_flux = np.asarray(norm.flux, dtype=np.float32)
    undefined = ~np.isfinite(norm_flux)
    norm_ivar = np.where(undefined, np.float32(0.0), norm_ivar)
    n_pix = wavelength.size
    return (
        norm_flux,
        norm_ivar,
        masked.bitmask.astype(np.uint16),
        np.asarray(quality.continuum_slope, dtype=np.float32),
        np.asarray(quality.n_good_pixels, dtype=np.int32),
        (np.asarray(quality.n_good_pixels) / n_pix).astype(np.float32),
        np.asarray(continuum_ok, dtype=bool),
        np.asarray(quality.median_snr, dtype=np.float32),
    )


#: Stars processed at once inside a task: bounds a task's working memory (about 40
#: float64 copies of a (rows, pixels) block, ~100 MB at 256 x 3000) whatever the chunk size.
ROWS_PER_BATCH = 256


def _chunk_adapter(flux, ivar, andmask, ormask, redshift, wavelength, config):
    parts = [
        preprocess_chunk(wavelength, flux[a:a + ROWS_PER_BATCH], ivar[a:a + ROWS_PER_BATCH],
                         andmask[a:a + ROWS_PER_BATCH], ormask[a:a + ROWS_PER_BATCH],
                         redshift[a:a + ROWS_PER_BATCH], config)
        for a in range(0, max(1, flux.shape[0]), ROWS_PER_BATCH)
    ]
    return tuple(np.concatenate(arrays) for arrays in zip(*parts))


def preprocess_spectra(store: xr.Dataset, config: PreprocessConfig = PreprocessConfig()) -> xr.Dataset:
    """Lazy preprocessing of the spectra of a survey-store Dataset.

    Parameters
    ----------
    store : xarray.Dataset
        Rows of the survey store (``flux``, ``ivar``, ``andmask``, ``ormask``, ``z`` and the
        ``wavelength`` coordinate), chunked along ``star``.
    config : PreprocessConfig

    Returns
    -------
    xarray.Dataset
        The variables of :data:`PREPROCESSED_VARIABLES`, dask-backed, chunked like ``store``.
    """
    wavelength = np.asarray(store["wavelength"].values, dtype=np.float64)
    pixels = [store[name].chunk({"wavelength": -1}) for name in ("flux", "ivar", "andmask", "ormask")]
    names = list(PREPROCESSED_VARIABLES)
    outputs = xr.apply_ufunc(
        _chunk_adapter, *pixels, store["z"],
        kwargs={"wavelength": wavelength, "config": config},
        input_core_dims=[["wavelength"]] * 4 + [[]],
        output_core_dims=[list(PREPROCESSED_VARIABLES[n][0][1:]) for n in names],
        dask="parallelized",
        output_dtypes=[np.dtype(PREPROCESSED_VARIABLES[n][1]) for n in names],
    )
    ds = xr.Dataset({name: out.assign_attrs(PREPROCESSED_VARIABLES[name][3]) for name, out in zip(names, outputs)})
    return ds
