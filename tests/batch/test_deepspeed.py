"""AdAdaGradNorm under DeepSpeed ZeRO-1, 2 and 3 (2 ranks, gloo) equals the dense run while the batch grows."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from tests.batch import problem as P
from tests.batch.test_distributed import _dense

pytestmark = pytest.mark.distributed


def _adapter_missing() -> str | None:
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed"
    try:
        import lbopt.integrations.deepspeed  # noqa: F401
    except ImportError as exc:
        return f"lbopt.integrations.deepspeed is not importable ({exc})"
    return None


@pytest.mark.skipif(_adapter_missing() is not None, reason=str(_adapter_missing()))
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_two_ranks_equals_dense_while_batch_grows(tmp_path, stage):
    ref, ref_sizes, ref_b = _dense("norm")
    out = tmp_path / "zero2.pt"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(P.free_port()), os.path.join(root, "tests", "batch", "ds_worker.py"), str(stage), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = torch.load(out)
    assert ref_sizes[-1] > ref_sizes[0]
    assert got["sizes"] == ref_sizes
    assert P.rel(got["params"], ref) <= 1e-5
    assert abs(got["b_sq"] - ref_b) <= 1e-6 * ref_b
