"""lamost_mdwarf: fundamental parameters of M dwarfs from LAMOST spectra.

Data flows one way: FITS files -> survey store (Zarr) -> preprocessed spectra ->
Cannon model -> results -> catalog and figures.
"""
from lamost_mdwarf._version import __version__

__all__ = ["__version__"]
