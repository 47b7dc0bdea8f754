"""Training step of The Cannon: per-pixel maximum likelihood of (theta_p, s_p), batched.

Pure numpy; no dask, xarray or I/O. One call handles one chunk of pixels (all training
stars); the chunk is processed with matrix products, never with a Python loop over
pixels.

Model and likelihood
--------------------
For pixel ``p`` and training star ``n`` with design vector ``A_n`` (see
:mod:`lamost_mdwarf.kernels.cannon_design`), flux ``f_np`` and inverse variance
``ivar_np = 1 / sigma_np^2``, The Cannon's model is ``f_np = theta_p . A_n + noise`` with
noise variance ``sigma_np^2 + s_p^2`` (Galgano et al. 2020, Eq. 3-7). The negative log
likelihood minimised here is

    NLL_p(theta, s2) = 1/2 sum_n [ w_np (f_np - theta . A_n)^2 - ln w_np ],
    w_np = 1 / (sigma_np^2 + s2) = ivar_np / (1 + ivar_np s2)

(the constant ``N/2 ln 2 pi`` is dropped; stars with ``ivar = 0`` carry no weight and no
``ln w`` term). The paper's Eq. 6 prints the log likelihood with the wrong overall sign;
this is the standard Cannon likelihood (Ness et al. 2015).

Algorithm
---------
* For fixed ``s2`` the optimal ``theta`` is weighted least squares,
  ``theta(s2) = (A^T W A)^-1 A^T W f`` (batched ``np.linalg.solve`` over the pixel chunk;
  ``A^T W A`` of all pixels is a single ``(P, N) @ (N, T(T+1)/2)`` product).
* ``s2`` maximises the *profile* likelihood ``NLL_p(theta(s2), s2)``, per pixel and to
  convergence. Its exact first and second derivatives are

      D(s2)  = d NLL / d s2  = 1/2 sum_n w (1 - w r^2)
      D'(s2) = 1/2 sum_n (2 w^3 r^2 - w^2) - g^T (A^T W A)^-1 g,   g = sum_n w^2 r A_n

  with ``r = f - theta(s2) . A`` (envelope theorem for ``D``; implicit differentiation of
  ``theta(s2)`` for ``D'``).
* ``s2 = 0`` is accepted when ``D(0) >= 0`` (the likelihood decreases away from the
  boundary). Otherwise the root of ``D`` is found by safeguarded Newton iterations in
  ``t = ln s2`` (``rtsafe``), started from the moment estimate
  ``s2 = sum w^2 (r^2 - sigma^2) / sum w^2`` at ``s2 = 0``, inside a bracket
  ``[ln s2_floor, +inf)`` that every evaluation narrows (``s2_floor = s2_floor_relative *
  min_n sigma_np^2``). A Newton step that leaves the bracket, meets non-positive
  curvature or does not shrink fast enough is replaced by a bisection in ``ln s2`` (or,
  while no upper end with ``D > 0`` is known, by an expansion ``s2 -> 10 s2``).
* A pixel is converged when the last ``ln s2`` step, the next Newton step (where the
  curvature is positive) or the bracket width is below ``tol_log_s2`` (the relative
  precision of ``s2``). Non-converged pixels keep their last
  iterate (finite) and are flagged.

Inverse variances are used exactly as given: tiny values (e.g. 1e-5 for masked pixels)
are neither clamped nor modified, and no input array is modified.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = [
    "TrainingResult",
    "profile_likelihood",
    "train_pixels",
]


_LOG_EXPANSION = np.log(10.0)


class TrainingResult(NamedTuple):
    """Per-pixel result of :func:`train_pixels` for one chunk of P pixels.

    Attributes
    ----------
    theta : numpy.ndarray
        Model coefficients, shape (P, T), flux units per unit design term (the design
        terms are dimensionless scaled labels). NaN only for pixels with fewer than
        ``T + 1`` stars of non-zero ``ivar`` (flagged ``converged = False``).
    s2 : numpy.ndarray
        Intrinsic model scatter squared ``s_p^2``, shape (P,), flux units squared;
        ``>= 0``. NaN only for the same degenerate pixels as ``theta``.
    converged : numpy.ndarray
        Shape (P,), bool. True when ``s2`` met the tolerance (or sits at the ``s2 = 0``
        boundary).
    n_iterations : numpy.ndarray
        Shape (P,), int. Number of likelihood evaluations used for each pixel.
    neg_log_likelihood : numpy.ndarray
        Profile negative log likelihood at ``(theta, s2)``, shape (P,), dimensionless
        (without the ``N/2 ln 2 pi`` constant).
    """

    theta: np.ndarray
    s2: np.ndarray
    converged: np.ndarray
    n_iterations: np.ndarray
    neg_log_likelihood: np.ndarray


class _Evaluation(NamedTuple):
    theta: np.ndarray  # (P, T)
    nll: np.ndarray  # (P,)
    d_nll: np.ndarray  # (P,) derivative of the profile NLL w.r.t. s2
    d2_nll: np.ndarray  # (P,) second derivative of the profile NLL w.r.t. s2


def profile_likelihood(
    design: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    s2: np.ndarray | float,
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least-squares ``theta`` and profile NLL of each pixel at a given scatter.

    Parameters
    ----------
    design : numpy.ndarray
        Design matrix of the training stars, shape (N, T), dimensionless.
    flux : numpy.ndarray
        Normalized flux, shape (N, P), flux units (dimensionless for continuum-normalized
        spectra).
    ivar : numpy.ndarray
        Inverse variance of ``flux``, shape (N, P), flux units^-2, ``>= 0``.
    s2 : float or numpy.ndarray
        Scatter squared, scalar or shape (P,), flux units squared, ``>= 0``.

    Returns
    -------
    theta : numpy.ndarray
        Shape (P, T), the maximum-likelihood coefficients at ``s2``.
    neg_log_likelihood : numpy.ndarray
        Shape (P,), ``NLL_p(theta_p, s2_p)`` as defined in the module docstring.
    """
    design, flux, ivar = _validated(design, flux, ivar)
    s2 = np.broadcast_to(np.asarray(s2, dtype=np.float64), (flux.shape[1],))
    if not np.all(np.isfinite(s2)) or np.any(s2 < 0):
        raise ValueError("s2 must be finite and >= 0")
    evaluation = _evaluate(design, _outer_triu(design), flux, ivar, s2, derivatives=False)
    return evaluation.theta, evaluation.nll


