"""One error hierarchy: every problem a user can fix is an :class:`AutopruneError`.

The CLI catches ``AutopruneError`` once and prints its message on one line, without a traceback;
anything else is a bug in autoprune and keeps its traceback. Messages name the file, the key and
the fix, because a search that dies on a typo twenty minutes in is the worst experience we offer.

Subclasses keep the built-in base they had before (``ValueError``, ``RuntimeError``) so code that
caught those still works.
"""

from __future__ import annotations


class AutopruneError(Exception):
    """Base of every error autoprune raises on purpose; the message is meant for the user."""


class ConfigError(AutopruneError, ValueError):
    """A configuration problem the user must fix; the message names file, key and allowed values."""


class DiskFullError(ConfigError):
    """No space left while a trial wrote its artifacts; the study is intact and resumable."""


class BackendUnavailable(AutopruneError, RuntimeError):
    """The profile asks for a device or runtime this machine lacks; the message says what to install."""


class RemoteError(BackendUnavailable):
    """The latency server refused or failed a request; the message is the server's explanation."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class ExportError(AutopruneError, RuntimeError):
    """The model could not be exported; the message says which step and why."""


class QuantizationError(AutopruneError, RuntimeError):
    """Post-training quantization failed; the message names the model and the tool."""


class NonFiniteLoss(AutopruneError, RuntimeError):
    """Fine-tune diverged (NaN/inf loss): the trial is recorded as failed with this reason."""


class UntrustedPickle(ConfigError):
    """A file could only be read by full unpickling, which runs any code the file names, and
    ``--trust-pickle`` (``trust_pickle: true``) was not given; the message says how to proceed."""


class UntrustedCode(ConfigError):
    """A file (a model file's recipe, a run folder's stored config) names code to import and run
    that the user did not give in this run, and ``--trust-code`` was not given (autoprune.trust)."""
