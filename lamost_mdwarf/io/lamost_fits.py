"""Read one LAMOST low-resolution spectrum, whatever its data-release layout.

Three layouts occur (see ``../shared/data/real/README.txt``):

``dr1_image``
    Original DR1 (pipeline v2.6.x): a float32 primary image of shape (5, NAXIS1) with rows
    flux, inverse variance, *subcontinuum*, andmask, ormask. There is no wavelength row:
    ``wavelength = 10**(COEFF0 + COEFF1 * i)``. SNR keywords are ``SN_U`` .. ``SN_Z``.
``image``
    DR5-DR8 re-reductions: the same 5-row image, but row 2 is the vacuum wavelength (A).
    SNR keywords are ``SNRU`` .. ``SNRZ``; ``OBSID`` and ``DATA_V`` are present.
``coadd_table``
    DR9 and later: an empty primary HDU carrying the header and a binary table ``COADD``
    with one row of array columns ``FLUX``, ``IVAR``, ``WAVELENGTH``, ``ANDMASK``,
    ``ORMASK`` (and ``NORMALIZATION``).

:func:`read_lamost_spectrum` returns the arrays on the file's own (observed-frame,
vacuum, heliocentric) wavelength grid together with normalised metadata, or raises
:class:`LamostReadError` naming the file and the reason. It never lets a low-level
exception (astropy, zlib, numpy) escape for a bad file, and a corrupt size keyword can
neither make it loop nor allocate more than the (size-capped) file holds: header counts
(NAXIS, TFIELDS) are checked on the raw cards before astropy parses them, and HDUs are
loaded one at a time with each data span checked against the file
(``tests/test_reader_fuzz.py`` fuzzes all of this with hypothesis).
"""
from __future__ import annotations

import io
import math
import os
import re
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from lamost_mdwarf.io import fits_fast

__all__ = [
    "LamostReadError",
    "LamostSpectrum",
    "read_lamost_spectrum",
    "make_spectrum_id",
    "normalize_subclass",
    "normalize_data_release",
    "parse_spectrum_filename",
    "LAYOUTS",
]

LAYOUTS = ("dr1_image", "image", "coadd_table")

#: Sentinel values LAMOST uses for a missing number.
_MISSING_SENTINELS = (-9999.0, -999.0, -99.0)

_FITS_MAGIC = b"SIMPLE  ="
_GZIP_MAGIC = b"\x1f\x8b"

_SNR_KEYS = {
    "snr_u": ("SNRU", "SN_U"),
    "snr_g": ("SNRG", "SN_G"),
    "snr_r": ("SNRR", "SN_R"),
    "snr_i": ("SNRI", "SN_I"),
    "snr_z": ("SNRZ", "SN_Z"),
}

_FILENAME_RE = re.compile(
    r"^spec-(?P<lmjd>\d+)-(?P<planid>.+?)_sp(?P<spid>\d+)-(?P<fiberid>\d+)"
)

#: Largest relative difference between a stored wavelength row and the header's log-linear
#: solution for which the (exact) header solution is used instead of the float32 row.
_WAVELENGTH_ROW_RTOL = 1e-5

#: Upper limit of a plausible pixel count; larger NAXIS values are treated as corrupt.
MAX_PIXELS = 100_000

#: Fewest pixels of a usable spectrum (resampling interpolates between two pixels).
MIN_PIXELS = 2

#: Most HDUs read from one file (a LAMOST medium-resolution file has 17); a corrupt size
#: keyword can make astropy re-read the same header forever, which this bounds.
MAX_HDUS = 64

#: Plausible ranges of the identity keywords; a header value outside is treated as missing
#: (the file name then supplies it), so that a corrupt card cannot produce an absurd id.
_IDENT_RANGES = {"lmjd": (1, 999_999), "spid": (0, 99), "fiberid": (0, 9_999)}


