"""The HF Trainer route: ``Trainer(optimizer_cls_and_kwargs=(lbopt.X, {...}))`` and recipes/trainer_classification.py.

A tiny random BERT classifier (no dropout) on a fixed synthetic task keeps every run in-process and
on CPU. The DeepSpeed route (``"type": "CBLR"`` in a Trainer's DeepSpeed config) is covered by
tests/integrations; the AdaptiveBatchTrainer with a ready-made optimizer by tests/batch/test_integrations.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import lbopt
from tests.recipes.helpers import RECIPES, REPO, launch_env

pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

N, SEQ, VOCAB, LABELS, MICRO = 32, 8, 64, 3, 8

# Per-optimizer settings that move a tiny model visibly in a few steps. AdAdaGrad* keep a batch
# controller (initial batch = 2 micro-batches, the Trainer accumulates 2 to match).
CONTROLLER = dict(initial_batch_size=2 * MICRO, max_batch_size=4 * MICRO, micro_batch_size=MICRO, world_size=1)
KWARGS = {
    "LARS": dict(lr=0.1, trust_coefficient=0.1),
    "LAMB": dict(lr=1e-2),
    "CBLR": dict(lr=0.1, trust_coefficient=0.1),
    "MCLR": dict(lr=0.05, trust_coefficient=0.02),
    "AdaGradNorm": dict(lr=0.2),
    "AdAdaGrad": dict(lr=0.01, **CONTROLLER),
    "AdAdaGradNorm": dict(lr=0.2, **CONTROLLER),
}


def _dataset() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (N, SEQ), generator=g)
    labels = ids[:, 0] % LABELS  # learnable from the first token
    return [{"input_ids": ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": labels[i]}
            for i in range(N)]


def _model(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=SEQ, num_labels=LABELS,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def _args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=MICRO, max_steps=6, report_to=[],
                save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True, seed=0,
                lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0)
    base.update(kw)
    return TrainingArguments(**base)


def _unwrap(optimizer):
    """The optimizer under Accelerate's wrapper(s)."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _loss(model, data) -> float:
    model.eval()
    with torch.no_grad():
        batch = {k: torch.stack([d[k] for d in data]) for k in data[0]}
        return float(model(**batch).loss)


@pytest.mark.parametrize("name", lbopt.optimizer_names())
def test_trainer_trains_with_every_lbopt_optimizer(name, tmp_path):
    cls = lbopt.get_optimizer_class(name)
    data, model = _dataset(), _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss0 = _loss(model, data)
    accumulate = 2 if name.startswith("AdAdaGrad") else 1
    trainer = Trainer(model=model, args=_args(tmp_path, gradient_accumulation_steps=accumulate), train_dataset=data,
                      optimizer_cls_and_kwargs=(cls, dict(KWARGS[name])))
    result = trainer.train()
    opt = _unwrap(trainer.optimizer)
    assert type(opt) is cls, type(opt)
    assert trainer.state.global_step == 6 and math.isfinite(result.training_loss)
    changed = 0
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
        changed += not torch.equal(p.detach(), before[n])
    assert changed > len(before) // 2, f"{changed} of {len(before)} tensors moved"
    assert _loss(model, data) < loss0, name


class _Recorder:
    """The exact batches the Trainer's model ran on, in order (a forward pre-hook)."""

    def __init__(self, model) -> None:
        self.batches: list[dict] = []
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _mod, _args, kwargs):
        if _mod.training:
            self.batches.append({k: v.detach().clone() for k, v in kwargs.items() if torch.is_tensor(v)})


@pytest.mark.parametrize("name", ["LAMB", "CBLR"])
def test_trainer_matches_a_manual_loop(name, tmp_path):
    cls, data = lbopt.get_optimizer_class(name), _dataset()
    kwargs = dict(KWARGS[name], weight_decay=0.01)
    model = _model()
    recorder = _Recorder(model)
    trainer = Trainer(model=model, args=_args(tmp_path, weight_decay=0.01), train_dataset=data,
                      optimizer_cls_and_kwargs=(cls, kwargs))
    trainer.train()
    assert len(recorder.batches) == 6

    ref = _model()  # same initial weights
    decay = set(trainer.get_decay_parameter_names(ref))
    groups = [
        {"params": [p for n, p in ref.named_parameters() if n in decay], "weight_decay": 0.01},
        {"params": [p for n, p in ref.named_parameters() if n not in decay], "weight_decay": 0.0},
    ]
    opt = cls(groups, **kwargs)
    ref.train()
    for batch in recorder.batches:
        ref(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    trained = dict(model.named_parameters())
    for n, p in ref.named_parameters():
        torch.testing.assert_close(trained[n].detach(), p.detach(), atol=1e-5, rtol=0, msg=lambda m, n=n: f"{n}: {m}")


class _StepCounter(TrainerCallback):
    """Rows the model ran on per optimizer step, counted by hooks independent of the Trainer."""

    def __init__(self, model) -> None:
        self.rows, self.per_step = 0, []
        model.register_forward_pre_hook(self._forward, with_kwargs=True)

    def _forward(self, mod, _args, kwargs):
        if mod.training:
            self.rows += kwargs["input_ids"].shape[0]

    def _step(self, *_):
        self.per_step.append(self.rows)
        self.rows = 0

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        _unwrap(optimizer).register_step_pre_hook(self._step)


def test_adaptive_trainer_builds_the_optimizer_from_cls_and_kwargs(tmp_path):
    """The recipe's route (not the ready-made optimizer of tests/batch): the batch still grows."""
    from lbopt.integrations.adaptive_batch import AdaptiveBatchTrainer

    data, model = _dataset() * 4, _model()
    counter = _StepCounter(model)
    kwargs = dict(lr=0.5, initial_batch_size=2 * MICRO, max_batch_size=8 * MICRO, micro_batch_size=MICRO,
                  world_size=1, eta=0.95)
    args = _args(tmp_path, max_steps=-1, num_train_epochs=2, gradient_accumulation_steps=2)
    trainer = AdaptiveBatchTrainer(model=model, args=args, train_dataset=data, callbacks=[counter],
                                   optimizer_cls_and_kwargs=(lbopt.AdAdaGradNorm, kwargs))
    trainer.train()
    assert type(_unwrap(trainer.optimizer)) is lbopt.AdAdaGradNorm
    sizes = counter.per_step
    assert sizes == trainer.step_samples and sum(sizes) == 2 * len(data)
    assert sizes[0] == 2 * MICRO and max(sizes) > sizes[0], sizes


def test_trainer_recipe_runs(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(RECIPES / "trainer_classification.py"), "--optimizer", "lamb", "--max_steps", "2",
           "--per_device_batch_size", "4", "--max_seq_length", "16", "--max_train_samples", "16",
           "--max_eval_samples", "8", "--output_dir", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-6000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["optimizer"] == "LAMB" and summary["global_step"] == 2
    assert 0.0 <= summary["eval"]["eval_accuracy"] <= 1.0 and math.isfinite(summary["train_loss"])
    assert (out / "model" / "config.json").is_file()
