"""The observing plan of a simulated LAMOST survey: where, when, how and in which files.

Pure numpy; everything random comes from the ``rng`` argument and is decided here, in
one process, so that the spectra written by any number of workers are identical. The
workers only draw the pixel noise and artefact positions (see
:mod:`lamost_mdwarf.simulate.instrument`).

* Fields: one per ~40 stars, centres uniform on the sky at -5 < Dec < 60 deg; each star
  lies within 2.5 deg of its field centre.
* Visits (plates): every field is observed once in the DR1 era (LMJD 55859-56108);
  10 % of the stars are re-observed on one or two later visits (LMJD 56200-58480), each
  with a new plan id, spectrograph and fiber.
* Files: DR1-era observations are written in the original DR1 layout (65 %), the DR7
  5-row image layout (17.5 %) or the DR9 COADD table layout (17.5 %); later visits in
  DR7 or DR9 layout (50/50). ~1 % of the DR1-layout observations (at least 2) are
  also written as DR7 and/or DR9 re-reductions of the same observation (same LMJD,
  PLANID, SPID, FIBERID, OBSID and arrays).
* Per observation: native grid (COEFF0 3.5682 with NAXIS1 3870-3909, or 3.584 for 5 %
  with NAXIS1 3751-3760), redshift (header Z = true z + N(0, Z_ERR); 8 % missing, as
  Z = -9999 or no keyword), ugriz SNRs (SNR_lambda log-normal: ~35 % below 50, ~6 %
  above 250, tail to ~1000; band fractions depend on Teff), LAMOST subclass from Teff
  with ~0.8 subtypes of scatter, calibration and telluric parameters, blue excess (3 %),
  cosmic rays (30 %).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lamost_mdwarf.simulate.population import StarPopulation, quota_choice

__all__ = [
    "RELEASES",
    "LAYOUT_OF_RELEASE",
    "PlanFractions",
    "SurveyPlan",
    "subclass_from_teff",
    "designation_from_radec",
    "draw_plan",
]

#: Data releases written, their reader layout names and output directories.
RELEASES = ("DR1", "DR7", "DR9")
LAYOUT_OF_RELEASE = {"DR1": "dr1_image", "DR7": "image", "DR9": "coadd_table"}
_SUFFIX_OF_RELEASE = {"DR1": ".fits", "DR7": ".fits.gz", "DR9": ".fits.gz"}

_DR1_LMJD = (55859, 56108)
_LATER_LMJD = (56200, 58480)
_STARS_PER_FIELD = 40
_FIELD_RADIUS_DEG = 2.5


@dataclass(frozen=True)
class PlanFractions:
    """Fractions that shape the plan (see the module docstring for their meaning)."""

    repeated_objects: float = 0.10
    dr7_layout: float = 0.175
    dr9_layout: float = 0.175
    rereduced: float = 0.01
    missing_redshift: float = 0.08
    blue_excess: float = 0.03
    cosmic_rays: float = 0.30
    alternative_coeff0: float = 0.05

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if self.dr7_layout + self.dr9_layout > 1:
            raise ValueError("dr7_layout + dr9_layout must be <= 1")


@dataclass
class SurveyPlan:
    """Everything decided about the survey before any spectrum is synthesised.

    Attributes
    ----------
    star_ra, star_dec : numpy.ndarray
        True (and header) position of every star, deg.
    star_z : numpy.ndarray
        True redshift of every star.
    field_ra, field_dec : numpy.ndarray
        Field centres, deg.
    observations : dict of str -> numpy.ndarray
        One entry per observation (see :func:`draw_plan` for the keys).
    files : dict of str -> numpy.ndarray
        One entry per file: ``observation`` (index), ``release`` ('DR1', 'DR7', 'DR9'),
        ``is_rereduction`` (bool: a later release of an observation also written as DR1).
    """

    star_ra: np.ndarray
    star_dec: np.ndarray
    star_z: np.ndarray
    field_ra: np.ndarray
    field_dec: np.ndarray
    observations: dict[str, np.ndarray] = field(default_factory=dict)
    files: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_observations(self) -> int:
        """Number of distinct observations."""
        return int(self.observations["star_id"].size)

    @property
    def n_files(self) -> int:
        """Number of files (observations plus re-reductions)."""
        return int(self.files["observation"].size)

    def file_name(self, file_index: int) -> str:
        """Relative path of a file, e.g. ``spectra/dr7/spec-55862-B6212_sp06-068.fits.gz``."""
        obs = int(self.files["observation"][file_index])
        release = str(self.files["release"][file_index])
        return f"spectra/{release.lower()}/{self.base_name(obs)}{_SUFFIX_OF_RELEASE[release]}"

    def base_name(self, observation: int) -> str:
        """LAMOST file stem ``spec-LMJD-PLANID_spSS-FFF`` of an observation."""
        o = self.observations
        return f"spec-{int(o['lmjd'][observation])}-{o['planid'][observation]}_sp{int(o['spid'][observation]):02d}-{int(o['fiberid'][observation]):03d}"

    def observation_row(self, observation: int) -> dict[str, Any]:
        """All per-observation values of one observation as Python scalars."""
        return {key: _scalar(values[observation]) for key, values in self.observations.items()}


def _scalar(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, np.generic):
        return value.item()
    return value


def subclass_from_teff(teff_k: np.ndarray, kind: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """LAMOST-like spectral subclass of each spectrum, from Teff with scatter.

    M dwarfs: subtype = round((3850 K - Teff) / 150 K + N(0, 0.8)) (M0 ~ 3850 K, M6 ~
    2950 K), clipped to M0-M9, with subtypes below M0 written K7 (-1) or K5 (<= -2).
    Contaminants: K7 / K5 / K3 / K1 / G8 / G5 / G2 by Teff (+- 100 K scatter).

    Parameters
    ----------
    teff_k : numpy.ndarray
        Teff, K.
    kind : numpy.ndarray of str
        ``m_dwarf``, ``late_m`` or ``contaminant``.
    rng : numpy.random.Generator

    Returns
    -------
    numpy.ndarray of str
        Subclass such as ``'M3'`` or ``'K7'`` (DR9 files prefix M types with ``'d'``).
    """
    teff = np.asarray(teff_k, dtype=np.float64)
    subtype = np.rint((3850.0 - teff) / 150.0 + rng.normal(0.0, 0.8, teff.size)).astype(int)
    out = np.empty(teff.size, dtype=object)
    for i, value in enumerate(subtype):
        out[i] = "K5" if value <= -2 else "K7" if value == -1 else f"M{min(value, 9)}"
    contaminant = np.asarray(kind) == "contaminant"
    jittered = teff + rng.normal(0.0, 100.0, teff.size)
    edges = np.array([4250.0, 4500.0, 4800.0, 5100.0, 5400.0, 5650.0])
    names = np.array(["K7", "K5", "K3", "K1", "G8", "G5", "G2"], dtype=object)
    out[contaminant] = names[np.searchsorted(edges, jittered[contaminant])]
    return out.astype(str)


def designation_from_radec(ra_deg: float, dec_deg: float) -> str:
    """LAMOST designation ``'LAMOST Jhhmmss.ss+ddmmss.s'`` (truncated, IAU style).

    Parameters
    ----------
    ra_deg, dec_deg : float
        J2000 position, deg.

    Returns
    -------
    str
    """
    if not (0 <= ra_deg < 360 and -90 <= dec_deg <= 90):
        raise ValueError(f"invalid position ({ra_deg}, {dec_deg})")
    ra_cs = int(math.floor(ra_deg / 15.0 * 3600.0 * 100.0 + 1e-6))  # centiseconds of time
    hours, rem = divmod(ra_cs, 3600 * 100)
    minutes, rem = divmod(rem, 60 * 100)
    sign = "-" if dec_deg < 0 else "+"
    dec_ds = int(math.floor(abs(dec_deg) * 3600.0 * 10.0 + 1e-6))  # deci-arcseconds
    degrees, drem = divmod(dec_ds, 3600 * 10)
    arcmin, drem = divmod(drem, 60 * 10)
    return f"LAMOST J{hours:02d}{minutes:02d}{rem // 100:02d}.{rem % 100:02d}{sign}{degrees:02d}{arcmin:02d}{drem // 10:02d}.{drem % 10:d}"


def _plan_id(field_ra: float, field_dec: float, field_index: int, visit: int, pilot_style: bool) -> str:
    if pilot_style:
        return f"{'BFMV'[field_index % 4]}{5001 + field_index + 1000 * visit}"
    ra_s = int(field_ra / 15.0 * 3600.0)
    dec_s = int(abs(field_dec) * 3600.0)
    prefix = ("EG", "HD", "KP")[field_index % 3]
    return (
        f"{prefix}{ra_s // 3600:02d}{ra_s // 60 % 60:02d}{ra_s % 60:02d}{'S' if field_dec < 0 else 'N'}"
        f"{dec_s // 3600:02d}{dec_s // 60 % 60:02d}{dec_s % 60:02d}{'MBFV'[field_index % 4]}{visit + 1:02d}"
    )


def _band_snr(rng: np.random.Generator, snr_lambda: np.ndarray, teff: np.ndarray) -> np.ndarray:
    base = np.array([0.015, 0.095, 0.245, 0.355, 0.29])
    alpha = np.array([3.0, 1.8, 0.6, -0.4, -0.8])
    weights = base[None, :] * (teff[:, None] / 3500.0) ** alpha[None, :]
    weights *= rng.lognormal(0.0, 0.12, weights.shape)
    weights /= weights.sum(axis=1, keepdims=True)
    return weights * snr_lambda[:, None]


def draw_plan(population: StarPopulation, rng: np.random.Generator, fractions: PlanFractions | None = None) -> SurveyPlan:
    """Draw the observing plan for a population.

    Parameters
    ----------
    population : StarPopulation
        The stars to observe.
    rng : numpy.random.Generator
    fractions : PlanFractions, optional

    Returns
    -------
    SurveyPlan
        ``observations`` has the keys: ``star_id``, ``field``, ``visit``, ``lmjd``,
        ``planid``, ``spid``, ``fiberid``, ``obsid``, ``release`` (of the main file),
        ``coeff0``, ``coeff1``, ``n_pixels``, ``z_true``, ``z_header`` (NaN if missing),
        ``z_err``, ``z_missing`` ('' | 'sentinel' | 'absent'), ``snr_u`` .. ``snr_z``,
        ``snr_lambda``, ``subclass``, ``flux_scale``, ``throughput`` (n, 3),
        ``join_step``, ``join_centre``, ``join_noise``, ``o2_strength``,
        ``h2o_strength``, ``sky_amplitude``, ``sky_residual``, ``blue_excess``,
        ``blue_excess_amplitude``, ``blue_excess_scale``, ``n_cosmic_rays``, ``norm``,
        ``ra``, ``dec``, ``designation``, ``field_ra``, ``field_dec``, ``helio_rv``,
        ``seeing``, ``moon_phase``, ``exptime``, ``local_hour``, ``mag_u`` .. ``mag_z``,
        ``objname``.
    """
    fractions = fractions or PlanFractions()
    n_stars = len(population)
    stars = np.arange(n_stars)

    # ---- fields and star positions
    n_fields = max(1, int(math.ceil(n_stars / _STARS_PER_FIELD)))
    field_ra = rng.uniform(0.0, 360.0, n_fields)
    sin_lo, sin_hi = np.sin(np.radians(-5.0)), np.sin(np.radians(60.0))
    field_dec = np.degrees(np.arcsin(rng.uniform(sin_lo, sin_hi, n_fields)))
    star_field = rng.integers(0, n_fields, n_stars)
    radius = _FIELD_RADIUS_DEG * np.sqrt(rng.random(n_stars))
    angle = rng.uniform(0.0, 2 * np.pi, n_stars)
    star_dec = np.clip(field_dec[star_field] + radius * np.cos(angle), -89.0, 89.0)
    star_ra = (field_ra[star_field] + radius * np.sin(angle) / np.cos(np.radians(star_dec))) % 360.0
    star_z = rng.normal(0.0, 1.5e-4, n_stars)

    # ---- observations: every star once, 10 % two or three times
    n_visits = np.ones(n_stars, dtype=int)
    repeated = quota_choice(rng, stars, fractions.repeated_objects)
    n_visits[repeated] = np.where(rng.random(repeated.size) < 0.7, 2, 3)
    obs_star = np.repeat(stars, n_visits)
    obs_visit = np.concatenate([np.arange(k) for k in n_visits])
    n_obs = obs_star.size
    obs_field = star_field[obs_star]

    # plates: (field, visit) -> LMJD, plan id; later visits re-use the field centre
    pilot_style = rng.random(n_fields) < 0.2
    plate_lmjd = np.empty((n_fields, 3), dtype=np.int64)
    plate_lmjd[:, 0] = rng.integers(_DR1_LMJD[0], _DR1_LMJD[1] + 1, n_fields)
    plate_lmjd[:, 1] = rng.integers(_LATER_LMJD[0], (_LATER_LMJD[0] + _LATER_LMJD[1]) // 2, n_fields)
    plate_lmjd[:, 2] = rng.integers((_LATER_LMJD[0] + _LATER_LMJD[1]) // 2 + 1, _LATER_LMJD[1] + 1, n_fields)
    plate_helio = rng.uniform(-30.0, 30.0, (n_fields, 3))
    plate_seeing = rng.uniform(2.2, 4.5, (n_fields, 3))
    plate_moon = rng.uniform(0.0, 29.5, (n_fields, 3))
    plate_exptime = rng.choice([1800.0, 2700.0, 3600.0, 5400.0], (n_fields, 3))
    plate_hour = rng.uniform(-5.0, 3.5, (n_fields, 3))  # local hour relative to midnight
    planid = np.array(
        [_plan_id(field_ra[f], field_dec[f], f, v, bool(pilot_style[f])) for f, v in zip(obs_field, obs_visit)],
        dtype=object,
    )
    lmjd = plate_lmjd[obs_field, obs_visit]

    # fibers: distinct (spid, fiberid) per plate
    spid = np.empty(n_obs, dtype=np.int64)
    fiberid = np.empty(n_obs, dtype=np.int64)
    plate_key = obs_field * 3 + obs_visit
    order = np.argsort(plate_key, kind="stable")
    boundaries = np.flatnonzero(np.diff(plate_key[order])) + 1
    for group in np.split(order, boundaries):
        slots = rng.choice(16 * 250, size=group.size, replace=False)
        spid[group] = slots // 250 + 1
        fiberid[group] = slots % 250 + 1

    # releases of the main file
    release = np.full(n_obs, "DR1", dtype=object)
    first = np.flatnonzero(obs_visit == 0)
    later = np.flatnonzero(obs_visit > 0)
    dr7 = quota_choice(rng, first, fractions.dr7_layout)
    release[dr7] = "DR7"
    dr9 = quota_choice(rng, np.setdiff1d(first, dr7), fractions.dr9_layout / max(1e-12, 1 - fractions.dr7_layout))
    release[dr9] = "DR9"
    release[later] = np.where(rng.random(later.size) < 0.5, "DR7", "DR9")

    # OBSID: sequential in (LMJD, PLANID, SPID, FIBERID) order, as LAMOST assigns them
    obs_order = sorted(range(n_obs), key=lambda i: (int(lmjd[i]), planid[i], int(spid[i]), int(fiberid[i])))
    obsid = np.empty(n_obs, dtype=np.int64)
    obsid[np.array(obs_order, dtype=np.int64)] = 100_001 + np.arange(n_obs)

    # native grid
    coeff0 = np.full(n_obs, 3.5682)
    alternative = quota_choice(rng, np.arange(n_obs), fractions.alternative_coeff0, minimum=1 if n_obs >= 20 else 0)
    coeff0[alternative] = 3.584
    n_pixels = rng.integers(3870, 3910, n_obs)
    n_pixels[alternative] = rng.integers(3751, 3761, alternative.size)

    # SNR
    teff_obs = population.teff[obs_star]
    snr_lambda = np.clip(rng.lognormal(4.238, 0.847, n_obs), 4.0, 1200.0)
    snr = _band_snr(rng, snr_lambda, teff_obs)
    blue_excess = np.zeros(n_obs, dtype=bool)
    blue_excess[quota_choice(rng, np.arange(n_obs), fractions.blue_excess, minimum=1 if n_obs >= 20 else 0)] = True
    snr[blue_excess, :2] *= rng.uniform(3.0, 5.0, (int(blue_excess.sum()), 2))
    snr[rng.random(n_obs) < 0.25, 0] = 0.0  # LAMOST often reports SNR_u = 0
    snr = np.round(snr, 2)

    # redshift
    z_true = star_z[obs_star]
    z_err = rng.uniform(1.5e-5, 6e-5, n_obs) * (1.0 + 30.0 / snr_lambda)
    z_header = z_true + z_err * rng.standard_normal(n_obs)
    z_missing = np.full(n_obs, "", dtype=object)
    missing = quota_choice(rng, np.arange(n_obs), fractions.missing_redshift, minimum=1 if n_obs >= 10 else 0)
    z_missing[missing] = np.where(rng.random(missing.size) < 0.5, "sentinel", "absent")
    z_header[missing] = np.nan

    # cosmic rays, calibration, sky, telluric
    n_cosmic_rays = np.zeros(n_obs, dtype=np.int64)
    hit = quota_choice(rng, np.arange(n_obs), fractions.cosmic_rays)
    n_cosmic_rays[hit] = rng.integers(1, 5, hit.size)
    blue_amplitude = np.where(blue_excess, rng.uniform(15.0, 35.0, n_obs), 0.0)
    blue_scale = rng.uniform(250.0, 400.0, n_obs)

    # photometry (ugriz; 99 = missing), loosely tied to Teff and SNR
    color_t = np.clip((4000.0 - teff_obs) / 1000.0, -1.5, 1.3)
    mag_r = 17.8 - 2.2 * np.log10(snr_lambda / 60.0) + rng.normal(0.0, 0.25, n_obs)
    mag_g = mag_r + 1.25 + 0.45 * color_t + rng.normal(0.0, 0.05, n_obs)
    mag_i = mag_r - (0.55 + 1.1 * np.clip(color_t, 0.0, None)) + rng.normal(0.0, 0.05, n_obs)
    mag_z = mag_i - (0.3 + 0.5 * np.clip(color_t, 0.0, None)) + rng.normal(0.0, 0.05, n_obs)
    mag_u = np.where(rng.random(n_obs) < 0.2, mag_g + 2.4, 99.0)

    observations: dict[str, np.ndarray] = {
        "star_id": obs_star.astype(np.int64),
        "field": obs_field.astype(np.int64),
        "visit": obs_visit.astype(np.int64),
        "lmjd": lmjd.astype(np.int64),
        "planid": planid,
        "spid": spid,
        "fiberid": fiberid,
        "obsid": obsid,
        "release": release,
        "coeff0": coeff0,
        "coeff1": np.full(n_obs, 1e-4),
        "n_pixels": n_pixels.astype(np.int64),
        "z_true": z_true,
        "z_header": z_header,
        "z_err": z_err,
        "z_missing": z_missing,
        "snr_u": snr[:, 0],
        "snr_g": snr[:, 1],
        "snr_r": snr[:, 2],
        "snr_i": snr[:, 3],
        "snr_z": snr[:, 4],
        "snr_lambda": snr.sum(axis=1),
        "subclass": subclass_from_teff(teff_obs, population.kind[obs_star], rng).astype(object),
        "flux_scale": rng.lognormal(np.log(150.0), 0.8, n_obs),
        "throughput": rng.normal(0.0, 1.0, (n_obs, 3)) * np.array([0.03, 0.015, 0.01]),
        "join_step": rng.normal(0.0, 0.03, n_obs),
        "join_centre": rng.uniform(5870.0, 5930.0, n_obs),
        "join_noise": rng.uniform(0.5, 2.5, n_obs),
        "o2_strength": rng.uniform(0.1, 1.0, n_obs),
        "h2o_strength": rng.uniform(0.1, 1.5, n_obs),
        "sky_amplitude": rng.lognormal(np.log(6.0), 0.5, n_obs),
        "sky_residual": rng.uniform(0.1, 0.5, n_obs),
        "blue_excess": blue_excess,
        "blue_excess_amplitude": blue_amplitude,
        "blue_excess_scale": blue_scale,
        "n_cosmic_rays": n_cosmic_rays,
        "norm": (rng.random(n_obs) < 0.8).astype(np.int64),
        "ra": star_ra[obs_star],
        "dec": star_dec[obs_star],
        "designation": np.array([designation_from_radec(r, d) for r, d in zip(star_ra[obs_star], star_dec[obs_star])], dtype=object),
        "field_ra": field_ra[obs_field],
        "field_dec": field_dec[obs_field],
        "helio_rv": plate_helio[obs_field, obs_visit],
        "seeing": plate_seeing[obs_field, obs_visit],
        "moon_phase": plate_moon[obs_field, obs_visit],
        "exptime": plate_exptime[obs_field, obs_visit],
        "local_hour": plate_hour[obs_field, obs_visit],
        "mag_u": mag_u,
        "mag_g": mag_g,
        "mag_r": mag_r,
        "mag_i": mag_i,
        "mag_z": mag_z,
        "objname": np.array([str(v) for v in rng.integers(10**14, 10**15, n_obs)], dtype=object),
    }

    # files: the main one per observation, plus re-reductions of some DR1 observations
    file_obs = list(range(n_obs))
    file_release = list(release)
    file_rered = [False] * n_obs
    dr1_obs = np.flatnonzero(release == "DR1")
    rereduced = quota_choice(rng, dr1_obs, fractions.rereduced, minimum=2 if dr1_obs.size >= 20 else 0)
    for rank, obs in enumerate(rereduced):
        draw = rng.random()
        extra = ("DR7", "DR9") if rank == 0 or draw < 0.25 else ("DR7",) if draw < 0.625 else ("DR9",)
        for rel in extra:
            file_obs.append(int(obs))
            file_release.append(rel)
            file_rered.append(True)
    file_order = np.lexsort((np.array([RELEASES.index(r) for r in file_release]), np.array(file_obs)))
    files = {
        "observation": np.array(file_obs, dtype=np.int64)[file_order],
        "release": np.array(file_release, dtype=object)[file_order],
        "is_rereduction": np.array(file_rered, dtype=bool)[file_order],
    }
    return SurveyPlan(
        star_ra=star_ra, star_dec=star_dec, star_z=star_z, field_ra=field_ra, field_dec=field_dec,
        observations=observations, files=files,
    )
