"""LAMOST-style FITS header cards for a simulated observation, per data release.

The cards copy the order, comments and number formats of real files (original DR1
pipeline v2.6.4; DR7 and DR9 re-reductions, pipeline v2.9.8). Release differences:

=============  ==========================  =========================  ==========================
key            DR1 (``dr1_image``)         DR7 (``image``)            DR9 (``coadd_table``)
=============  ==========================  =========================  ==========================
OBSID, DATA_V  absent                      present ('LAMOST DR7')     present ('LAMOST DR9')
MJD            LMJD + 1                    LMJD - 1                   LMJD - 1
SNR keywords   SN_U..SN_Z, capped at 99    SNRU..SNRZ                 SNRU..SNRZ
SUBCLASS       'M3', 'K7'                  'M3', 'K7'                 'dM3', 'K7'
photometry     MAG1..MAG7 (ugrizjh)        MAG1..MAG7 (ugriz)         MAG_PS_G..MAG_PS_Y
other          EXTEN0 (no wavelength row)  EXTEN0, EXTNAME='Flux'     NORM, FIB_TYPE, FIB_MASK
=============  ==========================  =========================  ==========================

A missing redshift is written either as Z = Z_ERR = -9999 (``z_missing='sentinel'``)
or by leaving both keywords out (``'absent'``).
"""
from __future__ import annotations

import datetime as _dt
import math
from typing import Any, Mapping

from lamost_mdwarf.io.lamost_writer import LAYOUT_EXTEN0, FixedFloat, HeaderCard

__all__ = ["DATA_RELEASE_VERSION", "PIPELINE_VERSION", "lamost_header_cards"]

DATA_RELEASE_VERSION = {"DR7": "LAMOST DR7", "DR9": "LAMOST DR9"}
PIPELINE_VERSION = {"DR1": "v2.6.4", "DR7": "v2.9.8", "DR9": "v2.9.8"}
_REDUCTION_DATE = {"DR1": "2013-11-13T01:41:17", "DR7": "2021-09-17T01:28:29", "DR9": "2023-09-12T06:12:40"}
_MJD_EPOCH = _dt.datetime(1858, 11, 17)
_MISSING = -9999


def _iso(mjd: float, decimals: int = 1) -> str:
    moment = _MJD_EPOCH + _dt.timedelta(days=mjd)
    seconds = moment.second + moment.microsecond / 1e6
    width = 3 + decimals if decimals else 2
    return f"{moment:%Y-%m-%dT%H:%M:}{seconds:0{width}.{decimals}f}"


def _mag(value: float) -> FixedFloat:
    return FixedFloat(99.0 if not math.isfinite(value) or value > 30 else round(value, 2), 2)


