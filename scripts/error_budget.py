"""Error budget of ``best``-mode Teff against the simulator's truth: what each term explains.

Reads the work directories that ``scripts/bench_accuracy.py`` leaves
(``OUT/work_<seed>_best`` with ``OUT/survey_<seed>/truth.csv``) and, for the single M
dwarfs *not* in the training set ("new stars": SNR_lambda >= 50, finite labels), splits
the reported Teff error into the terms the pipeline can measure and compares each
combination with the true errors:

* ``formal``: the inverse-Hessian errors times the repeat-observation scale;
* ``calibration``: the variance of the final Teff calibration from its coefficient
  covariance (catalog noise of its stars);
* ``jackknife``: the spread of the Teff that the ``validation_folds`` fold models (the
  cross-validation's models, each trained without one fold) give the same new star,
  ``(k - 1) / k * sum (T_k - mean)^2`` -- the delete-a-group jackknife variance of the
  final model's prediction, i.e. its training-sample variance, measured on the spectra
  alone, with no catalog noise in it;
* ``systematic``: the constant term estimated from the cross-validated residuals against
  the catalog (the pipeline's choice; uncertain by the printed +- K^2).

It prints the pull width (std of error / combined error) of each combination, the
constant term that would make the width exactly 1, the true error of the
cross-validated labels the systematic term is fitted on next to that of the new stars,
and how much of the error the catalog cannot see: the rms left after regressing the
true error on a cubic in true Teff with and without the true [Fe/H] and log g (not
catalog labels), and how much of [Fe/H] and log g at fixed Teff the latent labels carry.
For R it prints the correlation between the Teff-driven part of the error and the
star's intrinsic deviation from the R-Teff relation (the reported R error adds the two
in quadrature, i.e. assumes 0).

Usage::

    python scripts/bench_accuracy.py --out /tmp/bench_acc2 --n-stars 4000 --seeds 101 202 303
    python scripts/error_budget.py --out /tmp/bench_acc2 --seeds 101 202 303
    python scripts/error_budget.py --work /tmp/bench_dr1/run/work \
        --truth /tmp/bench_dr1/survey-122677-seed1/truth.csv          # DR1-size run

About 15 s per 4,000-star survey (ten fold models trained and applied), a few minutes
for the DR1-size run (10,000 training stars, 10,000 of the new stars).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import brentq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_accuracy import load_comparison, quality_and_single  # noqa: E402


def _pull(error: np.ndarray, variance: np.ndarray) -> float:
    return float(np.std(error / np.sqrt(variance), ddof=1))


def constant_for_unit_pull(error: np.ndarray, variance: np.ndarray) -> float:
    """The constant sigma that, added in quadrature, gives pull width 1 (0 if already <= 1)."""
    if _pull(error, variance) <= 1.0:
        return 0.0
    return float(brentq(lambda s: _pull(error, variance + s * s) - 1.0, 0.0, 10.0 * float(np.std(error)) + 1.0))


def fold_teff(flux: np.ndarray, ivar: np.ndarray, labels: np.ndarray, folds: np.ndarray,
              calibration, clip_sigma: float, clip_rounds: int) -> np.ndarray:
    """(k, n_new) calibrated Teff of the new stars from each fold model.

    ``flux``/``ivar`` hold the training stars (``labels``, ``folds``) then the new stars;
    each fold model is the pipeline's own (:func:`~lamost_mdwarf.kernels.label_refinement.fold_out_of_sample`:
    trained on the other folds), asked for its held-out fold and the new stars.
    """
    from lamost_mdwarf.kernels.label_refinement import apply_calibration, fold_out_of_sample

    n_train, n_new = labels.shape[0], flux.shape[0] - labels.shape[0]
    padded = np.vstack([labels, np.repeat(labels[:1], n_new, axis=0)])  # never trained on
    fold_ids = np.unique(folds)
    out = []
    for k in fold_ids:
        test = np.concatenate([np.flatnonzero(folds == k), n_train + np.arange(n_new)])
        fit = fold_out_of_sample(flux, ivar, padded, test, clip_sigma=clip_sigma, clip_rounds=clip_rounds)
        out.append(apply_calibration(calibration, fit.labels[-n_new:]))
        print(f"  fold model {k + 1}/{fold_ids.size}", flush=True)
    return np.asarray(out)


def select_new_stars(frame: pd.DataFrame, training_ids, max_new: int, seed: int = 0) -> np.ndarray:
    """Boolean mask of the single M dwarfs outside the training set (SNR >= 50, finite Teff).

    At most ``max_new`` of them (a seeded random subset), which bounds the time and memory
    on survey-size runs.
    """
    training = set(str(x) for x in training_ids)
    single = quality_and_single(frame)[1]
    new = single & (frame["snr_lambda"].to_numpy() >= 50) & np.isfinite(frame["teff"].to_numpy(float)) \
        & ~frame["spectrum_id"].isin(training).to_numpy()
    if new.sum() > max_new:
        keep = np.random.default_rng(seed).choice(np.flatnonzero(new), max_new, replace=False)
        new = np.zeros_like(new)
        new[keep] = True
    return new


def teff_terms(work: Path, model, new_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Per new star: model labels, calibrated Teff and the variance of each error term (K^2)."""
    import xarray as xr

    from lamost_mdwarf.inference import infer_dataset, physical_labels
    from lamost_mdwarf.io.survey_store import open_survey_store
    from lamost_mdwarf.kernels.label_refinement import PolynomialCalibration, calibration_variance, fold_assignments
    from lamost_mdwarf.modes import mode_from_settings
    from lamost_mdwarf.stages.train import normalized_spectra

    mode = mode_from_settings(model.settings)
    ids = [str(x) for x in open_survey_store(work / "store.zarr")["spectrum_id"].values]
    position = {sid: i for i, sid in enumerate(ids)}
    train_rows = np.array([position[str(s)] for s in model.training_ids])
    new_rows = np.array([position[str(s)] for s in new_ids])
    flux_t, ivar_t = normalized_spectra(work / "store.zarr", train_rows)
    flux_n, ivar_n = (array.load() for array in normalized_spectra(work / "store.zarr", new_rows))  # read once
    flux = np.vstack([np.asarray(flux_t.values, float), np.asarray(flux_n.values, float)])
    ivar = np.vstack([np.asarray(ivar_t.values, float), np.asarray(ivar_n.values, float)])
    calibration = PolynomialCalibration.from_dict(model.settings["teff_calibration"]["calibration"])
    folds = fold_assignments(train_rows.size, mode.validation_folds, seed=mode.seed + 1000)  # as run_validate
    per_fold = fold_teff(flux, ivar, model.training_labels, folds, calibration, mode.clip_sigma, mode.clip_rounds)
    k = per_fold.shape[0]

    fit = infer_dataset(flux_n, ivar_n, xr.DataArray(np.ones(new_rows.size, bool), dims="star"), model,
                        clip_sigma=mode.clip_sigma, clip_grow=mode.clip_grow, clip_rounds=mode.clip_rounds).compute()
    labels = np.column_stack([fit[name].values for name in model.label_names])
    no_systematic = physical_labels(model, labels, fit["covariance"].values, {"teff": 0.0},
                                    model.settings["validation"]["formal_scale"])["teff"]
    calibration_var = calibration_variance(calibration, model.settings["teff_calibration"]["coefficient_covariance"],
                                           labels)
    return {"labels": labels, "teff": no_systematic.value, "n_folds": k, "n_train": train_rows.size,
            "formal": no_systematic.error**2 - calibration_var, "calibration": calibration_var,
            "jackknife": (k - 1) / k * np.sum((per_fold - per_fold.mean(axis=0)) ** 2, axis=0)}


