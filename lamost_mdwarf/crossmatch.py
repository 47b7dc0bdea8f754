"""Cross-match spectra with a label catalog by sky position (astropy SkyCoord)."""
from __future__ import annotations

from dataclasses import dataclass

import astropy.units as u
import numpy as np
from astropy.coordinates import SkyCoord

__all__ = ["CrossMatch", "crossmatch_positions"]


@dataclass(frozen=True)
class CrossMatch:
    """Result of :func:`crossmatch_positions`.

    Attributes
    ----------
    label_index : numpy.ndarray
        int64 (n_spectra,): row of the nearest catalog entry within the radius, -1 if none.
    separation_arcsec : numpy.ndarray
        float64 (n_spectra,): separation to that entry, arcsec (NaN when unmatched).
    radius_arcsec : float
        Matching radius used.
    """

    label_index: np.ndarray
    separation_arcsec: np.ndarray
    radius_arcsec: float

    @property
    def matched(self) -> np.ndarray:
        """Boolean mask of matched spectra."""
        return self.label_index >= 0


def crossmatch_positions(
    ra_deg: np.ndarray,
    dec_deg: np.ndarray,
    catalog_ra_deg: np.ndarray,
    catalog_dec_deg: np.ndarray,
    radius_arcsec: float = 3.0,
) -> CrossMatch:
    """Nearest catalog entry of each spectrum within a radius.

    Several spectra of one object match the same catalog row; each spectrum gets at most
    one row (the nearest).

    Parameters
    ----------
    ra_deg, dec_deg : numpy.ndarray
        Spectrum positions, deg (ICRS/J2000). Non-finite positions never match.
    catalog_ra_deg, catalog_dec_deg : numpy.ndarray
        Catalog positions, deg; must be finite.
    radius_arcsec : float
        Matching radius, arcsec (default 3, as in the paper).

    Returns
    -------
    CrossMatch
    """
    if not radius_arcsec > 0:
        raise ValueError(f"match radius must be positive, got {radius_arcsec!r} arcsec")
    ra = np.asarray(ra_deg, dtype=np.float64)
    dec = np.asarray(dec_deg, dtype=np.float64)
    cat_ra = np.asarray(catalog_ra_deg, dtype=np.float64)
    cat_dec = np.asarray(catalog_dec_deg, dtype=np.float64)
    if ra.shape != dec.shape or cat_ra.shape != cat_dec.shape:
        raise ValueError("RA and Dec arrays must have the same shape")
    if not (np.all(np.isfinite(cat_ra)) and np.all(np.isfinite(cat_dec))):
        raise ValueError("catalog positions must be finite")
    index = np.full(ra.shape, -1, dtype=np.int64)
    separation = np.full(ra.shape, np.nan)
    finite = np.isfinite(ra) & np.isfinite(dec)
    if cat_ra.size == 0 or not finite.any():
        return CrossMatch(index, separation, float(radius_arcsec))
    spectra = SkyCoord(ra[finite] * u.deg, dec[finite] * u.deg)
    catalog = SkyCoord(cat_ra * u.deg, cat_dec * u.deg)
    nearest, sep2d, _ = spectra.match_to_catalog_sky(catalog)
    sep = sep2d.to_value(u.arcsec)
    within = sep <= radius_arcsec
    idx_finite = np.where(within, nearest, -1)
    index[finite] = idx_finite
    separation[finite] = np.where(within, sep, np.nan)
    return CrossMatch(index, separation, float(radius_arcsec))
