"""Shared machinery of the lbopt recipes: arguments, validation, optimizer, training loop, outputs.

A recipe (``classification.py``, ``causal_lm.py``) supplies a :class:`Task` (how to load its
data, build its model, batch and evaluate) and calls :func:`main`. Everything that can be wrong
with the command line -- an unknown optimizer, a global batch that does not split into
micro-batch x accumulation x world size, a missing column, an unreadable config file -- is
checked by :func:`parse_args` *before* any process group or ``Accelerator`` exists, and reported
as one line (``SystemExit``).

Global batch B, world size W, micro-batch m and accumulation a satisfy B = m * a * W exactly; every
optimizer step sees exactly B samples (micro-batches stream across epoch boundaries, so no step is
short). The learning rate follows ``lr * s(B / reference_batch_size)`` with s = 1, x or sqrt(x),
a linear warm-up and then the chosen decay.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OPTIMIZERS = ("cblr", "mclr", "lamb", "lars", "adadagrad", "adadagradnorm", "adamw")
LR_SCALING = ("none", "linear", "sqrt")
SCHEDULES = ("linear", "cosine", "constant")
REPORT_TO = ("tensorboard", "wandb", "all", "none")
ADAPTIVE_OPTIMIZERS = ("adadagrad", "adadagradnorm")  # own a BatchSizeController: the global batch grows


def die(message: str) -> None:
    """Stop with a one-line error (no traceback), the same way on every rank."""
    raise SystemExit(f"error: {message}")


@dataclass
class Task:
    """What a recipe adds to the shared loop."""

    name: str
    default_model: str
    default_dataset: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    # (args) -> DatasetDict; raise ValueError for user errors (reported as one line)
    load_data: Callable[[argparse.Namespace], Any]
    # (args, raw DatasetDict) -> (model, tokenizer, train Dataset, eval Dataset, collate_fn)
    build: Callable[[argparse.Namespace, Any], tuple]
    # (model outputs, batch) -> (predictions, references) tensors for the metrics
    predictions: Callable[[Any, dict], tuple]
    metrics: tuple[str, ...] = ("accuracy",)
    extra_eval: Callable[[float], dict] = field(default=lambda mean_loss: {})


# --------------------------------------------------------------------------------------------
# arguments and validation (no process group exists yet)
# --------------------------------------------------------------------------------------------


def build_parser(task: Task) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=f"lbopt recipe: {task.name}")
    p.add_argument("--model", default=task.default_model, help="hub name or local checkpoint folder")
    p.add_argument(
        "--dataset",
        default=task.default_dataset,
        help="'stdlib-topics' (shipped, offline), a local csv/tsv/json/jsonl/parquet file or folder, or a hub name",
    )
    p.add_argument("--validation_file", default=None, help="local validation file (with a local --dataset file)")
    p.add_argument("--text_column", default="text")
    p.add_argument("--max_train_samples", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--max_eval_samples", type=int, default=None)
    p.add_argument("--optimizer", default="lamb", type=str.lower, help=f"one of {', '.join(OPTIMIZERS)}")
    p.add_argument(
        "--optimizer_args", default="{}", help="extra optimizer keyword arguments as JSON, e.g. '{\"eps\": 1e-6}'"
    )
    p.add_argument("--global_batch_size", type=int, default=1024, help="samples per optimizer step, all ranks")
    p.add_argument("--per_device_batch_size", type=int, default=32, help="micro-batch per process")
    p.add_argument(
        "--max_global_batch_size",
        type=int,
        default=None,
        help="adadagrad/adadagradnorm: cap of the adaptive global batch (default: 8 x --global_batch_size); "
        "--global_batch_size is the initial batch",
    )
    p.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=None,
        help="default: global_batch_size / (per_device_batch_size * world size)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate at --reference_batch_size (default: the optimizer's own default; adamw: 1e-4)",
    )
    p.add_argument(
        "--lr_scaling",
        default="sqrt",
        choices=LR_SCALING,
        help="scale --lr by (global/reference) (linear) or its square root (sqrt)",
    )
    p.add_argument("--reference_batch_size", type=int, default=256)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--warmup_ratio", type=float, default=0.1, help="fraction of steps warming up linearly")
    p.add_argument("--warmup_steps", type=int, default=None, help="overrides --warmup_ratio")
    p.add_argument("--lr_schedule", default="linear", choices=SCHEDULES, help="decay after warm-up")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--num_epochs", type=float, default=3.0)
    p.add_argument("--max_steps", type=int, default=None, help="overrides --num_epochs")
    p.add_argument(
        "--stop_after_steps",
        type=int,
        default=None,
        help="end (after a final evaluation) at this step; the LR schedule stays laid out for --max_steps",
    )
    p.add_argument(
        "--time_budget_s",
        type=float,
        default=None,
        help="stop (after a final evaluation) before one more step would pass this many seconds "
        "of training; the LR schedule stays laid out for the full run",
    )
    p.add_argument("--max_seq_length", type=int, default=128)
    p.add_argument("--eval_steps", type=int, default=0, help="evaluate every N steps (always at the end)")
    p.add_argument("--eval_batch_size", type=int, default=None, help="default: --per_device_batch_size * 2")
    p.add_argument("--checkpoint_steps", type=int, default=0, help="save_state every N steps (0: only at the end)")
    p.add_argument("--no_final_checkpoint", action="store_true")
    p.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest'")
    p.add_argument("--output_dir", default="outputs/run")
    p.add_argument("--report_to", default="tensorboard", choices=REPORT_TO)
    p.add_argument("--run_name", default=None)
    p.add_argument(
        "--deepspeed_config",
        default=None,
        help="DeepSpeed JSON (otherwise the one named by the accelerate config, if any)",
    )
    p.add_argument("--mixed_precision", default="no", choices=("no", "fp16", "bf16"))
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--log_steps", type=int, default=1)
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--world_size", type=int, default=None, help=argparse.SUPPRESS)  # for tests
    task.add_arguments(p)
    return p


def world_size_from_env() -> int:
    for var in ("WORLD_SIZE", "ACCELERATE_NUM_PROCESSES"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except OSError as err:
        die(f"{what} {path!r} cannot be read: {err.strerror or err}")
    except json.JSONDecodeError as err:
        die(f"{what} {path!r} is not valid JSON: {err.msg} (line {err.lineno})")
    return {}  # unreachable


def deepspeed_config_path(args: argparse.Namespace) -> str | None:
    """The DeepSpeed JSON this run will use: --deepspeed_config, else the accelerate launcher's."""
    return args.deepspeed_config or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None