class LamostReadError(ValueError):
    """A file that is not a readable LAMOST low-resolution spectrum.

    Parameters
    ----------
    path : str
        The offending file.
    reason : str
        A short, human-readable reason (also available as ``.reason``).
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass
class LamostSpectrum:
    """One LAMOST low-resolution spectrum on its native grid.

    Attributes
    ----------
    wavelength : numpy.ndarray
        Observed-frame vacuum wavelength of each pixel, Angstrom, float64, increasing.
    flux : numpy.ndarray
        Flux, relative flux calibration (arbitrary units), float32.
    ivar : numpy.ndarray
        Inverse variance of ``flux`` (flux units^-2), float32; 0 marks a bad pixel. Always
        finite and >= 0: the reader sets it to 0 where the file's flux or inverse variance
        is NaN/inf or the inverse variance is negative.
    andmask, ormask : numpy.ndarray
        LAMOST pixel mask bits (uint16): 1 BADCCD, 2 BADPROFILE, 4 NOSKY, 8 BRIGHTSKY,
        16 BADCENTER, 32 NODATA.
    meta : dict
        Normalised metadata; see :func:`read_lamost_spectrum` for the keys.
    """

    wavelength: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray
    andmask: np.ndarray
    ormask: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def spectrum_id(self) -> str:
        """Stable id of the observation (see :func:`make_spectrum_id`)."""
        return self.meta["spectrum_id"]


# --------------------------------------------------------------------------- parsers


def make_spectrum_id(lmjd: int, planid: str, spid: int, fiberid: int) -> str:
    """Stable identifier of one LAMOST observation.

    The same exposure set re-reduced in DR1, DR7 or DR9 keeps its local MJD, plan,
    spectrograph and fiber, so the id is identical across releases (``OBSID`` is absent
    from original DR1 files and cannot serve). The format follows LAMOST file names,
    e.g. ``55859-F5902_sp01-001``.

    Parameters
    ----------
    lmjd : int
        Local modified Julian day (days).
    planid : str
        Observing plan id.
    spid : int
        Spectrograph number (1-16).
    fiberid : int
        Fiber number (1-250).

    Returns
    -------
    str
    """
    planid = str(planid).strip()
    # printable ASCII only: the id names files and keys stores (no blanks, slashes, controls)
    if not planid or any(c in planid for c in "/\\") or not all("!" <= c <= "~" for c in planid):
        raise ValueError(f"invalid PLANID {planid!r}")
    lmjd, spid, fiberid = int(lmjd), int(spid), int(fiberid)
    if lmjd <= 0 or spid < 0 or fiberid < 0:
        raise ValueError(f"invalid LMJD/SPID/FIBERID {lmjd}/{spid}/{fiberid}")
    return f"{lmjd}-{planid}_sp{spid:02d}-{fiberid:03d}"


def parse_spectrum_filename(name: str) -> dict[str, Any] | None:
    """Parse ``spec-LMJD-PLANID_spSS-FFF...`` into its parts, or return None."""
    match = _FILENAME_RE.match(os.path.basename(name))
    if not match:
        return None
    return {
        "lmjd": int(match["lmjd"]),
        "planid": match["planid"],
        "spid": int(match["spid"]),
        "fiberid": int(match["fiberid"]),
    }


_SUBCLASS_DWARF_PREFIX = re.compile(r"^d(?=[OBAFGKML]\d?)")


def normalize_subclass(value: Any) -> str:
    """Normalise a LAMOST ``SUBCLASS`` value.

    Strips blanks and the dwarf prefix later releases write (``'dM5'`` -> ``'M5'``,
    ``'dK7'`` -> ``'K7'``); other values (``'K7'``, ``'sdM1'``, ``'Non'``) are kept.
    Missing values give ``''``.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = str(value).strip()
    return _SUBCLASS_DWARF_PREFIX.sub("", text)


_RELEASE_RE = re.compile(r"\bDR\s*(\d+)", re.IGNORECASE)


def normalize_data_release(data_v: Any, layout: str) -> str:
    """Data release name such as ``'DR9'``.

    Parameters
    ----------
    data_v : str or None
        The ``DATA_V`` keyword (e.g. ``'LAMOST DR7'``, ``'LAMOST DR9 v1.0'``).
    layout : str
        The detected layout; original DR1 files have no ``DATA_V`` and give ``'DR1'``.
    """
    if data_v is not None:
        match = _RELEASE_RE.search(str(data_v))
        if match:
            return f"DR{int(match.group(1))}"
    if layout == "dr1_image":
        return "DR1"
    return "unknown"


def _clean_float(value: Any) -> float:
    """A header number as float; sentinels, blanks, non-numbers and overflows become NaN."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond 1e308
        return math.nan
    if not math.isfinite(number) or number in _MISSING_SENTINELS:
        return math.nan
    return number


def _clean_int(value: Any) -> int | None:
    """A header integer (exact for ints; integral floats accepted), else None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if not math.isfinite(number) or number != int(number):
        return None
    return int(number)


def _clean_str(value: Any) -> str:
    if value is None:
        return ""
    return str(value).strip()


def _first_present(header: Any, names: tuple[str, ...]) -> Any:
    for name in names:
        if name in header:
            return header[name]
    return None


# --------------------------------------------------------------------------- reader


_CARD = 80
_BLOCK = 2880
#: Primary headers longer than this many 2880-byte blocks are not parsed on the fast path.
_MAX_HEADER_BLOCKS = 64
_UNPARSED = object()


