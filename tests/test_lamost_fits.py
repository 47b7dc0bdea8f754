"""The LAMOST reader on every real file layout, on corrupt files, and its parsers."""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import given, strategies as st

from lamost_mdwarf.io.lamost_fits import (
    LamostReadError,
    make_spectrum_id,
    normalize_data_release,
    normalize_subclass,
    parse_spectrum_filename,
    read_lamost_spectrum,
)

LOW_RES = [
    "dr1_original/spec-55862-B6212_sp06-005.fits",
    "dr1_original/non_M/spec-55862-B6212_sp06-008.fits",
    "later_releases/spec-55859-F5902_sp01-001_dr7.fits.gz",
    "later_releases/spec-55859-F5902_sp01-001_dr9.fits.gz",
    "later_releases/spec-55859-F5902_sp01-005_dr5.fits.gz",
    "later_releases/spec-55859-F5902_sp01-013_dr8name_is_dr9.fits.gz",
    "misc/spec-57287-KP193637N444141V03_sp10-161.fits.gz",
    "misc/spec-58397-EG014118N254444M01_sp03-031.fits",
]


def all_real_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and ".fits" in p.name)


def test_every_real_low_res_file_reads(real_lamost_dir):
    files = [p for p in all_real_files(real_lamost_dir) if not p.name.startswith("med-")]
    assert len(files) >= 24
    for path in files:
        spec = read_lamost_spectrum(path)
        meta = spec.meta
        n = meta["n_pixels"]
        with fits.open(path) as hdul:
            header = hdul[0].header
            expected = 10.0 ** (header["COEFF0"] + header["COEFF1"] * np.arange(n))
        # DR1 has no wavelength row; later releases store the same solution as float32,
        # which the reader checks and replaces by the exact log-linear grid.
        np.testing.assert_allclose(spec.wavelength, expected, rtol=1e-13)
        assert spec.flux.dtype == np.float32 and spec.ivar.dtype == np.float32
        assert spec.flux.shape == spec.ivar.shape == spec.andmask.shape == spec.ormask.shape == (n,)
        assert meta["spectrum_id"] == path.name.split("_dr")[0].replace("spec-", "").replace(".fits.gz", "").replace(".fits", "")
        assert np.isfinite(meta["ra"]) and np.isfinite(meta["dec"])
        assert meta["designation"].startswith("LAMOST J")
        snrs = [meta[f"snr_{b}"] for b in "ugriz"]
        assert meta["snr_lambda"] == pytest.approx(sum(snrs))
        assert meta["source_path"] == str(path.resolve())


def test_layouts_and_releases(real_lamost_dir):
    dr1 = read_lamost_spectrum(real_lamost_dir / "dr1_original/spec-55862-B6212_sp06-099.fits")
    assert dr1.meta["layout"] == "dr1_image"
    assert dr1.meta["data_release"] == "DR1"
    assert dr1.meta["obsid"] == -1
    assert dr1.meta["subclass"] == "M2"
    assert dr1.meta["snr_z"] == 99.0  # DR1 caps SN_* at 99
    # Row 2 of a DR1 file is the subcontinuum (median ~1), not a wavelength.
    assert 3690 < dr1.wavelength[0] < 3710 and dr1.wavelength[-1] > 9000
    dr7 = read_lamost_spectrum(real_lamost_dir / "later_releases/spec-55859-F5902_sp01-001_dr7.fits.gz")
    dr9 = read_lamost_spectrum(real_lamost_dir / "later_releases/spec-55859-F5902_sp01-001_dr9.fits.gz")
    assert (dr7.meta["layout"], dr7.meta["data_release"]) == ("image", "DR7")
    assert (dr9.meta["layout"], dr9.meta["data_release"]) == ("coadd_table", "DR9")
    assert read_lamost_spectrum(
        real_lamost_dir / "later_releases/spec-55859-F5902_sp01-013_dr8name_is_dr9.fits.gz"
    ).meta["data_release"] == "DR9"


