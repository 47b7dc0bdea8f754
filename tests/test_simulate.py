"""Tests of the LAMOST survey simulator (spectra, FITS layouts, label and truth tables)."""
from __future__ import annotations

import csv
import gzip
import hashlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from scipy.ndimage import gaussian_filter1d

from lamost_mdwarf.io.lamost_fits import read_lamost_spectrum
from lamost_mdwarf.io.lamost_writer import (
    LAYOUT_EXTEN0,
    FixedFloat,
    encode_header,
    format_header_card,
    write_lamost_spectrum,
)
from lamost_mdwarf.relations import mass_from_teff, radius_from_teff
from lamost_mdwarf.simulate.catalog import LABEL_COLUMNS
from lamost_mdwarf.simulate.instrument import ObservingConditions, measure_band_snr, native_wavelength, observe
from lamost_mdwarf.simulate.plan import designation_from_radec, draw_plan, subclass_from_teff
from lamost_mdwarf.simulate.population import draw_population
from lamost_mdwarf.simulate.spectra import (
    HALPHA_VACUUM_A,
    synthesize_fine,
    synthesize_rest_frame,
    tio5_index,
)
from lamost_mdwarf.simulate.survey import TRUTH_COLUMNS, SimulatedSurvey, simulate_survey

N_STARS = 150
SEED = 11


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def survey(tmp_path_factory: pytest.TempPathFactory) -> SimulatedSurvey:
    return simulate_survey(tmp_path_factory.mktemp("survey"), n_stars=N_STARS, seed=SEED, n_workers=1)


