"""The HF Trainer with lbopt.CBLR, FSDP2-sharded on CPU ranks (``CPUFSDPTrainer``) or dense in one process.

``torchrun --nproc_per_node 2 fsdp_trainer_worker.py OUT``: TrainingArguments(fsdp="full_shard",
fsdp_config={"fsdp_version": 2}), 4 sequences per rank, checkpoint at STEPS/2; then resumed from
it (CPUFSDPTrainer, and the control without lbopt's per-layer state). ``train(OUT, sharded=False)``
in one process: 8 sequences per step, the same global batches (sequential sampling). Each writes
the final full parameters (rank 0) and what the ranks saw of their parameters.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from lbopt.integrations.cpu_fsdp import CPUFSDPTrainer
from lbopt.integrations.trainer import trainer_optimizer, unwrap_optimizer
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import lbopt

STEPS = 10
GLOBAL_BATCH = 8


class Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return STEPS * GLOBAL_BATCH

    def __getitem__(self, i: int) -> dict:
        ids = torch.randint(0, 96, (12,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=96, n_positions=16, n_embd=24, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False)
    return GPT2LMHeadModel(cfg)


class WithoutLayerState(CPUFSDPTrainer):
    """The control: resumes as the plain Trainer does under FSDP (DCP only, lbopt's per-layer state lost)."""

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        Trainer._load_optimizer_and_scheduler(self, checkpoint)


def train(out: str, sharded: bool, resume: str | None = None, cls: type[Trainer] | None = None) -> None:
    """Train STEPS steps (or resume and finish); write OUT.rank<r>.json and OUT.pt (full parameters)."""
    world = int(os.environ["WORLD_SIZE"]) if sharded else 1
    fsdp = {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"]},
            "ddp_backend": "gloo", "save_strategy": "steps", "save_steps": STEPS // 2} if sharded else {
                "save_strategy": "no"}
    args = TrainingArguments(
        output_dir=os.path.dirname(out) + "/trainer", per_device_train_batch_size=GLOBAL_BATCH // world,
        max_steps=STEPS, train_sampling_strategy="sequential", max_grad_norm=0.0, report_to=[], logging_steps=1,
        use_cpu=True, **fsdp,
    )
    cls = cls or (CPUFSDPTrainer if sharded else Trainer)
    optimizer = trainer_optimizer(lbopt.CBLR, lr=1.0, momentum=0.9, weight_decay=1e-3)
    trainer = cls(model=model(), args=args, train_dataset=Tokens(), optimizer_cls_and_kwargs=optimizer)
    trainer.train(resume_from_checkpoint=resume)
    params = list(trainer.model.named_parameters())
    local = {n: [type(p).__name__, list(getattr(p, "_local_tensor", p).shape), list(p.shape)] for n, p in params}
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in params}
    rank = torch.distributed.get_rank() if sharded else 0
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump({"cpu_fsdp": getattr(trainer, "cpu_fsdp", False), "distributed_type": str(
            trainer.accelerator.distributed_type), "optimizer": type(unwrap_optimizer(trainer.optimizer)).__name__,
            "local": local, "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}, f)
    if rank == 0:
        torch.save(full, out + ".pt")


if __name__ == "__main__":  # sharded: the run (saving at STEPS/2), then resumed from there, with and without
    base = sys.argv[1]
    train(base, sharded=True)
    checkpoint = os.path.dirname(base) + f"/trainer/checkpoint-{STEPS // 2}"
    train(base + "-resumed", sharded=True, resume=checkpoint)
    train(base + "-resumed-without-layer-state", sharded=True, resume=checkpoint, cls=WithoutLayerState)