def cross_validated_error(work: Path, frame: pd.DataFrame) -> tuple[float, int]:
    """True Teff error rms of the cross-validated labels of single M dwarfs, and their number."""
    import xarray as xr

    cv = xr.open_zarr(work / "validation.zarr", consolidated=False)
    rows = np.asarray(cv["out_of_fold"].values) & np.asarray(cv["usable"].values)
    ids = np.asarray([str(x) for x in cv["spectrum_id"].values])[rows]
    single = quality_and_single(frame)[1]
    table = pd.DataFrame({"spectrum_id": ids, "cv": cv["teff_model"].values[rows]}).merge(
        frame[["spectrum_id", "true_teff"]][single], on="spectrum_id")
    return float(np.sqrt(np.mean((table["cv"] - table["true_teff"]) ** 2))), int(len(table))


def _residual(design: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``y`` minus its least-squares fit on ``design``."""
    return y - design @ np.linalg.lstsq(design, y, rcond=None)[0]


def survey_budget(work: Path, truth_path: Path, max_new: int = 10_000, seed: int = 0) -> dict:
    """The error budget of one best-mode work directory (see the module docstring)."""
    from lamost_mdwarf.model import load_model
    from lamost_mdwarf.relations import radius_from_teff

    model = load_model(work / "model.zarr")
    frame = load_comparison(work / "results.zarr", truth_path)
    truth = pd.read_csv(truth_path).drop_duplicates("spectrum_id").set_index("spectrum_id").loc[frame["spectrum_id"]]
    new = select_new_stars(frame, model.training_ids, max_new, seed)
    terms = teff_terms(work, model, frame["spectrum_id"].to_numpy()[new])
    true_teff = frame["true_teff"].to_numpy(float)[new]
    error = terms["teff"] - true_teff
    base = terms["formal"] + terms["calibration"]
    systematic = model.settings["validation"]["systematic"]["teff"]
    cv_rms, n_cv = cross_validated_error(work, frame)

    # what the catalog cannot see: the error's dependence on true [Fe/H] and log g, and how
    # much of them (at fixed Teff) the latent labels carry
    t = (true_teff - 3400.0) / 300.0
    feh = truth["feh"].to_numpy(float)[new]
    logg = truth["logg"].to_numpy(float)[new]
    cubic = np.column_stack([np.ones_like(t), t, t * t, t**3])
    physical = np.column_stack([cubic, feh, feh * t, feh * feh, logg - float(np.mean(logg))])
    latent = terms["labels"][:, 1:]
    products = [latent[:, i] * latent[:, j] for i in range(latent.shape[1]) for j in range(i, latent.shape[1])]
    with_latent = np.column_stack([cubic, latent, *products, t[:, None] * latent])

    def explained(y: np.ndarray) -> float:
        return float(1.0 - np.var(_residual(with_latent, y)) / np.var(_residual(cubic, y)))

    radius_new = new & np.isfinite(frame["radius"].to_numpy(float))
    true_t = frame["true_teff"].to_numpy(float)[radius_new]
    intrinsic = np.log(frame["true_radius"].to_numpy(float)[radius_new] / radius_from_teff(true_t))
    teff_driven = np.log(radius_from_teff(frame["teff"].to_numpy(float)[radius_new]) / radius_from_teff(true_t))
    return {
        "name": str(work), "n_new": int(new.sum()), "n_train": int(terms["n_train"]), "k": terms["n_folds"],
        "rms_error": float(np.sqrt(np.mean(error**2))),
        "rms_formal": float(np.sqrt(np.mean(terms["formal"]))),
        "rms_calibration": float(np.sqrt(np.mean(terms["calibration"]))),
        "rms_jackknife": float(np.sqrt(np.mean(terms["jackknife"]))),
        "systematic": float(systematic["sigma"]), "systematic_variance_error": float(systematic["variance_error"]),
        "pull_formal_calibration": _pull(error, base),
        "pull_with_jackknife": _pull(error, base + terms["jackknife"]),
        "pull_reported": _pull(error, base + systematic["sigma"] ** 2),
        "needed_constant": constant_for_unit_pull(error, base),
        "needed_beyond_jackknife": constant_for_unit_pull(error, base + terms["jackknife"]),
        "cv_rms_error": cv_rms, "n_cv": n_cv,
        "left_after_teff": float(np.sqrt(np.mean(_residual(cubic, error) ** 2))),
        "left_after_feh_logg": float(np.sqrt(np.mean(_residual(physical, error) ** 2))),
        "latent_r2_feh": explained(feh), "latent_r2_logg": explained(logg),
        "radius_teff_intrinsic_correlation": float(np.corrcoef(teff_driven, intrinsic)[0, 1]),
    }


def format_budget(b: dict) -> str:
    """Human-readable lines of one survey's budget."""
    return "\n".join([
        f"{b['name']}: {b['n_new']} new single M dwarfs, {b['n_train']} training stars, {b['k']} fold models",
        f"  true Teff error rms {b['rms_error']:.1f} K; terms (rms): formal x repeat scale {b['rms_formal']:.1f}, "
        f"calibration {b['rms_calibration']:.1f}, jackknife {b['rms_jackknife']:.1f}, "
        f"catalog-estimated systematic {b['systematic']:.1f} (variance +- {b['systematic_variance_error']:.0f} K^2)",
        f"  pull width: formal + calibration {b['pull_formal_calibration']:.2f}; + jackknife "
        f"{b['pull_with_jackknife']:.2f}; + systematic (reported) {b['pull_reported']:.2f}",
        f"  constant term for width 1: {b['needed_constant']:.1f} K on formal + calibration, "
        f"{b['needed_beyond_jackknife']:.1f} K beyond the jackknife",
        f"  cross-validated labels (what the systematic term is fitted on): true error rms {b['cv_rms_error']:.1f} K "
        f"({b['n_cv']} stars) vs {b['rms_error']:.1f} K for new stars",
        f"  error rms left after a cubic in true Teff {b['left_after_teff']:.1f} K, after adding true [Fe/H] and "
        f"log g {b['left_after_feh_logg']:.1f} K (formal alone {b['rms_formal']:.1f} K)",
        f"  latent labels at fixed true Teff explain {b['latent_r2_feh']:.2f} of the [Fe/H] variance and "
        f"{b['latent_r2_logg']:.2f} of the log g variance",
        f"  R: correlation of the Teff-driven error with the intrinsic R deviation "
        f"{b['radius_teff_intrinsic_correlation']:+.2f} (the reported error assumes 0)",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="directory of a bench_accuracy.py run (with --seeds)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[])
    parser.add_argument("--work", type=Path, help="or: one best-mode work directory (with --truth)")
    parser.add_argument("--truth", type=Path, help="the simulator's truth.csv of --work's survey")
    parser.add_argument("--max-new", type=int, default=10_000, help="at most this many new stars (random subset)")
    args = parser.parse_args()
    if not (args.seeds or args.work) or (args.work is not None and args.truth is None) \
            or (args.seeds and args.out is None):
        parser.error("give --out with --seeds, or --work with --truth")
    runs = [(args.out / f"work_{seed}_best", args.out / f"survey_{seed}" / "truth.csv") for seed in args.seeds]
    if args.work is not None:
        runs.append((args.work, args.truth))
    for work, truth in runs:
        print(format_budget(survey_budget(work, truth, args.max_new)), flush=True)


if __name__ == "__main__":
    main()
