"""2-process runs of the adaptive loop and Trainer (torchrun, gloo, CPU); launched by test_multiprocess.py.

Modes: ``ddp`` (AdaptiveBatchLoop on a bare DDP model, then AdaptiveBatchTrainer), ``deepspeed``
(AdaptiveBatchLoop on the engine Accelerate's DeepSpeed plugin builds, ZeRO-2) and
``trainer_deepspeed`` (AdaptiveBatchTrainer with ``deepspeed=`` ZeRO-2, then resumed mid-epoch). Every rank
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
from tests.support import end_worker  # noqa: E402

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


def _hf_dataset() -> list[dict]:
    """dataset() as the Trainer's list of feature dicts."""
    x, y, idx = dataset().tensors
    return [{"x": x[i], "labels": y[i], "idx": idx[i]} for i in range(N)]


def _zero_config(stage: int) -> dict:
    """The Trainer's DeepSpeed config: sizes and clipping filled from TrainingArguments."""
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_optimization": {"stage": stage}}


def _trainer_args(output_dir: str, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=P.MICRO, num_train_epochs=EPOCHS,
        lr_scheduler_type="constant", report_to=[], disable_tqdm=True,
        seed=0, ddp_backend="gloo", max_grad_norm=CLIP, dataloader_drop_last=True, **kw,
    )


def _trainer_result(t, model: _HFModel, world: int) -> dict:
    micro, k = [], 0
    for total in t.step_samples:  # group the micro-batches this rank ran by optimizer step
        n = total // (P.MICRO * world)
        micro.append(model.seen[k:k + n])
        k += n
    assert k == len(model.seen)
    params = list(model.net.parameters())
    if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3: gather the partitioned parameters
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            flat = P.flat(model.net).detach().clone()
    else:
        flat = P.flat(model.net).detach().clone()
    return {"sizes": list(t.step_samples), "micro": micro, "params": flat, "trainer_clip": t.args.max_grad_norm}


def trainer(rank: int, world: int) -> dict:
    from lbopt.integrations.adaptive_batch import AdaptiveBatchTrainer

    data = _hf_dataset()
    model = _HFModel()
    opt = ada.AdAdaGradNorm(model.parameters(), world_size=world, **{**OPT, "max_grad_norm": None})
    args = _trainer_args(os.environ["LBOPT_WORKER_TMP"], save_strategy="no", use_cpu=True)
    t = AdaptiveBatchTrainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    t.train()
    return {**_trainer_result(t, model, world), "opt_clip": opt.max_grad_norm}


def _ds_trainer(world: int, output_dir: str, resume: str | None = None, **kw) -> tuple:
    """AdaptiveBatchTrainer(deepspeed=ZeRO-2) with AdAdaGradNorm from optimizer_cls_and_kwargs."""
    from lbopt.integrations.adaptive_batch import AdaptiveBatchTrainer
    from lbopt.integrations.trainer import trainer_optimizer

    data = _hf_dataset()
    model = _HFModel()
    # LBOPT_ZERO_STAGE / LBOPT_DS_ROUTE=config: by-hand runs of the other stages and of the config route
    config = _zero_config(int(os.environ.get("LBOPT_ZERO_STAGE", 2)))
    opt_kwargs = {**OPT, "max_grad_norm": None, "world_size": world}
    factory = trainer_optimizer(ada.AdAdaGradNorm, **opt_kwargs)
    if os.environ.get("LBOPT_DS_ROUTE") == "config":
        from lbopt.integrations import deepspeed as adapter

        adapter.install()
        params = {k: v for k, v in opt_kwargs.items() if k != "max_grad_norm"}
        config["optimizer"] = {"type": "AdAdaGradNorm", "params": {**params, "lr": "auto"}}
        factory, kw = None, {**kw, "learning_rate": OPT["lr"]}
    args = _trainer_args(output_dir, deepspeed=config, accelerator_config={"use_configured_state": True}, **kw)
    t = AdaptiveBatchTrainer(model=model, args=args, train_dataset=data, optimizer_cls_and_kwargs=factory)
    t.train(resume_from_checkpoint=resume)
    return t, model


def _mid_epoch_checkpoint(output_dir: str, sizes: list[int]) -> tuple[str, int]:
    """The last checkpoint taken inside an epoch after the batch grew, and its optimizer step."""
    import json

    best = None
    for name in os.listdir(output_dir):
        if not name.startswith("checkpoint-"):
            continue
        step = int(name.split("-")[1])
        path = os.path.join(output_dir, name)
        with open(os.path.join(path, "trainer_state.json")) as f:
            attrs = json.load(f)["stateful_callbacks"]["_AdaptiveBatchState"]["attributes"]
        if 0 < attrs["micro_in_epoch"] < N // (2 * P.MICRO) and max(sizes[:step]) > sizes[0]:
            best = max(best or (0, ""), (step, path))
    assert best is not None, (os.listdir(output_dir), sizes)
    return best[1], best[0]


def trainer_deepspeed(rank: int, world: int) -> dict:
    """The full run (checkpoints every 2 steps), then a run resumed from a mid-epoch checkpoint."""
    tmp = os.environ["LBOPT_WORKER_TMP"]
    t, model = _ds_trainer(world, os.path.join(tmp, "full"), save_strategy="steps", save_steps=2)
    engine = t.model_wrapped
    full = {**_trainer_result(t, model, world), "engine_batch": engine.train_batch_size(),
            "engine_clip": float(engine.gradient_clipping()), "opt_clip": engine.basic_optimizer.max_grad_norm,
            "bound": type(engine).__name__ + ":" + str(vars(engine).get("lbopt_binding") is not None)}
    ckpt, step = _mid_epoch_checkpoint(os.path.join(tmp, "full"), full["sizes"])
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # a second Trainer in this process (the gloo process state stays)
    refused = _ready_made_optimizer_refusal(world, os.path.join(tmp, "refused"))
    AcceleratorState._reset_state()
    t2, model2 = _ds_trainer(world, os.path.join(tmp, "resumed"), resume=ckpt, save_strategy="no")
    resumed = {**_trainer_result(t2, model2, world), "from_step": step, "samples_seen": t2.samples_seen}
    return {"trainer": full, "resumed": resumed, "refused": refused}


def _ready_made_optimizer_refusal(world: int, output_dir: str) -> str:
    """``optimizers=(opt, None)`` under DeepSpeed (transformers would drop it and train AdamW): the message."""
    from lbopt.integrations.adaptive_batch import AdaptiveBatchTrainer

    model = _HFModel()
    opt = ada.AdAdaGradNorm(model.parameters(), world_size=world, **OPT)
    args = _trainer_args(output_dir, deepspeed=_zero_config(2), accelerator_config={"use_configured_state": True})
    try:
        AdaptiveBatchTrainer(model=model, args=args, train_dataset=[], optimizers=(opt, None))
    except ValueError as exc:
        return str(exc)
    return ""


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
    if mode == "trainer_deepspeed":
        # TrainingArguments(deepspeed=...) sets up Accelerate's state without a backend, which on a machine
        # without GPUs means one process; a state configured beforehand (gloo) is used as it is.
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        from accelerate import PartialState

        PartialState(backend="gloo")
    elif mode == "deepspeed":
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    res = {"ddp": ddp, "deepspeed": deepspeed_loop, "trainer_deepspeed": trainer_deepspeed}[mode](rank, world)
    torch.save(res, f"{out}.rank{rank}")
    end_worker()


if __name__ == "__main__":
    main()
