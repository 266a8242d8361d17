"""2-process runs of the adaptive loop and Trainer (torchrun, gloo, CPU); launched by test_multiprocess.py.

Modes: ``ddp`` (AdaptiveBatchLoop on a bare DDP model, then AdaptiveBatchTrainer) and ``deepspeed``
(AdaptiveBatchLoop on the engine Accelerate's DeepSpeed plugin builds, ZeRO-2). Every rank
writes, per run, the global batch of every step, the sample indices of every micro-batch it
ran (in order, per step) and the final parameters.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import lbopt.optim.adagrad as ada  # noqa: E402
from tests.batch import problem as P  # noqa: E402

N, EPOCHS, CLIP = 120, 2, 0.5
OPT = dict(lr=0.3, initial_batch_size=16, max_batch_size=64, micro_batch_size=P.MICRO, eta=0.8, max_grad_norm=CLIP)


def dataset() -> torch.utils.data.TensorDataset:
    x, y = P.micro_batch(7, N)
    return torch.utils.data.TensorDataset(x, y, torch.arange(N))


def run_loop(model, opt, loader, accelerator=None, sampler=None) -> dict:
    from lbopt.integrations.adaptive_batch import AdaptiveBatchLoop

    loop = AdaptiveBatchLoop(model, opt, accelerator=accelerator)
    steps: list[list[list[int]]] = []
    for epoch in range(EPOCHS):
        if sampler is not None:
            sampler.set_epoch(epoch)
        for step in loop.steps(loader):
            micro = []
            for xb, yb, ib in step:
                micro.append(ib.tolist())
                step.backward(P.loss_fn(model, xb, yb))
            steps.append(micro)
    return {"sizes": loop.batch_sizes, "micro": steps}


def ddp(rank: int, world: int) -> dict:
    out = {}
    model = P.make_model()
    ddp_model = torch.nn.parallel.DistributedDataParallel(model)
    opt = ada.AdAdaGradNorm(model.parameters(), world_size=world, **OPT)
    sampler = torch.utils.data.DistributedSampler(dataset(), shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(dataset(), batch_size=P.MICRO, sampler=sampler)
    out["loop"] = {**run_loop(ddp_model, opt, loader, sampler=sampler), "params": P.flat(model)}
    out["trainer"] = trainer(rank, world)
    return out


class _HFModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = P.make_model()
        self.seen: list[list[int]] = []

    def forward(self, x, labels=None, idx=None):
        self.seen.append(idx.tolist())
        out = self.net(x)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


def trainer(rank: int, world: int) -> dict:
    from lbopt.integrations.adaptive_batch import AdaptiveBatchTrainer
    from transformers import TrainingArguments

    x, y, idx = dataset().tensors
    data = [{"x": x[i], "labels": y[i], "idx": idx[i]} for i in range(N)]
    model = _HFModel()
    opt = ada.AdAdaGradNorm(model.parameters(), world_size=world, **{**OPT, "max_grad_norm": None})
    args = TrainingArguments(
        output_dir=os.environ["LBOPT_WORKER_TMP"], per_device_train_batch_size=P.MICRO, num_train_epochs=EPOCHS,
        lr_scheduler_type="constant", report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
        seed=0, ddp_backend="gloo", max_grad_norm=CLIP, dataloader_drop_last=True,
    )
    t = AdaptiveBatchTrainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    t.train()
    micro, k = [], 0
    for total in t.step_samples:  # group the micro-batches this rank ran by optimizer step
        n = total // (P.MICRO * world)
        micro.append(model.seen[k:k + n])
        k += n
    assert k == len(model.seen)
    return {"sizes": list(t.step_samples), "micro": micro, "params": P.flat(model.net),
            "trainer_clip": t.args.max_grad_norm, "opt_clip": opt.max_grad_norm}


def deepspeed_loop(rank: int, world: int) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs
    from lbopt.integrations import deepspeed as adapter

    adapter.install()
    cfg = {"train_micro_batch_size_per_gpu": P.MICRO, "gradient_accumulation_steps": 2,
           "gradient_clipping": 0.0, "zero_optimization": {"stage": 2}, "zero_force_ds_cpu_optimizer": False}
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg),
                              kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    model = P.make_model()
    opt = ada.AdAdaGradNorm(model.parameters(), world_size=world, **OPT)
    loader = torch.utils.data.DataLoader(dataset(), batch_size=P.MICRO, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    engine, opt, loader = accelerator.prepare(model, opt, loader)
    res = run_loop(engine, opt, loader, accelerator=accelerator)
    res["engine_batch"] = engine.train_batch_size()
    return {"loop": {**res, "params": P.flat(engine.module).detach().clone()}}


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    if mode == "deepspeed":
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    res = ddp(rank, world) if mode == "ddp" else deepspeed_loop(rank, world)
    torch.save(res, f"{out}.rank{rank}")
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
