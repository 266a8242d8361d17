"""Small-loss discarding through the HF Trainer (one process, accumulation 2) equals an explicit reference."""

import pytest
import torch

pytest.importorskip("transformers")

from lbopt.integrations.small_loss import SmallLossDiscardTrainer  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments  # noqa: E402

from lbopt.discard import dropped_count  # noqa: E402

N, SEQ, CLASSES, MICRO, ACCUM, RHO, LR = 16, 6, 3, 4, 2, 0.25, 0.5


def _model():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=CLASSES,
                     initializer_range=0.5)  # losses far apart: no near-ties between batchings
    return BertForSequenceClassification(cfg)


def _data():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (N, SEQ), generator=g)
    labels = torch.randint(0, CLASSES, (N,), generator=g)
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(N)]


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


class SequentialTrainer(SmallLossDiscardTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def test_trainer_step_is_the_mean_over_the_globally_kept_samples(tmp_path):
    data = _data()
    model = _model()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=MICRO,
                             gradient_accumulation_steps=ACCUM, learning_rate=LR, max_steps=1, optim="sgd",
                             lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, data_seed=0)
    trainer = SequentialTrainer(model=model, args=args, train_dataset=data, discard_small_loss=RHO)
    order = list(range(MICRO * ACCUM))  # the samples of step 1
    trainer.train()
    plan = trainer.discard.last
    assert (plan.kept, plan.total) == (6, 8)
    assert trainer.discard_plan is None  # used up by the step's micro-batches
    assert trainer.evaluate(eval_dataset=data[:4])["eval_loss"] > 0  # evaluation: the plain loss

    ref = _model()
    ids = torch.stack([data[i]["input_ids"] for i in order])
    labels = torch.stack([data[i]["labels"] for i in order])
    losses = torch.nn.functional.cross_entropy(ref(input_ids=ids).logits, labels, reduction="none")
    keep = torch.ones(len(order), dtype=torch.bool)
    keep[torch.argsort(losses.detach(), stable=True)[: dropped_count(RHO, len(order))]] = False
    assert torch.equal(torch.cat(plan.masks), keep)
    losses[keep].mean().backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= LR * p.grad
    got, want = _flat(model), _flat(ref)
    assert float((got - want).norm() / want.norm()) <= 1e-5
    assert float((got - _flat(_model())).norm()) > 0  # it did train


def test_bad_fraction_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="discard fraction"):
        SmallLossDiscardTrainer(model=_model(), args=TrainingArguments(output_dir=str(tmp_path), report_to=[]),
                                discard_small_loss=1.5)
