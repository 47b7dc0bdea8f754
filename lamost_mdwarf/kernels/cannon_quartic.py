"""Chi2 of the Cannon test step as a polynomial of degree 4 in the scaled labels (pure numpy).

Pure numpy; no dask, xarray or I/O.

Method
------
With the trained ``theta_p`` and the label-independent weights ``w_np`` fixed, the chi2
of star ``n`` (:mod:`lamost_mdwarf.kernels.cannon_infer`) is

    chi2_n(x) = c_n - 2 A'(x) . b_n + A'(x)^T Q_n A'(x)

with the centred quadratic design vector ``A'(x)`` (all terms of degree 1 and 2 in the
``K`` scaled labels ``x``). Every product ``A'_t A'_u`` is a monomial of degree 2 to 4,
so chi2 is a polynomial of degree 4 in ``x``,

    chi2_n(x) = sum_m C_nm x^(e_m),

over the ``M = (K+4)! / (K! 4!)`` monomials ``x^(e_m)`` of degree <= 4 (70 for K = 4).
Several entries of ``Q`` multiply the same monomial (e.g. ``x_1 x_2 x_3`` comes from
``(x_1)(x_2 x_3)``, ``(x_2)(x_1 x_3)`` and ``(x_3)(x_1 x_2)``), so the 65 coefficients of
degree 2-4 are sums over pixels of ``w_np G_pm`` with constant per-model columns ``G_pm``
(sums of ``theta_pt theta_pu``) -- fewer columns than the 105 distinct entries of ``Q``
they replace -- and those of degree 1-2 get ``-2 b``, i.e. ``(w r) @ theta`` (14 columns).

Everything the test step needs is exact in this form: chi2 is ``C . mono(x)``; the
gradient and Hessian of ``chi2 / 2`` are linear in the per-star coefficient tensors
``D^g_nkm = 1/2 d C x^e / d x_k`` over the monomials of degree <= 3 and
``D^H_n(kl)m`` over those of degree <= 2 (gathered from ``C`` once per star), so each
evaluation costs O(K M) per point whatever the number of pixels. The monomials are
enumerated by degree (those of degree <= d come first) and evaluated as products of two
monomials of degree <= 2 (which are the design terms).

Floating point: the coefficients are sums of the same products as ``Q``, ``b``, ``c`` and
the gradient ``D^g . mono(x)`` cancels to its (small) value near an optimum as
``J^T (Q A' - b)`` does; both round off at ~1e-16 of the largest term.
"""
from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import numpy as np

from lamost_mdwarf.kernels.cannon_design import n_labels_from_terms, n_quadratic_terms, quadratic_term_pairs

__all__ = [
    "MonomialBasis",
    "chi2_quartic",
    "coefficients_from_statistics",
    "derivative_tensors",
    "extended_rows",
    "monomial_basis",
    "monomial_values",
    "pixel_columns",
]


class MonomialBasis(NamedTuple):
    """Index tables of the monomials of degree <= 4 in ``K`` labels (see the module docstring).

    Attributes
    ----------
    n_labels : int
        ``K``.
    exponents : numpy.ndarray
        (M, K) int: exponent vector ``e_m`` of every monomial, ordered by degree (then
        lexicographically), so the monomials of degree <= d are the first ``counts[d]``.
    counts : tuple of int
        ``counts[d]`` = number of monomials of degree <= d, d = 0..4 (1, 5, 15, 35, 70
        for K = 4).
    pair_left, pair_right : numpy.ndarray
        (counts[2],): monomial m of degree <= 2 is ``x_ext[pair_left] * x_ext[pair_right]``
        with ``x_ext = [x_1 .. x_K, 1]``.
    half_left, half_right : numpy.ndarray
        (M,): monomial m is the product of the degree <= 2 monomials ``half_left[m]``
        and ``half_right[m]``.
    design_monomial : numpy.ndarray
        (T,): the monomial equal to each design term (order of
        :func:`~lamost_mdwarf.kernels.cannon_design.quadratic_term_pairs`).
    product_monomial : numpy.ndarray
        (T, T): the monomial equal to ``A_t A_u``.
    gradient_source, gradient_factor : numpy.ndarray
        (K, counts[3]): ``D^g_km = gradient_factor * C[gradient_source]`` (index M = 0).
    hessian_source, hessian_factor : numpy.ndarray
        (K(K+1)/2, counts[2]): the same for ``D^H``; row ``r`` is the entry
        ``hessian_pairs[r]`` (k <= l).
    hessian_pairs : numpy.ndarray
        (K(K+1)/2, 2) int.
    hessian_row : numpy.ndarray
        (K, K) int: the row of entry (k, l) (symmetric).
    """

    n_labels: int
    exponents: np.ndarray
    counts: tuple
    pair_left: np.ndarray
    pair_right: np.ndarray
    half_left: np.ndarray
    half_right: np.ndarray
    design_monomial: np.ndarray
    product_monomial: np.ndarray
    gradient_source: np.ndarray
    gradient_factor: np.ndarray
    hessian_source: np.ndarray
    hessian_factor: np.ndarray
    hessian_pairs: np.ndarray
    hessian_row: np.ndarray


