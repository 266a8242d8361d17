"""torch.optim conventions every lbopt optimizer keeps (issue 12, item 3).

float64 parameters, pickle / deepcopy round trips, the configuration in ``state_dict``, one
group per parameter, finite hyperparameters, additive exclusion patterns, ``maximize``,
``foreach`` and a Tensor ``lr``.
"""

from __future__ import annotations

import copy
import math
import pickle
import re
import warnings

import pytest
import torch

import lbopt
from lbopt.optim.base import ConfigMismatchError, LayerwiseOptimizer
from lbopt.validation import check_betas, check_choice, check_clip, check_int, check_range
from tests.optim.problem import batch, flat, loss_fn, make_model, rel, train
from tests.optim.references import RefCBLR, RefLAMB, RefLARS

MAKERS = {
    "LARS": lambda ps, **kw: lbopt.LARS(ps, lr=0.5, weight_decay=1e-3, **kw),
    "LAMB": lambda ps, **kw: lbopt.LAMB(ps, lr=1e-2, **kw),
    "CBLR": lambda ps, **kw: lbopt.CBLR(ps, lr=0.5, weight_decay=1e-3, **kw),
    "MCLR": lambda ps, **kw: lbopt.MCLR(ps, lr=0.5, weight_decay=1e-3, **kw),
    "AdaGradNorm": lambda ps, **kw: lbopt.AdaGradNorm(ps, lr=0.2, **kw),
}
LAYERWISE = ["LARS", "LAMB", "CBLR", "MCLR"]


def _train_as(model, opt, steps: int, start: int = 0, sign: float = 1.0) -> None:
    """``problem.train`` in the model's dtype; ``sign=-1`` minimises the negated loss."""
    dtype = next(model.parameters()).dtype
    for t in range(start, start + steps):
        x, y = batch(t)
        opt.zero_grad()
        (sign * loss_fn(model, x.to(dtype), y.to(dtype))).backward()
        opt.step()


# --------------------------------------------------------------------------- float64
@pytest.mark.parametrize(
    "name,make,make_ref",
    [
        ("LARS", MAKERS["LARS"], lambda ps: RefLARS(ps, lr=0.5, weight_decay=1e-3)),
        ("LAMB", MAKERS["LAMB"], lambda ps: RefLAMB(ps, lr=1e-2)),
        ("CBLR", MAKERS["CBLR"], lambda ps: RefCBLR(ps, lr=0.5, weight_decay=1e-3)),
        ("MCLR", MAKERS["MCLR"], lambda ps: RefCBLR(ps, lr=0.5, weight_decay=1e-3, median=True)),
    ],
)
def test_float64_steps_in_float64(name, make, make_ref):
    """float64 statistics: agreement with the float64 reference far below float32's resolution."""
    model, ref = make_model().double(), make_model().double()
    opt = make(model.parameters())
    _train_as(model, opt, 10)
    _train_as(ref, make_ref(list(ref.parameters())), 10)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert all(b.dtype == torch.float64 for s in opt.state.values() for b in s.values() if torch.is_tensor(b))
    assert rel(flat(ref), flat(make_model().double())) > 1e-3  # it moved
    assert rel(flat(model), flat(ref)) < 1e-12, "statistics were not carried in float64"


def test_float64_adagradnorm_steps():
    model = make_model().double()
    _train_as(model, lbopt.AdaGradNorm(model.parameters(), lr=0.2), 3)
    assert torch.isfinite(flat(model)).all() and flat(model).dtype == torch.float64


# --------------------------------------------------------------------------- pickle / deepcopy
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", list(MAKERS))
def test_round_trip_of_model_and_optimizer_keeps_training(name, how):
    model = make_model()
    opt = MAKERS[name](model.named_parameters(), exclude=r"+^3\.")
    train(model, opt, 3)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert all(p2 is not p for p, p2 in zip(model.parameters(), model2.parameters()))
    train(model, opt, 3, start=3)
    train(model2, opt2, 3, start=3)
    assert torch.equal(flat(model2), flat(model))
    assert opt2.table.names == opt.table.names and opt2.table.adapt == opt.table.adapt
    assert repr(opt2) == repr(opt)


def test_pickled_lambda_exclude_keeps_its_table_and_explains_itself():
    model = make_model()
    opt = lbopt.LAMB(model.named_parameters(), exclude=lambda n, p: n.startswith("3."))
    model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert opt2.table.adapt == opt.table.adapt
    train(model2, opt2, 2)
    with pytest.raises(RuntimeError, match="module-level function"):
        opt2.add_param_group({"params": [("extra", torch.nn.Parameter(torch.ones(2, 2)))]})


