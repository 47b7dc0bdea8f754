"""Fuzzing the LAMOST reader with hypothesis: any file gives a correct read or a clear rejection.

Every property starts from a real LAMOST file of each low-resolution layout (DR1 5-row image
without a wavelength row, DR7 5-row image with a wavelength row, DR9 ``COADD`` binary
table), mutates it (header cards, structure, bytes, gzip stream) and checks that
:func:`read_lamost_spectrum` either

* returns a :class:`LamostSpectrum` whose arrays are consistent (same lengths, float32
  flux/ivar with ``ivar >= 0`` finite and ``ivar > 0`` only where the flux is finite,
  float64 finite strictly increasing wavelength, uint16 masks, a well-formed spectrum id),
  and, where the mutation has a known effect, the right values; or
* raises :class:`LamostReadError` whose message names the file and gives a reason.

Any other exception fails the test, as do a hang (hypothesis deadline, plus a SIGALRM guard
for loops that never return) and a large memory allocation (peak traced by ``tracemalloc``,
which sees numpy and Python buffers). Set ``LAMOST_FUZZ_EXAMPLES`` to run more examples.
"""
from __future__ import annotations

import contextlib
import gzip
import io
import math
import os
import re
import signal
import tempfile
import threading
import tracemalloc
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import HealthCheck, example, given, settings, strategies as st

from lamost_mdwarf.io.lamost_fits import LamostReadError, LamostSpectrum, read_lamost_spectrum

SOURCE_FILES = {
    "dr1": "dr1_original/spec-55862-B6212_sp06-099.fits",
    "dr7": "later_releases/spec-55859-F5902_sp01-001_dr7.fits.gz",
    "dr9": "later_releases/spec-55859-F5902_sp01-001_dr9.fits.gz",
}
IMAGE_SOURCES = ("dr1", "dr7")