def test_dr7_and_dr9_copies_identical(real_lamost_dir):
    dr7 = read_lamost_spectrum(real_lamost_dir / "later_releases/spec-55859-F5902_sp01-001_dr7.fits.gz")
    dr9 = read_lamost_spectrum(real_lamost_dir / "later_releases/spec-55859-F5902_sp01-001_dr9.fits.gz")
    for name in ("wavelength", "flux", "ivar", "andmask", "ormask"):
        np.testing.assert_array_equal(getattr(dr7, name), getattr(dr9, name))
    assert dr7.spectrum_id == dr9.spectrum_id == "55859-F5902_sp01-001"
    assert dr7.meta["obsid"] == dr9.meta["obsid"] == 101001
    dr5 = read_lamost_spectrum(real_lamost_dir / "later_releases/spec-55859-F5902_sp01-005_dr5.fits.gz")
    dr9b = read_lamost_spectrum(real_lamost_dir / "later_releases/spec-55859-F5902_sp01-005_dr9.fits.gz")
    assert dr5.spectrum_id == dr9b.spectrum_id and dr5.meta["obsid"] == dr9b.meta["obsid"] == 101005


def test_medium_resolution_rejected(real_lamost_dir):
    with pytest.raises(LamostReadError, match="medium-resolution") as info:
        read_lamost_spectrum(real_lamost_dir / "misc/med-58408-TD230151N343645T01_sp01-015.fits")
    assert "med-58408" in str(info.value)


# ---------------------------------------------------------------- bad files


@pytest.fixture()
def dr1_file(real_lamost_dir, tmp_path) -> Path:
    src = real_lamost_dir / "dr1_original/spec-55862-B6212_sp06-099.fits"
    dst = tmp_path / src.name
    shutil.copy(src, dst)
    return dst


def test_non_fits_rejected(tmp_path):
    path = tmp_path / "spec-1-P_sp01-001.fits"
    path.write_text("this is not a FITS file\n" * 10)
    with pytest.raises(LamostReadError, match="not a FITS file") as info:
        read_lamost_spectrum(path)
    assert str(path) in str(info.value)


def test_empty_and_missing_files_rejected(tmp_path):
    empty = tmp_path / "empty.fits"
    empty.write_bytes(b"")
    with pytest.raises(LamostReadError, match="empty file"):
        read_lamost_spectrum(empty)
    with pytest.raises(LamostReadError, match="no such file"):
        read_lamost_spectrum(tmp_path / "missing.fits")


@pytest.mark.parametrize("keep_fraction", [0.05, 0.5, 0.95])
def test_truncated_fits_rejected(dr1_file, keep_fraction):
    data = dr1_file.read_bytes()
    dr1_file.write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(LamostReadError, match="corrupt or truncated|truncated FITS header|implausible|shape") as info:
        read_lamost_spectrum(dr1_file)
    assert dr1_file.name in str(info.value)


