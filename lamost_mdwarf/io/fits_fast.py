"""Direct decoding of the plain FITS data units of LAMOST spectra, without astropy objects.

Opening a LAMOST file with :func:`astropy.io.fits.open` parses every header card into
Python objects (``HDUList`` checks the primary header's EXTEND as soon as the first HDU is
read) and, for the DR9+ COADD table, builds column objects: 1-4 ms per file, more than
reading and gunzipping it. Ingestion of a survey is bound by that cost.

The data units LAMOST writes are the plainest FITS allows: a 2-D IEEE float primary
image (DR1-DR8) or a one-row binary table of fixed-length float/integer vector columns
(DR9+), with no scaling, no heap and no further HDUs. This module decodes exactly those
with :func:`numpy.frombuffer` from the raw header cards, and returns None for anything
else (scaling keywords, other BITPIX or TFORM codes, a heap, extra HDUs, a truncated data
unit, odd keyword values, ...): the caller then reads the file with astropy, which
handles, or rejects with a reason, everything FITS allows. The two paths give identical
arrays; the tests check this on every real and simulated file layout.

Only the structure keywords are interpreted here (SIMPLE, BITPIX, NAXISn, PCOUNT,
GCOUNT, XTENSION, EXTNAME, TFIELDS, TTYPEn, TFORMn and the scaling keywords whose
presence disables the fast path); all other keywords are left to the caller.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

CARD = 80
BLOCK = 2880
#: Headers longer than this many 2880-byte blocks are left to astropy.
MAX_HEADER_BLOCKS = 64
_END_CARD = b"END" + b" " * 77
_IMAGE_DTYPES = {-32: ">f4", -64: ">f8"}
#: TFORM type codes decoded here (fixed-length numeric vectors) and their numpy types.
_TFORM_DTYPES = {"E": ">f4", "D": ">f8", "J": ">i4", "I": ">i2", "K": ">i8", "B": "u1"}
_TFORM = re.compile(r"^\s*(\d*)\s*([EDJIKB])\s*$")
#: Keywords that change how stored values map to data values: their presence hands the
#: HDU to astropy.
_SCALING_PREFIXES = ("BSCALE", "BZERO", "BLANK", "TSCAL", "TZERO", "TNULL", "TDIM", "THEAP", "ZIMAGE", "GROUPS")


def header_end(data: bytes, offset: int) -> int | None:
    """Byte offset just past the last block of the header starting at ``offset``.

    Parameters
    ----------
    data : bytes
        The whole FITS file.
    offset : int
        Byte offset of the header (a multiple of 2880).

    Returns
    -------
    int or None
        Where the header's data unit starts; None when no valid END card (``END`` and 77
        blanks, on a card boundary) is found within :data:`MAX_HEADER_BLOCKS` blocks.
    """
    limit = min(len(data), offset + MAX_HEADER_BLOCKS * BLOCK)
    position = offset
    while True:
        found = data.find(_END_CARD, position, limit)
        if found < 0:
            return None
        if (found - offset) % CARD == 0:
            return offset + -(-(found + CARD - offset) // BLOCK) * BLOCK
        position = found + 1


def header_cards(data: bytes, offset: int) -> tuple[dict[str, str], int] | None:
    """Raw value fields of the header starting at ``offset``, and where its data unit starts.

    Returns
    -------
    (dict, int) or None
        ``{keyword: value field}`` for the first occurrence of each ``KEYWORD = value``
        card, and :func:`header_end`; None when the header has no valid END card.
    """
    end = header_end(data, offset)
    if end is None:
        return None
    text = data[offset:end].decode("ascii", errors="replace")
    cards: dict[str, str] = {}
    for start in range(0, len(text), CARD):
        card = text[start:start + CARD]
        if card.rstrip() == "END":
            break
        if card[8:10] == "= ":
            keyword = card[:8].rstrip()
            if keyword not in cards:
                cards[keyword] = card[10:]
    return cards, end


def _value(cards: dict[str, str], key: str) -> Any:
    """A structure keyword's value: int, bool, or a quoted string (None when absent or odd)."""
    field = cards.get(key)
    if field is None:
        return None
    if field.lstrip().startswith("'"):
        text = field.lstrip()[1:]
        closing = text.find("'")
        while closing >= 0 and text[closing + 1:closing + 2] == "'":
            closing = text.find("'", closing + 2)
        return None if closing < 0 else text[:closing].replace("''", "'").rstrip()
    token = field.split("/", 1)[0].strip()
    if token in ("T", "F"):
        return token == "T"
    if re.fullmatch(r"[+-]?\d+", token):
        return int(token)
    return None


