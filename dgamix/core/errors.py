"""Every error type dgamix raises on purpose, in one module with no dependencies, so that any layer (and the CLI,
which reports them) can name them without importing the code that raises them.

The CLI turns ParamError, InputError (FormatError included) and StageFailed into a one-line message and exit
status 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class ParamError(ValueError):
    """A parameter (or the input it points at) is not what the stage expects. The message names it."""


class InputError(ValueError):
    """Input data is malformed in a way the stage cannot work around (e.g. embeddings that do not match docs)."""


class FormatError(InputError):
    """An artifact is not in a format (or format version) this dgamix can read. The message names the file."""


class StageFailed(RuntimeError):
    """A task failed on the engine after its retries; finished work is kept, the re-run completes the stage."""


class StateMismatchError(ValueError):
    """A saved state does not belong to this store, these bases, or these settings."""


__all__ = ["FormatError", "InputError", "ParamError", "StageFailed", "StateMismatchError"]
