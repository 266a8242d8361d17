"""BatchSizeController: hand-computed decisions, known variances, bad inputs, checkpoint resume."""

import math
import warnings

import pytest
import torch
from torch import nn

import lbopt.optim.adagrad as ada
from lbopt.batch import BatchSizeController, GradientSamples, estimate_variance, required_batch
from tests.batch import problem as P


class Linear(nn.Module):
    """loss = mean_i ⟨x_i, w⟩: the per-sample gradient is x_i, whatever w is."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.w).mean()


def _accumulate(model, ctrl, micro_batches):
    for p in model.parameters():
        p.grad = None
    for x in micro_batches:
        (model(x) / len(micro_batches)).backward()
    return ctrl.step()


def test_norm_test_matches_hand_computation():
    # Four micro-batches of two samples; their means are (1,0), (3,0), (1,2), (3,2).
    means = [(1.0, 0.0), (3.0, 0.0), (1.0, 2.0), (3.0, 2.0)]
    micro = [torch.tensor([[m0 - 1, m1 + 1], [m0 + 1, m1 - 1]]) for m0, m1 in means]
    model = Linear(2)
    ctrl = BatchSizeController(8, 64, micro_batch_size=2, world_size=1, eta=0.25).attach(model)
    d = _accumulate(model, ctrl, micro)
    # ḡ = (2, 1), ‖ḡ‖² = 5; Σ‖g_k‖² = 1 + 9 + 5 + 13 = 28; V = b (28 − K‖ḡ‖²)/(K − 1) = 2·8/3.
    v = 2 * (28 - 4 * 5) / 3
    assert d.estimate.variance == pytest.approx(v, rel=1e-6)
    assert d.estimate.grad_sq_norm == pytest.approx(5.0)
    assert d.required == pytest.approx(v / (0.25**2 * 5), rel=1e-6)  # 17.07
    assert d.batch_size == 18 and ctrl.batch_size == 18 and d.reason == "grown"
    assert ctrl.accumulation_steps == 9


def test_norm_test_on_known_variance_in_expectation():
    sigma = torch.tensor([1.0, 2.0, 0.5, 1.0, 1.0])
    mu = torch.tensor([0.5, -0.5, 0.2, 0.0, 1.0])
    model = Linear(5)
    ctrl = BatchSizeController(32, 4096, micro_batch_size=4, world_size=1, eta=0.5).attach(model)
    g = torch.Generator().manual_seed(0)
    estimates, required = [], []
    for _ in range(200):
        micro = [mu + sigma * torch.randn(4, 5, generator=g) for _ in range(8)]
        d = _accumulate(model, ctrl, micro)
        estimates.append(d.estimate.variance)
        required.append(d.required * 0.25 * d.estimate.grad_sq_norm)
        ctrl.batch_size = 32  # keep sampling at the same batch
    true_var = float(sigma.square().sum())  # 7.25
    mean = sum(estimates) / len(estimates)
    assert abs(mean - true_var) / true_var < 0.08, (mean, true_var)
    assert required == pytest.approx(estimates, rel=1e-9)  # required = V/(η²‖ḡ‖²)


def test_criteria_formulas():
    s = GradientSamples(count=4, sample_size=2, sum_sq=28.0, sum_dot=20.0, sum_dot_sq=120.0, dir_sq_norm=5.0)
    est = estimate_variance(s, grad_sq_norm=5.0)
    # ⟨g_k, ḡ⟩ = 2, 6, 4, 8: mean 5, Σ(·−5)² = 20, V_d = 2·20/3.
    assert est.variance_inner == pytest.approx(2 * 20 / 3)
    assert est.variance_orth == pytest.approx(2 * 8 / 3 - (2 * 20 / 3) / 5)
    ip = required_batch("inner_product", est, eta=1, theta=0.5, nu=1)
    orth = required_batch("orthogonality", est, eta=1, theta=0.5, nu=2.0)
    assert ip == pytest.approx(est.variance_inner / (0.25 * 25))
    assert orth == pytest.approx(est.variance_orth / (4.0 * 5))
    assert required_batch("augmented", est, 1, 0.5, 2.0) == pytest.approx(max(ip, orth))
    for bad in (0.0, float("nan"), float("inf")):
        est0 = estimate_variance(s, grad_sq_norm=bad)
        for t in ("norm", "inner_product", "orthogonality", "augmented", "coordinate"):
            assert math.isnan(required_batch(t, est0, 0.5, 0.9, 5.84))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(initial_batch_size=64, max_batch_size=32, micro_batch_size=8), "max_batch_size: 32 is below"),
        (dict(initial_batch_size=20, max_batch_size=64, micro_batch_size=8),
         "initial_batch_size: 20 is not a multiple.*use 16 or 24"),
        (dict(initial_batch_size=32, max_batch_size=100, micro_batch_size=8, world_size=2),
         "max_batch_size: 100.*8 × 2 = 16"),
        (dict(initial_batch_size=8, max_batch_size=64, micro_batch_size=8), "needs at least two"),
        (dict(initial_batch_size=16, max_batch_size=64, micro_batch_size=8, test="norms"), "Invalid test"),
        (dict(initial_batch_size=16, max_batch_size=64, micro_batch_size=8, eta=0.0), "Invalid eta"),
        (dict(initial_batch_size=16, max_batch_size=64, micro_batch_size=8, lr_coupling="cubic"), "lr_coupling"),
        (dict(initial_batch_size=16, max_batch_size=64, micro_batch_size=0), "micro_batch_size"),
        (dict(initial_batch_size=16, max_batch_size=64, micro_batch_size=8, test_interval=0), "test_interval"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, match):
    kwargs.setdefault("world_size", 1)
    with pytest.raises(ValueError, match=match):
        BatchSizeController(**kwargs)


def test_optimizer_without_batch_sizes_says_what_to_pass():
    with pytest.raises(ValueError, match="initial_batch_size"):
        ada.AdAdaGradNorm(P.make_model().parameters())


def test_zero_and_nonfinite_gradients_hold_the_batch():
    model = Linear(3)
    ctrl = BatchSizeController(8, 64, micro_batch_size=2, world_size=1, eta=0.1).attach(model)
    d = _accumulate(model, ctrl, [torch.zeros(2, 3)] * 4)
    assert d.reason == "no-estimate" and ctrl.batch_size == 8 and math.isnan(d.required)
    model = P.make_model()
    opt = ada.AdAdaGradNorm(model.parameters(), lr=0.1, initial_batch_size=8, max_batch_size=64,
                            micro_batch_size=2, world_size=1, eta=0.1)
    before = P.flat(model)
    opt.zero_grad()
    for _ in range(4):
        x, y = P.micro_batch(0, 2)
        x[0, 0] = float("inf")
        (P.loss_fn(model, x, y) / 4).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
    assert opt.batch_controller.batch_size == 8 and opt.batch_controller.last.reason == "no-estimate"
    assert torch.equal(P.flat(model), before) and opt.skipped_steps == 1
    assert opt.accumulator == 0.0


def test_cap_rounding_monotone_and_lr_coupling():
    model = Linear(2)
    ctrl = BatchSizeController(8, 24, micro_batch_size=2, world_size=2, eta=0.05, lr_coupling="sqrt").attach(model)
    micro = [torch.tensor([[0.0, 1.0], [2.0, 1.0]]), torch.tensor([[3.0, 1.0], [3.0, 3.0]])] * 2
    d = _accumulate(model, ctrl, micro)
    assert d.required > 24 and d.batch_size == 24 and d.reason == "capped"
    assert ctrl.lr_factor == pytest.approx(math.sqrt(24 / 8))
    # A quiet step never shrinks a monotone controller.
    d = _accumulate(model, ctrl, [torch.ones(2, 2)] * 12)
    assert d.batch_size == 24 and d.reason == "held"
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with ctrl.scaled_lr(opt):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * math.sqrt(3))
    assert opt.param_groups[0]["lr"] == 0.5


def test_non_monotone_shrinks_to_initial_at_least():
    model = Linear(2)
    ctrl = BatchSizeController(8, 64, micro_batch_size=2, world_size=1, monotone=False).attach(model)
    ctrl.batch_size = 32
    micro = [torch.tensor([[1.0, 1.0], [1.0, 1.01]])] * 16
    d = _accumulate(model, ctrl, micro)
    assert d.reason == "shrunk" and d.batch_size == 8


def test_test_interval_idles_hooks_between_tests():
    model = Linear(2)
    ctrl = BatchSizeController(8, 64, micro_batch_size=2, world_size=1, eta=0.25, test_interval=3).attach(model)
    means = [(1.0, 0.0), (3.0, 0.0), (1.0, 2.0), (3.0, 2.0)]
    micro = [torch.tensor([[m0 - 1, m1 + 1], [m0 + 1, m1 - 1]]) for m0, m1 in means]
    reasons = [_accumulate(model, ctrl, micro).reason for _ in range(3)]
    assert reasons == ["not-tested", "not-tested", "grown"]
    assert ctrl.samples._sq == []  # nothing accumulated on idle steps


@pytest.mark.parametrize("test", ["norm", "augmented"])
def test_state_dict_resume_continues_the_same_trajectory(test):
    kw = dict(initial_batch_size=8, max_batch_size=64, micro_batch_size=P.MICRO, world_size=1, test=test,
              eta=0.8, theta=0.3, nu=0.5)
    model = P.make_model()
    opt = ada.AdAdaGradNorm(model.parameters(), lr=0.3, **kw)
    sizes, _ = P.train_stream(model, opt, opt.batch_controller, 12)
    assert sizes[-1] > sizes[0]

    model1 = P.make_model()
    opt1 = ada.AdAdaGradNorm(model1.parameters(), lr=0.3, **kw)
    first, j = P.train_stream(model1, opt1, opt1.batch_controller, 5)
    ckpt = {"model": model1.state_dict(), "opt": opt1.state_dict()}
    model2 = P.make_model(seed=123)
    model2.load_state_dict(ckpt["model"])
    opt2 = ada.AdAdaGradNorm(model2.parameters(), lr=0.3, **kw)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.batch_controller.batch_size == opt1.batch_controller.batch_size
    rest, _ = P.train_stream(model2, opt2, opt2.batch_controller, 7, start_micro=j)
    assert first + rest == sizes
    assert P.rel(P.flat(model2), P.flat(model)) <= 1e-6
    assert opt2.batch_controller.history == opt.batch_controller.history


def test_explicit_observations_equal_the_hooks():
    """``observe_microbatch`` (engines without hooks) gives the same decision as the hooks."""
    means = [(1.0, 0.0), (3.0, 0.0), (1.0, 2.0), (3.0, 2.0)]
    micro = [torch.tensor([[m0 - 1, m1 + 1], [m0 + 1, m1 - 1]]) for m0, m1 in means]
    hooked = Linear(2)
    a = BatchSizeController(8, 64, micro_batch_size=2, world_size=1, eta=0.25).attach(hooked)
    da = _accumulate(hooked, a, micro)
    b = BatchSizeController(8, 64, micro_batch_size=2, world_size=1, eta=0.25)
    for x in micro:  # the gradient as accumulated: mean of the micro-batch, divided by K
        b.observe_microbatch(float((x.mean(0) / 4).square().sum()))
    db = b.step(grad_sq_norm=5.0)
    assert db.estimate.variance == pytest.approx(da.estimate.variance)
    assert db.batch_size == da.batch_size == 18
