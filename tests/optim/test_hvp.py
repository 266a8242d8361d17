"""CBLR(curvature="hvp"): the layer-diagonal Hessian quadratic form along the gradient."""

import pytest
import torch
from torch import nn

import lbopt
from tests.optim.problem import batch, flat, loss_fn, make_model


class Quadratic(nn.Module):
    """L = Σ_l ½ w_lᵀ A_l w_l − b_lᵀ w_l, so H_ll = A_l (block diagonal) and g_l = A_l w_l − b_l."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(4, 3, generator=g))
        self.w2 = nn.Parameter(torch.randn(5, 2, generator=g))
        self.a = []
        for n in (12, 10):
            q = torch.randn(n, n, generator=g, dtype=torch.float64)
            self.a.append(q @ q.T / n + torch.eye(n, dtype=torch.float64))
        self.b = [torch.randn(12, generator=g), torch.randn(10, generator=g)]

    def forward(self) -> torch.Tensor:
        total = 0.0
        for w, a, b in zip((self.w1, self.w2), self.a, self.b):
            v = w.reshape(-1)
            total = total + 0.5 * v @ a.float() @ v - b @ v
        return total


def _closure(model, opt):
    def closure():
        opt.zero_grad()
        loss = model()
        loss.backward()
        return loss

    return closure


def test_hvp_equals_the_analytic_layer_curvature_on_a_quadratic():
    model = Quadratic()
    opt = lbopt.CBLR(model.parameters(), lr=0.1, curvature="hvp")
    expected = []
    for w, a, b in zip((model.w1, model.w2), model.a, model.b):
        g = a @ w.detach().reshape(-1).double() - b.double()
        expected.append(float(g @ a @ g / (g @ g)))
    before = flat(model)
    opt.step(_closure(model, opt))
    got = opt.layer_state["curvature"].tolist()
    assert got == pytest.approx(expected, rel=1e-3)
    assert not torch.equal(flat(model), before) and torch.isfinite(flat(model)).all()


def test_hvp_matches_autograd_double_backward_on_a_network():
    model = make_model()
    x, y = batch(0)
    opt = lbopt.CBLR(model.named_parameters(), lr=0.1, curvature="hvp", hvp_delta=1e-4)
    params = list(model.parameters())
    loss = loss_fn(model, x, y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    exact = {}
    for name, p, g in zip([n for n, _ in model.named_parameters()], params, grads):
        if p.ndim > 1:
            (hg,) = torch.autograd.grad(g, p, grad_outputs=g.detach(), retain_graph=True)
            exact[name] = float((hg * g).sum().detach() / g.square().sum().detach())

    def closure():
        opt.zero_grad()
        out = loss_fn(model, x, y)
        out.backward()
        return out

    opt.step(closure)
    for name, value in exact.items():
        layer = opt.table.names.index(name)
        assert opt.layer_state["curvature"][layer].item() == pytest.approx(value, rel=2e-2), name


def test_hvp_refreshes_every_interval_and_restores_gradients():
    model = Quadratic()
    opt = lbopt.CBLR(model.parameters(), lr=0.05, curvature="hvp", hvp_interval=3)
    calls = []
    closure = _closure(model, opt)

    def counting():
        calls.append(1)
        return closure()

    for _ in range(4):
        counting()  # the step's own gradient
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step(counting)
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    # step() calls the closure once per step, plus one probe per layer on steps 1 and 4
    assert len(calls) == 4 + 4 + 2 * 2


def test_hvp_without_closure_is_a_clear_error():
    model = make_model()
    opt = lbopt.CBLR(model.parameters(), curvature="hvp")
    x, y = batch(0)
    loss_fn(model, x, y).backward()
    with pytest.raises(RuntimeError, match="needs step\\(closure\\)"):
        opt.step()
