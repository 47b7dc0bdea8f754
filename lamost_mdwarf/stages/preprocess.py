"""Stage ``preprocess``: masks, normalized spectra and quality quantities into the store.

Results go to the ``preprocessed`` group of the survey store, row-aligned with it.
Incremental: only rows ingested since the last run are computed, unless the settings
changed (then everything is recomputed).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from lamost_mdwarf.io.derived_groups import (
    DerivedGroupSpec,
    block_rows_for,
    prepare_derived_group,
    write_rows_in_blocks,
)
from lamost_mdwarf.io.storage import WriterLock, resolve_location
from lamost_mdwarf.io.survey_store import open_survey_store
from lamost_mdwarf.preprocessing import PREPROCESSED_VARIABLES, PreprocessConfig, preprocess_spectra

__all__ = ["PREPROCESSED_GROUP", "PreprocessSummary", "run_preprocess"]

PREPROCESSED_GROUP = "preprocessed"


@dataclass
class PreprocessSummary:
    """Rows computed by one run (``start``..``stop``) and the store size."""

    start: int
    stop: int

    @property
    def n_computed(self) -> int:
        return self.stop - self.start


def run_preprocess(store: str | os.PathLike, config: PreprocessConfig = PreprocessConfig(),
                   reset: bool = False, chunks_per_block: int = 4,
                   progress: Callable[[int, int], None] | None = None) -> PreprocessSummary:
    """Preprocess the store's spectra not yet preprocessed with these settings.

    Runs on the current Dask client (workers compute and write chunks); call inside
    :func:`lamost_mdwarf.cluster.dask_client`.

    Parameters
    ----------
    store : str or path-like
        Survey store.
    config : PreprocessConfig
    reset : bool
        Recompute every row.
    chunks_per_block : int
        Star chunks computed and committed together (an interruption loses one block); at
        least two per worker thread (:func:`~lamost_mdwarf.io.derived_groups.block_rows_for`).
    progress : callable, optional
        ``progress(rows_done, rows_total)`` after each block.
    """
    location = resolve_location(store)
    with WriterLock(location, "preprocess"):
        ds = open_survey_store(store)
        n_star = ds.sizes["star"]
        chunk = int(ds.attrs["chunk_stars"])
        spec = DerivedGroupSpec(PREPROCESSED_GROUP, PREPROCESSED_VARIABLES)
        start = prepare_derived_group(store, spec, n_star, chunk, ds.sizes["wavelength"], config.to_dict(), reset)
        write_rows_in_blocks(
            store, PREPROCESSED_GROUP,
            lambda a, b: preprocess_spectra(ds.isel(star=slice(a, b)), config),
            start, n_star, block_rows_for(chunk, chunks_per_block), progress,
        )
    return PreprocessSummary(start, n_star)
