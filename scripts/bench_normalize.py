"""Pseudo-continuum benchmark: the fast kernel against the dense formulation, in one run.

Usage::

    python scripts/bench_normalize.py [--n-spectra 2000] [--n-pixels 3000]
                                      [--blas-threads 1] [--repeats 3]

Builds M-dwarf-like spectra itself (a smooth red continuum with deep broad molecular
bands, noise, zero-ivar runs and NaN fluxes, passed through the project's masking kernel
so that masked pixels carry the tiny ivar 1e-5), then on the same float32 arrays times

1. ``pseudo_continuum_dense``: the dense n_pixel x n_pixel Gaussian weight matrix and two
   matrix products, as TheCannon does (weight matrix built inside the call, as there);
2. ``pseudo_continuum``: the block low-rank kernel (its operator is built once per
   process and cached; the first call, which builds it, is reported separately).

Each is run ``--repeats`` times, alternately, and the best time is kept (the machine is
shared). Prints the time per spectrum of each, the speed ratio and the maximum relative
difference; exits non-zero if the ratio is below ``--min-ratio`` (20) or the difference
above ``--max-rel-diff`` (1e-5), or if the two disagree on which pixels are undefined.

BLAS threads are pinned (default 1, as inside a Dask worker, where parallelism comes
from worker processes) before numpy is imported, and apply to both methods.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-spectra", type=int, default=2000)
    parser.add_argument("--n-pixels", type=int, default=3000,
                        help="pixels of the 1 A grid starting at 4500 A (default 3000)")
    parser.add_argument("--width", type=float, default=50.0, help="smoothing width L, A")
    parser.add_argument("--convention", choices=("cannon", "paper"), default="cannon")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--blas-threads", type=int, default=1,
                        help="BLAS/OpenMP threads for both methods (default 1)")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--min-ratio", type=float, default=20.0)
    parser.add_argument("--max-rel-diff", type=float, default=1e-5)
    return parser.parse_args(argv)


def make_spectra(n_spectra: int, wavelength, seed: int):
    """M-dwarf-like raw spectra and LAMOST-like masks on a rest-frame grid (float32)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = (n_spectra, wavelength.size)
    x = (wavelength - 4500.0) / 3000.0
    # Smooth red continuum: a steep positive slope plus curvature, per star.
    tilt = rng.uniform(1.0, 6.0, (n_spectra, 1))
    curve = rng.uniform(-1.0, 1.0, (n_spectra, 1))
    level = rng.uniform(20.0, 2000.0, (n_spectra, 1))
    smooth = level * (0.15 + tilt * x + 0.5 * curve * x * x)
    # Deep, broad TiO/CaH-like bands with per-star depths.
    bands = np.ones(shape)
    for centre, width in ((4760, 30), (4955, 40), (5167, 35), (5450, 60), (5847, 45),
                          (6160, 50), (6700, 80), (7050, 60), (7125, 40)):
        depth = rng.uniform(0.1, 0.7, (n_spectra, 1))
        bands *= 1.0 - depth * np.exp(-0.5 * ((wavelength - centre) / width) ** 2)
    true = smooth * bands
    snr = rng.uniform(10.0, 200.0, (n_spectra, 1))
    sigma = true / snr + 0.01 * level
    flux = true + sigma * rng.standard_normal(shape)
    ivar = 1.0 / sigma**2
    andmask = np.zeros(shape, dtype=np.uint16)
    ormask = np.zeros(shape, dtype=np.uint16)
    # LAMOST-like defects: zero-ivar runs (some long, at the ends), NaN fluxes, flags.
    for star in range(n_spectra):
        for _ in range(rng.poisson(2)):
            start = rng.integers(0, wavelength.size)
            length = rng.integers(1, 40)
            ivar[star, start:start + length] = 0.0
            flux[star, start:start + length] = 0.0
        if rng.random() < 0.05:
            ivar[star, : rng.integers(50, 400)] = 0.0
        if rng.random() < 0.02:
            flux[star, -rng.integers(10, 200):] = np.nan
        if rng.random() < 0.1:
            start = rng.integers(0, wavelength.size - 20)
            andmask[star, start:start + 10] = 8  # BRIGHTSKY
    if n_spectra > 1:
        flux[-1] = np.nan  # a star without data
    redshift = rng.normal(0.0, 1.5e-4, n_spectra)
    return (flux.astype(np.float32), ivar.astype(np.float32), andmask, ormask, redshift)


