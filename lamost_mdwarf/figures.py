"""The figures of Galgano, Stassun & Rojas-Ayala (2020), Figs. 1-8, and a per-star spectrum plot.

:func:`make_figures` reads the products of a run (survey store with its ``preprocessed``
and ``selection`` groups, the model, the validation residuals and the results) and
writes, for every requested format (PNG and PDF by default):

==================  ==========================================================================
file stem           content (paper figure)
==================  ==========================================================================
fig1_subtypes       LAMOST subtype vs a subtype derived from the catalog Teff, counts of the
                    catalog-matched spectra (Fig. 1)
fig2_normalization  one high-SNR training spectrum with its pseudo-continuum, and the
                    normalized spectrum (Fig. 2)
fig3_snr            SNR_lambda histograms of the training set and of the validation + survey
                    sets, with the 50 and 250 cuts (Fig. 3)
fig4_validation     Cannon vs catalog labels of the validation set, one panel per label, with
                    residual histograms as insets (Fig. 4)
fig5_error_model    residual scatter in equal-count SNR_lambda bins, the fitted quadratic with
                    its floor and the paper's Table 2 curve (Fig. 5)
fig6_chi2           chi^2 distribution of the survey set with the final cut (Fig. 6)
fig7_teff_subtype   Cannon Teff per LAMOST subtype of the characterized set (Fig. 7)
fig8_parameters     corner plot of the characterized set's labels; the training ranges are
                    shaded (Teff) and dashed (the other labels) (Fig. 8)
==================  ==========================================================================

The "characterized set" of Figs. 7-8 is what the catalog holds: the result rows passing
every final cut (``flags == 0``).

Catalog-based subtype (Fig. 1)
------------------------------
The label catalog (TESS Cool Dwarf Catalog) has no spectral type, so the figure compares
the LAMOST subtype with a subtype *derived from the catalog Teff*: the spectral type of
the dwarf sequence of Pecaut & Mamajek (2013, "A Modern Mean Dwarf Stellar Color and
Effective Temperature Sequence", online table) whose Teff is nearest, i.e. the Teff axis
cut at the midpoints between the anchor temperatures of :data:`DWARF_TEFF_SEQUENCE`
(M0 3850 K, M1 3660 K, M2 3560 K, M3 3430 K, M4 3210 K, M5 3060 K, M6 2810 K, ...). Only
the integer types LAMOST assigns are anchors (no K6, K8, K9). Hotter than G0 counts as
G0, cooler than M9 as M9.

All figures are drawn on fresh :class:`matplotlib.figure.Figure` objects with an Agg
canvas (no pyplot, no global state); style settings are applied through
:func:`matplotlib.rc_context` only while a figure is drawn. A panel without data shows a
note instead of failing, so small runs and empty subsets still give every file.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:
    import matplotlib as mpl
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("lamost_mdwarf.figures needs matplotlib: pip install 'lamost-mdwarf[plots]'") from exc

from lamost_mdwarf.io.storage import resolve_location
from lamost_mdwarf.kernels.cannon_design import design_matrix, scale_labels
from lamost_mdwarf.kernels.error_model import (
    PAPER_ERROR_MODEL,
    QuadraticErrorModel,
    binned_residual_scatter,
    error_model_sigma,
)
from lamost_mdwarf.model import LABEL_UNITS

__all__ = [
    "DWARF_TEFF_SEQUENCE",
    "FIGURE_NAMES",
    "ExampleSpectrum",
    "FigureData",
    "SpectrumNotFoundError",
    "ValidationData",
    "draw_figures",
    "figure_chi2",
    "figure_error_model",
    "figure_normalization",
    "figure_parameters",
    "figure_snr",
    "figure_subtypes",
    "figure_teff_subtype",
    "figure_validation",
    "load_figure_data",
    "make_figures",
    "plot_star",
    "spectral_code",
    "spectral_type_name",
    "subtype_from_teff",
]

#: File stems written by :func:`make_figures`, in paper order.
FIGURE_NAMES: tuple[str, ...] = (
    "fig1_subtypes",
    "fig2_normalization",
    "fig3_snr",
    "fig4_validation",
    "fig5_error_model",
    "fig6_chi2",
    "fig7_teff_subtype",
    "fig8_parameters",
)

#: Dwarf-sequence anchor temperatures (K) per spectral type, after Pecaut & Mamajek (2013,
#: online table): the catalog-Teff -> subtype mapping of Fig. 1 (nearest anchor).
DWARF_TEFF_SEQUENCE: tuple[tuple[str, float], ...] = (
    ("G0", 5920.0), ("G2", 5770.0), ("G5", 5660.0), ("G8", 5490.0),
    ("K0", 5280.0), ("K1", 5170.0), ("K2", 5040.0), ("K3", 4830.0), ("K4", 4600.0), ("K5", 4440.0),
    ("K7", 4050.0),
    ("M0", 3850.0), ("M1", 3660.0), ("M2", 3560.0), ("M3", 3430.0), ("M4", 3210.0), ("M5", 3060.0),
    ("M6", 2810.0), ("M7", 2680.0), ("M8", 2570.0), ("M9", 2380.0),
)

_CLASS_OFFSET = {"O": -60.0, "B": -50.0, "A": -40.0, "F": -30.0, "G": -20.0, "K": -10.0, "M": 0.0}
_SPTYPE_RE = re.compile(r"^(?:sd|d)?([OBAFGKM])(\d(?:\.\d+)?)")

_STYLE: dict[str, Any] = {
    "font.size": 11,
    "axes.labelsize": 12,
    "axes.titlesize": 12,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 9,
    "legend.framealpha": 0.85,
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "axes.grid": False,
    "pdf.fonttype": 42,
    "mathtext.default": "regular",
}

_LABEL_SYMBOL = {
    "teff": r"$T_\mathrm{eff}$",
    "radius": r"$R_\star$",
    "mass": r"$M_\star$",
    "luminosity": r"$L_\star$",
    "feh": "[Fe/H]",
}
_UNIT_TEX = {"K": "K", "Rsun": r"$R_\odot$", "Msun": r"$M_\odot$", "Lsun": r"$L_\odot$", "dex": "dex"}
_UNIT_TEXT = {"K": "K", "Rsun": "Rsun", "Msun": "Msun", "Lsun": "Lsun", "dex": "dex"}
_TRAINING_COLOR = "C3"
_OTHER_COLOR = "C0"


class SpectrumNotFoundError(KeyError):
    """A spectrum id that is not in the results (or the survey store)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


# ----------------------------------------------------------------------------------------
# spectral types


def spectral_code(subclass: Iterable[Any]) -> np.ndarray:
    """Numeric spectral type of LAMOST subclasses (M subtypes as themselves).

    Parameters
    ----------
    subclass : iterable of str
        Subclasses such as ``'M3'``, ``'dM4.5'``, ``'sdM1'``, ``'K7'``, ``'G2'``.

    Returns
    -------
    numpy.ndarray
        float64 codes: ``M n -> n``, ``K n -> n - 10``, ``G n -> n - 20`` (F, A, B, O
        likewise by 10 per class), so ``K7 -> -3`` and ``M0 -> 0``; NaN for anything
        unparsable (``''``, ``'Non'``, ``'WD'``).
    """
    values = [str(v).strip() for v in subclass]
    out = np.full(len(values), np.nan)
    for i, value in enumerate(values):
        match = _SPTYPE_RE.match(value)
        if match:
            out[i] = _CLASS_OFFSET[match.group(1)] + float(match.group(2))
    return out


def spectral_type_name(code: float) -> str:
    """Spectral type of a numeric code (inverse of :func:`spectral_code`), e.g. ``-3 -> 'K7'``.

    Parameters
    ----------
    code : float
        Numeric spectral type.

    Returns
    -------
    str
        Letter and subtype (``'M4.5'``; integer subtypes without decimals); ``'?'`` for NaN.
    """
    if not np.isfinite(code):
        return "?"
    for letter, offset in sorted(_CLASS_OFFSET.items(), key=lambda kv: -kv[1]):
        if code >= offset - 1e-9:
            sub = code - offset
            return f"{letter}{sub:g}"
    letter, offset = "O", _CLASS_OFFSET["O"]
    return f"{letter}{code - offset:g}"


