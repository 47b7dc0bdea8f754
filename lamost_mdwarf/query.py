"""Query results with xarray: ``open_results`` and the ``ds.mdwarf`` accessor.

Examples
--------
>>> import lamost_mdwarf
>>> res = lamost_mdwarf.open_results("work/results.zarr")          # doctest: +SKIP
>>> good = res.mdwarf.quality_sample()                              # flags == 0
>>> bright = good.mdwarf.snr_between(100, 300)
>>> near = good.mdwarf.cone(ra=150.0, dec=30.0, radius_arcsec=3600)
>>> m3 = good.mdwarf.subtype("M3", "M4")
>>> spec = res.mdwarf.spectrum("55862-B6212_sp06-099")             # observed vs model
"""
from __future__ import annotations

import os
from typing import Any

import astropy.units as u
import numpy as np
import xarray as xr
from astropy.coordinates import SkyCoord

__all__ = ["open_results", "MdwarfAccessor"]


def open_results(path: str | os.PathLike) -> xr.Dataset:
    """Open a results store as a lazy xarray Dataset (dimension ``star``).

    Parameters
    ----------
    path : str or path-like
        The results store written by ``lamost-mdwarf infer`` / ``run``.
    """
    from lamost_mdwarf.stages.infer import open_results as _open

    return _open(path)


@xr.register_dataset_accessor("mdwarf")
class MdwarfAccessor:
    """Selections of a results Dataset and the join back to the spectra."""

    def __init__(self, ds: xr.Dataset) -> None:
        self._ds = ds

    def _where(self, mask: Any) -> xr.Dataset:
        mask = np.asarray(mask, dtype=bool)
        return self._ds.isel(star=np.flatnonzero(mask))

    def quality_sample(self) -> xr.Dataset:
        """Stars passing every final cut (``flags == 0``), as in the paper's Table 1."""
        return self._where(self._ds["flags"].values == 0)

    def snr_between(self, low: float = -np.inf, high: float = np.inf) -> xr.Dataset:
        """Stars with ``low <= snr_lambda < high``."""
        snr = np.asarray(self._ds["snr_lambda"].values, dtype=np.float64)
        return self._where((snr >= low) & (snr < high))

    def cone(self, ra: float, dec: float, radius_arcsec: float) -> xr.Dataset:
        """Stars within ``radius_arcsec`` of (``ra``, ``dec``) in degrees (J2000)."""
        centre = SkyCoord(ra * u.deg, dec * u.deg)
        stars = SkyCoord(np.asarray(self._ds["ra"].values) * u.deg, np.asarray(self._ds["dec"].values) * u.deg)
        return self._where(stars.separation(centre).to_value(u.arcsec) <= radius_arcsec)

    def subtype(self, *subclasses: str) -> xr.Dataset:
        """Stars whose LAMOST subclass is one of ``subclasses`` (e.g. ``"M3"``)."""
        wanted = {s.strip() for s in subclasses}
        values = np.asarray(self._ds["subclass"].values).astype(str)
        return self._where(np.isin(values, list(wanted)))

    def subset(self, name: str) -> xr.Dataset:
        """Stars of one subset: ``training``, ``validation``, ``survey`` or ``excluded``."""
        return self._where(np.asarray(self._ds["subset"].values).astype(str) == name)

    def spectrum(self, spectrum_id: str, model_path: str | os.PathLike | None = None) -> xr.Dataset:
        """Observed and model normalized spectrum of one star (the join back to the store).

        Parameters
        ----------
        spectrum_id : str
            The star's ``spectrum_id``.
        model_path : str or path-like, optional
            Model to evaluate (default: the one recorded in the results' attributes).

        Returns
        -------
        xarray.Dataset
            Dimension ``wavelength``: ``norm_flux``, ``norm_ivar``, ``pixel_mask``,
            ``model_flux`` (at the star's inferred labels), and the star's results.
        """
        from lamost_mdwarf.io.derived_groups import open_derived_group
        from lamost_mdwarf.io.survey_store import open_survey_store
        from lamost_mdwarf.kernels.cannon_design import design_matrix, scale_labels
        from lamost_mdwarf.model import load_model

        ids = np.asarray(self._ds["spectrum_id"].values).astype(str)
        where = np.flatnonzero(ids == spectrum_id)
        if where.size == 0:
            raise KeyError(f"no star with spectrum_id {spectrum_id!r} in these results")
        row = self._ds.isel(star=int(where[0])).compute()
        store = self._ds.attrs.get("survey_store")
        model_path = model_path or self._ds.attrs.get("model_path")
        if not store or not model_path:
            raise ValueError("the results do not record their survey store and model; pass model_path")
        survey = open_survey_store(store)
        store_ids = np.asarray(survey["spectrum_id"].values).astype(str)
        store_row = int(np.flatnonzero(store_ids == spectrum_id)[0])
        pre = open_derived_group(store, "preprocessed").isel(star=store_row).compute()
        model = load_model(model_path)
        labels = np.array([[float(row[name].values) for name in model.label_names]])
        if np.all(np.isfinite(labels)):
            model_flux = (design_matrix(scale_labels(labels, model.pivots, model.scales)) @ model.theta.T)[0]
        else:
            model_flux = np.full(model.wavelength.size, np.nan)
        out = xr.Dataset(
            {
                "norm_flux": ("wavelength", pre["norm_flux"].values),
                "norm_ivar": ("wavelength", pre["norm_ivar"].values),
                "pixel_mask": ("wavelength", pre["pixel_mask"].values),
                "model_flux": ("wavelength", model_flux),
            },
            coords={"wavelength": survey["wavelength"].values},
            attrs={"spectrum_id": spectrum_id},
        )
        for name in row.data_vars:
            if row[name].ndim == 0:
                out.attrs[name] = row[name].values.item()
        return out
