"""LARS is the weight-ratio instance of CBLR: an equality, with every default."""

import inspect

import lbopt
from tests.optim.problem import flat, make_model, rel, train


def test_lars_equals_cblr_weight_ratio_with_defaults():
    a, b = make_model(), make_model()
    start = flat(a)
    train(a, lbopt.LARS(a.parameters(), lr=1.0), 50)
    train(b, lbopt.CBLR(b.parameters(), lr=1.0, curvature="weight_ratio"), 50)
    assert rel(flat(a), start) > 1e-3
    assert rel(flat(a), flat(b)) <= 1e-6


def test_lars_equals_cblr_weight_ratio_with_decay_and_nesterov():
    kw = dict(lr=0.3, weight_decay=5e-3, momentum=0.8, nesterov=True, trust_coefficient=0.01)
    a, b = make_model(), make_model()
    train(a, lbopt.LARS(a.parameters(), **kw), 50)
    train(b, lbopt.CBLR(b.parameters(), curvature="weight_ratio", **kw), 50)
    assert rel(flat(a), flat(b)) <= 1e-6


def test_shared_hyperparameters_have_same_names_and_defaults():
    lars = inspect.signature(lbopt.LARS).parameters
    cblr = inspect.signature(lbopt.CBLR).parameters
    shared = set(lars) - {"self", "params"}
    assert shared <= set(cblr)
    for name in shared:
        assert lars[name].default == cblr[name].default, name
