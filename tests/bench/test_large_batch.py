"""bench/large_batch.py end to end on a tiny slice: the JSON schema and numbers that could be wrong."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_bench():
    spec = importlib.util.spec_from_file_location("large_batch", ROOT / "bench" / "large_batch.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    bench = load_bench()
    out = tmp_path_factory.mktemp("large_batch")
    bench.main(["--smoke", "--tasks", "cnn", "--methods", "lamb,adadagrad", "--out", str(out)])
    return bench, out, json.loads((out / "large_batch.json").read_text())


def test_outputs_and_schema(smoke):
    bench, out, report = smoke
    assert (out / "large_batch.md").read_text().startswith("# Large-batch quality benchmark")
    assert (out / "large_batch.png").stat().st_size > 10_000
    assert report["schema"] == "lbopt.bench.large_batch/1"
    assert set(report["tasks"]) == {"cnn"}
    info = report["tasks"]["cnn"]
    assert info["splits"]["train"] + info["splits"]["validation"] + info["splits"]["test"] == 1797
    methods = {(r["method"], r["batch"]) for r in report["table"]}
    assert methods == {("adamw_b0", 32), ("sgd_b0", 32), ("lamb", 1024), ("adadagrad", 1024)}
    for row in report["table"]:
        assert set(row) >= {"test_acc", "val_acc", "steps", "samples", "steps_to_target", "train_s", "lr"}
    assert {t["task"] for t in report["targets"]} == {"cnn"}
    assert all(t["result"] == "met" or t["result"].startswith("missed by") for t in report["targets"])


def test_numbers_are_sane(smoke):
    bench, _, report = smoke
    budget = report["tasks"]["cnn"]["budget_samples"]
    rows = {r["method"]: r for r in report["table"]}
    # equal epochs: a fixed batch takes ceil(budget / B) steps of B samples
    assert rows["adamw_b0"]["steps"] == math.ceil(budget / 32)
    assert rows["lamb"]["steps"] == math.ceil(budget / 1024)
    assert rows["lamb"]["samples"] == rows["lamb"]["steps"] * 1024
    # AdAdaGrad starts at B0 and never exceeds its cap; it sees the budget (within one step)
    ada = rows["adadagrad"]
    assert 32 <= ada["final_batch"] <= 1024
    assert budget <= ada["samples"] < budget + 1024
    ref = report["tasks"]["cnn"]["reference"]
    assert ref["test_acc"] > 0.5  # 10 classes: chance is 0.1
    # the chosen LR's curve ends at the reported accuracy
    run = next(r for r in report["runs"] if r["method"] == "adamw_b0")
    assert run["curve"][-1]["test_acc"] == run["test_acc"] and run["curve"][-1]["step"] == run["steps"]


def test_grids_follow_the_optimizer_defaults():
    bench = load_bench()
    import inspect

    import lbopt

    cblr = next(m for m in bench.METHODS if m.key == "cblr")
    default = inspect.signature(lbopt.CBLR).parameters["lr"].default
    assert default in bench.grid(cblr, 4)
    assert len(bench.grid(cblr, 4)) == 4