@pytest.fixture(scope="module")
def truth(survey: SimulatedSurvey) -> list[dict[str, str]]:
    with open(survey.truth_path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def labels(survey: SimulatedSurvey) -> list[dict[str, str]]:
    with open(survey.labels_path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def spectra(survey: SimulatedSurvey, truth: list[dict[str, str]]) -> dict[str, object]:
    return {row["path"]: read_lamost_spectrum(survey.outdir / row["path"]) for row in truth}


def _flag(value: str) -> bool:
    assert value in ("True", "False"), value
    return value == "True"


def _pseudo_continuum_slope(wavelength: np.ndarray, flux: np.ndarray, ivar: np.ndarray, z: float) -> float:
    """Slope (per 1000 A) over 4500-5500 A of the median-normalised pseudo-continuum.

    Rest frame, 1 A grid 4500-7500 A, ivar-weighted Gaussian smoothing with L = 50 A
    (Galgano et al. 2020, Eq. 1-2), normalised by its median over the whole grid.
    """
    grid = np.arange(4500.0, 7500.0, 1.0)
    rest = wavelength / (1.0 + z)
    f = np.interp(grid, rest, flux)
    w = np.clip(np.interp(grid, rest, ivar), 0.0, None)
    continuum = gaussian_filter1d(f * w, 50.0, mode="constant") / gaussian_filter1d(w, 50.0, mode="constant")
    continuum = continuum / np.median(continuum)
    window = grid <= 5500.0
    return float(np.polyfit(grid[window] / 1000.0, continuum[window], 1)[0])


# --------------------------------------------------------------------------- files and layouts


def test_files_on_disk_match_the_truth_table(survey: SimulatedSurvey, truth: list[dict[str, str]]) -> None:
    assert list(truth[0].keys()) == list(TRUTH_COLUMNS)
    on_disk = {str(p.relative_to(survey.outdir)) for p in survey.spectrum_paths()}
    assert on_disk == {row["path"] for row in truth}
    assert len(truth) == survey.n_files
    assert survey.n_files == survey.n_observations + sum(_flag(r["is_rereduction"]) for r in truth)
    for row in truth:
        suffix = ".fits" if row["layout"] == "dr1_image" else ".fits.gz"
        assert row["path"] == f"spectra/{row['data_release'].lower()}/spec-{row['spectrum_id']}{suffix}"
    # one file per (observation, release); no stray temporary files
    assert len({(r["spectrum_id"], r["data_release"]) for r in truth}) == len(truth)
    assert not [p for p in survey.spectra_dir.rglob("*") if p.name.endswith(".tmp")]


def test_every_layout_reads_back_with_the_right_grid_ids_and_metadata(
    truth: list[dict[str, str]], spectra: dict[str, object]
) -> None:
    layouts = Counter(row["layout"] for row in truth)
    assert set(layouts) == {"dr1_image", "image", "coadd_table"}
    assert layouts["dr1_image"] > 0.45 * len(truth)
    for row in truth:
        spectrum = spectra[row["path"]]
        meta = spectrum.meta
        assert meta["spectrum_id"] == row["spectrum_id"]
        assert meta["layout"] == row["layout"]
        assert meta["data_release"] == row["data_release"]
        assert meta["designation"] == row["designation"]
        assert meta["obsid"] == (-1 if row["layout"] == "dr1_image" else int(row["obsid"]))
        assert (meta["lmjd"], meta["planid"], meta["spid"], meta["fiberid"]) == (
            int(row["lmjd"]), row["planid"], int(row["spid"]), int(row["fiberid"])
        )
        assert meta["ra"] == pytest.approx(float(row["ra"]), abs=1e-6)
        assert meta["dec"] == pytest.approx(float(row["dec"]), abs=1e-6)
        assert meta["subclass"] == row["subclass"]
        assert meta["snr_lambda"] == pytest.approx(float(row["snr_lambda_header"]), abs=0.011)
        if _flag(row["z_in_header"]):
            assert meta["z"] == pytest.approx(float(row["z_header"]), abs=1e-9)
        else:
            assert np.isnan(meta["z"])
        n_pixels = int(row["n_pixels"])
        expected = 10.0 ** (float(row["coeff0"]) + 1e-4 * np.arange(n_pixels))
        assert spectrum.flux.shape == (n_pixels,)
        np.testing.assert_allclose(spectrum.wavelength, expected, rtol=2e-7)
        assert int(np.count_nonzero(spectrum.ivar == 0)) == int(row["n_ivar_zero"])
        assert np.all(np.isfinite(spectrum.flux)) and np.all(spectrum.ivar >= 0)


def test_raw_headers_follow_each_release(survey: SimulatedSurvey, truth: list[dict[str, str]]) -> None:
    seen = set()
    for row in truth:
        if row["layout"] in seen:
            continue
        seen.add(row["layout"])
        with fits.open(survey.outdir / row["path"]) as hdul:
            header = hdul[0].header
            lmjd = int(row["lmjd"])
            assert header["FILENAME"] == f"spec-{row['spectrum_id']}.fits"
            assert header["TELESCOP"] == "LAMOST" and header["VACUUM"] is True and header["HELIO"] is True
            assert header["COEFF1"] == pytest.approx(1e-4)
            if row["layout"] == "dr1_image":
                hdul.verify("exception")
                assert hdul[0].data.shape == (5, int(row["n_pixels"])) and hdul[0].data.dtype.itemsize == 4
                assert header["EXTEN0"] == LAYOUT_EXTEN0["dr1_image"]
                assert "OBSID" not in header and "DATA_V" not in header and "SNRI" not in header
                assert header["MJD"] == lmjd + 1 and header["VERSPIPE"] == "v2.6.4"
                assert all(header[f"SN_{b}"] <= 99.0 for b in "UGRIZ")
                # row 2 is the subcontinuum (median ~1), not a wavelength
                assert 0.5 < np.median(hdul[0].data[2]) < 1.5
            elif row["layout"] == "image":
                hdul.verify("exception")
                assert header["EXTNAME"] == "Flux" and header["DATA_V"] == "LAMOST DR7"
                assert header["EXTEN0"] == LAYOUT_EXTEN0["image"]
                assert header["MJD"] == lmjd - 1 and header["OBSID"] == int(row["obsid"])
                wavelength = np.asarray(hdul[0].data[2])
                assert wavelength.dtype.itemsize == 4
                np.testing.assert_allclose(wavelength, 10 ** (float(row["coeff0"]) + 1e-4 * np.arange(wavelength.size)), rtol=1e-7)
            else:
                assert header["NAXIS"] == 0 and header["DATA_V"] == "LAMOST DR9"
                table = hdul["COADD"].data
                assert len(table) == 1
                assert table.columns.names == ["FLUX", "IVAR", "WAVELENGTH", "ANDMASK", "ORMASK", "NORMALIZATION"]
                norm = table["NORMALIZATION"][0]
                assert np.all(norm == -9999.0) == (header["NORM"] == 0)
                if row["subclass"].startswith("M"):
                    assert header["SUBCLASS"] == "d" + row["subclass"]
    assert seen == {"dr1_image", "image", "coadd_table"}


def test_rereductions_repeat_the_same_observation_and_arrays(
    survey: SimulatedSurvey, truth: list[dict[str, str]], spectra: dict[str, object]
) -> None:
    groups = defaultdict(list)
    for row in truth:
        groups[row["spectrum_id"]].append(row)
    rereduced = {sid: rows for sid, rows in groups.items() if len(rows) > 1}
    assert len(rereduced) >= 2
    releases_seen = set()
    for rows in rereduced.values():
        releases = [r["data_release"] for r in rows]
        assert "DR1" in releases and sorted(releases) == sorted(set(releases))
        assert [_flag(r["is_rereduction"]) for r in rows] == [r["data_release"] != "DR1" for r in rows]
        releases_seen.update(releases)
        reference = spectra[rows[0]["path"]]
        for other in rows[1:]:
            spectrum = spectra[other["path"]]
            for name in ("flux", "ivar", "andmask", "ormask"):
                np.testing.assert_array_equal(getattr(spectrum, name), getattr(reference, name))
            np.testing.assert_allclose(spectrum.wavelength, reference.wavelength, rtol=2e-7)
            assert spectrum.meta["obsid"] == int(other["obsid"]) == int(rows[0]["obsid"])
    assert {"DR7", "DR9"} <= releases_seen


def test_repeated_observations_are_different_spectra_of_one_object(
    truth: list[dict[str, str]], spectra: dict[str, object]
) -> None:
    originals = [r for r in truth if not _flag(r["is_rereduction"])]
    by_star = defaultdict(list)
    for row in originals:
        by_star[row["star_id"]].append(row)
    repeated = {star: rows for star, rows in by_star.items() if len(rows) > 1}
    assert 0.07 * len(by_star) <= len(repeated) <= 0.13 * len(by_star)
    assert max(len(rows) for rows in repeated.values()) <= 3
    for rows in repeated.values():
        assert len({r["designation"] for r in rows}) == 1
        assert len({r["spectrum_id"] for r in rows}) == len(rows)
        assert len({r["lmjd"] for r in rows}) == len(rows)
        first, second = (spectra[r["path"]] for r in rows[:2])
        assert not np.array_equal(first.flux[:3700], second.flux[:3700])


def test_determinism_across_workers_and_seeds(survey: SimulatedSurvey, tmp_path: Path) -> None:
    def digest(root: Path) -> dict[str, str]:
        files = [p for p in root.rglob("*") if p.is_file() and p.name != "simulation.json"]
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

    again = simulate_survey(tmp_path / "again", n_stars=N_STARS, seed=SEED, n_workers=2)
    assert digest(again.outdir) == digest(survey.outdir)
    other = simulate_survey(tmp_path / "other", n_stars=40, seed=SEED + 1, n_workers=1)
    small = simulate_survey(tmp_path / "small", n_stars=40, seed=SEED, n_workers=1)
    assert other.truth_path.read_bytes() != small.truth_path.read_bytes()


# --------------------------------------------------------------------------- tables


def test_label_table(survey: SimulatedSurvey, truth: list[dict[str, str]], labels: list[dict[str, str]]) -> None:
    assert tuple(labels[0].keys()) == LABEL_COLUMNS
    assert len(labels) == survey.n_label_rows
    assert len({row["TIC"] for row in labels}) == len(labels)
    by_tic = {row["TIC"]: row for row in labels}
    for row in labels:
        assert 100 <= float(row["e_Teff"]) <= 160
        assert float(row["Rad"]) > 0 and float(row["Mass"]) > 0 and float(row["Lum"]) > 0
        assert float(row["Lum"]) == pytest.approx(
            float(row["Rad"]) ** 2 * (float(row["Teff"]) / 5772.0) ** 4, rel=1e-3
        )
    objects = {row["star_id"]: row for row in truth}
    cool = [row for row in objects.values() if row["kind"] != "contaminant"]
    listed = [row for row in cool if _flag(row["in_label_catalog"])]
    assert len(listed) == round(0.7 * len(cool))
    assert not any(_flag(r["in_label_catalog"]) for r in objects.values() if r["kind"] == "contaminant")
    assert len({row["tic"] for row in listed}) == len(listed)
    for row in listed:
        entry = by_tic[row["tic"]]
        separation = _separation_arcsec(float(row["ra"]), float(row["dec"]), float(entry["RAJ2000"]), float(entry["DEJ2000"]))
        assert 0.09 <= separation <= 1.01
    # unobserved neighbours 5-20 arcsec from observed stars exist (false-match bait)
    listed_tics = {row["tic"] for row in listed}
    near = 0
    for entry in labels:
        if entry["TIC"] in listed_tics:
            continue
        for row in objects.values():
            separation = _separation_arcsec(float(row["ra"]), float(row["dec"]), float(entry["RAJ2000"]), float(entry["DEJ2000"]))
            if 4.9 <= separation <= 20.1:
                near += 1
                break
    assert near >= 1
    assert len(labels) > len(listed)


def _separation_arcsec(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    ra1, dec1, ra2, dec2 = map(np.radians, (ra1, dec1, ra2, dec2))
    cos_sep = np.sin(dec1) * np.sin(dec2) + np.cos(dec1) * np.cos(dec2) * np.cos(ra1 - ra2)
    return float(np.degrees(np.arccos(np.clip(cos_sep, -1, 1))) * 3600.0)


def test_catalog_labels_scatter_about_the_truth_and_binaries_leave_the_relations(
    truth: list[dict[str, str]], labels: list[dict[str, str]]
) -> None:
    by_tic = {row["TIC"]: row for row in labels}
    objects = {row["star_id"]: row for row in truth if _flag(row["in_label_catalog"])}
    pulls, binaries = [], 0
    for row in objects.values():
        entry = by_tic[row["tic"]]
        teff, radius, mass = float(entry["Teff"]), float(entry["Rad"]), float(entry["Mass"])
        d_radius = radius - radius_from_teff(teff)
        d_mass = mass - mass_from_teff(teff)
        if _flag(row["is_binary"]):
            binaries += 1
            assert _flag(row["catalog_outlier"])
            assert d_radius > 0.01 and d_mass > 0.01
        elif not _flag(row["catalog_outlier"]):
            assert abs(d_radius) < 0.015 and abs(d_mass) < 0.015
            pulls.append((teff - float(row["teff"])) / float(entry["e_Teff"]))
    assert binaries >= 1
    assert 0.6 < np.std(pulls) < 1.5 and abs(np.mean(pulls)) < 0.4


def test_truth_population(truth: list[dict[str, str]]) -> None:
    objects = {row["star_id"]: row for row in truth}
    kinds = Counter(row["kind"] for row in objects.values())
    assert set(kinds) == {"m_dwarf", "late_m", "contaminant"}
    for row in objects.values():
        teff = float(row["teff"])
        if row["kind"] == "m_dwarf":
            assert 2900 <= teff <= 4100
            assert abs(float(row["radius"]) / radius_from_teff(teff) - 1) < 0.15
        elif row["kind"] == "late_m":
            assert teff < 2900 and row["subclass"][0] == "M"
        else:
            assert teff > 4100 and row["subclass"][0] in "GK"
        assert float(row["luminosity"]) == pytest.approx(float(row["radius"]) ** 2 * (teff / 5772) ** 4, rel=1e-4)
    assert any(_flag(r["is_binary"]) for r in objects.values())
    assert any(float(r["halpha_ew"]) > 0 for r in objects.values())


# --------------------------------------------------------------------------- spectra


def test_tio_band_depth_grows_nonlinearly_as_teff_falls() -> None:
    wavelength = np.arange(4500.0, 7500.0, 1.0)
    teff = np.arange(4100.0, 2850.0, -50.0)
    flux = synthesize_rest_frame(teff, radius_from_teff(teff), mass_from_teff(teff), wavelength)
    index = tio5_index(wavelength, flux)
    assert np.all(np.diff(index) < 0)  # deeper TiO (smaller index) at lower Teff
    assert index[0] > 0.85 and index[-1] < 0.35
    slopes = np.diff(index)
    assert np.ptp(slopes) > 0.3 * np.abs(slopes).mean()  # not a linear function of Teff
    # a G star has essentially no TiO
    hot = synthesize_rest_frame(5500.0, 0.9, 0.9, wavelength)
    assert tio5_index(wavelength, hot) > 0.97


def test_cah_responds_to_gravity_at_fixed_teff() -> None:
    wavelength = np.arange(6700.0, 7100.0, 1.0)
    dwarf, puffy = synthesize_rest_frame([3400.0, 3400.0], [0.30, 0.36], [0.30, 0.30], wavelength)
    band = (wavelength > 6814) & (wavelength < 6846)
    ref = (wavelength > 7042) & (wavelength < 7046)
    cah_dwarf = dwarf[band].mean() / dwarf[ref].mean()
    cah_puffy = puffy[band].mean() / puffy[ref].mean()
    assert cah_dwarf < cah_puffy - 0.005  # higher gravity, deeper CaH


def test_halpha_emission_and_sodium_d() -> None:
    wavelength = np.arange(5850.0, 6600.0, 0.5)
    quiet, active = synthesize_rest_frame([3300.0, 3300.0], 0.3, 0.3, wavelength, halpha_ew_a=[0.0, 5.0])
    peak = np.argmin(np.abs(wavelength - HALPHA_VACUUM_A))
    assert active[peak] > 1.5 * quiet[peak]
    np.testing.assert_allclose(active[wavelength < 6400], quiet[wavelength < 6400])
    na_d = (wavelength > 5888) & (wavelength < 5901)
    side = (wavelength > 5870) & (wavelength < 5880)
    assert quiet[na_d].min() < 0.8 * quiet[side].mean()


def test_synthesis_validates_and_does_not_mutate() -> None:
    teff = np.array([3200.0, 3600.0])
    before = teff.copy()
    out = synthesize_rest_frame(teff, 0.3, 0.3, np.arange(5000.0, 6000.0))
    np.testing.assert_array_equal(teff, before)
    assert out.shape == (2, 1000) and np.all(out > 0)
    assert synthesize_rest_frame(3200.0, 0.3, 0.3, np.arange(5000.0, 6000.0)).shape == (1000,)
    with pytest.raises(ValueError, match="teff"):
        synthesize_rest_frame(-5.0, 0.3, 0.3, np.arange(5000.0, 6000.0))
    with pytest.raises(ValueError, match="outside"):
        synthesize_rest_frame(3200.0, 0.3, 0.3, np.arange(2000.0, 3000.0))
    with pytest.raises(ValueError, match="radius"):
        synthesize_fine(3200.0, 0.0, 0.3)


def test_blue_snr_is_far_below_red_snr(truth: list[dict[str, str]], spectra: dict[str, object]) -> None:
    normal = [row for row in truth if not _flag(row["blue_excess"]) and row["kind"] != "contaminant"]
    assert all(float(r["snr_g"]) < 0.6 * float(r["snr_i"]) for r in normal)
    assert all(float(r["snr_u"]) < float(r["snr_g"]) for r in normal)
    # the per-pixel noise agrees with the header band SNRs (LAMOST: median flux*sqrt(ivar))
    for row in normal[:40]:
        spectrum = spectra[row["path"]]
        measured = measure_band_snr(spectrum.flux, spectrum.ivar, spectrum.wavelength)
        for band in "ri":
            assert measured[band] == pytest.approx(float(row[f"snr_{band}"]), rel=0.3)


def test_snr_distribution_of_a_large_plan() -> None:
    population = draw_population(6000, np.random.default_rng(5))
    plan = draw_plan(population, np.random.default_rng(6))
    snr = plan.observations["snr_lambda"]
    assert 0.28 < np.mean(snr < 50) < 0.42
    assert 0.04 < np.mean(snr > 250) < 0.09
    assert snr.max() > 700
    assert 0.07 < np.mean(plan.observations["z_missing"] != "") < 0.09
    assert np.mean(plan.observations["blue_excess"]) == pytest.approx(0.03, abs=0.005)


def test_artefacts_are_present(truth: list[dict[str, str]], spectra: dict[str, object]) -> None:
    n_flux_zero_good = n_negative = n_andmask = n_brightsky = 0
    for row in truth:
        spectrum = spectra[row["path"]]
        assert spectrum.ivar[0] == 0 and spectrum.ivar[-1] == 0
        assert spectrum.ivar[:15].max() == 0 and spectrum.ivar[-20:].max() == 0
        n_flux_zero_good += bool(np.any((spectrum.flux == 0) & (spectrum.ivar > 0)))
        n_negative += bool(np.any((spectrum.flux < 0) & (spectrum.ivar > 0)))
        n_andmask += bool(np.any(spectrum.andmask & 0b10011))
        sky = np.argmin(np.abs(spectrum.wavelength - 5578.89))
        n_brightsky += bool(spectrum.ormask[sky] & 8)
    assert n_flux_zero_good >= 1 and n_negative > 0.3 * len(truth)
    assert n_andmask >= 1 and n_brightsky > 0.5 * len(truth)
    assert Counter(r["z_missing"] for r in truth).keys() >= {"", "sentinel", "absent"}
    assert {r["coeff0"] for r in truth} == {"3.5682", "3.5840"}
    assert all(3751 <= int(r["n_pixels"]) <= 3909 for r in truth)
    assert any(int(r["n_cosmic_rays"]) > 0 for r in truth)
    assert {r["subclass"][0] for r in truth} >= {"M", "K"}


def test_cosmic_rays_are_unflagged_spikes() -> None:
    wavelength = native_wavelength(3.5682, 1e-4, 3900)
    teff = np.array([3400.0])
    stellar = synthesize_rest_frame(teff, 0.3, 0.3, wavelength)[0]
    clean_conditions = ObservingConditions(band_snr=(1.0, 10.0, 25.0, 35.0, 30.0), flux_scale=100.0)
    hit_conditions = ObservingConditions(band_snr=(1.0, 10.0, 25.0, 35.0, 30.0), flux_scale=100.0, n_cosmic_rays=3)
    clean = observe(stellar, wavelength, clean_conditions, np.random.default_rng(1))
    hit = observe(stellar, wavelength, hit_conditions, np.random.default_rng(1))
    assert hit.n_cosmic_rays == 3
    np.testing.assert_array_equal(hit.ivar, clean.ivar)
    np.testing.assert_array_equal(hit.andmask, clean.andmask)
    difference = hit.flux.astype(float) - clean.flux.astype(float)
    spikes = np.flatnonzero(difference != 0)
    assert 3 <= spikes.size <= 6 and np.all(difference[spikes] > 0)
    sigma = 1.0 / np.sqrt(observe(stellar, wavelength, clean_conditions, np.random.default_rng(2)).ivar[spikes].clip(1e-30))
    assert np.sum(difference[spikes] > 5 * sigma) >= 3


def test_blue_excess_spectra_have_steep_negative_pseudo_continuum_slopes(
    truth: list[dict[str, str]], spectra: dict[str, object]
) -> None:
    with_z = [row for row in truth if _flag(row["z_in_header"])]
    excess = [row for row in with_z if _flag(row["blue_excess"])]
    normal = [row for row in with_z if not _flag(row["blue_excess"])][:25]
    assert excess and 0.02 < sum(_flag(r["blue_excess"]) for r in truth) / len(truth) < 0.05

    def slope(row: dict[str, str]) -> float:
        s = spectra[row["path"]]
        return _pseudo_continuum_slope(s.wavelength, s.flux.astype(float), s.ivar.astype(float), s.meta["z"])

    assert max(slope(r) for r in excess) < -5.0
    assert min(slope(r) for r in normal) > -1.0


# --------------------------------------------------------------------------- small pieces


def test_designation_matches_real_lamost_headers() -> None:
    # values from real DR1 and DR7 files (../shared/data/real/lamost)
    assert designation_from_radec(99.976527, 27.979573) == "LAMOST J063954.36+275846.4"
    assert designation_from_radec(332.202274, -2.056767) == "LAMOST J220848.54-020324.3"
    with pytest.raises(ValueError):
        designation_from_radec(360.0, 0.0)


def test_subclass_tracks_teff() -> None:
    rng = np.random.default_rng(0)
    kinds = np.array(["m_dwarf"] * 2000)
    early = subclass_from_teff(np.full(2000, 3850.0), kinds, rng)
    late = subclass_from_teff(np.full(2000, 2950.0), kinds, rng)
    assert Counter(early).most_common(1)[0][0] == "M0"
    assert Counter(late).most_common(1)[0][0] == "M6"
    assert {"K7", "M1"} <= set(early)


def test_header_cards_are_valid_fits() -> None:
    cards = [
        format_header_card("SN_G", FixedFloat(8.764, 2), "SNR of g filter"),
        format_header_card("DESIG", "LAMOST J063954.36+275846.4", "Designation of LAMOST target"),
        format_header_card("HELIO", True, "Heliocentric correction"),
        format_header_card("DATE-OBS", "2011-10-27T20:02:34.19", ""),
        format_header_card("COEFF1", 1e-4, ""),
        format_header_card("OBJNAME", "it's", ""),
        format_header_card("COMMENT", "--------FILE INFORMATION"),
    ]
    assert all(len(card) == 80 for card in cards)
    header = fits.Header.fromstring("".join(cards))
    assert header["SN_G"] == 8.76 and cards[0][10:30].strip() == "8.76"
    assert header["DESIG"] == "LAMOST J063954.36+275846.4" and header["HELIO"] is True
    assert header["COEFF1"] == 1e-4 and header["OBJNAME"] == "it's"
    assert len(encode_header(cards)) % 2880 == 0
    for bad in (("lower", 1), ("TOOLONGKEY", 1), ("NAN", float("nan")), ("UNI", "caf\u00e9"), ("LIST", [1])):
        with pytest.raises(ValueError):
            format_header_card(*bad)


@pytest.mark.parametrize("layout", ["dr1_image", "image", "coadd_table"])
def test_writer_round_trip_is_exact_and_deterministic(tmp_path: Path, layout: str) -> None:
    rng = np.random.default_rng(3)
    n = 3875
    flux = rng.normal(100, 10, n).astype(np.float32)
    ivar = rng.random(n).astype(np.float32)
    andmask = (rng.random(n) < 0.01).astype(np.float32)
    wavelength = native_wavelength(3.5682, 1e-4, n).astype(np.float32)
    cards = [("FILENAME", "spec-55862-B6212_sp06-068.fits", ""), ("LMJD", 55862, ""), ("PLANID", "B6212", ""),
             ("SPID", 6, ""), ("FIBERID", 68, ""), ("RA", 99.97, ""), ("DEC", 27.98, ""),
             ("COEFF0", 3.5682, ""), ("COEFF1", 1e-4, "")]
    extra = {"subcontinuum": flux / 100} if layout == "dr1_image" else {"wavelength": wavelength}
    paths = []
    for name in ("a", "b"):
        path = tmp_path / name / "spec-55862-B6212_sp06-068.fits.gz"
        write_lamost_spectrum(path, layout, flux=flux, ivar=ivar, andmask=andmask, ormask=andmask, header_cards=cards, **extra)
        paths.append(path)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert gzip.decompress(paths[0].read_bytes())[:9] == b"SIMPLE  ="
    spectrum = read_lamost_spectrum(paths[0])
    np.testing.assert_array_equal(spectrum.flux, flux)
    np.testing.assert_array_equal(spectrum.ivar, ivar)
    np.testing.assert_array_equal(spectrum.andmask, andmask.astype(np.uint16))
    np.testing.assert_allclose(spectrum.wavelength, wavelength.astype(np.float64) if layout != "dr1_image"
                               else 10 ** (3.5682 + 1e-4 * np.arange(n)), rtol=1e-7)
    assert spectrum.meta["spectrum_id"] == "55862-B6212_sp06-068"


def test_writer_rejects_inconsistent_input(tmp_path: Path) -> None:
    n = 10
    ones = np.ones(n, dtype=np.float32)
    common = {"flux": ones, "ivar": ones, "andmask": ones, "ormask": ones, "header_cards": []}
    with pytest.raises(ValueError, match="layout"):
        write_lamost_spectrum(tmp_path / "x.fits", "dr3", **common)
    with pytest.raises(ValueError, match="subcontinuum"):
        write_lamost_spectrum(tmp_path / "x.fits", "dr1_image", **common)
    with pytest.raises(ValueError, match="no wavelength row"):
        write_lamost_spectrum(tmp_path / "x.fits", "dr1_image", subcontinuum=ones, wavelength=ones, **common)
    with pytest.raises(ValueError, match="wavelength"):
        write_lamost_spectrum(tmp_path / "x.fits", "image", **common)
    with pytest.raises(ValueError, match="pixels"):
        write_lamost_spectrum(tmp_path / "x.fits", "image", wavelength=np.ones(n + 1), **common)
    with pytest.raises(ValueError, match="written by the writer"):
        write_lamost_spectrum(tmp_path / "x.fits", "image", wavelength=ones, **{**common, "header_cards": [("NAXIS1", 3, "")]})
    with pytest.raises(ValueError, match="EXTEN0"):
        write_lamost_spectrum(
            tmp_path / "x.fits", "image", wavelength=ones,
            **{**common, "header_cards": [("EXTEN0", LAYOUT_EXTEN0["dr1_image"], "")]},
        )
    assert not list(tmp_path.iterdir())


def test_simulate_survey_rejects_bad_arguments_and_existing_output(survey: SimulatedSurvey, tmp_path: Path) -> None:
    for kwargs in ({"n_stars": 0}, {"n_stars": 2.5}, {"seed": -1}, {"n_workers": 0}):
        with pytest.raises(ValueError):
            simulate_survey(tmp_path / "bad", **{"n_stars": 10, **kwargs})
    with pytest.raises(FileExistsError, match="overwrite"):
        simulate_survey(survey.outdir, n_stars=10, seed=1, n_workers=1)
    target = tmp_path / "twice"
    simulate_survey(target, n_stars=30, seed=1, n_workers=1)
    replaced = simulate_survey(target, n_stars=20, seed=2, n_workers=1, overwrite=True)
    assert len(replaced.spectrum_paths()) == replaced.n_files
