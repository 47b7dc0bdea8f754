"""Quadratic label vectorizer of The Cannon: label scaling, design vector and its derivatives.

Pure numpy; no dask, xarray or I/O.

Method
------
Labels are first scaled, per label ``k``, to

    x_k = (label_k - pivot_k) / scale_k

with ``pivot`` and ``scale`` computed once from the *training* labels (see
:func:`compute_label_scaling`) and stored with the model, so that every polynomial term
is of order unity and the design matrix is well conditioned.

For ``K`` scaled labels the design ("label") vector has ``T = 1 + 2K + K(K-1)/2`` terms,
ordered as in Galgano et al. (2020), Eq. 5:

    [1, x_1 .. x_K, x_i x_j (i < j, row-major: (1,2), (1,3), .., (K-1,K)), x_1^2 .. x_K^2]

For ``K = 4`` labels (Teff, R, M, L) that is exactly the paper's 15 terms
``[1, T, R, M, L, TR, TM, TL, RM, RL, ML, T^2, R^2, M^2, L^2]``.

Every term is a product ``x_a x_b`` of two entries of the extended vector
``[x_1, .., x_K, 1]`` (index ``K`` stands for the constant 1), which gives the design
matrix, its Jacobian (linear in ``x``) and its second derivatives (constant) in closed
form.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np

__all__ = [
    "DEFAULT_LABEL_NAMES",
    "LabelScaling",
    "compute_label_scaling",
    "design_jacobian",
    "design_matrix",
    "design_second_derivatives",
    "n_quadratic_terms",
    "n_labels_from_terms",
    "quadratic_term_names",
    "quadratic_term_pairs",
    "scale_labels",
    "unscale_labels",
]

#: Canonical label names of the paper's model (units K, Rsun, Msun, Lsun).
DEFAULT_LABEL_NAMES: tuple[str, ...] = ("teff", "radius", "mass", "luminosity")


class LabelScaling(NamedTuple):
    """Affine label scaling ``x = (label - pivots) / scales``, stored with a trained model.

    Attributes
    ----------
    pivots : numpy.ndarray
        Shape (K,), physical label units (e.g. K, Rsun, Msun, Lsun).
    scales : numpy.ndarray
        Shape (K,), physical label units, all finite and > 0.
    pivot_method : str
        How ``pivots`` were computed (``"median"`` or ``"mean"``), for provenance.
    scale_method : str
        How ``scales`` were computed (``"central95"`` or ``"std"``), for provenance.
    """

    pivots: np.ndarray
    scales: np.ndarray
    pivot_method: str
    scale_method: str


def n_quadratic_terms(n_labels: int) -> int:
    """Number of terms of the quadratic design vector for ``n_labels`` labels.

    Parameters
    ----------
    n_labels : int
        Number of labels K (>= 1).

    Returns
    -------
    int
        ``1 + 2K + K(K-1)/2`` (15 for K = 4).
    """
    _check_n_labels(n_labels)
    return 1 + 2 * n_labels + n_labels * (n_labels - 1) // 2


def n_labels_from_terms(n_terms: int) -> int:
    """Inverse of :func:`n_quadratic_terms`.

    Parameters
    ----------
    n_terms : int
        Number of design terms T.

    Returns
    -------
    int
        The number of labels K with ``n_quadratic_terms(K) == n_terms``.

    Raises
    ------
    ValueError
        If no K gives ``n_terms`` terms.
    """
    n_labels = 1
    while n_quadratic_terms(n_labels) < n_terms:
        n_labels += 1
    if n_quadratic_terms(n_labels) != n_terms:
        raise ValueError(
            f"{n_terms} is not the number of terms of a quadratic model in K labels (3, 6, 10, 15, 21, ...)"
        )
    return n_labels


def quadratic_term_pairs(n_labels: int) -> np.ndarray:
    """Index pairs ``(a, b)`` such that term ``t`` equals ``x_ext[a] * x_ext[b]``.

    ``x_ext = [x_1, .., x_K, 1]``: index ``K`` is the constant 1.

    Parameters
    ----------
    n_labels : int
        Number of labels K (>= 1).

    Returns
    -------
    numpy.ndarray
        Integer array of shape (T, 2), in the order of the module docstring.
    """
    _check_n_labels(n_labels)
    one = n_labels
    pairs = [(one, one)]
    pairs += [(i, one) for i in range(n_labels)]
    pairs += [(i, j) for i in range(n_labels) for j in range(i + 1, n_labels)]
    pairs += [(i, i) for i in range(n_labels)]
    return np.asarray(pairs, dtype=np.intp)


def quadratic_term_names(label_names: Sequence[str] = DEFAULT_LABEL_NAMES) -> list[str]:
    """Human-readable names of the design terms, for provenance.

    Parameters
    ----------
    label_names : sequence of str
        Names of the K labels, in model order.

    Returns
    -------
    list of str
        T names, e.g. ``["1", "teff", .., "teff*radius", .., "teff^2", ..]``.
    """
    names = [str(name) for name in label_names]
    if len(set(names)) != len(names):
        raise ValueError(f"label names must be unique, got {names}")
    out = []
    for a, b in quadratic_term_pairs(len(names)):
        if a == len(names):
            out.append("1")
        elif b == len(names):
            out.append(names[a])
        elif a == b:
            out.append(f"{names[a]}^2")
        else:
            out.append(f"{names[a]}*{names[b]}")
    return out


def compute_label_scaling(
    training_labels: np.ndarray,
    pivot: Literal["median", "mean"] = "median",
    scale: Literal["central95", "std"] = "central95",
) -> LabelScaling:
    """Pivots and scales of the training labels.

    Parameters
    ----------
    training_labels : numpy.ndarray
        Shape (N, K), physical units (K, Rsun, Msun, Lsun, dex, ...); all finite.
    pivot : {"median", "mean"}
        Pivot of each label: its median (default, robust) or mean.
    scale : {"central95", "std"}
        Scale of each label: ``(percentile 97.5 - percentile 2.5) / 4`` (default; equals
        the standard deviation for a Gaussian but ignores outliers; the choice of
        Ho et al.'s TheCannon) or the sample standard deviation.

    Returns
    -------
    LabelScaling
        Pivots and scales, shape (K,), in the labels' physical units.

    Raises
    ------
    ValueError
        On a bad shape, non-finite labels, fewer than 2 stars, an unknown method, or a
        label with zero spread (its scale would be 0).
    """
    labels = np.asarray(training_labels, dtype=np.float64)
    if labels.ndim != 2 or labels.shape[0] < 2 or labels.shape[1] < 1:
        raise ValueError(f"training_labels must have shape (N >= 2, K >= 1), got {labels.shape}")
    if not np.all(np.isfinite(labels)):
        raise ValueError("training_labels must all be finite")
    if pivot == "median":
        pivots = np.median(labels, axis=0)
    elif pivot == "mean":
        pivots = labels.mean(axis=0)
    else:
        raise ValueError(f"pivot must be 'median' or 'mean', got {pivot!r}")
    if scale == "central95":
        low, high = np.percentile(labels, [2.5, 97.5], axis=0)
        scales = (high - low) / 4.0
    elif scale == "std":
        scales = labels.std(axis=0, ddof=1)
    else:
        raise ValueError(f"scale must be 'central95' or 'std', got {scale!r}")
    if not np.all(scales > 0):
        bad = np.flatnonzero(~(scales > 0)).tolist()
        raise ValueError(f"labels {bad} have no spread in the training set; their scale would be 0")
    return LabelScaling(pivots=pivots, scales=scales, pivot_method=pivot, scale_method=scale)


def scale_labels(labels: np.ndarray, pivots: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Physical labels to scaled labels, ``(labels - pivots) / scales``.

    Parameters
    ----------
    labels : numpy.ndarray
        Shape (..., K), physical units.
    pivots, scales : numpy.ndarray
        Shape (K,), physical units; ``scales > 0``.

    Returns
    -------
    numpy.ndarray
        Scaled (dimensionless) labels, float64, shape (..., K).
    """
    labels, pivots, scales = _check_scaling_args(labels, pivots, scales)
    return (labels - pivots) / scales


def unscale_labels(scaled_labels: np.ndarray, pivots: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Scaled labels back to physical labels, ``pivots + scales * scaled_labels``.

    Parameters
    ----------
    scaled_labels : numpy.ndarray
        Shape (..., K), dimensionless.
    pivots, scales : numpy.ndarray
        Shape (K,), physical units; ``scales > 0``.

    Returns
    -------
    numpy.ndarray
        Physical labels, float64, shape (..., K).
    """
    scaled, pivots, scales = _check_scaling_args(scaled_labels, pivots, scales)
    return pivots + scales * scaled


def design_matrix(scaled_labels: np.ndarray) -> np.ndarray:
    """Quadratic design vectors of scaled labels.

    Parameters
    ----------
    scaled_labels : numpy.ndarray
        Shape (..., K), dimensionless scaled labels.

    Returns
    -------
    numpy.ndarray
        Shape (..., T), float64; term order of the module docstring. For one star per
        row ``(N, K) -> (N, T)``.
    """
    x_ext, pairs = _extended(scaled_labels)
    return x_ext[..., pairs[:, 0]] * x_ext[..., pairs[:, 1]]


def design_jacobian(scaled_labels: np.ndarray) -> np.ndarray:
    """Derivatives of the design vector with respect to the scaled labels.

    Parameters
    ----------
    scaled_labels : numpy.ndarray
        Shape (..., K), dimensionless scaled labels.

    Returns
    -------
    numpy.ndarray
        ``J[..., t, k] = d A_t / d x_k``, shape (..., T, K), float64. Divide by
        ``scales[k]`` for derivatives with respect to physical labels.
    """
    x_ext, pairs = _extended(scaled_labels)
    n_labels = x_ext.shape[-1] - 1
    left = _one_hot(pairs[:, 0], n_labels)  # (T, K): [a_t == k]
    right = _one_hot(pairs[:, 1], n_labels)
    return left * x_ext[..., pairs[:, 1], None] + right * x_ext[..., pairs[:, 0], None]


def design_second_derivatives(n_labels: int) -> np.ndarray:
    """Second derivatives of the design vector with respect to the scaled labels.

    The design vector is quadratic, so they do not depend on the labels.

    Parameters
    ----------
    n_labels : int
        Number of labels K (>= 1).

    Returns
    -------
    numpy.ndarray
        ``D[t, k, m] = d^2 A_t / (d x_k d x_m)``, shape (T, K, K), float64 (entries 0, 1
        or 2).
    """
    pairs = quadratic_term_pairs(n_labels)
    left = _one_hot(pairs[:, 0], n_labels)
    right = _one_hot(pairs[:, 1], n_labels)
    return left[:, :, None] * right[:, None, :] + right[:, :, None] * left[:, None, :]


def _check_n_labels(n_labels: int) -> None:
    if isinstance(n_labels, bool) or not isinstance(n_labels, (int, np.integer)) or n_labels < 1:
        raise ValueError(f"the number of labels must be an integer >= 1, got {n_labels!r}")


def _extended(scaled_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(scaled_labels, dtype=np.float64)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"scaled_labels must have shape (..., K >= 1), got {x.shape}")
    pairs = quadratic_term_pairs(x.shape[-1])
    x_ext = np.concatenate([x, np.ones(x.shape[:-1] + (1,))], axis=-1)
    return x_ext, pairs


def _one_hot(indices: np.ndarray, n_labels: int) -> np.ndarray:
    return (indices[:, None] == np.arange(n_labels)[None, :]).astype(np.float64)


def _check_scaling_args(labels, pivots, scales) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    labels = np.asarray(labels, dtype=np.float64)
    pivots = np.asarray(pivots, dtype=np.float64)
    scales = np.asarray(scales, dtype=np.float64)
    if pivots.ndim != 1 or scales.shape != pivots.shape:
        raise ValueError(f"pivots and scales must both have shape (K,), got {pivots.shape} and {scales.shape}")
    if labels.ndim < 1 or labels.shape[-1] != pivots.shape[0]:
        raise ValueError(f"labels must have shape (..., {pivots.shape[0]}), got {labels.shape}")
    if not (np.all(np.isfinite(pivots)) and np.all(np.isfinite(scales)) and np.all(scales > 0)):
        raise ValueError("pivots must be finite and scales finite and > 0")
    return labels, pivots, scales