def lamost_header_cards(obs: Mapping[str, Any], release: str, file_name: str) -> list[HeaderCard]:
    """Header cards (without the structural SIMPLE/BITPIX/NAXIS cards) of one file.

    Parameters
    ----------
    obs : mapping
        One observation of :class:`lamost_mdwarf.simulate.plan.SurveyPlan` (see
        :func:`lamost_mdwarf.simulate.plan.draw_plan` for the keys), as Python scalars.
    release : {"DR1", "DR7", "DR9"}
        Data release (and thereby layout) of the file.
    file_name : str
        The ``FILENAME`` value, e.g. ``'spec-55862-B6212_sp06-068.fits'``.

    Returns
    -------
    list of (keyword, value, comment)
    """
    if release not in ("DR1", "DR7", "DR9"):
        raise ValueError(f"unknown release {release!r}")
    lmjd = int(obs["lmjd"])
    local_mid = lmjd + obs["local_hour"] / 24.0
    exptime = float(obs["exptime"])
    begin_local = local_mid - exptime / 2 / 86400.0
    end_local = local_mid + exptime / 2 / 86400.0
    utc_mid = local_mid - 8.0 / 24.0
    lmjm = int(begin_local * 1440)
    n_exp = 3
    step = int(exptime / n_exp / 60) + 1
    lmjmlist = "-".join(str(lmjm + k * step) for k in range(n_exp))
    dr1 = release == "DR1"
    cards: list[HeaderCard] = []
    add = cards.append

    add(("COMMENT", "--------FILE INFORMATION", ""))
    add(("FILENAME", file_name, ""))
    if not dr1:
        add(("OBSID", int(obs["obsid"]), "Unique number ID of this spectrum"))
    add(("AUTHOR", "LAMOST Pipeline", "Who compiled the information"))
    if not dr1:
        add(("DATA_V", DATA_RELEASE_VERSION[release], "Data release version"))
    if release == "DR9":
        add(("N_EXTEN", 2, "The amount of extension"))
        add(("NORM", int(obs["norm"]), "1 if there exists a normalized spectrum"))
    else:
        layout = "dr1_image" if dr1 else "image"
        if dr1:
            add(("N_EXTEN", 1, "The extension number"))
        add(("EXTEN0", LAYOUT_EXTEN0[layout], ""))
        if not dr1:
            add(("N_EXTEN", 1, "The extension number"))
            add(("EXTNAME", "Flux", "The extension name"))
    add(("ORIGIN", "NAOC-LAMOST", "Organization responsible for creating this file"))
    add(("DATE", _REDUCTION_DATE[release], "Time when this HDU is created (UTC)"))
    add(("COMMENT", "--------TELESCOPE PARAMETERS", ""))
    add(("TELESCOP", "LAMOST", "GuoShouJing Telescope"))
    add(("LONGITUD", FixedFloat(117.58, 3 if dr1 else 2), "[deg] Longitude of site"))
    add(("LATITUDE", FixedFloat(40.39, 4 if dr1 else 2), "[deg] Latitude of site"))
    add(("FOCUS", 19964, "[mm] Telescope focus"))
    add(("CAMPRO", "NEWCAM", "Camera program name"))
    add(("CAMVER", "v2.0", "Camera program version"))
    add(("COMMENT", "--------OBSERVATION PARAMETERS", ""))
    add(("DATE-OBS", _iso(utc_mid, 2), "The observation median UTC"))
    add(("DATE-BEG", _iso(begin_local, 1), "The observation start local time"))
    add(("DATE-END", _iso(end_local, 1), "The observation end local time"))
    add(("LMJD", lmjd, "Local Modified Julian Day"))
    add(("MJD", lmjd + 1 if dr1 else lmjd - 1, "Modified Julian Day"))
    add(("LMJMLIST", lmjmlist, "Local Modified Julian Minute list"))
    add(("PLANID", str(obs["planid"]), "Plan ID in use"))
    add(("RA", FixedFloat(obs["ra"], 10 if dr1 else 6), "[deg] Right ascension of object"))
    add(("DEC", FixedFloat(obs["dec"], 10 if dr1 else 6), "[deg] Declination of object"))
    if not dr1:
        add(("RA_OBS", FixedFloat(obs["ra"], 6), "[deg] Right ascension during observing"))
        add(("DEC_OBS", FixedFloat(obs["dec"], 6), "[deg] Declination during observing"))
        add(("OFFSET", False, "Whether there's a offset during observing"))
        add(("OFFSET_V", FixedFloat(0.0, 2), "Offset value in arcsecond"))
    add(("DESIG", str(obs["designation"]), "Designation of LAMOST target"))
    add(("FIBERID", int(obs["fiberid"]), "Fiber ID of Object"))
    add(("CELL_ID", f"F{int(obs['spid']) * 250 + int(obs['fiberid']):04d}", "Fiber Unit ID on the focal plane"))
    add(("OBJNAME", str(obs["objname"]), "Name of object"))
    add(("OBJTYPE", "star" if dr1 else "Star", "Object type from input catalog"))
    if dr1:
        add(("OBJSOURC", "PILOT", "Name of input catalog"))
        add(("T_INFO", "NULL", "Target information"))
        add(("T_FROM", "NULL", "Target catalog"))
        add(("FIBERTYP", "Obj", "Fiber type of object"))
    else:
        add(("TSOURCE", "LEGAS_MDWARF", "Name of input catalog"))
        add(("TCOMMENT", ".", "Target information"))
        add(("TFROM", "-", "Target catalog"))
    if release == "DR9":
        add(("FIB_TYPE", "Obj", "Fiber type of object"))
        add(("FIB_MASK", 0, "Bitmask of warning values, 0 means good"))
        for band, key in (("g", "MAG_PS_G"), ("r", "MAG_PS_R"), ("i", "MAG_PS_I"), ("z", "MAG_PS_Z")):
            add((key, _mag(obs[f"mag_{band}"] - 0.05), "[mag] Magnitude of object"))
        add(("MAG_PS_Y", _mag(obs["mag_z"] - 0.15), "[mag] Magnitude of object"))
    else:
        if release == "DR7":
            add(("FIBERTYP", "Obj", "Fiber type of object"))
            add(("FIBERMAS", 0, "Bitmask of warning values, 0 means all is well"))
        add(("MAGTYPE", "ugrizjh" if dr1 else "ugriz", "Magnitude type of object"))
        mags = [obs["mag_u"], obs["mag_g"], obs["mag_r"], obs["mag_i"], obs["mag_z"], 99.0, 99.0]
        for index, value in enumerate(mags, start=1):
            add((f"MAG{index}", _mag(value), f"[mag] Mag{index} of object"))
    add(("OBS_TYPE", "OBJ", "The type of target (OBJ, FLAT, ARC or BIAS)"))
    add(("OBSCOMM", "Science", "Science, Test" if dr1 else "Science or Test"))
    add(("RADECSYS", "FK5", "Equatorial coordinate system"))
    add(("EQUINOX", FixedFloat(2000.0, 2), "Equinox in years"))
    add(("COMMENT", "--------SPECTROGRAPH PARAMETERS", ""))
    add(("SPID", int(obs["spid"]), "Spectrograph ID"))
    add(("SPRA", FixedFloat(obs["field_ra"], 4 if dr1 else 7), "[deg] Average RA of this spectrograph"))
    add(("SPDEC", FixedFloat(obs["field_dec"], 4 if dr1 else 7), "[deg] Average DEC of this spectrograph"))
    add(("SLIT_MOD", "x2/3", "Slit mode, x1 ,x2/3 or x1/2" if dr1 else "Slit mode, x1, x2/3 or x1/2"))
    add(("COMMENT", "--------WEATHER CONDITION", ""))
    add(("SEEING", FixedFloat(round(obs["seeing"], 2), 2), "[arcsecond] Seeing during exposure"))
    add(("MOONPHA", FixedFloat(round(obs["moon_phase"], 2), 2), "[day] Moon phase for a 29.53 days period"))
    add(("COMMENT", "--------DATA REDUCTION PARAMETERS", ""))
    add(("LAMPLIST", "lamphgcdne.dat", "Arc lamp emission line list"))
    add(("SKYLIST", "skylines.dat", "Sky emission line list"))
    add(("NEXP", n_exp, "Number of valid exposures"))
    add(("NEXP_B", n_exp, "Number of valid blue exposures"))
    add(("NEXP_R", n_exp, "Number of valid red exposures"))
    add(("EXPT_B", FixedFloat(exptime, 2), "[s] Blue exposure duration time"))
    add(("EXPT_R", FixedFloat(exptime, 2), "[s] Red exposure duration time"))
    add(("EXPTIME", FixedFloat(exptime, 2), "[s] Minimum of exposure time for all cameras"))
    add(("BESTEXP", lmjm, "MJM of the best exposure"))
    add(("EXTRACT", "aperture", "Extraction method"))
    add(("SFLATTEN", True, "Super flat has been applied"))
    add(("PCASKYSB", True, "PCA sky-subtraction has been applied"))
    add(("FCBY", "auto", "Standard stars origin (auto, manual or catalog)"))
    add(("HELIO", True, "Heliocentric correction"))
    add(("HELIO_RV", FixedFloat(round(obs["helio_rv"], 6), 6), "[km/s] Heliocentric correction"))
    add(("VACUUM", True, "Wavelengths are in vacuum"))
    add(("NWORDER", 2, "Number of linear-log10 coefficients"))
    add(("WFITTYPE", "LOG-LINEAR", "Linear-log10 dispersion"))
    coeff0_decimals = 5 if dr1 else 4
    add(("COEFF0", FixedFloat(obs["coeff0"], coeff0_decimals), "Central wavelength (log10) of first pixel"))
    add(("COEFF1", FixedFloat(obs["coeff1"], 9) if dr1 else FixedFloat(obs["coeff1"], 4), "Log10 dispersion per pixel"))
    add(("WAT0_001", "system=linear", ""))
    add(("WAT1_001", "wtype=linear label=Wavelength units=Angstroms", ""))
    add(("CRVAL1", FixedFloat(obs["coeff0"], coeff0_decimals), "Central wavelength (log10) of first pixel"))
    add(("CD1_1", FixedFloat(obs["coeff1"], 9) if dr1 else FixedFloat(obs["coeff1"], 4), "Log10 dispersion per pixel"))
    add(("CRPIX1", 1, "Starting pixel (1-indexed)"))
    add(("CTYPE1", "LINEAR", ""))
    add(("DC-FLAG", 1, "Log-linear flag"))
    add(("COMMENT", "--------SPECTRA ANALYSIS RESULTS", ""))
    add(("VERSPIPE", PIPELINE_VERSION[release], "Version of Pipeline"))
    add(("CLASS", "STAR", "Class of object"))
    subclass = str(obs["subclass"])
    if release == "DR9" and subclass.startswith("M"):
        subclass = "d" + subclass
    add(("SUBCLASS", subclass, "Subclass of object"))
    missing = str(obs["z_missing"])
    if missing == "sentinel":
        add(("Z", FixedFloat(_MISSING, 2), "Redshift of object"))
        add(("Z_ERR", FixedFloat(_MISSING, 2), "Redshift error of object"))
    elif missing == "":
        add(("Z", FixedFloat(obs["z_header"], 8), "Redshift of object"))
        add(("Z_ERR", FixedFloat(obs["z_err"], 8), "Redshift error of object"))
    elif missing != "absent":
        raise ValueError(f"unknown z_missing style {missing!r}")
    if not dr1:
        add(("ZFLAG", "LASP", "Which method computes the redshift"))
    for band in "ugriz":
        value = float(obs[f"snr_{band}"])
        if dr1:
            add((f"SN_{band.upper()}", FixedFloat(min(value, 99.0), 2), f"SNR of {band} filter"))
        else:
            add((f"SNR{band.upper()}", FixedFloat(value, 2), f"SNR of {band} filter"))
    return cards
