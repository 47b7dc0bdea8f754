"""Label catalog reading: formats, column mapping, and clear errors for bad tables."""
from __future__ import annotations

import astropy.units as u
import numpy as np
import pytest
from astropy.table import Table

from lamost_mdwarf.io.label_catalog import (
    LabelCatalogError,
    parse_column_mapping,
    read_label_catalog,
)


def tcd_table(n: int = 5) -> Table:
    rng = np.random.default_rng(0)
    return Table({
        "RAJ2000": rng.uniform(0, 360, n), "DEJ2000": rng.uniform(-30, 60, n),
        "Teff": rng.uniform(3000, 4000, n), "e_Teff": np.full(n, 150.0),
        "Rad": rng.uniform(0.2, 0.6, n), "e_Rad": np.full(n, 0.05),
        "Mass": rng.uniform(0.2, 0.6, n), "e_Mass": np.full(n, 0.06),
        "Lum": rng.uniform(0.005, 0.08, n), "e_Lum": np.full(n, 0.008),
    })


@pytest.mark.parametrize("suffix,fmt", [(".csv", "ascii.csv"), (".fits", "fits"), (".vot", "votable"),
                                        (".ecsv", "ascii.ecsv")])
def test_formats_read_with_units(tmp_path, suffix, fmt):
    table = tcd_table()
    path = tmp_path / f"labels{suffix}"
    table.write(path, format=fmt)
    out = read_label_catalog(path)
    np.testing.assert_allclose(out["teff"].value, table["Teff"])
    assert out["teff"].unit == u.K and out["radius"].unit == u.Rsun and out["ra"].unit == u.deg
    assert out["luminosity_err"].unit == u.Lsun
    np.testing.assert_array_equal(out["label_row"], np.arange(5))


def test_column_mapping(tmp_path):
    table = tcd_table()
    table.rename_column("Teff", "TEFF_K")
    table.rename_column("RAJ2000", "RA_ICRS")
    table.remove_column("e_Lum")
    path = tmp_path / "labels.csv"
    table.write(path)
    with pytest.raises(LabelCatalogError, match=r"missing column\(s\) 'RAJ2000' \(for ra\), 'Teff'"):
        read_label_catalog(path)
    out = read_label_catalog(path, parse_column_mapping("teff=TEFF_K, ra=RA_ICRS"))
    np.testing.assert_allclose(out["teff"].value, table["TEFF_K"])
    assert np.all(np.isnan(out["luminosity_err"]))  # absent uncertainty column: NaN
    with pytest.raises(LabelCatalogError, match="e_Lum"):
        read_label_catalog(path, {"teff": "TEFF_K", "ra": "RA_ICRS", "luminosity_err": "e_Lum"})


def test_parse_column_mapping_errors():
    assert parse_column_mapping(None) == {}
    with pytest.raises(ValueError, match="unknown label column"):
        parse_column_mapping("temperature=T")
    with pytest.raises(ValueError, match="NAME=COLUMN"):
        parse_column_mapping("teff")


def test_non_numeric_values(tmp_path):
    path = tmp_path / "labels.csv"
    lines = ["RAJ2000,DEJ2000,Teff,e_Teff,Rad,e_Rad,Mass,e_Mass,Lum,e_Lum",
             "10.0,20.0,3500,100,0.4,0.02,0.4,0.02,0.02,0.002",
             "11.0,21.0,hot,100,0.4,0.02,0.4,0.02,0.02,0.002"]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LabelCatalogError, match=r"'Teff' has non-numeric values \(row 1: 'hot'\)") as info:
        read_label_catalog(path)
    assert str(path) in str(info.value)


def test_nan_positions(tmp_path):
    table = tcd_table()
    table["DEJ2000"][2] = np.nan
    path = tmp_path / "labels.fits"
    table.write(path)
    with pytest.raises(LabelCatalogError, match=r"'DEJ2000' has 1 missing or non-finite position\(s\), first rows \[2\]"):
        read_label_catalog(path)
    table["DEJ2000"][2] = 95.0
    table.write(path, overwrite=True)
    with pytest.raises(LabelCatalogError, match="out of range"):
        read_label_catalog(path)


def test_unreadable_empty_and_negative(tmp_path):
    with pytest.raises(LabelCatalogError, match="not found"):
        read_label_catalog(tmp_path / "none.csv")
    bad = tmp_path / "bad.fits"
    bad.write_text("garbage")
    with pytest.raises(LabelCatalogError, match="cannot read"):
        read_label_catalog(bad)
    empty = tcd_table()[:0]
    empty.write(tmp_path / "empty.csv")
    with pytest.raises(LabelCatalogError, match="no rows"):
        read_label_catalog(tmp_path / "empty.csv")
    neg = tcd_table()
    neg["Rad"][1] = -0.3
    neg.write(tmp_path / "neg.csv")
    with pytest.raises(LabelCatalogError, match="'Rad' has non-positive values in 1 of 5 rows"):
        read_label_catalog(tmp_path / "neg.csv")


def test_few_nonpositive_labels_become_missing_with_a_warning(tmp_path):
    """One impossible mass among many rows is a missing label, not a rejected catalog."""
    from lamost_mdwarf.io.label_catalog import LabelCatalogWarning

    table = tcd_table(300)
    table["Mass"][17] = -0.0025
    table["Lum"][40] = 0.0
    table.write(tmp_path / "few.csv")
    with pytest.warns(LabelCatalogWarning, match=r"Mass: 1 \(rows \[17\]\).*Lum: 1 \(rows \[40\]\)"):
        out = read_label_catalog(tmp_path / "few.csv")
    assert np.isnan(out["mass"].value[17]) and np.isnan(out["luminosity"].value[40])
    assert np.isfinite(out["mass"].value).sum() == 299 and np.isfinite(out["radius"].value).all()
    assert out.meta["unusable_labels"] == {"Mass": [17], "Lum": [40]}
    table["Teff"][:5] = -1.0  # 5 of 300 rows: more than 1 %
    table.write(tmp_path / "many.csv", overwrite=True)
    with pytest.raises(LabelCatalogError, match="'Teff' has non-positive values in 5 of 300 rows"):
        read_label_catalog(tmp_path / "many.csv")
