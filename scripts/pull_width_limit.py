"""How precisely can a catalog with noisy labels calibrate a systematic error term?

The ``best`` mode's per-star Teff error adds a systematic term estimated from residuals
of cross-validated Cannon labels against the catalog (``fit_systematic_variance``). The
catalog's Teff errors (100-160 K for the TESS Cool Dwarf Catalog) are several times the
term itself (~20 K), so the estimate of its variance is uncertain by roughly
``sqrt(2 / N) x mean(e_catalog^2)``. This Monte Carlo draws many validation sets of N
stars with a known systematic term, estimates it exactly as the pipeline does, and
reports the pull width that the estimated term would give on independent stars
(``sqrt((sigma^2 + f^2) / (sigma_hat^2 + f^2))``, f the formal error): the fraction of
draws with a pull width within 1.0 +- 0.1 is the best any survey of that size and
catalog quality can expect, whatever the Cannon does.

Usage::

    python scripts/pull_width_limit.py --n-stars 1400 4000 11000 30000 --trials 200

Prints one row per N: median pull width and the fractions within 0.9-1.1, below 0.8 and
above 1.25, for the pipeline's estimator (posterior mean) and the maximum-likelihood one.
"""
from __future__ import annotations

import argparse

import numpy as np

from lamost_mdwarf.kernels.uncertainty import fit_systematic_variance


def pull_widths(n_stars: int, sigma_sys: float, formal: float, catalog_err: tuple[float, float],
                trials: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Pull widths implied by the posterior-mean and ML estimates over ``trials`` draws.

    Parameters
    ----------
    n_stars : int
        Validation stars per draw.
    sigma_sys : float
        True systematic term, K.
    formal : float
        Formal error of every star, K.
    catalog_err : tuple of float
        Catalog errors are uniform in this range, K.
    trials : int
        Number of draws.
    rng : numpy.random.Generator

    Returns
    -------
    dict
        ``"posterior_mean"``, ``"maximum_likelihood"`` -> (trials,) pull widths.
    """
    out: dict[str, list[float]] = {"posterior_mean": [], "maximum_likelihood": []}
    truth = sigma_sys**2 + formal**2
    for _ in range(trials):
        err = rng.uniform(*catalog_err, n_stars)
        residual = rng.normal(0.0, np.sqrt(err**2 + truth))
        fit = fit_systematic_variance(residual, err, np.full(n_stars, formal))
        out["posterior_mean"].append(np.sqrt(truth / (fit.sigma**2 + formal**2)))
        out["maximum_likelihood"].append(np.sqrt(truth / (fit.sigma_ml**2 + formal**2)))
    return {key: np.asarray(values) for key, values in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-stars", type=int, nargs="+", default=[1400, 4000, 11000, 30000])
    parser.add_argument("--sigma-sys", type=float, default=20.0, help="true systematic term, K")
    parser.add_argument("--formal", type=float, default=8.0, help="formal error (scaled), K")
    parser.add_argument("--catalog-err", type=float, nargs=2, default=(100.0, 160.0))
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    print(f"systematic {args.sigma_sys} K, formal {args.formal} K, catalog errors U{tuple(args.catalog_err)} K, "
          f"{args.trials} draws per size")
    print(f"{'N stars':>8} {'estimator':>19} {'median pull':>12} {'0.9-1.1':>8} {'< 0.8':>7} {'> 1.25':>7}")
    for n in args.n_stars:
        for name, widths in pull_widths(n, args.sigma_sys, args.formal, tuple(args.catalog_err), args.trials,
                                        rng).items():
            print(f"{n:>8} {name:>19} {np.median(widths):>12.2f} {np.mean(np.abs(widths - 1) <= 0.1):>8.2f} "
                  f"{np.mean(widths < 0.8):>7.2f} {np.mean(widths > 1.25):>7.2f}")


if __name__ == "__main__":
    main()
