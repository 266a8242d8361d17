"""Worker for the HF Trainer route: ``TrainingArguments(deepspeed=config)`` whose optimizer is "CBLR"."""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from lbopt.integrations import deepspeed as adapter  # noqa: E402

from tests.support import end_worker  # noqa: E402

# The Trainer calls deepspeed.initialize itself: the config route needs the explicit opt-in.
adapter.install()

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

DS_CONFIG = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_optimization": {"stage": 3},
    "optimizer": {"type": "CBLR", "params": {"lr": "auto", "weight_decay": "auto", "momentum": 0.9}},
}


class Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict:
        ids = torch.randint(0, 500, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def main(out: str) -> None:
    args = TrainingArguments(
        output_dir=out + ".d", per_device_train_batch_size=4, max_steps=4, learning_rate=0.5, weight_decay=0.01,
        deepspeed=DS_CONFIG, report_to=[], save_strategy="no", ddp_backend="gloo",
    )
    cfg = GPT2Config(vocab_size=500, n_positions=32, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    trainer = Trainer(model=GPT2LMHeadModel(cfg), args=args, train_dataset=Tokens())
    result = trainer.train()
    opt = trainer.model_wrapped.basic_optimizer
    if torch.distributed.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"basic": type(opt).__name__, "adapted": sum(opt.table.adapt), "layers": opt.table.num_layers,
                       "loss": result.training_loss}, f)


if __name__ == "__main__":
    main(sys.argv[1])
    end_worker()
