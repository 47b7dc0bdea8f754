"""Quality cuts and the training / validation / survey split (paper sections 2.1-2.2, 3.3).

Pure numpy over per-star arrays: no I/O, no dask. Every star gets a bitmask of the cuts
it fails (:data:`SELECTION_BITS`), a readable reason, and a subset:

- ``training``: matched to the label catalog, passes every quality cut, SNR_lambda above
  the training threshold (250), labels finite and within the outlier thresholds of the
  Mann et al. (2015) Teff-R and Teff-M relations (:mod:`lamost_mdwarf.relations`), and the
  highest-SNR spectrum of its object (catalog row);
- ``validation``: the other matched spectra that pass every quality cut;
- ``survey``: unmatched spectra that pass every quality cut;
- ``excluded``: spectra failing a quality cut.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from lamost_mdwarf.relations import mass_from_teff, radius_from_teff

__all__ = [
    "SELECTION_BITS",
    "QUALITY_BITS",
    "SUBSETS",
    "SelectionConfig",
    "SelectionResult",
    "select_subsets",
    "subtype_number",
    "format_cut_table",
]

#: Bits of the ``selection_flags`` variable.
SELECTION_BITS: dict[str, int] = {
    "no_redshift": 1,
    "blue_excess": 2,
    "low_snr": 4,
    "subtype": 8,
    "few_good_pixels": 16,
    "bad_continuum": 32,
    # training-only
    "label_outlier": 64,
    "below_training_snr": 128,
    "repeat_observation": 256,
    "bad_labels": 512,
}

#: Bits that exclude a spectrum from every subset.
QUALITY_BITS = ("no_redshift", "blue_excess", "low_snr", "subtype", "few_good_pixels", "bad_continuum")

SUBSETS = ("training", "validation", "survey", "excluded")

_SUBTYPE_RE = re.compile(r"^(?:d|sd)?M(\d(?:\.\d)?)$")


def subtype_number(subclass: np.ndarray) -> np.ndarray:
    """M subtype as a float (``'M3'`` -> 3.0, ``'M4.5'`` -> 4.5); NaN for non-M classes."""
    out = np.full(len(subclass), np.nan)
    for i, value in enumerate(subclass):
        match = _SUBTYPE_RE.match(str(value).strip())
        if match:
            out[i] = float(match.group(1))
    return out


@dataclass(frozen=True)
class SelectionConfig:
    """Thresholds of the cuts (defaults: the paper's).

    Attributes
    ----------
    snr_min : float
        Keep SNR_lambda > snr_min (50).
    snr_training_min : float
        Training set SNR_lambda > this (250).
    blue_slope_min : float
        Blue-excess cut: drop slope < this (-3, normalized flux per 1000 A).
    subtype_min, subtype_max : float
        Keep M subtypes in [M0, M6].
    min_good_fraction : float
        Minimum fraction of unmasked pixels on the grid.
    outlier_radius_rsun, outlier_mass_msun : float
        Training-label outlier thresholds against the Mann et al. (2015) relations
        (0.01 Rsun, 0.01 Msun).
    outlier_rule : {"both", "either"}
        ``"both"`` (paper's wording: deviates in R *and* in M) or ``"either"``.
    """

    snr_min: float = 50.0
    snr_training_min: float = 250.0
    blue_slope_min: float = -3.0
    subtype_min: float = 0.0
    subtype_max: float = 6.0
    min_good_fraction: float = 0.5
    outlier_radius_rsun: float = 0.01
    outlier_mass_msun: float = 0.01
    outlier_rule: str = "both"

    def __post_init__(self) -> None:
        if self.outlier_rule not in ("both", "either"):
            raise ValueError(f"outlier_rule must be 'both' or 'either', got {self.outlier_rule!r}")


@dataclass
class SelectionResult:
    """Per-star outcome of :func:`select_subsets`.

    Attributes
    ----------
    flags : numpy.ndarray
        uint16 bitmask of :data:`SELECTION_BITS`.
    subset : numpy.ndarray
        object array of :data:`SUBSETS`.
    reason : numpy.ndarray
        object array: comma-separated names of the failed cuts ('' when none).
    cut_table : list of (str, int, int)
        Sequential cut counts: (cut, removed, remaining), as in the paper.
    """

    flags: np.ndarray
    subset: np.ndarray
    reason: np.ndarray
    cut_table: list[tuple[str, int, int]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Number of stars per subset."""
        return {name: int(np.sum(self.subset == name)) for name in SUBSETS}


def select_subsets(
    *,
    has_redshift: np.ndarray,
    blue_slope: np.ndarray,
    snr_lambda: np.ndarray,
    subclass: np.ndarray,
    good_fraction: np.ndarray,
    continuum_ok: np.ndarray,
    label_index: np.ndarray,
    teff: np.ndarray,
    radius: np.ndarray,
    mass: np.ndarray,
    luminosity: np.ndarray,
    config: SelectionConfig = SelectionConfig(),
) -> SelectionResult:
    """Apply the quality cuts and split the stars into training/validation/survey.

    Parameters
    ----------
    has_redshift : bool array
        Header redshift present.
    blue_slope : float array
        Pseudo-continuum blue slope (normalized flux per 1000 A); NaN counts as failing.
    snr_lambda : float array
        Sum of the ugriz SNRs; NaN counts as failing.
    subclass : str array
        LAMOST subclass (normalised, e.g. ``'M3'``).
    good_fraction : float array
        Fraction of unmasked pixels on the grid.
    continuum_ok : bool array
        Pseudo-continuum finite and positive.
    label_index : int array
        Matched catalog row, -1 when unmatched.
    teff, radius, mass, luminosity : float arrays
        Matched catalog labels (K, Rsun, Msun, Lsun), NaN when unmatched.
    config : SelectionConfig

    Returns
    -------
    SelectionResult
    """
    n = len(snr_lambda)
    arrays = dict(has_redshift=has_redshift, blue_slope=blue_slope, subclass=subclass,
                  good_fraction=good_fraction, continuum_ok=continuum_ok, label_index=label_index,
                  teff=teff, radius=radius, mass=mass, luminosity=luminosity)
    for name, arr in arrays.items():
        if len(arr) != n:
            raise ValueError(f"{name} has {len(arr)} entries, expected {n}")
    snr = np.asarray(snr_lambda, dtype=np.float64)
    slope = np.asarray(blue_slope, dtype=np.float64)
    subtype = subtype_number(np.asarray(subclass))
    label_index = np.asarray(label_index, dtype=np.int64)
    matched = label_index >= 0
    flags = np.zeros(n, dtype=np.uint16)

    def set_bit(name: str, condition: np.ndarray) -> None:
        flags[np.asarray(condition, dtype=bool)] |= np.uint16(SELECTION_BITS[name])

    set_bit("no_redshift", ~np.asarray(has_redshift, dtype=bool))
    set_bit("blue_excess", ~(slope >= config.blue_slope_min))
    set_bit("low_snr", ~(snr > config.snr_min))
    set_bit("subtype", ~((subtype >= config.subtype_min) & (subtype <= config.subtype_max)))
    set_bit("few_good_pixels", ~(np.asarray(good_fraction, dtype=np.float64) >= config.min_good_fraction))
    set_bit("bad_continuum", ~np.asarray(continuum_ok, dtype=bool))

    labels = np.column_stack([np.asarray(a, dtype=np.float64) for a in (teff, radius, mass, luminosity)])
    labels_ok = matched & np.all(np.isfinite(labels), axis=1) & np.all(labels > 0, axis=1)
    set_bit("bad_labels", matched & ~labels_ok)
    with np.errstate(invalid="ignore"):
        teff_for_rel = np.where(labels_ok, labels[:, 0], 3500.0)
        d_radius = np.abs(labels[:, 1] - radius_from_teff(teff_for_rel))
        d_mass = np.abs(labels[:, 2] - mass_from_teff(teff_for_rel))
    off_r = d_radius > config.outlier_radius_rsun
    off_m = d_mass > config.outlier_mass_msun
    outlier = (off_r & off_m) if config.outlier_rule == "both" else (off_r | off_m)
    set_bit("label_outlier", labels_ok & outlier)
    set_bit("below_training_snr", matched & ~(snr > config.snr_training_min))

    quality_mask = np.uint16(sum(SELECTION_BITS[b] for b in QUALITY_BITS))
    passes = (flags & quality_mask) == 0
    training_mask = np.uint16(SELECTION_BITS["label_outlier"] | SELECTION_BITS["below_training_snr"]
                              | SELECTION_BITS["bad_labels"])
    candidate = matched & passes & ((flags & training_mask) == 0)

    # Unique objects: the best-SNR candidate spectrum of each catalog row.
    best = np.zeros(n, dtype=bool)
    if candidate.any():
        idx = np.flatnonzero(candidate)
        order = np.lexsort((-snr[idx], label_index[idx]))
        sorted_idx = idx[order]
        first = np.ones(sorted_idx.size, dtype=bool)
        first[1:] = label_index[sorted_idx[1:]] != label_index[sorted_idx[:-1]]
        best[sorted_idx[first]] = True
    set_bit("repeat_observation", candidate & ~best)

    subset = np.full(n, "excluded", dtype=object)
    subset[passes & ~matched] = "survey"
    subset[passes & matched] = "validation"
    subset[best] = "training"

    names = list(SELECTION_BITS)
    reason = np.array(
        [",".join(name for name in names if f & SELECTION_BITS[name]) for f in flags.tolist()], dtype=object
    )
    return SelectionResult(flags=flags, subset=subset, reason=reason,
                           cut_table=_cut_table(flags, matched, best, n))


def _cut_table(flags: np.ndarray, matched: np.ndarray, training: np.ndarray, n: int) -> list[tuple[str, int, int]]:
    table = [("spectra in store", 0, n)]
    remaining = np.ones(n, dtype=bool)
    for name in QUALITY_BITS:
        fails = remaining & ((flags & SELECTION_BITS[name]) != 0)
        remaining &= ~fails
        table.append((name.replace("_", " "), int(fails.sum()), int(remaining.sum())))
    pool = remaining & matched
    table.append(("matched to label catalog", int((remaining & ~matched).sum()), int(pool.sum())))
    for name in ("below_training_snr", "bad_labels", "label_outlier", "repeat_observation"):
        fails = pool & ((flags & SELECTION_BITS[name]) != 0)
        pool &= ~fails
        table.append((f"training: {name.replace('_', ' ')}", int(fails.sum()), int(pool.sum())))
    assert int(pool.sum()) == int(training.sum())
    return table


def format_cut_table(table: list[tuple[str, int, int]]) -> str:
    """The sequential cut counts as a fixed-width text table."""
    width = max(len(row[0]) for row in table)
    lines = [f"{'cut':<{width}}  {'removed':>9}  {'remaining':>9}"]
    for name, removed, remaining in table:
        lines.append(f"{name:<{width}}  {removed:>9}  {remaining:>9}")
    return "\n".join(lines)
