"""Shift a spectrum to the rest frame and resample it onto a common grid (pure numpy).

Method
------
Each output pixel at rest wavelength ``lam`` is the linear interpolation between the two
native pixels that bracket it on the rest-frame native grid ``lam_native / (1 + z)``:

    f_out = (1 - t) f_i + t f_{i+1},      t = (lam - lam_i) / (lam_{i+1} - lam_i)

and its variance is propagated exactly for that linear combination of independent
pixels:

    var_out = (1 - t)^2 / ivar_i + t^2 / ivar_{i+1},     ivar_out = 1 / var_out.

An output pixel is bad (``ivar_out = 0``) when any native pixel with non-zero weight is
bad (``ivar <= 0`` or non-finite, or non-finite flux); its flux is still the
interpolated value when that is finite, so nothing is silently invented. LAMOST mask
bits are OR-ed over the contributing native pixels. Output pixels outside the native
coverage get ``flux = NaN``, ``ivar = 0`` and the ``NODATA`` bit (32) in both masks.

Interpolation correlates neighbouring output pixels (the 1 A grid over-samples the
LAMOST red arm); ``ivar_out`` is the marginal inverse variance of each output pixel and
ignores those correlations, as The Cannon does.
"""
from __future__ import annotations

import numpy as np

__all__ = ["NODATA_BIT", "resample_to_rest_frame"]

#: LAMOST mask bit meaning "no data"; set on output pixels outside the native coverage.
NODATA_BIT = np.uint16(32)


def resample_to_rest_frame(
    wavelength: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    andmask: np.ndarray,
    ormask: np.ndarray,
    z: float,
    grid: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Resample one spectrum onto a rest-frame wavelength grid.

    Parameters
    ----------
    wavelength : numpy.ndarray
        Native observed-frame vacuum wavelengths, Angstrom, strictly increasing, shape (n,).
    flux : numpy.ndarray
        Native flux (arbitrary units), shape (n,).
    ivar : numpy.ndarray
        Native inverse variance (flux units^-2), shape (n,); ``<= 0`` marks bad pixels.
    andmask, ormask : numpy.ndarray
        Native LAMOST mask bits, integer, shape (n,).
    z : float
        Redshift used for the rest-frame shift, ``lam_rest = lam_obs / (1 + z)``.
        Must be finite and > -1.
    grid : numpy.ndarray
        Output rest-frame vacuum wavelengths, Angstrom, increasing, shape (m,).

    Returns
    -------
    flux_out : numpy.ndarray
        float32, shape (m,); NaN outside the native coverage.
    ivar_out : numpy.ndarray
        float32, shape (m,); 0 for bad or uncovered pixels.
    andmask_out, ormask_out : numpy.ndarray
        uint16, shape (m,).

    Notes
    -----
    The inputs are not modified. See the module docstring for the method.
    """
    if not np.isfinite(z) or z <= -1.0:
        raise ValueError(f"redshift must be finite and > -1, got {z!r}")
    wavelength = np.asarray(wavelength, dtype=np.float64)
    n = wavelength.size
    for name, arr in (("flux", flux), ("ivar", ivar), ("andmask", andmask), ("ormask", ormask)):
        if np.shape(arr) != (n,):
            raise ValueError(f"{name} has shape {np.shape(arr)}, expected ({n},)")
    if n < 2:
        raise ValueError("need at least two native pixels to interpolate")

    rest = wavelength / (1.0 + z)
    grid = np.asarray(grid, dtype=np.float64)
    flux64 = np.asarray(flux, dtype=np.float64)
    ivar64 = np.asarray(ivar, dtype=np.float64)
    good = np.isfinite(flux64) & np.isfinite(ivar64) & (ivar64 > 0)

    left = np.searchsorted(rest, grid, side="right") - 1
    covered = (left >= 0) & (left < n - 1)
    # The last native pixel itself is covered (t = 0 on the last interval).
    at_end = grid == rest[-1]
    left = np.where(at_end, n - 2, left)
    covered |= at_end
    li = np.clip(left, 0, n - 2)
    ri = li + 1
    t = (grid - rest[li]) / (rest[ri] - rest[li])
    t = np.clip(t, 0.0, 1.0)
    wl, wr = 1.0 - t, t
    use_l, use_r = wl > 0, wr > 0

    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        f_out = np.where(use_l, wl * flux64[li], 0.0) + np.where(use_r, wr * flux64[ri], 0.0)
        var_l = np.where(use_l & good[li], wl**2 / np.where(good[li], ivar64[li], 1.0), 0.0)
        var_r = np.where(use_r & good[ri], wr**2 / np.where(good[ri], ivar64[ri], 1.0), 0.0)
        all_good = (~use_l | good[li]) & (~use_r | good[ri])
        var = var_l + var_r
        ivar_out = np.where(all_good & covered & (var > 0), 1.0 / var, 0.0)

    and_native = np.asarray(andmask).astype(np.uint16, copy=False)
    or_native = np.asarray(ormask).astype(np.uint16, copy=False)
    zero = np.uint16(0)
    and_out = np.where(use_l, and_native[li], zero) | np.where(use_r, and_native[ri], zero)
    or_out = np.where(use_l, or_native[li], zero) | np.where(use_r, or_native[ri], zero)

    f_out = np.where(covered, f_out, np.nan)
    ivar_out = np.where(np.isfinite(ivar_out), ivar_out, 0.0)
    and_out = np.where(covered, and_out, NODATA_BIT).astype(np.uint16)
    or_out = np.where(covered, or_out, NODATA_BIT).astype(np.uint16)
    with np.errstate(over="ignore"):
        return f_out.astype(np.float32), ivar_out.astype(np.float32), and_out, or_out
