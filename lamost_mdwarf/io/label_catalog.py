"""Read a label catalog (TESS-Cool-Dwarf-Catalog-like) into canonical columns with units.

The catalog may be CSV, FITS, VOTable or ECSV (anything :meth:`astropy.table.Table.read`
reads). Its columns are mapped to canonical names by a ``columns`` mapping whose defaults
are the catalog's VizieR names:

=================  ===========  ======
canonical name     default      unit
=================  ===========  ======
``ra``             RAJ2000      deg
``dec``            DEJ2000      deg
``teff``           Teff         K
``teff_err``       e_Teff       K
``radius``         Rad          Rsun
``radius_err``     e_Rad        Rsun
``mass``           Mass         Msun
``mass_err``       e_Mass       Msun
``luminosity``     Lum          Lsun
``luminosity_err`` e_Lum        Lsun
=================  ===========  ======

On the command line the mapping is given as ``--label-columns teff=TEFF,ra=RA_ICRS``.
An uncertainty column mapped to ``''`` is treated as absent (NaN).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.table import Table

__all__ = [
    "DEFAULT_LABEL_COLUMNS",
    "LABEL_UNITS",
    "LabelCatalogError",
    "LabelCatalogWarning",
    "MAX_NONPOSITIVE_FRACTION",
    "parse_column_mapping",
    "read_label_catalog",
]

DEFAULT_LABEL_COLUMNS: dict[str, str] = {
    "ra": "RAJ2000",
    "dec": "DEJ2000",
    "teff": "Teff",
    "teff_err": "e_Teff",
    "radius": "Rad",
    "radius_err": "e_Rad",
    "mass": "Mass",
    "mass_err": "e_Mass",
    "luminosity": "Lum",
    "luminosity_err": "e_Lum",
}

LABEL_UNITS: dict[str, u.UnitBase] = {
    "ra": u.deg,
    "dec": u.deg,
    "teff": u.K,
    "teff_err": u.K,
    "radius": u.Rsun,
    "radius_err": u.Rsun,
    "mass": u.Msun,
    "mass_err": u.Msun,
    "luminosity": u.Lsun,
    "luminosity_err": u.Lsun,
}

_OPTIONAL = {"teff_err", "radius_err", "mass_err", "luminosity_err"}

_FORMATS = {
    ".csv": "ascii.csv",
    ".ecsv": "ascii.ecsv",
    ".fits": "fits",
    ".fit": "fits",
    ".fits.gz": "fits",
    ".vot": "votable",
    ".xml": "votable",
    ".votable": "votable",
}


class LabelCatalogError(ValueError):
    """A label table that cannot be used; the message names the file and the problem."""


class LabelCatalogWarning(UserWarning):
    """A label table with a few unusable values (treated as missing)."""


#: Largest fraction of rows with non-positive Teff, R, M or L treated as a few bad values
#: (set to NaN with a warning); above it the table is rejected (likely a wrong mapping).
MAX_NONPOSITIVE_FRACTION = 0.01


def parse_column_mapping(text: str | None) -> dict[str, str]:
    """Parse ``'teff=TEFF,ra=RA_ICRS'`` into a mapping (canonical name -> column).

    Raises
    ------
    ValueError
        For an unknown canonical name or a malformed item.
    """
    if not text:
        return {}
    mapping: dict[str, str] = {}
    for item in text.split(","):
        if "=" not in item:
            raise ValueError(f"expected NAME=COLUMN, got {item!r}")
        key, value = (part.strip() for part in item.split("=", 1))
        if key not in DEFAULT_LABEL_COLUMNS:
            raise ValueError(f"unknown label column {key!r}; known: {', '.join(DEFAULT_LABEL_COLUMNS)}")
        mapping[key] = value
    return mapping


def _table_format(path: Path) -> str | None:
    name = path.name.lower()
    for suffix, fmt in _FORMATS.items():
        if name.endswith(suffix):
            return fmt
    return None


def read_label_catalog(path: str | os.PathLike, columns: Mapping[str, str] | None = None) -> Table:
    """Read and validate a label catalog.

    Parameters
    ----------
    path : str or path-like
        CSV, FITS, VOTable or ECSV file.
    columns : mapping, optional
        Canonical name -> column name overrides of :data:`DEFAULT_LABEL_COLUMNS`.

    Returns
    -------
    astropy.table.Table
        Columns ``label_row`` (row number in the file) and the canonical names, float64,
        with units (:data:`LABEL_UNITS`); uncertainties absent from the file are NaN.

    Raises
    ------
    LabelCatalogError
        Unreadable file, missing columns, non-numeric values, non-finite or out-of-range
        positions, an empty table, or non-positive labels in more than
        :data:`MAX_NONPOSITIVE_FRACTION` of the rows (a wrong column mapping); the message
        names the file, the column and the first offending rows.

    Warns
    -----
    LabelCatalogWarning
        When a few labels are non-positive (physically impossible): they are set to NaN
        (missing; such a star cannot be a training star) and the rows are listed, also
        in ``meta["unusable_labels"]``.
    """
    path = Path(path)
    mapping = dict(DEFAULT_LABEL_COLUMNS)
    for key, value in (columns or {}).items():
        if key not in DEFAULT_LABEL_COLUMNS:
            raise LabelCatalogError(f"{path}: unknown label column {key!r} in the column mapping")
        mapping[key] = value
    if not path.is_file():
        raise LabelCatalogError(f"{path}: label catalog not found")
    try:
        table = Table.read(path, format=_table_format(path))
    except Exception as exc:  # noqa: BLE001 - astropy raises many types for bad files
        raise LabelCatalogError(f"{path}: cannot read the label catalog ({type(exc).__name__}: {exc})") from None
    if len(table) == 0:
        raise LabelCatalogError(f"{path}: the label catalog has no rows")

    missing = [f"{col!r} (for {key})" for key, col in mapping.items()
               if col and col not in table.colnames and key not in _OPTIONAL]
    missing += [f"{col!r} (for {key})" for key, col in mapping.items()
                if col and key in _OPTIONAL and col not in table.colnames and (columns or {}).get(key)]
    if missing:
        raise LabelCatalogError(
            f"{path}: missing column(s) {', '.join(missing)}; the table has {', '.join(table.colnames)}. "
            "Map column names with --label-columns NAME=COLUMN,..."
        )

    out = Table()
    out["label_row"] = np.arange(len(table), dtype=np.int64)
    for key, col in mapping.items():
        if not col or col not in table.colnames:
            values = np.full(len(table), np.nan)
        else:
            values = _numeric_column(table[col], path, col)
        out[key] = values * LABEL_UNITS[key]

    for key in ("ra", "dec"):
        bad = ~np.isfinite(out[key].value)
        if bad.any():
            rows = np.flatnonzero(bad)[:5].tolist()
            raise LabelCatalogError(f"{path}: column {mapping[key]!r} has {bad.sum()} missing or non-finite "
                                    f"position(s), first rows {rows}")
    ra_bad = (out["ra"].value < 0) | (out["ra"].value > 360)
    dec_bad = np.abs(out["dec"].value) > 90
    if ra_bad.any() or dec_bad.any():
        rows = np.flatnonzero(ra_bad | dec_bad)[:5].tolist()
        raise LabelCatalogError(f"{path}: positions out of range (RA in [0, 360], Dec in [-90, 90] deg), "
                                f"first rows {rows}")
    unusable: dict[str, list[int]] = {}
    for key in ("teff", "radius", "mass", "luminosity"):
        values = out[key].value
        bad = np.isfinite(values) & (values <= 0)
        if bad.sum() > MAX_NONPOSITIVE_FRACTION * len(out):
            rows = np.flatnonzero(bad)[:5].tolist()
            raise LabelCatalogError(
                f"{path}: column {mapping[key]!r} has non-positive values in {bad.sum()} of {len(out)} rows "
                f"(first rows {rows}); a {key} must be positive: is the column mapping right (e.g. a log quantity)?")
        if bad.any():
            # A few impossible values in a large catalog: those labels count as missing.
            out[key][bad] = np.nan * out[key].unit
            unusable[mapping[key]] = np.flatnonzero(bad).tolist()
    if unusable:
        details = "; ".join(f"{col}: {len(rows)} (rows {rows[:5]})" for col, rows in unusable.items())
        warnings.warn(f"{path}: non-positive labels treated as missing: {details}", LabelCatalogWarning,
                      stacklevel=2)
    out.meta["unusable_labels"] = unusable
    out.meta["source"] = str(path)
    out.meta["column_mapping"] = mapping
    return out


def _numeric_column(column, path: Path, name: str) -> np.ndarray:
    data = column.filled(np.nan) if hasattr(column, "filled") and getattr(column, "mask", None) is not None \
        and np.any(column.mask) else column
    try:
        return np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError):
        pass
    values = np.empty(len(column), dtype=np.float64)
    bad_rows = []
    for i, item in enumerate(np.asarray(data)):
        try:
            values[i] = float(item)
        except (TypeError, ValueError):
            if str(item).strip() in ("", "--", "nan", "NaN"):
                values[i] = np.nan
            else:
                bad_rows.append(i)
    if bad_rows:
        examples = ", ".join(f"row {i}: {str(np.asarray(data)[i])!r}" for i in bad_rows[:3])
        raise LabelCatalogError(f"{path}: column {name!r} has non-numeric values ({examples})")
    return values