@functools.lru_cache(maxsize=8)
def monomial_basis(n_labels: int) -> MonomialBasis:
    """The (cached, read-only) monomial tables for ``n_labels`` labels.

    Parameters
    ----------
    n_labels : int
        Number of labels K (>= 1).

    Returns
    -------
    MonomialBasis
    """
    pairs = quadratic_term_pairs(n_labels)  # (checks n_labels)
    n_labels = int(n_labels)
    one = n_labels  # index of the constant in x_ext
    factors = []  # (4,) sorted x_ext indices, the constant last
    counts = []
    for degree in range(5):
        for combo in itertools.combinations_with_replacement(range(n_labels), degree):
            factors.append(combo + (one,) * (4 - degree))
        counts.append(len(factors))
    factors = np.asarray(factors, dtype=np.intp)
    n_monomials = factors.shape[0]
    exponents = np.zeros((n_monomials, n_labels), dtype=np.intp)
    for m, row in enumerate(factors):
        for f in row:
            if f != one:
                exponents[m, f] += 1
    index = {tuple(e): m for m, e in enumerate(exponents)}

    def monomial_of(exponent) -> int:
        return index[tuple(int(v) for v in exponent)]

    n2 = counts[2]
    pair_left, pair_right = factors[:n2, 0].copy(), factors[:n2, 1].copy()
    half_left = np.array([monomial_of(_exponent(row[:2], n_labels)) for row in factors], dtype=np.intp)
    half_right = np.array([monomial_of(_exponent(row[2:], n_labels)) for row in factors], dtype=np.intp)

    design_exponents = np.array([_exponent(p, n_labels) for p in pairs])
    design_monomial = np.array([monomial_of(e) for e in design_exponents], dtype=np.intp)
    n_terms = pairs.shape[0]
    product_monomial = np.array(
        [[monomial_of(design_exponents[t] + design_exponents[u]) for u in range(n_terms)] for t in range(n_terms)],
        dtype=np.intp,
    )

    n3 = counts[3]
    gradient_source = np.full((n_labels, n3), n_monomials, dtype=np.intp)
    gradient_factor = np.zeros((n_labels, n3))
    for k in range(n_labels):
        for m in range(n3):
            target = exponents[m].copy()
            target[k] += 1
            gradient_source[k, m] = monomial_of(target)
            gradient_factor[k, m] = 0.5 * target[k]
    hessian_pairs = np.array([(k, l) for k in range(n_labels) for l in range(k, n_labels)], dtype=np.intp)
    hessian_row = np.zeros((n_labels, n_labels), dtype=np.intp)
    hessian_source = np.full((hessian_pairs.shape[0], n2), n_monomials, dtype=np.intp)
    hessian_factor = np.zeros((hessian_pairs.shape[0], n2))
    for r, (k, l) in enumerate(hessian_pairs):
        hessian_row[k, l] = hessian_row[l, k] = r
        for m in range(n2):
            target = exponents[m].copy()
            target[k] += 1
            first = target[k]
            target[l] += 1
            hessian_source[r, m] = monomial_of(target)
            hessian_factor[r, m] = 0.5 * first * target[l]
    tables = MonomialBasis(
        n_labels, exponents, tuple(counts), pair_left, pair_right, half_left, half_right, design_monomial,
        product_monomial, gradient_source, gradient_factor, hessian_source, hessian_factor, hessian_pairs,
        hessian_row,
    )
    for value in tables:
        if isinstance(value, np.ndarray):
            value.setflags(write=False)
    if n_quadratic_terms(n_labels) != counts[2]:  # the design terms are the monomials of degree <= 2
        raise AssertionError("monomial count mismatch")
    return tables


