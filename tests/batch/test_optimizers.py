"""AdaGrad / AdaGradNorm numbers, the torch.optim contract, registry names."""

import copy

import pytest
import torch

import lbopt.optim.adagrad as ada
from lbopt.registry import get_optimizer_class
from tests.batch import problem as P


def _train(model, opt, steps=15, sched=None):
    for j in range(steps):
        x, y = P.micro_batch(j, 16)
        opt.zero_grad()
        P.loss_fn(model, x, y).backward()
        opt.step()
        if sched is not None:
            sched.step()


def test_adagrad_equals_torch_adagrad_with_groups_and_scheduler():
    a, b = P.make_model(), P.make_model()

    def groups(m):
        ps = list(m.parameters())
        return [{"params": [p for p in ps if p.ndim > 1], "lr": 0.05}, {"params": [p for p in ps if p.ndim <= 1]}]

    o1 = ada.AdaGrad(groups(a), lr=0.1, initial_accumulator_value=0.1, weight_decay=0.01, exclude=False)
    o2 = torch.optim.Adagrad(groups(b), lr=0.1, initial_accumulator_value=0.1, weight_decay=0.01)
    s1 = torch.optim.lr_scheduler.StepLR(o1, 5, 0.5)
    s2 = torch.optim.lr_scheduler.StepLR(o2, 5, 0.5)
    _train(a, o1, sched=s1)
    _train(b, o2, sched=s2)
    assert P.rel(P.flat(a), P.flat(b)) <= 1e-6


def test_adagradnorm_equals_hand_reference():
    a, b = P.make_model(), P.make_model()
    opt = ada.AdaGradNorm(a.parameters(), lr=0.2, initial_accumulator_value=0.5)
    _train(a, opt)
    b_sq = 0.5
    for j in range(15):
        x, y = P.micro_batch(j, 16)
        b.zero_grad()
        P.loss_fn(b, x, y).backward()
        b_sq += sum(float(p.grad.square().sum()) for p in b.parameters())
        with torch.no_grad():
            for p in b.parameters():
                p -= 0.2 * p.grad / (b_sq**0.5 + 1e-10)
    assert P.rel(P.flat(a), P.flat(b)) <= 1e-6
    assert opt.accumulator == pytest.approx(b_sq, rel=1e-9)
    assert ada.AdaGradNorm.needs_all_groups and ada.AdAdaGrad.needs_all_groups


def test_state_dict_round_trip_and_plain_mode():
    model = P.make_model()
    opt = ada.AdAdaGrad(model.parameters(), lr=0.05, initial_batch_size=8, max_batch_size=32, micro_batch_size=4,
                        world_size=1, test="coordinate")
    P.train_stream(model, opt, opt.batch_controller, 4)
    sd = copy.deepcopy(opt.state_dict())
    assert "batch_controller" in sd and sd["batch_controller"]["steps"] == 4
    clone = P.make_model()
    clone.load_state_dict(model.state_dict())
    opt2 = ada.AdAdaGrad(clone.parameters(), lr=0.05, initial_batch_size=8, max_batch_size=32, micro_batch_size=4,
                         world_size=1, test="coordinate")
    opt2.load_state_dict(sd)
    a, _ = P.train_stream(model, opt, opt.batch_controller, 3, start_micro=100)
    b, _ = P.train_stream(clone, opt2, opt2.batch_controller, 3, start_micro=100)
    assert a == b and P.rel(P.flat(model), P.flat(clone)) <= 1e-6
    plain = ada.AdAdaGradNorm(P.make_model().parameters(), batch_controller=False)
    assert plain.batch_controller is None


@pytest.mark.parametrize("name, cls", [("AdaGradNorm", ada.AdaGradNorm), ("adadagrad", ada.AdAdaGrad),
                                       ("ADADAGRADNORM", ada.AdAdaGradNorm)])
def test_registry_names(name, cls):
    assert get_optimizer_class(name) is cls


def test_plain_adagrad_is_not_registered():
    """"Adagrad" stays DeepSpeed's/torch's name in configs (DeepSpeed's fast CPU Adagrad for offload)."""
    from lbopt.registry import OPTIMIZERS

    assert "adagrad" not in OPTIMIZERS


def test_invalid_hyperparameters_name_the_argument():
    with pytest.raises(ValueError, match="Invalid lr"):
        ada.AdaGradNorm(P.make_model().parameters(), lr=-1)
    with pytest.raises(ValueError, match="initial_accumulator_value"):
        ada.AdaGrad(P.make_model().parameters(), initial_accumulator_value=-1)
    with pytest.raises(ValueError, match="batch_controller"):
        ada.AdAdaGrad(P.make_model().parameters(), batch_controller="yes")
