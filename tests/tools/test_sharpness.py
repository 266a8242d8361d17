"""SharpnessMonitor on one process: exact eigenvalues, agreement with torch.func, no side effects."""

import pytest
import torch
from torch import nn

import lbopt
from lbopt.sharpness import SharpnessMonitor, top_hessian_eigenvalue


class Quadratic(nn.Module):
    """L = ½ wᵀAw − bᵀw over w = (w1, w2) with a known spectrum; H = A (with off-diagonal blocks)."""

    EIGS = (10.0, 6.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.5, 0.25, 0.1)

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))
        self.a = q @ torch.diag(torch.tensor(self.EIGS, dtype=torch.float64)) @ q.T
        self.b = torch.randn(10, generator=g, dtype=torch.float64)
        self.w1 = nn.Parameter(torch.randn(2, 3, generator=g))
        self.w2 = nn.Parameter(torch.randn(4, 1, generator=g))

    def forward(self, _batch=None) -> torch.Tensor:
        w = torch.cat([self.w1.reshape(-1), self.w2.reshape(-1)]).double()
        return (0.5 * w @ self.a @ w - self.b @ w).float()


def test_power_iteration_finds_the_top_eigenvalue_of_a_quadratic():
    model = Quadratic()
    monitor = SharpnessMonitor(model, lambda m, b: m(b), None, iters=300, tol=1e-9)
    report = monitor.probe()
    assert report.lambda_max == pytest.approx(10.0, rel=1e-4)
    # per-layer Rayleigh quotients of the diagonal blocks along the gradient, analytically
    w = torch.cat([model.w1.detach().reshape(-1), model.w2.detach().reshape(-1)]).double()
    g = model.a @ w - model.b
    for name, sl in (("w1", slice(0, 6)), ("w2", slice(6, 10))):
        gl, block = g[sl], model.a[sl, sl]
        assert report.layer_rayleigh[name] == pytest.approx(float(gl @ block @ gl / (gl @ gl)), rel=1e-4)
    assert report.gradient_rayleigh == pytest.approx(float(g @ model.a @ g / (g @ g)), rel=1e-4)


def test_power_iteration_on_an_explicit_matrix():
    a = torch.diag(torch.tensor([5.0, -1.0, 2.0, 0.5]))
    lam, v, _ = top_hessian_eigenvalue(lambda x: a @ x, torch.ones(4), iters=500, tol=1e-12)
    assert lam == pytest.approx(5.0, rel=1e-6)
    assert abs(float(v[0])) == pytest.approx(1.0, rel=1e-5)


def _net_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    return model, (x, y)


def _ce(m, b):
    return nn.functional.cross_entropy(m(b[0]), b[1])


def test_agrees_with_torch_func_hessian_on_a_small_network():
    model, batch = _net_and_batch()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def loss_of(flat):
        parts = [t.view(s) for t, s in zip(torch.split(flat, sizes), shapes)]
        return _ce(lambda x: torch.func.functional_call(model, dict(zip(names, parts)), (x,)), batch)

    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    model.double()
    batch = (batch[0].double(), batch[1])
    h = torch.func.hessian(loss_of)(w)
    eigs = torch.linalg.eigvalsh(h)
    top = float(eigs[eigs.abs().argmax()])
    report = SharpnessMonitor(model, _ce, batch, iters=300, tol=1e-8).probe()
    assert report.lambda_max == pytest.approx(top, rel=1e-3)
    g = torch.func.grad(loss_of)(w)
    offsets = torch.cumsum(torch.tensor([0] + sizes), 0).tolist()
    for i, name in enumerate(names):
        if len(shapes[i]) > 1:
            sl = slice(offsets[i], offsets[i + 1])
            want = float(g[sl] @ h[sl, sl] @ g[sl] / (g[sl] @ g[sl]))
            assert report.layer_rayleigh[name] == pytest.approx(want, rel=1e-3)
    assert set(report.layer_rayleigh) == {"0.weight", "2.weight"}


def _train(with_monitor: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    opt = lbopt.CBLR(model.named_parameters(), lr=0.5, trust_coefficient=0.01)
    probe = (torch.randn(16, 5), torch.randint(0, 3, (16,)))
    monitor = SharpnessMonitor(model, _ce, probe, every=2, iters=5, optimizer=opt) if with_monitor else None
    for step in range(1, 7):
        x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
        opt.zero_grad()
        _ce(model, (x, y)).backward()
        if monitor is not None:  # a probe between backward and step must not touch .grad either
            monitor.probe(step)
        opt.step()
        if monitor is not None:
            monitor.maybe_probe(step)
    return model, monitor


def test_the_monitor_does_not_change_the_training_trajectory():
    plain, _ = _train(False)
    watched, monitor = _train(True)
    assert len(monitor.history) == 9
    for a, b in zip(plain.state_dict().values(), watched.state_dict().values()):
        assert torch.equal(a, b)  # parameters and batch-norm buffers
    assert watched.training
    report = monitor.history[-1]
    assert report.lr == 0.5 and report.as_dict()["sharpness/two_over_lr"] == 4.0
    assert set(report.layer_lr) == {"0.weight", "4.weight"}  # CBLR's per-layer η_l, for 2/η_l
    assert set(report.layer_curvature) >= {"0.weight", "4.weight"}


def test_log_receives_tracker_scalars_and_plot_writes_a_png(tmp_path):
    model, batch = _net_and_batch()
    logged = []
    monitor = SharpnessMonitor(model, _ce, batch, every=1, log=lambda d, s: logged.append((s, d)))
    monitor.maybe_probe(3)
    assert logged[0][0] == 3 and logged[0][1]["sharpness/lambda_max"] > 0
    path = monitor.plot(tmp_path / "s.png")
    assert path.stat().st_size > 1000


@pytest.mark.parametrize(
    "kwargs, match", [({"every": 0}, "every"), ({"iters": 0}, "iters"), ({"tol": -1.0}, "tol")]
)
def test_bad_arguments_are_clear_errors(kwargs, match):
    model, batch = _net_and_batch()
    with pytest.raises(ValueError, match=match):
        SharpnessMonitor(model, _ce, batch, **kwargs)


def test_partitioned_parameters_are_refused():
    model, batch = _net_and_batch()
    model[0].weight.ds_tensor = torch.empty(0)  # what ZeRO-3 leaves on a parameter
    with pytest.raises(NotImplementedError, match="ZeRO-3"):
        SharpnessMonitor(model, _ce, batch).probe()
