"""The common rest-frame wavelength grid every spectrum is resampled onto."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WavelengthGrid:
    """A uniform rest-frame vacuum wavelength grid.

    Parameters
    ----------
    start : float
        First pixel centre, Angstrom (vacuum, rest frame).
    stop : float
        End of the grid, Angstrom; exclusive, as in :func:`numpy.arange`.
    step : float
        Pixel spacing, Angstrom.

    The default (4500-7500 A at 1 A, 3000 pixels) is the grid of Galgano et al. (2020).
    """

    start: float = 4500.0
    stop: float = 7500.0
    step: float = 1.0

    def __post_init__(self) -> None:
        if not (self.step > 0 and self.stop > self.start):
            raise ValueError(
                f"invalid wavelength grid start={self.start} stop={self.stop} step={self.step}: "
                "need step > 0 and stop > start"
            )

    @property
    def n_pixels(self) -> int:
        """Number of pixels on the grid."""
        return int(round((self.stop - self.start) / self.step))

    @property
    def wavelength(self) -> np.ndarray:
        """Pixel centres, Angstrom, float64 array of length :attr:`n_pixels`."""
        return self.start + self.step * np.arange(self.n_pixels, dtype=np.float64)

    def to_attrs(self) -> dict:
        """Grid definition as JSON-serialisable attributes."""
        return {"grid_start": self.start, "grid_stop": self.stop, "grid_step": self.step}

    @classmethod
    def from_attrs(cls, attrs: dict) -> "WavelengthGrid":
        """Inverse of :meth:`to_attrs`."""
        return cls(float(attrs["grid_start"]), float(attrs["grid_stop"]), float(attrs["grid_step"]))


DEFAULT_GRID = WavelengthGrid()
