"""Bad input: clear errors, and nothing that silently corrupts optimizer state."""

import copy
import re
import warnings

import pytest
import torch
from torch import nn

import lbopt
from tests.optim.problem import batch, flat, loss_fn, make_model, train

ALL = [lbopt.LARS, lbopt.LAMB, lbopt.CBLR, lbopt.MCLR]


@pytest.mark.parametrize(
    "cls,kwargs,arg",
    [
        (lbopt.LARS, {"lr": -1.0}, "lr"),
        (lbopt.LARS, {"momentum": 1.0}, "momentum"),
        (lbopt.LARS, {"weight_decay": -0.1}, "weight_decay"),
        (lbopt.LARS, {"trust_coefficient": 0.0}, "trust_coefficient"),
        (lbopt.LARS, {"eps": -1e-8}, "eps"),
        (lbopt.LARS, {"trust_clip": (2.0, 1.0)}, "trust_clip"),
        (lbopt.LARS, {"momentum": 0.0, "nesterov": True}, "nesterov"),
        (lbopt.CBLR, {"curvature": "hessian"}, "curvature"),
        (lbopt.CBLR, {"direction": "sgd"}, "direction"),
        (lbopt.CBLR, {"curvature_ema": 1.0}, "curvature_ema"),
        (lbopt.MCLR, {"betas": (0.9, 1.0)}, "betas"),
        (lbopt.LAMB, {"betas": (1.1, 0.999)}, "betas"),
        (lbopt.LAMB, {"eps": 0.0}, "eps"),
        (lbopt.LAMB, {"lr": float("nan")}, "lr"),
        (lbopt.LAMB, {"on_nonfinite": "ignore"}, "on_nonfinite"),
        (lbopt.LAMB, {"layer_grouping": "block"}, "layer_grouping"),
        (lbopt.LAMB, {"exclude": 3}, "exclude"),
    ],
)
def test_invalid_hyperparameters_name_the_argument(cls, kwargs, arg):
    with pytest.raises(ValueError, match=re.escape(arg)):
        cls(make_model().parameters(), **kwargs)


def test_module_grouping_without_names_is_explained():
    with pytest.raises(ValueError, match="named_parameters"):
        lbopt.LARS(make_model().parameters(), layer_grouping="module")


