"""AdaptiveBatchLoop (DDP and DeepSpeed ZeRO-2) and AdaptiveBatchTrainer (DDP and DeepSpeed ZeRO-2) on 2 processes.

For each run: the batch of every step is the same on both ranks, every sample is seen exactly
once per epoch across the ranks, and one process that runs the same micro-batches (all of them
local) ends with the same parameters and batches (relative L2 <= 1e-5). Clipping is on
(max_grad_norm=0.5): the optimizer clips the applied gradient on every route. The DeepSpeed
Trainer is also resumed from a mid-epoch checkpoint and must end where the uninterrupted run did.
"""

import os
import subprocess
import sys

import pytest
import torch

import lbopt.optim.adagrad as ada
from tests.batch import loop_worker as W
from tests.batch import problem as P
from tests.batch.test_deepspeed import _adapter_missing
from tests.support import launch_env

pytestmark = pytest.mark.distributed
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _launch(mode: str, tmp_path) -> list[dict]:
    out = tmp_path / mode
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(P.free_port()), os.path.join(ROOT, "tests", "batch", "loop_worker.py"), mode, str(out)]
    env = {**launch_env(), "PYTHONPATH": ROOT, "LBOPT_WORKER_TMP": str(tmp_path / "trainer")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(f"{out}.rank{r}") for r in range(2)]


def _dense(steps: list[list[list[list[int]]]]) -> tuple[torch.Tensor, list[int]]:
    """One process over the same micro-batches: ``steps[t][rank]`` = that rank's micro-batch indices."""
    x, y, _ = W.dataset().tensors
    model = P.make_model()
    opt = ada.AdAdaGradNorm(model.parameters(), world_size=2, **W.OPT)
    sizes = []
    for per_rank in steps:
        micro = [mb for rank in per_rank for mb in rank]
        sizes.append(opt.batch_controller.batch_size)
        opt.zero_grad()
        for idx in micro:
            (P.loss_fn(model, x[idx], y[idx]) / len(micro)).backward()
        opt.step()
    return P.flat(model), sizes


def _check(runs: list[dict], exact_plan: bool = True) -> None:
    r0, r1 = runs
    assert r0["sizes"] == r1["sizes"]  # identical batch sizes on every rank
    sizes = r0["sizes"]
    assert max(sizes) > sizes[0], sizes  # the batch grew
    seen = [i for t in range(len(sizes)) for rank in (r0, r1) for mb in rank["micro"][t] for i in mb]
    assert len(seen) == W.N * W.EPOCHS
    for e in range(W.EPOCHS):  # every sample once per epoch, across ranks
        assert sorted(seen[e * W.N:(e + 1) * W.N]) == list(range(W.N))
    for t, size in enumerate(sizes):
        assert size == sum(len(mb) for rank in (r0, r1) for mb in rank["micro"][t])
    ref, ref_sizes = _dense([[r0["micro"][t], r1["micro"][t]] for t in range(len(sizes))])
    # the one-process controller planned the same batches; only an epoch's last step may be shorter
    # (it takes what the epoch has left)
    # (the Trainer may take a few steps to reach a new count: it can only switch where its
    # step % accumulation bookkeeping stays aligned, so it never exceeds the plan)
    done = 0
    for size, planned in zip(sizes, ref_sizes):
        done += size
        if exact_plan:
            assert size == planned or (done % W.N == 0 and size < planned), (sizes, ref_sizes)
        else:
            assert size <= planned and size % (2 * P.MICRO) == 0, (sizes, ref_sizes)
    assert P.rel(r0["params"], ref) <= 1e-5 and P.rel(r1["params"], ref) <= 1e-5


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    return _launch("ddp", tmp_path_factory.mktemp("ddp"))


def test_loop_ddp_two_processes(ddp_runs):
    _check([r["loop"] for r in ddp_runs])


def test_trainer_ddp_two_processes(ddp_runs):
    runs = [r["trainer"] for r in ddp_runs]
    assert runs[0]["trainer_clip"] == 0.0 and runs[0]["opt_clip"] == W.CLIP  # clipping moved to the optimizer
    _check(runs, exact_plan=False)


@pytest.mark.skipif(_adapter_missing() is not None, reason=str(_adapter_missing()))
def test_loop_deepspeed_two_processes(tmp_path):
    runs = _launch("deepspeed", tmp_path)
    _check([r["loop"] for r in runs])


@pytest.mark.skipif(_adapter_missing() is not None, reason=str(_adapter_missing()))
def test_trainer_deepspeed_two_processes_and_resume(tmp_path):
    """AdaptiveBatchTrainer(deepspeed=ZeRO-2) + trainer_optimizer(AdAdaGradNorm): the batch grows, equals
    one process on the same global batches; resumed mid-epoch it reproduces the rest of the run."""
    runs = _launch("trainer_deepspeed", tmp_path)
    full = [r["trainer"] for r in runs]
    for r in full:  # clipping moved from the config ("auto" = max_grad_norm) into the bound lbopt optimizer
        assert r["trainer_clip"] == 0.0 and r["engine_clip"] == 0.0 and r["opt_clip"] == W.CLIP
        assert r["bound"] == "DeepSpeedEngine:True"
    _check(full, exact_plan=False)
    for r, f in zip((x["resumed"] for x in runs), full):
        k = r["from_step"]
        assert 0 < k < len(f["sizes"]) and max(f["sizes"][:k]) > f["sizes"][0]  # mid-epoch, after growth
        assert sum(f["sizes"][:k]) % W.N != 0
        assert r["sizes"] == f["sizes"][k:] and r["samples_seen"] == W.N * W.EPOCHS
        assert r["micro"] == f["micro"][k:]  # exactly the micro-batches the uninterrupted run had left
        assert P.rel(r["params"], f["params"]) <= 1e-6
    assert "optimizer_cls_and_kwargs" in runs[0]["refused"]  # a ready-made optimizer would be dropped: refused
