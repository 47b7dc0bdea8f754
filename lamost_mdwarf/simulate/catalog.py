"""A TESS-Cool-Dwarf-Catalog-like label table for the simulated survey.

The TCD (Muirhead et al. 2018) derives Teff, R, M and L of each star from photometry
through the Mann et al. (2015) relations, so its labels of a *single* star lie on those
relations; its errors reflect the photometric errors. This module imitates that:

* ``Teff = round(Teff_true + e_Teff * N(0, 1))`` with ``e_Teff ~ U(100, 160)`` K;
* ``Rad = R(Teff) + N(0, 0.003)`` Rsun and ``Mass = M(Teff) + N(0, 0.003)`` Msun on the
  shipped relations (:mod:`lamost_mdwarf.relations`); ``Lum = Rad^2 (Teff/5772)^4``;
* ``e_Rad``, ``e_Mass``, ``e_Lum`` are the standard deviations of (catalog - truth)
  that this construction implies (Teff error propagated through the relations, the 2.5 %
  intrinsic scatter of the truth, the 0.003 jitter): ~0.02-0.07 Rsun / Msun and
  ~0.005-0.02 Lsun;
* unresolved binaries are over-luminous in the photometry: their Rad and Mass are
  inflated by 15-45 % (at least 0.03 Rsun / Msun, so they deviate from the relations by
  well over 0.01 Rsun/Msun); ~1 % of the other rows are "inhomogeneous photometry"
  outliers with R and M off by 8-25 % (at least 0.03) in either direction;
* positions: true position plus a 0.1-1 arcsec offset (epoch / proper motion);
* 70 % of the observed M dwarfs (kinds ``m_dwarf`` and ``late_m``) are listed, each
  once; contaminants are not;
* extra rows for unobserved stars: 30 % as many as listed observed stars, scattered
  over the survey fields, plus 5 % placed 5-20 arcsec from observed stars (to exercise
  false cross-matches).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lamost_mdwarf.relations import TEFF_SUN_K, mass_from_teff, radius_from_teff
from lamost_mdwarf.simulate.population import StarPopulation, draw_mdwarf_teff, quota_choice

__all__ = ["LABEL_COLUMNS", "LabelCatalog", "tcd_like_labels", "draw_label_catalog", "offset_positions"]

#: Columns of the written label table, in order.
LABEL_COLUMNS = ("TIC", "RAJ2000", "DEJ2000", "Teff", "e_Teff", "Rad", "e_Rad", "Mass", "e_Mass", "Lum", "e_Lum")

_RELATION_JITTER = 0.003
_INTRINSIC_SCATTER = 0.025
_MIN_OUTLIER_OFFSET = 0.03


@dataclass
class LabelCatalog:
    """The TCD-like table, one row per object.

    Attributes
    ----------
    tic : numpy.ndarray of int
        Catalog identifier.
    ra, dec : numpy.ndarray
        Catalog position (J2000), deg.
    teff, e_teff : numpy.ndarray
        K.
    radius, e_radius : numpy.ndarray
        Rsun.
    mass, e_mass : numpy.ndarray
        Msun.
    luminosity, e_luminosity : numpy.ndarray
        Lsun.
    star_id : numpy.ndarray of int
        Simulated star of the row, -1 for stars that were not observed.
    row_kind : numpy.ndarray of str
        ``'observed'``, ``'field'`` (unobserved) or ``'neighbour'`` (unobserved, 5-20 arcsec
        from an observed star).
    is_outlier : numpy.ndarray of bool
        Labels off the relations (unresolved binary or inhomogeneous photometry).
    """

    tic: np.ndarray
    ra: np.ndarray
    dec: np.ndarray
    teff: np.ndarray
    e_teff: np.ndarray
    radius: np.ndarray
    e_radius: np.ndarray
    mass: np.ndarray
    e_mass: np.ndarray
    luminosity: np.ndarray
    e_luminosity: np.ndarray
    star_id: np.ndarray
    row_kind: np.ndarray
    is_outlier: np.ndarray

    def __len__(self) -> int:
        return int(self.tic.size)

    def rows(self) -> list[tuple]:
        """Rows formatted for the CSV, in :data:`LABEL_COLUMNS` order (strings)."""
        return [
            (
                str(int(self.tic[i])), f"{self.ra[i]:.7f}", f"{self.dec[i]:.7f}", f"{self.teff[i]:.0f}",
                f"{self.e_teff[i]:.0f}", f"{self.radius[i]:.5f}", f"{self.e_radius[i]:.5f}", f"{self.mass[i]:.5f}",
                f"{self.e_mass[i]:.5f}", f"{self.luminosity[i]:.7f}", f"{self.e_luminosity[i]:.7f}",
            )
            for i in range(len(self))
        ]


def _log_slope(function, teff: np.ndarray) -> np.ndarray:
    """d ln f / d Teff by central differences, K^-1."""
    step = 1.0
    return (np.log(function(teff + step)) - np.log(function(teff - step))) / (2 * step)


def tcd_like_labels(
    teff_true: np.ndarray,
    rng: np.random.Generator,
    inflation_radius: np.ndarray | None = None,
    inflation_mass: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Catalog labels and their reported errors for stars of given true Teff.

    Parameters
    ----------
    teff_true : numpy.ndarray
        True effective temperature, K (> 0).
    rng : numpy.random.Generator
        Random source.
    inflation_radius, inflation_mass : numpy.ndarray, optional
        Fractional offsets of the catalog R and M from the relations (0 = on the relation;
        0.3 = 30 % too large), per star. A non-zero offset is at least 0.03 Rsun / Msun
        in size.

    Returns
    -------
    dict
        ``teff``, ``e_teff`` (K), ``radius``, ``e_radius`` (Rsun), ``mass``, ``e_mass``
        (Msun), ``luminosity``, ``e_luminosity`` (Lsun).
    """
    teff_true = np.asarray(teff_true, dtype=np.float64)
    n = teff_true.size
    inflation_radius = np.zeros(n) if inflation_radius is None else np.asarray(inflation_radius, dtype=np.float64)
    inflation_mass = np.zeros(n) if inflation_mass is None else np.asarray(inflation_mass, dtype=np.float64)
    e_teff = np.round(rng.uniform(100.0, 160.0, n))
    teff = np.round(teff_true + e_teff * rng.standard_normal(n))
    teff = np.clip(teff, 2300.0, None)
    radius_rel = radius_from_teff(teff)
    mass_rel = mass_from_teff(teff)
    # offsets from the relations, at least 0.03 Rsun / Msun in size when requested
    offset_r = np.sign(inflation_radius) * np.maximum(np.abs(inflation_radius) * radius_rel, _MIN_OUTLIER_OFFSET)
    offset_m = np.sign(inflation_mass) * np.maximum(np.abs(inflation_mass) * mass_rel, _MIN_OUTLIER_OFFSET)
    radius = radius_rel + offset_r + _RELATION_JITTER * rng.standard_normal(n)
    mass = mass_rel + offset_m + _RELATION_JITTER * rng.standard_normal(n)
    luminosity = radius**2 * (teff / TEFF_SUN_K) ** 4
    dlnr = _log_slope(radius_from_teff, teff)
    dlnm = _log_slope(mass_from_teff, teff)
    e_radius = np.sqrt((radius * dlnr * e_teff) ** 2 + (_INTRINSIC_SCATTER * radius) ** 2 + _RELATION_JITTER**2)
    e_mass = np.sqrt((mass * dlnm * e_teff) ** 2 + (_INTRINSIC_SCATTER * mass) ** 2 + _RELATION_JITTER**2)
    e_luminosity = luminosity * np.sqrt(((2 * dlnr + 4 / teff) * e_teff) ** 2 + (2 * _INTRINSIC_SCATTER) ** 2)
    return {
        "teff": teff, "e_teff": e_teff, "radius": radius, "e_radius": e_radius, "mass": mass, "e_mass": e_mass,
        "luminosity": luminosity, "e_luminosity": e_luminosity,
    }


