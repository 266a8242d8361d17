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


# --------------------------------------------------------------------------------------------
# the run: set-up, one step runner per training mode, the loop, outputs
# --------------------------------------------------------------------------------------------


def compute_loss(model, batch: dict):
    """The loss one micro-batch contributes (the model's own mean loss); :class:`Run` may swap it."""
    return model(**batch).loss


@dataclass
class Run:
    """Everything a prepared training run holds; the step runners and the loop read it.

    ``compute_loss(model, batch)`` gives a micro-batch's loss (replace it for a different loss
    reduction); ``step_hooks`` are called as ``hook(run, record)`` after every optimizer step
    (the record is the step's entry of ``progress.history``), before evaluation and saving.
    """

    args: argparse.Namespace
    task: Task
    accelerator: Any
    model: Any
    optimizer: Any  # as prepared by Accelerate (a DeepSpeed wrapper under DeepSpeed)
    client_optimizer: Any  # the optimizer we built (exposes last_layer_stats)
    scheduler: Any
    train_dl: Any
    eval_dl: Any
    train_examples: int
    micro_per_epoch: int  # micro-batches per rank and epoch
    total_steps: int
    lr: float
    output_dir: Path
    uses_deepspeed: bool
    progress: Progress = field(default_factory=lambda: Progress())
    metrics: dict = field(default_factory=dict)
    compute_loss: Callable[[Any, dict], Any] = compute_loss
    step_hooks: list[Callable[[Run, dict], None]] = field(default_factory=list)
    started: float = field(default_factory=time.time)


@dataclass
class StepResult:
    """What one optimizer step produced: the rank's mean loss (a 0-d tensor) and the global samples."""

    loss: Any
    samples: int


class StepRunner:
    """One optimizer step per :meth:`step` call; one subclass per training mode.

    ``max_global_batch_size`` is the largest batch a step may have; :meth:`log_extras` adds the
    mode's own per-step figures to the logs; :meth:`data_budget_reached` ends a run whose
    length is counted in data rather than steps.
    """

    max_global_batch_size: int

    def step(self) -> StepResult:
        raise NotImplementedError

    def log_extras(self) -> dict[str, float]:
        return {}

    def data_budget_reached(self, progress: Progress) -> bool:
        return False


class FixedBatchRunner(StepRunner):
    """Every step: ``gradient_accumulation_steps`` micro-batches through ``accelerator.accumulate``,
    gradient clipping (outside DeepSpeed, which clips itself), optimizer step."""

    def __init__(self, run: Run) -> None:
        self.run = run
        args = run.args
        self.max_global_batch_size = args.global_batch_size
        self.stream = micro_batches(run, run.progress.step * args.gradient_accumulation_steps)
        self.clip = not run.uses_deepspeed and args.max_grad_norm > 0

    def step(self) -> StepResult:
        run, args, accelerator = self.run, self.run.args, self.run.accelerator
        import torch

        running = torch.zeros((), device=accelerator.device)
        while True:
            batch = next(self.stream)
            with accelerator.accumulate(run.model):
                loss = run.compute_loss(run.model, batch)
                running += loss.detach().float() / args.gradient_accumulation_steps
                accelerator.backward(loss)
                if accelerator.sync_gradients and self.clip:
                    accelerator.clip_grad_norm_(run.model.parameters(), args.max_grad_norm)
                run.optimizer.step()
                run.optimizer.zero_grad()
            if accelerator.sync_gradients:
                return StepResult(running, args.global_batch_size)


