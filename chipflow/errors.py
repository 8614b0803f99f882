"""chipflow's exception tree.

Every error is also the builtin a Python user would catch (``ValueError``,
``FileNotFoundError``, ...), and every message names the parameter, the value
that was given, what was expected, and how to fix it.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ChipflowDeprecationWarning",
    "ChipflowError",
    "ChipflowWarning",
    "ClusterError",
    "InputNotFoundError",
    "InvalidParameterError",
    "OutputError",
    "RasterError",
    "LabelError",
]


class ChipflowError(Exception):
    """Base class of every error chipflow raises on purpose.

    ``during_run`` is True for one a block task found while the export was
    already writing (a damaged tile): the command line then exits with status 1,
    as for any failure during the run, not 2 (bad input, refused before
    anything is written).
    """

    during_run = False


class ChipflowWarning(UserWarning):
    """Base class of chipflow's warnings."""


class ChipflowDeprecationWarning(ChipflowWarning, DeprecationWarning):
    """A parameter ArcGIS deprecated (``start_index``): accepted and ignored."""


class InvalidParameterError(ChipflowError, ValueError):
    """A parameter has a value chipflow cannot use.

    Parameters
    ----------
    parameter : str
        The parameter's name, as the user spelled it (``tile_size_x``).
    value : Any
        The offending value.
    expected : str
        What would have been accepted, and how to fix it.
    """

    def __init__(self, parameter: str, value: Any, expected: str):
        self.parameter = parameter
        self.value = value
        super().__init__(f"Invalid {parameter}={value!r}: {expected}")


class InputNotFoundError(ChipflowError, FileNotFoundError):
    """An input path does not exist or cannot be opened."""

    def __init__(self, parameter: str, value: Any, detail: str = ""):
        self.parameter = parameter
        self.value = value
        msg = f"{parameter}={value!r} does not exist or cannot be opened"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class RasterError(ChipflowError, ValueError):
    """The input raster cannot be used as given (no CRS, unsupported layout, ...)."""


class LabelError(ChipflowError, ValueError):
    """The class data cannot be used as given (no CRS, no overlap, bad field, ...)."""


class OutputError(ChipflowError, OSError):
    """The output folder cannot be written."""


class ClusterError(ChipflowError, OSError):
    """The Dask cluster cannot be reached, or has no worker to run the export on."""
