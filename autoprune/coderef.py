"""Code references: the ``package.module:function`` strings a run config or a command line names.

A model, data factory, task or output adapter can be the user's own code, named by where it
lives. Every such reference is split and imported here, so that they all accept the same
forms and fail with the same kind of message: the key that named it, the reference, what
Python said, and the form expected. Whether a reference may be imported at all (a file must
never choose which code runs) is :mod:`autoprune.trust`'s question, asked before this.
"""

from __future__ import annotations

import importlib
from typing import Any

from autoprune.errors import ConfigError

__all__ = ["import_ref", "split_ref"]


def split_ref(ref: str) -> tuple[str, str]:
    """``"pkg.mod:attr"`` → ``("pkg.mod", "attr")``; ``attr`` is empty when the colon or the
    name after it is missing (a module alone)."""
    module, _, attr = ref.partition(":")
    return module, attr


def import_ref(ref: str, where: str, expected: str = "package.module:function", hint: str = "",
               module_alone: bool = False) -> Any:
    """The object ``ref`` names, imported; a :class:`ConfigError` starting with ``where`` (the key
    that named it, e.g. ``"model"`` or ``"run config: key 'task'"``) when it cannot be.

    ``module_alone``: a reference without ``:attr`` names the module itself (a task may be a
    module with ``loss`` and ``evaluate``). ``hint`` is appended to the message (where the module
    must be importable from)."""
    module, attr = split_ref(ref)
    try:
        mod = importlib.import_module(module)
        return mod if module_alone and not attr else getattr(mod, attr)
    except (ImportError, AttributeError, ValueError) as exc:  # ValueError: an empty module name (":f")
        raise ConfigError(f"{where}: cannot import {ref!r} ({exc}); expected '{expected}'{hint}") from None
