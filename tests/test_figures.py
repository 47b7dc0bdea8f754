"""Figures: every file of Figs. 1-8 and the per-star plot is written and valid, also for tiny data."""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from lamost_mdwarf.figures import (
    FIGURE_NAMES,
    FigureData,
    SpectrumNotFoundError,
    draw_figures,
    figure_error_model,
    figure_validation,
    load_figure_data,
    make_figures,
    plot_star,
    spectral_code,
    spectral_type_name,
    subtype_from_teff,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_valid(path: Path) -> None:
    """The file exists, is non-empty and has the signature of its format."""
    assert path.is_file(), path
    data = path.read_bytes()
    assert len(data) > 1000, (path, len(data))
    if path.suffix == ".png":
        assert data.startswith(PNG_MAGIC), path
        assert b"IEND" in data[-16:], path
    elif path.suffix == ".pdf":
        assert data.startswith(b"%PDF-"), path
        assert b"%%EOF" in data[-64:], path
    else:  # pragma: no cover - only png/pdf are written here
        raise AssertionError(f"unexpected suffix {path}")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 300-star simulated survey through every stage (paper mode): about 10 s.

    The training SNR threshold is lowered to 120 so that the paper's 15-term model has
    enough training stars in so small a survey.
    """
    from lamost_mdwarf.ingest import ingest
    from lamost_mdwarf.selection import SelectionConfig
    from lamost_mdwarf.simulate.survey import simulate_survey
    from lamost_mdwarf.stages.infer import run_infer
    from lamost_mdwarf.stages.preprocess import run_preprocess
    from lamost_mdwarf.stages.select import run_select
    from lamost_mdwarf.stages.train import run_train
    from lamost_mdwarf.stages.validate import run_validate

    work = tmp_path_factory.mktemp("figures")
    survey = simulate_survey(work / "sim", n_stars=300, seed=3, n_workers=1)
    paths = {name: work / f"{name}.zarr" for name in ("store", "model", "validation", "results")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ingest(paths["store"], [survey.spectra_dir])
        run_preprocess(paths["store"])
        run_select(paths["store"], survey.labels_path, config=SelectionConfig(snr_training_min=120.0))
        run_train(paths["store"], paths["model"], mode="paper")
        run_validate(paths["store"], paths["model"], paths["validation"])
        run_infer(paths["store"], paths["model"], paths["results"])
    return paths


def test_make_figures_writes_every_file(tiny_run, tmp_path):
    import matplotlib.pyplot as plt

    font_size = matplotlib.rcParams["font.size"]
    open_figures = plt.get_fignums()
    out = tmp_path / "figs"
    written = make_figures(tiny_run["store"], tiny_run["model"], tiny_run["results"], tiny_run["validation"], out)
    expected = [out / f"{name}.{fmt}" for name in FIGURE_NAMES for fmt in ("png", "pdf")]
    assert written == expected
    for path in written:
        assert_valid(path)
    # no pyplot figures and no style left behind
    assert plt.get_fignums() == open_figures
    assert matplotlib.rcParams["font.size"] == font_size


def test_missing_validation_and_one_format(tiny_run, tmp_path):
    written = make_figures(tiny_run["store"], tiny_run["model"], tiny_run["results"], tmp_path / "absent.zarr",
                           tmp_path, formats=("png",))
    assert [p.name for p in written] == [f"{name}.png" for name in FIGURE_NAMES]
    for path in written:
        assert_valid(path)


def test_unsupported_format(tiny_run, tmp_path):
    with pytest.raises(ValueError, match="unsupported figure format"):
        make_figures(tiny_run["store"], tiny_run["model"], tiny_run["results"], tiny_run["validation"], tmp_path,
                     formats=("png", "docx"))


def _empty_like(data: FigureData, keep: np.ndarray, keep_results: np.ndarray) -> FigureData:
    return dataclasses.replace(
        data,
        store_subclass=data.store_subclass[keep],
        store_snr=data.store_snr[keep],
        store_subset=data.store_subset[keep],
        catalog_teff=data.catalog_teff[keep],
        in_training=data.in_training[keep],
        results={k: v[keep_results] for k, v in data.results.items()},
        validation=None,
        example=None,
    )


def test_small_and_empty_data(tiny_run, tmp_path):
    data = load_figure_data(tiny_run["store"], tiny_run["model"], tiny_run["results"], tiny_run["validation"])
    n, m = data.store_snr.size, data.results["flags"].size
    # three stars, none in the survey set, no validation and no example spectrum
    few = np.zeros(n, dtype=bool)
    few[:3] = True
    few_results = np.zeros(m, dtype=bool)
    few_results[np.flatnonzero(data.results["subset"] != "survey")[:3]] = True
    cases = {
        "few": _empty_like(data, few, few_results),
        "empty": _empty_like(data, np.zeros(n, dtype=bool), np.zeros(m, dtype=bool)),
    }
    # validation with a handful of stars (fewer than one default SNR bin)
    v = data.validation
    assert v is not None and v.snr_lambda.size > 10
    idx = np.arange(5)
    cases["tiny_validation"] = dataclasses.replace(data, validation=dataclasses.replace(
        v, snr_lambda=v.snr_lambda[idx], usable=v.usable[idx],
        model={k: a[idx] for k, a in v.model.items()}, catalog={k: a[idx] for k, a in v.catalog.items()}))
    for name in ("few", "empty"):
        written = draw_figures(cases[name], tmp_path / name, formats=("png",))
        assert len(written) == len(FIGURE_NAMES), name
        for path in written:
            assert_valid(path)
    for draw in (figure_validation, figure_error_model):
        fig = draw(cases["tiny_validation"])
        path = tmp_path / f"{draw.__name__}.png"
        fig.savefig(path)
        assert_valid(path)


def test_plot_star(tiny_run, tmp_path):
    data = load_figure_data(tiny_run["store"], tiny_run["model"], tiny_run["results"], tiny_run["validation"])
    ids, flags = data.results["spectrum_id"], data.results["flags"]
    good = ids[np.flatnonzero(flags == 0)[0]]
    excluded = ids[np.flatnonzero(data.results["subset"] == "excluded")[0]]
    out = plot_star(tiny_run["store"], tiny_run["model"], tiny_run["results"], good, tmp_path / "good.png")
    assert out == tmp_path / "good.png"
    assert_valid(out)
    out = plot_star(tiny_run["store"], tiny_run["model"], tiny_run["results"], excluded, tmp_path / "sub" / "excl")
    assert out == tmp_path / "sub" / "excl.png"
    assert_valid(out)
    assert_valid(plot_star(tiny_run["store"], tiny_run["model"], tiny_run["results"], good, tmp_path / "good.pdf"))


def test_plot_star_unknown_id(tiny_run, tmp_path):
    with pytest.raises(SpectrumNotFoundError, match="no-such-spectrum") as info:
        plot_star(tiny_run["store"], tiny_run["model"], tiny_run["results"], "no-such-spectrum", tmp_path / "x.png")
    assert isinstance(info.value, KeyError)
    assert "is not in" in str(info.value)
    assert not (tmp_path / "x.png").exists()


def test_spectral_type_helpers():
    codes = spectral_code(["M3", "dM4.5", "sdM1", "K7", "G2", "Non", ""])
    np.testing.assert_array_equal(codes[:5], [3.0, 4.5, 1.0, -3.0, -18.0])
    assert np.isnan(codes[5:]).all()
    assert [spectral_type_name(c) for c in codes[:5]] == ["M3", "M4.5", "M1", "K7", "G2"]
    assert spectral_type_name(float("nan")) == "?"
    mapped = subtype_from_teff([3850.0, 3440.0, 3350.0, 4100.0, 6500.0, 2000.0, float("nan")])
    np.testing.assert_array_equal(mapped[:6], [0.0, 3.0, 3.0, -3.0, -20.0, 9.0])
    assert np.isnan(mapped[6])


def test_plot_star_cli(tiny_run, tmp_path):
    """``lamost-mdwarf plot-star`` by spectrum id and by designation, with clear errors."""
    from click.testing import CliRunner

    from lamost_mdwarf.cli import main
    from lamost_mdwarf.io.survey_store import open_survey_store

    store = open_survey_store(tiny_run["store"])
    sid = str(np.asarray(store["spectrum_id"].values, dtype=object)[5])
    designation = str(np.asarray(store["designation"].values, dtype=object)[5])
    n_spectra = int(sum(str(d) == designation for d in np.asarray(store["designation"].values, dtype=object)))
    paths = ["--store", str(tiny_run["store"]), "--model", str(tiny_run["model"]),
             "--results", str(tiny_run["results"])]
    runner = CliRunner()

    result = runner.invoke(main, ["plot-star", sid, *paths, "--out", str(tmp_path / "one.pdf")])
    assert result.exit_code == 0, result.output
    assert_valid(tmp_path / "one.pdf")

    result = runner.invoke(main, ["plot-star", designation, *paths, "--out", str(tmp_path / "many")])
    assert result.exit_code == 0, result.output
    written = sorted((tmp_path / "many").glob("star_*.png"))
    assert len(written) == n_spectra >= 1 and result.output.count("wrote ") == n_spectra
    for path in written:
        assert_valid(path)

    result = runner.invoke(main, ["plot-star", "no-such-star", *paths])
    assert result.exit_code != 0 and "neither a spectrum id nor a designation" in result.output
    result = runner.invoke(main, ["plot-star", sid, "--store", str(tiny_run["store"])])
    assert result.exit_code != 0 and "--model" in result.output and "--results" in result.output
    result = runner.invoke(main, ["plot-star", sid, *paths, "--out", str(tmp_path / "x.txt")])
    assert result.exit_code != 0 and "unsupported format" in result.output


def test_plot_star_cli_workdir_default_folder(tiny_run, tmp_path):
    import shutil

    from click.testing import CliRunner

    from lamost_mdwarf.cli import main
    from lamost_mdwarf.io.survey_store import open_survey_store

    work = tmp_path / "work"
    for name in ("store", "model", "results"):
        shutil.copytree(tiny_run[name], work / f"{name}.zarr")
    sid = str(np.asarray(open_survey_store(work / "store.zarr")["spectrum_id"].values, dtype=object)[0])
    result = CliRunner().invoke(main, ["plot-star", sid, "--workdir", str(work)])
    assert result.exit_code == 0, result.output
    safe = "".join(c if c.isalnum() or c in "._+-" else "_" for c in sid)
    assert_valid(work / "figures" / "stars" / f"star_{safe}.png")
