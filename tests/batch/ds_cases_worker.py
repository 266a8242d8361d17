"""Every adaptive-batch case of :mod:`tests.batch.cases` through ``deepspeed.initialize`` (gloo, CPU).

Launched by torchrun from ``test_zero_cases.py`` with the ZeRO stages to run; one process
group serves all stages and cases. Writes ``{(stage, case): {params, sizes, reasons}}``.
"""

from __future__ import annotations

import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed  # noqa: E402
from lbopt.integrations import deepspeed as adapter  # noqa: E402
from lbopt.integrations.deepspeed.batch import attach_deepspeed, deepspeed_steps  # noqa: E402

from tests.batch import cases as C  # noqa: E402
from tests.batch import problem as P  # noqa: E402
from tests.support import end_worker  # noqa: E402


def run(case: C.Case, stage_spec: str, rank: int, world: int) -> dict:
    stage = int(stage_spec[0])
    zero: dict = {"stage": stage}
    if stage_spec.endswith("o"):  # optimizer state and step on CPU (here: everything is on CPU anyway)
        zero["offload_optimizer"] = {"device": "cpu"}
    model = P.make_model()
    cfg = {
        "train_micro_batch_size_per_gpu": P.MICRO,
        "gradient_accumulation_steps": C.CTRL["initial_batch_size"] // (P.MICRO * world),
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,  # clipping, where a case asks for it, is the optimizer's max_grad_norm
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,
        "optimizer": {"type": case.optimizer, "params": case.params(world)},
    }
    engine, _, _, _ = adapter.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    ctrl = attach_deepspeed(engine)
    stream = (P.micro_batch(rank + world * i) for i in range(10**6))
    sizes, reasons = [], []
    for step, (micro, backward) in enumerate(deepspeed_steps(engine, stream, ctrl)):
        sizes.append(ctrl.batch_size)
        assert engine.train_batch_size() == ctrl.batch_size
        for x, y in micro:
            backward(P.loss_fn(engine, x, y))
        reasons.append(ctrl.last.reason)
        if step + 1 == C.STEPS:
            break
    if stage == 3:
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            flat = C.to_cpu(P.flat(engine.module))
    else:
        flat = C.to_cpu(P.flat(engine.module))
    return {"params": flat, "sizes": sizes, "reasons": reasons}


def main() -> None:
    stages = sys.argv[1].split(",")  # "1", "2", "3", "2o" (ZeRO-2 with CPU optimizer offload)
    names = sys.argv[2].split(",")
    out = sys.argv[3]
    warnings.simplefilter("ignore")
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.set_num_threads(1)
    results = {}
    for stage in stages:
        for name in names:
            t0 = time.perf_counter()
            results[(stage, name)] = run(C.BY_NAME[name], stage, rank, world)
            if rank == 0 and os.environ.get("LBOPT_TEST_VERBOSE"):
                print(f"stage {stage} {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    if rank == 0:
        torch.save(results, out)
    end_worker()


if __name__ == "__main__":
    main()
