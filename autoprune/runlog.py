"""The run's log file (``<run>/autoprune.log``): where library chatter goes instead of the console.

A search's console is for autoprune's own lines (progress, trials, results). The libraries it
drives talk too: the ONNX exporter's optimizer warns once per constant ``Split`` it cannot fold
(dozens of lines for a small ViT), MLflow logs INFO lines when it creates its tables, torch
emits deprecation warnings. Those lines help when something goes wrong, so they are kept, in
the run folder's log file, not dropped.

How: while :func:`library_log` is active, the root logger has a file handler on that file (so
a library logger that propagates, and has no handler of its own, writes there instead of
Python's last-resort stderr handler), Python warnings are routed through logging
(``logging.captureWarnings``), and the libraries known to install their own stderr handlers
(MLflow and the loggers it configures) have those replaced by the file handler. Everything is
restored on exit, so an embedding program's logging is left as it was. Loggers the program set
up itself (a handler on the root logger, say) still receive their records as before.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from pathlib import Path
from typing import Iterator, Optional

#: Loggers that install their own stderr handler (and do not propagate) when imported or used.
SELF_CONFIGURED = ("mlflow", "alembic", "sqlalchemy", "huey")

_state = threading.local()


def _stderr_handlers(logger: logging.Logger) -> list[logging.Handler]:
    """Console handlers (MLflow's writes to a wrapper of ``sys.stderr``, not to it directly)."""
    return [h for h in logger.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


def capture_library_loggers() -> None:
    """Move the console handlers of :data:`SELF_CONFIGURED` loggers to the active run log.
    Called on entry and again right after such a library is imported (MLflow configures its
    loggers at import, which happens lazily inside a search)."""
    active = getattr(_state, "active", None)
    if active is None:
        return
    handler, swapped = active
    for name in list(logging.root.manager.loggerDict):
        if not any(name == p or name.startswith(p + ".") for p in SELF_CONFIGURED):
            continue
        logger = logging.getLogger(name)
        for h in _stderr_handlers(logger):
            logger.removeHandler(h)
            logger.addHandler(handler)
            swapped.append((logger, h))


@contextlib.contextmanager
def library_log(path: Optional[Path]) -> Iterator[Optional[Path]]:
    """Send library log records and warnings to ``path`` (appended) while the block runs."""
    if path is None or getattr(_state, "active", None) is not None:  # nested: the outer one holds
        yield path
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    before = warnings.showwarning
    logging.captureWarnings(True)
    captured = warnings.showwarning is not before  # not already on (the program's own choice)
    swapped: list[tuple[logging.Logger, logging.Handler]] = []
    _state.active = (handler, swapped)
    try:
        capture_library_loggers()
        yield path
    finally:
        _state.active = None
        for logger, h in swapped:
            logger.removeHandler(handler)
            logger.addHandler(h)
        if captured:
            logging.captureWarnings(False)
        root.removeHandler(handler)
        handler.close()
