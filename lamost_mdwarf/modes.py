"""Pipeline modes: ``paper`` (Galgano et al. 2020, exactly) and ``best`` (the default).

One pipeline, two sets of choices. The mode is chosen when the model is trained; it is
stored in the model's ``settings`` (``settings["mode"]``) and copied into the results'
attributes, so that ``validate`` and ``infer`` apply the choices the model was built
with (a model without a recorded mode is a ``paper`` model).

``paper``
    Training on the catalog labels (Teff, R, M, L) of the SNR_lambda > 250 training set,
    a 15-term quadratic Cannon in those four labels, the ordinary test step, and
    reported errors from the validation error model (std of residuals against the
    catalog in SNR bins, a quadratic with a floor, paper Table 2).

``best``
    * Training set: every catalog-matched spectrum passing the quality cuts whose
      catalog labels are not outliers of the Mann et al. relations (``label_outlier`` and
      ``bad_labels`` bits clear), one spectrum per object (the highest SNR), SNR_lambda
      above the survey cut (50) -- about 10x the paper's 250 cut, possible because the
      catalog labels are no longer trusted star by star; at most 10,000 of them (a
      random subset), which bounds the training memory.
    * Labels: Teff and ``n_latent`` latent labels, training labels refined as latent
      variables anchored to the catalog (:mod:`lamost_mdwarf.kernels.label_refinement`);
      R, M and L derived from them by catalog-calibrated regressions.
    * Robust test step: pixels more than ``clip_sigma`` from the best fit are clipped
      and the star refitted (:mod:`lamost_mdwarf.kernels.robust`); ``n_clipped`` is
      recorded per star.
    * Validation: the training stars predicted k-fold out of fold; the reported Teff is a
      final catalog calibration (cubic in Teff, quadratic in the latent labels, without
      regression dilution) of the model labels, fitted on those predictions.
    * Errors: the formal errors, scaled by the scatter of repeat observations of the same
      stars (resampled pixels are correlated), plus a systematic term estimated from the
      cross-validated residuals against the catalog with the catalog errors removed
      (:mod:`lamost_mdwarf.kernels.uncertainty`); for R, M, L the propagated Teff
      uncertainty plus the relations' intrinsic scatter read from the catalog's error
      budget.
    * Extra quality flags: Teff implying a subtype outside the selected range (32),
      catalog R and M off the relations, i.e. a likely unresolved binary (64), labels
      outside the training-label range (128).

``docs/bench_accuracy.md`` compares the two on simulated surveys against the truth.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["DEFAULT_MODE", "MODES", "ModeSettings", "get_mode", "mode_from_settings"]


@dataclass(frozen=True)
class ModeSettings:
    """The choices that differ between modes.

    Attributes
    ----------
    name : str
        ``"paper"`` or ``"best"``.
    label_model : str
        ``"catalog"``: the Cannon's labels are the catalog labels (paper); ``"latent"``:
        Teff and latent labels refined against the catalog, R/M/L derived.
    training_pool : str
        ``"training"``: the selection's ``training`` subset (SNR_lambda > 250, paper);
        ``"matched"``: every usable catalog-matched object (module docstring).
    n_latent : int
        Latent labels besides Teff (``label_model == "latent"``).
    refine_iterations : int
        Label-refinement iterations.
    n_folds : int
        Folds of the out-of-fold label estimates of the label refinement.
    validation_folds : int
        Folds of the cross-validated error model (more folds: fold models closer to the
        final one, whose error the residuals should measure).
    damping : float
        Weight of the previous labels in each refinement update, [0, 1).
    clip_sigma : float or None
        Robust test step threshold (total standard deviations); ``None``: no clipping.
    clip_grow : int
        Neighbour pixels clipped on each side of an outlier.
    clip_rounds : int
        Maximum clip-and-refit rounds.
    error_mode : str
        ``"error_model"`` (paper: SNR error model alone) or ``"calibrated"`` (formal and
        cross-validated systematic terms in quadrature).
    max_training_stars : int or None
        ``training_pool == "matched"``: at most this many training objects, a random
        subset (seeded by ``seed``) when more match. The label refinement holds the
        training spectra in memory (about 0.3 MB per star on the default grid), so this
        bounds it whatever the size of the survey and of the catalog; a DR1-size survey
        matched with a TCD-like catalog gives ~11,000. ``None``: no limit.
    seed : int
        Seed of the fold assignments (results are reproducible).
    """

    name: str
    label_model: str = "catalog"
    training_pool: str = "training"
    n_latent: int = 0
    refine_iterations: int = 0
    n_folds: int = 5
    validation_folds: int = 10
    damping: float = 0.5
    clip_sigma: float | None = None
    clip_grow: int = 1
    clip_rounds: int = 3
    error_mode: str = "error_model"
    max_training_stars: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.label_model not in ("catalog", "latent"):
            raise ValueError(f"label_model must be 'catalog' or 'latent', got {self.label_model!r}")
        if self.training_pool not in ("training", "matched"):
            raise ValueError(f"training_pool must be 'training' or 'matched', got {self.training_pool!r}")
        if self.error_mode not in ("error_model", "calibrated"):
            raise ValueError(f"error_mode must be 'error_model' or 'calibrated', got {self.error_mode!r}")
        if self.label_model == "latent" and (self.n_latent < 0 or self.refine_iterations < 1):
            raise ValueError("a latent-label mode needs n_latent >= 0 and refine_iterations >= 1")
        if self.n_folds < 2 or self.validation_folds < 2 or not 0 <= self.damping < 1:
            raise ValueError("n_folds and validation_folds must be >= 2 and damping in [0, 1)")
        if self.clip_sigma is not None and not self.clip_sigma > 0:
            raise ValueError(f"clip_sigma must be > 0 or None, got {self.clip_sigma!r}")
        if self.max_training_stars is not None and self.max_training_stars < 2:
            raise ValueError(f"max_training_stars must be >= 2 or None, got {self.max_training_stars!r}")

    @property
    def robust(self) -> bool:
        """Whether the test step clips outlying pixels."""
        return self.clip_sigma is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable settings (stored in the model and the results)."""
        return asdict(self)


MODES: dict[str, ModeSettings] = {
    "paper": ModeSettings(name="paper"),
    "best": ModeSettings(name="best", label_model="latent", training_pool="matched", n_latent=2,
                         refine_iterations=4, n_folds=5, validation_folds=10, damping=0.5, clip_sigma=5.0,
                         clip_grow=1, clip_rounds=3, error_mode="calibrated",
                         max_training_stars=10_000),
}

#: The mode of ``lamost-mdwarf run/demo/train`` when none is given.
DEFAULT_MODE = "best"


def get_mode(mode: str | ModeSettings) -> ModeSettings:
    """The :class:`ModeSettings` of a mode name (or the settings themselves).

    Raises
    ------
    ValueError
        On an unknown name.
    """
    if isinstance(mode, ModeSettings):
        return mode
    try:
        return MODES[str(mode)]
    except KeyError:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}") from None


def mode_from_settings(settings: dict[str, Any]) -> ModeSettings:
    """The mode recorded in a model's settings (``paper`` for models without one)."""
    stored = settings.get("mode")
    if stored is None:
        return MODES["paper"]
    if isinstance(stored, str):
        return get_mode(stored)
    return ModeSettings(**stored)
