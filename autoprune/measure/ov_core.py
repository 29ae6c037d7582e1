"""The process's one OpenVINO ``Core``.

Every OpenVINO call in autoprune that loads a device plugin goes through :func:`shared_core`,
because a ``Core`` per call can kill the whole process. OpenVINO's CPU plugin, when a ``Core``
first loads it, gives the calling thread a new signal alternate stack (``sigaltstack``; its
``SigAltStackSetup`` in ``src/plugins/intel_cpu``) and, when that ``Core`` dies, unmaps the stack
and restores the previous one only if its own is still the current one. Two ``Core`` objects
that die in the order they were made (the first before the second, as two measurements in one
function do) therefore leave the thread's alternate stack pointing at unmapped memory. The next
signal handled there -- every Python handler asks for the alternate stack: torch's DataLoader
``SIGCHLD`` handler, ``SIGINT`` -- cannot get a frame, and the kernel kills the process with
``SIGSEGV`` (``si_code=SI_KERNEL``) wherever it happens to be. One ``Core`` that lives as long as
the process loads each plugin once and never unmaps a stack that a thread still uses.
"""

from __future__ import annotations

import threading
from typing import Any

_CORE: Any = None
_LOCK = threading.Lock()


def shared_core() -> Any:
    """The ``openvino.Core`` of this process, made on first use and kept until exit.

    ``Core`` is thread-safe for ``compile_model`` and ``read_model`` (OpenVINO's own guidance is
    one ``Core`` per application); properties are passed per ``compile_model`` call, so no caller
    changes what another one gets.
    """
    global _CORE
    if _CORE is None:
        with _LOCK:
            if _CORE is None:
                import openvino as ov

                _CORE = ov.Core()
    return _CORE
