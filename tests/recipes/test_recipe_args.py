"""Argument validation of the recipes: every user error is one line, before any process group."""

from __future__ import annotations

import json
import math

import pytest

from tests.recipes.helpers import RECIPES  # noqa: F401  (puts recipes/ on sys.path)

import causal_lm  # noqa: E402  isort: skip
import classification  # noqa: E402  isort: skip
import common  # noqa: E402  isort: skip

TINY = ["--world_size", "2", "--per_device_batch_size", "16", "--global_batch_size", "64"]


def error_of(task, argv) -> str:
    with pytest.raises(SystemExit) as info:
        common.parse_args(task, argv)
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch):
    for var in ("WORLD_SIZE", "ACCELERATE_NUM_PROCESSES", "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)


def test_unknown_optimizer_is_one_line():
    msg = error_of(classification.TASK, [*TINY, "--optimizer", "sgdx"])
    assert "'sgdx'" in msg and "cblr" in msg and "adamw" in msg


def test_optimizer_name_is_case_insensitive():
    args, _ = common.parse_args(classification.TASK, [*TINY, "--optimizer", "LAMB"])
    assert args.optimizer == "lamb"


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--global_batch_size", "1000", "--per_device_batch_size", "32", "--world_size", "2"], "multiple of 64"),
        (["--global_batch_size", "96", "--gradient_accumulation_steps", "5", "--world_size", "2"], "not divisible"),
        (["--global_batch_size", "0"], "must be positive"),
    ],
)
def test_non_divisible_global_batch(argv, fragment):
    assert fragment in error_of(classification.TASK, argv)


def test_global_batch_split_into_micro_accumulation_world():
    args, _ = common.parse_args(
        classification.TASK, ["--global_batch_size", "65536", "--per_device_batch_size", "32", "--world_size", "8"]
    )
    assert (args.per_device_batch_size, args.gradient_accumulation_steps, args.world_size) == (32, 256, 8)
    args, _ = common.parse_args(
        classification.TASK, ["--global_batch_size", "1024", "--gradient_accumulation_steps", "4", "--world_size", "2"]
    )
    assert (args.per_device_batch_size, args.gradient_accumulation_steps) == (128, 4)


def test_world_size_comes_from_the_launcher(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert "x world size 4" in error_of(classification.TASK, ["--global_batch_size", "96"])


def test_missing_columns_are_named(tmp_path):
    data = tmp_path / "reviews.csv"
    data.write_text("sentence,label\n" + "".join(f"review number {i},{'pos' if i % 2 else 'neg'}\n" for i in range(40)))
    msg = error_of(classification.TASK, [*TINY, "--dataset", str(data)])
    assert "column 'text' not found" in msg and "sentence, label" in msg
    local = [*TINY, "--dataset", str(data)]
    msg = error_of(classification.TASK, [*local, "--text_column", "sentence", "--label_column", "y"])
    assert "column 'y' not found" in msg
    assert "column 'body' not found" in error_of(causal_lm.TASK, [*local, "--text_column", "body"])


def test_local_csv_gets_a_validation_split(tmp_path):
    data = tmp_path / "reviews.csv"
    data.write_text("sentence,label\n" + "".join(f"review number {i},{'pos' if i % 2 else 'neg'}\n" for i in range(40)))
    _, ds = common.parse_args(classification.TASK, [*TINY, "--dataset", str(data), "--text_column", "sentence"])
    assert set(ds) == {"train", "validation"} and len(ds["train"]) + len(ds["validation"]) == 40


def test_unreadable_or_invalid_config_file(tmp_path):
    msg = error_of(classification.TASK, [*TINY, "--deepspeed_config", str(tmp_path / "missing.json")])
    assert "cannot be read" in msg and "missing.json" in msg
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2,}}')
    assert "not valid JSON" in error_of(classification.TASK, [*TINY, "--deepspeed_config", str(bad)])
    named = tmp_path / "named.json"
    named.write_text('{"optimizer": {"type": "CBLR"}, "zero_optimization": {"stage": 2}}')
    assert "names an optimizer" in error_of(classification.TASK, [*TINY, "--deepspeed_config", str(named)])


def test_unreadable_config_from_the_launcher(monkeypatch, tmp_path):
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "gone.json"))
    assert "gone.json" in error_of(classification.TASK, TINY)


def test_unknown_dataset_file_type(tmp_path):
    data = tmp_path / "data.xml"
    data.write_text("<x/>")
    assert "unsupported file type" in error_of(classification.TASK, [*TINY, "--dataset", str(data)])


def test_bad_optimizer_args_and_resume_folder(tmp_path):
    assert "not valid JSON" in error_of(classification.TASK, [*TINY, "--optimizer_args", "{eps: 1}"])
    assert "is not a folder" in error_of(classification.TASK, [*TINY, "--resume_from_checkpoint", str(tmp_path / "x")])


@pytest.mark.parametrize("rule, factor", [("none", 1.0), ("linear", 16.0), ("sqrt", 4.0)])
def test_lr_scaling_rules(rule, factor):
    args, _ = common.parse_args(
        classification.TASK,
        [
            "--global_batch_size",
            "4096",
            "--world_size",
            "2",
            "--lr",
            "1e-3",
            "--lr_scaling",
            rule,
            "--reference_batch_size",
            "256",
        ],
    )
    assert math.isclose(common.scaled_lr(args), 1e-3 * factor)


def test_default_lr_is_the_optimizers_own():
    args, _ = common.parse_args(classification.TASK, [*TINY, "--optimizer", "cblr", "--lr_scaling", "none"])
    assert args.lr == 1.0 and common.scaled_lr(args) == 1.0  # LARS-style: lr x trust coefficient
    args, _ = common.parse_args(classification.TASK, [*TINY, "--optimizer", "adamw"])
    assert args.lr == 1e-4


def test_warmup_then_linear_decay():
    args, _ = common.parse_args(classification.TASK, [*TINY, "--warmup_steps", "2"])
    f = common.lr_lambda(args, total_steps=6)
    assert [round(f(s), 4) for s in range(7)] == [0.3333, 0.6667, 1.0, 0.75, 0.5, 0.25, 0.0]
    args.lr_schedule = "cosine"
    assert math.isclose(common.lr_lambda(args, 6)(4), 0.5)


def test_param_groups_exclude_biases_and_norms_from_decay():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = common.param_groups(model, 0.1)
    assert [n for n, _ in decay["params"]] == ["0.weight"] and no_decay["weight_decay"] == 0.0
    assert {n for n, _ in no_decay["params"]} == {"0.bias", "1.weight", "1.bias"}


def test_shipped_deepspeed_configs_are_valid_json():
    from tests.recipes.helpers import REPO

    names = sorted(p.stem for p in (REPO / "integrations" / "deepspeed_configs").glob("*.json"))
    assert names == ["zero1", "zero2", "zero2_offload", "zero3", "zero3_offload"]
    for name in names:
        cfg = json.loads((REPO / "integrations" / "deepspeed_configs" / f"{name}.json").read_text())
        assert "optimizer" not in cfg and cfg["train_micro_batch_size_per_gpu"] == "auto"
        assert cfg["zero_optimization"]["stage"] == int(name[4])
