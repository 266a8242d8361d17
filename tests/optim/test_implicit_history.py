"""CBLR's Rayleigh secant without copies of ``w_{t-1}``, ``h_{t-1}`` (the default momentum path).

The last move is a multiple of the momentum buffer, so ``⟨Δh, Δw⟩`` and ``‖Δw‖²`` follow from
sums the step takes anyway (``CBLR._implicit_history``). These tests hold it to the explicit
form that keeps the two parameter-sized copies (the path Nesterov still uses).
"""

import pytest
import torch

import lbopt
from tests.optim.problem import batch, loss_fn, make_model


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _train(opt_cls, explicit: bool, steps: int = 25, **kw):
    torch.manual_seed(0)
    model = make_model()
    opt = opt_cls(model.named_parameters(), weight_decay=1e-3, **kw)
    if explicit:  # the control: keep w_{t-1} and h_{t-1} and difference them
        opt._implicit_history = lambda: False
    curvatures = []
    for t in range(steps):
        x, y = batch(t)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
        curvatures.append(opt.layer_state["curvature"].clone())
    return model, opt, torch.stack(curvatures)


@pytest.mark.parametrize("opt_cls", [lbopt.CBLR, lbopt.MCLR])
@pytest.mark.parametrize("model_step", [True, False], ids=["projected", "heavy_ball"])
def test_implicit_secant_equals_the_explicit_difference(opt_cls, model_step: bool) -> None:
    implicit, opt, c_implicit = _train(opt_cls, explicit=False, model_step=model_step)
    explicit, _, c_explicit = _train(opt_cls, explicit=True, model_step=model_step)
    assert torch.isfinite(c_implicit[-1]).sum() >= 2, "no curvature estimated: the comparison would be vacuous"
    both = torch.isfinite(c_implicit) & torch.isfinite(c_explicit)
    assert torch.equal(both, torch.isfinite(c_implicit)), "the two forms estimate on different steps/layers"
    rel_c = ((c_implicit[both] - c_explicit[both]).abs() / c_explicit[both].abs()).max()
    assert rel_c < 2e-3, f"curvature estimates differ by {rel_c:.2e} (relative)"
    diff = float((_flat(implicit) - _flat(explicit)).norm() / _flat(explicit).norm())
    assert diff < 1e-5, diff
    assert not any("prev_param" in s or "prev_grad" in s for s in opt.state.values())


def test_control_a_wrong_last_move_changes_the_estimate() -> None:
    """The test above can fail: a wrong remembered move gives other curvatures."""
    model = make_model()
    opt = lbopt.CBLR(model.named_parameters())
    for t in range(3):
        x, y = batch(t)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        if t == 2:
            opt.layer_state["move_scale"] = opt.layer_state["move_scale"] * 2
            before = opt.layer_state["curvature_num"].clone()
        opt.step()
    assert not torch.allclose(opt.layer_state["curvature_num"], before, rtol=1e-3, equal_nan=True)


def test_cblr_keeps_one_parameter_copy_and_nesterov_three() -> None:
    def state_bytes(opt) -> int:
        return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                   if torch.is_tensor(v) and v.dim() > 0)

    for nesterov, copies in ((False, 1), (True, 3)):
        model = make_model()
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        opt = lbopt.CBLR(model.parameters(), nesterov=nesterov)
        for t in range(3):
            x, y = batch(t)
            opt.zero_grad()
            loss_fn(model, x, y).backward()
            opt.step()
        kept = state_bytes(opt) / param_bytes
        assert kept == pytest.approx(copies, abs=0.01), (nesterov, kept)
