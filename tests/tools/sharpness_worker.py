"""SharpnessMonitor on 2 ranks (torchrun, gloo, CPU) under DDP and DeepSpeed ZeRO-1/2, one launch.

``sharpness_worker.py OUT ENGINE [ENGINE ...]``, ENGINE in ``ddp``, ``zero1``, ``zero2``, ``zero3``.
Per engine: train with and without the monitor (parameters must match bit for bit), and record each
probe's numbers with the full parameters it saw, so the test can recompute them on one process.
ZeRO-3 records the monitor's error message.
"""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from lbopt.sharpness import SharpnessMonitor  # noqa: E402
from tests.tools import sharpness_problem as P  # noqa: E402


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def build(engine_name: str):
    model = P.make_model()
    if engine_name == "ddp":
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=P.LR)

        def step(loss):
            opt.zero_grad()
            loss.backward()
            opt.step()

        return ddp, opt, step, lambda: flat(model)
    import deepspeed

    cfg = {
        "train_micro_batch_size_per_gpu": P.MICRO,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": int(engine_name[-1])},
        "zero_allow_untested_optimizer": True,
    }
    opt = torch.optim.SGD(model.parameters(), lr=P.LR)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)

    def step(loss):
        engine.backward(loss)
        engine.step()

    def params():
        whole = engine_name == "zero3"
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())) if whole else nullcontext():
            return flat(engine.module)

    return engine, opt, step, params


def train(engine_name: str, watch: bool) -> dict:
    rank = dist.get_rank()
    model, opt, step, params = build(engine_name)
    monitor = SharpnessMonitor(model, P.loss_fn, P.probe_part(rank), every=P.EVERY, iters=P.ITERS, tol=P.TOL,
                               optimizer=opt) if watch else None
    seen, error = [], None
    for s in range(1, P.STEPS + 1):
        step(P.loss_fn(model, P.train_part(s, rank)))
        if monitor is not None:
            try:
                report = monitor.maybe_probe(s)
            except NotImplementedError as exc:
                error, monitor = str(exc), None
                continue
            if report is not None:
                seen.append({"step": s, "lambda_max": report.lambda_max, "layers": report.layer_rayleigh,
                             "gradient_rayleigh": report.gradient_rayleigh, "params": params()})
    return {"params": params(), "probes": seen, "error": error}


def main() -> None:
    out, engines = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(1)
    if any(e.startswith("zero") for e in engines):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    results = {}
    for name in engines:
        results[name] = {"with": train(name, True), "without": train(name, False) if name != "zero3" else None}
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
