"""Small-loss discarding under 2 real ranks (torchrun, gloo) with accumulation equals one process.

DDP and DeepSpeed ZeRO 1, 2, 3: the kept sample ids of every step and the final parameters equal a
single-process run on the same global batch whose kept set comes from an explicit sort (≤ 1e-5).
All runs share one launch (DeepSpeed's start-up dominates the time).
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from tests.support import free_port, launch_env, rel
from tests.tools import discard_problem as P

pytestmark = pytest.mark.distributed
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
RUNS = [f"ddp:{P.RHO}", "ddp:0", "ddp:off"] + ([f"zero{s}:{P.RHO}" for s in (1, 2, 3)] if HAS_DEEPSPEED else [])


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("discard") / "runs.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), os.path.join(ROOT, "tests", "tools", "discard_worker.py"), str(out), *RUNS]
    proc = subprocess.run(cmd, env={**launch_env(), "PYTHONPATH": ROOT}, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def reference():
    return P.reference()


def test_ddp_two_ranks_with_accumulation_equals_one_process(launched, reference):
    ref_params, ref_kept = reference
    got = launched[f"ddp:{P.RHO}"]
    assert got["kept_ids"] == ref_kept
    assert all(len(k) == P.GLOBAL - 4 for k in ref_kept)
    assert rel(got["params"], ref_params) <= 1e-5
    plain, _ = P.reference(rho=0.0)  # control: without discarding the run ends elsewhere
    assert rel(plain, ref_params) > 1e-3


def test_ddp_rho_zero_is_bit_identical_to_no_discarding(launched):
    assert torch.equal(launched["ddp:0"]["params"], launched["ddp:off"]["params"])


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_two_ranks_with_accumulation_equals_one_process(launched, reference, stage):
    ref_params, ref_kept = reference
    got = launched[f"zero{stage}:{P.RHO}"]
    assert got["kept_ids"] == ref_kept
    assert rel(got["params"], ref_params) <= 1e-5