def test_deepcopy_survives_an_lr_scheduler():
    model = make_model()
    opt = lbopt.LAMB(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    train(model, opt, 2)
    sched.step()
    model2, opt2, sched2 = copy.deepcopy((model, opt, sched))
    for m, o, s in ((model, opt, sched), (model2, opt2, sched2)):
        train(m, o, 3, start=2)
        s.step()
    assert torch.equal(flat(model2), flat(model))


# --------------------------------------------------------------------------- configuration
def _saved(make, **kw):
    model = make_model()
    opt = make(model.named_parameters(), **kw)
    train(model, opt, 2)
    return opt.state_dict()


def test_state_dict_carries_the_configuration():
    sd = _saved(MAKERS["LAMB"], exclude=r"+^3\.")
    assert sd["lbopt_config"] == {
        "optimizer": "LAMB", "exclude": r"ndim<=1 + regex ^3\.", "layer_grouping": "tensor", "layers": 6,
    }


@pytest.mark.parametrize(
    "saved_as,load_into,key",
    [
        (MAKERS["CBLR"], MAKERS["LAMB"], "optimizer"),
        (MAKERS["LAMB"], MAKERS["CBLR"], "optimizer"),
        (MAKERS["LARS"], MAKERS["MCLR"], "optimizer"),
        (MAKERS["LAMB"], lambda ps: lbopt.LAMB(ps, exclude=False), "exclude"),
        (MAKERS["LAMB"], lambda ps: lbopt.LAMB(ps, exclude=r"+^3\."), "exclude"),
    ],
)
def test_mismatched_configuration_is_refused_before_anything_changes(saved_as, load_into, key):
    sd = _saved(saved_as)
    model = make_model(seed=5)
    opt = load_into(model.named_parameters())
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ConfigMismatchError, match=rf"{key}: saved .*, this optimizer"):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"] and not after["state"]


def test_cblr_estimator_mismatch_is_refused():
    if lbopt.CBLR._config is LayerwiseOptimizer._config:
        pytest.skip("CBLR does not extend _config yet (lbopt/optim/curvature.py)")
    sd = _saved(MAKERS["CBLR"])
    opt = lbopt.CBLR(make_model().parameters(), lr=0.5, weight_decay=1e-3, curvature="weight_ratio")
    with pytest.raises(ConfigMismatchError, match="curvature"):
        opt.load_state_dict(sd)


def test_deleting_the_configuration_forces_a_load():
    sd = _saved(MAKERS["LAMB"])
    del sd["lbopt_config"]
    opt = lbopt.LAMB(make_model().parameters(), exclude=False)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["step"] == 2


def test_repr_shows_the_configuration():
    opt = lbopt.LAMB(make_model().named_parameters(), exclude=r"+^3\.", layer_grouping="module")
    text = repr(opt)
    assert text.startswith("LAMB (exclude='ndim<=1 + regex ^3\\\\.', layer_grouping='module', layers=")
    assert "Parameter Group 0" in text and "weight_decay: 0.01" in text


# --------------------------------------------------------------------------- groups
@pytest.mark.parametrize("name", list(MAKERS))
def test_parameter_in_two_groups_is_refused(name):
    model = make_model()
    params = list(model.parameters())
    with pytest.raises(ValueError, match="already in group 0"):
        MAKERS[name]([{"params": params}, {"params": [params[0]], "lr": 0.1}])
    named = list(model.named_parameters())
    with pytest.raises(ValueError, match="'0.weight'.*already in group 0"):
        MAKERS[name]([{"params": named}, {"params": named[:1]}])


def test_add_param_group_refuses_a_known_parameter():
    model = make_model()
    params = list(model.parameters())
    opt = lbopt.LAMB(params[:2])
    with pytest.raises(ValueError, match="already in group 0"):
        opt.add_param_group({"params": params[1:3]})
    opt.add_param_group({"params": params[2:] + params[2:3]})  # a repeat inside one group: counted once
    assert opt.table.num_layers == len(params)


