"""Our Cannon kernels against TheCannon (PyPI ``thecannon``), on the same data, in one run.

Usage::

    python scripts/bench_cannon.py [--n-train 1000] [--n-pixels 3000] [--n-test 10000]
                                   [--their-test-stars 1000] [--chunk 1000] [--seed 2020]
                                   [--repeat 3] [--quick]

TheCannon 0.7.3 (Ho et al.; the code Galgano et al. 2020 used) is an optional
dependency (``pip install thecannon==0.7.3``, or the ``bench`` extra); it installs as
the module ``TheCannon`` (``TheCannon.dataset.Dataset``, ``TheCannon.model.CannonModel``;
its package ``__init__`` is empty).

What it does
------------
1. Simulates normalized spectra from a *known* quadratic Cannon model: 4 labels (Teff
   2900-4100 K; R and M on the package's Mann et al. 2015 Teff relations with 10 %
   correlated log-normal scatter; L = R^2 (Teff / 5772 K)^4), a random smooth
   ``theta`` over ``--n-pixels`` pixels (absorption lines whose depths respond to the
   labels), an intrinsic scatter ``s_p`` (0 in 10 % of the pixels), per-pixel photon
   noise for SNR 50-300 and masked pixels (ivar = 1e-5 as in the paper's pipeline, or
   0; their flux is garbage). Fixed seed.
2. Trains both codes on the same training flux, ivar and labels and times it:
   ours = ``compute_label_scaling`` + ``design_matrix`` + ``train_pixels``;
   theirs = ``CannonModel(2, useErrors=False).train(Dataset)``.
3. Runs both test steps on the same test spectra and times them. Ours:
   ``infer_labels`` on all test stars, in chunks of ``--chunk`` stars, with the default
   multi-start points of ``starting_points_from_training``. Theirs:
   ``CannonModel.infer_labels`` (one ``scipy.optimize.curve_fit`` per star from its
   default start, scaled labels = 1) on the first ``--their-test-stars`` test stars
   only (a Python loop over stars: its per-star time does not depend on their number).
4. Compares the labels (physical units) on those stars three ways: both test steps on
   the model TheCannon trained, both on the model we trained (TheCannon's
   ``CannonModel`` given our ``theta``, ``sqrt(s2)``, pivots and scales), and end to end
   (each code with the model it trained). With a shared model both codes minimise
   exactly the same chi2, so "both reach the optimum" is checkable: both converged and
   their chi2 under that model differ by < 1. The agreement target is judged on the two
   shared-model comparisons; the end-to-end numbers are printed for information, next to
   the training likelihood of both models, because TheCannon's training does not reach
   the optimum (its scatter comes from a 19-point grid in ln s).

Times are process CPU seconds (one BLAS thread, so CPU time = time on one core, not
inflated when other processes compete for the cores); wall-clock times are printed too.
``--repeat R`` runs every timed step of *both* codes R times and keeps the fastest.

Per core: the BLAS thread pools are limited to one thread *before numpy is imported*
(``OMP_NUM_THREADS`` etc. are forced to 1 below, and ``threadpoolctl`` is used as well
when it is installed), and everything runs in this single process, so a time per star
is a time per star per core for both codes.

Compatibility with numpy 2: TheCannon's training catches ``np.linalg.linalg.LinAlgError``;
that alias was removed from numpy. :func:`import_thecannon` restores it (an attribute
pointing at ``np.linalg.LinAlgError``) inside this process only; it is only evaluated
when a normal matrix is singular. Nothing of TheCannon is copied into the package.
TheCannon mutates its inputs (training ivar < 0.01 is clamped to 0.01; test flux is set
to 1 where ivar == 0): it is always given copies.

Targets (issue item 9): ours trains >= 10x faster, the test step is >= 50x faster per
star per core, and where both codes reach the same optimum the labels agree to within
0.05 of our formal error (here: for >= 99 % of those stars, in all four labels, in both
shared-model comparisons). Exit status 0 only if every target passes.
"""
from __future__ import annotations

import os

# Before numpy is imported: one BLAS/OpenMP thread, so that times are per core.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")  # TheCannon imports matplotlib.pyplot

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, NamedTuple  # noqa: E402

import numpy as np  # noqa: E402

from lamost_mdwarf.kernels.cannon_design import (  # noqa: E402
    LabelScaling,
    compute_label_scaling,
    design_matrix,
    quadratic_term_pairs,
    scale_labels,
)
from lamost_mdwarf.kernels.cannon_infer import (  # noqa: E402
    DEFAULT_MASKED_IVAR_THRESHOLD,
    InferenceResult,
    InferenceStatus,
    _quartic_statistics,
    chi2_from_statistics,
    infer_labels,
    starting_points_from_training,
    sufficient_statistics,
)
from lamost_mdwarf.kernels.cannon_train import TrainingResult, train_pixels  # noqa: E402
from lamost_mdwarf.relations import (  # noqa: E402
    luminosity_from_radius_teff,
    mass_from_teff,
    radius_from_teff,
)

LABEL_NAMES: tuple[str, ...] = ("Teff", "R", "M", "L")

#: Targets of issue item 9.
TRAIN_SPEEDUP_TARGET = 10.0
TEST_SPEEDUP_TARGET = 50.0
AGREEMENT_TOLERANCE = 0.05  # |ours - theirs| < 0.05 x our formal error
#: Fraction of the stars at the same optimum that must agree in all labels.
AGREEMENT_FRACTION_TARGET = 0.99
#: Two fits whose chi2 (under the same model) differ by less than this are at the same optimum.
SAME_OPTIMUM_DELTA_CHI2 = 1.0
#: Masked pixels: the paper's pipeline gives them ivar = 1e-5; some get exactly 0.
MASKED_IVAR = 1e-5