def resolve_batch(args: argparse.Namespace) -> None:
    """Fill args.world_size / per_device_batch_size / gradient_accumulation_steps so B = m * a * W."""
    world = args.world_size or world_size_from_env()
    B, m = args.global_batch_size, args.per_device_batch_size
    if B <= 0 or m <= 0 or world <= 0:
        die(f"--global_batch_size ({B}) and --per_device_batch_size ({m}) must be positive")
    if args.gradient_accumulation_steps is not None:
        a = args.gradient_accumulation_steps
        if a <= 0 or B % (a * world):
            die(f"--global_batch_size {B} is not divisible by gradient_accumulation_steps {a} x world size {world}")
        m = B // (a * world)
    else:
        if B % (m * world):
            valid = m * world
            die(
                f"--global_batch_size {B} is not divisible by per_device_batch_size {m} x world size {world} "
                f"= {valid}; use a multiple of {valid}, e.g. {max(valid, B // valid * valid)}"
            )
        a = B // (m * world)
    args.world_size, args.per_device_batch_size, args.gradient_accumulation_steps = world, m, a


def _check_adaptive(args: argparse.Namespace) -> None:
    """AdAdaGrad*: validate the adaptive batch (B_max, engine) before any process group exists."""
    unit = args.per_device_batch_size * args.world_size
    if args.max_global_batch_size is None:
        args.max_global_batch_size = 8 * args.global_batch_size
    B, B_max = args.global_batch_size, args.max_global_batch_size
    if B_max < B or B_max % unit:
        die(
            f"--max_global_batch_size {B_max} must be >= --global_batch_size {B} and a multiple of "
            f"per_device_batch_size x world size = {unit}"
        )
    if args.optimizer_kwargs.get("estimator", "microbatch") == "microbatch" and B // args.per_device_batch_size < 2:
        die(
            f"--optimizer {args.optimizer} estimates gradient noise from micro-batches: --global_batch_size {B} "
            f"needs at least 2 micro-batches of --per_device_batch_size {args.per_device_batch_size}"
        )
    if deepspeed_config_path(args) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        die(
            f"--optimizer {args.optimizer} (adaptive batch) is not supported under DeepSpeed by the recipes yet; "
            "launch without DeepSpeed (e.g. integrations/accelerate/cpu.yaml or a plain multi-GPU config)"
        )