def train_pixels(
    design: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    *,
    tol_log_s2: float = 1e-8,
    max_iterations: int = 100,
    s2_floor_relative: float = 1e-12,
) -> TrainingResult:
    """Maximum-likelihood ``theta_p`` and ``s_p^2`` for every pixel of a chunk.

    Parameters
    ----------
    design : numpy.ndarray
        Design matrix of the N training stars, shape (N, T), dimensionless (from
        :func:`lamost_mdwarf.kernels.cannon_design.design_matrix` of scaled labels).
        Requires ``N > T``.
    flux : numpy.ndarray
        Normalized flux, shape (N, P), flux units. May be non-finite only where
        ``ivar == 0``.
    ivar : numpy.ndarray
        Inverse variance, shape (N, P), flux units^-2, finite and ``>= 0``. Masked
        pixels may carry a tiny value (e.g. 1e-5); it is used as is.
    tol_log_s2 : float
        Convergence tolerance on ``ln s2`` (i.e. relative precision of ``s2``).
    max_iterations : int
        Maximum number of likelihood evaluations per pixel.
    s2_floor_relative : float
        Lower end of the ``s2`` bracket, relative to the pixel's smallest measurement
        variance ``min_n 1/ivar_np``; scatters below it are indistinguishable from 0.

    Returns
    -------
    TrainingResult
        ``theta`` (P, T), ``s2`` (P,), ``converged`` (P,), ``n_iterations`` (P,),
        ``neg_log_likelihood`` (P,).

    Raises
    ------
    ValueError
        On inconsistent shapes, ``N <= T``, non-finite design, non-finite or negative
        ``ivar``, non-finite flux where ``ivar > 0`` or bad tolerance parameters.

    Notes
    -----
    Memory use is a few ``(N, P)`` float64 arrays plus ``P T^2`` floats. See the module
    docstring for the algorithm.
    """
    if not (np.isfinite(tol_log_s2) and tol_log_s2 > 0):
        raise ValueError(f"tol_log_s2 must be finite and > 0, got {tol_log_s2!r}")
    if int(max_iterations) < 2:
        raise ValueError(f"max_iterations must be >= 2, got {max_iterations!r}")
    if not (np.isfinite(s2_floor_relative) and 0 < s2_floor_relative < 1):
        raise ValueError(f"s2_floor_relative must be in (0, 1), got {s2_floor_relative!r}")
    design, flux, ivar = _validated(design, flux, ivar)
    n_stars, n_terms = design.shape
    n_pixels = flux.shape[1]
    if n_stars <= n_terms:
        raise ValueError(f"need more training stars than design terms, got N={n_stars}, T={n_terms}")

    theta = np.full((n_pixels, n_terms), np.nan)
    s2 = np.full(n_pixels, np.nan)
    nll = np.full(n_pixels, np.nan)
    converged = np.zeros(n_pixels, dtype=bool)
    n_iter = np.zeros(n_pixels, dtype=np.int64)

    usable = np.count_nonzero(ivar > 0, axis=0) > n_terms
    pix = np.flatnonzero(usable)
    if pix.size == 0:
        return TrainingResult(theta, s2, converged, n_iter, nll)
    outer = _outer_triu(design)

    # Phase 0: the s2 = 0 boundary.
    ev = _evaluate(design, outer, flux[:, pix], ivar[:, pix], np.zeros(pix.size))
    theta[pix], s2[pix], nll[pix], n_iter[pix] = ev.theta, 0.0, ev.nll, 1
    at_zero = ev.d_nll >= 0
    converged[pix[at_zero]] = True
    inner = ~at_zero
    pix, theta_at_zero = pix[inner], ev.theta[inner]
    if pix.size == 0:
        return TrainingResult(theta, s2, converged, n_iter, nll)

    f_act, iv_act = flux[:, pix], ivar[:, pix]
    s2_floor = s2_floor_relative / iv_act.max(axis=0)
    log_lo = np.log(s2_floor)

    # Phase 1: safeguarded Newton (rtsafe) on D(exp(t)) = 0 in t = ln s2, from the moment
    # estimate s2 = sum w^2 (r^2 - sigma^2) / sum w^2 at s2 = 0 (w = ivar). The bracket
    # starts as [ln s2_floor, +inf); while no point with D > 0 is known, steps that would
    # leave it are replaced by an expansion t + ln 10, afterwards by a bisection.
    resid0 = f_act - design @ theta_at_zero.T
    guess = np.sum(iv_act * (iv_act * resid0 * resid0 - 1.0), axis=0) / np.sum(iv_act * iv_act, axis=0)
    log_hi = np.full(pix.size, np.inf)
    log_x = np.log(np.where(np.isfinite(guess) & (guess > 10.0 * s2_floor), guess, 10.0 * s2_floor))
    d_x = np.zeros(pix.size)
    slope_x = np.ones(pix.size)
    step = np.full(pix.size, np.inf)
    step_old = np.full(pix.size, np.inf)  # the "step before last" of rtsafe
    first = True
    active = np.ones(pix.size, dtype=bool)
    while active.any():
        idx = np.flatnonzero(active)
        lo, hi, t = log_lo[idx], log_hi[idx], log_x[idx]
        if first:
            t_new = t
        else:
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                newton = t - d_x[idx] / slope_x[idx]
            bounded = np.isfinite(hi)
            fallback = (
                ~np.isfinite(newton)
                | ~(slope_x[idx] > 0)
                | (newton <= lo)
                | (newton >= hi)
                | (bounded & (2.0 * np.abs(newton - t) > np.abs(step_old[idx])))
                | (~bounded & (newton > t + _LOG_EXPANSION))
            )
            safe = np.where(bounded, 0.5 * (lo + hi), t + _LOG_EXPANSION)
            t_new = np.where(fallback, safe, newton)
            step_old[idx] = step[idx]
            step[idx] = t_new - t

        s2_new = np.exp(t_new)
        ev = _evaluate(design, outer, f_act[:, idx], iv_act[:, idx], s2_new)
        _store(theta, s2, nll, pix[idx], ev, s2_new)
        n_iter[pix[idx]] += 1
        log_x[idx], d_x[idx], slope_x[idx] = t_new, ev.d_nll, s2_new * ev.d2_nll  # slope = dD/dt
        below = ev.d_nll < 0
        log_lo[idx[below]] = t_new[below]
        log_hi[idx[~below]] = t_new[~below]

        with np.errstate(divide="ignore", invalid="ignore"):
            predicted_step = np.abs(d_x[idx] / slope_x[idx])  # Newton's distance to the root
        done = (
            (np.abs(step[idx]) < tol_log_s2)
            | ((slope_x[idx] > 0) & (predicted_step < tol_log_s2))
            | ((log_hi[idx] - log_lo[idx]) < tol_log_s2)
            | (ev.d_nll == 0)
        )
        converged[pix[idx[done]]] = True
        active[idx[done | (n_iter[pix[idx]] >= max_iterations)]] = False
        first = False
    return TrainingResult(theta, s2, converged, n_iter, nll)


