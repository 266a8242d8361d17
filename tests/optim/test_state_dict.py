"""state_dict round trips resume bit-exactly."""

import copy
import io

import pytest
import torch

import lbopt
from tests.optim.problem import flat, make_model, train

MAKERS = {
    "lars": lambda ps: lbopt.LARS(ps, lr=0.5, weight_decay=1e-3),
    "lamb": lambda ps: lbopt.LAMB(ps, lr=1e-2),
    "cblr": lambda ps: lbopt.CBLR(ps, lr=0.5, weight_decay=1e-3),
    "cblr_adam": lambda ps: lbopt.CBLR(ps, lr=0.5, direction="adam"),
    "mclr": lambda ps: lbopt.MCLR(ps, lr=0.5),
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_resume_is_bit_exact(name):
    make = MAKERS[name]
    whole = make_model()
    train(whole, make(whole.parameters()), 10)

    first = make_model()
    opt = make(first.parameters())
    train(first, opt, 5)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)

    resumed = make_model(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt2 = make(resumed.parameters())
    opt2.load_state_dict(saved["opt"])
    train(resumed, opt2, 5, start=5)
    assert torch.equal(flat(resumed), flat(whole))


def test_state_dict_carries_layer_state_and_does_not_alias():
    model = make_model()
    opt = lbopt.CBLR(model.parameters(), lr=0.5)
    train(model, opt, 3)
    sd = opt.state_dict()
    assert set(sd["layer_state"]) == {
        "curvature", "curvature_num", "curvature_den", "has_curvature", "rate", "move_scale", "move_dot"}
    before = copy.deepcopy(sd["layer_state"]["curvature"])
    train(model, opt, 2, start=3)
    assert torch.equal(sd["layer_state"]["curvature"], before), "state_dict aliases live optimizer state"
    assert sd["param_groups"][0]["step"] == 3