# --------------------------------------------------------------------------- hyperparameters
@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("arg", ["lr", "weight_decay"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_infinite_hyperparameters_are_refused(name, arg, value):
    with pytest.raises(ValueError, match=f"Invalid {arg}: .*finite"):
        lbopt.get_optimizer_class(name)(make_model().parameters(), **{arg: value})


def test_validation_vocabulary():
    assert check_range("lr", 0.5) == 0.5
    assert check_int("n", 3) == 3 and check_choice("c", "a", ("a", "b")) == "a"
    assert check_clip("clip", (0.0, math.inf)) == (0.0, math.inf)
    assert check_betas("betas", [0.9, 0.99]) == (0.9, 0.99)
    for call, message in [
        (lambda: check_range("lr", math.inf), r"Invalid lr: inf; expected a finite number in \[0.0, inf\)"),
        (lambda: check_range("eps", 0.0, lo_open=True), r"Invalid eps: 0.0; .* in \(0.0, inf\)"),
        (lambda: check_range("momentum", 1.0, 0.0, 1.0, hi_open=True), r"Invalid momentum: 1.0; .*\[0.0, 1.0\)"),
        (lambda: check_range("lr", True), "Invalid lr: True"),
        (lambda: check_range("lr", torch.tensor(0.1)), "Invalid lr: tensor"),
        (lambda: check_int("n", 2.0), "Invalid n: 2.0; expected an integer >= 1"),
        (lambda: check_choice("c", "z", ("a", "b")), r"Invalid c: 'z'; expected one of \('a', 'b'\)"),
        (lambda: check_clip("clip", (1.0, math.nan)), "Invalid clip"),
        (lambda: check_betas("betas", (0.9,)), "Invalid betas"),
    ]:
        with pytest.raises(ValueError, match=message):
            call()


def test_tensor_lr_matches_float_lr_and_follows_a_scheduler():
    a, b = make_model(), make_model()
    lr = torch.tensor(1e-2, dtype=torch.float64)  # holds exactly the Python float
    opt_a = lbopt.LAMB(a.parameters(), lr=lr)
    opt_b = lbopt.LAMB(b.parameters(), lr=1e-2)
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, step_size=2, gamma=0.5)
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, step_size=2, gamma=0.5)
    for t in range(5):
        train(a, opt_a, 1, start=t)
        train(b, opt_b, 1, start=t)
        sched_a.step()
        sched_b.step()
    assert torch.is_tensor(opt_a.param_groups[0]["lr"])
    assert torch.equal(flat(a), flat(b))
    with pytest.raises(ValueError, match="Invalid lr"):
        lbopt.LAMB(make_model().parameters(), lr=torch.tensor([1e-2, 1e-3]))


# --------------------------------------------------------------------------- exclusion
def _excluded(opt) -> set[str]:
    return {n for n, a in zip(opt.table.names, opt.table.adapt) if not a}


def test_plus_pattern_adds_to_the_default_exclusion():
    named = list(make_model().named_parameters())
    one_dim = {n for n, p in named if p.ndim <= 1}
    assert _excluded(lbopt.LAMB(named)) == one_dim
    assert _excluded(lbopt.LAMB(named, exclude=r"^3\.")) == {"3.weight", "3.bias"}  # replaces the default
    assert _excluded(lbopt.LAMB(named, exclude=r"+^3\.")) == one_dim | {"3.weight"}  # adds to it
    assert _excluded(lbopt.LAMB(named, exclude=[r"+^3\.", r"^0\."])) == one_dim | {"3.weight", "0.weight"}


def test_pattern_matching_nothing_warns():
    named = list(make_model().named_parameters())
    with pytest.warns(UserWarning, match=r"exclude pattern\(s\) \['\^classifier\\\\.'\] match no parameter name"):
        opt = lbopt.LAMB(named, exclude=r"+^classifier\.")
    assert _excluded(opt) == {n for n, p in named if p.ndim <= 1}
    with pytest.warns(UserWarning, match="have no names"):
        lbopt.LARS(make_model().parameters(), exclude=r"^3\.")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lbopt.LAMB(named, exclude=[r"^3\.", r"^0\."])


def test_invalid_exclude_pattern_names_it():
    with pytest.raises(ValueError, match=re.escape("Invalid exclude pattern '(^3'")):
        lbopt.LAMB(make_model().named_parameters(), exclude="(^3")


# --------------------------------------------------------------------------- maximize / foreach
@pytest.mark.parametrize("name", list(MAKERS))
def test_maximize_ascends_the_loss_exactly_like_descending_its_negation(name):
    a, b = make_model(), make_model()
    opt_a = MAKERS[name]([{"params": list(a.parameters()), "maximize": True}])
    opt_b = MAKERS[name](b.parameters())
    _train_as(a, opt_a, 4, sign=-1.0)  # maximise −L ...
    _train_as(b, opt_b, 4)  # ... = minimise L
    assert torch.equal(flat(a), flat(b))


def test_maximize_restores_the_gradients():
    model = make_model()
    opt = lbopt.LAMB(model.parameters(), maximize=True)
    x, y = batch(0)
    loss_fn(model, x, y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    start = flat(model)
    opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    x2, y2 = batch(0)
    assert loss_fn(model, x2, y2) > loss_fn(_with(start), x2, y2)  # it went uphill


def _with(vector: torch.Tensor):
    model = make_model()
    torch.nn.utils.vector_to_parameters(vector, model.parameters())
    return model


@pytest.mark.parametrize("foreach", [None, False, True])
def test_foreach_is_accepted_and_changes_nothing(foreach):
    a, b = make_model(), make_model()
    train(a, lbopt.LAMB(a.parameters(), foreach=foreach), 3)
    train(b, lbopt.LAMB(b.parameters()), 3)
    assert torch.equal(flat(a), flat(b))
