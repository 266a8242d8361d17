"""max_grad_norm: the applied gradient is clipped, the batch-size test sees the unclipped one."""

import pytest
import torch

import lbopt.optim.adagrad as ada
from tests.batch import problem as P

CTRL = dict(initial_batch_size=8, max_batch_size=64, micro_batch_size=P.MICRO, world_size=1)


def _grads_of_step(model, j, k):
    model.zero_grad()
    for idx in range(j, j + k):
        (P.loss_fn(model, *P.micro_batch(idx)) / k).backward()


@pytest.mark.parametrize("kind", ["norm", "coordinate"])
def test_clipped_update_unclipped_statistics(kind):
    clip = 0.2
    model, ref_model = P.make_model(), P.make_model()
    if kind == "norm":
        opt = ada.AdAdaGradNorm(model.parameters(), lr=0.3, max_grad_norm=clip, eta=0.8, **CTRL)
        ref_opt = ada.AdaGradNorm(ref_model.parameters(), lr=0.3)
    else:
        opt = ada.AdAdaGrad(model.parameters(), lr=0.05, max_grad_norm=clip, test="coordinate", eta=0.8, **CTRL)
        ref_opt = torch.optim.Adagrad(ref_model.parameters(), lr=0.05, eps=1e-10)
    ctrl, j, clipped_steps = opt.batch_controller, 0, 0
    for _ in range(8):
        k = ctrl.batch_size // P.MICRO
        _grads_of_step(model, j, k)
        _grads_of_step(ref_model, j, k)
        unclipped_sq = sum(float(p.grad.double().square().sum()) for p in ref_model.parameters())
        total = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), clip)
        clipped_steps += float(total) > clip
        opt.step()
        ref_opt.step()
        # the controller's ‖ḡ‖² is the unclipped one (its micro-batch samples are unclipped too)
        assert ctrl.last.estimate.grad_sq_norm == pytest.approx(unclipped_sq, rel=1e-6)
        j += k
    assert clipped_steps >= 4  # the cap really bit
    assert P.rel(P.flat(model), P.flat(ref_model)) <= 1e-6


def test_max_grad_norm_is_validated():
    with pytest.raises(ValueError, match="max_grad_norm"):
        ada.AdAdaGradNorm(P.make_model().parameters(), max_grad_norm=0.0, **CTRL)