@pytest.mark.parametrize("cls", ALL)
def test_sparse_gradients_are_refused(cls):
    emb = nn.Embedding(10, 4, sparse=True)
    opt = cls(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def _poisoned_step(model, value):
    x, y = batch(0)
    loss_fn(model, x, y).backward()
    model[0].weight.grad[0, 0] = value


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_gradient_skips_and_leaves_state_untouched(cls, value):
    model = make_model()
    opt = cls(model.parameters())
    train(model, opt, 3)
    params, state = flat(model), copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    _poisoned_step(model, value)
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        opt.step()
    assert torch.equal(flat(model), params)
    after = opt.state_dict()
    assert after["skipped_steps"] == 1
    after["skipped_steps"] = state["skipped_steps"]
    torch.testing.assert_close(after, state, rtol=0, atol=0, equal_nan=True)
    train(model, opt, 2, start=3)  # and training goes on, finite
    assert torch.isfinite(flat(model)).all()


@pytest.mark.parametrize("cls", ALL)
def test_nonfinite_first_step_leaves_no_state(cls):
    model = make_model()
    opt = cls(model.parameters())
    _poisoned_step(model, float("nan"))
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert len(opt.state) == 0 and opt.param_groups[0]["step"] == 0


def test_nonfinite_raise_mode():
    model = make_model()
    opt = lbopt.LAMB(model.parameters(), on_nonfinite="raise")
    _poisoned_step(model, float("inf"))
    params = flat(model)
    with pytest.raises(lbopt.NonFiniteGradientError, match="0.weight|group0.param0"):
        opt.step()
    assert torch.equal(flat(model), params) and len(opt.state) == 0


@pytest.mark.parametrize("cls", [lbopt.LARS, lbopt.LAMB])
def test_zero_norm_layer_falls_back_to_factor_one(cls):
    model = make_model()
    with torch.no_grad():
        model[0].weight.zero_()
    opt = cls(model.named_parameters(), lr=0.1)
    train(model, opt, 1)
    assert opt.last_layer_stats["lr/0.weight"] == pytest.approx(0.1)
    assert torch.isfinite(flat(model)).all()


def test_cblr_zero_norm_layer_takes_the_shared_rate_and_moves():
    """CBLR's model step: a zero-weight layer has no first-step rate (κτ₀‖w‖/‖h‖ = 0), so it
    borrows the median rate of the other adapted layers instead of standing still."""
    model = make_model()
    with torch.no_grad():
        model[0].weight.zero_()
    opt = lbopt.CBLR(model.named_parameters(), lr=0.1)
    train(model, opt, 1)
    stats = opt.last_layer_stats
    # one other adapted layer (3.weight), so the median rate is its own
    assert stats["rate/0.weight"] == pytest.approx(stats["rate/3.weight"])
    assert model[0].weight.abs().sum() > 0 and torch.isfinite(flat(model)).all()


def test_mclr_zero_norm_layer_takes_the_shared_rate_without_voting():
    """MCLR has one rate for all layers; a layer with no estimate just doesn't vote."""
    model = make_model()
    with torch.no_grad():
        model[0].weight.zero_()
    opt = lbopt.MCLR(model.named_parameters(), lr=0.1)
    train(model, opt, 1)
    stats = opt.last_layer_stats
    assert stats["rate/0.weight"] == stats["rate/3.weight"]
    # only 3.weight has a first-step curvature (‖h‖/(τ₀‖w‖)), so the median is its own
    assert stats["rate/3.weight"] > 0 and torch.isfinite(flat(model)).all()


def test_zero_gradient_layer_falls_back_to_factor_one():
    model = make_model()
    opt = lbopt.LARS(model.named_parameters(), lr=0.1)
    x, y = batch(0)
    loss_fn(model, x, y).backward()
    model[3].weight.grad.zero_()
    opt.step()
    assert opt.last_layer_stats["lr/3.weight"] == pytest.approx(0.1)


@pytest.mark.parametrize("cls", ALL)
def test_frozen_and_gradless_parameters_are_skipped(cls):
    model = make_model()
    model[0].weight.requires_grad_(False)
    unused = nn.Parameter(torch.ones(3, 3))
    opt = cls([*model.parameters(), unused])
    frozen = model[0].weight.detach().clone()
    train(model, opt, 3)
    assert torch.equal(model[0].weight, frozen)
    assert torch.equal(unused.detach(), torch.ones(3, 3))
    assert unused not in opt.state and model[0].weight not in opt.state


@pytest.mark.parametrize("cls", ALL)
def test_tied_parameters_count_once(cls):
    tied, plain = make_model(), make_model()
    params = list(tied.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns about duplicates; lbopt dedupes quietly
        opt = cls(params + [params[0], params[2]])
    assert opt.table.num_layers == len(params)
    train(tied, opt, 5)
    train(plain, cls(plain.parameters()), 5)
    assert torch.equal(flat(tied), flat(plain))


@pytest.mark.parametrize("cls", ALL)
def test_empty_param_group_is_a_no_op(cls):
    model, ref = make_model(), make_model()
    opt = cls([{"params": []}, {"params": list(model.parameters())}])
    train(model, opt, 3)
    train(ref, cls(ref.parameters()), 3)
    assert torch.equal(flat(model), flat(ref))


def test_empty_parameter_list_is_refused():
    with pytest.raises(ValueError, match="empty parameter list"):
        lbopt.LARS([])


def test_step_with_no_gradients_is_a_no_op():
    model = make_model()
    opt = lbopt.CBLR(model.parameters())
    params = flat(model)
    assert opt.step() is None
    assert torch.equal(flat(model), params) and len(opt.state) == 0


def test_exclude_by_name_pattern_and_predicate():
    model = make_model()
    by_name = lbopt.LARS(model.named_parameters(), exclude=r"^3\.")
    assert [n for n, a in zip(by_name.table.names, by_name.table.adapt) if not a] == ["3.weight", "3.bias"]
    by_pred = lbopt.LAMB(model.named_parameters(), exclude=lambda n, p: p.shape[0] == 16)
    excluded = {n for n, a in zip(by_pred.table.names, by_pred.table.adapt) if not a}
    assert excluded == {"0.weight", "0.bias", "1.weight", "1.bias"}
    nothing = lbopt.CBLR(model.parameters(), exclude=False)
    assert all(nothing.table.adapt) and all(nothing.table.decay)


def test_closure_is_called_and_returns_loss():
    model = make_model()
    opt = lbopt.LAMB(model.parameters())
    x, y = batch(0)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.item() > 0
