"""AdAdaGradNorm through deepspeed.initialize (ZeRO-2, gloo, CPU) with a growing batch.

Launched by torchrun from test_deepspeed.py; writes the final parameters and the batch
trajectory as a torch file.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed  # noqa: E402
from lbopt.integrations import deepspeed as adapter  # noqa: E402
from lbopt.integrations.adaptive_batch import attach_deepspeed, deepspeed_steps  # noqa: E402

from tests.batch import dist_worker as W  # noqa: E402
from tests.batch import problem as P  # noqa: E402
from tests.support import end_worker  # noqa: E402


def main() -> None:
    stage, out = int(sys.argv[1]), sys.argv[2]
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.set_num_threads(1)
    model = P.make_model()
    params = dict(lr=0.3, test="norm", **W.CTRL, **W.TEST_KW["norm"])
    cfg = {
        "train_micro_batch_size_per_gpu": P.MICRO,
        "gradient_accumulation_steps": W.CTRL["initial_batch_size"] // (P.MICRO * world),
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,  # the test statistic and the dense run use the unclipped gradient
        "zero_optimization": {"stage": stage},
        "zero_force_ds_cpu_optimizer": False,
        "optimizer": {"type": "AdAdaGradNorm", "params": params},
    }
    engine, _, _, _ = adapter.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    ctrl = attach_deepspeed(engine)
    stream = (P.micro_batch(rank + world * i) for i in range(10**6))
    sizes = []
    for step, (micro, backward) in enumerate(deepspeed_steps(engine, stream, ctrl)):
        sizes.append(ctrl.batch_size)
        assert engine.train_batch_size() == ctrl.batch_size
        for x, y in micro:
            backward(P.loss_fn(engine, x, y))
        if step + 1 == W.STEPS:
            break
    if stage == 3:
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            flat = P.flat(engine.module)
    else:
        flat = P.flat(engine.module)
    if rank == 0:
        torch.save({"params": flat, "sizes": sizes, "b_sq": engine.basic_optimizer.accumulator}, out)
    end_worker()


if __name__ == "__main__":
    main()