#: Examples per property (moderate by default so the whole file stays fast).
N_EXAMPLES = int(os.environ.get("LAMOST_FUZZ_EXAMPLES", "100"))
FUZZ_SETTINGS = settings(
    max_examples=N_EXAMPLES,
    deadline=2000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: Largest peak of traced allocations allowed while reading one (small) mutated file.
MAX_PEAK_BYTES = 16 * 2**20
#: Hard wall-clock limit per read; the hypothesis deadline cannot interrupt a real hang.
HANG_SECONDS = 20.0

SPECTRUM_ID_RE = re.compile(r"^\d+-[!-~]+_sp\d{2,}-\d{3,}$")
BLOCK = 2880
CARD = 80


# --------------------------------------------------------------------------- sources


class Source:
    """One real file, decompressed, with its HDU header spans and its correct read.

    A plain class (not a dataclass) so that hypothesis failure reports print a short repr.
    """

    def __init__(self, key: str, name: str, raw: bytes, fits_bytes: bytes, gzipped: bool,
                 headers: tuple[tuple[int, int], ...], spectrum: LamostSpectrum) -> None:
        self.key = key
        self.name = name  #: original file name (with .gz when compressed)
        self.raw = raw  #: bytes of the file as stored
        self.fits_bytes = fits_bytes  #: decompressed FITS bytes
        self.gzipped = gzipped
        self.headers = headers  #: (first card index, END card index) per HDU
        self.spectrum = spectrum  #: the reader's result on the unmodified file

    def __repr__(self) -> str:
        return f"<Source {self.key}: {self.name}>"

    @property
    def plain_name(self) -> str:
        return self.name[:-3] if self.gzipped else self.name


class Sources:
    """The source files by key, with a short repr for hypothesis reports."""

    def __init__(self, items: dict[str, Source]) -> None:
        self._items = items

    def __getitem__(self, key: str) -> Source:
        return self._items[key]

    def values(self):
        return self._items.values()

    def __repr__(self) -> str:
        return f"<Sources {sorted(self._items)}>"


def header_spans(raw: bytes) -> tuple[tuple[int, int], ...]:
    """(first card, END card) indices of each HDU of a well-formed FITS file."""
    spans = []
    pos = 0
    while pos + BLOCK <= len(raw):
        start = pos // CARD
        card = start
        while raw[card * CARD:card * CARD + 8] != b"END     ":
            card += 1
        header = fits.Header.fromstring(raw[pos:(card + 1) * CARD].decode("ascii"))
        spans.append((start, card))
        header_end = -(-(card + 1) * CARD // BLOCK) * BLOCK
        naxis = header.get("NAXIS", 0)
        size = 0
        if naxis:
            size = abs(header["BITPIX"]) // 8 * math.prod(header[f"NAXIS{i}"] for i in range(1, naxis + 1))
            size = (size + header.get("PCOUNT", 0)) * header.get("GCOUNT", 1)
        pos = header_end + -(-size // BLOCK) * BLOCK
    return tuple(spans)


@pytest.fixture(scope="session")
def sources(real_lamost_dir: Path) -> Sources:
    """The three real source files (one per layout), loaded once."""
    out = {}
    for key, rel in SOURCE_FILES.items():
        path = real_lamost_dir / rel
        raw = path.read_bytes()
        gzipped = path.name.endswith(".gz")
        fits_bytes = gzip.decompress(raw) if gzipped else raw
        out[key] = Source(key, path.name, raw, fits_bytes, gzipped, header_spans(fits_bytes),
                          read_lamost_spectrum(path))
    return Sources(out)


# --------------------------------------------------------------------------- the oracle


class ReaderHang(BaseException):
    """Raised by :func:`hang_guard`; a BaseException so that the reader cannot swallow it."""


@contextlib.contextmanager
def hang_guard(seconds: float) -> Iterator[None]:
    """Raise :class:`ReaderHang` in the main thread if the block runs longer than ``seconds``."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def _fire(signum: int, frame: Any) -> None:
        raise ReaderHang(f"reader still running after {seconds} s (hang)")

    previous = signal.signal(signal.SIGALRM, _fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def traced_peak() -> Iterator[Callable[[], int]]:
    """Yield a function giving the peak traced allocation (bytes) inside the block."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    peak = [0]
    try:
        yield lambda: peak[0]
    finally:
        peak[0] = tracemalloc.get_traced_memory()[1] - base
        if started:
            tracemalloc.stop()


def check_spectrum(spec: LamostSpectrum, path: Path) -> None:
    """A successful read must be internally consistent."""
    assert isinstance(spec, LamostSpectrum)
    n = spec.flux.shape[0] if spec.flux.ndim == 1 else -1
    assert n >= 2, f"{path.name}: {n} pixels"
    for name in ("wavelength", "flux", "ivar", "andmask", "ormask"):
        arr = getattr(spec, name)
        assert isinstance(arr, np.ndarray) and arr.shape == (n,), (name, getattr(arr, "shape", None))
    assert spec.flux.dtype == np.float32 and spec.ivar.dtype == np.float32
    assert spec.wavelength.dtype == np.float64
    assert spec.andmask.dtype == np.uint16 and spec.ormask.dtype == np.uint16
    assert np.all(np.isfinite(spec.wavelength)) and np.all(np.diff(spec.wavelength) > 0)
    assert 1000.0 < spec.wavelength[0]
    assert np.all(np.isfinite(spec.ivar)) and np.all(spec.ivar >= 0), "ivar must be finite and >= 0"
    assert np.all(np.isfinite(spec.flux[spec.ivar > 0])), "a pixel with ivar > 0 has a non-finite flux"
    meta = spec.meta
    assert isinstance(spec.spectrum_id, str) and SPECTRUM_ID_RE.match(spec.spectrum_id), spec.spectrum_id
    assert meta["n_pixels"] == n
    assert meta["layout"] in ("dr1_image", "image", "coadd_table")
    assert math.isfinite(meta["ra"]) and 0 <= meta["ra"] <= 360
    assert math.isfinite(meta["dec"]) and -90 <= meta["dec"] <= 90
    for key in ("z", "z_err", "snr_u", "snr_g", "snr_r", "snr_i", "snr_z", "snr_lambda"):
        assert isinstance(meta[key], float), key
    assert isinstance(meta["obsid"], int)
    for key in ("class", "subclass", "designation", "data_release", "planid"):
        assert isinstance(meta[key], str), key


def read_outcome(path: Path) -> LamostSpectrum | LamostReadError:
    """Read ``path``; return the spectrum or the LamostReadError, fail on anything else."""
    with hang_guard(HANG_SECONDS), traced_peak() as peak:
        try:
            outcome: LamostSpectrum | LamostReadError = read_lamost_spectrum(path)
        except LamostReadError as exc:
            outcome = exc
    assert peak() < MAX_PEAK_BYTES, f"reading {path.name} allocated {peak() / 2**20:.0f} MiB"
    if isinstance(outcome, LamostReadError):
        assert path.name in str(outcome), f"message does not name the file: {outcome}"
        assert outcome.reason.strip(), "empty reason"
        assert "MemoryError" not in outcome.reason, f"a huge allocation was attempted: {outcome}"
        # The reader's catch-all for exceptions nobody anticipated: a fuzzing find, not a clear reason.
        assert "unexpected error" not in outcome.reason, f"unanticipated exception: {outcome}"
    else:
        check_spectrum(outcome, path)
    return outcome


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    # hypothesis and the function-scoped tmp_path fixture do not mix: one directory per example.
    with tempfile.TemporaryDirectory(prefix="lamost_fuzz_") as tmp:
        yield Path(tmp)


def write_and_read(name: str, data: bytes) -> LamostSpectrum | LamostReadError:
    with scratch_dir() as tmp:
        path = tmp / name
        path.write_bytes(data)
        return read_outcome(path)


def hdul_bytes(hdul: fits.HDUList) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hdul.writeto(buffer, output_verify="silentfix")
    return buffer.getvalue()


def assert_same_arrays(a: LamostSpectrum, b: LamostSpectrum) -> None:
    for name in ("wavelength", "flux", "ivar", "andmask", "ormask"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


# --------------------------------------------------------------------------- header cards

#: Keywords whose change cannot alter the arrays (only metadata or the spectrum id).
METADATA_KEYS = (
    "LMJD", "PLANID", "SPID", "FIBERID", "RA", "DEC", "Z", "Z_ERR", "DATA_V", "OBSID",
    "SN_U", "SN_G", "SN_R", "SN_I", "SN_Z", "SNRU", "SNRG", "SNRR", "SNRI", "SNRZ",
    "CLASS", "SUBCLASS", "DESIG",
)
#: Keywords that change how the arrays are found or interpreted.
STRUCTURAL_KEYS = (
    "COEFF0", "COEFF1", "EXTEN0", "NAXIS", "NAXIS1", "NAXIS2", "BITPIX", "BZERO", "BSCALE",
    "PCOUNT", "GCOUNT", "TFIELDS", "TFORM1", "TFORM2", "TFORM3", "TTYPE1", "TTYPE2", "TTYPE3",
    "EXTNAME", "XTENSION", "SIMPLE", "EXTEND", "END",
)
ODD_LITERALS = (
    "'abc'", "''", "'   '", "NaN", "nan", "inf", "-inf", "'NaN'", "'inf'", "-1", "0", "1", "2",
    "3", "5", "6", "-5", "-9999", "-9999.0", "1E300", "-1E300", "1E999", "-1E999", "1E-320",
    "99999999999999999999999", "2147483648", "9223372036854775808", "-9223372036854775809",
    "T", "F", "1.5", "3.5682", "1E-4", "(1.0, 2.0)", "garbage", "'3908E'", "'E'", "'1PE(3908)'",
    "'3908D'", "'3908C'", "'3908A'", "'3908I'", "'0E'", "'BINTABLE'", "'IMAGE'", "'COADD'",
    "'COADD_B'", "'Flux, Inverse, Wavelength, Andmask, Ormask'", "'B6\xe912'", "'B6\x0012'", "'B6\t12'",
    "'Flux Inverse Subcontinuum Andmask Ormask'", "'LAMOST DR9'", "'dM5'", "'a/b'", "'a b'",
)
BIG_COUNTS = (0, 1, 2, 3, 4, 6, 100, 93792, 10**6, 10**9, 2**31, 10**12, 2**62, -1, -5, -93792)

literal_values = st.one_of(
    st.sampled_from(ODD_LITERALS),
    st.sampled_from(BIG_COUNTS).map(str),
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda x: f"{x:.6E}"),
    st.text(st.characters(min_codepoint=32, max_codepoint=126, exclude_characters="'"), max_size=18)
    .map(lambda s: f"'{s}'"),
)


def card(key: str, literal: str) -> bytes:
    """One 80-byte header card ``KEY     = literal`` (literal as written, not validated)."""
    text = f"{key:<8}= {literal:>20}" if len(literal) <= 20 else f"{key:<8}= {literal}"
    return text[:CARD].ljust(CARD).encode("latin-1")  # latin-1: odd literals may hold non-ASCII bytes


def find_card(raw: bytes, span: tuple[int, int], key: str) -> int | None:
    target = key.encode("ascii").ljust(8)
    for index in range(span[0], span[1] + 1):
        if raw[index * CARD:index * CARD + 8] == target:
            return index
    return None


def mutate_cards(src: Source, ops: list[tuple[str, int, str, str]]) -> bytearray:
    """Apply (action, hdu, key, literal) operations to the raw header cards of ``src``.

    ``delete`` blanks the card; ``set`` overwrites it (or, for an absent key, overwrites a
    blank card of that header, else the card before END).
    """
    raw = bytearray(src.fits_bytes)
    for action, hdu, key, literal in ops:
        span = src.headers[hdu % len(src.headers)]
        index = find_card(bytes(raw), span, key)
        if action == "delete":
            if index is not None:
                raw[index * CARD:(index + 1) * CARD] = b" " * CARD
            continue
        if index is None:
            blank = [i for i in range(span[0], span[1]) if raw[i * CARD:(i + 1) * CARD] == b" " * CARD]
            index = blank[0] if blank else span[1] - 1
        raw[index * CARD:(index + 1) * CARD] = card(key, literal)
    return raw


card_ops = st.lists(
    st.tuples(
        st.sampled_from(["delete", "set", "set"]),
        st.integers(0, 1),
        st.sampled_from(METADATA_KEYS + STRUCTURAL_KEYS),
        literal_values,
    ),
    min_size=1,
    max_size=6,
)


def _output(src: Source, fits_bytes: bytes, compress: bool, keep_name: bool) -> tuple[str, bytes]:
    name = src.plain_name if keep_name else "mutated_spectrum.fits"
    if compress:
        return name + ".gz", gzip.compress(fits_bytes, compresslevel=1)
    return name, fits_bytes


@FUZZ_SETTINGS
@given(key=st.sampled_from(sorted(SOURCE_FILES)), ops=card_ops, compress=st.booleans(), keep_name=st.booleans())
@example(key="dr1", ops=[("set", 0, "NAXIS2", "-5")], compress=True, keep_name=True)  # hang (gzip seek back)
@example(key="dr1", ops=[("set", 0, "NAXIS2", "50000000")], compress=True, keep_name=True)  # huge allocation
@example(key="dr9", ops=[("set", 1, "NAXIS2", "-1")], compress=True, keep_name=True)
@example(key="dr9", ops=[("set", 1, "TFORM1", "'1PE(900000000)'")], compress=False, keep_name=True)
@example(key="dr9", ops=[("set", 1, "TFORM1", "'E'"), ("set", 1, "TFORM2", "'E'")], compress=False, keep_name=True)
@example(key="dr1", ops=[("set", 0, "LMJD", "99999999999999999999999"), ("set", 0, "RA", "1E999")],
         compress=False, keep_name=True)
@example(key="dr7", ops=[("set", 0, "PLANID", "'a b'")], compress=False, keep_name=True)
@example(key="dr1", ops=[("set", 0, "PLANID", "'B6\xe912'")], compress=False, keep_name=True)  # id 'B6\ufffd12'
@example(key="dr1", ops=[("set", 0, "PLANID", "'B6\x0012'")], compress=False, keep_name=True)  # NUL in the id
@example(key="dr9", ops=[("set", 1, "TTYPE1", "-1")], compress=False, keep_name=False)  # AssertionError
@example(key="dr9", ops=[("delete", 1, "TTYPE1", "")], compress=False, keep_name=False)  # AttributeError
@example(key="dr1", ops=[("set", 0, "LMJD", "garbage")], compress=False, keep_name=False)  # VerifyError
@example(key="dr1", ops=[("set", 0, "NAXIS", "73621853")], compress=True, keep_name=True)  # minutes-long loop
@example(key="dr1", ops=[("set", 0, "NAXIS1", "2880"), ("set", 0, "NAXIS2", "-1")], compress=False,
         keep_name=True)  # endless re-reading of the primary header
def test_header_card_mutations(sources, key, ops, compress, keep_name):
    """Delete header cards or overwrite them with raw literals (NaN, inf, huge or negative
    counts, strings for numbers, booleans, non-ASCII bytes), in the primary and the table
    header, including the structural keywords (NAXISn, BITPIX, PCOUNT, TFORMn, END, ...)."""
    src = sources[key]
    raw = mutate_cards(src, ops)
    name, data = _output(src, bytes(raw), compress, keep_name)
    outcome = write_and_read(name, data)
    touched = {op[2] for op in ops}
    if isinstance(outcome, LamostSpectrum) and touched <= set(METADATA_KEYS):
        # Only metadata changed: a successful read has exactly the original arrays.
        assert_same_arrays(outcome, src.spectrum)
        assert outcome.meta["layout"] == src.spectrum.meta["layout"]


# --------------------------------------------------------------------------- astropy-level keyword edits

KEYWORD_VALUES = st.one_of(
    st.sampled_from(["", " ", "abc", "nan", "-9999", True, False, -1, 0, -9999, -9999.0, 1e300, -1e300,
                     2**62, 1.5, 7, 99, 999999, "M0", "dM5", "LAMOST DR7"]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(-(2**63), 2**63 - 1),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20),
)


@FUZZ_SETTINGS
@given(
    key=st.sampled_from(sorted(SOURCE_FILES)),
    edits=st.lists(
        st.tuples(st.sampled_from(METADATA_KEYS + ("COEFF0", "COEFF1", "EXTEN0")), st.none() | KEYWORD_VALUES),
        min_size=1,
        max_size=6,
    ),
    keep_name=st.booleans(),
)
def test_keyword_values(sources, key, edits, keep_name):
    """Delete keywords or give them odd (but FITS-legal) values through astropy."""
    src = sources[key]
    with fits.open(io.BytesIO(src.fits_bytes)) as hdul:
        hdul = fits.HDUList([hdu.copy() for hdu in hdul])
    header = hdul[0].header
    for keyword, value in edits:
        if value is None:
            header.remove(keyword, ignore_missing=True, remove_all=True)
        else:
            header[keyword] = value
    name, data = _output(src, hdul_bytes(hdul), src.gzipped, keep_name)
    outcome = write_and_read(name, data)
    if isinstance(outcome, LamostSpectrum):
        touched = {k for k, _ in edits}
        if touched <= set(METADATA_KEYS):
            assert_same_arrays(outcome, src.spectrum)
        final = {k: header.get(k) for k in touched}
        if "RA" in final:
            assert outcome.meta["ra"] == pytest.approx(float(final["RA"]))
        if "Z" in final and isinstance(final["Z"], (int, float)) and not isinstance(final["Z"], bool):
            z = float(final["Z"])
            if math.isfinite(z) and z not in (-9999.0, -999.0, -99.0):
                assert outcome.meta["z"] == pytest.approx(z, rel=1e-12)  # astropy writes ~16 digits
    else:
        # With all identity keywords present and valid and a valid position, the file must read.
        limits = (("LMJD", 999_999), ("SPID", 99), ("FIBERID", 9_999))
        ident_ok = all(_plausible_int(header.get(k), high) for k, high in limits)
        planid = header.get("PLANID")
        ident_ok &= isinstance(planid, str) and re.fullmatch(r"[A-Za-z0-9]+", planid.strip()) is not None
        position_ok = all(_in_range(header.get(k), lo, hi) for k, lo, hi in (("RA", 0, 360), ("DEC", -90, 90)))
        coeff_ok = _in_range(header.get("COEFF0"), 3.5, 3.7) and _in_range(header.get("COEFF1"), 9e-5, 1.1e-4)
        exten_ok = header.get("EXTEN0") == src_header_value(src, "EXTEN0")
        if ident_ok and position_ok and coeff_ok and exten_ok:
            pytest.fail(f"a file with valid identity, position and wavelength keywords was rejected: {outcome}")


def src_header_value(src: Source, key: str) -> Any:
    return fits.Header.fromstring(src.fits_bytes[: (src.headers[0][1] + 1) * CARD].decode("ascii")).get(key)


def _plausible_int(value: Any, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= high


def _in_range(value: Any, lo: float, hi: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi


# --------------------------------------------------------------------------- byte-level damage

byte_flips = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8)


def _flip(raw: bytes, flips: list[tuple[float, int]], limit: int) -> bytes:
    out = bytearray(raw)
    for where, value in flips:
        out[int(where * min(limit, len(out)))] = value
    return bytes(out)


@FUZZ_SETTINGS
@given(
    key=st.sampled_from(sorted(SOURCE_FILES)),
    mode=st.sampled_from(["truncate_stored", "truncate_then_gzip", "truncate_plain", "flip_header",
                          "flip_anywhere", "flip_stored", "append"]),
    where=st.floats(0, 1, exclude_max=True),
    flips=byte_flips,
    tail=st.binary(min_size=1, max_size=3000),
)
@example(key="dr9", mode="truncate_stored", where=0.5, flips=[(0.0, 0)], tail=b"x")
@example(key="dr7", mode="truncate_then_gzip", where=0.9, flips=[(0.0, 0)], tail=b"x")
@example(key="dr1", mode="truncate_plain", where=0.999, flips=[(0.0, 0)], tail=b"x")
def test_byte_damage(sources, key, mode, where, flips, tail):
    """Truncation at any offset (stored, gzip of a truncated FITS), random byte changes, trailing junk."""
    src = sources[key]
    plain, stored = src.fits_bytes, src.raw
    if mode == "truncate_stored":
        name, data = src.name, stored[: int(where * len(stored))]
    elif mode == "truncate_then_gzip":
        name, data = src.plain_name + ".gz", gzip.compress(plain[: int(where * len(plain))], compresslevel=1)
    elif mode == "truncate_plain":
        name, data = src.plain_name, plain[: int(where * len(plain))]
    elif mode == "flip_header":
        header_bytes = -(-(src.headers[-1][1] + 1) * CARD // BLOCK) * BLOCK
        name, data = src.plain_name, _flip(plain, flips, header_bytes)
    elif mode == "flip_anywhere":
        name, data = _output(src, _flip(plain, flips, len(plain)), where < 0.5, True)
    elif mode == "flip_stored":
        name, data = src.name, _flip(stored, flips, len(stored))
    else:  # append junk after the last HDU
        name, data = _output(src, plain + tail, where < 0.5, True)
    outcome = write_and_read(name, data)
    if mode.startswith("truncate") and isinstance(outcome, LamostSpectrum):
        # A truncated file can only read if nothing of the data was cut (trailing padding).
        assert_same_arrays(outcome, src.spectrum)


# --------------------------------------------------------------------------- structural edits: images


def assert_wavelength_from_row(wavelength: np.ndarray, row: np.ndarray) -> None:
    """A read wavelength equals the stored row (float32 precision) wherever the row is finite.

    The reader may replace the row by the exact log-linear solution of the header when the
    row reproduces it, which also fills the odd non-finite pixel; it must not invent a grid
    the row contradicts.
    """
    row = np.asarray(row, dtype=np.float64)[: wavelength.size]
    assert row.size == wavelength.size
    finite = np.isfinite(row)
    np.testing.assert_allclose(wavelength[finite], row[finite], rtol=1e-5)


def _cast(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        with np.errstate(invalid="ignore"):  # int64's max is not exact in float64
            return np.clip(np.rint(np.nan_to_num(arr)), info.min, info.max).astype(dtype)
    return arr.astype(dtype)


@FUZZ_SETTINGS
@given(
    key=st.sampled_from(IMAGE_SOURCES),
    n_rows=st.sampled_from([1, 2, 3, 4, 5, 5, 6]),
    n_pix=st.sampled_from([1, 2, 3, 50, None, None]),
    dtype=st.sampled_from(["float32", "float32", "float64", "int16", "int32", "uint8", "uint16", "int64"]),
    specials=st.lists(
        st.tuples(st.integers(0, 5), st.floats(0, 1, exclude_max=True),
                  st.sampled_from([np.nan, np.inf, -np.inf, 0.0, -1.0, 1e30, -1e30])),
        max_size=6,
    ),
    wave_damage=st.sampled_from([None, None, "swap", "reverse", "constant"]),
    compress=st.booleans(),
)
@example(key="dr7", n_rows=5, n_pix=None, dtype="float32", specials=[(1, 0.5, np.nan), (0, 0.3, np.inf)],
         wave_damage=None, compress=False)
@example(key="dr7", n_rows=5, n_pix=None, dtype="float64", specials=[(1, 0.5, -1.0), (0, 0.1, 1e30)],
         wave_damage=None, compress=False)
@example(key="dr1", n_rows=5, n_pix=1, dtype="float32", specials=[], wave_damage=None, compress=False)
def test_image_structure(sources, key, n_rows, n_pix, dtype, specials, wave_damage, compress):
    """Wrong row counts, pixel counts and dtypes; NaN/inf values; a non-monotonic wavelength row."""
    src = sources[key]
    with fits.open(io.BytesIO(src.fits_bytes)) as hdul:
        header = hdul[0].header.copy()
        data = np.array(hdul[0].data, dtype=np.float64)
    if n_rows > data.shape[0]:
        data = np.vstack([data, np.zeros((n_rows - data.shape[0], data.shape[1]))])
    data = data[:n_rows, :n_pix]
    for row, where, value in specials:
        data[row % n_rows, int(where * data.shape[1])] = value
    has_wave_row = key == "dr7" and n_rows >= 3
    if has_wave_row and wave_damage == "swap" and data.shape[1] >= 2:
        middle = data.shape[1] // 2
        data[2, [middle - 1, middle]] = data[2, [middle, middle - 1]]
    elif has_wave_row and wave_damage == "reverse":
        data[2] = data[2, ::-1]
    elif has_wave_row and wave_damage == "constant":
        data[2] = 5000.0
    array = _cast(data, np.dtype(dtype))
    for k in ("BZERO", "BSCALE"):
        header.remove(k, ignore_missing=True)
    name, blob = _output(src, hdul_bytes(fits.HDUList([fits.PrimaryHDU(data=array, header=header)])), compress, True)
    outcome = write_and_read(name, blob)
    if isinstance(outcome, LamostReadError):
        return
    with np.errstate(over="ignore", invalid="ignore"):
        expected = array.astype(np.float64)
        flux, ivar = expected[0].astype(np.float32), expected[1].astype(np.float32)
    np.testing.assert_array_equal(outcome.flux, flux)
    good = np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0)
    np.testing.assert_array_equal(outcome.ivar, np.where(good, ivar, 0).astype(np.float32))
    if n_rows >= 5:
        assert np.array_equal(outcome.andmask, np.clip(np.nan_to_num(expected[3], posinf=0, neginf=0), 0, 65535)
                              .round().astype(np.uint16))
    else:
        assert not outcome.andmask.any() and not outcome.ormask.any()
    if key == "dr7":
        assert outcome.meta["layout"] == "image"
        # the stored row, or the exact header solution where the row reproduces it
        assert_wavelength_from_row(outcome.wavelength, expected[2])
    else:
        assert outcome.meta["layout"] == "dr1_image"
        np.testing.assert_allclose(outcome.wavelength, src.spectrum.wavelength[: outcome.flux.size], rtol=1e-12)


# --------------------------------------------------------------------------- structural edits: COADD tables

COLUMN_FORMATS = {"float32": "E", "float64": "D", "int16": "I", "int32": "J", "complex64": "C",
                  "complex128": "M", "bool": "L", "string": "A", "scalar": "E", "varlen": "PE()"}


@FUZZ_SETTINGS
@given(
    n_table_rows=st.sampled_from([0, 1, 1, 1, 2]),
    drop=st.sets(st.sampled_from(["FLUX", "IVAR", "WAVELENGTH", "ANDMASK", "ORMASK", "NORMALIZATION"]), max_size=3),
    changes=st.dictionaries(
        st.sampled_from(["FLUX", "IVAR", "WAVELENGTH", "ANDMASK", "ORMASK"]),
        st.tuples(st.sampled_from(sorted(COLUMN_FORMATS)), st.sampled_from([None, None, -1, -100, 5, 1])),
        max_size=3,
    ),
    specials=st.lists(
        st.tuples(st.sampled_from(["FLUX", "IVAR", "WAVELENGTH", "ANDMASK"]), st.floats(0, 1, exclude_max=True),
                  st.sampled_from([np.nan, np.inf, -np.inf, -1.0, 0.0, 1e30])),
        max_size=5,
    ),
    wave_damage=st.sampled_from([None, None, "swap", "reverse"]),
    extname=st.sampled_from(["COADD", "COADD", "coadd", "FLUX"]),
    compress=st.booleans(),
)
@example(n_table_rows=0, drop=set(), changes={}, specials=[], wave_damage=None, extname="COADD", compress=False)
@example(n_table_rows=2, drop=set(), changes={}, specials=[], wave_damage=None, extname="COADD", compress=False)
@example(n_table_rows=1, drop=set(), changes={"FLUX": ("complex64", None)}, specials=[], wave_damage=None,
         extname="COADD", compress=False)
@example(n_table_rows=1, drop=set(), changes={"FLUX": ("scalar", None), "IVAR": ("scalar", None),
                                             "WAVELENGTH": ("scalar", None)},
         specials=[], wave_damage=None, extname="COADD", compress=False)
@example(n_table_rows=1, drop=set(), changes={"IVAR": ("float32", -1)}, specials=[], wave_damage=None,
         extname="COADD", compress=False)
@example(n_table_rows=1, drop=set(), changes={"ANDMASK": ("complex128", None)}, specials=[], wave_damage=None,
         extname="COADD", compress=False)
@example(n_table_rows=1, drop=set(), changes={"ANDMASK": ("float32", -100)}, specials=[], wave_damage=None,
         extname="COADD", compress=False)  # masks of another length gave inconsistent arrays
def test_coadd_structure(sources, n_table_rows, drop, changes, specials, wave_damage, extname, compress):
    """COADD tables with 0 or 2 rows, missing columns, odd column types and lengths, NaN/inf."""
    src = sources["dr9"]
    with fits.open(io.BytesIO(src.fits_bytes)) as hdul:
        primary = hdul[0].header.copy()
        row = {col.name: np.array(hdul[1].data[col.name][0], dtype=np.float64) for col in hdul[1].columns}
    for col, where, value in specials:
        row[col][int(where * row[col].size)] = value
    if wave_damage == "swap":
        row["WAVELENGTH"][[10, 11]] = row["WAVELENGTH"][[11, 10]]
    elif wave_damage == "reverse":
        row["WAVELENGTH"] = row["WAVELENGTH"][::-1].copy()
    columns = []
    for name, values in row.items():
        if name in drop:
            continue
        kind, resize = changes.get(name, ("float32", None))
        if resize is not None:
            values = values[:resize] if resize < 0 else np.concatenate([values, np.ones(resize)])
        if kind == "scalar":
            values = values[:1]
        cells: Any
        if kind == "string":
            cells = np.array([" ".join(f"{v:.3g}" for v in values[:20])] * n_table_rows)
            fmt = f"{max(1, len(cells[0]) if n_table_rows else 1)}A"
        elif kind == "varlen":
            cells = np.array([values.astype(np.float32)] * n_table_rows, dtype=object)
            fmt = "PE()"
        else:
            dtype = {"bool": np.bool_}.get(kind, np.float32 if kind == "scalar" else kind)
            typed = values != 0 if kind == "bool" else _cast(values, np.dtype(dtype))
            cells = np.repeat(typed[None, :], n_table_rows, axis=0)
            fmt = f"{1 if kind == 'scalar' else typed.size}{COLUMN_FORMATS[kind]}"
            if kind == "scalar":
                cells = cells[:, 0]
        columns.append(fits.Column(name=name, format=fmt, array=cells))
    table = fits.BinTableHDU.from_columns(columns, name=extname, nrows=n_table_rows)
    hdul = fits.HDUList([fits.PrimaryHDU(header=primary), table])
    name, blob = _output(src, hdul_bytes(hdul), compress, True)
    outcome = write_and_read(name, blob)
    if isinstance(outcome, LamostReadError):
        return
    assert n_table_rows == 1 and "FLUX" not in drop and "IVAR" not in drop
    assert outcome.meta["layout"] == "coadd_table"
    assert changes.get("FLUX", ("float32",))[0] in ("float32", "float64", "int16", "int32", "varlen")
    flux = _cast(row["FLUX"], np.dtype(changes.get("FLUX", ("float32",))[0].replace("varlen", "float32")))
    resize = changes.get("FLUX", (None, None))[1]
    if resize is not None:
        flux = flux[:resize] if resize < 0 else np.concatenate([flux, np.ones(resize, flux.dtype)])
    np.testing.assert_array_equal(outcome.flux, flux.astype(np.float32))
    if "WAVELENGTH" not in drop:
        kind = changes.get("WAVELENGTH", ("float32",))[0]
        if kind in ("float32", "float64", "varlen"):
            assert_wavelength_from_row(outcome.wavelength, row["WAVELENGTH"].astype(np.float32))


# --------------------------------------------------------------------------- whole files


def _medium_resolution_like(src: Source) -> bytes:
    with fits.open(io.BytesIO(src.fits_bytes)) as hdul:
        primary = hdul[0].copy()
        blue, red = hdul[1].copy(), hdul[1].copy()
    blue.name, red.name = "COADD_B", "COADD_R"
    return hdul_bytes(fits.HDUList([primary, blue, red]))


@FUZZ_SETTINGS
@given(
    kind=st.sampled_from(["empty", "random", "random_fits_start", "random_gzip", "text", "empty_primary",
                          "primary_header_only", "medium_resolution", "cube", "coadd_image", "zero_blocks"]),
    blob=st.binary(max_size=6000),
    text=st.text(max_size=300),
    compress=st.booleans(),
)
@example(kind="empty", blob=b"", text="", compress=False)
@example(kind="random_fits_start", blob=b"\x00" * 3000, text="", compress=True)
def test_whole_file_garbage(sources, kind, blob, text, compress):
    """Empty, random, text, header-only, medium-resolution-like and otherwise wrong files."""
    src = sources["dr9"]
    name = "spec-55859-F5902_sp01-001.fits"
    expect: str | None = None
    if kind == "empty":
        data, expect = b"", "empty"
    elif kind == "random":
        data = blob
    elif kind == "random_fits_start":
        data = b"SIMPLE  =                    T" + blob
    elif kind == "random_gzip":
        data = gzip.compress(blob)
    elif kind == "text":
        data = text.encode("utf-8")
    elif kind == "empty_primary":
        data, expect = hdul_bytes(fits.HDUList([fits.PrimaryHDU()])), "no flux"
    elif kind == "primary_header_only":
        data = src.fits_bytes[: BLOCK * -(-(src.headers[0][1] + 1) * CARD // BLOCK)]
        expect = "no flux"
    elif kind == "medium_resolution":
        data, expect = _medium_resolution_like(src), "medium-resolution"
    elif kind == "cube":
        data = hdul_bytes(fits.HDUList([fits.PrimaryHDU(np.ones((2, 5, 100), np.float32))]))
    elif kind == "coadd_image":
        data = hdul_bytes(fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.ones((5, 100), np.float32), name="COADD")]))
    else:
        data = b"\x00" * BLOCK * 2
    if compress and kind not in ("empty", "random_gzip"):
        name, data = name + ".gz", gzip.compress(data, compresslevel=1)
    outcome = write_and_read(name, data)
    if kind != "random":  # random bytes cannot form a LAMOST file; the rest must be rejected too
        assert isinstance(outcome, LamostReadError), f"{kind} was read"
    else:
        assert isinstance(outcome, LamostReadError)
    if expect:
        assert expect in outcome.reason, outcome.reason


# --------------------------------------------------------------------------- regressions (plain tests)


def _setcard(src: Source, hdu: int, key: str, literal: str) -> bytes:
    return bytes(mutate_cards(src, [("set", hdu, key, literal)]))


@pytest.mark.parametrize("compress", [False, True])
def test_negative_data_size_does_not_hang(sources, compress):
    """Regression: a negative NAXIS2 made astropy seek back to the primary header and read it
    again forever (unbounded time and memory): NAXIS1=2880 NAXIS2=-1 BITPIX=-32 gives a data
    size of exactly minus the header size."""
    src = sources["dr1"]
    raw = bytes(mutate_cards(src, [("set", 0, "NAXIS1", "2880"), ("set", 0, "NAXIS2", "-1")]))
    name, data = _output(src, raw, compress, True)
    outcome = write_and_read(name, data)
    assert isinstance(outcome, LamostReadError)
    assert "negative data size" in outcome.reason and "NAXIS2=-1" in outcome.reason


@pytest.mark.parametrize("key,hdu,card_key,literal", [
    ("dr1", 0, "NAXIS2", "50000000"),
    ("dr1", 0, "NAXIS1", "2147483648"),
    ("dr9", 1, "NAXIS2", "1000000000"),
    ("dr9", 1, "PCOUNT", "900000000"),
])
@pytest.mark.parametrize("compress", [False, True])
def test_huge_sizes_rejected_without_allocating(sources, key, hdu, card_key, literal, compress):
    """Regression: a huge NAXIS in a .gz file made astropy try to allocate the declared size."""
    src = sources[key]
    name, data = _output(src, _setcard(src, hdu, card_key, literal), compress, True)
    outcome = write_and_read(name, data)
    assert isinstance(outcome, LamostReadError)
    assert "truncated" in outcome.reason or "size" in outcome.reason


def test_single_pixel_spectrum_rejected(sources):
    """Regression: a 1-pixel image or scalar COADD columns read as a 1-pixel spectrum."""
    src = sources["dr1"]
    with fits.open(io.BytesIO(src.fits_bytes)) as hdul:
        blob = hdul_bytes(fits.HDUList([fits.PrimaryHDU(hdul[0].data[:, :1], header=hdul[0].header)]))
    outcome = write_and_read(src.name, blob)
    assert isinstance(outcome, LamostReadError) and "pixel" in outcome.reason


def test_complex_flux_rejected(sources):
    """Regression: complex FLUX columns were silently cast to their real part."""
    src = sources["dr9"]
    with fits.open(io.BytesIO(src.fits_bytes)) as hdul:
        cols = [fits.Column(name=c.name, format="3908C" if c.name == "FLUX" else c.format,
                            array=hdul[1].data[c.name].astype(np.complex64) if c.name == "FLUX" else hdul[1].data[c.name])
                for c in hdul[1].columns]
        blob = hdul_bytes(fits.HDUList([hdul[0].copy(), fits.BinTableHDU.from_columns(cols, name="COADD")]))
    outcome = write_and_read(src.name, blob)
    assert isinstance(outcome, LamostReadError) and "complex" in outcome.reason


def test_nan_and_negative_ivar_masked(sources):
    """Regression: NaN/inf flux or ivar and negative ivar came out as 'good' pixels."""
    src = sources["dr7"]
    with fits.open(io.BytesIO(src.fits_bytes)) as hdul:
        data = hdul[0].data.copy()
        data[0, 100], data[1, 200], data[1, 300], data[1, 400] = np.nan, np.inf, -1.0, np.nan
        blob = hdul_bytes(fits.HDUList([fits.PrimaryHDU(data, header=hdul[0].header)]))
    spec = write_and_read(src.plain_name, blob)
    assert isinstance(spec, LamostSpectrum)
    assert np.isnan(spec.flux[100])
    assert spec.ivar[100] == spec.ivar[200] == spec.ivar[300] == spec.ivar[400] == 0
    assert np.count_nonzero(spec.ivar != src.spectrum.ivar) == 4


def test_absurd_identity_numbers_fall_back_to_file_name(sources):
    """Regression: LMJD = 99999999999999999999999 gave the id '99999999999999991611392-B6212_...'."""
    src = sources["dr1"]
    outcome = write_and_read(src.name, bytes(mutate_cards(src, [("set", 0, "LMJD", "99999999999999999999999"),
                                                               ("set", 0, "Z", "1E999")])))
    assert isinstance(outcome, LamostSpectrum) and outcome.spectrum_id == src.spectrum.spectrum_id
    assert math.isnan(outcome.meta["z"])
    unnamed = write_and_read("renamed.fits", bytes(mutate_cards(src, [("set", 0, "SPID", "123456")])))
    assert isinstance(unnamed, LamostReadError) and "SPID" in unnamed.reason


def test_unparsable_card_is_missing_not_a_crash(sources):
    """Regression: 'LMJD    = garbage' raised astropy's VerifyError out of the reader."""
    src = sources["dr1"]
    spec = write_and_read(src.name, _setcard(src, 0, "LMJD", "garbage"))
    assert isinstance(spec, LamostSpectrum) and spec.spectrum_id == src.spectrum.spectrum_id
    outcome = write_and_read("renamed.fits", _setcard(src, 0, "LMJD", "garbage"))
    assert isinstance(outcome, LamostReadError) and "LMJD" in outcome.reason
    exten = write_and_read(src.name, _setcard(src, 0, "EXTEN0", "garbage"))
    assert isinstance(exten, LamostReadError) and "EXTEN0" in exten.reason


@pytest.mark.parametrize("literal", ["'B6\xe912'", "'B6\x0012'", "'B6\x0712'"])
def test_planid_with_non_printable_characters_rejected(sources, literal):
    """Regression: a PLANID byte outside printable ASCII went into the spectrum id
    ('55862-B6\ufffd12_sp06-099', '55862-B6\x0012_sp06-099')."""
    src = sources["dr1"]
    outcome = write_and_read(src.name, _setcard(src, 0, "PLANID", literal))
    assert isinstance(outcome, LamostReadError) and "PLANID" in outcome.reason


def test_column_without_name_is_not_a_crash(sources):
    """Regression: a COADD column without TTYPEn raised AttributeError ('NoneType'.upper)."""
    src = sources["dr9"]
    outcome = write_and_read(src.plain_name, bytes(mutate_cards(src, [("delete", 1, "TTYPE1", "")])))
    assert isinstance(outcome, LamostReadError) and "FLUX" in outcome.reason
    # Regression: TTYPE1 = -1 (a number) raised astropy's AssertionError out of the reader.
    numbered = write_and_read(src.plain_name, _setcard(src, 1, "TTYPE1", "-1"))
    assert isinstance(numbered, LamostReadError)
    # An unnamed third column: a clear rejection (astropy cannot build the table) or a read.
    write_and_read(src.plain_name, bytes(mutate_cards(src, [("delete", 1, "TTYPE3", "")])))


@pytest.mark.parametrize("hdu,key,literal", [(0, "NAXIS", "73621853"), (1, "NAXIS", "73621853"),
                                             (1, "TFIELDS", "50000000")])
def test_huge_axis_or_column_count_rejected_fast(sources, hdu, key, literal):
    """Regression: NAXIS = 73621853 kept astropy looping over axes for minutes (a hang)."""
    src = sources["dr9"] if hdu else sources["dr1"]
    outcome = write_and_read(src.plain_name, _setcard(src, hdu, key, literal))
    assert isinstance(outcome, LamostReadError) and key in outcome.reason


def test_mask_of_other_length_rejected(sources):
    """Regression: an ANDMASK column shorter than FLUX gave a spectrum with arrays of different lengths."""
    src = sources["dr9"]
    with fits.open(io.BytesIO(src.fits_bytes)) as hdul:
        cols = [c if c.name != "ANDMASK" else fits.Column(name="ANDMASK", format="3000E",
                                                            array=hdul[1].data["ANDMASK"][:, :3000])
                for c in hdul[1].columns]
        blob = hdul_bytes(fits.HDUList([hdul[0].copy(), fits.BinTableHDU.from_columns(cols, name="COADD")]))
    outcome = write_and_read(src.plain_name, blob)
    assert isinstance(outcome, LamostReadError) and "andmask" in outcome.reason


def test_gzip_members_padding_and_trailing_garbage(sources):
    """A gzip file of two members reads like one; zero padding after the stream is ignored
    (as by :mod:`gzip`); other trailing bytes are a clear rejection."""
    src = sources["dr7"]
    half = len(src.fits_bytes) // 2
    two_members = gzip.compress(src.fits_bytes[:half]) + gzip.compress(src.fits_bytes[half:])
    for data in (two_members, src.raw + b"\x00" * 100):
        spec = write_and_read(src.name, data)
        assert isinstance(spec, LamostSpectrum)
        assert_same_arrays(spec, src.spectrum)
    outcome = write_and_read(src.name, src.raw + b"trailing junk")
    assert isinstance(outcome, LamostReadError) and "gzip" in outcome.reason


def test_reader_is_deterministic_on_the_sources(sources):
    """Sanity: the unmodified sources read (so every property really starts from a valid file)."""
    for src in sources.values():
        for name, data in ((src.name, src.raw), (src.plain_name, src.fits_bytes)):
            spec = write_and_read(name, data)
            assert isinstance(spec, LamostSpectrum)
            assert_same_arrays(spec, src.spectrum)
