"""The simulated stars: kinds, true labels, binaries, activity.

Pure numpy. Every random choice comes from the ``rng`` argument. Fractions are drawn as
exact quotas (``round(fraction * n)``, at least one when the fraction is non-zero and
``n`` is large enough) so that even a 60-star survey contains every kind of object.

Kinds (column ``kind``):

``m_dwarf``
    Teff 2900-4100 K from a normal distribution centred on 3450 K (sigma 260 K; most
    stars M2-M4); R and M on the Mann et al. (2015) relations
    (:mod:`lamost_mdwarf.relations`) times a correlated log-normal intrinsic scatter of
    2.5 % (correlation 0.6); L = R^2 (Teff/5772)^4; [Fe/H] ~ N(-0.1, 0.2).
``late_m``
    Teff 2550-2900 K (M7-M9), same relations (extrapolated below 2700 K).
``contaminant``
    K7-G2 dwarfs, Teff 4150-5800 K, rough main-sequence R = (Teff/5772)^1.4 Rsun,
    M = (Teff/5772)^1.6 Msun.

About 5 % of the M dwarfs are unresolved binaries with a companion of mass ratio
0.5-1 (companion Teff from the inverted Teff-M relation); the spectrum is the sum of
both stars. H-alpha emission (equivalent width 0.5-20 A) occurs with a probability that
rises from ~12 % at M0-M2 to ~60 % at M6 and later.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from lamost_mdwarf.relations import (
    log_surface_gravity,
    luminosity_from_radius_teff,
    mass_from_teff,
    radius_from_teff,
)

__all__ = [
    "KINDS",
    "PopulationFractions",
    "StarPopulation",
    "quota_choice",
    "draw_mdwarf_teff",
    "teff_from_mass",
    "draw_population",
]

KINDS = ("m_dwarf", "late_m", "contaminant")


@dataclass(frozen=True)
class PopulationFractions:
    """Fractions of the simulated objects.

    Attributes
    ----------
    late_m : float
        Objects that are late M dwarfs (M7-M9, Teff < 2900 K).
    contaminant : float
        Objects that are not M dwarfs (K7-G2).
    binary : float
        M dwarfs (incl. late M) that are unresolved binaries.
    intrinsic_scatter : float
        Log-normal scatter of the true R and M about the relations (fraction).
    """

    late_m: float = 0.03
    contaminant: float = 0.04
    binary: float = 0.05
    intrinsic_scatter: float = 0.025

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if not 0 <= value < 1:
                raise ValueError(f"{item.name} must be in [0, 1), got {value!r}")
        if self.late_m + self.contaminant >= 1:
            raise ValueError("late_m + contaminant must be < 1")


@dataclass
class StarPopulation:
    """True properties of the simulated stars (one entry per object).

    Attributes
    ----------
    star_id : numpy.ndarray of int
        0..n-1.
    kind : numpy.ndarray of str
        One of :data:`KINDS`.
    teff : numpy.ndarray
        Effective temperature of the (primary) star, K.
    radius, mass, luminosity : numpy.ndarray
        Rsun, Msun, Lsun (the primary's).
    logg : numpy.ndarray
        log10 surface gravity, cgs.
    feh : numpy.ndarray
        [Fe/H], dex.
    is_binary : numpy.ndarray of bool
        Unresolved binary.
    companion_teff, companion_radius, companion_mass : numpy.ndarray
        The companion's K, Rsun, Msun (NaN for single stars).
    halpha_ew : numpy.ndarray
        H-alpha emission equivalent width, Angstrom (0 = inactive).
    """

    star_id: np.ndarray
    kind: np.ndarray
    teff: np.ndarray
    radius: np.ndarray
    mass: np.ndarray
    luminosity: np.ndarray
    logg: np.ndarray
    feh: np.ndarray
    is_binary: np.ndarray
    companion_teff: np.ndarray
    companion_radius: np.ndarray
    companion_mass: np.ndarray
    halpha_ew: np.ndarray

    def __len__(self) -> int:
        return int(self.star_id.size)


def quota_choice(rng: np.random.Generator, candidates: np.ndarray, fraction: float, minimum: int = 1) -> np.ndarray:
    """Choose exactly ``max(minimum, round(fraction * len(candidates)))`` candidates.

    Parameters
    ----------
    rng : numpy.random.Generator
        Random source.
    candidates : numpy.ndarray
        Indices to choose from.
    fraction : float
        Target fraction in [0, 1]; 0 chooses nothing.
    minimum : int, optional
        Lower bound on the count when ``fraction > 0`` (capped at ``len(candidates)``).

    Returns
    -------
    numpy.ndarray
        Sorted chosen indices.
    """
    candidates = np.asarray(candidates)
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    if fraction == 0 or candidates.size == 0:
        return candidates[:0]
    count = min(candidates.size, max(int(minimum), int(round(fraction * candidates.size))))
    return np.sort(rng.choice(candidates, size=count, replace=False))


def draw_mdwarf_teff(rng: np.random.Generator, n: int) -> np.ndarray:
    """Draw M-dwarf effective temperatures: N(3450, 260) K truncated to 2900-4100 K.

    Parameters
    ----------
    rng : numpy.random.Generator
    n : int
        Number of stars.

    Returns
    -------
    numpy.ndarray
        Teff, K.
    """
    out = rng.normal(3450.0, 260.0, n)
    bad = (out < 2900.0) | (out > 4100.0)
    while bad.any():
        out[bad] = rng.normal(3450.0, 260.0, int(bad.sum()))
        bad = (out < 2900.0) | (out > 4100.0)
    return out


def teff_from_mass(mass_msun: np.ndarray) -> np.ndarray:
    """Invert the Teff-M relation on 2300-4400 K (monotonic there).

    Parameters
    ----------
    mass_msun : numpy.ndarray
        Mass, Msun.

    Returns
    -------
    numpy.ndarray
        Teff, K (clipped to the 2300-4400 K range).
    """
    grid = np.linspace(2300.0, 4400.0, 2101)
    return np.interp(np.asarray(mass_msun, dtype=np.float64), mass_from_teff(grid), grid)


def _activity(rng: np.random.Generator, teff: np.ndarray, kind: np.ndarray) -> np.ndarray:
    probability = 0.12 + 0.55 / (1.0 + np.exp((teff - 3150.0) / 120.0))
    probability = np.where(kind == "contaminant", 0.02, probability)
    active = rng.random(teff.size) < probability
    strength = rng.lognormal(np.log(2.5), 0.6, teff.size) * (1.0 + np.clip((3400.0 - teff) / 500.0, 0.0, None))
    return np.where(active, np.clip(strength, 0.5, 20.0), 0.0)


def draw_population(n_stars: int, rng: np.random.Generator, fractions: PopulationFractions | None = None) -> StarPopulation:
    """Draw the true properties of ``n_stars`` objects.

    Parameters
    ----------
    n_stars : int
        Number of objects (>= 1).
    rng : numpy.random.Generator
        Random source.
    fractions : PopulationFractions, optional
        Kind, binary and scatter fractions (defaults: 3 % late M, 4 % contaminants,
        5 % binaries, 2.5 % intrinsic scatter).

    Returns
    -------
    StarPopulation
    """
    if int(n_stars) != n_stars or n_stars < 1:
        raise ValueError(f"n_stars must be a positive integer, got {n_stars!r}")
    n = int(n_stars)
    fractions = fractions or PopulationFractions()
    index = np.arange(n)
    kind = np.full(n, "m_dwarf", dtype=object)
    enough = n >= 20  # guarantee every kind only when the survey is not tiny
    late = quota_choice(rng, index, fractions.late_m, minimum=1 if enough else 0)
    kind[late] = "late_m"
    contaminants = quota_choice(rng, index[kind == "m_dwarf"], fractions.contaminant, minimum=1 if enough else 0)
    kind[contaminants] = "contaminant"

    teff = np.empty(n)
    is_m = kind == "m_dwarf"
    is_late = kind == "late_m"
    is_cont = kind == "contaminant"
    teff[is_m] = draw_mdwarf_teff(rng, int(is_m.sum()))
    teff[is_late] = rng.uniform(2550.0, 2900.0, int(is_late.sum()))
    teff[is_cont] = rng.uniform(4150.0, 5800.0, int(is_cont.sum()))

    correlated = rng.multivariate_normal([0.0, 0.0], [[1.0, 0.6], [0.6, 1.0]], size=n) * fractions.intrinsic_scatter
    radius = np.empty(n)
    mass = np.empty(n)
    cool = ~is_cont
    radius[cool] = radius_from_teff(teff[cool]) * np.exp(correlated[cool, 0])
    mass[cool] = mass_from_teff(teff[cool]) * np.exp(correlated[cool, 1])
    radius[is_cont] = (teff[is_cont] / 5772.0) ** 1.4 * np.exp(correlated[is_cont, 0])
    mass[is_cont] = (teff[is_cont] / 5772.0) ** 1.6 * np.exp(correlated[is_cont, 1])
    feh = np.clip(rng.normal(-0.1, 0.2, n), -0.8, 0.5)

    is_binary = np.zeros(n, dtype=bool)
    binaries = quota_choice(rng, index[cool], fractions.binary, minimum=1 if enough else 0)
    is_binary[binaries] = True
    companion_mass = np.full(n, np.nan)
    companion_teff = np.full(n, np.nan)
    companion_radius = np.full(n, np.nan)
    q = rng.uniform(0.5, 1.0, binaries.size)
    companion_mass[binaries] = np.maximum(mass[binaries] * q, 0.075)
    companion_teff[binaries] = np.minimum(teff_from_mass(companion_mass[binaries]), teff[binaries])
    companion_radius[binaries] = radius_from_teff(companion_teff[binaries])

    return StarPopulation(
        star_id=index.astype(np.int64),
        kind=kind.astype(str),
        teff=teff,
        radius=radius,
        mass=mass,
        luminosity=luminosity_from_radius_teff(radius, teff),
        logg=log_surface_gravity(mass, radius),
        feh=feh,
        is_binary=is_binary,
        companion_teff=companion_teff,
        companion_radius=companion_radius,
        companion_mass=companion_mass,
        halpha_ew=_activity(rng, teff, kind),
    )
