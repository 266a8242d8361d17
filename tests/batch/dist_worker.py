"""Worker processes for the distributed adaptive-batch tests (gloo, CPU)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import lbopt.optim.adagrad as ada
from tests.batch import problem as P

STEPS = 12
CTRL = dict(initial_batch_size=8, max_batch_size=64, micro_batch_size=P.MICRO)
TEST_KW = {"norm": dict(eta=0.8), "augmented": dict(theta=0.3, nu=0.5)}


def _init(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def ddp_worker(rank: int, world: int, port: int, out: str, test: str) -> None:
    _init(rank, world, port)
    model = P.make_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = ada.AdAdaGradNorm(ddp.parameters(), lr=0.3, world_size=world, test=test, **CTRL, **TEST_KW[test])
    sizes, _ = P.train_stream(ddp, opt, opt.batch_controller, STEPS, rank, world)
    if rank == 0:
        torch.save({"params": P.flat(model), "sizes": sizes, "b_sq": opt.accumulator}, out)
    dist.barrier()
    dist.destroy_process_group()
