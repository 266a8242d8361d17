"""Worker: the HF Trainer under DeepSpeed ZeRO-2 (2 ranks) with ``trainer_optimizer(lbopt.LAMB, ...)``.

The DeepSpeed config has no "optimizer" section, so the Trainer builds the optimizer through the
factory (named parameters) and DeepSpeed wraps it. Rank 0 writes what the optimizer saw and the
Trainer's log history as JSON.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import lbopt.integrations.deepspeed as lbopt_deepspeed  # noqa: E402

import lbopt  # noqa: E402

lbopt_deepspeed.install()  # explicit binding of the DeepSpeed adapter

from lbopt.integrations.trainer import log_layer_stats, trainer_optimizer, unwrap_optimizer  # noqa: E402
from transformers import Trainer  # noqa: E402

from tests.integrations.test_trainer import LR, README_EXCLUDE, _args, _dataset, _model  # noqa: E402
from tests.support import end_worker  # noqa: E402

DS_CONFIG = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": 0.0,
    "zero_optimization": {"stage": 2},
}


def main(out: str) -> None:
    args = _args(out + ".d", deepspeed=DS_CONFIG, ddp_backend="gloo", use_cpu=False, learning_rate=LR)
    trainer = Trainer(model=_model(), args=args, train_dataset=_dataset(),
                      optimizer_cls_and_kwargs=trainer_optimizer(lbopt.LAMB, lr=LR, weight_decay=0.0,
                                                                 exclude=README_EXCLUDE))
    log_layer_stats(trainer)
    trainer.train()
    opt = unwrap_optimizer(trainer.optimizer)
    if torch.distributed.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"optimizer": type(opt).__name__, "wrapper": type(trainer.optimizer).__name__,
                       "names": opt.table.names, "adapt": opt.table.adapt,
                       "log_history": trainer.state.log_history}, f)


if __name__ == "__main__":
    main(sys.argv[1])
    end_worker()