def _exponent(x_ext_indices, n_labels: int) -> np.ndarray:
    exponent = np.zeros(n_labels, dtype=np.intp)
    for f in x_ext_indices:
        if f != n_labels:
            exponent[f] += 1
    return exponent


def extended_rows(rows: np.ndarray, last: float) -> np.ndarray:
    """``rows`` (K, B) with a row of ``last`` appended: (K + 1, B), C-ordered.

    ``x_ext`` of B points (``last = 1``, the constant of the design terms) or the
    derivative of ``x_ext`` along steps (``last = 0``).
    """
    n_rows, n_points = rows.shape
    out = np.empty((n_rows + 1, n_points))
    out[:n_rows] = rows
    out[n_rows] = last
    return out


def monomial_values(x: np.ndarray, basis: MonomialBasis, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The monomials of degree <= 2 and the first ``count`` monomials at B points.

    Parameters
    ----------
    x : numpy.ndarray
        Scaled labels, shape (B, K), dimensionless.
    basis : MonomialBasis
    count : int
        How many monomials (``counts[3]`` for those of degree <= 3, ``counts[4]`` for all).

    Returns
    -------
    low : numpy.ndarray
        (B, counts[2]), C-ordered: the monomials of degree <= 2 (the design terms, in
        monomial order).
    values : numpy.ndarray
        (B, count), C-ordered.

    Notes
    -----
    Built with the monomial index on the first axis (row gathers are memory copies;
    gathers along the last axis copy element by element, several times slower), then
    transposed. Every value is a product of the same factors in the same order, whatever
    the number of points.
    """
    x_ext = extended_rows(x.T, 1.0)
    low = np.take(x_ext, basis.pair_left, axis=0) * np.take(x_ext, basis.pair_right, axis=0)
    values = np.take(low, basis.half_left[:count], axis=0) * np.take(low, basis.half_right[:count], axis=0)
    return np.ascontiguousarray(low.T), np.ascontiguousarray(values.T)


def chi2_quartic(coefficients: np.ndarray, x: np.ndarray) -> np.ndarray:
    """chi2 of B points, each with its own coefficients.

    Parameters
    ----------
    coefficients : numpy.ndarray
        (B, M) monomial coefficients of chi2 (dimensionless for normalized spectra).
    x : numpy.ndarray
        (B, K) scaled labels.

    Returns
    -------
    numpy.ndarray
        (B,) chi2.
    """
    basis = monomial_basis(x.shape[1])
    _, values = monomial_values(x, basis, basis.counts[4])
    return (coefficients[:, None, :] @ values[:, :, None])[:, 0, 0]


def coefficients_from_statistics(quadratic: np.ndarray, linear: np.ndarray, constant: np.ndarray) -> np.ndarray:
    """Monomial coefficients of chi2 from the sufficient statistics ``Q``, ``b``, ``c``.

    Parameters
    ----------
    quadratic : numpy.ndarray
        (N, T, T) ``Q`` (row and column 0, the constant term, are not used).
    linear : numpy.ndarray
        (N, T) ``b`` (entry 0 not used).
    constant : numpy.ndarray
        (N,) ``c``.

    Returns
    -------
    numpy.ndarray
        (N, M) coefficients, ``chi2(x) = sum_m C_m x^(e_m)``.
    """
    n_terms = linear.shape[1]
    basis = monomial_basis(n_labels_from_terms(n_terms))
    quadratic_map, linear_map = _statistics_maps(basis.n_labels)
    n_stars = linear.shape[0]
    # One small product per star (a product of the whole chunk would let BLAS choose its
    # kernel by the number of stars, and a star's round-off depend on its chunk).
    flat = np.reshape(quadratic, (n_stars, 1, n_terms * n_terms))
    coefficients = (flat @ quadratic_map)[:, 0, :] + (linear[:, None, :] @ linear_map)[:, 0, :]
    coefficients[:, 0] += constant
    return coefficients


@functools.lru_cache(maxsize=8)
def _statistics_maps(n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """(T*T, M) and (T, M) 0/1/-2 matrices: ``Q`` entries and ``b`` to coefficients."""
    basis = monomial_basis(n_labels)
    n_terms = basis.design_monomial.size
    n_monomials = basis.exponents.shape[0]
    quadratic_map = np.zeros((n_terms * n_terms, n_monomials))
    for t in range(1, n_terms):
        for u in range(1, n_terms):
            quadratic_map[t * n_terms + u, basis.product_monomial[t, u]] += 1.0
    linear_map = np.zeros((n_terms, n_monomials))
    linear_map[np.arange(1, n_terms), basis.design_monomial[1:]] = -2.0
    return quadratic_map, linear_map


def pixel_columns(theta: np.ndarray, basis: MonomialBasis) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel constants of the direct computation of the coefficients.

    Parameters
    ----------
    theta : numpy.ndarray
        (P, T) trained coefficients (finite).
    basis : MonomialBasis

    Returns
    -------
    quadratic_columns : numpy.ndarray
        (P, M - counts[1]): ``G_pm = sum_{t,u >= 1: A_t A_u = x^(e_m)} theta_pt theta_pu``
        for the monomials of degree 2-4, so that their coefficients are ``w @ G``.
    linear_columns : numpy.ndarray
        (P, counts[2] - 1): ``theta_pt`` for the design terms t >= 1, in monomial order
        (degree 1 and 2), so that ``-2 b`` in monomial order is ``-2 (w r) @ columns``.
    """
    n_terms = theta.shape[1]
    first = basis.counts[1]
    rows, cols = np.triu_indices(n_terms - 1)
    rows, cols = rows + 1, cols + 1
    target = basis.product_monomial[rows, cols] - first
    weight = np.where(rows == cols, 1.0, 2.0)
    mapping = np.zeros((rows.size, basis.exponents.shape[0] - first))
    np.add.at(mapping, (np.arange(rows.size), target), weight)
    quadratic_columns = (theta[:, rows] * theta[:, cols]) @ mapping
    linear_columns = np.zeros((theta.shape[0], basis.counts[2] - 1))
    linear_columns[:, basis.design_monomial[1:] - 1] = theta[:, 1:]
    return np.ascontiguousarray(quadratic_columns), linear_columns


def derivative_tensors(coefficients: np.ndarray, basis: MonomialBasis,
                       workspace=None) -> tuple[np.ndarray, np.ndarray]:
    """Gradient and Hessian coefficient tensors of ``chi2 / 2`` (see the module docstring).

    Parameters
    ----------
    coefficients : numpy.ndarray
        (N, M) monomial coefficients of chi2.
    basis : MonomialBasis
    workspace : callable, optional
        ``workspace(name, shape)`` -> an uninitialised float64 array of that shape, for
        the work and output arrays (e.g. per-thread buffers reused from call to call);
        new arrays by default.

    Returns
    -------
    gradient : numpy.ndarray
        (N, K, counts[3]): ``g_k(x) = gradient[:, k] . mono_3(x)``.
    hessian : numpy.ndarray
        (N, K(K+1)/2, counts[2]): ``H_kl(x) = hessian[:, r(k, l)] . mono_2(x)``.
    """
    empty = workspace if workspace is not None else (lambda name, shape: np.empty(shape))
    n_stars, n_monomials = coefficients.shape
    # Row gathers of the transposed coefficients (memory copies), then back to one row per star.
    padded = empty("padded", (n_monomials + 1, n_stars))
    padded[:-1] = coefficients.T
    padded[-1] = 0.0
    tensors = []
    for name, source, factor in (
        ("gradient", basis.gradient_source, basis.gradient_factor),
        ("hessian", basis.hessian_source, basis.hessian_factor),
    ):
        gathered = empty(name + "_t", source.shape + (n_stars,))
        np.take(padded, source, axis=0, out=gathered)
        gathered *= factor[:, :, None]
        tensor = empty(name, (n_stars,) + source.shape)
        tensor[...] = gathered.transpose(2, 0, 1)
        tensors.append(tensor)
    return tensors[0], tensors[1]
