"""One process runs many measurements, searches and loaders (a notebook, the test suite): nothing
that one of them leaves behind may kill the process later.

OpenVINO's CPU plugin swaps the calling thread's signal alternate stack when a ``Core`` loads it
and unmaps it when that ``Core`` dies; two ``Core`` objects that died in the order they were made
left the stack pointing at unmapped memory, and the next Python signal handler (torch's DataLoader
``SIGCHLD`` handler, ``SIGINT``) killed the process with SIGSEGV (see autoprune/measure/ov_core.py).
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import sigint_as_from_a_terminal

from autoprune.config import DeviceProfile
from autoprune.measure import backends
from autoprune.measure.backends import ModelArtifact
from autoprune.measure.onnx import export_onnx


class _StackT(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def alternate_stack_is_usable() -> bool:
    """The calling thread's signal alternate stack is unset, or lies wholly in mapped memory."""
    st = _StackT()
    assert ctypes.CDLL(None, use_errno=True).sigaltstack(None, ctypes.byref(st)) == 0
    if st.ss_flags & 2 or not st.ss_sp:  # SS_DISABLE
        return True
    lo, hi = st.ss_sp, st.ss_sp + st.ss_size
    for line in Path("/proc/self/maps").read_text().splitlines():
        a, b = (int(v, 16) for v in line.split()[0].split("-"))
        if a <= lo and hi <= b:
            return True
    return False


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    return export_onnx(net, torch.randn(1, 1, 16, 16), tmp_path_factory.mktemp("ps") / "m.onnx", "torchscript")


@pytest.mark.skipif(sys.platform != "linux", reason="sigaltstack and /proc/self/maps are Linux's")
def test_openvino_runners_leave_a_usable_alternate_stack(onnx_file: Path):
    """Two OpenVINO runners alive at once and dropped in the order they were made (a candidate
    timed against its dense reference does this) leave the thread's alternate stack mapped."""
    x = np.zeros((1, 1, 16, 16), np.float32)
    prof = DeviceProfile(name="ov", backend="openvino", device="CPU", threads=1, warmup=1, repeats=3, target_rel_ci=None)
    first = backends.load(ModelArtifact(onnx_file), prof)
    second = backends.load(ModelArtifact(onnx_file), prof.model_copy(update={"threads": 2}))
    first(x), second(x)
    del first
    del second
    import gc

    gc.collect()
    assert alternate_stack_is_usable()
    art = ModelArtifact(onnx_file)
    st = backends.measure(art, prof, x, reference=art)
    assert st.speedup is not None
    gc.collect()
    assert alternate_stack_is_usable()


SCRIPT = """
import gc, os, signal, sys
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset
from autoprune.config import DeviceProfile
from autoprune.measure import backends
from autoprune.measure.backends import ModelArtifact

path = sys.argv[1]
x = np.zeros((1, 1, 16, 16), np.float32)
prof = DeviceProfile(name="ov", backend="openvino", device="CPU", threads=1, warmup=1, repeats=3, target_rel_ci=None)
art = ModelArtifact(path)
# a bench timed against its dense reference, then another bench of the same file
backends.measure(art, prof, x, reference=art)
runners = [backends.load(art, prof), backends.load(art, prof.model_copy(update={"threads": 2}))]
del runners
gc.collect()
# a data loader with workers: torch installs its SIGCHLD handler, and each worker's exit signals
for _ in DataLoader(TensorDataset(torch.zeros(8, 1)), batch_size=4, num_workers=2):
    pass
# a Ctrl-C arrives at the main thread (raise_signal: to this thread, not to any of the runtimes')
import time
try:
    signal.raise_signal(signal.SIGINT)
    for _ in range(100):  # Python runs its handler at the next check in the main thread
        time.sleep(0.01)
except KeyboardInterrupt:
    print("interrupted cleanly")
print("alive")
"""


@pytest.mark.skipif(sys.platform != "linux", reason="the crash was OpenVINO's Linux signal stack")
def test_measurements_then_loaders_and_ctrl_c_do_not_kill_the_process(onnx_file: Path, tmp_path: Path):
    """The order that crashed the suite, in a process of its own: benches on OpenVINO, then a
    DataLoader with workers, then SIGINT. Before one shared Core this died with SIGSEGV (-11)."""
    script = tmp_path / "session.py"
    script.write_text(textwrap.dedent(SCRIPT))
    proc = subprocess.run([sys.executable, str(script), str(onnx_file)], capture_output=True, text=True, timeout=300,
                          preexec_fn=sigint_as_from_a_terminal)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "interrupted cleanly" in proc.stdout and "alive" in proc.stdout
