"""Command line: ``autoprune search | pick | bench | groups | ...``.

:mod:`~autoprune.cli.parser` builds the parser, :mod:`~autoprune.cli.flags` holds the table of
flags that set run-config keys, :mod:`~autoprune.cli.commands` what each subcommand does, and
:func:`main` (the ``autoprune`` console script) turns user mistakes into one ``error:`` line.
"""

from __future__ import annotations

import errno
import sys
from typing import Optional, Sequence

from rich.console import Console

from autoprune.cli.commands import one_line
from autoprune.cli.parser import build_parser
from autoprune.cli.tables import print_rows
from autoprune.errors import AutopruneError


def _quiet_library_warnings() -> None:
    """torch/optuna deprecation and experimental notices are for us, not for users of the CLI.

    Optuna's INFO log (``[I ...] A new study created in RDB with name: ...``, one line per
    trial) duplicates autoprune's own progress, so the CLI keeps Optuna at WARNING. Only the
    CLI does this, and for its own process: ``autoprune.search()`` leaves Optuna's logging to
    the program that embeds it (it may rely on those lines).
    """
    import warnings

    import optuna

    for cat in (FutureWarning, DeprecationWarning, UserWarning, optuna.exceptions.ExperimentalWarning):
        warnings.filterwarnings("ignore", category=cat)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


#: OSErrors that describe the machine, never a bug in autoprune: shown as one line like an
#: AutopruneError. Others (a missing file autoprune itself should have written, ...) keep their
#: traceback.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["search"]
    args = build_parser().parse_args(argv)
    _quiet_library_warnings()
    console = Console()  # results on stdout; progress and logs go to stderr
    try:
        return args.fn(args, console)
    except AutopruneError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)  # unwrapped: users grep and paste these
        return 2
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}; free space or choose a location you can write to", file=sys.stderr)
        return 2


__all__ = ["build_parser", "main", "print_rows"]
