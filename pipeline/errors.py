"""The errors a user can fix: bad input or state found before (or instead of) spending compute.

Each message is one line (or one line per problem) naming the field or file and the bad value. The
`isoflop` command prints these without a traceback and exits with code 2; any other exception is a
bug and keeps its traceback. They subclass ValueError so pydantic validators report them as field errors.
This module imports nothing of the project, so the analysis package may use it too.
"""
from __future__ import annotations

import difflib


class IsoflopError(ValueError):
    """Base of every user-facing error."""


class ConfigError(IsoflopError):
    """A recipe, shape or option that cannot work (e.g. a batch that does not split over the ranks)."""


class DataError(IsoflopError):
    """A data folder, input file or tokenizer problem."""


class BudgetError(IsoflopError):
    """A FLOP budget that cannot be trained as asked (too few steps, or no room after warmup)."""


class SweepError(IsoflopError):
    """Everything wrong with a sweep file or its grid, found before anything launches; one problem per line."""


class TrackingError(IsoflopError):
    """An MLflow store that cannot be reached or used."""


class RunFolderError(IsoflopError):
    """A trained model that cannot be found or loaded (a run folder or an MLflow run)."""


class ExportError(IsoflopError):
    """An export that cannot be written where asked."""


class SamplingError(IsoflopError):
    """Bad sampling or scoring input, found before any network call."""


class RunsError(IsoflopError):
    """A runs table the analysis cannot use; the message says what is wrong and where."""


def did_you_mean(word: str, options, n: int = 1) -> str:
    """' (did you mean X?)' for the closest of `options`, or '' when none is close."""
    close = difflib.get_close_matches(word, list(options), n=n)
    return f" (did you mean {', '.join(map(repr, close)) if n > 1 else repr(close[0])}?)" if close else ""