def offset_positions(
    ra_deg: np.ndarray, dec_deg: np.ndarray, rng: np.random.Generator, min_arcsec: float, max_arcsec: float
) -> tuple[np.ndarray, np.ndarray]:
    """Move positions by a random angle between ``min_arcsec`` and ``max_arcsec``.

    Parameters
    ----------
    ra_deg, dec_deg : numpy.ndarray
        Positions, deg.
    rng : numpy.random.Generator
    min_arcsec, max_arcsec : float
        Range of the offset, arcsec (uniform in separation, random direction).

    Returns
    -------
    tuple of numpy.ndarray
        New (ra, dec), deg; RA wrapped to [0, 360).
    """
    ra = np.asarray(ra_deg, dtype=np.float64)
    dec = np.asarray(dec_deg, dtype=np.float64)
    separation = rng.uniform(min_arcsec, max_arcsec, ra.size) / 3600.0
    angle = rng.uniform(0.0, 2 * np.pi, ra.size)
    new_dec = np.clip(dec + separation * np.cos(angle), -89.9, 89.9)
    new_ra = (ra + separation * np.sin(angle) / np.cos(np.radians(0.5 * (dec + new_dec)))) % 360.0
    return new_ra, new_dec


def draw_label_catalog(
    population: StarPopulation,
    star_ra: np.ndarray,
    star_dec: np.ndarray,
    rng: np.random.Generator,
    fraction_listed: float = 0.7,
    fraction_field: float = 0.3,
    fraction_neighbours: float = 0.05,
    fraction_photometry_outliers: float = 0.01,
) -> LabelCatalog:
    """Build the TCD-like table for a simulated population.

    Parameters
    ----------
    population : StarPopulation
        The observed stars.
    star_ra, star_dec : numpy.ndarray
        True positions of the stars, deg.
    rng : numpy.random.Generator
    fraction_listed : float, optional
        Fraction of the M dwarfs (``m_dwarf``, ``late_m``) listed.
    fraction_field : float, optional
        Extra unobserved stars, as a fraction of the listed observed stars.
    fraction_neighbours : float, optional
        Extra unobserved stars 5-20 arcsec from observed stars, as a fraction of all stars.
    fraction_photometry_outliers : float, optional
        Listed single stars whose R and M are off the relations by 8-25 %.

    Returns
    -------
    LabelCatalog
        Rows sorted by right ascension.
    """
    n_stars = len(population)
    cool = np.flatnonzero(population.kind != "contaminant")
    listed = quota_choice(rng, cool, fraction_listed)
    binary = population.is_binary[listed]
    inflation_r = np.zeros(listed.size)
    inflation_m = np.zeros(listed.size)
    inflation_r[binary] = rng.uniform(0.15, 0.45, int(binary.sum()))
    inflation_m[binary] = inflation_r[binary] * rng.uniform(0.8, 1.2, int(binary.sum()))
    singles = np.flatnonzero(~binary)
    odd = quota_choice(rng, singles, fraction_photometry_outliers, minimum=1 if singles.size >= 50 else 0)
    sign = np.where(rng.random(odd.size) < 0.5, -1.0, 1.0)
    inflation_r[odd] = sign * rng.uniform(0.08, 0.25, odd.size)
    inflation_m[odd] = sign * rng.uniform(0.08, 0.25, odd.size)
    observed = tcd_like_labels(population.teff[listed], rng, inflation_r, inflation_m)
    obs_ra, obs_dec = offset_positions(star_ra[listed], star_dec[listed], rng, 0.1, 1.0)

    n_field = int(round(fraction_field * listed.size))
    anchors = rng.integers(0, n_stars, n_field)
    field_ra, field_dec = offset_positions(star_ra[anchors], star_dec[anchors], rng, 180.0, 5400.0)
    n_neighbour = max(1, int(round(fraction_neighbours * n_stars)))
    hosts = rng.choice(n_stars, size=min(n_neighbour, n_stars), replace=False)
    neighbour_ra, neighbour_dec = offset_positions(star_ra[hosts], star_dec[hosts], rng, 5.0, 20.0)
    extra = tcd_like_labels(draw_mdwarf_teff(rng, n_field + hosts.size), rng)

    n_rows = listed.size + n_field + hosts.size
    tic = 100_000_000 + np.cumsum(rng.integers(1, 20_000, n_rows))
    tic = rng.permutation(tic)
    columns = {key: np.concatenate([observed[key], extra[key]]) for key in observed}
    ra = np.concatenate([obs_ra, field_ra, neighbour_ra])
    dec = np.concatenate([obs_dec, field_dec, neighbour_dec])
    star_id = np.concatenate([population.star_id[listed], np.full(n_field + hosts.size, -1)])
    row_kind = np.array(["observed"] * listed.size + ["field"] * n_field + ["neighbour"] * hosts.size, dtype=str)
    is_outlier = np.concatenate([inflation_r != 0, np.zeros(n_field + hosts.size, dtype=bool)])
    order = np.argsort(ra, kind="stable")
    return LabelCatalog(
        tic=tic[order], ra=ra[order], dec=dec[order],
        teff=columns["teff"][order], e_teff=columns["e_teff"][order],
        radius=columns["radius"][order], e_radius=columns["e_radius"][order],
        mass=columns["mass"][order], e_mass=columns["e_mass"][order],
        luminosity=columns["luminosity"][order], e_luminosity=columns["e_luminosity"][order],
        star_id=star_id[order], row_kind=row_kind[order], is_outlier=is_outlier[order],
    )
