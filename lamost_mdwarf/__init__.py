"""lamost_mdwarf: fundamental parameters of M dwarfs from LAMOST spectra.

Data flows one way: FITS files -> survey store (Zarr) -> preprocessed spectra ->
Cannon model -> results -> catalog and figures.

Public entry points: :func:`open_results` (results as a lazy xarray Dataset, with the
``ds.mdwarf`` accessor for selections), :func:`open_survey_store` (the spectra).
"""
from lamost_mdwarf._version import __version__
from lamost_mdwarf.io.survey_store import open_survey_store
from lamost_mdwarf.query import MdwarfAccessor, open_results

__all__ = ["__version__", "open_results", "open_survey_store", "MdwarfAccessor"]
