"""Sky cross-match: true pairs recovered, no false matches among nearby extra rows."""
from __future__ import annotations

import numpy as np
import pytest

from lamost_mdwarf.crossmatch import crossmatch_positions


def test_recovers_pairs_and_rejects_neighbours():
    rng = np.random.default_rng(4)
    n = 500
    ra = rng.uniform(0, 360, n)
    dec = np.degrees(np.arcsin(rng.uniform(-0.5, 0.9, n)))
    true_rows = rng.permutation(n)
    cat_ra = np.empty(n)
    cat_dec = np.empty(n)
    offset = rng.uniform(0.05, 1.5, n) / 3600  # deg
    angle = rng.uniform(0, 2 * np.pi, n)
    cat_ra[true_rows] = ra + offset * np.cos(angle) / np.cos(np.radians(dec))
    cat_dec[true_rows] = dec + offset * np.sin(angle)
    # Extra catalog rows 4-20 arcsec from observed stars, and unrelated rows.
    near_sep = rng.uniform(4, 20, n) / 3600
    extra_ra = np.concatenate([ra + near_sep / np.cos(np.radians(dec)), rng.uniform(0, 360, 300)])
    extra_dec = np.concatenate([dec, rng.uniform(-20, 60, 300)])
    match = crossmatch_positions(ra, dec, np.concatenate([cat_ra, extra_ra]),
                                 np.concatenate([cat_dec, extra_dec]), radius_arcsec=3.0)
    np.testing.assert_array_equal(match.label_index, true_rows)
    assert np.all(match.separation_arcsec <= 1.5 + 1e-6)
    # Without the true rows, nothing within 3 arcsec: no false matches.
    none = crossmatch_positions(ra, dec, extra_ra, extra_dec, radius_arcsec=3.0)
    assert not none.matched.any() and np.all(np.isnan(none.separation_arcsec))


def test_repeats_share_a_row_and_nan_positions_never_match():
    ra = np.array([10.0, 10.0 + 0.3 / 3600, np.nan, 50.0])
    dec = np.array([20.0, 20.0, 20.0, -5.0])
    match = crossmatch_positions(ra, dec, np.array([10.0, 50.0 + 5 / 3600]), np.array([20.0, -5.0]))
    np.testing.assert_array_equal(match.label_index, [0, 0, -1, -1])
    assert crossmatch_positions(ra, dec, np.array([50.0]), np.array([-5.0]), radius_arcsec=6).label_index[3] == 0
    with pytest.raises(ValueError, match="positive"):
        crossmatch_positions(ra, dec, ra, dec, radius_arcsec=0)
    with pytest.raises(ValueError, match="finite"):
        crossmatch_positions(ra, dec, ra, dec)
