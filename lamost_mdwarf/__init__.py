"""lamost_mdwarf: fundamental parameters of M dwarfs from LAMOST spectra.

Data flows one way: FITS files -> survey store (Zarr) -> preprocessed spectra ->
Cannon model -> results -> catalog and figures.

Public entry points: :func:`open_results` (results as a lazy xarray Dataset, with the
``ds.mdwarf`` accessor for selections), :func:`open_survey_store` (the spectra). They are
imported lazily, so that ``lamost_mdwarf.kernels`` stays free of dask/xarray/zarr.
"""
from __future__ import annotations

from typing import Any

from lamost_mdwarf._version import __version__

__all__ = ["__version__", "open_results", "open_survey_store", "MdwarfAccessor"]


def __getattr__(name: str) -> Any:
    if name in ("open_results", "MdwarfAccessor"):
        from lamost_mdwarf import query

        return getattr(query, name)
    if name == "open_survey_store":
        from lamost_mdwarf.io.survey_store import open_survey_store

        return open_survey_store
    raise AttributeError(f"module 'lamost_mdwarf' has no attribute {name!r}")
