"""AdAdaGradNorm + its controller on 2 DDP processes (gloo) equals the dense single-process run."""

import pytest
import torch
import torch.multiprocessing as mp

import lbopt.optim.adagrad as ada
from tests.batch import dist_worker
from tests.batch import problem as P

pytestmark = pytest.mark.distributed


def _dense(test: str):
    model = P.make_model()
    # world_size=2 in one process: the same batch rounding (multiples of micro × 2), and
    # the same micro-batch samples, all of them local.
    opt = ada.AdAdaGradNorm(model.parameters(), lr=0.3, world_size=2, test=test, **dist_worker.CTRL,
                            **dist_worker.TEST_KW[test])
    sizes, _ = P.train_stream(model, opt, opt.batch_controller, dist_worker.STEPS)
    return P.flat(model), sizes, opt.accumulator


@pytest.mark.parametrize("test", ["norm", "augmented"])
def test_ddp_two_ranks_equals_dense_while_batch_grows(tmp_path, test):
    ref, ref_sizes, ref_b = _dense(test)
    assert ref_sizes[-1] > ref_sizes[0], f"batch did not grow: {ref_sizes}"
    out = tmp_path / "ddp.pt"
    mp.spawn(dist_worker.ddp_worker, args=(2, P.free_port(), str(out), test), nprocs=2, join=True)
    got = torch.load(out)
    assert got["sizes"] == ref_sizes
    assert P.rel(got["params"], ref) <= 1e-5
    assert abs(got["b_sq"] - ref_b) <= 1e-6 * ref_b
