"""Small-loss discarding on 2 ranks with accumulation, launched once by torchrun (gloo, CPU).

``discard_worker.py OUT RUN [RUN ...]`` with RUN = ``ENGINE:RHO``, ENGINE one of ``ddp``, ``zero1``,
``zero2``, ``zero3`` and RHO a fraction or ``off`` (the plain loop, no discarding code at all). The
runs share one process group (one launch: DeepSpeed's start-up dominates); rank 0 writes, per run,
the final parameters and the kept sample ids of every step.
"""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from lbopt.discard import SmallLossDiscard  # noqa: E402
from tests.tools import discard_problem as P  # noqa: E402


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def ddp_engine(model):
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=P.LR, momentum=0.9)

    def context(j):
        return ddp.no_sync() if j < P.ACCUM - 1 else nullcontext()

    def backward(loss, _j):
        (loss / P.ACCUM).backward()

    def step():
        opt.step()
        opt.zero_grad()

    return ddp, context, backward, step, lambda: flat(model)


def zero_engine(model, stage: int):
    import deepspeed

    cfg = {
        "train_micro_batch_size_per_gpu": P.MICRO,
        "gradient_accumulation_steps": P.ACCUM,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
    }
    opt = torch.optim.SGD(model.parameters(), lr=P.LR, momentum=0.9)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)

    def gathered():
        if stage == 3:
            with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
                return flat(engine.module)
        return flat(engine.module)

    def backward(loss, _j):
        engine.backward(loss)  # divides by gradient_accumulation_steps
        engine.step()  # steps the optimizer at the accumulation boundary only

    return engine, lambda _j: nullcontext(), backward, lambda: None, gathered


def train(engine_name: str, rho: str) -> dict:
    model = P.make_model()
    if engine_name == "ddp":
        wrapped, context, backward, step, params = ddp_engine(model)
    else:
        wrapped, context, backward, step, params = zero_engine(model, int(engine_name[-1]))
    rank, world = dist.get_rank(), dist.get_world_size()
    discard = None if rho == "off" else SmallLossDiscard(float(rho))
    kept_ids = []
    for s in range(P.STEPS):
        batches = [P.micro_batch(s, j, rank, world) for j in range(P.ACCUM)]
        if discard is None:
            for j, batch in enumerate(batches):
                with context(j):
                    backward(P.per_sample_loss(wrapped, batch).mean(), j)
        else:
            plan = discard.accumulate(batches, lambda b: P.per_sample_loss(wrapped, b), backward, context)
            if plan is not None:
                mine = torch.cat([b[2][m] for b, m in zip(batches, plan.masks)])
                parts = [None] * world
                dist.all_gather_object(parts, mine.tolist())
                kept_ids.append(sorted(i for part in parts for i in part))
        step()
    return {"params": params(), "kept_ids": kept_ids}


def main() -> None:
    out, runs = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(1)
    if any(r.startswith("zero") for r in runs):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    results = {}
    for run in runs:
        engine_name, rho = run.split(":")
        results[run] = train(engine_name, rho)
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
