"""Which code a file may make run: none, unless the person running the command names it.

A weights-only model file holds no pickled code, but its recipe names the architecture to
rebuild, and a ``package.module:function`` reference is imported and called: a run folder or
bundle that could name any function would choose which code runs (``tempfile:mkstemp``,
``os:system``). So a reference read from a file is built only when it is:

* ``demo`` or a torchvision model name (code that ships with autoprune and torchvision), or
* a ``module:function`` the user gave in this run (the run config's ``model``, or ``--model`` of
  ``pick``/``export``/``remeasure``), equal to the stored one, or
* anything, with ``--trust-code`` (``trust_code=True``), given by whoever runs the command.

The same holds for the code references of a stored run config (``data``, ``task``, ``output``)
that ``autoprune export`` rebuilds a trial with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from autoprune.errors import AutopruneError, UntrustedCode

def _builtin_model(ref: str) -> bool:
    """``demo`` or a torchvision model name: code autoprune and torchvision ship, no import of
    anything a file names."""
    if ref == "demo" or ref.startswith("object:"):
        # "object:..." names an object passed to the Python API in this process (autoprune.objects):
        # it resolves to that object or fails, and imports nothing
        return True
    if ":" in ref or "/" in ref or "\\" in ref or ref.startswith("."):
        return False
    import torchvision.models as tvm

    return ref in tvm.list_models(module=tvm)


def model_code(ref: str, _depth: int = 0) -> Optional[str]:
    """The code reference building model ``ref`` imports and runs: ``ref`` itself for a
    ``module:function``; the ``arch`` of a weights-only checkpoint ``{'arch': ..., 'state_dict': ...}``
    (followed); None for built-in names and full pickles (those need ``trust_pickle`` instead).
    Reads a checkpoint weights-only, so finding out runs no code."""
    if _builtin_model(ref):
        return None
    p = Path(ref)
    if p.suffix in (".pt", ".pth", ".ckpt") or p.is_file():
        if not p.is_file() or _depth > 3:
            return None
        from autoprune.train.models import checkpoint_arch, read_checkpoint

        try:
            arch = checkpoint_arch(read_checkpoint(p))
        except AutopruneError:
            return None  # a full pickle or no checkpoint: build_model says so (trust_pickle)
        return None if arch is None else model_code(arch, _depth + 1)
    return ref


def data_code(ref: Optional[str]) -> Optional[str]:
    """The ``module:function`` a data reference imports, or None (registered sources such as
    ``cifar10:DIR``, folders): decided as ``train.data.load_data`` decides, so a source
    registered with an argument is never mistaken for code."""
    from autoprune.train.data import source_of

    if not ref or ":" not in ref or source_of(ref) is not None or Path(ref).exists():
        return None
    return ref


@dataclass(frozen=True)
class CodePolicy:
    """The code references this run may import beyond the built-in ones: those the user gave
    (``given``), or any (``trust``)."""

    trust: bool = False
    given: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def of(cls, *refs: Optional[str], trust: bool = False) -> "CodePolicy":
        """The policy of a run whose user named ``refs`` (model references: a checkpoint's ``arch`` counts)."""
        given: set[str] = set()
        for r in refs:
            if r:
                given.add(r)
                code = model_code(r)
                if code:
                    given.add(code)
        return cls(trust=trust, given=frozenset(given))

    def allows(self, ref: str) -> bool:
        return self.trust or _builtin_model(ref) or ref in self.given

    def check(self, ref: str, where: Any, key: str = "model", option: str = "--model") -> None:
        """Refuse ``ref`` (read from ``where``) unless built-in, given by the user or trusted."""
        if self.allows(ref):
            return
        gave = sorted(self.given)
        also = f" (this run was given {', '.join(gave)})" if gave else ""
        how = f"pass {option} {ref} if that is the code you mean to run, or " if option else "pass "
        raise UntrustedCode(
            f"{where}: its {key} names the code {ref!r}{also}, and building it would import and run that code; "
            f"a run folder or bundle never chooses which code runs: {how}--trust-code if you trust this folder")

    def check_all(self, refs: Iterable[tuple[str, Optional[str]]], where: Any) -> None:
        """Check ``(key, code reference)`` pairs of a stored config (None: no code)."""
        for key, ref in refs:
            if ref:
                self.check(ref, where, key=f"config key {key!r}", option="--model" if key == "model" else "")