def _store(theta, s2, nll, pixels, ev: _Evaluation, s2_values) -> None:
    theta[pixels] = ev.theta
    s2[pixels] = s2_values
    nll[pixels] = ev.nll


def _outer_triu(design: np.ndarray) -> np.ndarray:
    """Upper-triangle products ``A_nt A_nu`` (t <= u), shape (N, T(T+1)/2)."""
    rows, cols = np.triu_indices(design.shape[1])
    return design[:, rows] * design[:, cols]


def _symmetric_from_triu(triu: np.ndarray, n_terms: int) -> np.ndarray:
    rows, cols = np.triu_indices(n_terms)
    full = np.empty(triu.shape[:-1] + (n_terms, n_terms))
    full[..., rows, cols] = triu
    full[..., cols, rows] = triu
    return full


def _batched_solve(matrices: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve ``matrices[i] @ x[i] = rhs[i]``; pseudo-inverse only if some matrix is singular."""
    try:
        return np.linalg.solve(matrices, rhs[..., None])[..., 0]
    except np.linalg.LinAlgError:
        return np.einsum("ptu,pu->pt", np.linalg.pinv(matrices, hermitian=True), rhs)


def _evaluate(
    design: np.ndarray,
    outer_triu: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    s2: np.ndarray,
    derivatives: bool = True,
) -> _Evaluation:
    """theta(s2), profile NLL and its first two s2-derivatives for a set of pixels."""
    n_terms = design.shape[1]
    weight = ivar / (1.0 + ivar * s2)  # (N, P)
    normal = _symmetric_from_triu(weight.T @ outer_triu, n_terms)  # (P, T, T)
    theta = _batched_solve(normal, (weight * flux).T @ design)
    resid = flux - design @ theta.T
    w_resid = weight * resid
    log_w = np.log(weight, out=np.zeros_like(weight), where=weight > 0)
    nll = 0.5 * (np.sum(w_resid * resid, axis=0) - log_w.sum(axis=0))
    if not derivatives:
        return _Evaluation(theta, nll, np.full_like(nll, np.nan), np.full_like(nll, np.nan))
    w_resid_sq = w_resid * w_resid
    d_nll = 0.5 * np.sum(weight - w_resid_sq, axis=0)
    d2_fixed_theta = 0.5 * np.sum(2.0 * weight * w_resid_sq - weight * weight, axis=0)
    cross = (weight * w_resid).T @ design  # (P, T): sum_n w^2 r A_n
    correction = np.sum(cross * _batched_solve(normal, cross), axis=1)
    return _Evaluation(theta, nll, d_nll, d2_fixed_theta - correction)


def _validated(design, flux, ivar) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    design = np.asarray(design, dtype=np.float64)
    flux = np.asarray(flux, dtype=np.float64)
    ivar = np.asarray(ivar, dtype=np.float64)
    if design.ndim != 2:
        raise ValueError(f"design must have shape (N, T), got {design.shape}")
    if flux.ndim != 2 or flux.shape[0] != design.shape[0] or ivar.shape != flux.shape:
        raise ValueError(
            f"flux and ivar must have shape (N={design.shape[0]}, P), got {flux.shape} and {ivar.shape}"
        )
    if not np.all(np.isfinite(design)):
        raise ValueError("design matrix must be finite")
    if not np.all(np.isfinite(ivar)) or np.any(ivar < 0):
        raise ValueError("ivar must be finite and >= 0")
    finite_flux = np.isfinite(flux)
    if np.any(~finite_flux & (ivar > 0)):
        raise ValueError("flux must be finite wherever ivar > 0")
    if not finite_flux.all():
        flux = np.where(finite_flux, flux, 0.0)  # zero-weight entries; a copy, input untouched
    return design, flux, ivar
