"""The Accelerate loop and the HF Trainer really change the samples per optimizer step.

What the optimizer saw is counted independently of the helpers: a forward pre-hook counts
the rows the model was run on, an optimizer step pre-hook closes the count. Every sample
carries its index, so epochs are checked for duplicated or dropped samples.
"""

import math

import pytest
import torch
from torch import nn

import lbopt.optim.adagrad as ada
from lbopt.batch import BatchSizeController
from tests.batch import problem as P

N = 120


class Counter:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.rows, self.per_step = 0, []
        model.register_forward_pre_hook(self._forward, with_kwargs=True)
        optimizer.register_step_pre_hook(self._step)

    def _forward(self, _mod, args, kwargs):
        x = args[0] if args else kwargs["x"]
        self.rows += x.shape[0]

    def _step(self, *_):
        self.per_step.append(self.rows)
        self.rows = 0


def _data():
    x, y = P.micro_batch(7, N)
    return x, y, torch.arange(N)


def _check_epochs(seen: list[int], epochs: int) -> None:
    assert len(seen) == N * epochs
    for e in range(epochs):
        assert sorted(seen[e * N:(e + 1) * N]) == list(range(N))  # each sample exactly once per epoch


@pytest.mark.parametrize("owned", [True, False])
def test_accelerate_loop_grows_samples_per_step(owned):
    from accelerate import Accelerator
    from lbopt.integrations.adaptive_batch import AdaptiveBatchLoop

    accelerator = Accelerator(cpu=True)
    model = P.make_model()
    kw = dict(initial_batch_size=8, max_batch_size=48, micro_batch_size=P.MICRO, world_size=1, eta=0.8)
    if owned:
        opt, ctrl = ada.AdAdaGradNorm(model.parameters(), lr=0.3, **kw), None
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        ctrl = BatchSizeController(**kw, lr_coupling="sqrt")
    x, y, idx = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y, idx), batch_size=P.MICRO,
                                         shuffle=True, generator=torch.Generator().manual_seed(0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + 0.01 * t))
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    counter = Counter(model, opt.optimizer if hasattr(opt, "optimizer") else opt)
    loop = AdaptiveBatchLoop(model, opt, ctrl, accelerator=accelerator, lr_scheduler=sched)
    seen, epoch_ends = [], []
    for _ in range(3):
        for step in loop.steps(loader):
            for xb, yb, ib in step:
                seen += ib.tolist()
                step.backward(P.loss_fn(model, xb, yb))
        epoch_ends.append(len(loop.batch_sizes) - 1)
    _check_epochs(seen, 3)
    assert counter.per_step == loop.batch_sizes
    sizes = counter.per_step
    assert max(sizes) > sizes[0] == 8, sizes
    ctrl = loop.controller
    # Every step had the controller's batch at the time, except a short last step of an epoch.
    for s, size in enumerate(sizes):
        planned = _batch_at(ctrl.history, s)
        assert size == planned or (s in epoch_ends and size < planned), (s, size, planned)
    # The LR schedule advanced by data (initial-batch units), not by optimizer steps.
    assert loop.schedule.ticks == loop.samples_seen // 8 == 3 * N // 8
    assert getattr(sched, "scheduler", sched).last_epoch == 3 * N // 8
    if not owned:
        assert ctrl.lr_factor == pytest.approx(math.sqrt(ctrl.batch_size / 8))


def _batch_at(history, step_index):
    """The controller's batch for optimizer step ``step_index`` (0-based) from its history."""
    return [b for at, b in history if at <= step_index][-1]


class _HFModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = P.make_model()
        self.seen: list[int] = []

    def forward(self, x, labels=None, idx=None):
        if idx is not None:
            self.seen += idx.tolist()
        out = self.net(x)
        loss = nn.functional.mse_loss(out, labels)
        return {"loss": loss, "logits": out}


