"""Each optimizer against its naive per-parameter reference, single process."""

import pytest
import torch

import lbopt
from tests.optim.problem import batch, flat, loss_fn, make_model, rel, train
from tests.optim.references import RefCBLR, RefLAMB, RefLARS

STEPS = 30

CASES = [
    ("lars", lambda ps: lbopt.LARS(ps, lr=0.5, weight_decay=1e-3), lambda ps: RefLARS(ps, lr=0.5, weight_decay=1e-3)),
    ("lamb", lambda ps: lbopt.LAMB(ps, lr=1e-2), lambda ps: RefLAMB(ps, lr=1e-2)),
    (
        "cblr",
        lambda ps: lbopt.CBLR(ps, lr=0.5, weight_decay=1e-3),
        lambda ps: RefCBLR(ps, lr=0.5, weight_decay=1e-3),
    ),
    (
        "mclr",
        lambda ps: lbopt.MCLR(ps, lr=0.5, weight_decay=1e-3),
        lambda ps: RefCBLR(ps, lr=0.5, weight_decay=1e-3, median=True),
    ),
]


@pytest.mark.parametrize("name,make,make_ref", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(name, make, make_ref):
    start = flat(make_model())
    model, ref_model = make_model(), make_model()
    train(model, make(model.parameters()), STEPS)
    train(ref_model, make_ref(list(ref_model.parameters())), STEPS)
    moved = rel(flat(ref_model), start)
    assert moved > 1e-3, f"{name} reference barely moved ({moved}); the comparison would be vacuous"
    assert rel(flat(model), flat(ref_model)) < 1e-5


@pytest.mark.parametrize("name,make,make_ref", CASES, ids=[c[0] for c in CASES])
def test_matches_reference_in_float64(name, make, make_ref):
    """In float64 the implementation and the reference must agree to rounding (no float32 noise to hide in)."""
    model, ref_model = make_model().double(), make_model().double()
    for m, opt in ((model, make(model.parameters())), (ref_model, make_ref(list(ref_model.parameters())))):
        for t in range(STEPS):
            x, y = (v.double() if v.is_floating_point() else v for v in batch(t))
            opt.zero_grad()
            loss_fn(m, x, y).backward()
            opt.step()
    assert rel(flat(model), flat(ref_model)) < 1e-12


def test_cblr_default_differs_from_lars():
    """CBLR's default (Rayleigh secant, model step) is a different method: the trajectories must differ."""
    a, b = make_model(), make_model()
    train(a, lbopt.CBLR(a.parameters(), lr=0.5), STEPS)
    train(b, lbopt.LARS(b.parameters(), lr=0.5), STEPS)
    assert rel(flat(a), flat(b)) > 1e-4


def test_param_groups_and_scheduler():
    """Per-group LR/decay are honoured and an LR scheduler changes the step."""
    model = make_model()
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    opt = lbopt.LAMB([{"params": decay, "weight_decay": 0.1}, {"params": rest, "lr": 0.0}], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.0 if t >= 2 else 1.0)
    before = [p.detach().clone() for p in rest]
    for t in range(4):
        from tests.optim.problem import batch, loss_fn

        x, y = batch(t)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
        if t == 1:
            frozen_at = flat(model)
        sched.step()
    assert all(torch.equal(a, b) for a, b in zip(before, rest)), "lr=0 group moved"
    assert torch.equal(flat(model), frozen_at), "scheduler set lr to 0 but parameters still moved"
    assert opt.param_groups[0]["step"] == 4


def test_nesterov_and_adam_direction_run_and_differ():
    base, nest, adam = make_model(), make_model(), make_model()
    train(base, lbopt.CBLR(base.parameters(), lr=0.5), 10)
    train(nest, lbopt.CBLR(nest.parameters(), lr=0.5, nesterov=True), 10)
    train(adam, lbopt.CBLR(adam.parameters(), lr=0.5, direction="adam"), 10)
    assert rel(flat(base), flat(nest)) > 1e-6
    assert rel(flat(base), flat(adam)) > 1e-4
    assert torch.isfinite(flat(adam)).all()


def test_trust_clip_bounds_layer_rates():
    model = make_model()
    opt = lbopt.CBLR(model.named_parameters(), lr=0.5, trust_clip=(0.02, 0.05))
    train(model, opt, 5)
    rates = {k: v for k, v in opt.last_layer_stats.items() if k.startswith("lr/") and k.endswith("weight")}
    adapted = [v for k, v in rates.items() if not k.startswith("lr/1.")]  # 1.* is the LayerNorm
    assert adapted and all(0.02 * 0.5 - 1e-12 <= v <= 0.05 * 0.5 + 1e-12 for v in adapted)


def test_module_grouping_shares_one_rate_per_module():
    model = make_model()
    opt = lbopt.LARS(model.named_parameters(), lr=0.5, layer_grouping="module", exclude=False)
    assert opt.table.num_layers == 3  # 0, 1 (LayerNorm), 3
    train(model, opt, 2)
    assert set(opt.last_layer_stats) >= {"lr/0", "lr/3"}
