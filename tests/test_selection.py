"""Quality cuts and the training/validation/survey split."""
from __future__ import annotations

import numpy as np
import pytest

from lamost_mdwarf.relations import luminosity_from_radius_teff, mass_from_teff, radius_from_teff
from lamost_mdwarf.selection import (
    SELECTION_BITS,
    SelectionConfig,
    format_cut_table,
    select_subsets,
    subtype_number,
)


def base(n, rng):
    teff = rng.uniform(3000, 3900, n)
    radius, mass = radius_from_teff(teff), mass_from_teff(teff)
    return dict(
        has_redshift=np.ones(n, bool), blue_slope=np.full(n, 0.5), snr_lambda=rng.uniform(60, 600, n),
        subclass=np.array(["M3"] * n, dtype=object), good_fraction=np.full(n, 0.95),
        continuum_ok=np.ones(n, bool), label_index=np.arange(n), teff=teff, radius=radius, mass=mass,
        luminosity=luminosity_from_radius_teff(radius, teff),
    )


def test_each_cut_and_subsets():
    rng = np.random.default_rng(0)
    kw = base(12, rng)
    kw["snr_lambda"][:] = 300
    kw["has_redshift"][0] = False
    kw["blue_slope"][1] = -4.0
    kw["snr_lambda"][2] = 40
    kw["subclass"][3] = "M8"
    kw["good_fraction"][4] = 0.2
    kw["continuum_ok"][5] = False
    kw["label_index"][6:8] = -1           # unmatched -> survey
    kw["snr_lambda"][8] = 200             # matched, below training SNR -> validation
    kw["radius"][9] += 0.2                # binary-like outlier -> validation
    kw["mass"][9] += 0.2
    kw["label_index"][10:12] = 10         # two spectra of one object -> best one trains
    kw["snr_lambda"][10], kw["snr_lambda"][11] = 280, 400
    res = select_subsets(**kw)
    expect = {0: "no_redshift", 1: "blue_excess", 2: "low_snr", 3: "subtype", 4: "few_good_pixels",
              5: "bad_continuum"}
    for i, bit in expect.items():
        assert res.flags[i] & SELECTION_BITS[bit] and res.subset[i] == "excluded" and bit in res.reason[i]
    assert list(res.subset[6:]) == ["survey", "survey", "validation", "validation", "validation", "training"]
    assert res.flags[9] & SELECTION_BITS["label_outlier"]
    assert res.flags[10] & SELECTION_BITS["repeat_observation"]
    assert res.reason[11] == ""
    counts = res.counts()
    assert sum(counts.values()) == 12 and counts["training"] == 1
    table = format_cut_table(res.cut_table)
    assert "no redshift" in table and "label outlier" in table
    # the sequential table adds up: each row's remaining = previous remaining - removed
    for (_, _, prev), (name, removed, remaining) in zip(res.cut_table, res.cut_table[1:]):
        assert remaining == prev - removed, name


def test_split_counts_add_up_random():
    rng = np.random.default_rng(1)
    n = 2000
    kw = base(n, rng)
    kw["has_redshift"] = rng.random(n) > 0.08
    kw["blue_slope"] = rng.normal(0.5, 1.5, n)
    kw["label_index"] = np.where(rng.random(n) < 0.6, rng.integers(0, 800, n), -1)
    kw["snr_lambda"] = rng.lognormal(4.3, 0.8, n)
    res = select_subsets(**kw)
    counts = res.counts()
    assert sum(counts.values()) == n
    matched = kw["label_index"] >= 0
    passes = res.subset != "excluded"
    assert counts["survey"] == np.sum(passes & ~matched)
    assert counts["training"] + counts["validation"] == np.sum(passes & matched)
    train = res.subset == "training"
    assert np.all(kw["snr_lambda"][train] > 250)
    assert len(set(kw["label_index"][train])) == train.sum()  # unique objects


def test_outlier_rule_and_thresholds():
    rng = np.random.default_rng(2)
    kw = base(3, rng)
    kw["snr_lambda"][:] = 400
    kw["radius"][0] += 0.02  # R only
    kw["radius"][1] += 0.02
    kw["mass"][1] += 0.02   # both
    both = select_subsets(**kw)
    assert list(both.subset) == ["training", "validation", "training"]
    either = select_subsets(**kw, config=SelectionConfig(outlier_rule="either"))
    assert list(either.subset) == ["validation", "validation", "training"]
    loose = select_subsets(**kw, config=SelectionConfig(outlier_radius_rsun=0.05, outlier_mass_msun=0.05))
    assert list(loose.subset) == ["training"] * 3
    with pytest.raises(ValueError):
        SelectionConfig(outlier_rule="sometimes")


def test_subtype_number():
    out = subtype_number(np.array(["M0", "M6", "M4.5", "dM3", "K7", "", "M10x"], dtype=object))
    np.testing.assert_array_equal(out[:4], [0, 6, 4.5, 3])
    assert np.all(np.isnan(out[4:]))
