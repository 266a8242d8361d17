"""lbopt.integrations.trainer with the real HF Trainer: names reach the optimizer, its own
hyperparameters run, and the per-layer figures reach the Trainer's logs.

A tiny random BERT classifier (no dropout) on a fixed synthetic task, in-process on CPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import lbopt

pytest.importorskip("transformers")

from lbopt.integrations.trainer import (  # noqa: E402
    LayerStatsCallback,
    build_optimizer,
    log_layer_stats,
    trainer_optimizer,
    unwrap_optimizer,
)
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

N, SEQ, VOCAB, LABELS, MICRO, STEPS = 16, 8, 64, 3, 8, 3
README_EXCLUDE = r"^classifier\."


def _dataset() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (N, SEQ), generator=g)
    labels = ids[:, 0] % LABELS
    return [{"input_ids": ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": labels[i]}
            for i in range(N)]


def _model(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=SEQ, num_labels=LABELS,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def _args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=MICRO, max_steps=STEPS, report_to=[],
                save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True, seed=0,
                lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, learning_rate=1e-2)
    base.update(kw)
    return TrainingArguments(**base)


def _excluded(opt) -> set[str]:
    return {n for n, a in zip(opt.table.names, opt.table.adapt) if not a}


def _trainer(tmp_path, cls_and_kwargs, model=None, **args_kw) -> Trainer:
    return Trainer(model=model or _model(), args=_args(tmp_path, **args_kw), train_dataset=_dataset(),
                   optimizer_cls_and_kwargs=cls_and_kwargs)


def test_exclusion_matches_by_name_through_the_trainer(tmp_path):
    """The README's exclude="^classifier\\." excludes the classifier; the old route matched nothing."""
    model = _model()
    classifier = {n for n, _ in model.named_parameters() if n.startswith("classifier.")}
    one_dim = {n for n, p in model.named_parameters() if p.ndim <= 1}
    assert classifier == {"classifier.weight", "classifier.bias"}

    trainer = _trainer(tmp_path, trainer_optimizer(lbopt.LAMB, lr=1e-2, exclude=README_EXCLUDE), model)
    opt = unwrap_optimizer(trainer.create_optimizer())
    assert isinstance(opt, lbopt.LAMB) and _excluded(opt) == classifier
    assert opt.table.names == [n for n, _ in model.named_parameters()]

    added = _trainer(tmp_path, trainer_optimizer(lbopt.LARS, lr=0.1, exclude="+" + README_EXCLUDE))
    assert _excluded(unwrap_optimizer(added.create_optimizer())) == one_dim | classifier

    grouped = _trainer(tmp_path, trainer_optimizer(lbopt.CBLR, lr=0.1, layer_grouping="module"))
    opt = unwrap_optimizer(grouped.create_optimizer())
    assert "bert.encoder.layer.0.attention.self.query" in opt.table.names  # weight (+ bias excluded) per module

    old = _trainer(tmp_path, (lbopt.LAMB, {"lr": 1e-2, "exclude": README_EXCLUDE}))  # the unnamed route: control
    with pytest.warns(UserWarning, match="match no parameter name.*have no names"):
        opt = unwrap_optimizer(old.create_optimizer())
    assert _excluded(opt) == set()


def test_optimizer_weight_decay_runs_and_matches_a_manual_loop(tmp_path):
    """weight_decay given to the factory is the one that runs (TrainingArguments says 0.0): the
    Trainer's trajectory equals a manual loop with LAMB(named parameters, weight_decay=0.05)."""
    model = _model()
    batches: list[dict] = []
    model.register_forward_pre_hook(
        lambda mod, _a, kw: batches.append({k: v.clone() for k, v in kw.items() if torch.is_tensor(v)})
        if mod.training else None,
        with_kwargs=True,
    )
    trainer = _trainer(tmp_path, trainer_optimizer(lbopt.LAMB, lr=1e-2, weight_decay=0.05), model)
    trainer.add_callback(LayerStatsCallback(per_layer=False))
    with pytest.warns(UserWarning, match=r"weight_decay=0.05 \(TrainingArguments.weight_decay=0 is not used\)"):
        trainer.train()
    opt = unwrap_optimizer(trainer.optimizer)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.05}
    assert len(batches) == STEPS

    ref = _model()
    ref_opt = lbopt.LAMB(ref.named_parameters(), lr=1e-2, weight_decay=0.05)
    ref.train()
    for batch in batches:
        ref(**batch).loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p.detach(), q.detach()), n

    control = _model()  # the old route's decay (TrainingArguments' 0.0) gives another trajectory
    control_opt = lbopt.LAMB(control.named_parameters(), lr=1e-2, weight_decay=0.0)
    for batch in batches:
        control(**batch).loss.backward()
        control_opt.step()
        control_opt.zero_grad()
    assert not torch.equal(control.classifier.weight, ref.classifier.weight)


