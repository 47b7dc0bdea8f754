"""Export results as a catalog table (CSV, FITS, ECSV, Parquet, VOTable) with astropy units.

The columns follow the paper's Table 1 (designation, Teff, sigma Teff, R, sigma R, M,
sigma M, L, sigma L, SNR_lambda, subtype, chi^2) plus identifiers and flags, under the
names users' scripts rely on: :data:`CATALOG_COLUMNS`.
"""
from __future__ import annotations

import os
from pathlib import Path

import astropy.units as u
import numpy as np
import xarray as xr
from astropy.table import Table

from lamost_mdwarf.io.label_catalog import LABEL_UNITS

__all__ = ["CATALOG_COLUMNS", "EXTRA_COLUMNS", "CATALOG_FORMATS", "results_to_table", "write_catalog"]

#: Required catalog columns, in order, with their units (None: dimensionless or text).
CATALOG_COLUMNS: dict[str, u.UnitBase | None] = {
    "designation": None,
    "spectrum_id": None,
    "obsid": None,
    **{name: LABEL_UNITS[name] for label in ("teff", "radius", "mass", "luminosity")
       for name in (label, f"{label}_err")},
    "snr_lambda": None,
    "subclass": None,
    "chi2": None,
    "subset": None,
    "flags": None,
}

#: Columns appended after the required ones when present in the results.
EXTRA_COLUMNS: dict[str, u.UnitBase | None] = {
    "ra": u.deg,
    "dec": u.deg,
    "release": None,
    "rchi2": None,
    "flag_reason": None,
}

CATALOG_FORMATS = {
    ".csv": "ascii.csv",
    ".ecsv": "ascii.ecsv",
    ".fits": "fits",
    ".parquet": "parquet",
    ".vot": "votable",
    ".xml": "votable",
}

_DESCRIPTIONS = {
    "designation": "LAMOST designation",
    "spectrum_id": "stable LAMOST observation id LMJD-PLANID_spSS-FFF",
    "obsid": "LAMOST OBSID (-1 when absent)",
    "teff": "effective temperature",
    "teff_err": "1-sigma uncertainty of teff",
    "radius": "stellar radius",
    "radius_err": "1-sigma uncertainty of radius",
    "mass": "stellar mass",
    "mass_err": "1-sigma uncertainty of mass",
    "luminosity": "bolometric luminosity",
    "luminosity_err": "1-sigma uncertainty of luminosity",
    "snr_lambda": "sum of the LAMOST ugriz SNRs",
    "subclass": "LAMOST spectral subtype",
    "chi2": "chi^2 of the Cannon fit",
    "subset": "training, validation or survey",
    "flags": "result flag bits (0 = passes every final cut)",
    "ra": "right ascension (J2000)",
    "dec": "declination (J2000)",
    "release": "data release the spectrum came from",
    "rchi2": "reduced chi^2",
    "flag_reason": "names of the set flag bits",
}


def results_to_table(results: xr.Dataset, include_flagged: bool = False) -> Table:
    """Build the catalog table from a results dataset.

    Parameters
    ----------
    results : xarray.Dataset
        Results with dimension ``star`` and at least :data:`CATALOG_COLUMNS`.
    include_flagged : bool
        Keep rows with non-zero ``flags`` (default: only rows passing every final cut,
        like the paper's Table 1).

    Returns
    -------
    astropy.table.Table
    """
    missing = [name for name in CATALOG_COLUMNS if name not in results.variables]
    if missing:
        raise ValueError(f"results lack the catalog column(s) {', '.join(missing)}")
    flags = np.asarray(results["flags"].values)
    keep = np.ones(flags.shape, dtype=bool) if include_flagged else flags == 0
    table = Table()
    for name, unit in {**CATALOG_COLUMNS, **EXTRA_COLUMNS}.items():
        if name not in results.variables:
            continue
        values = np.asarray(results[name].values)[keep]
        if values.dtype == object or values.dtype.kind in "UT":
            values = values.astype(str)
        elif values.dtype.kind == "u":  # VOTable and some readers have no unsigned ints
            values = values.astype(np.int64)
        table[name] = values if unit is None else values * unit
        table[name].description = _DESCRIPTIONS[name]
    table.meta.update({k: v for k, v in results.attrs.items() if isinstance(v, (str, int, float))})
    return table


def write_catalog(table: Table, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write a catalog table, the format chosen by the file suffix.

    Parameters
    ----------
    table : astropy.table.Table
    path : str or path-like
        ``.csv``, ``.ecsv``, ``.fits``, ``.parquet`` (needs pyarrow) or ``.vot``/``.xml``.
    overwrite : bool

    Returns
    -------
    pathlib.Path
    """
    path = Path(path)
    fmt = CATALOG_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"unknown catalog format {path.suffix!r} for {path}; use one of "
                         f"{', '.join(CATALOG_FORMATS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    out = table
    if fmt == "fits":  # FITS header keywords must be short: keep provenance as HISTORY-like COMMENTs
        out = table.copy(copy_data=False)
        out.meta = {k[:8].upper(): v for k, v in table.meta.items() if isinstance(v, (int, float))}
        out.meta["COMMENTS"] = [f"{k}: {v}" for k, v in table.meta.items() if isinstance(v, str)][:50]
    elif fmt in ("ascii.csv",):
        out = table.copy(copy_data=False)
        out.meta = {}
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError as exc:
            raise ImportError("writing .parquet needs pyarrow: pip install 'lamost-mdwarf[parquet]'") from exc
    out.write(path, format=fmt, overwrite=overwrite)
    return path