def _limit_threads() -> str:
    """Limit BLAS to one thread with threadpoolctl when available; describe the setting."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return "1 (OMP/OPENBLAS/MKL_NUM_THREADS=1 set before numpy import)"
    threadpool_limits(1)
    return "1 (OMP/OPENBLAS/MKL_NUM_THREADS=1 before numpy import + threadpoolctl)"


class Timing(NamedTuple):
    """Wall-clock and process CPU seconds of one timed call.

    With one BLAS thread and no other threads, ``cpu`` is the time on one core and is
    not inflated when other processes compete for the cores (``wall`` is); the speed
    ratios use ``cpu``.
    """

    wall: float
    cpu: float


class _Stopwatch:
    """Context manager measuring :class:`Timing` (``.timing`` after exit)."""

    def __enter__(self) -> "_Stopwatch":
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timing = Timing(time.perf_counter() - self._wall, time.process_time() - self._cpu)


# ---------------------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------------------


@dataclass
class SyntheticData:
    """Normalized spectra drawn from a known quadratic Cannon model.

    Attributes
    ----------
    wavelength : numpy.ndarray
        Shape (P,), Angstrom (4500 A + 1 A steps).
    train_labels, test_labels : numpy.ndarray
        Shapes (N_train, 4) and (N_test, 4): Teff [K], R [Rsun], M [Msun], L [Lsun].
    train_flux, train_ivar, test_flux, test_ivar : numpy.ndarray
        Normalized flux (dimensionless) and its inverse variance, shape (N, P).
    train_snr, test_snr : numpy.ndarray
        Per-star SNR, shape (N,).
    true_theta : numpy.ndarray
        Shape (P, 15), the generating model (our term order, scaling ``true_scaling``).
    true_s2 : numpy.ndarray
        Shape (P,), the generating intrinsic scatter squared.
    true_scaling : LabelScaling
        Label scaling of the generating model (that of the training labels).
    """

    wavelength: np.ndarray
    train_labels: np.ndarray
    train_flux: np.ndarray
    train_ivar: np.ndarray
    train_snr: np.ndarray
    test_labels: np.ndarray
    test_flux: np.ndarray
    test_ivar: np.ndarray
    test_snr: np.ndarray
    true_theta: np.ndarray
    true_s2: np.ndarray
    true_scaling: LabelScaling


def draw_labels(n_stars: int, rng: np.random.Generator) -> np.ndarray:
    """M-dwarf labels (Teff, R, M, L) following the Mann et al. (2015) relations.

    Parameters
    ----------
    n_stars : int
        Number of stars.
    rng : numpy.random.Generator
        Random generator.

    Returns
    -------
    numpy.ndarray
        Shape (n_stars, 4): Teff [K] uniform in 2900-4100, R [Rsun] and M [Msun] on the
        relations with 10 % log-normal scatter (correlated 0.7 between R and M, as at
        fixed Teff metallicity moves both), L = R^2 (Teff / 5772)^4 [Lsun].
    """
    teff = rng.uniform(2900.0, 4100.0, n_stars)
    z_r = rng.standard_normal(n_stars)
    z_m = 0.7 * z_r + np.sqrt(1.0 - 0.7**2) * rng.standard_normal(n_stars)
    radius = radius_from_teff(teff) * np.exp(0.10 * z_r)
    mass = mass_from_teff(teff) * np.exp(0.10 * z_m)
    luminosity = luminosity_from_radius_teff(radius, teff)
    return np.column_stack([teff, radius, mass, luminosity])


def _smooth(values: np.ndarray, width_pixels: float) -> np.ndarray:
    """Gaussian smoothing along the last axis (FFT, periodic; only used for smooth noise)."""
    n = values.shape[-1]
    freq = np.fft.rfftfreq(n)
    kernel = np.exp(-2.0 * (np.pi * freq * width_pixels) ** 2)
    return np.fft.irfft(np.fft.rfft(values, axis=-1) * kernel, n=n, axis=-1)


def make_true_model(n_pixels: int, n_terms: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random, smooth quadratic Cannon model.

    ``theta_0`` is a pseudo-continuum-normalized M-dwarf-like spectrum (1 minus ~1 line
    per 10 pixels, Gaussian profiles of 1.5-4 pixels, depths 0.02-0.5, plus broad bands);
    every other term is a sum of the same line profiles with random label responses
    (linear terms ~0.3 x depth, quadratic terms ~0.05 x depth) plus a smooth broad
    component, so each label changes the spectrum in its own way.

    Parameters
    ----------
    n_pixels : int
        Number of pixels P.
    n_terms : int
        Number of design terms T (15 for 4 labels).
    rng : numpy.random.Generator
        Random generator.

    Returns
    -------
    theta : numpy.ndarray
        Shape (P, T), our term order.
    s2 : numpy.ndarray
        Shape (P,), intrinsic scatter squared (0 in 10 % of the pixels, otherwise
        s ~ 0.005 exp(N(0, 0.5))).
    """
    n_labels = (np.sqrt(8 * n_terms + 1) - 3) / 2  # T = (K+1)(K+2)/2
    n_labels = int(round(n_labels))
    pairs = quadratic_term_pairs(n_labels)
    is_linear = (pairs[:, 1] == n_labels) & (pairs[:, 0] < n_labels)
    pixel = np.arange(n_pixels, dtype=np.float64)
    n_lines = max(n_pixels // 10, 5)
    centres = rng.uniform(0, n_pixels, n_lines)
    widths = rng.uniform(1.5, 4.0, n_lines)
    depths = rng.uniform(0.02, 0.5, n_lines) * rng.uniform(0.2, 1.0, n_lines)
    response = np.empty((n_lines, n_terms))
    response[:, 0] = 1.0
    response[:, 1:] = np.where(is_linear[1:], 0.3, 0.05) * rng.standard_normal((n_lines, n_terms - 1))
    theta = np.zeros((n_pixels, n_terms))
    for start in range(0, n_lines, 256):  # line profiles in blocks (memory)
        sl = slice(start, start + 256)
        profile = np.exp(-0.5 * ((pixel[:, None] - centres[None, sl]) / widths[None, sl]) ** 2)
        theta -= profile @ (depths[sl, None] * response[sl])
    broad = _smooth(rng.standard_normal((n_terms, n_pixels)), 40.0)
    broad /= broad.std(axis=1, keepdims=True)
    amplitude = np.where(is_linear, 0.02, 0.004)
    amplitude[0] = 0.03
    theta += (amplitude[:, None] * broad).T
    theta[:, 0] += 1.0
    s = 0.005 * np.exp(0.5 * rng.standard_normal(n_pixels))
    s[rng.random(n_pixels) < 0.10] = 0.0
    return theta, s * s


def draw_spectra(
    labels: np.ndarray,
    theta: np.ndarray,
    s2: np.ndarray,
    scaling: LabelScaling,
    rng: np.random.Generator,
    snr_range: tuple[float, float] = (50.0, 300.0),
    chunk: int = 1000,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noisy normalized spectra with masked pixels from a known model.

    Parameters
    ----------
    labels : numpy.ndarray
        Shape (N, K), physical units.
    theta, s2 : numpy.ndarray
        Generating model, shapes (P, T) and (P,).
    scaling : LabelScaling
        Label scaling of the generating model.
    rng : numpy.random.Generator
        Random generator.
    snr_range : tuple of float
        Per-star SNR drawn log-uniformly in this range.
    chunk : int
        Stars per generation block (memory).

    Returns
    -------
    flux, ivar : numpy.ndarray
        Shape (N, P). ``sigma_np = sqrt(max(model, 0.05)) / (SNR_n t_p)`` with a smooth
        throughput ``t_p`` (0.7 blue to 1.2 red); per star 1 % random masked pixels and,
        for 30 % of the stars, a masked block of 20-80 pixels. Masked pixels get
        ivar = 1e-5 (70 %) or 0 (30 %) and a corrupted (but finite) flux.
    snr : numpy.ndarray
        Shape (N,).
    """
    n_stars, n_pixels = labels.shape[0], theta.shape[0]
    throughput = np.linspace(0.7, 1.2, n_pixels)
    snr = np.exp(rng.uniform(np.log(snr_range[0]), np.log(snr_range[1]), n_stars))
    flux = np.empty((n_stars, n_pixels))
    ivar = np.empty((n_stars, n_pixels))
    s = np.sqrt(s2)
    for start in range(0, n_stars, chunk):
        sl = slice(start, min(start + chunk, n_stars))
        n = sl.stop - sl.start
        model = design_matrix(scale_labels(labels[sl], scaling.pivots, scaling.scales)) @ theta.T
        sigma = np.sqrt(np.maximum(model, 0.05)) / (snr[sl, None] * throughput[None, :])
        f = model + s[None, :] * rng.standard_normal((n, n_pixels)) + sigma * rng.standard_normal((n, n_pixels))
        iv = 1.0 / sigma**2
        masked = rng.random((n, n_pixels)) < 0.01
        with_block = np.flatnonzero(rng.random(n) < 0.30)
        for row in with_block:
            length = int(rng.integers(20, 81))
            first = int(rng.integers(0, max(n_pixels - length, 1)))
            masked[row, first:first + length] = True
        iv[masked] = np.where(rng.random(int(masked.sum())) < 0.7, MASKED_IVAR, 0.0)
        f[masked] += 0.3 * rng.standard_normal(int(masked.sum()))
        flux[sl], ivar[sl] = f, iv
    return flux, ivar, snr


def simulate(n_train: int, n_test: int, n_pixels: int, seed: int) -> SyntheticData:
    """Draw the full benchmark data set (see the module docstring).

    Parameters
    ----------
    n_train, n_test, n_pixels : int
        Sizes.
    seed : int
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    SyntheticData
    """
    rng = np.random.default_rng(seed)
    train_labels = draw_labels(n_train, rng)
    test_labels = draw_labels(n_test, rng)
    scaling = compute_label_scaling(train_labels)
    theta, s2 = make_true_model(n_pixels, design_matrix(np.zeros((1, 4))).shape[1], rng)
    train_flux, train_ivar, train_snr = draw_spectra(train_labels, theta, s2, scaling, rng)
    test_flux, test_ivar, test_snr = draw_spectra(test_labels, theta, s2, scaling, rng)
    return SyntheticData(
        wavelength=4500.0 + np.arange(n_pixels, dtype=np.float64),
        train_labels=train_labels, train_flux=train_flux, train_ivar=train_ivar, train_snr=train_snr,
        test_labels=test_labels, test_flux=test_flux, test_ivar=test_ivar, test_snr=test_snr,
        true_theta=theta, true_s2=s2, true_scaling=scaling,
    )


# ---------------------------------------------------------------------------------------
# Our code
# ---------------------------------------------------------------------------------------


class OurModel(NamedTuple):
    """Our trained model and the training time."""

    training: TrainingResult
    scaling: LabelScaling
    timing: Timing


def train_ours(data: SyntheticData) -> OurModel:
    """Train with the package kernels (label scaling, design matrix, ``train_pixels``).

    Parameters
    ----------
    data : SyntheticData
        The benchmark data.

    Returns
    -------
    OurModel
    """
    with _Stopwatch() as watch:
        scaling = compute_label_scaling(data.train_labels)
        design = design_matrix(scale_labels(data.train_labels, scaling.pivots, scaling.scales))
        training = train_pixels(design, data.train_flux, data.train_ivar)
    return OurModel(training, scaling, watch.timing)


def infer_ours(
    theta: np.ndarray,
    s2: np.ndarray,
    scaling: LabelScaling,
    flux: np.ndarray,
    ivar: np.ndarray,
    training_labels: np.ndarray,
    chunk: int,
    n_starts: int | None = None,
) -> tuple[InferenceResult, Timing]:
    """Our test step (``infer_labels``), chunk by chunk; returns the results and timing.

    Parameters
    ----------
    theta, s2 : numpy.ndarray
        Trained model in our term order, shapes (P, T) and (P,).
    scaling : LabelScaling
        Label scaling of the model.
    flux, ivar : numpy.ndarray
        Test spectra, shape (N, P).
    training_labels : numpy.ndarray
        Shape (N_train, K); the default multi-start points are derived from them.
    chunk : int
        Stars per ``infer_labels`` call.
    n_starts : int, optional
        Use only the first ``n_starts`` default starting points (the first is the median).

    Returns
    -------
    result : InferenceResult
        Concatenated over the chunks.
    timing : Timing
        Of the whole test step (starting points included).
    """
    with _Stopwatch() as watch:
        starts = starting_points_from_training(training_labels)[:n_starts]
        parts = []
        for first in range(0, flux.shape[0], chunk):
            sl = slice(first, first + chunk)
            parts.append(infer_labels(flux[sl], ivar[sl], theta, s2, scaling.pivots, scaling.scales, starts))
    result = InferenceResult(*(np.concatenate([getattr(p, f) for p in parts]) for f in InferenceResult._fields))
    return result, watch.timing


def training_nll(design: np.ndarray, flux: np.ndarray, ivar: np.ndarray, theta: np.ndarray,
                 s2: np.ndarray, chunk: int = 500) -> np.ndarray:
    """Per-pixel training negative log likelihood of a model ``(theta, s2)`` on the data.

    ``NLL_p = 1/2 sum_n [w_np (f_np - theta_p . A_n)^2 - ln w_np]``, ``w = ivar / (1 + ivar s2)``
    with the data's own ivar (stars with ivar = 0 drop out), as in
    :mod:`lamost_mdwarf.kernels.cannon_train`.

    Parameters
    ----------
    design : numpy.ndarray
        Shape (N, T), our term order.
    flux, ivar : numpy.ndarray
        Training spectra, shape (N, P).
    theta, s2 : numpy.ndarray
        Shapes (P, T) and (P,).
    chunk : int
        Pixels per block (memory).

    Returns
    -------
    numpy.ndarray
        Shape (P,).
    """
    out = np.empty(flux.shape[1])
    for first in range(0, flux.shape[1], chunk):
        sl = slice(first, first + chunk)
        weight = ivar[:, sl] / (1.0 + ivar[:, sl] * s2[sl])
        resid = flux[:, sl] - design @ theta[sl].T
        log_w = np.log(weight, out=np.zeros_like(weight), where=weight > 0)
        out[sl] = 0.5 * (np.sum(weight * resid * resid, axis=0) - log_w.sum(axis=0))
    return out


# ---------------------------------------------------------------------------------------
# TheCannon
# ---------------------------------------------------------------------------------------


def import_thecannon() -> types.ModuleType:
    """Import TheCannon 0.7.3 with the numpy-2 shim described in the module docstring.

    Returns
    -------
    module
        The ``TheCannon`` package, with its ``dataset`` and ``model`` submodules imported.

    Raises
    ------
    SystemExit
        If TheCannon is not installed.
    """
    if not hasattr(np.linalg, "linalg"):  # removed in numpy 2; TheCannon's except clause uses it
        np.linalg.linalg = types.SimpleNamespace(LinAlgError=np.linalg.LinAlgError)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import TheCannon
            import TheCannon.dataset  # noqa: F401  (its __init__.py is empty)
            import TheCannon.model  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"TheCannon is not importable ({exc}); install it with `pip install thecannon==0.7.3`")
    return TheCannon


def their_term_permutation(n_labels: int) -> np.ndarray:
    """Column permutation from our design order to TheCannon's.

    TheCannon's label vector is ``[1, x_1..x_K, triu(outer(x, x)) row-major]``
    (``x_1^2, x_1 x_2, .., x_2^2, ..``); ours is ``[1, x, cross terms, squares]``.

    Parameters
    ----------
    n_labels : int
        K.

    Returns
    -------
    numpy.ndarray
        ``perm`` with ``ours[..., perm] == theirs``, shape (T,).
    """
    one = n_labels
    ours = {tuple(sorted(pair)): t for t, pair in enumerate(quadratic_term_pairs(n_labels).tolist())}
    theirs = [(one, one)] + [(i, one) for i in range(n_labels)]
    rows, cols = np.triu_indices(n_labels)
    theirs += [(int(i), int(j)) for i, j in zip(rows, cols)]
    return np.array([ours[tuple(sorted(pair))] for pair in theirs], dtype=np.intp)


def _their_dataset(tc: types.ModuleType, data: SyntheticData, test_rows: slice) -> Any:
    """A TheCannon ``Dataset`` holding *copies* of the arrays (it mutates its inputs)."""
    n_train = data.train_flux.shape[0]
    test_flux = data.test_flux[test_rows].copy()
    with contextlib.redirect_stdout(io.StringIO()):
        ds = tc.dataset.Dataset(
            data.wavelength.copy(), np.arange(n_train).astype(str), data.train_flux.copy(),
            data.train_ivar.copy(), data.train_labels.copy(), np.arange(test_flux.shape[0]).astype(str),
            test_flux, data.test_ivar[test_rows].copy(),
        )
    ds.set_label_names(list(LABEL_NAMES))
    return ds


def train_theirs(tc: types.ModuleType, data: SyntheticData) -> tuple[Any, Timing]:
    """Train ``CannonModel(order=2, useErrors=False)``; returns the model and timing.

    Parameters
    ----------
    tc : module
        The TheCannon package.
    data : SyntheticData
        The benchmark data (TheCannon gets copies).

    Returns
    -------
    model : TheCannon.model.CannonModel
    timing : Timing
        Of ``model.train`` only (the ``Dataset`` is built before).
    """
    ds = _their_dataset(tc, data, slice(0, 0))
    model = tc.model.CannonModel(2, useErrors=False)
    with contextlib.redirect_stdout(io.StringIO()), _Stopwatch() as watch:
        model.train(ds)
    return model, watch.timing


class TheirTest(NamedTuple):
    """TheCannon test-step output for the first ``n`` test stars."""

    labels: np.ndarray  # (n, K) physical
    errors: np.ndarray  # (n, K) as returned (scaled units)
    chi2: np.ndarray  # (n,)
    timing: Timing  # of model.infer_labels
    n_failed: int  # curve_fit RuntimeError ("Error - curve_fit failed")


def infer_theirs(tc: types.ModuleType, model: Any, data: SyntheticData, n_stars: int) -> TheirTest:
    """TheCannon's test step (``model.infer_labels``) on the first ``n_stars`` test stars.

    Parameters
    ----------
    tc : module
        The TheCannon package.
    model : TheCannon.model.CannonModel
        Trained (or with ``coeffs, scatters, pivots, scales`` set).
    data : SyntheticData
        The benchmark data (TheCannon gets copies).
    n_stars : int
        Number of test stars.

    Returns
    -------
    TheirTest
    """
    ds = _their_dataset(tc, data, slice(0, n_stars))
    log = io.StringIO()
    with contextlib.redirect_stdout(log), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # curve_fit's OptimizeWarning on singular covariances
        with _Stopwatch() as watch:
            errors, chi2 = model.infer_labels(ds)
    return TheirTest(np.asarray(ds.test_label_vals), np.asarray(errors), np.asarray(chi2), watch.timing,
                     log.getvalue().count("curve_fit failed"))


def shared_model(tc: types.ModuleType, ours: OurModel) -> Any:
    """A TheCannon ``CannonModel`` carrying *our* trained ``theta`` and ``s``.

    Parameters
    ----------
    tc : module
        The TheCannon package.
    ours : OurModel
        Our trained model.

    Returns
    -------
    TheCannon.model.CannonModel
        ``coeffs`` = our theta in TheCannon's term order, ``scatters = sqrt(s2)``, our
        pivots and scales.
    """
    n_labels = ours.scaling.pivots.size
    model = tc.model.CannonModel(2, useErrors=False)
    model.coeffs = ours.training.theta[:, their_term_permutation(n_labels)]
    model.scatters = np.sqrt(ours.training.s2)
    model.pivots = ours.scaling.pivots.copy()
    model.scales = ours.scaling.scales.copy()
    return model


def their_model_in_our_order(model: Any) -> tuple[np.ndarray, np.ndarray]:
    """TheCannon's trained ``(coeffs, scatters)`` as our ``(theta, s2)``."""
    perm = their_term_permutation(len(model.pivots))
    theta = np.empty_like(model.coeffs)
    theta[:, perm] = model.coeffs
    return theta, np.asarray(model.scatters) ** 2


# ---------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------


class Agreement(NamedTuple):
    """Label agreement between the codes on the stars both ran on.

    With a shared model (``same_model``), "same optimum" means both codes converged and
    their chi2 under that model differ by less than :data:`SAME_OPTIMUM_DELTA_CHI2`;
    end to end (two different models) it means both converged.
    """

    same_model: bool
    n_compared: int
    n_both_converged: int
    n_same_optimum: int
    frac_within: np.ndarray  # (K,) among same-optimum stars
    frac_all_within: float  # all K labels, among same-optimum stars
    frac_all_within_converged: float  # all K labels, among all jointly converged stars
    median_ratio: np.ndarray  # (K,) median |diff| / our error, same-optimum stars
    p99_ratio: np.ndarray  # (K,)
    n_disagree: int  # jointly converged stars with some label >= tolerance
    n_ours_lower: int  # ... where our chi2 is lower by more than 1e-6 relative (shared model only)
    n_theirs_lower: int
    n_equal: int
    median_delta_chi2_disagree: float  # median chi2(theirs) - chi2(ours) among disagreeing


def their_converged(labels: np.ndarray, model_pivots: np.ndarray, model_scales: np.ndarray) -> np.ndarray:
    """TheCannon's usable results: finite, not the -9999 failure value, not at its start.

    Its default start is scaled labels = 1 (``starting_guess = np.ones(K)``).
    """
    finite = np.all(np.isfinite(labels), axis=1)
    scaled = (labels - model_pivots) / model_scales
    failed = np.any(scaled <= -9000.0, axis=1)
    at_start = np.all(np.abs(scaled - 1.0) < 1e-10, axis=1)
    return finite & ~failed & ~at_start


def compare(
    ours: InferenceResult,
    theirs_labels: np.ndarray,
    theirs_ok: np.ndarray,
    chi2_ours: np.ndarray | None = None,
    chi2_theirs: np.ndarray | None = None,
) -> Agreement:
    """Agreement statistics (see :class:`Agreement`).

    Parameters
    ----------
    ours : InferenceResult
        Our results for the n compared stars.
    theirs_labels : numpy.ndarray
        Shape (n, K), physical.
    theirs_ok : numpy.ndarray
        Shape (n,), bool (:func:`their_converged`).
    chi2_ours, chi2_theirs : numpy.ndarray, optional
        Shape (n,), chi2 of both label sets under the *same* model; omit them when the
        two label sets come from different models (end to end).

    Returns
    -------
    Agreement
    """
    n = theirs_labels.shape[0]
    error = np.sqrt(np.einsum("nkk->nk", ours.covariance))
    ours_ok = (ours.status == InferenceStatus.OK) & np.all(np.isfinite(error), axis=1)
    both = ours_ok & theirs_ok
    ratio = np.abs(ours.labels - theirs_labels) / error
    within = ratio < AGREEMENT_TOLERANCE
    disagree = both & ~np.all(within, axis=1)
    same_model = chi2_ours is not None and chi2_theirs is not None
    if same_model:
        delta_chi2 = chi2_theirs - chi2_ours
        same = both & (np.abs(delta_chi2) < SAME_OPTIMUM_DELTA_CHI2)
        tol = 1e-6 * np.abs(chi2_ours)
        lower = (int((disagree & (delta_chi2 > tol)).sum()), int((disagree & (delta_chi2 < -tol)).sum()),
                 int((disagree & (np.abs(delta_chi2) <= tol)).sum()))
        median_delta = float(np.median(delta_chi2[disagree])) if disagree.any() else float("nan")
    else:
        same = both
        lower, median_delta = (-1, -1, -1), float("nan")
    nan = np.full(ratio.shape[1], np.nan)
    return Agreement(
        same_model=same_model,
        n_compared=n,
        n_both_converged=int(both.sum()),
        n_same_optimum=int(same.sum()),
        frac_within=within[same].mean(axis=0) if same.any() else nan,
        frac_all_within=float(np.all(within[same], axis=1).mean()) if same.any() else float("nan"),
        frac_all_within_converged=float(np.all(within[both], axis=1).mean()) if both.any() else float("nan"),
        median_ratio=np.median(ratio[same], axis=0) if same.any() else nan,
        p99_ratio=np.percentile(ratio[same], 99, axis=0) if same.any() else nan,
        n_disagree=int(disagree.sum()),
        n_ours_lower=lower[0],
        n_theirs_lower=lower[1],
        n_equal=lower[2],
        median_delta_chi2_disagree=median_delta,
    )


def chi2_under(model_theta: np.ndarray, model_s2: np.ndarray, scaling: LabelScaling, flux: np.ndarray,
               ivar: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Exact chi2 of physical ``labels`` under a model ``(theta, s2)`` in our term order.

    Rows with non-finite labels give NaN.
    """
    stats = sufficient_statistics(flux, ivar, model_theta, model_s2)
    finite = np.all(np.isfinite(labels), axis=1)
    x = scale_labels(np.where(finite[:, None], labels, scaling.pivots), scaling.pivots, scaling.scales)
    return np.where(finite, chi2_from_statistics(stats, x), np.nan)


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    """``"PASS"`` or ``"FAIL"``."""
    return "PASS" if ok else "FAIL"


def _labels_str(values: np.ndarray, fmt: str) -> str:
    """``"Teff=.. R=.. M=.. L=.."`` with each value formatted by ``fmt``."""
    return "  ".join(f"{name}={format(v, fmt)}" for name, v in zip(LABEL_NAMES, values))


def _print_agreement(title: str, agreement: Agreement) -> None:
    """Print the details of one :class:`Agreement`."""
    a = agreement
    print(f"  {title}")
    if a.same_model:
        print(f"    stars compared / both converged / same optimum (|dchi2| < {SAME_OPTIMUM_DELTA_CHI2:g}): "
              f"{a.n_compared} / {a.n_both_converged} / {a.n_same_optimum}")
    else:
        print(f"    stars compared / both converged: {a.n_compared} / {a.n_both_converged}")
    print(f"    fraction |ours-theirs| < {AGREEMENT_TOLERANCE} sigma_ours: "
          f"{_labels_str(a.frac_within, '.4f')}  all4={a.frac_all_within:.4f}")
    if a.same_model:
        print(f"    fraction all4 within, over all jointly converged stars: {a.frac_all_within_converged:.4f}")
    print(f"    |diff|/sigma_ours median: {_labels_str(a.median_ratio, '.2e')}")
    print(f"    |diff|/sigma_ours 99th %: {_labels_str(a.p99_ratio, '.2e')}")
    line = f"    disagreeing (some label >= {AGREEMENT_TOLERANCE} sigma, both converged): {a.n_disagree}"
    if a.same_model:
        line += (f"; chi2 ours lower: {a.n_ours_lower}, theirs lower: {a.n_theirs_lower}, equal (1e-6 rel): "
                 f"{a.n_equal}; median chi2_theirs - chi2_ours: {a.median_delta_chi2_disagree:.3g}")
    print(line)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=1000, help="training stars (default 1000)")
    parser.add_argument("--n-pixels", type=int, default=3000, help="pixels (default 3000)")
    parser.add_argument("--n-test", type=int, default=10000, help="test stars for our code (default 10000)")
    parser.add_argument("--their-test-stars", type=int, default=1000,
                        help="test stars TheCannon's (Python-loop) test step is timed on (default 1000)")
    parser.add_argument("--chunk", type=int, default=1000, help="stars per infer_labels call (default 1000)")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--repeat", type=int, default=3,
                        help="run every timed step of both codes this many times, keep the fastest (default 3: "
                             "a single run of our sub-second test step varies by +-10 %% on a shared VM)")
    parser.add_argument("--quick", action="store_true",
                        help="small run (200 train x 600 px, 1000 test, theirs on 200); not a target run")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table; 0 when every target passes."""
    args = build_parser().parse_args(argv)
    if args.quick:
        args.n_train, args.n_pixels, args.n_test, args.their_test_stars = 200, 600, 1000, 200
    sizes = (args.n_pixels, args.n_test, args.their_test_stars, args.chunk, args.repeat)
    if args.n_train < 20 or min(sizes) < 1:
        raise SystemExit("sizes must be positive (and --n-train >= 20)")
    n_their = min(args.their_test_stars, args.n_test)
    threads = _limit_threads()
    tc = import_thecannon()

    t0 = time.perf_counter()
    data = simulate(args.n_train, args.n_test, args.n_pixels, args.seed)
    print(f"data: {args.n_train} training x {args.n_pixels} px, {args.n_test} test stars, seed {args.seed}; "
          f"{time.perf_counter() - t0:.1f} s to simulate")
    masked = np.mean(data.test_ivar <= MASKED_IVAR)
    print(f"      SNR 50-300, masked pixels {100 * masked:.1f} % (ivar 1e-5 or 0), "
          f"intrinsic scatter median {np.median(np.sqrt(data.true_s2)):.4f}")
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, TheCannon {_their_version()}; "
          f"BLAS threads: {threads}; single process")

    # --- timed runs -----------------------------------------------------------------
    # (each step runs --repeat times for both codes; the fastest CPU time is kept)
    ours = min((train_ours(data) for _ in range(args.repeat)), key=lambda m: m.timing.cpu)
    theirs_model, their_train = min((train_theirs(tc, data) for _ in range(args.repeat)),
                                    key=lambda mt: mt[1].cpu)
    our_test, our_test_t = min(
        (infer_ours(ours.training.theta, ours.training.s2, ours.scaling, data.test_flux, data.test_ivar,
                    data.train_labels, args.chunk) for _ in range(args.repeat)),
        key=lambda rt: rt[1].cpu)
    their_test = min((infer_theirs(tc, theirs_model, data, n_their) for _ in range(args.repeat)),
                     key=lambda t: t.timing.cpu)

    # --- untimed cross runs: each test step on the other code's trained model ------------
    rows = slice(0, n_their)
    f_sub, iv_sub = data.test_flux[rows], data.test_ivar[rows]
    our_sub = InferenceResult(*(field[rows] for field in our_test))
    their_theta, their_s2 = their_model_in_our_order(theirs_model)
    their_scaling = LabelScaling(np.asarray(theirs_model.pivots, dtype=np.float64),
                                 np.asarray(theirs_model.scales, dtype=np.float64), "median", "central95")
    their_step_our_model = infer_theirs(tc, shared_model(tc, ours), data, n_their)
    our_step_their_model, _ = infer_ours(their_theta, their_s2, their_scaling, f_sub, iv_sub,
                                         data.train_labels, args.chunk)

    # --- agreement -----------------------------------------------------------------
    chi2_ours_ours = chi2_under(ours.training.theta, ours.training.s2, ours.scaling, f_sub, iv_sub,
                                our_sub.labels)
    chi2_theirs_ours = chi2_under(ours.training.theta, ours.training.s2, ours.scaling, f_sub, iv_sub,
                                  their_step_our_model.labels)
    chi2_ours_theirs = chi2_under(their_theta, their_s2, their_scaling, f_sub, iv_sub,
                                  our_step_their_model.labels)
    chi2_theirs_theirs = chi2_under(their_theta, their_s2, their_scaling, f_sub, iv_sub, their_test.labels)
    ok_their_model = their_converged(their_test.labels, their_scaling.pivots, their_scaling.scales)
    ok_our_model = their_converged(their_step_our_model.labels, ours.scaling.pivots, ours.scaling.scales)
    on_their_model = compare(our_step_their_model, their_test.labels, ok_their_model,
                             chi2_ours_theirs, chi2_theirs_theirs)
    on_our_model = compare(our_sub, their_step_our_model.labels, ok_our_model, chi2_ours_ours, chi2_theirs_ours)
    end_to_end = compare(our_sub, their_test.labels, ok_their_model)

    # --- where our test-step time goes (info; first n_their stars) -----------------------
    # infer_labels = one pass over the pixels (the coefficients of the chi2 polynomial,
    # the private _quartic_statistics) + the optimiser; the latter is timed as the
    # difference, with all 6 starts and with the median start only.
    starts = starting_points_from_training(data.train_labels)
    theta, s2 = ours.training.theta, ours.training.s2
    with _Stopwatch() as t_stats:
        for first in range(0, n_their, args.chunk):
            _quartic_statistics(f_sub[first:first + args.chunk], iv_sub[first:first + args.chunk], theta, s2,
                                DEFAULT_MASKED_IVAR_THRESHOLD)
    _, t_multi = infer_ours(theta, s2, ours.scaling, f_sub, iv_sub, data.train_labels, args.chunk)
    single, t_single = infer_ours(theta, s2, ours.scaling, f_sub, iv_sub, data.train_labels, args.chunk,
                                  n_starts=1)
    single_same = np.all(np.abs(single.labels - our_sub.labels)
                         < AGREEMENT_TOLERANCE * np.sqrt(np.einsum("nkk->nk", our_sub.covariance)), axis=1)

    # --- training likelihood of both models on the same (unclamped) data ------------------
    design = design_matrix(scale_labels(data.train_labels, ours.scaling.pivots, ours.scaling.scales))
    nll_ours = training_nll(design, data.train_flux, data.train_ivar, ours.training.theta, ours.training.s2)
    nll_theirs = training_nll(design, data.train_flux, data.train_ivar, their_theta, their_s2)
    d_nll = nll_theirs - nll_ours

    # --- verdicts ------------------------------------------------------------------
    train_ratio = their_train.cpu / ours.timing.cpu
    our_per_star = Timing(our_test_t.wall / args.n_test, our_test_t.cpu / args.n_test)
    their_per_star = Timing(their_test.timing.wall / n_their, their_test.timing.cpu / n_their)
    test_ratio = their_per_star.cpu / our_per_star.cpu
    agree_ok = all(a.n_same_optimum > 0 and a.frac_all_within >= AGREEMENT_FRACTION_TARGET
                   for a in (on_their_model, on_our_model))
    train_ok = train_ratio >= TRAIN_SPEEDUP_TARGET
    test_ok = test_ratio >= TEST_SPEEDUP_TARGET
    passed = train_ok and test_ok and agree_ok

    train_target = f">= {TRAIN_SPEEDUP_TARGET:g}x"
    test_target = f">= {TEST_SPEEDUP_TARGET:g}x"
    agree_target = f">= {AGREEMENT_FRACTION_TARGET:.0%}"
    print()
    print(f"{'quantity (CPU time of 1 core; wall time below)':<48}{'ours':>11}{'TheCannon':>11}{'ratio':>9}"
          f"{'target':>9}{'':>6}")
    label = f"train time [s] ({args.n_train} stars x {args.n_pixels} px)"
    print(f"{label:<48}{ours.timing.cpu:>11.3f}{their_train.cpu:>11.3f}{train_ratio:>8.1f}x{train_target:>9}"
          f"{_verdict(train_ok):>6}")
    print(f"{'  (wall)':<48}{ours.timing.wall:>11.3f}{their_train.wall:>11.3f}"
          f"{their_train.wall / ours.timing.wall:>8.1f}x")
    print(f"{'test time per star per core [ms]':<48}{1e3 * our_per_star.cpu:>11.4f}"
          f"{1e3 * their_per_star.cpu:>11.4f}{test_ratio:>8.1f}x{test_target:>9}{_verdict(test_ok):>6}")
    print(f"{'  (wall)':<48}{1e3 * our_per_star.wall:>11.4f}{1e3 * their_per_star.wall:>11.4f}"
          f"{their_per_star.wall / our_per_star.wall:>8.1f}x")
    print(f"{'  stars timed':<48}{args.n_test:>11d}{n_their:>11d}")
    label = f"labels within {AGREEMENT_TOLERANCE:g} sigma at the same optimum:"
    print(f"{label:<48}{'':>11}{'':>11}{'':>9}{agree_target:>9}{_verdict(agree_ok):>6}")
    print(f"{'  on TheCannon-trained model (fraction, all 4)':<48}{on_their_model.frac_all_within:>11.4f}")
    print(f"{'  on our trained model (fraction, all 4)':<48}{on_our_model.frac_all_within:>11.4f}")
    print(f"{'  end to end, each its own model (info only)':<48}{end_to_end.frac_all_within:>11.4f}")
    if n_their < args.n_test:
        print(f"note: TheCannon's test step (a Python loop of curve_fit calls) was timed on the first {n_their} "
              f"of the {args.n_test} test stars (per-star time); agreement uses those {n_their} stars.")
    print(f"overall: {_verdict(passed)}")

    print()
    print("agreement details (labels in physical units; sigma_ours = our formal error):")
    _print_agreement("on TheCannon-trained model: our infer_labels vs its test step", on_their_model)
    _print_agreement("on our trained model: our infer_labels vs its test step", on_our_model)
    _print_agreement("end to end (each code with the model it trained)", end_to_end)

    error_ours = np.sqrt(np.einsum("nkk->nk", our_sub.covariance))
    both = ok_our_model & (our_sub.status == InferenceStatus.OK)
    raw_err_ratio = np.median(their_step_our_model.errors[both] / error_ours[both], axis=0)
    scaled_err_ratio = np.median(their_step_our_model.errors[both] * ours.scaling.scales / error_ours[both],
                                 axis=0)
    good = our_test.status == InferenceStatus.OK
    pull = (our_test.labels - data.test_labels) / np.sqrt(np.einsum("nkk->nk", our_test.covariance))
    s_ours, s_theirs, s_true = np.sqrt(ours.training.s2), np.sqrt(their_s2), np.sqrt(data.true_s2)
    print()
    print("other facts:")
    print(f"  training NLL on the same data, TheCannon minus ours: median {np.median(d_nll):.3g}, "
          f"max {np.max(d_nll):.3g}, min {np.min(d_nll):.3g}; ours lower in "
          f"{np.mean(d_nll > 1e-9 * np.abs(nll_ours)):.4f} of pixels")
    print(f"  s_TheCannon - s_ours (its 19-point ln s grid + parabola): median {np.median(s_theirs - s_ours):+.2e},"
          f" rms {np.sqrt(np.mean((s_theirs - s_ours) ** 2)):.2e} (median s_ours {np.median(s_ours):.2e}); "
          f"its s at the grid floor 1e-4: {int(np.sum(s_theirs <= 1.0001e-4))} px; our s2 = 0: "
          f"{int(np.sum(ours.training.s2 == 0))} px")
    print(f"  ours: training converged in {np.mean(ours.training.converged):.4f} of pixels; s_ours - s_true "
          f"median {np.median(s_ours - s_true):+.2e}")
    print(f"  ours: status OK for {np.mean(good):.4f} of {args.n_test} test stars; std of (label - truth) / "
          f"sigma_ours: {_labels_str(np.std(pull[good], axis=0), '.3f')}")
    print(f"  TheCannon errors as returned / sigma_ours (median): {_labels_str(raw_err_ratio, '.3g')}")
    print(f"  ... multiplied by the label scales by us         : {_labels_str(scaled_err_ratio, '.3g')}")
    print(f"      (returned in scaled label units; scales = {_labels_str(ours.scaling.scales, '.4g')})")
    optimiser_multi = (t_multi.cpu - t_stats.timing.cpu) / n_their
    optimiser_single = (t_single.cpu - t_stats.timing.cpu) / n_their
    print(f"  our test step, CPU per star on {n_their} stars: pixel pass (chi2 polynomial coefficients) "
          f"{1e3 * t_stats.timing.cpu / n_their:.4f} ms + optimiser {1e3 * optimiser_multi:.4f} ms "
          f"({starts.shape[0]} starts) or {1e3 * optimiser_single:.4f} ms (1 start, the median; "
          f"same labels as {starts.shape[0]} starts for {np.mean(single_same):.4f} of the stars)")
    print(f"  TheCannon curve_fit failures (-9999): {their_test.n_failed} (its model), "
          f"{their_step_our_model.n_failed} (our model); its test step on our model: "
          f"{1e3 * their_step_our_model.timing.cpu / n_their:.3f} ms/star (CPU)")
    return 0 if passed else 1


def _their_version() -> str:
    """Installed version of the ``thecannon`` distribution (informational)."""
    try:
        from importlib.metadata import version

        return version("thecannon")
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