def default_lr(optimizer: str) -> float:
    """The optimizer class's own default rate (LARS-style rules: 1.0 times a small trust coefficient)."""
    if optimizer == "adamw":
        return 1e-4
    import inspect

    import lbopt

    return float(inspect.signature(lbopt.get_optimizer_class(optimizer)).parameters["lr"].default)


def scaled_lr(args: argparse.Namespace) -> float:
    ratio = args.global_batch_size / args.reference_batch_size
    return args.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[args.lr_scaling]


def parse_args(task: Task, argv: list[str] | None = None) -> tuple[argparse.Namespace, Any]:
    """Parse and validate everything; return (args, raw DatasetDict). One-line SystemExit on error."""
    args = build_parser(task).parse_args(argv)
    if args.optimizer not in OPTIMIZERS:
        die(f"--optimizer {args.optimizer!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")
    try:
        args.optimizer_kwargs = json.loads(args.optimizer_args)
    except json.JSONDecodeError as err:
        die(f"--optimizer_args is not valid JSON: {err.msg}")
    if not isinstance(args.optimizer_kwargs, dict):
        die("--optimizer_args must be a JSON object")
    if args.reference_batch_size <= 0:
        die(f"--reference_batch_size must be positive, got {args.reference_batch_size}")
    if args.optimizer != "adamw":
        try:
            import lbopt

            lbopt.get_optimizer_class(args.optimizer)
        except (ImportError, AttributeError, ValueError) as err:
            die(f"--optimizer {args.optimizer!r} is not available from lbopt: {str(err).splitlines()[0]}")
    if args.lr is None:
        args.lr = default_lr(args.optimizer)
    if args.lr <= 0:
        die(f"--lr must be positive, got {args.lr}")
    if not 0 <= args.warmup_ratio < 1:
        die(f"--warmup_ratio must be in [0, 1), got {args.warmup_ratio}")
    resolve_batch(args)
    if args.optimizer in ADAPTIVE_OPTIMIZERS:
        _check_adaptive(args)
    ds_path = deepspeed_config_path(args)
    args.deepspeed_settings = _read_json(ds_path, "DeepSpeed config") if ds_path else None
    if args.deepspeed_settings is not None and "optimizer" in args.deepspeed_settings:
        die(f"DeepSpeed config {ds_path!r} names an optimizer; the recipes build it from --optimizer: remove it")
    for var, what in (("ACCELERATE_CONFIG_FILE", "accelerate config"),):
        if os.environ.get(var) and not os.access(os.environ[var], os.R_OK):
            die(f"{what} {os.environ[var]!r} cannot be read")
    if (
        args.resume_from_checkpoint
        and args.resume_from_checkpoint != "latest"
        and not Path(args.resume_from_checkpoint).is_dir()
    ):
        die(f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is not a folder")
    if args.report_to in ("wandb", "all"):
        import importlib.util

        if args.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
            die("--report_to wandb needs the wandb package (pip install wandb)")
    try:
        raw = task.load_data(args)
    except (ValueError, FileNotFoundError) as err:
        die(str(err).splitlines()[0])
    except Exception as err:  # noqa: BLE001 - hub/network errors become one line too
        die(f"--dataset {args.dataset!r} could not be loaded: {type(err).__name__}: {str(err).splitlines()[0]}")
    return args, raw


# --------------------------------------------------------------------------------------------
# optimizer and schedule
# --------------------------------------------------------------------------------------------


def param_groups(model, weight_decay: float) -> list[dict]:
    """Two groups of (name, parameter) pairs: decayed matrices, and undecayed biases/norm weights."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append((name, param))
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def create_optimizer(args: argparse.Namespace, model, lr: float):
    import torch

    groups = param_groups(model, args.weight_decay)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **args.optimizer_kwargs)
    import lbopt

    try:  # exact layer statistics on ZeRO partitions; a no-op when already installed
        from lbopt.integrations import deepspeed as deepspeed_adapter

        deepspeed_adapter.install()
    except ImportError:
        pass
    cls = lbopt.get_optimizer_class(args.optimizer)
    kwargs = dict(args.optimizer_kwargs)
    if args.optimizer in ADAPTIVE_OPTIMIZERS:  # the BatchSizeController, from the batch arguments
        kwargs.setdefault("initial_batch_size", args.global_batch_size)
        kwargs.setdefault("max_batch_size", args.max_global_batch_size)
        kwargs.setdefault("micro_batch_size", args.per_device_batch_size)
        kwargs.setdefault("world_size", args.world_size)
    return cls(groups, lr=lr, weight_decay=args.weight_decay, **kwargs)


def lr_lambda(args: argparse.Namespace, total_steps: int) -> Callable[[int], float]:
    warmup = args.warmup_steps if args.warmup_steps is not None else int(args.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if args.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if args.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return factor


# --------------------------------------------------------------------------------------------
# training state that travels with accelerator.save_state
# --------------------------------------------------------------------------------------------


@dataclass
class Progress:
    step: int = 0
    samples: int = 0
    elapsed: float = 0.0
    history: list[dict] = field(default_factory=list)  # one record per optimizer step
    evals: list[dict] = field(default_factory=list)

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "samples": self.samples,
            "elapsed": self.elapsed,
            "history": self.history,
            "evals": self.evals,
        }

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


def _configure_deepspeed(accelerator, args: argparse.Namespace) -> bool:
    """Adjust the DeepSpeed config for a client optimizer; return whether DeepSpeed is in use."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return False
    cfg = plugin.deepspeed_config
    # lbopt's optimizers are not on DeepSpeed's tested list (until lbopt.integrations.deepspeed registers them)
    cfg["zero_allow_untested_optimizer"] = True
    zero = cfg.get("zero_optimization", {})
    if zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None):
        # a client (non DeepSpeedCPUAdam) optimizer running on the offloaded CPU partition
        cfg["zero_force_ds_cpu_optimizer"] = False
    if cfg.get("gradient_clipping", "auto") == "auto":
        cfg["gradient_clipping"] = args.max_grad_norm
    return True