def test_training_args_fill_missing_values_and_warn_on_conflicts(tmp_path):
    args = _args(tmp_path, learning_rate=3e-3, weight_decay=0.02)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, kwargs = trainer_optimizer(lbopt.LAMB, training_args=args)
    assert kwargs == {"lr": 3e-3, "weight_decay": 0.02}
    with pytest.warns(UserWarning, match=r"weight_decay=0.1 \(TrainingArguments.weight_decay=0.02 is not used\)"):
        _, kwargs = trainer_optimizer(lbopt.LAMB, training_args=args, weight_decay=0.1)
    assert kwargs == {"lr": 3e-3, "weight_decay": 0.1}
    with pytest.raises(TypeError, match="optimizer class"):
        trainer_optimizer(lbopt.LAMB(_model().parameters()))


class _Seen(TrainerCallback):
    """Stands where the Trainer's report_to loggers stand (right after DefaultFlowCallback)."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


@pytest.mark.parametrize("cls,kwargs,kinds", [
    (lbopt.LAMB, {"lr": 1e-2}, {"lr", "trust_ratio"}),
    (lbopt.CBLR, {"lr": 0.1, "trust_coefficient": 0.1}, {"lr", "curvature"}),
])
def test_layer_stats_reach_log_history_and_loggers(cls, kwargs, kinds, tmp_path):
    trainer = _trainer(tmp_path, trainer_optimizer(cls, **kwargs), learning_rate=kwargs["lr"])
    seen = _Seen()
    trainer.callback_handler.callbacks.insert(1, seen)
    callback = log_layer_stats(trainer)
    trainer.train()
    opt = unwrap_optimizer(trainer.optimizer)
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(train_logs) == STEPS
    last = train_logs[-1]
    query = "bert.encoder.layer.0.attention.self.query.weight"
    for kind in kinds:
        assert f"lbopt/{kind}/{query}" in last and f"lbopt/{kind}/classifier.weight" in last
        assert f"lbopt/{kind}/median" in last
    # The logged numbers are the optimizer's own, of the last step.
    final = opt.last_layer_stats
    summaries = ("/min", "/median", "/max")
    assert {k.removeprefix("lbopt/"): v for k, v in last.items()
            if k.startswith("lbopt/") and not k.endswith(summaries)} == final
    assert last["lbopt/lr/max"] == max(v for k, v in final.items() if k.startswith("lr/"))
    # The biases (excluded) run at the base rate; some adapted layer does not.
    assert last[f"lbopt/lr/{query.replace('weight', 'bias')}"] == pytest.approx(kwargs["lr"])
    assert any(v != pytest.approx(kwargs["lr"]) for k, v in final.items() if k.startswith("lr/"))
    # The loggers' position saw the same keys.
    assert seen.logs[STEPS - 1].keys() >= {k for k in last if k.startswith("lbopt/")}
    assert callback.figures(trainer.optimizer) == {k: v for k, v in last.items() if k.startswith("lbopt/")}


def test_layer_stats_filters():
    x = _dataset()[:4]
    model = _model()
    opt = build_optimizer(model, lbopt.LAMB, lr=1e-2)
    model(**{k: torch.stack([d[k] for d in x]) for k in x[0]}).loss.backward()
    opt.step()
    figures = LayerStatsCallback(kinds=["trust_ratio"], layers=r"^classifier\.", summary=False).figures(opt)
    assert figures == {"lbopt/trust_ratio/classifier.weight": opt.last_layer_stats["trust_ratio/classifier.weight"],
                       "lbopt/trust_ratio/classifier.bias": 1.0}
    assert LayerStatsCallback().figures(torch.optim.SGD(model.parameters(), lr=0.1)) == {}
