"""The floating-point perturbation probe: a control, the amplification, and the report vs saved parameters."""

import json
import math

import pytest
import torch

from lbopt.diagnostics import perturbation as PT

SMALL = ["--task", "blobs", "--hidden", "32", "--batch_size", "50", "--steps", "120", "--lr", "4.0"]


def test_nudge_moves_exactly_that_many_representable_values():
    t = torch.tensor([1.0, 2.0])
    PT.nudge_ulps(t, 0, 3)
    assert t[0].item() == 1.0 + 3 * 2.0**-23 and t[1].item() == 2.0
    PT.nudge_ulps(t, 0, -3)
    assert t[0].item() == 1.0


def test_zero_perturbation_keeps_the_twins_bit_identical(tmp_path):
    report = PT.main([*SMALL, "--ulps", "0", "--save_every", "120", "--out", str(tmp_path)])
    assert all(d == 0.0 for d in report.distance)
    assert report.loss_a[1:] == report.loss_b[1:]
    saved = torch.load(tmp_path / "params" / "step_00120.pt")
    assert all(torch.equal(saved["a"][k], saved["b"][k]) for k in saved["a"])
    assert report.accuracy_difference == 0.0


def test_one_ulp_at_a_large_lr_grows_by_orders_of_magnitude(tmp_path):
    report = PT.main([*SMALL, "--steps", "200", "--out", str(tmp_path)])
    assert 0 < report.distance[0] < 1e-7  # one ulp of one weight
    assert report.growth() > 1e5
    assert report.distance[-1] > 1e-3
    assert (tmp_path / "divergence.png").stat().st_size > 10_000


def test_report_matches_a_recomputation_from_saved_parameters(tmp_path):
    PT.main([*SMALL, "--steps", "60", "--save_every", "20", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text())
    for t in (20, 40, 60):
        saved = torch.load(tmp_path / "params" / f"step_{t:05d}.pt")
        num = den = 0.0
        for name in saved["a"]:
            wa, wb = saved["a"][name].double(), saved["b"][name].double()
            d, n = (wa - wb).norm().item(), wa.norm().item()
            assert report["layer_distance"][name][t] == pytest.approx(d / n, rel=1e-9, abs=0)
            num, den = num + d * d, den + n * n
        assert report["distance"][t] == pytest.approx(math.sqrt(num / den), rel=1e-9)
    assert report["steps"] == list(range(61))


def test_gradient_perturbation_starts_at_its_step(tmp_path):
    argv = [*SMALL, "--steps", "30", "--perturb", "gradient", "--perturb_step", "10", "--out", str(tmp_path)]
    report = PT.main([*argv, "--ulps", "1000"])
    assert all(d == 0.0 for d in report.distance[:10])
    assert all(d > 0.0 for d in report.distance[10:])
    # one ulp of a gradient moves the update w − ηg by less than one ulp of w: rounded away
    assert all(d == 0.0 for d in PT.main([*argv, "--ulps", "1"]).distance)


@pytest.mark.parametrize(
    "argv, match",
    [(["--lr", "0"], "--lr must be positive"),
     (["--perturb", "gradient", "--perturb_step", "999"], "--perturb_step 999"),
     (["--optimizer", "nope"], "--optimizer 'nope' is unknown")],
)
def test_bad_arguments_are_one_line_errors(tmp_path, argv, match):
    with pytest.raises(SystemExit, match=match):
        PT.main([*SMALL, *argv, "--out", str(tmp_path)])


def test_unknown_layer_names_the_parameters(tmp_path):
    with pytest.raises(ValueError, match="0.weight"):
        PT.main([*SMALL, "--layer", "nope", "--out", str(tmp_path)])
