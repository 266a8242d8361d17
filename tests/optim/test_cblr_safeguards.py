"""CBLR's safeguards as numbers: the first step's size, the relative trust region, the growth limit."""

import pytest
import torch

import lbopt
from tests.optim.problem import batch, loss_fn, make_model


def _adapted(model):
    return [p for p in model.parameters() if p.ndim > 1]


def _step(model, opt, t):
    x, y = batch(t)
    opt.zero_grad()
    loss_fn(model, x, y).backward()
    opt.step()


def test_first_step_moves_each_adapted_layer_by_initial_step_of_its_norm():
    model = make_model()
    opt = lbopt.CBLR(model.parameters())  # lr 1, κ 1, τ₀ = 0.01, no decay
    before = [p.detach().clone() for p in _adapted(model)]
    _step(model, opt, 0)
    for p, w in zip(_adapted(model), before):
        assert float((p.detach() - w).norm() / w.norm()) == pytest.approx(0.01, rel=1e-4)


@pytest.mark.parametrize("model_step", [True, False], ids=["projected", "heavy_ball"])
def test_no_layer_moves_more_than_max_update_of_its_norm(model_step):
    model = make_model()
    opt = lbopt.CBLR(model.parameters(), lr=100.0, model_step=model_step, max_update=0.05)
    capped = 0
    for t in range(8):
        before = [p.detach().clone() for p in _adapted(model)]
        _step(model, opt, t)
        for p, w in zip(_adapted(model), before):
            moved = float((p.detach() - w).norm() / w.norm())
            assert moved <= 0.05 * (1 + 1e-5)
            capped += moved > 0.05 * (1 - 1e-5)
    assert capped > 0, "lr=100 should have hit the trust region at least once (else the test is vacuous)"


def test_rate_rises_at_most_rate_growth_per_step():
    model = make_model()
    opt = lbopt.CBLR(model.named_parameters(), rate_growth=1.5)
    previous = None
    for t in range(10):
        _step(model, opt, t)
        rates = torch.tensor([v for k, v in opt.last_layer_stats.items() if k.startswith("rate/")])
        if previous is not None:
            assert (rates <= 1.5 * previous * (1 + 1e-9)).all()
        previous = rates


def test_momentum_restarts_instead_of_stalling():
    """A buffer pointing uphill (⟨h, μm + h⟩ ≤ 0) is dropped: the layer still moves along -h."""
    model = make_model()
    opt = lbopt.CBLR(model.parameters())
    _step(model, opt, 0)
    for p in _adapted(model):  # plant a buffer that opposes the next gradient strongly
        opt.state[p]["momentum_buffer"].mul_(-1000.0)
    before = [p.detach().clone() for p in _adapted(model)]
    _step(model, opt, 0)  # same batch: the gradient still points roughly the same way
    assert all((p - w).norm() > 0 for p, w in zip(_adapted(model), before))
