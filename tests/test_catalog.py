"""Catalog export in every format, with the required columns and units."""
from __future__ import annotations

import astropy.units as u
import numpy as np
import pytest
import xarray as xr
from astropy.table import Table

from lamost_mdwarf.io.catalog import CATALOG_COLUMNS, results_to_table, write_catalog


def fake_results(n=6) -> xr.Dataset:
    rng = np.random.default_rng(0)
    data = {
        "designation": np.array([f"LAMOST J0000{i:02d}.00+000000.0" for i in range(n)], dtype=object),
        "spectrum_id": np.array([f"55862-B6212_sp06-{i:03d}" for i in range(n)], dtype=object),
        "obsid": np.arange(n, dtype=np.int64) - 1,
        "teff": rng.uniform(3000, 4000, n), "teff_err": np.full(n, 100.0),
        "radius": rng.uniform(0.2, 0.6, n), "radius_err": np.full(n, 0.05),
        "mass": rng.uniform(0.2, 0.6, n), "mass_err": np.full(n, 0.05),
        "luminosity": rng.uniform(0.01, 0.08, n), "luminosity_err": np.full(n, 0.01),
        "snr_lambda": rng.uniform(50, 300, n).astype(np.float32),
        "subclass": np.array(["M1", "M2", "M3", "M4", "M5", "M0"][:n], dtype=object),
        "chi2": rng.uniform(2000, 6000, n), "subset": np.array(["survey"] * n, dtype=object),
        "flags": np.array([0, 0, 1, 0, 2, 0], dtype=np.uint32)[:n],
        "ra": rng.uniform(0, 360, n), "release": np.array(["DR1"] * n, dtype=object),
    }
    return xr.Dataset({k: ("star", v) for k, v in data.items()}, attrs={"model_hash": "abc", "n": 3})


@pytest.mark.parametrize("suffix", [".csv", ".ecsv", ".fits", ".parquet", ".vot"])
def test_every_format_round_trips(tmp_path, suffix):
    table = results_to_table(fake_results())
    assert len(table) == 4  # flagged rows dropped by default
    path = write_catalog(table, tmp_path / f"catalog{suffix}")
    back = Table.read(path)
    assert list(back.colnames[: len(CATALOG_COLUMNS)]) == list(CATALOG_COLUMNS)
    np.testing.assert_allclose(np.asarray(back["teff"]), table["teff"].value)
    assert list(np.asarray(back["spectrum_id"]).astype(str)) == list(table["spectrum_id"])
    if suffix != ".csv":
        assert back["teff"].unit == u.K and back["radius_err"].unit == u.Rsun
        assert back["luminosity"].unit == u.Lsun


def test_include_flagged_and_missing_columns(tmp_path):
    ds = fake_results()
    assert len(results_to_table(ds, include_flagged=True)) == 6
    with pytest.raises(ValueError, match="teff_err"):
        results_to_table(ds.drop_vars("teff_err"))
    with pytest.raises(ValueError, match="unknown catalog format"):
        write_catalog(results_to_table(ds), tmp_path / "catalog.txt")