def test_trainer_subclass_grows_samples_per_step(tmp_path):
    from lbopt.integrations.adaptive_batch import AdaptiveBatchTrainer
    from transformers import TrainingArguments

    x, y, idx = _data()
    dataset = [{"x": x[i], "labels": y[i], "idx": idx[i]} for i in range(N)]
    model = _HFModel()
    opt = ada.AdAdaGradNorm(model.parameters(), lr=0.3, initial_batch_size=8, max_batch_size=48,
                            micro_batch_size=P.MICRO, world_size=1, eta=0.8)
    counter = Counter(model, opt)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=P.MICRO, num_train_epochs=3,
        lr_scheduler_type="linear", report_to=[], save_strategy="no", logging_steps=1,
        use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = AdaptiveBatchTrainer(model=model, args=args, train_dataset=dataset, optimizers=(opt, None))
    trainer.train()
    _check_epochs(model.seen, 3)
    sizes = counter.per_step
    assert sizes == trainer.step_samples
    assert max(sizes) > sizes[0] == 8, sizes
    assert trainer.state.global_step == len(sizes)
    ctrl = opt.batch_controller
    assert ctrl.steps == len(sizes)
    # Sizes move toward the controller's batch (a change may be reached in steps, as the
    # Trainer's accumulation bookkeeping allows) and never exceed it; only an epoch's last
    # step is short.
    epoch_of, total = [], 0
    for size in sizes:
        epoch_of.append(total // N)
        total += size
    for s, size in enumerate(sizes):
        planned = _batch_at(ctrl.history, s)
        last_of_epoch = s + 1 == len(sizes) or epoch_of[s + 1] != epoch_of[s]
        assert size % P.MICRO == 0 and size <= planned, (s, size, planned)
        if not last_of_epoch and s > 0 and epoch_of[s - 1] == epoch_of[s]:
            assert size >= sizes[s - 1], sizes
    assert sizes[-2] == _batch_at(ctrl.history, len(sizes) - 2)
    # The linear schedule was sized for 3 epochs at the initial batch (45 steps); advanced by
    # data, it ends exactly at the end of the data although fewer optimizer steps were taken.
    assert trainer.lr_scheduler.last_epoch == 3 * N // 8 and len(sizes) < 3 * N // 8
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
    logged = [h for h in trainer.state.log_history if "batch/size" in h]
    assert logged and logged[-1]["batch/size"] == ctrl.batch_size


def _trainer(tmp_path, model, opt, **kw):
    from lbopt.integrations.adaptive_batch import AdaptiveBatchTrainer
    from transformers import TrainingArguments

    x, y, idx = _data()
    dataset = [{"x": x[i], "labels": y[i], "idx": idx[i]} for i in range(N)]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=P.MICRO, num_train_epochs=2,
        lr_scheduler_type="linear", report_to=[], logging_steps=1, use_cpu=True, disable_tqdm=True, seed=0,
        save_strategy="steps", save_steps=4, max_grad_norm=0.5, **kw,
    )
    return AdaptiveBatchTrainer(model=model, args=args, train_dataset=dataset, optimizers=(opt, None))


def test_trainer_resume_mid_epoch_reproduces_the_run(tmp_path):
    """Resumed from a checkpoint taken mid-epoch (after the batch grew), the Trainer skips exactly
    the micro-batches consumed and ends with the uninterrupted run's parameters and batches."""
    import json

    def build():
        model = _HFModel()
        opt = ada.AdAdaGradNorm(model.parameters(), lr=0.3, initial_batch_size=8, max_batch_size=48,
                                micro_batch_size=P.MICRO, world_size=1, eta=0.8)
        return model, opt

    model, opt = build()
    full = _trainer(tmp_path / "full", model, opt)
    full.train()
    assert opt.max_grad_norm == 0.5 and full.args.max_grad_norm == 0.0  # clipping moved into the optimizer
    ckpt = tmp_path / "full" / "checkpoint-8"
    state = json.loads((ckpt / "trainer_state.json").read_text())["stateful_callbacks"]["_AdaptiveBatchState"]
    micro = state["attributes"]["micro_in_epoch"]
    assert 0 < micro < N // P.MICRO, state  # mid-epoch
    assert max(full.step_samples[:8]) > 8  # the batch had grown by then

    model2, opt2 = build()
    resumed = _trainer(tmp_path / "resumed", model2, opt2)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.step_samples == full.step_samples[8:]
    assert resumed.samples_seen == full.samples_seen == 2 * N
    assert sorted(model2.seen) == sorted(model.seen[sum(full.step_samples[:8]):])  # the rest of the data, once
    assert P.rel(P.flat(model2.net), P.flat(model.net)) <= 1e-6