def best_time(func, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = func()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.blas_threads)

    import numpy as np

    from lamost_mdwarf.kernels.continuum import (gaussian_weight, pseudo_continuum,
                                                 pseudo_continuum_dense)
    from lamost_mdwarf.kernels.masking import mask_spectra

    wavelength = 4500.0 + np.arange(args.n_pixels, dtype=np.float64)
    flux, ivar, andmask, ormask, redshift = make_spectra(args.n_spectra, wavelength,
                                                         args.seed)
    masked = mask_spectra(wavelength, flux, ivar, andmask, ormask, redshift)
    n = args.n_spectra
    print(f"spectra: {n} x {args.n_pixels} px (float32), L = {args.width} A "
          f"({args.convention}), BLAS threads = {args.blas_threads}, "
          f"masked pixels = {np.count_nonzero(masked.bitmask) / masked.bitmask.size:.1%}")

    def dense():
        return pseudo_continuum_dense(wavelength, masked.flux, masked.ivar, args.width,
                                      args.convention)

    def fast():
        return pseudo_continuum(wavelength, masked.flux, masked.ivar, args.width,
                                args.convention)

    first_fast, _ = best_time(fast, 1)  # includes building the cached operator
    t_dense = t_fast = float("inf")
    for _ in range(args.repeats):
        t, dense_result = best_time(dense, 1)
        t_dense = min(t_dense, t)
        t, fast_result = best_time(fast, 1)
        t_fast = min(t_fast, t)
    t_matrix, _ = best_time(lambda: gaussian_weight(
        wavelength[:, None] - wavelength[None, :], args.width, args.convention), args.repeats)

    fast64 = fast_result.astype(np.float64)
    same_nan = bool(np.array_equal(np.isnan(fast64), np.isnan(dense_result)))
    defined = ~np.isnan(dense_result)
    rel = np.abs(fast64[defined] - dense_result[defined]) / np.abs(dense_result[defined])
    max_rel = float(rel.max()) if rel.size else 0.0
    ratio = t_dense / t_fast
    ratio_no_matrix = (t_dense - t_matrix) / t_fast

    print(f"dense  : {t_dense / n * 1e6:9.1f} us/spectrum  (best of {args.repeats}; "
          f"of which weight-matrix build {t_matrix / n * 1e6:.1f})")
    print(f"fast   : {t_fast / n * 1e6:9.1f} us/spectrum  (best of {args.repeats}; "
          f"first call incl. operator build {first_fast / n * 1e6:.1f})")
    print(f"speed ratio dense/fast : {ratio:.1f}x  (excluding the dense weight-matrix "
          f"build: {ratio_no_matrix:.1f}x)")
    print(f"max relative difference: {max_rel:.2e}  (pixels compared: {rel.size}, "
          f"undefined in both: {int(np.count_nonzero(~defined))}, same NaN pattern: "
          f"{same_nan})")
    failures = []
    if ratio < args.min_ratio:
        failures.append(f"speed ratio {ratio:.1f} < {args.min_ratio}")
    if max_rel > args.max_rel_diff:
        failures.append(f"max relative difference {max_rel:.2e} > {args.max_rel_diff:g}")
    if not same_nan:
        failures.append("fast and dense disagree on undefined pixels")
    print("PASS" if not failures else "FAIL: " + "; ".join(failures))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