class PrimaryHeaderValues:
    """Keyword values of a primary header, parsed from its raw 80-character cards.

    astropy parses a card's value lazily and slowly (tens of microseconds per keyword);
    reading the ~30 keywords a LAMOST spectrum needs that way costs more than reading the
    file. The raw cards are read once here, and values in the FITS fixed/free formats
    (quoted strings, integers, reals, logicals) are parsed directly; anything else falls
    back to the astropy :class:`~astropy.io.fits.Header`. Only the first occurrence of a
    keyword is used, as astropy does.
    """

    def __init__(self, cards: dict[str, str], header: fits.Header | None = None) -> None:
        self._cards = cards
        self.header = header

    def _value(self, key: str) -> Any:
        text = self._cards.get(key)
        if text is None:
            return _UNPARSED
        return _parse_card_value(text)

    def get(self, key: str, default: Any = None) -> Any:
        value = self._value(key)
        if value is _UNPARSED:
            if key in self._cards and self.header is not None:
                try:
                    return self.header.get(key, default)
                except (fits.VerifyError, ValueError):  # an unparsable card counts as missing
                    return default
            return default
        return value

    def __contains__(self, key: str) -> bool:
        return key in self._cards

    def __getitem__(self, key: str) -> Any:
        if key not in self._cards:
            raise KeyError(key)
        return self.get(key)


def _parse_card_value(text: str) -> Any:
    """Value of a card's value field (columns 11-80), or ``_UNPARSED``."""
    stripped = text.lstrip()
    if stripped.startswith("'"):
        out, i = [], 1
        while i < len(stripped):
            char = stripped[i]
            if char == "'":
                if stripped[i + 1:i + 2] == "'":
                    out.append("'")
                    i += 2
                    continue
                return "".join(out).rstrip()
            out.append(char)
            i += 1
        return _UNPARSED  # unterminated string
    field = stripped.split("/", 1)[0].strip()
    if field == "":
        return None
    if field == "T":
        return True
    if field == "F":
        return False
    try:
        return int(field)
    except ValueError:
        pass
    try:
        return float(field.replace("D", "E").replace("d", "e"))
    except ValueError:
        return _UNPARSED


#: Largest decompressed size accepted for one spectrum file (a LAMOST file is ~100 KB).
MAX_FILE_BYTES = 64 * 2**20


def read_file_bytes(path: Path) -> bytes:
    """The file's FITS bytes, gunzipped when gzip-compressed (checks size and magic).

    Only as many bytes as the file holds are allocated (never :data:`MAX_FILE_BYTES` up
    front), and a gzip stream is decompressed with a bounded output size, so neither a
    large file nor a gzip bomb can exhaust memory.

    Raises
    ------
    LamostReadError
        Unreadable, empty, corrupt or truncated gzip stream, too large, or not FITS.
    """
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > MAX_FILE_BYTES:
                raise LamostReadError(path, f"file larger than {MAX_FILE_BYTES // 2**20} MiB: not a LAMOST spectrum")
            raw = handle.read(size + 1)
    except OSError as exc:
        raise LamostReadError(path, f"cannot open file ({exc.strerror or exc})") from None
    if not raw:
        raise LamostReadError(path, "empty file")
    data = _gunzip(raw, path) if raw[:2] == _GZIP_MAGIC else raw
    if len(data) > MAX_FILE_BYTES:
        raise LamostReadError(path, f"file larger than {MAX_FILE_BYTES // 2**20} MiB: not a LAMOST spectrum")
    if not data.startswith(_FITS_MAGIC):
        raise LamostReadError(path, "not a FITS file (no 'SIMPLE  =' card at the start)")
    return data


def _gunzip(raw: bytes, path: Path) -> bytes:
    """Decompress a (possibly multi-member) gzip stream to at most ``MAX_FILE_BYTES + 1`` bytes.

    Like :mod:`gzip`, trailing zero bytes after the last member are ignored and anything
    else after it is an error.
    """
    out = bytearray()
    rest = raw
    while True:
        decompressor = zlib.decompressobj(wbits=31)
        try:
            out += decompressor.decompress(rest, MAX_FILE_BYTES + 1 - len(out))
        except zlib.error as exc:
            raise LamostReadError(path, f"corrupt gzip stream ({exc})") from None
        if len(out) > MAX_FILE_BYTES or decompressor.unconsumed_tail:
            raise LamostReadError(
                path, f"decompressed size exceeds {MAX_FILE_BYTES // 2**20} MiB: not a LAMOST spectrum"
            )
        if not decompressor.eof:
            raise LamostReadError(path, "corrupt or truncated gzip stream (ends early)")
        rest = decompressor.unused_data
        if not rest.strip(b"\x00"):
            return bytes(out)
        if rest[:2] != _GZIP_MAGIC:
            raise LamostReadError(path, "corrupt gzip file (unexpected bytes after the compressed stream)")


