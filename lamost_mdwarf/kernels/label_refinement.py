"""Label-noise-aware training: latent training labels anchored to a noisy catalog (pure numpy).

No dask, xarray or I/O. The orchestration (folds as parallel tasks) is in
:mod:`lamost_mdwarf.training`.

Why
---
The paper trains on catalog labels. In a TESS-Cool-Dwarf-like catalog, Teff has errors of
100-160 K and R, M, L are computed from that Teff through the Mann et al. (2015) relations,
so (a) every training label carries the catalog's Teff error (the Cannon learns a
blurred, scale-distorted spectrum-label relation), and (b) the four labels are collinear:
R, M and L of single stars are functions of Teff, and the directions of the 15-term
design that are not functions of Teff are fitted to noise. A third effect, measured on
simulated surveys, is that spectra vary with quantities that are not labels ([Fe/H],
gravity at fixed Teff); a Cannon without such a label attributes that variation to Teff
(-160 K per dex of [Fe/H] with true training labels).

Method
------
The model's labels are Teff and ``n_latent`` latent labels (dimensionless, no catalog
value). The training labels are latent variables, estimated jointly with the model:

1. Start from the catalog Teff.
2. Out-of-fold spectroscopic labels: split the training stars into ``k`` folds; for each
   fold train on the others and infer the fold's labels (robust test step), so that no
   star's label estimate has seen its own noisy catalog label.
3. Anchor to the catalog (the guard against scale drift, which self-training alone
   cannot see: any smooth relabelling is self-consistent): regress the catalog Teff on a
   quadratic polynomial of the out-of-fold labels (Teff and latent ones),
   ``E[Teff_cat | spectrum]``. The catalog errors are independent of the spectra, so this
   regression is unbiased for the true Teff up to regression dilution: its slope against
   the true Teff is ``lambda = 1 - sigma_s^2 / var(prediction)``, with ``sigma_s^2`` the
   spectroscopic error variance estimated as ``var(residual) - mean(e_Teff^2)`` (the catalog
   errors removed in quadrature). The prediction is expanded about its mean by
   ``1 / lambda`` (:func:`fit_catalog_anchor`). Regressing on the latent labels as well
   removes any mixing of [Fe/H]-like variation into Teff that the previous iteration left.
4. Latent labels: at the first iteration, the leading principal components of the
   weighted residual spectra of the Teff-only model (:func:`residual_components`);
   afterwards their out-of-fold estimates. They are made uncorrelated with Teff
   (quadratic trend removed) and whitened (:func:`standardize_latent`), fixing their
   arbitrary scale.
5. New training labels = ``damping`` x previous + (1 - damping) x new (damps the
   iteration-to-iteration noise of out-of-fold estimates); back to 2.

R, M and L are then *derived* labels: quadratic regressions of the catalog R, M, L on the
model labels (:func:`fit_derived_label`), unbiased for the same reason as step 3. Their
uncertainty combines the propagated Teff/latent uncertainty with the part of the
catalog's stated error that its Teff error does not explain (the relations' intrinsic
scatter), as a fraction of the label.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from lamost_mdwarf.kernels.cannon_design import compute_label_scaling, design_matrix, scale_labels
from lamost_mdwarf.kernels.cannon_infer import DEFAULT_MASKED_IVAR_THRESHOLD
from lamost_mdwarf.kernels.cannon_train import train_pixels
from lamost_mdwarf.kernels.robust import DEFAULT_CLIP_SIGMA, robust_infer_labels

__all__ = [
    "AnchorDiagnostics",
    "FoldResult",
    "PolynomialCalibration",
    "anchor_coefficient_covariance",
    "apply_calibration",
    "calibration_gradient",
    "calibration_leverage",
    "calibration_variance",
    "combine_iterations",
    "derived_coefficient_covariance",
    "derived_label_uncertainty",
    "fit_catalog_anchor",
    "fit_derived_label",
    "fit_polynomial_calibration",
    "fold_assignments",
    "fold_out_of_sample",
    "label_starting_points",
    "quadratic_features",
    "residual_components",
    "standardize_latent",
]


class PolynomialCalibration(NamedTuple):
    """``y = c . phi(u)``, ``u = (x - center) / scale``; ``phi`` = 1, u_i, u_i u_j (i <= j), u_1^3 .. u_1^degree.

    Attributes
    ----------
    center, scale : numpy.ndarray
        Shape (K,), units of the input labels (e.g. K for Teff, 1 for latent labels).
    coefficients : numpy.ndarray
        Shape (1 + K + K(K+1)/2 + max(degree - 2, 0),), units of the output.
    degree : int
        Highest power of the first input (>= 2; the others enter to second order).
    """

    center: np.ndarray
    scale: np.ndarray
    coefficients: np.ndarray
    degree: int = 2

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (stored in the model settings)."""
        return {"center": [float(v) for v in self.center], "scale": [float(v) for v in self.scale],
                "coefficients": [float(v) for v in self.coefficients], "degree": int(self.degree)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PolynomialCalibration":
        """Inverse of :meth:`to_dict`."""
        return cls(np.asarray(data["center"], dtype=np.float64), np.asarray(data["scale"], dtype=np.float64),
                   np.asarray(data["coefficients"], dtype=np.float64), int(data.get("degree", 2)))


class AnchorDiagnostics(NamedTuple):
    """What the catalog anchor measured.

    Attributes
    ----------
    sigma_spectroscopic : float
        ``sqrt(max(var(catalog - prediction) - mean(e^2), 0))``: the spectroscopic error
        estimated with the catalog errors removed in quadrature, label units.
    shrinkage : float
        ``lambda``, the regression-dilution slope that was undone (<= 1).
    n_stars : int
        Stars in the regression.
    """

    sigma_spectroscopic: float
    shrinkage: float
    n_stars: int


class FoldResult(NamedTuple):
    """Out-of-sample labels of one fold (:func:`fold_out_of_sample`).

    Attributes
    ----------
    rows : numpy.ndarray
        Indices of the held-out stars, shape (n,).
    labels : numpy.ndarray
        Shape (n, K), physical units.
    covariance : numpy.ndarray
        Shape (n, K, K), formal covariance in physical units.
    status : numpy.ndarray
        Shape (n,), test-step status bits.
    n_clipped : numpy.ndarray
        Shape (n,), pixels clipped by the robust test step.
    """

    rows: np.ndarray
    labels: np.ndarray
    covariance: np.ndarray
    status: np.ndarray
    n_clipped: np.ndarray


def _pair_indices(n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(n_labels)


def quadratic_features(x: np.ndarray, center: np.ndarray, scale: np.ndarray, degree: int = 2) -> np.ndarray:
    """Polynomial features of standardized inputs: quadratic, plus higher powers of the first.

    Parameters
    ----------
    x : numpy.ndarray
        Shape (N, K), input units.
    center, scale : numpy.ndarray
        Shape (K,), input units (``scale > 0``).
    degree : int
        Highest power of the first input (>= 2).

    Returns
    -------
    numpy.ndarray
        Shape (N, 1 + K + K(K+1)/2 + degree - 2): ``1, u_1..u_K, u_i u_j (i <= j,
        row-major), u_1^3 .. u_1^degree``.
    """
    if int(degree) < 2:
        raise ValueError(f"degree must be >= 2, got {degree!r}")
    u = (np.asarray(x, dtype=np.float64) - center) / scale
    rows, cols = _pair_indices(u.shape[1])
    powers = [u[:, :1] ** k for k in range(3, int(degree) + 1)]
    return np.concatenate([np.ones((u.shape[0], 1)), u, u[:, rows] * u[:, cols], *powers], axis=1)


def apply_calibration(calibration: PolynomialCalibration, x: np.ndarray) -> np.ndarray:
    """Evaluate a :class:`PolynomialCalibration`.

    Parameters
    ----------
    calibration : PolynomialCalibration
    x : numpy.ndarray
        Shape (N, K), input units; non-finite rows give NaN.

    Returns
    -------
    numpy.ndarray
        Shape (N,), output units.
    """
    x = np.asarray(x, dtype=np.float64)
    ok = np.all(np.isfinite(x), axis=1)
    out = np.full(x.shape[0], np.nan)
    out[ok] = quadratic_features(x[ok], calibration.center, calibration.scale,
                                 calibration.degree) @ calibration.coefficients
    return out


def calibration_gradient(calibration: PolynomialCalibration, x: np.ndarray) -> np.ndarray:
    """Gradient of a calibration with respect to its inputs.

    Parameters
    ----------
    calibration : PolynomialCalibration
    x : numpy.ndarray
        Shape (N, K), input units.

    Returns
    -------
    numpy.ndarray
        Shape (N, K), output units per input unit (NaN rows where ``x`` is not finite).
    """
    x = np.asarray(x, dtype=np.float64)
    n, k = x.shape
    u = (x - calibration.center) / calibration.scale
    c = calibration.coefficients
    grad_u = np.tile(c[1:1 + k], (n, 1))
    rows, cols = _pair_indices(k)
    quad = c[1 + k:1 + k + rows.size]
    for t, (i, j) in enumerate(zip(rows, cols)):
        if i == j:
            grad_u[:, i] += 2.0 * quad[t] * u[:, i]
        else:
            grad_u[:, i] += quad[t] * u[:, j]
            grad_u[:, j] += quad[t] * u[:, i]
    for power, coefficient in zip(range(3, calibration.degree + 1), c[1 + k + rows.size:]):
        grad_u[:, 0] += power * coefficient * u[:, 0] ** (power - 1)
    return grad_u / calibration.scale


def fit_polynomial_calibration(x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None,
                               degree: int = 2) -> PolynomialCalibration:
    """Least-squares polynomial regression of ``y`` on ``x`` (:func:`quadratic_features`).

    Parameters
    ----------
    x : numpy.ndarray
        Shape (N, K), finite, input units.
    y : numpy.ndarray
        Shape (N,), finite, output units.
    weights : numpy.ndarray, optional
        Shape (N,), >= 0 (e.g. 1 / catalog error^2).
    degree : int
        Highest power of the first column of ``x``.

    Returns
    -------
    PolynomialCalibration
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"x must be (N, K) and y (N,), got {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("x and y must be finite")
    n_features = 1 + x.shape[1] + x.shape[1] * (x.shape[1] + 1) // 2 + max(int(degree) - 2, 0)
    if x.shape[0] <= 2 * n_features:
        raise ValueError(f"{x.shape[0]} stars are too few for a {n_features}-term calibration")
    center = np.median(x, axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    features = quadratic_features(x, center, scale, degree)
    w = np.ones_like(y) if weights is None else np.sqrt(np.asarray(weights, dtype=np.float64))
    coefficients = np.linalg.lstsq(features * w[:, None], y * w, rcond=None)[0]
    return PolynomialCalibration(center, scale, coefficients, int(degree))


def fit_catalog_anchor(
    spectroscopic: np.ndarray,
    catalog: np.ndarray,
    catalog_err: np.ndarray,
    max_expansion: float = 1.25,
    degree: int = 2,
) -> tuple[PolynomialCalibration, AnchorDiagnostics]:
    """Calibrate spectroscopic labels to a noisy catalog without regression dilution.

    Parameters
    ----------
    spectroscopic : numpy.ndarray
        Shape (N, K): out-of-sample spectroscopic labels (first column the label being
        anchored, e.g. Teff in K; the others latent labels), finite.
    catalog : numpy.ndarray
        Shape (N,): the catalog value of the anchored label (label units).
    catalog_err : numpy.ndarray
        Shape (N,): its stated 1-sigma error (label units, > 0).
    max_expansion : float
        Upper bound on ``1 / lambda`` (guards against a noisy variance estimate).
    degree : int
        Highest power of the anchored label in the regression (2: quadratic).

    Returns
    -------
    calibration : PolynomialCalibration
        Maps spectroscopic labels to the anchored label, expanded by ``1 / lambda``
        about the mean prediction (module docstring, step 3).
    diagnostics : AnchorDiagnostics
    """
    catalog = np.asarray(catalog, dtype=np.float64)
    catalog_err = np.asarray(catalog_err, dtype=np.float64)
    fit = fit_polynomial_calibration(spectroscopic, catalog, degree=degree)
    prediction = apply_calibration(fit, spectroscopic)
    sigma2 = max(float(np.var(catalog - prediction) - np.mean(catalog_err**2)), 0.0)
    spread = float(np.var(prediction))
    shrinkage = float(np.clip(1.0 - sigma2 / spread, 1.0 / max_expansion, 1.0)) if spread > 0 else 1.0
    mean = float(prediction.mean())
    coefficients = fit.coefficients / shrinkage
    coefficients[0] += mean * (1.0 - 1.0 / shrinkage)
    calibration = PolynomialCalibration(fit.center, fit.scale, coefficients, fit.degree)
    return calibration, AnchorDiagnostics(float(np.sqrt(sigma2)), shrinkage, int(catalog.size))


def anchor_coefficient_covariance(
    spectroscopic: np.ndarray,
    catalog_err: np.ndarray,
    calibration: PolynomialCalibration,
    diagnostics: AnchorDiagnostics,
) -> np.ndarray:
    """Covariance of a catalog anchor's coefficients due to the catalog's noise.

    The anchor (:func:`fit_catalog_anchor`) is an ordinary least-squares fit to catalog
    values whose scatter about the regression is ``catalog_err^2 + sigma_spectroscopic^2``
    per star; its coefficients are then expanded by ``1 / lambda`` about the mean
    prediction. This returns the sandwich covariance of the least-squares coefficients,
    ``(F^T F)^-1 F^T diag(e^2 + sigma_s^2) F (F^T F)^-1``, carried through that linear
    expansion. With noisy catalog labels (100-160 K for Teff) and ~10 coefficients this
    is a per-star error of ~10 K on ~1,400 stars, several times more where the star's
    labels lie at the edge of (or beyond) the anchor's training stars.

    Parameters
    ----------
    spectroscopic : numpy.ndarray
        Shape (N, K): the labels the anchor was fitted on (input units), finite.
    catalog_err : numpy.ndarray
        Shape (N,): the catalog's 1-sigma errors of the anchored label (output units).
    calibration : PolynomialCalibration
        The anchor returned by :func:`fit_catalog_anchor` for these stars.
    diagnostics : AnchorDiagnostics
        Its diagnostics (``sigma_spectroscopic``, ``shrinkage``).

    Returns
    -------
    numpy.ndarray
        Shape (C, C), C coefficients: covariance of ``calibration.coefficients``
        (output units squared).
    """
    features = quadratic_features(spectroscopic, calibration.center, calibration.scale, calibration.degree)
    noise = np.asarray(catalog_err, dtype=np.float64) ** 2 + float(diagnostics.sigma_spectroscopic) ** 2
    gram_inverse = np.linalg.pinv(features.T @ features)
    beta_cov = gram_inverse @ (features.T * noise) @ features @ gram_inverse
    shrinkage = float(diagnostics.shrinkage)
    # coefficients = beta / lambda, intercept + mean(F beta) (1 - 1 / lambda): linear in beta
    transform = np.eye(features.shape[1]) / shrinkage
    transform[0] += (1.0 - 1.0 / shrinkage) * features.mean(axis=0)
    return transform @ beta_cov @ transform.T


def derived_coefficient_covariance(
    model_labels: np.ndarray,
    catalog: np.ndarray,
    catalog_err: np.ndarray,
    calibration: PolynomialCalibration,
) -> np.ndarray:
    """Covariance of a derived label's regression coefficients (:func:`fit_derived_label`).

    The regression of ``ln value`` is weighted by ``(value / error)^2``, the inverse
    variance of ``ln value``; its coefficient covariance is ``(F^T W F)^-1``.

    Parameters
    ----------
    model_labels : numpy.ndarray
        Shape (N, K): the labels the regression was fitted on, finite.
    catalog, catalog_err : numpy.ndarray
        Shape (N,): catalog values (> 0) and their 1-sigma errors, label units.
    calibration : PolynomialCalibration
        The regression (log space).

    Returns
    -------
    numpy.ndarray
        Shape (C, C): covariance of ``calibration.coefficients`` (dimensionless, log space).
    """
    features = quadratic_features(model_labels, calibration.center, calibration.scale, calibration.degree)
    weights = (np.asarray(catalog, dtype=np.float64) / np.asarray(catalog_err, dtype=np.float64)) ** 2
    return np.linalg.pinv((features.T * weights) @ features)


def calibration_variance(calibration: PolynomialCalibration, coefficient_covariance: np.ndarray | list,
                         x: np.ndarray) -> np.ndarray:
    """Variance of a calibration's prediction from the uncertainty of its coefficients.

    Parameters
    ----------
    calibration : PolynomialCalibration
    coefficient_covariance : numpy.ndarray
        Shape (C, C): covariance of ``calibration.coefficients`` (output units squared).
    x : numpy.ndarray
        Shape (N, K): input labels (input units); non-finite rows give NaN.

    Returns
    -------
    numpy.ndarray
        Shape (N,): ``phi(x)^T Cov phi(x)``, output units squared.
    """
    x = np.asarray(x, dtype=np.float64)
    ok = np.all(np.isfinite(x), axis=1)
    out = np.full(x.shape[0], np.nan)
    features = quadratic_features(x[ok], calibration.center, calibration.scale, calibration.degree)
    cov = np.asarray(coefficient_covariance, dtype=np.float64)
    out[ok] = np.maximum(np.einsum("ni,ij,nj->n", features, cov, features), 0.0)
    return out


def calibration_leverage(calibration: PolynomialCalibration, x: np.ndarray) -> np.ndarray:
    """Leverages ``h_ii`` of the stars a calibration was fitted on (unweighted least squares).

    A fitted regression absorbs part of each star's noise: ``E[r_i^2] = (1 - h_ii)
    sigma_i^2`` (to first order), so ``r_i / sqrt(1 - h_ii)`` are residuals with the
    variance of an independent star's.

    Parameters
    ----------
    calibration : PolynomialCalibration
        Supplies the features (center, scale, degree).
    x : numpy.ndarray
        Shape (N, K): the fitted stars' inputs, finite.

    Returns
    -------
    numpy.ndarray
        Shape (N,), in [0, 1).
    """
    features = quadratic_features(x, calibration.center, calibration.scale, calibration.degree)
    q, _ = np.linalg.qr(features)
    return np.minimum(np.sum(q * q, axis=1), 1.0 - 1e-9)


def residual_components(
    flux: np.ndarray,
    ivar: np.ndarray,
    theta: np.ndarray,
    s2: np.ndarray,
    pivots: np.ndarray,
    scales: np.ndarray,
    labels: np.ndarray,
    n_components: int,
) -> np.ndarray:
    """Leading principal components of the weighted residual spectra of a trained model.

    Parameters
    ----------
    flux, ivar : numpy.ndarray
        Shape (N, P), normalized training spectra.
    theta, s2 : numpy.ndarray
        Shapes (P, T), (P,): model trained on ``labels``.
    pivots, scales : numpy.ndarray
        Shape (K,), label scaling of the model.
    labels : numpy.ndarray
        Shape (N, K), the training labels (physical units).
    n_components : int
        Components returned (>= 1).

    Returns
    -------
    numpy.ndarray
        Shape (N, n_components): scores ``(f - model) sqrt(w)`` projected on the leading
        right singular vectors (dimensionless).
    """
    model = design_matrix(scale_labels(labels, pivots, scales)) @ np.asarray(theta).T
    ivar = np.asarray(ivar, dtype=np.float64)
    s2_safe = np.where(np.isfinite(s2), s2, 0.0)
    weight = np.where(np.isfinite(ivar) & (ivar > 0), ivar, 0.0)
    weight = weight / (1.0 + weight * s2_safe[None, :])
    resid = (np.asarray(flux, dtype=np.float64) - model) * np.sqrt(weight)
    resid = np.where(np.isfinite(resid), resid, 0.0)
    resid -= resid.mean(axis=0)
    u, s, _ = np.linalg.svd(resid, full_matrices=False)
    return u[:, :n_components] * s[:n_components]


def standardize_latent(latent: np.ndarray, teff: np.ndarray) -> np.ndarray:
    """Remove the quadratic Teff trend from latent labels and whiten them.

    Parameters
    ----------
    latent : numpy.ndarray
        Shape (N, L), dimensionless.
    teff : numpy.ndarray
        Shape (N,), K.

    Returns
    -------
    numpy.ndarray
        Shape (N, L): mean 0, unit covariance, uncorrelated with Teff and Teff^2; the
        sign of each column makes its largest-magnitude loading on the input positive
        (deterministic orientation).
    """
    latent = np.asarray(latent, dtype=np.float64)
    t = (np.asarray(teff, dtype=np.float64) - np.median(teff)) / max(float(np.std(teff)), 1e-12)
    basis = np.column_stack([np.ones_like(t), t, t * t])
    z = latent - basis @ np.linalg.lstsq(basis, latent, rcond=None)[0]
    cov = np.atleast_2d(np.cov(z.T))
    eigval, eigvec = np.linalg.eigh(cov)
    eigval = np.maximum(eigval, 1e-300)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = eigval[order], eigvec[:, order]
    z = z @ eigvec / np.sqrt(eigval)
    signs = np.sign(eigvec[np.argmax(np.abs(eigvec), axis=0), np.arange(eigvec.shape[1])])
    return z * np.where(signs == 0, 1.0, signs)


def fold_assignments(n_stars: int, n_folds: int, seed: int = 0) -> np.ndarray:
    """Balanced random fold index (0..n_folds-1) of each star.

    Parameters
    ----------
    n_stars, n_folds : int
        ``n_folds >= 2``, ``n_stars >= n_folds``.
    seed : int
        Random seed (the assignment is reproducible).

    Returns
    -------
    numpy.ndarray
        Shape (n_stars,), int.
    """
    if n_folds < 2 or n_stars < n_folds:
        raise ValueError(f"need n_folds >= 2 and n_stars >= n_folds, got {n_folds} and {n_stars}")
    return np.random.default_rng(seed).permutation(n_stars) % n_folds


def label_starting_points(
    labels: np.ndarray,
    quantiles: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95),
) -> np.ndarray:
    """Starting points of the test step: the median and training stars at Teff quantiles.

    Parameters
    ----------
    labels : numpy.ndarray
        Shape (N, K), physical units; column 0 is the label the stars are spread along.
    quantiles : tuple of float
        Quantiles of column 0.

    Returns
    -------
    numpy.ndarray
        Shape (M, K), physical units, unique rows.
    """
    labels = np.asarray(labels, dtype=np.float64)
    points = [np.median(labels, axis=0)]
    for q in quantiles:
        points.append(labels[np.argmin(np.abs(labels[:, 0] - np.quantile(labels[:, 0], q)))])
    unique: list[np.ndarray] = []
    for p in points:
        if not any(np.array_equal(p, u) for u in unique):
            unique.append(p)
    return np.asarray(unique)


def fold_out_of_sample(
    flux: np.ndarray,
    ivar: np.ndarray,
    labels: np.ndarray,
    test_rows: np.ndarray,
    *,
    clip_sigma: float = DEFAULT_CLIP_SIGMA,
    clip_rounds: int = 3,
    masked_ivar_threshold: float = DEFAULT_MASKED_IVAR_THRESHOLD,
) -> FoldResult:
    """Train on all stars but ``test_rows`` and infer the labels of ``test_rows``.

    Parameters
    ----------
    flux, ivar : numpy.ndarray
        Shape (N, P), normalized spectra of all training stars.
    labels : numpy.ndarray
        Shape (N, K), current training labels (physical units).
    test_rows : numpy.ndarray
        Indices of the held-out stars.
    clip_sigma, clip_rounds : float, int
        Robust test step (:func:`lamost_mdwarf.kernels.robust.robust_infer_labels`);
        ``clip_rounds = 0`` for the ordinary test step.
    masked_ivar_threshold : float
        ivar at or below which a pixel counts as masked.

    Returns
    -------
    FoldResult
    """
    flux = np.asarray(flux, dtype=np.float64)
    ivar = np.asarray(ivar, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    test_rows = np.asarray(test_rows, dtype=np.intp)
    train = np.ones(flux.shape[0], dtype=bool)
    train[test_rows] = False
    scaling = compute_label_scaling(labels[train])
    design = design_matrix(scale_labels(labels[train], scaling.pivots, scaling.scales))
    trained = train_pixels(design, flux[train], ivar[train])
    fit = robust_infer_labels(flux[test_rows], ivar[test_rows], trained.theta, trained.s2, scaling.pivots,
                              scaling.scales, label_starting_points(labels[train]), clip_sigma=clip_sigma,
                              max_rounds=clip_rounds, masked_ivar_threshold=masked_ivar_threshold)
    return FoldResult(test_rows, fit.result.labels, fit.result.covariance, fit.result.status, fit.n_clipped)


def combine_iterations(
    previous: np.ndarray,
    anchored_teff: np.ndarray,
    latent: np.ndarray,
    damping: float,
) -> np.ndarray:
    """New training labels: damped update of Teff and of the standardized latent labels.

    Parameters
    ----------
    previous : numpy.ndarray
        Shape (N, 1 + L) current labels (Teff in K, then latent); or (N, 1) at the first
        iteration (no damping is applied then).
    anchored_teff : numpy.ndarray
        Shape (N,), K: out-of-fold Teff mapped through the catalog anchor.
    latent : numpy.ndarray
        Shape (N, L): new latent estimates (out-of-fold or residual components).
    damping : float
        Weight of the previous labels, in [0, 1).

    Returns
    -------
    numpy.ndarray
        Shape (N, 1 + L).
    """
    if not 0 <= damping < 1:
        raise ValueError(f"damping must be in [0, 1), got {damping!r}")
    previous = np.asarray(previous, dtype=np.float64)
    teff = np.asarray(anchored_teff, dtype=np.float64)
    latent = np.asarray(latent, dtype=np.float64)
    if previous.shape[1] == 1 + latent.shape[1] and damping > 0:
        teff = damping * previous[:, 0] + (1.0 - damping) * teff
        latent = damping * previous[:, 1:] + (1.0 - damping) * latent
    return np.column_stack([teff, standardize_latent(latent, teff)])


def fit_derived_label(
    model_labels: np.ndarray,
    catalog: np.ndarray,
    catalog_err: np.ndarray,
    catalog_teff: np.ndarray,
    catalog_teff_err: np.ndarray,
) -> tuple[PolynomialCalibration, float]:
    """A derived label (R, M or L) as ``exp`` of a quadratic function of the model labels.

    Parameters
    ----------
    model_labels : numpy.ndarray
        Shape (N, K): refined training labels (Teff in K, latent labels).
    catalog, catalog_err : numpy.ndarray
        Shape (N,): the catalog values of the derived label (> 0) and their stated errors
        (label units, e.g. Rsun).
    catalog_teff, catalog_teff_err : numpy.ndarray
        Shape (N,): the catalog's Teff and its errors, K.

    Returns
    -------
    calibration : PolynomialCalibration
        ``ln E[catalog value | model labels]`` (a regression of ``ln value`` weighted by
        ``(value / error)^2``); evaluate with :func:`derived_label_uncertainty`.
    relative_intrinsic : float
        The part of the catalog's relative error that its Teff error does not explain
        (the relation's intrinsic scatter), dimensionless: the intercept of the
        least-squares fit ``(e / value)^2 = f^2 + e_Teff^2 (a0 + a1 t + a2 t^2)`` over the
        stars (``t`` the standardized catalog Teff; the Teff-dependent slope is the squared
        logarithmic derivative of the catalog's value-Teff relation). The catalog's Teff
        errors vary from star to star at fixed Teff, which separates the two terms. If
        the catalog errors do not depend on e_Teff the whole relative error is intrinsic.
    """
    catalog = np.asarray(catalog, dtype=np.float64)
    catalog_err = np.asarray(catalog_err, dtype=np.float64)
    teff = np.asarray(catalog_teff, dtype=np.float64)
    teff_err = np.asarray(catalog_teff_err, dtype=np.float64)
    if np.any(catalog <= 0):
        raise ValueError("derived labels must be positive (they are fitted in log space)")
    calibration = fit_polynomial_calibration(model_labels, np.log(catalog), weights=(catalog / catalog_err) ** 2)
    t = (teff - np.median(teff)) / max(float(np.std(teff)), 1e-12)
    e2 = teff_err**2
    basis = np.column_stack([np.ones_like(t), e2, e2 * t, e2 * t * t])
    coef = np.linalg.lstsq(basis, (catalog_err / catalog) ** 2, rcond=None)[0]
    return calibration, float(np.sqrt(max(coef[0], 0.0)))


def derived_label_uncertainty(
    calibration: PolynomialCalibration,
    model_labels: np.ndarray,
    covariance: np.ndarray,
    relative_intrinsic: float,
    coefficient_covariance: np.ndarray | list | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Value and 1-sigma uncertainty of a derived label.

    Parameters
    ----------
    calibration : PolynomialCalibration
        From :func:`fit_derived_label` (log space).
    model_labels : numpy.ndarray
        Shape (N, K), the star's model labels.
    covariance : numpy.ndarray
        Shape (N, K, K): their covariance (formal, or formal plus systematic), in the
        labels' units.
    relative_intrinsic : float
        Intrinsic scatter as a fraction of the derived label.
    coefficient_covariance : array_like, optional
        Shape (C, C): covariance of the regression's coefficients
        (:func:`derived_coefficient_covariance`); its variance at the star's labels is
        added (the regression's own uncertainty, largest at the edges of its training set).

    Returns
    -------
    value : numpy.ndarray
        Shape (N,), label units.
    sigma : numpy.ndarray
        Shape (N,): ``value sqrt(g^T C g + relative_intrinsic^2 + v_reg)`` with ``g`` the
        gradient of ``ln value`` and ``v_reg`` the regression's variance (0 without
        ``coefficient_covariance``), label units.
    """
    value = np.exp(apply_calibration(calibration, model_labels))
    grad = calibration_gradient(calibration, model_labels)
    propagated = np.einsum("nk,nkl,nl->n", grad, np.asarray(covariance, dtype=np.float64), grad)
    regression = 0.0 if coefficient_covariance is None else calibration_variance(
        calibration, coefficient_covariance, model_labels)
    sigma = value * np.sqrt(np.maximum(propagated, 0.0) + relative_intrinsic**2 + regression)
    return value, sigma
