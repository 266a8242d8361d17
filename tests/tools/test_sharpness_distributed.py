"""SharpnessMonitor under 2 real ranks (torchrun, gloo): DDP and ZeRO-1/2 give one process's numbers.

Each rank probes half of the probe batch; λ_max and the per-layer Rayleigh quotients equal those of
one process on the whole probe batch at the same parameters, and training with the monitor is bit
for bit training without it. ZeRO-3 is refused with a clear error.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from lbopt.sharpness import SharpnessMonitor
from tests.support import free_port, launch_env
from tests.tools import sharpness_problem as P

pytestmark = pytest.mark.distributed
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
ENGINES = ["ddp"] + (["zero1", "zero2", "zero3"] if HAS_DEEPSPEED else [])


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sharpness") / "runs.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), os.path.join(ROOT, "tests", "tools", "sharpness_worker.py"), str(out), *ENGINES]
    proc = subprocess.run(cmd, env={**launch_env(), "PYTHONPATH": ROOT}, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out)


def _single_process(params: torch.Tensor):
    model = P.make_model()
    torch.nn.utils.vector_to_parameters(params, model.parameters())
    return SharpnessMonitor(model, P.loss_fn, P.probe_batch(), iters=P.ITERS, tol=P.TOL).probe()


@pytest.mark.parametrize("engine", [e for e in ENGINES if e != "zero3"])
def test_two_ranks_equal_one_process_and_leave_training_unchanged(launched, engine):
    got = launched[engine]
    assert torch.equal(got["with"]["params"], got["without"]["params"])
    assert [p["step"] for p in got["with"]["probes"]] == [2, 4]
    for probe in got["with"]["probes"]:
        ref = _single_process(probe["params"])
        assert probe["lambda_max"] == pytest.approx(ref.lambda_max, rel=1e-4)
        assert probe["gradient_rayleigh"] == pytest.approx(ref.gradient_rayleigh, rel=1e-4)
        assert probe["layers"].keys() == ref.layer_rayleigh.keys()
        for name, value in ref.layer_rayleigh.items():
            assert probe["layers"][name] == pytest.approx(value, rel=1e-4)
    # control: half of the probe batch alone gives other numbers
    half = SharpnessMonitor(_model_at(got["with"]["probes"][0]["params"]), P.loss_fn, P.probe_part(0),
                            iters=P.ITERS, tol=P.TOL).probe()
    assert half.lambda_max != pytest.approx(got["with"]["probes"][0]["lambda_max"], rel=1e-3)


def _model_at(params):
    model = P.make_model()
    torch.nn.utils.vector_to_parameters(params, model.parameters())
    return model


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
def test_zero3_is_refused_with_a_clear_error(launched):
    assert "ZeRO-3" in launched["zero3"]["with"]["error"]
    assert "ZeRO-1/2" in launched["zero3"]["with"]["error"]