def _has_scaling(cards: dict[str, str]) -> bool:
    return any(key.startswith(_SCALING_PREFIXES) for key in cards)


def _padded(n_bytes: int) -> int:
    return -(-n_bytes // BLOCK) * BLOCK


def _only_padding_after(data: bytes, position: int) -> bool:
    """True when nothing but zero padding (or nothing) follows ``position``."""
    return position >= len(data) or not data[position:].strip(b"\x00")


def decode_primary_image(data: bytes, cards: dict[str, str], data_start: int) -> np.ndarray | None:
    """The primary HDU's 2-D IEEE float image, shape (NAXIS2, NAXIS1), or None.

    None unless BITPIX is -32 or -64, NAXIS is 2 with positive NAXIS1 and NAXIS2, no
    scaling keyword is present, the data unit is complete and no other HDU follows it.
    The returned array is a read-only view of ``data`` in big-endian byte order.
    """
    if _value(cards, "SIMPLE") is not True or _has_scaling(cards):
        return None
    bitpix, naxis = _value(cards, "BITPIX"), _value(cards, "NAXIS")
    n_pix, n_rows = _value(cards, "NAXIS1"), _value(cards, "NAXIS2")
    if bitpix not in _IMAGE_DTYPES or naxis != 2 or type(n_pix) is not int or type(n_rows) is not int:
        return None
    if n_pix <= 0 or n_rows <= 0 or n_pix * n_rows > 10**8:
        return None
    if _value(cards, "PCOUNT") not in (None, 0) or _value(cards, "GCOUNT") not in (None, 1):
        return None
    n_bytes = n_pix * n_rows * abs(bitpix) // 8
    if data_start + n_bytes > len(data) or not _only_padding_after(data, data_start + _padded(n_bytes)):
        return None
    return np.frombuffer(data, dtype=_IMAGE_DTYPES[bitpix], count=n_pix * n_rows, offset=data_start).reshape(
        n_rows, n_pix)


def decode_single_row_table(
    data: bytes, cards: dict[str, str], data_start: int, extname: str
) -> dict[str, np.ndarray] | None:
    """The row of a one-row BINTABLE extension named ``extname``, as {TTYPE: 1-D array}, or None.

    None unless the primary header (``cards``) has NAXIS = 0 and no scaling, the first
    extension is a BINTABLE named ``extname`` (case-insensitive) with one row, no heap,
    GCOUNT 1, only fixed-length E/D/J/I/K/B columns with distinct non-empty names and no
    scaling keywords, whose widths add up to NAXIS1; its data unit is complete and no
    other HDU follows. Arrays are read-only big-endian views of ``data``.
    """
    if _value(cards, "SIMPLE") is not True or _value(cards, "NAXIS") != 0 or _has_scaling(cards):
        return None
    parsed = header_cards(data, data_start)
    if parsed is None:
        return None
    ext, table_start = parsed
    if _value(ext, "XTENSION") != "BINTABLE" or _has_scaling(ext):
        return None
    name = _value(ext, "EXTNAME")
    if not isinstance(name, str) or name.strip().upper() != extname.upper():
        return None
    row_bytes, n_rows, n_fields = _value(ext, "NAXIS1"), _value(ext, "NAXIS2"), _value(ext, "TFIELDS")
    if (_value(ext, "BITPIX") != 8 or _value(ext, "NAXIS") != 2 or n_rows != 1
            or _value(ext, "PCOUNT") != 0 or _value(ext, "GCOUNT") != 1):
        return None
    if type(row_bytes) is not int or type(n_fields) is not int or not 0 < n_fields <= 999 or row_bytes <= 0:
        return None
    names, formats = [], []
    for index in range(1, n_fields + 1):
        column, form = _value(ext, f"TTYPE{index}"), _value(ext, f"TFORM{index}")
        match = _TFORM.match(form) if isinstance(form, str) else None
        if not isinstance(column, str) or not column.strip() or match is None:
            return None
        repeat = int(match.group(1) or 1)
        if repeat < 1:
            return None
        names.append(column.strip().upper())
        formats.append((_TFORM_DTYPES[match.group(2)], (repeat,)) if repeat > 1 else _TFORM_DTYPES[match.group(2)])
    if len(set(names)) != len(names):
        return None
    dtype = np.dtype({"names": names, "formats": formats})
    if dtype.itemsize != row_bytes:
        return None
    if table_start + row_bytes > len(data) or not _only_padding_after(data, table_start + _padded(row_bytes)):
        return None
    record = np.frombuffer(data, dtype=dtype, count=1, offset=table_start)[0]
    return {column: np.atleast_1d(record[column]) for column in names}
