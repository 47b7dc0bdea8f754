"""The whole pipeline in one call: ingest -> preprocess -> select -> train -> validate -> infer
-> catalog -> figures, skipping what is up to date.

Work directory layout::

    WORKDIR/store.zarr        survey store (+ groups preprocessed, selection)
    WORKDIR/model.zarr        trained, validated Cannon model
    WORKDIR/validation.zarr   per-star validation residuals
    WORKDIR/results.zarr      results, one row per stored spectrum
    WORKDIR/catalog.fits      catalog (flags == 0), also catalog.csv
    WORKDIR/figures/          the paper's figures (PNG and PDF)
    WORKDIR/run.log           log of every run
    WORKDIR/pipeline_state.json  fingerprints used to skip up-to-date stages

Every stage is resumable: the store, the derived groups and the results commit block by
block, so a rerun after an interruption continues; a rerun after success does nothing.
New spectra (a new release) are ingested, preprocessed, selected and inferred with the
existing model (no retraining unless ``retrain``), and appended to the results and
catalog.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lamost_mdwarf.grid import WavelengthGrid
from lamost_mdwarf.io.derived_groups import derived_group_extent
from lamost_mdwarf.io.survey_store import open_survey_store
from lamost_mdwarf.model import load_model
from lamost_mdwarf.modes import DEFAULT_MODE, get_mode, mode_from_settings
from lamost_mdwarf.preprocessing import PreprocessConfig
from lamost_mdwarf.selection import SelectionConfig, format_cut_table
from lamost_mdwarf.stages.infer import InferSettings

__all__ = ["RunSummary", "WorkdirLayout", "run_pipeline", "setup_logging"]

logger = logging.getLogger("lamost_mdwarf")


@dataclass(frozen=True)
class WorkdirLayout:
    """Paths of a work directory."""

    root: Path

    @property
    def store(self) -> Path:
        return self.root / "store.zarr"

    @property
    def model(self) -> Path:
        return self.root / "model.zarr"

    @property
    def validation(self) -> Path:
        return self.root / "validation.zarr"

    @property
    def results(self) -> Path:
        return self.root / "results.zarr"

    @property
    def catalog(self) -> Path:
        return self.root / "catalog.fits"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def log(self) -> Path:
        return self.root / "run.log"

    @property
    def state(self) -> Path:
        return self.root / "pipeline_state.json"


@dataclass
class RunSummary:
    """What a pipeline run did and where its products are."""

    layout: WorkdirLayout
    stages_run: list[str] = field(default_factory=list)
    stages_skipped: list[str] = field(default_factory=list)
    n_new_spectra: int = 0
    cut_table: list[tuple[str, int, int]] = field(default_factory=list)
    subset_counts: dict[str, int] = field(default_factory=dict)
    validation_text: str = ""
    n_catalog_rows: int = 0
    figures: list[Path] = field(default_factory=list)

    def format(self) -> str:
        """Human-readable summary (where things are, counts, validation scatter)."""
        lines = [
            f"stages run: {', '.join(self.stages_run) or 'none (everything up to date)'}",
            f"new spectra ingested: {self.n_new_spectra}",
        ]
        if self.cut_table:
            lines += ["", "counts per cut:", format_cut_table(self.cut_table)]
        if self.subset_counts:
            lines.append("subsets: " + ", ".join(f"{k} {v}" for k, v in self.subset_counts.items()))
        if self.validation_text:
            lines += ["", self.validation_text]
        lines += [
            "",
            f"catalog ({self.n_catalog_rows} stars): {self.layout.catalog} (also .csv)",
            f"results: {self.layout.results}  (lamost_mdwarf.open_results)",
            f"figures: {self.layout.figures}",
            f"log: {self.layout.log}",
        ]
        return "\n".join(lines)


def setup_logging(log_path: Path | None = None, echo: Callable[[str], None] | None = None) -> list[logging.Handler]:
    """Send pipeline log records to ``log_path`` (appending) and/or an ``echo`` function.

    Returns the handlers added (remove them with ``logger.removeHandler``).
    """
    handlers: list[logging.Handler] = []
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handlers.append(handler)
    if echo is not None:
        class _Echo(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                echo(record.getMessage())

        handlers.append(_Echo())
    for handler in handlers:
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handlers


def _load_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _save_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from the state file (tuples become lists, ...)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    stat = os.stat(path)
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class _Timer:
    def __init__(self, summary: RunSummary, name: str) -> None:
        self.summary, self.name = summary, name

    def __enter__(self) -> "_Timer":
        self.start = time.perf_counter()
        logger.info(f"[{self.name}] starting")
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        seconds = time.perf_counter() - self.start
        if exc_type is None:
            self.summary.stages_run.append(self.name)
            logger.info(f"[{self.name}] done in {seconds:.1f} s")
        else:
            logger.error(f"[{self.name}] failed after {seconds:.1f} s: {exc[0]}")


def run_pipeline(
    spectra: Sequence[str | os.PathLike],
    labels: str | os.PathLike,
    workdir: str | os.PathLike,
    client: Any,
    release: str | None = None,
    retrain: bool = False,
    preprocess_config: PreprocessConfig = PreprocessConfig(),
    selection_config: SelectionConfig = SelectionConfig(),
    label_columns: dict[str, str] | None = None,
    match_radius_arcsec: float = 3.0,
    infer_settings: InferSettings = InferSettings(),
    make_figures: bool = True,
    progress_factory: Callable[[str], Callable[[int, int], None]] | None = None,
    mode: str = DEFAULT_MODE,
    grid: WavelengthGrid | None = None,
    chunk_stars: int | None = None,
) -> RunSummary:
    """Run every stage that is not up to date.

    Parameters
    ----------
    spectra : sequence of path-like
        FITS files, directories or globs.
    labels : path-like
        Label catalog.
    workdir : path-like
        Work directory (created).
    client : distributed.Client
        Dask client the stages run on.
    release : str, optional
        Release label of new spectra.
    retrain : bool
        Retrain (and revalidate) even if a model exists.
    progress_factory : callable, optional
        ``progress_factory(label)`` returns a ``progress(done, total)`` callback.
    mode : str
        ``"best"`` (default) or ``"paper"`` (:mod:`lamost_mdwarf.modes`). An existing model
        trained in another mode is retrained (and revalidated).
    grid : WavelengthGrid, optional
        Wavelength grid of a new survey store (default 4500-7500 A at 1 A); an existing
        store keeps its grid (a different one is an error).
    chunk_stars : int, optional
        Stars per chunk of a new survey store; default: sized from the workers' memory
        limit (:func:`lamost_mdwarf.io.survey_store.chunk_stars_for_memory`).

    Returns
    -------
    RunSummary
    """
    mode_settings = get_mode(mode)
    layout = WorkdirLayout(Path(workdir))
    layout.root.mkdir(parents=True, exist_ok=True)
    handlers = setup_logging(layout.log)
    try:
        return _run_stages(layout, spectra, labels, client, release, retrain, preprocess_config, selection_config,
                           label_columns, match_radius_arcsec, infer_settings, make_figures, progress_factory,
                           mode_settings, grid, chunk_stars)
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()


def _run_stages(layout, spectra, labels, client, release, retrain, preprocess_config, selection_config,
                label_columns, match_radius_arcsec, infer_settings, make_figures, progress_factory,
                mode, grid=None, chunk_stars=None) -> RunSummary:
    from lamost_mdwarf.ingest import ingest
    from lamost_mdwarf.io.catalog import results_to_table, write_catalog
    from lamost_mdwarf.stages.infer import open_results, run_infer
    from lamost_mdwarf.stages.preprocess import run_preprocess
    from lamost_mdwarf.stages.select import open_selection, run_select
    from lamost_mdwarf.stages.train import run_train
    from lamost_mdwarf.stages.validate import run_validate

    summary = RunSummary(layout)
    logger.info(f"lamost_mdwarf run in {layout.root} (mode {mode.name})")
    state = _load_state(layout.state)
    progress = progress_factory or (lambda label: None)

    with _Timer(summary, "ingest"):
        ingested = ingest(layout.store, spectra, release=release, client=client, grid=grid,
                          chunk_stars=chunk_stars, progress=progress("ingest"))
        summary.n_new_spectra = ingested.counts["ingested"]
        logger.info(ingested.format(max_rejected=5))
    if sum(ingested.counts.values()) == 0:
        summary.stages_run.remove("ingest")
        summary.stages_skipped.append("ingest")
    n_star = open_survey_store(layout.store).sizes["star"]

    pre_rows, _ = derived_group_extent(layout.store, "preprocessed")
    if pre_rows == n_star and state.get("preprocess") == _jsonable(preprocess_config.to_dict()):
        summary.stages_skipped.append("preprocess")
    else:
        with _Timer(summary, "preprocess"):
            run_preprocess(layout.store, preprocess_config, progress=progress("preprocess"))
        state["preprocess"] = preprocess_config.to_dict()
        _save_state(layout.state, state)

    select_key = {"n_star": n_star, "labels": _file_fingerprint(labels), "columns": label_columns or {},
                  "radius": match_radius_arcsec, "config": selection_config.__dict__,
                  "preprocess": preprocess_config.to_dict()}
    if state.get("select") == _jsonable(select_key):
        summary.stages_skipped.append("select")
    else:
        with _Timer(summary, "select"):
            result = run_select(layout.store, labels, label_columns, match_radius_arcsec, selection_config)
            logger.info(format_cut_table(result.cut_table))
        state["select"] = select_key
        _save_state(layout.state, state)
    selection = open_selection(layout.store)
    summary.cut_table = selection.attrs["cut_table"]
    summary.subset_counts = selection.attrs["counts"]

    trained = False
    if not retrain and layout.model.exists() and mode_from_settings(load_model(layout.model).settings) != mode:
        logger.info(f"the model in {layout.model} was trained in another mode; retraining in mode {mode.name}")
        retrain = True
    if retrain or not layout.model.exists():
        with _Timer(summary, "train"):
            model = run_train(layout.store, layout.model, mode=mode, progress=progress("label refinement"))
            logger.info(f"model {model.model_hash} trained on {len(model.training_ids)} stars")
        trained = True
    else:
        summary.stages_skipped.append("train")
    model = load_model(layout.model)
    if trained or not model.error_models:
        with _Timer(summary, "validate"):
            validation = run_validate(layout.store, layout.model, layout.validation)
            summary.validation_text = validation.format()
            logger.info(summary.validation_text)
        state["validation_text"] = summary.validation_text
        _save_state(layout.state, state)
    else:
        summary.stages_skipped.append("validate")
        summary.validation_text = state.get("validation_text", "")

    with _Timer(summary, "infer"):
        computed, total = run_infer(layout.store, layout.model, layout.results, infer_settings,
                                    progress=progress("infer"))
        logger.info(f"inferred {computed} spectra ({total} rows)")
    if computed == 0:
        summary.stages_run.remove("infer")
        summary.stages_skipped.append("infer")

    results = open_results(layout.results)
    products_key = {"n_star": results.sizes["star"], "model_hash": results.attrs.get("model_hash"),
                    "settings": results.attrs.get("settings")}
    products_key = _jsonable(products_key)
    if state.get("catalog") == products_key and layout.catalog.exists():
        summary.stages_skipped.append("catalog")
    else:
        with _Timer(summary, "catalog"):
            table = results_to_table(results)
            write_catalog(table, layout.catalog)
            write_catalog(table, layout.catalog.with_suffix(".csv"))
            logger.info(f"catalog: {len(table)} stars -> {layout.catalog}")
        state["catalog"] = products_key
        _save_state(layout.state, state)
    summary.n_catalog_rows = int((results["flags"].values == 0).sum())

    if make_figures:
        if state.get("figures") == products_key and layout.figures.exists():
            summary.stages_skipped.append("figures")
            summary.figures = sorted(layout.figures.glob("*.png"))
        else:
            from lamost_mdwarf.figures import make_figures as draw

            with _Timer(summary, "figures"):
                summary.figures = draw(layout.store, layout.model, layout.results, layout.validation,
                                       layout.figures)
            state["figures"] = products_key
            _save_state(layout.state, state)
    return summary