def primary_header_cards(data: bytes, path: Path) -> dict[str, str]:
    """Raw value fields of the primary header's keyword cards.

    Raises
    ------
    LamostReadError
        A header without END within :data:`_MAX_HEADER_BLOCKS` blocks, or truncated.
    """
    cards: dict[str, str] = {}
    for block_index in range(_MAX_HEADER_BLOCKS):
        block = data[block_index * _BLOCK:(block_index + 1) * _BLOCK]
        if len(block) < _BLOCK:
            raise LamostReadError(path, "truncated FITS header (no END card)")
        text = block.decode("ascii", errors="replace")
        for start in range(0, _BLOCK, _CARD):
            card = text[start:start + _CARD]
            keyword = card[:8].rstrip()
            if keyword == "END":
                return cards
            if card[8:10] == "= " and keyword not in cards:
                cards[keyword] = card[10:]
    raise LamostReadError(path, f"no END card in the first {_MAX_HEADER_BLOCKS} header blocks")


def _as_1d(array: Any, name: str, path: Path) -> np.ndarray:
    out = np.asarray(array)
    if out.ndim != 1:
        out = out.reshape(-1)
    if out.size == 0:
        raise LamostReadError(path, f"{name} is empty")
    return out


def _read_image(hdu: fits.ImageHDU | fits.PrimaryHDU, path: Path) -> tuple[str, dict[str, np.ndarray]]:
    header = hdu.header
    naxis = header.get("NAXIS", 0)
    if naxis != 2:
        raise LamostReadError(path, f"primary image has NAXIS={naxis}; expected a (rows, pixels) image")
    n_pix, n_rows = header.get("NAXIS1"), header.get("NAXIS2")
    if not isinstance(n_pix, int) or not isinstance(n_rows, int) or not 0 < n_pix <= MAX_PIXELS:
        raise LamostReadError(path, f"implausible image size NAXIS1={n_pix!r} NAXIS2={n_rows!r}")
    if n_rows < 2:
        raise LamostReadError(path, f"image has {n_rows} row(s); flux and inverse variance rows are required")
    data = np.asarray(hdu.data)
    if data.shape != (n_rows, n_pix):
        raise LamostReadError(path, f"image data shape {data.shape} does not match NAXIS2 x NAXIS1 = {(n_rows, n_pix)}")
    return _image_rows(_clean_str(header.get("EXTEN0")), data, path)


def _image_rows(exten0: str, data: np.ndarray, path: Path) -> tuple[str, dict[str, np.ndarray]]:
    """The layout and named rows of a (rows, pixels) LAMOST image with >= 2 rows.

    ``exten0`` is the EXTEN0 keyword (row description; '' when absent).
    """
    n_rows = data.shape[0]
    has_wavelength_row = "wavelength" in exten0.lower()
    if not exten0 and n_rows >= 3:
        # No row description: row 2 is a wavelength only if it looks like one.
        row = data[2].astype(np.float64)
        has_wavelength_row = bool(np.all(np.isfinite(row)) and np.all(np.diff(row) > 0) and 2000 < row[0] < 12000)
    rows: dict[str, np.ndarray] = {"flux": data[0], "ivar": data[1]}
    if has_wavelength_row:
        if n_rows < 3:
            raise LamostReadError(path, "EXTEN0 announces a wavelength row but the image has fewer than 3 rows")
        rows["wavelength"] = data[2]
    if n_rows >= 5:
        rows["andmask"], rows["ormask"] = data[3], data[4]
    layout = "image" if has_wavelength_row else "dr1_image"
    return layout, rows


def _read_coadd(hdu: fits.BinTableHDU, path: Path) -> dict[str, np.ndarray]:
    # A column without TTYPEn has no name (None): it cannot be FLUX or IVAR.
    names = {str(name).strip().upper(): name for name in hdu.columns.names if name}
    missing = [col for col in ("FLUX", "IVAR") if col not in names]
    if missing:
        raise LamostReadError(path, f"COADD table has no {'/'.join(missing)} column")
    # Check the row count before touching the data (astropy converts some columns row by row).
    n_rows = hdu.header.get("NAXIS2")
    if not isinstance(n_rows, int) or isinstance(n_rows, bool) or n_rows < 1:
        raise LamostReadError(path, f"COADD table has no rows (NAXIS2={n_rows!r})")
    if n_rows > 1:
        raise LamostReadError(path, f"COADD table has {n_rows} rows; expected one spectrum")
    table = hdu.data
    if table is None or len(table) != 1:
        raise LamostReadError(path, "COADD table has no readable row")
    rows = {"flux": table[names["FLUX"]][0], "ivar": table[names["IVAR"]][0]}
    for col, key in (("WAVELENGTH", "wavelength"), ("ANDMASK", "andmask"), ("ORMASK", "ormask")):
        if col in names:
            rows[key] = table[names[col]][0]
    return rows