def _trackers(args: argparse.Namespace) -> list[str]:
    import importlib.util

    if args.report_to == "none":
        return []
    if args.report_to == "all":
        return ["tensorboard"] + (["wandb"] if importlib.util.find_spec("wandb") else [])
    return [args.report_to]


def _latest_checkpoint(output_dir: Path) -> Path | None:
    ckpts = sorted((output_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    return ckpts[-1] if ckpts else None


def _scalar_stats(stats: Any) -> dict[str, float]:
    """The optimizer's per-layer statistics, if it exposes any, as flat name -> float."""
    if not isinstance(stats, dict):
        return {}
    out = {}
    for key, value in stats.items():
        try:
            out[str(key)] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def main(task: Task, argv: list[str] | None = None) -> dict:
    t0 = time.time()
    args, raw = parse_args(task, argv)  # all user errors surface here, before any process group

    import warnings

    import torch
    from accelerate import Accelerator
    from accelerate.utils import (
        DataLoaderConfiguration,
        GradientAccumulationPlugin,
        InitProcessGroupKwargs,
        set_seed,
    )
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from lbopt.metrics import load_metric

    # torch's collective renames, hit inside DeepSpeed on every step: nothing a user can act on
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    output_dir = Path(args.output_dir)
    deepspeed_plugin = None
    if args.deepspeed_config:
        from accelerate.utils import DeepSpeedPlugin

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=args.deepspeed_settings)
    handlers = []
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and not torch.accelerator.is_available():
        # DeepSpeed on CPU (DS_ACCELERATOR=cpu): accelerate only counts the ranks when told the backend
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    deepspeed_requested = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    adaptive = args.optimizer in ADAPTIVE_OPTIMIZERS  # checked in parse_args: not under DeepSpeed
    accelerator = Accelerator(
        # no accelerator at all: torchrun-launched ranks (integrations/accelerate/cpu.yaml) run gloo DDP on CPU
        cpu=not deepspeed_requested and not torch.accelerator.is_available(),
        kwargs_handlers=handlers,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            # adaptive batch: AdaptiveBatchLoop accumulates itself (Accelerate must not)
            num_steps=1 if adaptive else args.gradient_accumulation_steps,
            sync_with_dataloader=False,
            adjust_scheduler=False,
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        mixed_precision=args.mixed_precision,
        log_with=_trackers(args) or None,
        project_dir=str(output_dir),
        deepspeed_plugin=deepspeed_plugin,
    )
    if accelerator.num_processes != args.world_size:
        die(f"launched with {accelerator.num_processes} processes but the batch was split for {args.world_size}")
    set_seed(args.seed)
    if not accelerator.is_main_process:  # one copy of the library chatter is enough
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.set_verbosity_error()
    uses_deepspeed = _configure_deepspeed(accelerator, args)

    with accelerator.main_process_first():
        model, tokenizer, train_ds, eval_ds, collate = task.build(args, raw)
    train_dl = DataLoader(
        train_ds,
        batch_size=args.per_device_batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate,
        num_workers=args.num_workers,
    )
    eval_dl = DataLoader(
        eval_ds,
        batch_size=args.eval_batch_size or 2 * args.per_device_batch_size,
        collate_fn=collate,
        num_workers=args.num_workers,
    )
    micro_per_epoch = len(train_ds) // (args.per_device_batch_size * args.world_size)
    if micro_per_epoch == 0:
        die(f"the training set ({len(train_ds)} examples) is smaller than one micro-batch on every rank")
    if args.max_steps:
        total_steps = args.max_steps
    else:
        total_steps = max(1, math.ceil(args.num_epochs * micro_per_epoch / args.gradient_accumulation_steps))

    lr = scaled_lr(args)
    optimizer = create_optimizer(args, model, lr)
    client_optimizer = optimizer
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args, total_steps))
    model, optimizer, train_dl, eval_dl = accelerator.prepare(model, optimizer, train_dl, eval_dl)
    # not prepared: stepped once per optimizer step by us, on the same param_group dicts DeepSpeed uses
    accelerator.register_for_checkpointing(scheduler)
    progress = Progress()
    accelerator.register_for_checkpointing(progress)

    resume = args.resume_from_checkpoint
    if resume == "latest":
        resume = _latest_checkpoint(output_dir)
    if resume:
        accelerator.load_state(str(resume))
        accelerator.print(f"resumed from {resume} at step {progress.step}")

    run_config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
    run_config["scaled_lr"] = lr
    accelerator.init_trackers(args.run_name or f"{task.name}-{args.optimizer}", config=run_config)
    metrics = {name: load_metric(name) for name in task.metrics}

    def evaluate() -> dict:
        model.eval()
        losses, preds, refs = [], [], []
        with torch.no_grad():
            for batch in eval_dl:
                out = model(**batch)
                n = batch["labels"].shape[0]
                losses.append(accelerator.gather_for_metrics(out.loss.detach().float().repeat(n)))
                p, r = task.predictions(out, batch)
                p, r = accelerator.gather_for_metrics((p.contiguous(), r.contiguous()))
                preds.append(p.cpu())
                refs.append(r.cpu())
        model.train()
        pred, ref = torch.cat(preds).numpy(), torch.cat(refs).numpy()
        result = {"eval_loss": float(torch.cat(losses).mean())}
        for name, metric in metrics.items():
            kwargs = {"average": "macro"} if name == "f1" else {}
            value = metric.compute(predictions=pred, references=ref, **kwargs)
            result.update({f"eval_{k}": float(v) for k, v in value.items()})
        result.update(task.extra_eval(result["eval_loss"]))
        return result

    def micro_batches(start: int) -> Iterator[dict]:
        epoch, skip = divmod(start, len(train_dl))
        while True:
            train_dl.set_epoch(epoch)
            loader = accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
            # Starting an epoch draws a worker seed from the global RNG, which also drives dropout; keep
            # that draw out of the global stream so a resumed run (which starts its epoch at a different
            # moment) sees the same dropout masks as the original.
            rng = torch.random.get_rng_state()
            iterator = iter(loader)
            first = next(iterator, None)
            torch.random.set_rng_state(rng)
            if first is not None:
                yield first
                yield from iterator
            epoch, skip = epoch + 1, 0

    def save(step: int) -> None:
        accelerator.save_state(str(output_dir / "checkpoints" / f"step_{step}"))

    model.train()
    if adaptive:
        from lbopt.integrations.adaptive_batch import AdaptiveBatchLoop

        # fixed micro-batch, accumulation count from the optimizer's controller; the LR scheduler stays
        # ours (one tick per optimizer step); the controller's state is in the optimizer's checkpoint
        loop = AdaptiveBatchLoop(model, optimizer, accelerator=accelerator, lr_scheduler=None)
        controller = loop.controller
        stream = micro_batches(progress.samples // (args.per_device_batch_size * args.world_size))
        adaptive_iter = loop.steps(stream)
        # --num_epochs: the run ends once that much data is seen (steps get larger as the batch grows)
        sample_budget = None if args.max_steps else args.num_epochs * micro_per_epoch * (
            args.per_device_batch_size * args.world_size
        )
    else:
        stream = micro_batches(progress.step * args.gradient_accumulation_steps)
    bar = tqdm(
        total=total_steps,
        initial=progress.step,
        disable=not accelerator.is_main_process,
        desc=f"{task.name}/{args.optimizer}",
        dynamic_ncols=True,
    )
    start_time = time.time() - progress.elapsed
    running = torch.zeros((), device=accelerator.device)
    stopped_early = False
    while progress.step < total_steps:
        if adaptive:
            # no clipping here: the controller's noise test compares the unclipped micro-batch gradients
            # with the gradient the optimizer steps on
            adaptive_step = next(adaptive_iter)
            for batch in adaptive_step:
                out = model(**batch)
                running += out.loss.detach().float() / len(adaptive_step)
                adaptive_step.backward(out.loss)
            adaptive_step.finish()  # optimizer step (the controller picks the next batch), zero_grad
            step_samples = loop.batch_sizes[-1]
        else:
            batch = next(stream)
            with accelerator.accumulate(model):
                out = model(**batch)
                running += out.loss.detach().float() / args.gradient_accumulation_steps
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and not uses_deepspeed and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step_samples = args.global_batch_size
        step_lr = scheduler.get_last_lr()[0]  # the rate this step used
        scheduler.step()
        progress.step += 1
        progress.samples += step_samples
        progress.elapsed = time.time() - start_time
        loss = accelerator.reduce(running, reduction="mean").item()
        running.zero_()
        record = {
            "step": progress.step,
            "loss": loss,
            "lr": step_lr,
            "batch_size": step_samples,  # global samples of this optimizer step
            "samples": progress.samples,
            "time": progress.elapsed,
        }
        progress.history.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}")
        if progress.step % args.log_steps == 0 or progress.step == total_steps:
            logged = {k: v for k, v in record.items() if k != "step"}
            logged.update(
                {f"layer/{k}": v for k, v in _scalar_stats(getattr(client_optimizer, "last_layer_stats", None)).items()}
            )
            if adaptive:  # the controller's decision for the next step: batch/size, batch/required, ...
                logged.update(controller.last.as_dict())
            accelerator.log(logged, step=progress.step)
        if args.time_budget_s and progress.step < total_steps:
            # every rank must agree, or the one that stops leaves the others waiting in a collective
            # stop when one more average step would overrun the budget
            next_end = progress.elapsed * (progress.step + 1) / progress.step
            over = torch.tensor(float(next_end > args.time_budget_s), device=accelerator.device)
            stopped_early = bool(accelerator.reduce(over, reduction="sum").item() > 0)
        if args.stop_after_steps and progress.step >= args.stop_after_steps:
            stopped_early = progress.step < total_steps
        if adaptive and sample_budget is not None and progress.samples >= sample_budget:
            total_steps = progress.step  # --num_epochs of data seen
        last = progress.step == total_steps or stopped_early
        if last or (args.eval_steps and progress.step % args.eval_steps == 0):
            result = evaluate()
            progress.evals.append({"step": progress.step, "samples": progress.samples, **result})
            accelerator.log(result, step=progress.step)
            if accelerator.is_main_process:
                bar.write(f"step {progress.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in result.items()))
        if args.checkpoint_steps and progress.step % args.checkpoint_steps == 0 and not last:
            save(progress.step)
        if stopped_early and args.stop_after_steps and progress.step >= args.stop_after_steps:
            accelerator.print(f"stopped at step {progress.step}/{total_steps} (--stop_after_steps)")
            break
        if stopped_early:
            accelerator.print(
                f"time budget of {args.time_budget_s:.0f} s reached at step {progress.step}/{total_steps}"
            )
            break
    bar.close()
    progress.elapsed = time.time() - start_time
    if not args.no_final_checkpoint:
        save(progress.step)

    summary = {
        "task": task.name,
        "model": args.model,
        "dataset": args.dataset,
        "optimizer": args.optimizer,
        "optimizer_kwargs": args.optimizer_kwargs,
        "world_size": args.world_size,
        "deepspeed": uses_deepspeed,
        "zero_stage": (accelerator.state.deepspeed_plugin.zero_stage if uses_deepspeed else None),
        "global_batch_size": args.global_batch_size,
        "max_global_batch_size": args.max_global_batch_size if adaptive else args.global_batch_size,
        "final_global_batch_size": progress.history[-1]["batch_size"] if progress.history else None,
        "per_device_batch_size": args.per_device_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "lr": args.lr,
        "scaled_lr": lr,
        "steps": progress.step,
        "planned_steps": total_steps,
        "stopped_early": stopped_early,
        "samples": progress.samples,
        "epochs": progress.samples / len(train_ds),
        "train_examples": len(train_ds),
        "wall_time_s": progress.elapsed,
        "total_wall_time_s": time.time() - t0,
        "final_loss": progress.history[-1]["loss"] if progress.history else None,
        "final_eval": progress.evals[-1] if progress.evals else {},
        "evals": progress.evals,
        "batch_size_trajectory": [[r["step"], r["batch_size"]] for r in progress.history],
        "loss_curve": [[r["step"], r["loss"]] for r in progress.history],
        "lr_curve": [[r["step"], r["lr"]] for r in progress.history],
        "time_curve": [[r["step"], r["time"]] for r in progress.history],
        "last_layer_stats": _scalar_stats(getattr(client_optimizer, "last_layer_stats", None)),
    }
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        write_plot(summary, output_dir / "training.png")
        print(f"wrote {output_dir / 'summary.json'} and {output_dir / 'training.png'}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # ZeRO-3 processes hang at exit without this
    return summary


def write_plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    steps, losses = zip(*summary["loss_curve"]) if summary["loss_curve"] else ((), ())
    axes[0].plot(steps, losses, label="train loss")
    if summary["evals"]:
        axes[0].plot(
            [e["step"] for e in summary["evals"]], [e["eval_loss"] for e in summary["evals"]], "o-", label="eval loss"
        )
    axes[0].set_xlabel("optimizer step")
    axes[0].set_title("loss")
    axes[0].legend()
    metric_keys = [
        k
        for k in (summary["evals"][0] if summary["evals"] else {})
        if k.startswith("eval_") and k not in ("eval_loss", "eval_perplexity")
    ]
    for key in metric_keys:
        axes[1].plot([e["step"] for e in summary["evals"]], [e[key] for e in summary["evals"]], "o-", label=key)
    axes[1].set_xlabel("optimizer step")
    axes[1].set_title("validation metrics")
    if metric_keys:
        axes[1].legend()
    if summary["batch_size_trajectory"]:
        s, b = zip(*summary["batch_size_trajectory"])
        axes[2].step(s, b, where="post", color="C2", label="global batch")
        axes[2].set_ylabel("global batch size")
        axes[2].set_ylim(0, 1.15 * max(b))
        twin = axes[2].twinx()
        ls, lr = zip(*summary["lr_curve"])
        twin.plot(ls, lr, color="C3", label="lr")
        twin.set_ylabel("learning rate")
    axes[2].set_xlabel("optimizer step")
    axes[2].set_title("batch size and learning rate")
    batches = [b for _, b in summary["batch_size_trajectory"]] or [summary["global_batch_size"]]
    batch_text = f"{batches[0]}" if min(batches) == max(batches) else f"{batches[0]} -> {batches[-1]}"
    fig.suptitle(
        f"{summary['task']} / {summary['optimizer']}: global batch {batch_text}, "
        f"{summary['steps']} steps, {summary['wall_time_s']:.0f} s"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_recipes_to_path() -> None:
    """Let ``import common`` work when a recipe is imported from elsewhere (tests)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