class AdaptiveBatchRunner(StepRunner):
    """AdAdaGrad*: the optimizer's batch controller sets each step's micro-batch count
    (:class:`lbopt.integrations.adaptive_batch.AdaptiveBatchLoop`). No clipping: the controller's
    noise test compares the unclipped micro-batch gradients with the gradient the step uses.
    With ``--num_epochs`` the run ends once that much data is seen (steps grow with the batch)."""

    def __init__(self, run: Run) -> None:
        from lbopt.integrations.adaptive_batch import AdaptiveBatchLoop

        self.run = run
        args = run.args
        unit = args.per_device_batch_size * args.world_size
        self.max_global_batch_size = args.max_global_batch_size
        # the LR scheduler stays ours (one tick per optimizer step); the controller's state is in the
        # optimizer's checkpoint
        self.loop = AdaptiveBatchLoop(run.model, run.optimizer, accelerator=run.accelerator, lr_scheduler=None)
        self.controller = self.loop.controller
        self.steps = self.loop.steps(micro_batches(run, run.progress.samples // unit))
        self.sample_budget = None if args.max_steps else args.num_epochs * run.micro_per_epoch * unit

    def step(self) -> StepResult:
        import torch

        run = self.run
        adaptive_step = next(self.steps)
        running = torch.zeros((), device=run.accelerator.device)
        for batch in adaptive_step:
            loss = run.compute_loss(run.model, batch)
            running += loss.detach().float() / len(adaptive_step)
            adaptive_step.backward(loss)
        adaptive_step.finish()  # optimizer step (the controller picks the next batch), zero_grad
        return StepResult(running, self.loop.batch_sizes[-1])

    def log_extras(self) -> dict[str, float]:
        return self.controller.last.as_dict()  # batch/size, batch/required, ... for the next step

    def data_budget_reached(self, progress: Progress) -> bool:
        return self.sample_budget is not None and progress.samples >= self.sample_budget


def make_step_runner(run: Run) -> StepRunner:
    """The step runner for this run's training mode."""
    if run.args.optimizer in ADAPTIVE_OPTIMIZERS:
        return AdaptiveBatchRunner(run)
    return FixedBatchRunner(run)


def create_accelerator(args: argparse.Namespace):
    """The ``Accelerator`` for this launch (DeepSpeed from the launcher or --deepspeed_config; gloo on CPU)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, InitProcessGroupKwargs

    deepspeed_plugin = None
    if args.deepspeed_config:
        from accelerate.utils import DeepSpeedPlugin

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=args.deepspeed_settings)
    deepspeed_requested = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    handlers = []
    if deepspeed_requested and not torch.accelerator.is_available():
        # DeepSpeed on CPU (DS_ACCELERATOR=cpu): accelerate only counts the ranks when told the backend
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
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
        project_dir=str(args.output_dir),
        deepspeed_plugin=deepspeed_plugin,
    )
    if accelerator.num_processes != args.world_size:
        die(f"launched with {accelerator.num_processes} processes but the batch was split for {args.world_size}")
    if not accelerator.is_main_process:  # one copy of the library chatter is enough
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.set_verbosity_error()
    return accelerator


def data_loaders(args: argparse.Namespace, train_ds, eval_ds, collate) -> tuple[Any, Any]:
    """Shuffled training micro-batches (full ones only) and evaluation batches."""
    from torch.utils.data import DataLoader

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
    return train_dl, eval_dl


def planned_steps(args: argparse.Namespace, micro_per_epoch: int) -> int:
    """--max_steps, else enough fixed-size steps for --num_epochs (at least one)."""
    if args.max_steps:
        return args.max_steps
    return max(1, math.ceil(args.num_epochs * micro_per_epoch / args.gradient_accumulation_steps))


def setup_run(task: Task, args: argparse.Namespace, raw: Any) -> Run:
    """Accelerator, model, data, optimizer and schedule, prepared; resumed when asked."""
    import torch
    from accelerate.utils import set_seed

    from lbopt.metrics import load_metric

    accelerator = create_accelerator(args)
    set_seed(args.seed)
    uses_deepspeed = _configure_deepspeed(accelerator, args)
    with accelerator.main_process_first():
        model, _tokenizer, train_ds, eval_ds, collate = task.build(args, raw)
    train_dl, eval_dl = data_loaders(args, train_ds, eval_ds, collate)
    micro_per_epoch = len(train_ds) // (args.per_device_batch_size * args.world_size)
    if micro_per_epoch == 0:
        die(f"the training set ({len(train_ds)} examples) is smaller than one micro-batch on every rank")
    total_steps = planned_steps(args, micro_per_epoch)
    lr = scaled_lr(args)
    client_optimizer = create_optimizer(args, model, lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(client_optimizer, lr_lambda(args, total_steps))
    model, optimizer, train_dl, eval_dl = accelerator.prepare(model, client_optimizer, train_dl, eval_dl)
    run = Run(
        args=args,
        task=task,
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        client_optimizer=client_optimizer,
        scheduler=scheduler,
        train_dl=train_dl,
        eval_dl=eval_dl,
        train_examples=len(train_ds),
        micro_per_epoch=micro_per_epoch,
        total_steps=total_steps,
        lr=lr,
        output_dir=Path(args.output_dir),
        uses_deepspeed=uses_deepspeed,
    )
    # not prepared: stepped once per optimizer step by us, on the same param_group dicts DeepSpeed uses
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_for_checkpointing(run.progress)
    resume(run)
    run_config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
    run_config["scaled_lr"] = lr
    accelerator.init_trackers(args.run_name or f"{task.name}-{args.optimizer}", config=run_config)
    run.metrics = {name: load_metric(name) for name in task.metrics}
    return run


def resume(run: Run) -> None:
    """Load --resume_from_checkpoint (a folder, or the newest under output_dir/checkpoints for 'latest')."""
    target = run.args.resume_from_checkpoint
    if target == "latest":
        target = _latest_checkpoint(run.output_dir)
    if target:
        run.accelerator.load_state(str(target))
        run.accelerator.print(f"resumed from {target} at step {run.progress.step}")


def micro_batches(run: Run, start: int) -> Iterator[dict]:
    """This rank's training micro-batches from the ``start``-th on, streaming across epochs."""
    import torch

    train_dl, accelerator = run.train_dl, run.accelerator
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


def evaluate(run: Run) -> dict:
    """Mean loss and the task's metrics over the whole evaluation set (all ranks gathered)."""
    import torch

    model, accelerator = run.model, run.accelerator
    model.eval()
    losses, preds, refs = [], [], []
    with torch.no_grad():
        for batch in run.eval_dl:
            out = model(**batch)
            n = batch["labels"].shape[0]
            losses.append(accelerator.gather_for_metrics(out.loss.detach().float().repeat(n)))
            p, r = run.task.predictions(out, batch)
            p, r = accelerator.gather_for_metrics((p.contiguous(), r.contiguous()))
            preds.append(p.cpu())
            refs.append(r.cpu())
    model.train()
    pred, ref = torch.cat(preds).numpy(), torch.cat(refs).numpy()
    result = {"eval_loss": float(torch.cat(losses).mean())}
    for name, metric in run.metrics.items():
        kwargs = {"average": "macro"} if name == "f1" else {}
        value = metric.compute(predictions=pred, references=ref, **kwargs)
        result.update({f"eval_{k}": float(v) for k, v in value.items()})
    result.update(run.task.extra_eval(result["eval_loss"]))
    return result


def save_checkpoint(run: Run, step: int) -> None:
    """``accelerator.save_state`` into output_dir/checkpoints/step_<step>."""
    run.accelerator.save_state(str(run.output_dir / "checkpoints" / f"step_{step}"))


def record_step(run: Run, result: StepResult, step_lr: float) -> dict:
    """Advance the progress counters by one optimizer step; return (and keep) the step's record."""
    progress = run.progress
    progress.step += 1
    progress.samples += result.samples
    progress.elapsed = time.time() - run.started
    record = {
        "step": progress.step,
        "loss": run.accelerator.reduce(result.loss, reduction="mean").item(),
        "lr": step_lr,
        "batch_size": result.samples,  # global samples of this optimizer step
        "samples": progress.samples,
        "time": progress.elapsed,
    }
    progress.history.append(record)
    return record


def log_step(run: Run, runner: StepRunner, record: dict) -> None:
    """Trackers: the step record, the optimizer's per-layer statistics, the mode's own figures."""
    if record["step"] % run.args.log_steps and record["step"] != run.total_steps:
        return
    logged = {k: v for k, v in record.items() if k != "step"}
    logged.update({f"layer/{k}": v for k, v in layer_stats(run).items()})
    logged.update(runner.log_extras())
    run.accelerator.log(logged, step=record["step"])


def layer_stats(run: Run) -> dict[str, float]:
    """The client optimizer's last per-layer statistics (rates, trust ratios, curvatures), flat."""
    return _scalar_stats(getattr(run.client_optimizer, "last_layer_stats", None))


def over_time_budget(run: Run) -> bool:
    """True on every rank when one more average step would pass --time_budget_s on any rank."""
    import torch

    progress = run.progress
    # every rank must agree, or the one that stops leaves the others waiting in a collective
    next_end = progress.elapsed * (progress.step + 1) / progress.step
    over = torch.tensor(float(next_end > run.args.time_budget_s), device=run.accelerator.device)
    return bool(run.accelerator.reduce(over, reduction="sum").item() > 0)


def stop_reason(run: Run) -> str | None:
    """Why the run ends before its planned steps, if it does: the time budget or --stop_after_steps."""
    args, step = run.args, run.progress.step
    if step >= run.total_steps:
        return None
    if args.stop_after_steps and step >= args.stop_after_steps:
        return f"stopped at step {step}/{run.total_steps} (--stop_after_steps)"
    if args.time_budget_s and over_time_budget(run):
        return f"time budget of {args.time_budget_s:.0f} s reached at step {step}/{run.total_steps}"
    return None


def evaluate_and_log(run: Run, bar) -> None:
    result = evaluate(run)
    progress = run.progress
    progress.evals.append({"step": progress.step, "samples": progress.samples, **result})
    run.accelerator.log(result, step=progress.step)
    if run.accelerator.is_main_process:
        bar.write(f"step {progress.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in result.items()))


def train(run: Run, runner: StepRunner) -> bool:
    """Optimizer steps until the planned end or an early stop; return whether it stopped early."""
    from tqdm.auto import tqdm

    args, progress = run.args, run.progress
    bar = tqdm(
        total=run.total_steps,
        initial=progress.step,
        disable=not run.accelerator.is_main_process,
        desc=f"{run.task.name}/{args.optimizer}",
        dynamic_ncols=True,
    )
    run.started = time.time() - progress.elapsed
    run.model.train()
    reason = None
    while progress.step < run.total_steps and reason is None:
        step_lr = run.scheduler.get_last_lr()[0]  # the rate this step uses
        result = runner.step()
        run.scheduler.step()
        record = record_step(run, result, step_lr)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{step_lr:.2e}")
        log_step(run, runner, record)
        for hook in run.step_hooks:
            hook(run, record)
        reason = stop_reason(run)
        if runner.data_budget_reached(progress):
            run.total_steps = progress.step  # --num_epochs of data seen
        last = progress.step == run.total_steps or reason is not None
        if last or (args.eval_steps and progress.step % args.eval_steps == 0):
            evaluate_and_log(run, bar)
        if args.checkpoint_steps and progress.step % args.checkpoint_steps == 0 and not last:
            save_checkpoint(run, progress.step)
    bar.close()
    if reason:
        run.accelerator.print(reason)
    progress.elapsed = time.time() - run.started
    return reason is not None


def build_summary(run: Run, runner: StepRunner, stopped_early: bool, launch_time: float) -> dict:
    """Everything ``summary.json`` records about the run."""
    args, progress, history = run.args, run.progress, run.progress.history
    return {
        "task": run.task.name,
        "model": args.model,
        "dataset": args.dataset,
        "optimizer": args.optimizer,
        "optimizer_kwargs": args.optimizer_kwargs,
        "world_size": args.world_size,
        "deepspeed": run.uses_deepspeed,
        "zero_stage": (run.accelerator.state.deepspeed_plugin.zero_stage if run.uses_deepspeed else None),
        "global_batch_size": args.global_batch_size,
        "max_global_batch_size": runner.max_global_batch_size,
        "final_global_batch_size": history[-1]["batch_size"] if history else None,
        "per_device_batch_size": args.per_device_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "lr": args.lr,
        "scaled_lr": run.lr,
        "steps": progress.step,
        "planned_steps": run.total_steps,
        "stopped_early": stopped_early,
        "samples": progress.samples,
        "epochs": progress.samples / run.train_examples,
        "train_examples": run.train_examples,
        "wall_time_s": progress.elapsed,
        "total_wall_time_s": time.time() - launch_time,
        "final_loss": history[-1]["loss"] if history else None,
        "final_eval": progress.evals[-1] if progress.evals else {},
        "evals": progress.evals,
        "batch_size_trajectory": [[r["step"], r["batch_size"]] for r in history],
        "loss_curve": [[r["step"], r["loss"]] for r in history],
        "lr_curve": [[r["step"], r["lr"]] for r in history],
        "time_curve": [[r["step"], r["time"]] for r in history],
        "last_layer_stats": layer_stats(run),
    }


def write_outputs(run: Run, summary: dict) -> None:
    """summary.json and training.png, written by the main process."""
    if run.accelerator.is_main_process:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        (run.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        write_plot(summary, run.output_dir / "training.png")
        print(f"wrote {run.output_dir / 'summary.json'} and {run.output_dir / 'training.png'}")


def shutdown(run: Run) -> None:
    """End trackers and destroy the process group (ZeRO-3 processes hang at exit without it)."""
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(task: Task, argv: list[str] | None = None) -> dict:
    """Parse and validate (before any process group), set up, train, save, summarise; return the summary."""
    launch_time = time.time()
    args, raw = parse_args(task, argv)  # all user errors surface here, before any process group
    import warnings

    # torch's collective renames, hit inside DeepSpeed on every step: nothing a user can act on
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    run = setup_run(task, args, raw)
    runner = make_step_runner(run)
    stopped_early = train(run, runner)
    if not args.no_final_checkpoint:
        save_checkpoint(run, run.progress.step)
    summary = build_summary(run, runner, stopped_early, launch_time)
    write_outputs(run, summary)
    shutdown(run)
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