def subtype_from_teff(teff_k: np.ndarray | Sequence[float]) -> np.ndarray:
    """Catalog-Teff -> spectral-type code by the nearest dwarf-sequence anchor.

    Parameters
    ----------
    teff_k : array-like
        Effective temperatures, K.

    Returns
    -------
    numpy.ndarray
        Codes of :func:`spectral_code` (``M3 -> 3``) of the anchor of
        :data:`DWARF_TEFF_SEQUENCE` nearest in Teff (boundaries at the midpoints between
        anchors; hotter than the first anchor -> G0, cooler than the last -> M9); NaN
        where Teff is not finite.
    """
    teff = np.asarray(teff_k, dtype=np.float64)
    anchors_t = np.array([t for _, t in DWARF_TEFF_SEQUENCE])  # decreasing
    anchors_c = spectral_code([name for name, _ in DWARF_TEFF_SEQUENCE])
    edges = 0.5 * (anchors_t[1:] + anchors_t[:-1])  # decreasing
    index = np.searchsorted(-edges, -teff, side="left")
    index = np.clip(index, 0, anchors_c.size - 1)
    return np.where(np.isfinite(teff), anchors_c[index], np.nan)


# ----------------------------------------------------------------------------------------
# data


@dataclass
class ExampleSpectrum:
    """One spectrum for Fig. 2.

    Attributes
    ----------
    spectrum_id, subclass : str
        Identifier and LAMOST subclass.
    snr_lambda : float
        SNR_lambda (dimensionless).
    wavelength : numpy.ndarray
        (P,) rest-frame wavelength, Angstrom.
    flux : numpy.ndarray
        (P,) flux, arbitrary (relative) units.
    norm_flux : numpy.ndarray
        (P,) pseudo-continuum-normalized flux (dimensionless).
    pixel_mask : numpy.ndarray
        (P,) pixel mask bits (0 = good).
    continuum_width : float or None
        Gaussian width of the pseudo-continuum, Angstrom.
    flux_unit : str
        Unit of ``flux`` for the axis label.
    role : str
        The set the spectrum belongs to (``'training'``, ``'validation'``, ...), for the title.
    """

    spectrum_id: str
    subclass: str
    snr_lambda: float
    wavelength: np.ndarray
    flux: np.ndarray
    norm_flux: np.ndarray
    pixel_mask: np.ndarray
    continuum_width: float | None = None
    flux_unit: str = "arbitrary units"
    role: str = ""

    def continuum(self, max_gap: int = 10) -> np.ndarray:
        """Pseudo-continuum ``flux / norm_flux`` at good pixels, interpolated over short masked runs.

        Parameters
        ----------
        max_gap : int
            Masked runs of at most this many pixels are bridged by linear interpolation;
            longer ones (telluric bands, the spectrograph join) are left NaN, since the
            ratio is not the continuum where the flux was replaced by placeholders.

        Returns
        -------
        numpy.ndarray
            (P,) continuum, the units of ``flux``; NaN everywhere when no pixel is usable.
        """
        flux = np.asarray(self.flux, dtype=np.float64)
        norm = np.asarray(self.norm_flux, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            cont = flux / norm
        good = (np.asarray(self.pixel_mask) == 0) & np.isfinite(cont) & (norm > 0)
        if not good.any():
            return np.full(flux.shape, np.nan)
        wave = np.asarray(self.wavelength, dtype=np.float64)
        out = np.interp(wave, wave[good], cont[good])
        bad = np.flatnonzero(~good)
        if bad.size:
            breaks = np.flatnonzero(np.diff(bad) > 1)
            for lo, hi in zip(np.r_[bad[0], bad[breaks + 1]], np.r_[bad[breaks], bad[-1]]):
                if hi - lo + 1 > max_gap or lo == 0 or hi == out.size - 1:
                    out[lo:hi + 1] = np.nan
        return out


@dataclass
class ValidationData:
    """Validation residuals for Figs. 4-5.

    Attributes
    ----------
    label_names : tuple of str
        Labels with both a model and a catalog value.
    snr_lambda : numpy.ndarray
        (V,) SNR_lambda.
    usable : numpy.ndarray
        (V,) bool: the fit succeeded (the stars the error model was fitted to).
    model, catalog : dict of str to numpy.ndarray
        (V,) Cannon and catalog values per label, label units.
    stars_per_bin : int or None
        Stars per equal-count SNR bin used by the validation stage (None: not recorded).
    error : dict of str to numpy.ndarray
        (V,) reported 1-sigma errors per label, label units, where the validation stage
        recorded them (``best`` mode); empty otherwise.
    catalog_error : dict of str to numpy.ndarray
        (V,) catalog 1-sigma errors per label (from the selection), label units; empty
        when unknown.
    """

    label_names: tuple[str, ...]
    snr_lambda: np.ndarray
    usable: np.ndarray
    model: dict[str, np.ndarray]
    catalog: dict[str, np.ndarray]
    stars_per_bin: int | None = None
    error: dict[str, np.ndarray] = field(default_factory=dict)
    catalog_error: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class FigureData:
    """Everything the figures draw, as numpy arrays (built by :func:`load_figure_data`).

    Attributes
    ----------
    label_names, label_units : tuple of str
        Physical labels (catalog labels, e.g. teff, radius, mass, luminosity) and units.
    store_subclass : numpy.ndarray
        (N,) LAMOST subclass of every spectrum in the store (str).
    store_snr : numpy.ndarray
        (N,) SNR_lambda of every spectrum.
    store_subset : numpy.ndarray
        (N,) selection subset (``'training'``, ``'validation'``, ``'survey'``,
        ``'excluded'``; ``''`` where the selection has no row).
    catalog_teff : numpy.ndarray
        (N,) matched catalog Teff, K (NaN if unmatched).
    in_training : numpy.ndarray
        (N,) bool: the spectrum is in the model's training set.
    training_ranges : dict of str to (float, float)
        Catalog-label range of the training set per physical label, label units.
    results : dict of str to numpy.ndarray
        (M,) result columns: every physical label, ``chi2``, ``flags``, ``subset``,
        ``subclass``, ``snr_lambda``.
    error_models : dict of str to QuadraticErrorModel
        The model's validation error models.
    validation : ValidationData or None
        Validation residuals (None: not available).
    example : ExampleSpectrum or None
        The spectrum of Fig. 2.
    snr_min, snr_training_min : float
        SNR_lambda cuts of the validation/survey and training sets.
    chi2_max : float
        Final chi^2 cut.
    mode : str
        Model mode (``'paper'`` or ``'best'``).
    training_pool : str
        Where the model's training stars come from: ``'training'`` (the selection's
        SNR_lambda > ``snr_training_min`` subset, paper) or ``'matched'`` (every usable
        matched object above ``snr_min``, ``best`` mode).
    """

    label_names: tuple[str, ...]
    label_units: tuple[str, ...]
    store_subclass: np.ndarray
    store_snr: np.ndarray
    store_subset: np.ndarray
    catalog_teff: np.ndarray
    in_training: np.ndarray
    training_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    results: dict[str, np.ndarray] = field(default_factory=dict)
    error_models: dict[str, QuadraticErrorModel] = field(default_factory=dict)
    validation: ValidationData | None = None
    example: ExampleSpectrum | None = None
    snr_min: float = 50.0
    snr_training_min: float = 250.0
    chi2_max: float = 5000.0
    mode: str = "paper"
    training_pool: str = "training"


def _json_attr(attrs: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = attrs.get(key)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


def _as_str(values: Any) -> np.ndarray:
    return np.array(["" if v is None else str(v) for v in np.asarray(values, dtype=object).ravel()], dtype=object)


def _physical_labels(model: Any, results: Any, validation: Any | None) -> list[str]:
    names: list[str] = []
    if validation is not None and validation.attrs.get("label_names"):
        names = [str(n) for n in validation.attrs["label_names"]]
    if not names:
        names = [str(n) for n in (model.settings.get("catalog_label_names") or model.label_names)]
    return [n for n in names if n in results.data_vars and not n.startswith("latent")]


def _choose_example(in_training: np.ndarray, snr: np.ndarray, subclass: np.ndarray,
                    subset: np.ndarray) -> int | None:
    """Row of the Fig. 2 spectrum: the highest-SNR training spectrum, mid-M preferred."""
    codes = spectral_code(subclass)
    snr = np.where(np.isfinite(snr), snr, -np.inf)
    pools = [in_training & (codes >= 2) & (codes <= 4), in_training, subset == "validation",
             np.isin(subset, ("survey",)), np.ones(snr.size, dtype=bool)]
    for pool in pools:
        if pool.any():
            rows = np.flatnonzero(pool)
            return int(rows[np.argmax(snr[rows])])
    return None


def load_figure_data(
    store: str | os.PathLike,
    model_path: str | os.PathLike,
    results_path: str | os.PathLike,
    validation_path: str | os.PathLike | None = None,
) -> FigureData:
    """Read what the figures need from the products of a run.

    Parameters
    ----------
    store : str or path-like
        Survey store (with its ``preprocessed`` and ``selection`` groups).
    model_path : str or path-like
        Trained (and validated) model.
    results_path : str or path-like
        Results store of the inference stage.
    validation_path : str or path-like, optional
        Validation residuals; None or a missing path gives Figs. 4-5 with a note.

    Returns
    -------
    FigureData
        Per-star arrays (only one spectrum is read: the example of Fig. 2).
    """
    import xarray as xr

    from lamost_mdwarf.io.derived_groups import open_derived_group
    from lamost_mdwarf.io.survey_store import open_survey_store
    from lamost_mdwarf.model import load_model
    from lamost_mdwarf.stages.infer import open_results
    from lamost_mdwarf.stages.select import open_selection

    ds = open_survey_store(store)
    selection = open_selection(store)
    model = load_model(model_path)
    results = open_results(results_path)
    validation = None
    if validation_path is not None:
        location = resolve_location(validation_path)
        if location.exists():
            validation = xr.open_zarr(location.zarr_store(read_only=True), consolidated=False)

    n = int(ds.sizes["star"])
    subclass = _as_str(ds["subclass"].values)
    snr = np.asarray(ds["snr_lambda"].values, dtype=np.float64)
    ids = _as_str(ds["spectrum_id"].values)
    n_sel = min(n, int(selection.sizes["star"]))
    subset = np.full(n, "", dtype=object)
    subset[:n_sel] = _as_str(selection["subset"].values[:n_sel])
    catalog_teff = np.full(n, np.nan)
    if "label_teff" in selection:
        catalog_teff[:n_sel] = np.asarray(selection["label_teff"].values[:n_sel], dtype=np.float64)
    in_training = np.isin(ids, _as_str(model.training_ids))

    names = _physical_labels(model, results, validation)
    units = []
    for name in names:
        unit = str(results[name].attrs.get("units", "") or LABEL_UNITS.get(name, "1"))
        units.append(unit)

    training_ranges: dict[str, tuple[float, float]] = {}
    for name in names:
        values = np.array([])
        if f"label_{name}" in selection:
            values = np.asarray(selection[f"label_{name}"].values[:n_sel], dtype=np.float64)[in_training[:n_sel]]
        if not np.isfinite(values).any() and name in model.label_names:
            values = np.asarray(model.training_labels[:, model.label_names.index(name)], dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size:
            training_ranges[name] = (float(values.min()), float(values.max()))

    res: dict[str, np.ndarray] = {}
    for name in names:
        res[name] = np.asarray(results[name].values, dtype=np.float64)
    for key in ("chi2", "snr_lambda"):
        res[key] = (np.asarray(results[key].values, dtype=np.float64) if key in results
                    else np.full(int(results.sizes["star"]), np.nan))
    res["flags"] = np.asarray(results["flags"].values).astype(np.int64)
    for key in ("subset", "subclass", "spectrum_id"):
        res[key] = (_as_str(results[key].values) if key in results
                    else np.full(int(results.sizes["star"]), "", dtype=object))

    vdata = None
    if validation is not None:
        vnames = tuple(n_ for n_ in names if f"{n_}_model" in validation and f"{n_}_catalog" in validation)
        nv = int(validation.sizes.get("star", 0))
        spb = validation.attrs.get("stars_per_bin")
        catalog_error: dict[str, np.ndarray] = {}
        if nv and "store_row" in validation:
            vrows = np.asarray(validation["store_row"].values, dtype=np.int64)
            inside = (vrows >= 0) & (vrows < n_sel)
            for n_ in vnames:
                if f"label_{n_}_err" in selection:
                    column = np.asarray(selection[f"label_{n_}_err"].values[:n_sel], dtype=np.float64)
                    catalog_error[n_] = np.where(inside, column[np.clip(vrows, 0, max(n_sel - 1, 0))], np.nan)
        vdata = ValidationData(
            label_names=vnames,
            snr_lambda=np.asarray(validation["snr_lambda"].values, dtype=np.float64) if nv else np.array([]),
            usable=(np.asarray(validation["usable"].values, dtype=bool) if "usable" in validation
                    else np.ones(nv, dtype=bool)),
            model={n_: np.asarray(validation[f"{n_}_model"].values, dtype=np.float64) for n_ in vnames},
            catalog={n_: np.asarray(validation[f"{n_}_catalog"].values, dtype=np.float64) for n_ in vnames},
            stars_per_bin=int(spb) if spb is not None else None,
            error={n_: np.asarray(validation[f"{n_}_err"].values, dtype=np.float64) for n_ in vnames
                   if f"{n_}_err" in validation},
            catalog_error=catalog_error,
        )

    sel_settings = _json_attr(selection.attrs, "settings").get("selection", {})
    res_settings = _json_attr(results.attrs, "settings")
    chi2_max = results.attrs.get("chi2_max", res_settings.get("chi2_max", 5000.0))
    mode = model.settings.get("mode") or "paper"
    mode_name = mode.get("name", "paper") if isinstance(mode, dict) else str(mode)
    pool = mode.get("training_pool", "training") if isinstance(mode, dict) else (
        "matched" if mode_name == "best" else "training")

    example = None
    row = _choose_example(in_training, snr, subclass, subset)
    if row is not None:
        pre = open_derived_group(store, "preprocessed")
        if row < int(pre.sizes["star"]):
            pre_settings = _json_attr(pre.attrs, "settings")
            width = pre_settings.get("continuum_width")
            example = ExampleSpectrum(
                spectrum_id=str(ids[row]),
                subclass=str(subclass[row]),
                snr_lambda=float(snr[row]),
                wavelength=np.asarray(ds["wavelength"].values, dtype=np.float64),
                flux=np.asarray(ds["flux"][row].values, dtype=np.float64),
                norm_flux=np.asarray(pre["norm_flux"][row].values, dtype=np.float64),
                pixel_mask=np.asarray(pre["pixel_mask"][row].values),
                continuum_width=float(width) if width is not None else None,
                flux_unit=("arbitrary units" if ds["flux"].attrs.get("units", "arbitrary") == "arbitrary"
                           else str(ds["flux"].attrs["units"])),
                role="training" if in_training[row] else str(subset[row]),
            )

    return FigureData(
        label_names=tuple(names),
        label_units=tuple(units),
        store_subclass=subclass,
        store_snr=snr,
        store_subset=subset,
        catalog_teff=catalog_teff,
        in_training=in_training,
        training_ranges=training_ranges,
        results=res,
        error_models={k: v for k, v in model.error_models.items() if k in names},
        validation=vdata,
        example=example,
        snr_min=float(sel_settings.get("snr_min", 50.0)),
        snr_training_min=float(sel_settings.get("snr_training_min", 250.0)),
        chi2_max=float(chi2_max),
        mode=mode_name,
        training_pool=str(pool),
    )


# ----------------------------------------------------------------------------------------
# drawing helpers


def _new_figure(width: float, height: float, layout: str | None = None) -> Figure:
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _check_formats(formats: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = (formats,)
    supported = FigureCanvasAgg(Figure()).get_supported_filetypes()
    out = []
    for fmt in formats:
        fmt = str(fmt).lower().lstrip(".")
        if fmt not in supported:
            raise ValueError(f"unsupported figure format {fmt!r}; choose from {', '.join(sorted(supported))}")
        if fmt not in out:
            out.append(fmt)
    if not out:
        raise ValueError("no figure format given")
    return tuple(out)


def _save(fig: Figure, outdir: Path, name: str, formats: Sequence[str]) -> list[Path]:
    paths = []
    for fmt in formats:
        path = outdir / f"{name}.{fmt}"
        metadata = {"Creator": "lamost_mdwarf"} if fmt in ("pdf", "png", "svg") else None
        fig.savefig(path, format=fmt, bbox_inches="tight", metadata=metadata)
        paths.append(path)
    fig.clear()
    return paths


def _note(ax: Any, text: str) -> None:
    """Write a centred note (a panel without data)."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=11, color="0.35",
            wrap=True, bbox={"boxstyle": "round", "facecolor": "0.96", "edgecolor": "0.7"})


def _symbol(name: str) -> str:
    return _LABEL_SYMBOL.get(name, name)


def _unit(unit: str) -> str:
    return _UNIT_TEX.get(unit, unit)


def _axis_label(name: str, unit: str, qualifier: str = "") -> str:
    text = _symbol(name) + (f" ({qualifier})" if qualifier else "")
    u = _unit(unit)
    return f"{text} [{u}]" if u and u != "1" else text


def _fmt(value: float, unit: str = "") -> str:
    if not np.isfinite(value):
        return "nan"
    text = f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return f"{text} {_unit(unit)}".rstrip() if unit and unit != "1" else text


def _fmt_pm(value: float, error: float) -> str:
    """``value +- error`` rounded to two significant digits of the error (mathtext)."""
    if not np.isfinite(value):
        return "nan"
    if not (np.isfinite(error) and error > 0):
        return _fmt(value)
    decimals = max(0, 1 - int(np.floor(np.log10(error))))
    return f"{value:.{decimals}f} $\\pm$ {error:.{decimals}f}"


def _robust_std(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan")
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def _plain_log_axis(axis: Any) -> None:
    """Log axis with plain-number major ticks (50, 100, 500 instead of 10^2)."""
    axis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _bins_with_edges(lo: float, hi: float, cuts: Sequence[float], log: bool, n_total: int = 40) -> np.ndarray:
    """About ``n_total`` bins over ``[lo, hi]`` (log or linear), with every cut inside as an edge."""
    inner = sorted(float(c) for c in cuts if lo < c < hi)
    points = [lo, *inner, hi]
    transform = np.log10 if log else (lambda v: v)
    span = transform(hi) - transform(lo)
    edges: list[float] = [lo]
    for a, b in zip(points[:-1], points[1:]):
        n = max(1, int(round(n_total * (transform(b) - transform(a)) / span)))
        segment = np.geomspace(a, b, n + 1) if log else np.linspace(a, b, n + 1)
        edges.extend(segment[1:])
    return np.asarray(edges)


def _shade_mask(ax: Any, wavelength: np.ndarray, masked: np.ndarray, label: str | None = "masked pixels") -> None:
    if np.any(masked):
        ax.fill_between(wavelength, 0, 1, where=masked, transform=ax.get_xaxis_transform(), step="mid",
                        color="0.85", linewidth=0, label=label, zorder=0)


def _finite_limits(values: np.ndarray, lo: float = 0.5, hi: float = 99.5, pad: float = 0.05) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (0.0, 1.0)
    a, b = np.percentile(values, [lo, hi])
    if b <= a:
        a, b = a - 0.5 * max(abs(a), 1e-3), b + 0.5 * max(abs(b), 1e-3)
    span = b - a
    return float(a - pad * span), float(b + pad * span)


# ----------------------------------------------------------------------------------------
# the figures


def figure_subtypes(data: FigureData) -> Figure:
    """Fig. 1: LAMOST subtype vs the subtype derived from the catalog Teff (matched spectra).

    A count matrix over every catalog-matched spectrum (any subset) with a parsable
    LAMOST subclass; the catalog subtype is :func:`subtype_from_teff` of the catalog Teff.
    The title gives the fractions on the diagonal and within one type of it (adjacent
    categories of the shared axis, so K7 and M0 are adjacent).

    Parameters
    ----------
    data : FigureData
        Loaded run products.

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig = _new_figure(7.2, 6.0)
    ax = fig.add_subplot()
    lamost = spectral_code(data.store_subclass)
    matched = np.isfinite(data.catalog_teff)
    catalog = subtype_from_teff(data.catalog_teff)
    ok = matched & np.isfinite(lamost) & np.isfinite(catalog)
    ax.set_xlabel(r"subtype from catalog $T_\mathrm{eff}$ (nearest dwarf-sequence $T_\mathrm{eff}$, "
                  "Pecaut & Mamajek 2013)")
    ax.set_ylabel("LAMOST spectral subtype")
    if not ok.any():
        ax.set_title("LAMOST vs catalog subtypes")
        _note(ax, "no catalog-matched spectra with a LAMOST subtype")
        return fig
    categories = np.unique(np.concatenate([lamost[ok], catalog[ok]]))
    index = {c: i for i, c in enumerate(categories)}
    k = categories.size
    counts = np.zeros((k, k), dtype=np.int64)  # [lamost (y), catalog (x)]
    for y, x in zip(lamost[ok], catalog[ok]):
        counts[index[y], index[x]] += 1
    masked = np.ma.masked_equal(counts, 0)
    mesh = ax.pcolormesh(np.arange(k + 1) - 0.5, np.arange(k + 1) - 0.5, masked, cmap="viridis",
                         norm=LogNorm(vmin=1, vmax=max(2, counts.max())), shading="flat")
    cbar = fig.colorbar(mesh, ax=ax, pad=0.02)
    cbar.set_label("spectra per cell")
    _plain_log_axis(cbar.ax.yaxis)
    if k <= 16:
        for (i, j), value in np.ndenumerate(counts):
            if value:
                light = np.log(value) < 0.6 * np.log(max(2, counts.max()))
                ax.text(j, i, str(value), ha="center", va="center", fontsize=8 if k > 10 else 9,
                        color="white" if light else "black")
    ax.plot([-0.5, k - 0.5], [-0.5, k - 0.5], color="C3", lw=1.2, ls="--", label="same subtype")
    names = [spectral_type_name(c) for c in categories]
    ax.set_xticks(np.arange(k), names, rotation=90 if k > 14 else 0)
    ax.set_yticks(np.arange(k), names)
    ax.set_xlim(-0.5, k - 0.5)
    ax.set_ylim(-0.5, k - 0.5)
    ax.set_aspect("equal")
    pos_l = np.array([index[c] for c in lamost[ok]])
    pos_c = np.array([index[c] for c in catalog[ok]])
    same = float(np.mean(pos_l == pos_c))
    near = float(np.mean(np.abs(pos_l - pos_c) <= 1))
    n_no_type = int(np.count_nonzero(matched & ~np.isfinite(lamost)))
    ax.set_title(f"{int(ok.sum())} catalog-matched spectra: same subtype {100 * same:.0f}%, "
                 f"within one {100 * near:.0f}%", fontsize=11)
    if n_no_type:
        ax.text(0.02, 0.98, f"{n_no_type} matched spectra without a parsable LAMOST subtype not shown",
                transform=ax.transAxes, ha="left", va="top", fontsize=8, color="0.3")
    ax.legend(loc="lower right")
    return fig


def figure_normalization(data: FigureData) -> Figure:
    """Fig. 2: a training spectrum with its pseudo-continuum (top) and normalized (bottom).

    Parameters
    ----------
    data : FigureData
        Loaded run products (uses ``data.example``).

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig = _new_figure(10.0, 6.5)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"hspace": 0.06})
    bottom.set_xlabel(r"rest-frame wavelength [$\AA$]")
    ex = data.example
    if ex is None or not np.isfinite(ex.flux).any():
        top.set_ylabel("flux [arbitrary units]")
        bottom.set_ylabel("normalized flux")
        _note(top, "no spectrum available")
        _note(bottom, "no spectrum available")
        return fig
    wave = ex.wavelength
    masked = np.asarray(ex.pixel_mask) != 0
    cont = ex.continuum()
    good = ~masked & np.isfinite(ex.flux)
    _shade_mask(top, wave, masked)
    top.plot(wave, np.where(good, ex.flux, np.nan), color="k", lw=0.6, label="observed flux")
    width = f", Gaussian $L$ = {ex.continuum_width:g} $\\AA$" if ex.continuum_width else ""
    top.plot(wave, cont, color="C3", lw=1.6, label=f"pseudo-continuum{width}")
    top.set_ylabel(f"flux [{ex.flux_unit}]")
    lo, hi = _finite_limits(np.concatenate([ex.flux[good], cont[good]]), 0.2, 99.8)
    top.set_ylim(max(lo, 0.0) if lo > -0.05 * hi else lo, hi)
    top.legend(loc="upper left", ncol=3)
    top.set_title(f"{ex.role} spectrum {ex.spectrum_id} ({ex.subclass}, "
                  f"SNR$_\\lambda$ = {ex.snr_lambda:.0f})".strip())

    norm = np.where(good, ex.norm_flux, np.nan)
    _shade_mask(bottom, wave, masked, label=None)
    bottom.plot(wave, norm, color="k", lw=0.6)
    bottom.axhline(1.0, color="C3", lw=1.0, ls="--")
    bottom.set_ylabel("normalized flux")
    lo, hi = _finite_limits(norm, 0.2, 99.8)
    bottom.set_ylim(max(lo, 0.0), hi)
    bottom.set_xlim(wave[0], wave[-1])
    return fig


def figure_snr(data: FigureData) -> Figure:
    """Fig. 3: SNR_lambda of the training set and of the validation + survey sets.

    Parameters
    ----------
    data : FigureData
        Loaded run products.

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig = _new_figure(7.5, 5.0)
    ax = fig.add_subplot()
    ax.set_xlabel(r"SNR$_\lambda$ (sum of the $ugriz$ SNRs)")
    ax.set_ylabel("spectra per bin")
    snr = data.store_snr
    finite = np.isfinite(snr) & (snr > 0)
    if not finite.any():
        _note(ax, "no spectra with an SNR")
        return fig
    lo, hi = float(snr[finite].min()), float(snr[finite].max())
    lo, hi = min(lo, 0.8 * data.snr_min), max(hi, 1.25 * data.snr_training_min)
    bins = _bins_with_edges(lo * 0.98, hi * 1.02, (data.snr_min, data.snr_training_min), log=True)
    training = finite & data.in_training
    others = finite & np.isin(data.store_subset, ("validation", "survey")) & ~data.in_training
    counts, _, _ = ax.hist(snr[finite], bins=bins, histtype="step", color="0.45", lw=1.2,
                           label=f"all spectra in the store ({int(finite.sum())})")
    if others.any():
        ax.hist(snr[others], bins=bins, histtype="stepfilled", facecolor=_OTHER_COLOR, alpha=0.5,
                label=f"validation + survey sets ({int(others.sum())})")
    if training.any():
        ax.hist(snr[training], bins=bins, histtype="step", color=_TRAINING_COLOR, lw=2.0,
                label=f"training set ({int(training.sum())})")
    ax.axvline(data.snr_min, color="k", ls="--", lw=1.2,
               label=f"SNR$_\\lambda$ > {data.snr_min:g} (validation, survey)")
    note = "training" if data.training_pool == "training" else f"paper's training cut, unused in mode '{data.mode}'"
    ax.axvline(data.snr_training_min, color="k", ls=":", lw=1.5,
               label=f"SNR$_\\lambda$ > {data.snr_training_min:g} ({note})")
    ax.set_xscale("log")
    _plain_log_axis(ax.xaxis)
    ax.set_xlim(bins[0], bins[-1])
    ax.set_ylim(0, 1.6 * max(1.0, float(np.max(counts))))  # room for the legend
    if not (training.any() or others.any()):
        ax.text(0.98, 0.6, "no training, validation or survey spectra", transform=ax.transAxes,
                ha="right", fontsize=9, color="0.35")
    ax.legend(loc="upper right")
    return fig


def figure_validation(data: FigureData) -> Figure:
    """Fig. 4: Cannon vs catalog labels of the validation set, residual histograms inset.

    Parameters
    ----------
    data : FigureData
        Loaded run products (uses ``data.validation``).

    Returns
    -------
    matplotlib.figure.Figure
    """
    names = data.label_names or ("teff", "radius", "mass", "luminosity")
    units = data.label_units or tuple(LABEL_UNITS.get(n, "1") for n in names)
    ncols = 2 if len(names) > 1 else 1
    nrows = int(np.ceil(len(names) / ncols))
    fig = _new_figure(5.0 * ncols + 1.0, 4.6 * nrows + 0.4, layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False))
    axes = axes.ravel()
    v = data.validation
    scatter = None
    n_used = 0
    if v is not None and v.snr_lambda.size:
        snr_all = v.snr_lambda[v.usable & np.isfinite(v.snr_lambda) & (v.snr_lambda > 0)]
        norm = LogNorm(vmin=max(1.0, snr_all.min()), vmax=max(2.0, snr_all.max())) if snr_all.size else None
    else:
        norm = None
    for ax, name, unit in zip(axes, names, units):
        ax.set_xlabel(_axis_label(name, unit, "catalog"))
        ax.set_ylabel(_axis_label(name, unit, "The Cannon"))
        if v is None:
            _note(ax, "no validation results")
            continue
        if name not in v.model:
            _note(ax, f"no validation values of {name}")
            continue
        x, y = v.catalog[name], v.model[name]
        ok = v.usable & np.isfinite(x) & np.isfinite(y)
        if not ok.any():
            _note(ax, "no usable validation spectra")
            continue
        n_used = max(n_used, int(ok.sum()))
        lo, hi = _finite_limits(np.concatenate([x[ok], y[ok]]), 0.2, 99.8)
        ax.plot([lo, hi], [lo, hi], color="k", lw=1.0, ls="--", zorder=3)
        size = 6 if ok.sum() > 3000 else 12
        snr = v.snr_lambda[ok]
        if norm is not None and np.all(np.isfinite(snr) & (snr > 0)):
            scatter = ax.scatter(x[ok], y[ok], c=snr, cmap="viridis", norm=norm, s=size, lw=0, alpha=0.8,
                                 rasterized=True)
        else:
            ax.scatter(x[ok], y[ok], color="C0", s=size, lw=0, alpha=0.8, rasterized=True)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal", adjustable="box")
        res = y[ok] - x[ok]
        sigma = _robust_std(res)
        inset = ax.inset_axes([0.56, 0.07, 0.41, 0.33])
        span = 4 * sigma if np.isfinite(sigma) and sigma > 0 else max(np.ptp(res), 1e-6)
        center = float(np.median(res))
        edges = np.linspace(center - span, center + span, 31)
        inset.hist(res, bins=edges, color="0.55")
        if np.isfinite(sigma) and sigma > 0:
            grid = np.linspace(edges[0], edges[-1], 200)
            scale = res.size * (edges[1] - edges[0]) / (np.sqrt(2 * np.pi) * sigma)
            inset.plot(grid, scale * np.exp(-0.5 * ((grid - center) / sigma) ** 2), color="C3", lw=1.2)
        inset.axvline(0.0, color="k", lw=0.8, ls="--")
        inset.set_yticks([])
        inset.tick_params(labelsize=7)
        inset.set_xlabel(f"residual [{_unit(unit)}]" if unit and unit != "1" else "residual", fontsize=8,
                         labelpad=1)
        inset.text(0.03, 0.95, f"$\\sigma$ = {_fmt(sigma)}\nmedian {_fmt(center)}", transform=inset.transAxes,
                   ha="left", va="top", fontsize=7.5)
        inset.patch.set_alpha(0.9)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    if scatter is not None:
        cbar = fig.colorbar(scatter, ax=list(axes[:len(names)]), shrink=0.75, pad=0.02)
        cbar.set_label(r"SNR$_\lambda$")
        _plain_log_axis(cbar.ax.yaxis)
    fig.suptitle(f"Validation set: {n_used} spectra (model mode '{data.mode}')" if n_used
                 else "Validation set", fontsize=13)
    return fig


def figure_error_model(data: FigureData) -> Figure:
    """Fig. 5: residual scatter vs SNR_lambda in equal-count bins, with the error models.

    Parameters
    ----------
    data : FigureData
        Loaded run products (``data.validation``, ``data.error_models``).

    Returns
    -------
    matplotlib.figure.Figure
    """
    names = data.label_names or ("teff", "radius", "mass", "luminosity")
    units = data.label_units or tuple(LABEL_UNITS.get(n, "1") for n in names)
    ncols = 2 if len(names) > 1 else 1
    nrows = int(np.ceil(len(names) / ncols))
    fig = _new_figure(5.4 * ncols, 4.0 * nrows + 0.7, layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False))
    legend_handles: dict[str, Any] = {}
    axes = axes.ravel()
    v = data.validation
    title = "Label scatter vs SNR$_\\lambda$ (validation residuals)"
    for k, (ax, name, unit) in enumerate(zip(axes, names, units)):
        ax.set_xlabel(r"SNR$_\lambda$")
        ax.set_ylabel(f"std of {_symbol(name)} residuals" + (f" [{_unit(unit)}]" if unit and unit != "1" else ""))
        ok = np.zeros(0, dtype=bool)
        if v is not None and name in v.model:
            res = v.model[name] - v.catalog[name]
            ok = v.usable & np.isfinite(res) & np.isfinite(v.snr_lambda) & (v.snr_lambda > 0)
        if ok.sum() < 6:
            _note(ax, "no validation results" if v is None else "too few validation residuals")
            continue
        res, snr = res[ok], v.snr_lambda[ok]
        n = res.size
        per_bin = v.stars_per_bin or int(max(20, min(1360, n // 8)))
        per_bin = int(min(per_bin, max(3, n // 3)))
        bins = binned_residual_scatter(res, snr, stars_per_bin=per_bin)
        if k == 0:
            title += f": {n} spectra, ~{per_bin} per bin"
        ax.errorbar(bins.snr_mean, bins.scatter,
                    xerr=[bins.snr_mean - bins.snr_low, bins.snr_high - bins.snr_mean],
                    fmt="o", color="k", ms=4, capsize=0, lw=1.0, label="binned std (equal counts)", zorder=4)
        x_lo = max(1.0, float(bins.snr_low.min()) * 0.85)
        x_hi = float(bins.snr_high.max()) * 1.15
        grid = np.geomspace(x_lo, x_hi, 400)
        y_values = list(bins.scatter)
        if name in v.error:
            # median reported error of the stars of each bin (same sort as the binning)
            err = v.error[name][ok][np.argsort(snr, kind="stable")]
            splits = np.cumsum(bins.n_stars)[:-1]
            med = np.array([np.nanmedian(e) if np.isfinite(e).any() else np.nan for e in np.split(err, splits)])
            ax.plot(bins.snr_mean, med, "s", mfc="none", mec="C2", ms=6, mew=1.5,
                    label="median reported error", zorder=5)
            y_values += list(med)
            if name in v.catalog_error:
                cat = v.catalog_error[name][ok][np.argsort(snr, kind="stable")]
                expected = np.array([np.nanmedian(np.hypot(e, c)) if np.isfinite(np.hypot(e, c)).any() else np.nan
                                     for e, c in zip(np.split(err, splits), np.split(cat, splits))])
                ax.plot(bins.snr_mean, expected, "D", mfc="none", mec="C1", ms=6, mew=1.5,
                        label=r"expected std: median $\sqrt{\mathrm{reported}^2 + \mathrm{catalog\ error}^2}$",
                        zorder=5)
                y_values += list(expected)
        model = data.error_models.get(name)
        if model is not None:
            curve = error_model_sigma(model, grid)
            constant = model.c1 == 0 and model.c2 == 0
            label = ("systematic error term (added in quadrature to the formal error)" if constant
                     else "fitted model (quadratic, floor)")
            ax.plot(grid, curve, color="C3", lw=1.8, label=label)
            y_values += list(curve)
            if not constant:
                ax.axvline(model.snr_threshold, color="0.5", ls=":", lw=1.0,
                           label=f"floor above SNR$_\\lambda$ = {model.snr_threshold:g}")
        paper = PAPER_ERROR_MODEL.get(name)
        if paper is not None:
            curve = error_model_sigma(paper, grid)
            ax.plot(grid, curve, color="C0", lw=1.4, ls="--", label="paper Table 2")
            y_values += list(curve)
        ax.set_xscale("log")
        _plain_log_axis(ax.xaxis)
        ax.set_xlim(x_lo, x_hi)
        y_values = np.asarray(y_values)
        y_values = y_values[np.isfinite(y_values)]
        if y_values.size:
            ax.set_ylim(0, 1.15 * float(np.max(y_values)))
        for handle, text in zip(*ax.get_legend_handles_labels()):
            legend_handles.setdefault(text, handle)
        if model is None:
            ax.text(0.02, 0.04, "no fitted error model", transform=ax.transAxes, fontsize=8, color="0.35")
    for ax in axes[len(names):]:
        ax.set_visible(False)
    if legend_handles:
        order = ("binned", "fitted", "systematic", "floor", "paper", "median reported", "expected")
        keys = sorted(legend_handles, key=lambda t: next((i for i, o in enumerate(order) if t.startswith(o)), 99))
        fig.legend([legend_handles[t] for t in keys], keys, loc="outside lower center",
                   ncol=min(3 if len(legend_handles) > 4 else 4, len(legend_handles)), fontsize=9.5, frameon=False)
    fig.suptitle(title, fontsize=13)
    return fig


def figure_chi2(data: FigureData) -> Figure:
    """Fig. 6: chi^2 of the survey set with the final cut.

    Parameters
    ----------
    data : FigureData
        Loaded run products.

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig = _new_figure(7.5, 5.0)
    ax = fig.add_subplot()
    ax.set_xlabel(r"$\chi^2$ of the Cannon fit")
    ax.set_ylabel("spectra per bin")
    chi2 = data.results.get("chi2", np.array([]))
    subset = data.results.get("subset", np.array([], dtype=object))
    survey = (subset == "survey") & np.isfinite(chi2) & (chi2 > 0)
    if not survey.any():
        _note(ax, "no survey spectra with a fit")
        ax.axvline(data.chi2_max, color="C3", lw=1.5, ls="--")
        return fig
    values = chi2[survey]
    lo, hi = float(values.min()), float(values.max())
    lo, hi = min(lo, 0.5 * data.chi2_max), max(hi, 1.5 * data.chi2_max)
    log = hi / lo > 30
    bins = _bins_with_edges(lo * 0.98 if log else 0.0, hi * 1.02, (data.chi2_max,), log=log, n_total=50)
    ax.hist(values, bins=bins, color="0.5", label=f"survey set ({values.size})")
    above = int(np.count_nonzero(values >= data.chi2_max))
    ax.hist(values[values >= data.chi2_max], bins=bins, color="C3", alpha=0.8,
            label=f"$\\chi^2 \\geq$ {data.chi2_max:g}, removed: {above} ({100 * above / values.size:.1f}%)")
    ax.axvline(data.chi2_max, color="C3", lw=1.5, ls="--", label=f"cut $\\chi^2$ = {data.chi2_max:g}")
    if log:
        ax.set_xscale("log")
        _plain_log_axis(ax.xaxis)
    ax.set_xlim(bins[0], bins[-1])
    ax.set_title(f"Survey set: median $\\chi^2$ = {np.median(values):.0f}")
    ax.legend(loc="upper right")
    return fig


def _characterized(data: FigureData) -> np.ndarray:
    flags = data.results.get("flags", np.array([], dtype=np.int64))
    return flags == 0


def figure_teff_subtype(data: FigureData) -> Figure:
    """Fig. 7: Cannon Teff per LAMOST subtype (characterized set), box plots.

    Parameters
    ----------
    data : FigureData
        Loaded run products.

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig = _new_figure(7.5, 5.2)
    ax = fig.add_subplot()
    ax.set_xlabel("LAMOST spectral subtype")
    ax.set_ylabel(r"$T_\mathrm{eff}$ (The Cannon) [K]")
    teff = data.results.get("teff")
    keep = _characterized(data)
    if teff is None:
        _note(ax, "the results have no Teff")
        return fig
    codes = spectral_code(data.results.get("subclass", np.array([], dtype=object)))
    ok = keep & np.isfinite(teff) & np.isfinite(codes)
    if not ok.any():
        _note(ax, "no characterized spectra (flags = 0) with a LAMOST subtype")
        return fig
    categories = np.unique(codes[ok])
    groups = [teff[ok & (codes == c)] for c in categories]
    positions = np.arange(categories.size)
    box = ax.boxplot(groups, positions=positions, widths=0.6, whis=(5, 95), showfliers=True,
                     patch_artist=True, medianprops={"color": "k", "lw": 1.5},
                     flierprops={"marker": ".", "markersize": 3, "markerfacecolor": "0.4", "markeredgecolor": "none"})
    for patch in box["boxes"]:
        patch.set_facecolor("C0")
        patch.set_alpha(0.45)
    anchors = dict(zip(spectral_code([n for n, _ in DWARF_TEFF_SEQUENCE]), (t for _, t in DWARF_TEFF_SEQUENCE)))
    ref = [anchors.get(float(c), np.nan) for c in categories]
    if np.isfinite(ref).any():
        ax.plot(positions, ref, "D", color="C3", ms=6, label="dwarf sequence (Pecaut & Mamajek 2013)", zorder=5)
        ax.legend(loc="upper right")
    ax.set_xticks(positions, [spectral_type_name(c) for c in categories])
    ax.set_xlim(-0.6, categories.size - 0.4)
    lo, hi = _finite_limits(np.concatenate([teff[ok], np.asarray(ref)[np.isfinite(ref)]]), 0.0, 100.0, 0.08)
    ax.set_ylim(lo - 0.06 * (hi - lo), hi + 0.08 * (hi - lo))
    for p, g in zip(positions, groups):
        ax.text(p, 0.015, f"N={g.size}", transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                fontsize=8, color="0.3")
    ax.set_title(f"Characterized set (flags = 0): {int(ok.sum())} spectra; boxes 25-75%, whiskers 5-95%",
                 fontsize=11)
    return fig


def figure_parameters(data: FigureData) -> Figure:
    """Fig. 8: the parameter space of the characterized set (corner plot).

    The training set's Teff range is shaded grey and the other labels' training ranges
    are dashed, as in the paper.

    Parameters
    ----------
    data : FigureData
        Loaded run products.

    Returns
    -------
    matplotlib.figure.Figure
    """
    names = data.label_names or ("teff", "radius", "mass", "luminosity")
    units = data.label_units or tuple(LABEL_UNITS.get(n, "1") for n in names)
    k = len(names)
    fig = _new_figure(2.6 * k + 1.0, 2.6 * k + 0.6)
    axes = np.atleast_2d(fig.subplots(k, k, squeeze=False, gridspec_kw={"wspace": 0.08, "hspace": 0.08}))
    keep = _characterized(data)
    values = {n: data.results.get(n, np.full(keep.size, np.nan)) for n in names}
    ok = keep.copy()
    for n in names:
        ok &= np.isfinite(values[n])
    n_ok = int(ok.sum())
    limits = {}
    for n in names:
        rng = data.training_ranges.get(n)
        if n_ok:
            lo, hi = _finite_limits(values[n][ok], 0.2, 99.8, 0.06)
            if rng is not None:
                lo, hi = min(lo, rng[0]), max(hi, rng[1])
        elif rng is not None and rng[1] > rng[0]:
            lo, hi = rng
        else:
            lo, hi = 0.0, 1.0
        pad = 0.04 * (hi - lo) if rng is not None else 0.0
        limits[n] = (lo - pad, hi + pad)
    size = 3 if n_ok > 5000 else 7

    def ranges(ax: Any, name: str, axis: str) -> None:
        rng = data.training_ranges.get(name)
        if rng is None:
            return
        if name == "teff":
            (ax.axvspan if axis == "x" else ax.axhspan)(rng[0], rng[1], color="0.85", zorder=0, lw=0)
        else:
            for edge in rng:
                (ax.axvline if axis == "x" else ax.axhline)(edge, color="0.3", ls="--", lw=0.9, zorder=1)

    for i, yname in enumerate(names):
        for j, xname in enumerate(names):
            ax = axes[i, j]
            if j > i:
                ax.set_visible(False)
                continue
            if i == j:
                ranges(ax, xname, "x")
                if n_ok:
                    ax.hist(values[xname][ok], bins=30, range=limits[xname], color="C0", histtype="stepfilled",
                            alpha=0.7)
                ax.set_yticks([])
            else:
                ranges(ax, xname, "x")
                ranges(ax, yname, "y")
                if n_ok:
                    ax.scatter(values[xname][ok], values[yname][ok], s=size, lw=0, color="k", alpha=0.5,
                               rasterized=True)
                ax.set_ylim(limits[yname])
            ax.set_xlim(limits[xname])
            if i == k - 1:
                ax.set_xlabel(_axis_label(xname, units[j]))
                for label in ax.get_xticklabels():
                    label.set_rotation(45)
            else:
                ax.tick_params(labelbottom=False)
            if j == 0 and i > 0:
                ax.set_ylabel(_axis_label(yname, units[i]))
            elif j > 0:
                ax.tick_params(labelleft=False)
    if not n_ok:
        fig.text(0.5, 0.5, "no characterized spectra (flags = 0)", ha="center", va="center", fontsize=13,
                 color="0.35", bbox={"boxstyle": "round", "facecolor": "0.96", "edgecolor": "0.7"})
    handles = [Patch(color="0.85", label=r"training $T_\mathrm{eff}$ range"),
               Line2D([], [], color="0.3", ls="--", lw=0.9, label="training range of the other labels")]
    fig.legend(handles=handles, loc="upper right", bbox_to_anchor=(0.9, 0.8), frameon=False, fontsize=11,
               title=f"Characterized set (flags = 0):\n{n_ok} spectra", title_fontsize=13)
    return fig


_DRAWERS: dict[str, Callable[[FigureData], Figure]] = {
    "fig1_subtypes": figure_subtypes,
    "fig2_normalization": figure_normalization,
    "fig3_snr": figure_snr,
    "fig4_validation": figure_validation,
    "fig5_error_model": figure_error_model,
    "fig6_chi2": figure_chi2,
    "fig7_teff_subtype": figure_teff_subtype,
    "fig8_parameters": figure_parameters,
}


def draw_figures(data: FigureData, outdir: str | os.PathLike,
                 formats: Sequence[str] | str = ("png", "pdf")) -> list[Path]:
    """Draw Figs. 1-8 from loaded data and write them.

    Parameters
    ----------
    data : FigureData
        From :func:`load_figure_data` (or built directly).
    outdir : str or path-like
        Output directory (created if needed).
    formats : sequence of str
        Matplotlib output formats, e.g. ``("png", "pdf")``.

    Returns
    -------
    list of pathlib.Path
        Written files, in :data:`FIGURE_NAMES` order, each in every format.

    Raises
    ------
    ValueError
        On an unsupported format.
    """
    formats = _check_formats(formats)
    out = Path(os.fspath(outdir))
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name in FIGURE_NAMES:
        with mpl.rc_context(_STYLE):
            fig = _DRAWERS[name](data)
            written += _save(fig, out, name, formats)
    return written


def make_figures(
    store: str | os.PathLike,
    model_path: str | os.PathLike,
    results_path: str | os.PathLike,
    validation_path: str | os.PathLike | None,
    outdir: str | os.PathLike,
    formats: Sequence[str] | str = ("png", "pdf"),
) -> list[Path]:
    """Write the paper's Figs. 1-8 for a run (see the module docstring for the list).

    Parameters
    ----------
    store : str or path-like
        Survey store with its ``preprocessed`` and ``selection`` groups.
    model_path : str or path-like
        Trained, validated model.
    results_path : str or path-like
        Results store.
    validation_path : str or path-like or None
        Validation residuals (None or missing: Figs. 4-5 carry a note).
    outdir : str or path-like
        Output directory (created if needed).
    formats : sequence of str
        Output formats (default PNG and PDF).

    Returns
    -------
    list of pathlib.Path
        The written files (``outdir/fig1_subtypes.png``, ...).
    """
    formats = _check_formats(formats)
    data = load_figure_data(store, model_path, results_path, validation_path)
    return draw_figures(data, outdir, formats)


# ----------------------------------------------------------------------------------------
# one star


def plot_star(
    store: str | os.PathLike,
    model_path: str | os.PathLike,
    results_path: str | os.PathLike,
    spectrum_id: str,
    out_path: str | os.PathLike,
) -> Path:
    """Plot the observed and the model normalized spectrum of one star, with residuals.

    Parameters
    ----------
    store : str or path-like
        Survey store with its ``preprocessed`` group.
    model_path : str or path-like
        Trained model.
    results_path : str or path-like
        Results store (labels of the star).
    spectrum_id : str
        The star's spectrum id (e.g. ``'55927-M5055_sp09-114'``).
    out_path : str or path-like
        Output file; the suffix sets the format (none: ``.png`` is appended).

    Returns
    -------
    pathlib.Path
        The written file.

    Raises
    ------
    SpectrumNotFoundError
        When ``spectrum_id`` is in neither the results nor the survey store (a
        :class:`KeyError`).
    ValueError
        On an unsupported output format.
    """
    from lamost_mdwarf.io.derived_groups import open_derived_group
    from lamost_mdwarf.io.survey_store import open_survey_store
    from lamost_mdwarf.model import load_model
    from lamost_mdwarf.stages.infer import open_results

    out = Path(os.fspath(out_path))
    if not out.suffix:
        out = out.with_suffix(".png")
    fmt = _check_formats((out.suffix,))[0]
    sid = str(spectrum_id).strip()

    results = open_results(results_path)
    res_ids = _as_str(results["spectrum_id"].values)
    hits = np.flatnonzero(res_ids == sid)
    ds = open_survey_store(store)
    store_ids = _as_str(ds["spectrum_id"].values)
    store_hits = np.flatnonzero(store_ids == sid)
    if store_hits.size == 0:
        where = "the survey store" if hits.size else "the results or the survey store"
        raise SpectrumNotFoundError(f"spectrum_id {sid!r} is not in {where} ({store_ids.size} spectra in "
                                    f"{os.fspath(store)})")
    row = int(store_hits[0])
    rrow = int(hits[0]) if hits.size else None
    model = load_model(model_path)
    pre = open_derived_group(store, "preprocessed")
    if row >= int(pre.sizes["star"]):
        raise SpectrumNotFoundError(f"spectrum_id {sid!r} has not been preprocessed yet (run preprocess)")

    wave = np.asarray(ds["wavelength"].values, dtype=np.float64)
    flux = np.asarray(pre["norm_flux"][row].values, dtype=np.float64)
    ivar = np.asarray(pre["norm_ivar"][row].values, dtype=np.float64)
    masked = np.asarray(pre["pixel_mask"][row].values) != 0
    subclass = str(_as_str(ds["subclass"][row:row + 1].values)[0])
    snr = float(ds["snr_lambda"][row].values)

    def value(name: str) -> float:
        if rrow is None or name not in results:
            return float("nan")
        return float(results[name][rrow].values)

    labels = np.array([value(n) for n in model.label_names])
    model_flux = None
    if np.all(np.isfinite(labels)):
        spectrum = (design_matrix(scale_labels(labels[None, :], model.pivots, model.scales)) @ model.theta.T)[0]
        if model.wavelength.shape == wave.shape and np.allclose(model.wavelength, wave):
            model_flux = spectrum
        else:
            model_flux = np.interp(wave, model.wavelength, spectrum, left=np.nan, right=np.nan)
        s2 = np.interp(wave, model.wavelength, model.s2, left=np.nan, right=np.nan)

    physical = [n for n in ("teff", "radius", "mass", "luminosity") if n in results]
    parts = []
    for name in physical:
        unit = str(results[name].attrs.get("units", LABEL_UNITS.get(name, "")))
        val, err = value(name), value(f"{name}_err")
        if np.isfinite(val):
            parts.append(f"{_symbol(name)} = {_fmt_pm(val, err)}" + (f" {_unit(unit)}" if unit and unit != "1" else ""))
    chi2, flags = value("chi2"), (int(results["flags"][rrow].values) if rrow is not None else None)
    status = ""
    if rrow is None:
        status = "not in the results"
    elif flags:
        status = "flags %d: %s" % (flags, str(results["flag_reason"][rrow].values) if "flag_reason" in results else "")
    line2 = ", ".join(parts) if parts else "no Cannon labels"
    if np.isfinite(chi2):
        line2 += f", $\\chi^2$ = {chi2:.0f}"

    with mpl.rc_context(_STYLE):
        fig = _new_figure(11.0, 6.5)
        top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.3], "hspace": 0.05})
        good = ~masked & np.isfinite(flux)
        _shade_mask(top, wave, masked)
        top.plot(wave, np.where(good, flux, np.nan), color="k", lw=0.7, label="observed (normalized)")
        if model_flux is not None:
            top.plot(wave, np.where(good, model_flux, np.nan), color="C3", lw=0.9, alpha=0.9,
                     label="Cannon model")
        top.set_ylabel("normalized flux")
        lo, hi = _finite_limits(flux[good] if good.any() else np.array([0.0, 1.0]), 0.3, 99.7)
        top.set_ylim(max(lo, 0.0), hi)
        top.legend(loc="upper left", ncol=3)
        title = f"{sid}  ({subclass or '?'}, SNR$_\\lambda$ = {snr:.0f})" + (f"  [{status}]" if status else "")
        top.set_title(title + "\n" + line2, fontsize=11)
        _shade_mask(bottom, wave, masked, label=None)
        bottom.set_xlabel(r"rest-frame wavelength [$\AA$]")
        bottom.set_ylabel("data - model")
        if model_flux is not None:
            resid = np.where(good, flux - model_flux, np.nan)
            with np.errstate(divide="ignore", invalid="ignore"):
                sigma = np.sqrt(np.where(ivar > 0, 1.0 / ivar, np.nan) + s2)
            sigma = np.where(good, sigma, np.nan)
            bottom.fill_between(wave, -sigma, sigma, color="C0", alpha=0.3, lw=0, step="mid",
                                label=r"$\pm 1\sigma$ (noise and model scatter)")
            bottom.plot(wave, resid, color="k", lw=0.6)
            bottom.axhline(0.0, color="C3", lw=0.8)
            r_lo, r_hi = _finite_limits(np.concatenate([resid[good], sigma[good], -sigma[good]]), 0.5, 99.5)
            bound = max(abs(r_lo), abs(r_hi))
            bottom.set_ylim(-bound, bound)
            bottom.legend(loc="upper left", fontsize=8)
        else:
            _note(bottom, "no model spectrum: the star has no Cannon labels")
            bottom.set_yticks([])
        bottom.set_xlim(wave[0], wave[-1])
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format=fmt, bbox_inches="tight")
        fig.clear()
    return out