def _log_linear_wavelength(header: Any, n_pix: int, path: Path) -> tuple[np.ndarray, float, float]:
    coeff0 = _clean_float(_first_present(header, ("COEFF0", "CRVAL1")))
    coeff1 = _clean_float(_first_present(header, ("COEFF1", "CD1_1")))
    if not (math.isfinite(coeff0) and math.isfinite(coeff1)) or not (3.0 < coeff0 < 4.5 and 0 < coeff1 < 1e-2):
        raise LamostReadError(path, f"no usable log-linear wavelength solution (COEFF0={coeff0}, COEFF1={coeff1})")
    return 10.0 ** (coeff0 + coeff1 * np.arange(n_pix, dtype=np.float64)), coeff0, coeff1


def _mask_bits(values: np.ndarray | None, n_pix: int, name: str, path: Path) -> np.ndarray:
    """LAMOST mask bits as uint16 (stored as floats; non-finite values become 0)."""
    if values is None:
        return np.zeros(n_pix, dtype=np.uint16)
    array = _real_numbers(_as_1d(values, name, path), name, path)
    if array.size != n_pix:
        raise LamostReadError(path, f"{name} has {array.size} pixels but flux has {n_pix}")
    clean = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(np.rint(clean), 0, np.iinfo(np.uint16).max).astype(np.uint16)


def _is_medium_resolution(path: Path, hdul: fits.HDUList) -> bool:
    names = {hdu.name.upper() for hdu in hdul}
    return (
        os.path.basename(path).lower().startswith("med-")
        or bool(names & {"COADD_B", "COADD_R"})
        or any(name.startswith(("B-", "R-")) for name in names)
    )


def read_lamost_spectrum(path: str | os.PathLike) -> LamostSpectrum:
    """Read a LAMOST low-resolution spectrum (``.fits`` or ``.fits.gz``).

    Parameters
    ----------
    path : str or path-like
        The file.

    Returns
    -------
    LamostSpectrum
        Arrays on the file's native grid (observed frame, vacuum, Angstrom) and ``meta``
        with keys: ``spectrum_id`` (str, stable across releases), ``obsid`` (int, -1 if
        absent), ``designation``, ``ra``, ``dec`` (deg, J2000), ``z``, ``z_err`` (NaN when
        missing), ``snr_u`` .. ``snr_z``, ``snr_lambda`` (their sum; NaN if any is
        missing), ``class``, ``subclass`` (``'dM5'`` -> ``'M5'``), ``data_release``
        (``'DR1'``, ``'DR7'``, ...), ``layout`` (one of :data:`LAYOUTS`), ``lmjd``,
        ``planid``, ``spid``, ``fiberid``, ``coeff0``, ``coeff1``, ``n_pixels``,
        ``source_path`` (absolute path).

    Raises
    ------
    LamostReadError
        For a missing, empty, non-FITS, truncated or corrupt file, a medium-resolution
        file, a file without flux and inverse variance, inconsistent array sizes, or
        missing identifying keywords. The message names the file and the reason.
    """
    path = Path(path)
    if not path.is_file():
        raise LamostReadError(path, "no such file")
    data = read_file_bytes(path)
    cards = primary_header_cards(data, path)
    _check_header_counts(data, 0, 0, path)
    plain = _read_plain_file(path, data, cards)
    if plain is not None:
        return plain
    return _read_with_astropy(path, data, cards)