def test_truncated_gzip_rejected(real_lamost_dir, tmp_path):
    src = real_lamost_dir / "later_releases/spec-55859-F5902_sp01-001_dr9.fits.gz"
    data = src.read_bytes()
    dst = tmp_path / src.name
    dst.write_bytes(data[: len(data) // 2])
    with pytest.raises(LamostReadError) as info:
        read_lamost_spectrum(dst)
    assert src.name in str(info.value)


def test_file_without_flux_rejected(dr1_file, tmp_path):
    header = fits.getheader(dr1_file)
    path = tmp_path / "spec-55862-B6212_sp06-100.fits"
    hdu = fits.PrimaryHDU(header=header)
    hdu.header["NAXIS"] = 0
    fits.HDUList([fits.PrimaryHDU(header=hdu.header)]).writeto(path)
    with pytest.raises(LamostReadError, match="no flux/inverse-variance"):
        read_lamost_spectrum(path)
    one_row = tmp_path / "spec-55862-B6212_sp06-101.fits"
    fits.PrimaryHDU(data=np.ones((1, 100), np.float32)).writeto(one_row)
    with pytest.raises(LamostReadError, match="flux and inverse variance rows"):
        read_lamost_spectrum(one_row)


def test_table_without_ivar_rejected(real_lamost_dir, tmp_path):
    src = real_lamost_dir / "later_releases/spec-55859-F5902_sp01-002_dr9.fits.gz"
    with fits.open(src) as hdul:
        table = hdul[1].data
        cols = [c for c in hdul[1].columns if c.name != "IVAR"]
        new = fits.BinTableHDU.from_columns(fits.ColDefs(cols), name="COADD")
        path = tmp_path / "spec-55859-F5902_sp01-002.fits"
        fits.HDUList([hdul[0].copy(), new]).writeto(path, output_verify="silentfix")
    assert len(table) == 1
    with pytest.raises(LamostReadError, match="no IVAR column"):
        read_lamost_spectrum(path)


def test_missing_identity_keywords(dr1_file, tmp_path):
    with fits.open(dr1_file) as hdul:
        for key in ("LMJD", "PLANID", "SPID", "FIBERID"):
            del hdul[0].header[key]
        # The file name still carries them: id recovered.
        hdul.writeto(tmp_path / "renamed_ok.fits", overwrite=True)
        hdul.writeto(tmp_path / dr1_file.name.replace(".fits", "_x.fits"), overwrite=True)
    with pytest.raises(LamostReadError, match="missing keyword.*LMJD"):
        read_lamost_spectrum(tmp_path / "renamed_ok.fits")
    recovered = read_lamost_spectrum(tmp_path / dr1_file.name.replace(".fits", "_x.fits"))
    assert recovered.spectrum_id == "55862-B6212_sp06-099"


def test_missing_redshift_and_nan_header_values(dr1_file):
    with fits.open(dr1_file, mode="update") as hdul:
        hdul[0].header["Z"] = -9999.0
        hdul[0].header["SN_U"] = "nan?"
    spec = read_lamost_spectrum(dr1_file)
    assert np.isnan(spec.meta["z"]) and np.isnan(spec.meta["z_err"])
    assert np.isnan(spec.meta["snr_u"]) and np.isnan(spec.meta["snr_lambda"])
    with fits.open(dr1_file, mode="update") as hdul:
        del hdul[0].header["Z"]
    assert np.isnan(read_lamost_spectrum(dr1_file).meta["z"])


def test_missing_position_rejected(dr1_file):
    with fits.open(dr1_file, mode="update") as hdul:
        del hdul[0].header["RA"]
    with pytest.raises(LamostReadError, match="RA/DEC"):
        read_lamost_spectrum(dr1_file)


def test_gzip_of_dr1_file_reads_same(dr1_file, tmp_path):
    gz = tmp_path / (dr1_file.name + ".gz")
    gz.write_bytes(gzip.compress(dr1_file.read_bytes()))
    a, b = read_lamost_spectrum(dr1_file), read_lamost_spectrum(gz)
    np.testing.assert_array_equal(a.flux, b.flux)
    assert a.spectrum_id == b.spectrum_id


# ---------------------------------------------------------------- parsers (property tests)


@given(st.sampled_from("OBAFGKM"), st.integers(0, 9))
def test_subclass_dwarf_prefix_removed(letter, digit):
    assert normalize_subclass(f"d{letter}{digit}") == f"{letter}{digit}"
    assert normalize_subclass(f" {letter}{digit} ") == f"{letter}{digit}"


@given(st.text(max_size=12))
def test_subclass_never_crashes(text):
    out = normalize_subclass(text)
    assert isinstance(out, str) and out == out.strip()


def test_subclass_examples():
    assert normalize_subclass("dM5") == "M5"
    assert normalize_subclass("sdM1") == "sdM1"
    assert normalize_subclass("K7") == "K7"
    assert normalize_subclass(None) == ""
    assert normalize_subclass(float("nan")) == ""


@given(st.integers(1, 30), st.sampled_from(["LAMOST DR{}", "LAMOST DR{} v1.0", "dr{}", "LAMOST  DR {}"]))
def test_data_release_parsing(number, pattern):
    assert normalize_data_release(pattern.format(number), "image") == f"DR{number}"


def test_data_release_fallbacks():
    assert normalize_data_release(None, "dr1_image") == "DR1"
    assert normalize_data_release(None, "image") == "unknown"
    assert normalize_data_release("garbage", "coadd_table") == "unknown"


@given(
    st.integers(50000, 70000),
    st.from_regex(r"[A-Z][A-Z0-9]{2,18}", fullmatch=True),
    st.integers(1, 16),
    st.integers(1, 250),
)
def test_spectrum_id_round_trips_through_file_name(lmjd, planid, spid, fiberid):
    sid = make_spectrum_id(lmjd, planid, spid, fiberid)
    parsed = parse_spectrum_filename(f"spec-{sid}.fits.gz")
    assert parsed == {"lmjd": lmjd, "planid": planid, "spid": spid, "fiberid": fiberid}


def test_spectrum_id_rejects_bad_parts():
    with pytest.raises(ValueError):
        make_spectrum_id(55859, "", 1, 1)
    with pytest.raises(ValueError):
        make_spectrum_id(55859, "a/b", 1, 1)
    with pytest.raises(ValueError):
        make_spectrum_id(0, "F5902", 1, 1)


# ---------------------------------------------------------------- raw card values vs astropy

from lamost_mdwarf.io.lamost_fits import _parse_card_value  # noqa: E402

_card_values = st.one_of(
    st.booleans(),
    st.integers(-(10**15), 10**15),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60),
)


@given(_card_values, st.text(alphabet="abc xyz/", max_size=10))
def test_raw_card_values_match_astropy(value, comment):
    card = fits.Card("KEYWORD", value, comment)
    image = card.image
    expected = fits.Card.fromstring(image).value
    got = _parse_card_value(image[10:])
    if isinstance(expected, str):
        assert got == expected.rstrip()
    elif isinstance(expected, bool):
        assert got is expected
    else:
        assert got == pytest.approx(expected, rel=1e-15, abs=0)


def _assert_same_spectrum(a, b, where: str) -> None:
    for name in ("wavelength", "flux", "ivar", "andmask", "ormask"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, (where, name)
        np.testing.assert_array_equal(x, y, err_msg=f"{where}: {name}")
    assert a.meta.keys() == b.meta.keys(), where
    for key in a.meta:
        va, vb = a.meta[key], b.meta[key]
        same = (va == vb) or (isinstance(va, float) and np.isnan(va) and np.isnan(vb))
        assert same, (where, key, va, vb)


def _both_paths(path: Path):
    """(plain decoder result or None, astropy result) for one file."""
    from lamost_mdwarf.io.lamost_fits import (
        _read_plain_file,
        _read_with_astropy,
        primary_header_cards,
        read_file_bytes,
    )

    data = read_file_bytes(path)
    cards = primary_header_cards(data, path)
    return _read_plain_file(path, data, cards), _read_with_astropy(path, data, cards)


def test_plain_decoder_equals_astropy_on_real_files(real_lamost_dir):
    """The astropy-free decoder of plain layouts gives exactly astropy's arrays and metadata."""
    decoded = 0
    for path in sorted(real_lamost_dir.rglob("*.fits*")):
        if path.name.startswith("med-"):
            continue
        plain, reference = _both_paths(path)
        assert plain is not None, f"{path.name}: a plain LAMOST file fell back to astropy"
        _assert_same_spectrum(plain, reference, path.name)
        decoded += 1
    assert decoded >= 20


def test_plain_decoder_equals_astropy_on_simulated_files(small_survey):
    files = sorted(Path(small_survey.spectra_dir).rglob("*.fits*"))
    layouts = {}
    for path in files[::7]:
        try:
            plain, reference = _both_paths(path)
        except LamostReadError:
            continue  # files the simulator makes unreadable on purpose
        if plain is None:
            continue
        _assert_same_spectrum(plain, reference, path.name)
        layouts[reference.meta["layout"]] = layouts.get(reference.meta["layout"], 0) + 1
    assert set(layouts) == {"dr1_image", "image", "coadd_table"}, layouts


@pytest.mark.parametrize("card,value", [("BSCALE", "2.0"), ("BZERO", "1.0")])
def test_plain_decoder_leaves_scaled_images_to_astropy(dr1_file, tmp_path, card, value):
    """Scaling keywords disable the plain decoder; astropy applies them."""
    with fits.open(dr1_file) as hdul:
        hdul[0].header[card] = float(value)
        out = tmp_path / "scaled" / dr1_file.name
        out.parent.mkdir()
        hdul.writeto(out)
    plain, reference = _both_paths(out)
    assert plain is None
    original = read_lamost_spectrum(dr1_file)
    expected = original.flux * 2.0 if card == "BSCALE" else original.flux + 1.0
    np.testing.assert_allclose(reference.flux, expected, rtol=1e-6)
