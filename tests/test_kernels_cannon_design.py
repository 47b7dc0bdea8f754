"""The quadratic label vectorizer: term order (paper Eq. 5), scaling, derivatives."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lamost_mdwarf.kernels.cannon_design import (
    DEFAULT_LABEL_NAMES,
    compute_label_scaling,
    design_jacobian,
    design_matrix,
    design_second_derivatives,
    n_labels_from_terms,
    n_quadratic_terms,
    quadratic_term_names,
    scale_labels,
    unscale_labels,
)


def brute_force_design(x):
    """Design vector written out term by term in the documented order."""
    k = len(x)
    terms = [1.0] + list(x)
    terms += [x[i] * x[j] for i in range(k) for j in range(i + 1, k)]
    terms += [x[i] ** 2 for i in range(k)]
    return np.array(terms)


def test_number_of_terms():
    assert [n_quadratic_terms(k) for k in range(1, 6)] == [3, 6, 10, 15, 21]
    for k in range(1, 8):
        assert n_labels_from_terms(n_quadratic_terms(k)) == k
    with pytest.raises(ValueError):
        n_labels_from_terms(14)
    with pytest.raises(ValueError):
        n_quadratic_terms(0)


def test_paper_eq5_for_four_labels():
    teff, r, m, lum = 0.3, -1.2, 0.7, 2.5
    expected = [1, teff, r, m, lum, teff * r, teff * m, teff * lum, r * m, r * lum, m * lum,
                teff**2, r**2, m**2, lum**2]
    np.testing.assert_allclose(design_matrix(np.array([teff, r, m, lum])), expected, rtol=0, atol=1e-15)
    assert quadratic_term_names() == [
        "1", "teff", "radius", "mass", "luminosity",
        "teff*radius", "teff*mass", "teff*luminosity", "radius*mass", "radius*luminosity", "mass*luminosity",
        "teff^2", "radius^2", "mass^2", "luminosity^2",
    ]
    assert len(DEFAULT_LABEL_NAMES) == 4


@pytest.mark.parametrize("n_labels", [1, 2, 4, 5])
def test_design_matrix_matches_brute_force_for_any_shape(n_labels):
    rng = np.random.default_rng(n_labels)
    x = rng.normal(size=(3, 7, n_labels))
    design = design_matrix(x)
    assert design.shape == (3, 7, n_quadratic_terms(n_labels))
    for i in range(3):
        for j in range(7):
            np.testing.assert_allclose(design[i, j], brute_force_design(x[i, j]), rtol=1e-14)


def test_term_names_with_metallicity():
    names = quadratic_term_names(["teff", "radius", "mass", "luminosity", "feh"])
    assert len(names) == 21
    assert names[6:16] == [
        "teff*radius", "teff*mass", "teff*luminosity", "teff*feh", "radius*mass",
        "radius*luminosity", "radius*feh", "mass*luminosity", "mass*feh", "luminosity*feh",
    ]
    assert names[-1] == "feh^2"
    with pytest.raises(ValueError):
        quadratic_term_names(["teff", "teff"])


@pytest.mark.parametrize("n_labels", [1, 3, 4, 5])
def test_jacobian_and_second_derivatives_against_finite_differences(n_labels):
    rng = np.random.default_rng(10 + n_labels)
    x = rng.normal(size=(6, n_labels))
    h = 1e-5
    jac = design_jacobian(x)
    second = design_second_derivatives(n_labels)
    assert jac.shape == (6, n_quadratic_terms(n_labels), n_labels)
    assert second.shape == (n_quadratic_terms(n_labels), n_labels, n_labels)
    for k in range(n_labels):
        step = np.zeros(n_labels)
        step[k] = h
        numeric = (design_matrix(x + step) - design_matrix(x - step)) / (2 * h)
        np.testing.assert_allclose(jac[..., k], numeric, atol=1e-9)
        numeric2 = (design_jacobian(x + step) - design_jacobian(x - step)) / (2 * h)
        np.testing.assert_allclose(np.broadcast_to(second[:, :, k], numeric2.shape), numeric2, atol=1e-8)
    np.testing.assert_array_equal(second, np.swapaxes(second, 1, 2))


def test_label_scaling_defaults_are_median_and_central95():
    rng = np.random.default_rng(3)
    labels = np.column_stack([rng.normal(3500, 250, 500), rng.normal(0.4, 0.1, 500)])
    labels_before = labels.copy()
    scaling = compute_label_scaling(labels)
    np.testing.assert_allclose(scaling.pivots, np.median(labels, axis=0))
    p2, p97 = np.percentile(labels, [2.5, 97.5], axis=0)
    np.testing.assert_allclose(scaling.scales, (p97 - p2) / 4)
    assert (scaling.pivot_method, scaling.scale_method) == ("median", "central95")
    # For Gaussian labels central95 / 4 is close to the standard deviation.
    np.testing.assert_allclose(scaling.scales, [250, 0.1], rtol=0.1)
    std_scaling = compute_label_scaling(labels, pivot="mean", scale="std")
    np.testing.assert_allclose(std_scaling.pivots, labels.mean(axis=0))
    np.testing.assert_allclose(std_scaling.scales, labels.std(axis=0, ddof=1))
    np.testing.assert_array_equal(labels, labels_before)


def test_label_scaling_rejects_bad_input():
    good = np.array([[1.0, 2.0], [2.0, 3.0], [3.0, 5.0]])
    with pytest.raises(ValueError, match="no spread"):
        compute_label_scaling(np.column_stack([good[:, 0], np.ones(3)]))
    with pytest.raises(ValueError, match="finite"):
        compute_label_scaling(np.where(good > 4, np.nan, good))
    with pytest.raises(ValueError):
        compute_label_scaling(good[:, 0])
    with pytest.raises(ValueError):
        compute_label_scaling(good, pivot="mode")
    with pytest.raises(ValueError):
        compute_label_scaling(good, scale="mad")
    with pytest.raises(ValueError):
        scale_labels(good, np.zeros(2), np.array([1.0, 0.0]))
    with pytest.raises(ValueError):
        scale_labels(good, np.zeros(3), np.ones(3))


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(-1e4, 1e4), min_size=3, max_size=3),
    st.lists(st.floats(1e-3, 1e3), min_size=3, max_size=3),
)
def test_scale_unscale_roundtrip(pivots, scales):
    rng = np.random.default_rng(0)
    labels = np.asarray(pivots) + np.asarray(scales) * rng.normal(size=(5, 3))
    scaled = scale_labels(labels, pivots, scales)
    np.testing.assert_allclose(unscale_labels(scaled, pivots, scales), labels, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(scale_labels(np.asarray(pivots), pivots, scales), 0.0, atol=1e-12)