def _read_with_astropy(path: Path, data: bytes, cards: dict[str, str]) -> LamostSpectrum:
    """Read any FITS structure with astropy, turning every failure into a LamostReadError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", category=UserWarning)
            # numpy overflow/invalid-value warnings (a corrupt BSCALE, COEFF0 or float64 flux
            # beyond float32) leave inf/NaN values, which the checks below handle.
            warnings.simplefilter("ignore", category=RuntimeWarning)
            warnings.filterwarnings("ignore", message=".*(non-ASCII|invalid|verify|keyword).*")
            with fits.open(
                io.BytesIO(data), memmap=False, lazy_load_hdus=True, disable_image_compression=True
            ) as hdul:
                _load_all_hdus(hdul, data, path)
                return _read_open_file(path, hdul, cards)
    except LamostReadError:
        raise
    except Warning as exc:  # astropy's "file may have been truncated" and friends
        raise LamostReadError(path, f"corrupt or truncated FITS file ({exc})") from None
    except fits.VerifyError as exc:  # an unparsable card astropy had to read (EXTNAME, EXTEN0, ...)
        raise LamostReadError(path, f"corrupt FITS header ({exc})") from None
    except (OSError, EOFError, zlib.error, ValueError, TypeError, IndexError, KeyError, OverflowError,
            AssertionError) as exc:  # astropy checks some table keywords (TTYPEn) with assert
        raise LamostReadError(path, f"corrupt or truncated FITS file ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # noqa: BLE001 - a bad file must give LamostReadError, whatever astropy raises
        raise LamostReadError(
            path, f"unreadable FITS file (unexpected error while reading: {type(exc).__name__}: {exc})"
        ) from None


def _load_all_hdus(hdul: fits.HDUList, data: bytes, path: Path) -> None:
    """Read the HDU headers one at a time, checking that each HDU's data lies in the file.

    astropy computes an HDU's data size from BITPIX, NAXISn, PCOUNT and GCOUNT without
    checking them; a negative size makes it seek backwards and read the same headers
    again, forever (and a huge one reads past the end of the file). Reading lazily with
    at most :data:`MAX_HDUS` HDUs, and checking each HDU's data span before the next
    header is read, turns both into a :class:`LamostReadError`. Each header's NAXIS and
    TFIELDS are checked on the raw cards before astropy parses it (see
    :func:`_check_header_counts`); the primary header is checked by the caller.
    """
    n_bytes = len(data)
    end_of_previous = 0
    for index in range(MAX_HDUS + 1):
        if index > 0 and end_of_previous < n_bytes:
            _check_header_counts(data, end_of_previous, index, path)  # before astropy parses it
        try:
            hdu = hdul[index]
        except IndexError:
            return
        if index == MAX_HDUS:
            raise LamostReadError(path, f"more than {MAX_HDUS} HDUs: corrupt FITS structure")
        header_start, data_start, data_span = _hdu_location(hdu)
        if header_start is None or data_start is None or data_span is None:
            continue
        if data_span < 0 or header_start < end_of_previous:
            raise LamostReadError(
                path, f"corrupt FITS structure: HDU {index} declares a negative data size ({_size_keywords(hdu)})"
            )
        if data_start + data_span > n_bytes:
            raise LamostReadError(
                path,
                f"corrupt or truncated FITS file: HDU {index} declares {data_span} data bytes "
                f"({_size_keywords(hdu)}) but only {max(n_bytes - data_start, 0)} remain",
            )
        end_of_previous = data_start + data_span


#: Keywords astropy iterates over (one column / axis / group parameter per unit); the FITS
#: standard limits them to 999, and a corrupt huge value makes astropy loop for minutes.
_COUNT_KEYWORDS = (b"NAXIS   ", b"TFIELDS ")
_MAX_COUNT = 999
_VALID_END_CARD = b"END" + b" " * 77


def _check_header_counts(data: bytes, offset: int, index: int, path: Path) -> None:
    """Reject a header whose NAXIS, TFIELDS or (random groups) PCOUNT exceeds 999.

    Runs on the raw cards before astropy parses the header. The scan stops only at a
    fully valid END card, so it covers at least every card astropy will read.
    """
    groups = False
    pcount: Any = None
    for start in range(offset, len(data) - _CARD + 1, _CARD):
        card = data[start:start + _CARD]
        if card == _VALID_END_CARD:
            break
        keyword = card[:8].upper()
        if card[8:10] != b"= ":
            continue
        if keyword == b"GROUPS  ":
            groups = _parse_card_value(card[10:].decode("ascii", "replace")) is True
        elif keyword == b"PCOUNT  ":
            pcount = _parse_card_value(card[10:].decode("ascii", "replace"))
        elif keyword in _COUNT_KEYWORDS:
            value = _parse_card_value(card[10:].decode("ascii", "replace"))
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= _MAX_COUNT:
                raise LamostReadError(
                    path, f"corrupt FITS header: HDU {index} has {keyword.decode('ascii', 'replace').strip()} = "
                          f"{card[10:].decode('ascii', 'replace').split('/')[0].strip()!r} (expected 0-{_MAX_COUNT})"
                )
    if groups and isinstance(pcount, (int, float)) and not isinstance(pcount, bool) and pcount > _MAX_COUNT:
        raise LamostReadError(path, f"corrupt FITS header: HDU {index} is random groups with PCOUNT = {pcount}")


def _hdu_location(hdu: Any) -> tuple[int | None, int | None, int | None]:
    """(header offset, data offset, padded data size) of an HDU read from a file.

    ``HDUList.fileinfo`` cannot be used: it iterates over all HDUs, which is the endless
    loop being guarded against. ``_ValidHDU.fileinfo`` is public; astropy's corrupt and
    non-standard HDU classes lack it but carry the same (private) attributes.
    """
    info = hdu.fileinfo() if hasattr(hdu, "fileinfo") else None
    if info:
        return info["hdrLoc"], info["datLoc"], info["datSpan"]
    return (getattr(hdu, "_header_offset", None), getattr(hdu, "_data_offset", None),
            getattr(hdu, "_data_size", None))


def _size_keywords(hdu: Any) -> str:
    header = hdu.header
    keys = ["BITPIX", "NAXIS"] + [f"NAXIS{i}" for i in range(1, 4)] + ["PCOUNT", "GCOUNT"]
    return " ".join(f"{key}={header[key]!r}" for key in keys if key in header)


def _real_numbers(array: np.ndarray, name: str, path: Path) -> np.ndarray:
    """``array`` if it holds real numbers (integers or floats), else a LamostReadError."""
    if array.dtype.kind not in "iuf":
        raise LamostReadError(path, f"{name} has data type {array.dtype.name}; expected real numbers")
    return array


def _read_open_file(path: Path, hdul: fits.HDUList, cards: dict[str, str]) -> LamostSpectrum:
    if len(hdul) == 0:
        raise LamostReadError(path, "no HDU in file")
    if _is_medium_resolution(path, hdul):
        raise LamostReadError(
            path, "medium-resolution LAMOST file (COADD_B/COADD_R); only low-resolution spectra are supported"
        )
    header = PrimaryHeaderValues(cards, hdul[0].header)
    coadd = next((hdu for hdu in hdul[1:] if isinstance(hdu, fits.BinTableHDU) and hdu.name.upper() == "COADD"), None)
    if coadd is not None:
        layout, rows = "coadd_table", _read_coadd(coadd, path)
    elif hdul[0].header.get("NAXIS", 0) == 2:
        layout, rows = _read_image(hdul[0], path)
    else:
        raise LamostReadError(path, "no flux/inverse-variance data: neither a 2-D primary image nor a COADD table")
    return _spectrum_from_rows(path, header, layout, rows)


def _read_plain_file(path: Path, data: bytes, cards: dict[str, str]) -> LamostSpectrum | None:
    """The spectrum decoded without astropy when the file is a plain LAMOST layout, else None.

    See :mod:`lamost_mdwarf.io.fits_fast`: a float primary image with at least 2 rows, or
    a one-row COADD table, with nothing unusual; None hands the file to astropy.
    """
    if path.name.lower().startswith("med-"):
        return None
    data_start = fits_fast.header_end(data, 0)  # ``cards`` already holds the primary header's cards
    if data_start is None:
        return None
    image = fits_fast.decode_primary_image(data, cards, data_start)
    if image is not None:
        if image.shape[0] < 2 or image.shape[1] > MAX_PIXELS:
            return None
        header = PrimaryHeaderValues(cards, _LazyHeader(data, data_start))
        if "EXTEN0" in cards and header._value("EXTEN0") is _UNPARSED:
            return None  # astropy reports the corrupt row description
        layout, rows = _image_rows(_clean_str(header.get("EXTEN0")), image, path)
    else:
        table = fits_fast.decode_single_row_table(data, cards, data_start, "COADD")
        if table is None or "FLUX" not in table or "IVAR" not in table:
            return None
        header = PrimaryHeaderValues(cards, _LazyHeader(data, data_start))
        layout = "coadd_table"
        rows = {key: table[col] for col, key in (("FLUX", "flux"), ("IVAR", "ivar"), ("WAVELENGTH", "wavelength"),
                                                   ("ANDMASK", "andmask"), ("ORMASK", "ormask")) if col in table}
    return _spectrum_from_rows(path, header, layout, rows)


class _LazyHeader:
    """The primary header as an astropy Header, parsed only if a keyword needs it."""

    def __init__(self, data: bytes, header_end: int) -> None:
        self._data, self._end = data, header_end
        self._header: fits.Header | None = None

    def get(self, key: str, default: Any = None) -> Any:
        if self._header is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._header = fits.Header.fromstring(self._data[:self._end].decode("ascii", errors="replace"))
        return self._header.get(key, default)


def _spectrum_from_rows(path: Path, header: PrimaryHeaderValues, layout: str,
                        rows: dict[str, np.ndarray]) -> LamostSpectrum:
    """Checked arrays, the wavelength solution and the metadata of one spectrum."""
    with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32 range -> inf
        flux = _real_numbers(_as_1d(rows["flux"], "flux", path), "flux", path).astype(np.float32)
        ivar = _real_numbers(_as_1d(rows["ivar"], "ivar", path), "ivar", path).astype(np.float32)
    n_pix = flux.size
    if ivar.size != n_pix:
        raise LamostReadError(path, f"flux has {n_pix} pixels but ivar has {ivar.size}")
    if n_pix > MAX_PIXELS:
        raise LamostReadError(path, f"implausible pixel count {n_pix}")
    if n_pix < MIN_PIXELS:
        raise LamostReadError(path, f"spectrum has {n_pix} pixel(s); at least {MIN_PIXELS} are needed")
    # A pixel is usable only with a finite flux and a finite, positive inverse variance.
    bad = ~(np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0))
    if bad.any():
        ivar = np.where(bad, np.float32(0.0), ivar)

    coeff0 = _clean_float(header.get("COEFF0"))
    coeff1 = _clean_float(header.get("COEFF1"))
    if "wavelength" in rows:
        wavelength = _real_numbers(_as_1d(rows["wavelength"], "wavelength", path), "wavelength", path)
        wavelength = wavelength.astype(np.float64)
        if wavelength.size != n_pix:
            raise LamostReadError(path, f"wavelength has {wavelength.size} pixels but flux has {n_pix}")
        # The stored row is the log-linear solution rounded to float32: use the exact
        # solution when the header's coefficients reproduce the row.
        if math.isfinite(coeff0) and math.isfinite(coeff1) and 0 < coeff1 < 1e-2:
            exact = 10.0 ** (coeff0 + coeff1 * np.arange(n_pix, dtype=np.float64))
            with np.errstate(invalid="ignore", divide="ignore"):
                deviation = np.nanmax(np.abs(wavelength / exact - 1.0))
            if deviation < _WAVELENGTH_ROW_RTOL:
                wavelength = exact
    else:
        wavelength, coeff0, coeff1 = _log_linear_wavelength(header, n_pix, path)
    if not np.all(np.isfinite(wavelength)) or not np.all(np.diff(wavelength) > 0):
        raise LamostReadError(path, "wavelength array is not finite and strictly increasing")
    if not (1000.0 < wavelength[0] < 20000.0):
        raise LamostReadError(path, f"implausible first wavelength {wavelength[0]:.6g} A")

    meta = _normalize_metadata(path, header, layout)
    meta.update(coeff0=coeff0, coeff1=coeff1, n_pixels=int(n_pix))
    return LamostSpectrum(
        wavelength=wavelength,
        flux=flux,
        ivar=ivar,
        andmask=_mask_bits(rows.get("andmask"), n_pix, "andmask", path),
        ormask=_mask_bits(rows.get("ormask"), n_pix, "ormask", path),
        meta=meta,
    )


def _normalize_metadata(path: Path, header: Any, layout: str) -> dict[str, Any]:
    from_name = parse_spectrum_filename(path.name) or {}
    ident: dict[str, Any] = {}
    for key, header_key in (("lmjd", "LMJD"), ("spid", "SPID"), ("fiberid", "FIBERID")):
        value = _clean_int(header.get(header_key))
        low, high = _IDENT_RANGES[key]
        if value is not None and not low <= value <= high:
            value = None  # a corrupt value is no better than a missing one
        ident[key] = value if value is not None else from_name.get(key)
    planid = _clean_str(header.get("PLANID")) or from_name.get("planid", "")
    ident["planid"] = planid
    missing = [key.upper() for key, value in ident.items() if value in (None, "")]
    if missing:
        raise LamostReadError(
            path, f"missing keyword(s) {', '.join(missing)} needed for the spectrum id (and not in the file name)"
        )
    try:
        spectrum_id = make_spectrum_id(ident["lmjd"], ident["planid"], ident["spid"], ident["fiberid"])
    except ValueError as exc:
        raise LamostReadError(path, f"cannot build the spectrum id: {exc}") from None

    ra, dec = _clean_float(header.get("RA")), _clean_float(header.get("DEC"))
    if not (math.isfinite(ra) and math.isfinite(dec)) or not (0 <= ra <= 360 and -90 <= dec <= 90):
        raise LamostReadError(path, f"missing or invalid RA/DEC ({header.get('RA')!r}, {header.get('DEC')!r})")

    snr = {key: _clean_float(_first_present(header, names)) for key, names in _SNR_KEYS.items()}
    snr = {key: (value if value >= 0 else math.nan) for key, value in snr.items()}
    snr_lambda = math.fsum(snr.values()) if all(math.isfinite(v) for v in snr.values()) else math.nan

    obsid = _clean_int(header.get("OBSID"))
    z = _clean_float(header.get("Z"))
    z_err = _clean_float(header.get("Z_ERR")) if math.isfinite(z) else math.nan
    designation = _clean_str(_first_present(header, ("DESIG", "DESIGNAT")))
    return {
        "spectrum_id": spectrum_id,
        "obsid": obsid if obsid is not None and obsid >= 0 else -1,
        "designation": designation,
        "ra": ra,
        "dec": dec,
        "z": z,
        "z_err": z_err,
        **snr,
        "snr_lambda": snr_lambda,
        "class": _clean_str(header.get("CLASS")),
        "subclass": normalize_subclass(header.get("SUBCLASS")),
        "data_release": normalize_data_release(header.get("DATA_V"), layout),
        "layout": layout,
        "lmjd": ident["lmjd"],
        "planid": ident["planid"],
        "spid": ident["spid"],
        "fiberid": ident["fiberid"],
        "source_path": str(path.resolve()),
    }
