"""Every input the recipes can be handed wrong is refused at parse time, in one line, naming the fix.

These run ``common.parse_args`` in-process: it is exactly what each rank runs before any process
group exists (``test_recipes_launch.py`` shows one such error through a real 2-process launch).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.recipes.helpers import RECIPES, REPO

import causal_lm  # noqa: E402  isort: skip
import checkpoints  # noqa: E402  isort: skip
import classification  # noqa: E402  isort: skip
import common  # noqa: E402  isort: skip

TINY = ["--world_size", "2", "--per_device_batch_size", "16", "--global_batch_size", "64"]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    for var in ("WORLD_SIZE", "ACCELERATE_NUM_PROCESSES", "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)  # the default --output_dir is created at parse time


def error_of(argv, task=classification.TASK) -> str:
    with pytest.raises(SystemExit) as info:
        common.parse_args(task, argv)
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--max_steps", "0"], "--max_steps must be >= 1, got 0"),
        (["--max_steps", "-1"], "--max_steps must be >= 1, got -1"),
        (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
        (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
        (["--lr", "0"], "--lr must be a finite number > 0"),
        (["--num_epochs", "0"], "--num_epochs must be > 0"),
        (["--save_total_limit", "-2"], "--save_total_limit must be >= 0"),
        (["--time_budget_s", "nan"], "--time_budget_s must be > 0, got nan"),
    ],
)
def test_numbers_out_of_range(argv, fragment):
    assert fragment in error_of([*TINY, *argv])


def test_optimizer_args_are_bound_to_the_signature():
    msg = error_of([*TINY, "--optimizer", "lamb", "--optimizer_args", '{"betas2": [0.9, 0.99]}'])
    assert "LAMB has no argument 'betas2'" in msg and "betas" in msg and "trust_clip" not in msg.split("no argument")[0]
    msg = error_of([*TINY, "--optimizer", "cblr", "--optimizer_args", '{"lr": 0.1}'])
    assert "sets lr, which the recipe sets itself" in msg and "--lr" in msg
    assert "weight_decay" in error_of([*TINY, "--optimizer", "adamw", "--optimizer_args", '{"weight_decay": 0}'])
    assert "has no argument 'momentum'" in error_of(
        [*TINY, "--optimizer", "adamw", "--optimizer_args", '{"momentum": 0.9}']
    )
    # a known key with a bad value: the optimizer's own message, still before any process group
    msg = error_of([*TINY, "--optimizer", "lamb", "--optimizer_args", '{"eps": -1}'])
    assert "eps" in msg


def _csv(path, rows, header="text,label"):
    path.write_text(header + "\n" + "".join(f"{r}\n" for r in rows))
    return str(path)


def test_labels_and_texts_are_checked_naming_rows(tmp_path):
    good = [f"review number {i},{i % 3}" for i in range(40)]
    empty_label = good[:4] + ["a text without a label,"] + good[4:]
    msg = error_of([*TINY, "--dataset", _csv(tmp_path / "a.csv", empty_label)])
    assert "label column 'label' is empty in 1 of 41 'train' examples (row 5)" in msg
    empty_text = good[:2] + [",1", "  ,2"] + good[2:]
    msg = error_of([*TINY, "--dataset", _csv(tmp_path / "b.csv", empty_text)])
    assert "text column 'text' is empty in 2 of 42 'train' examples (rows 3, 4)" in msg
    val = _csv(tmp_path / "val.csv", ["fine,1", "unseen class,7", "other unseen,7"])
    msg = error_of([*TINY, "--dataset", _csv(tmp_path / "c.csv", good), "--validation_file", val])
    assert "label '7' of the 'validation' split never occur in training (rows 2, 3)" in msg
    floats = [f"text {i},{i % 3}.5" for i in range(20)]
    assert "labels must be integers or strings" in error_of([*TINY, "--dataset", _csv(tmp_path / "d.csv", floats)])
    # integers and strings: matched by their text form, integer classes sorted numerically
    ints = [f"text {i},{[2, 10, 1][i % 3]}" for i in range(30)]
    args, _ = common.parse_args(classification.TASK, [*TINY, "--dataset", _csv(tmp_path / "e.csv", ints)])
    assert args.label_names == ["1", "2", "10"]
    none_text = tmp_path / "f.jsonl"
    none_text.write_text("".join(json.dumps({"text": None if i == 3 else f"doc {i}"}) + "\n" for i in range(20)))
    msg = error_of([*TINY, "--dataset", str(none_text)], task=causal_lm.TASK)
    assert "text column 'text' is empty in 1 'train' examples (rows 4)" in msg


def test_model_output_dir_and_resume_targets(tmp_path):
    msg = error_of([*TINY, "--model", str(tmp_path / "no-such-model")])
    assert "no such model folder" in msg
    (tmp_path / "not-a-model").mkdir()
    assert "without config.json" in error_of([*TINY, "--model", str(tmp_path / "not-a-model")])
    assert "not in the Hugging Face cache" in error_of([*TINY, "--model", "someone/never-downloaded-model"])
    common.parse_args(causal_lm.TASK, [*TINY, "--model", "tiny-llama", "--output_dir", str(tmp_path / "lm")])

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert "--output_dir" in error_of([*TINY, "--output_dir", str(blocker / "run")])
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert "is not writable" in error_of([*TINY, "--output_dir", str(locked)])

    out = tmp_path / "run"
    assert "is not a complete recipe checkpoint" in error_of([*TINY, "--resume_from_checkpoint", str(tmp_path)])
    lamb_ckpt = checkpoints.checkpoint_dir(out, 2)
    lamb_ckpt.mkdir(parents=True)
    (lamb_ckpt / checkpoints.MARKER).write_text(
        json.dumps({"step": 2, "task": "classification", "optimizer": "cblr", "world_size": 2})
    )
    msg = error_of([*TINY, "--output_dir", str(out), "--optimizer", "lamb", "--resume_from_checkpoint", "latest"])
    assert "written with optimizer 'cblr', this run has 'lamb'" in msg
    args, _ = common.parse_args(
        classification.TASK,
        [*TINY, "--output_dir", str(out), "--optimizer", "cblr", "--resume_from_checkpoint", "latest"],
    )
    assert args.resume_from_checkpoint == str(lamb_ckpt)
    # an interrupted save is never 'latest'
    checkpoints.checkpoint_dir(out, 4).with_name(".incomplete-step_4").mkdir()
    (out / "checkpoints" / "step_6").mkdir()  # no marker: incomplete
    assert checkpoints.latest_checkpoint(out) == lamb_ckpt


def test_latest_with_nothing_to_resume_says_so(tmp_path, capsys):
    args, _ = common.parse_args(
        classification.TASK, [*TINY, "--output_dir", str(tmp_path / "fresh"), "--resume_from_checkpoint", "latest"]
    )
    assert args.resume_from_checkpoint is None
    assert "no complete checkpoint under" in capsys.readouterr().err


def test_help_shows_a_default_and_a_help_text_for_every_option():
    for recipe, task in (("classification.py", classification.TASK), ("causal_lm.py", causal_lm.TASK)):
        proc = subprocess.run(
            [sys.executable, str(RECIPES / recipe), "--help"], capture_output=True, text=True, cwd=REPO, timeout=120
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        options = [a for a in common.build_parser(task)._actions if a.option_strings and a.help != "==SUPPRESS=="]
        assert len(options) > 40 and all(a.help for a in options), [a.dest for a in options if not a.help]
        flat = " ".join(proc.stdout.split())
        # ArgumentDefaultsHelpFormatter: every option but --help ends in "(default: ...)"
        assert flat.count("(default: ") == len(options) - 1, flat
        assert "--max_steps MAX_STEPS optimizer steps (>= 1); overrides --num_epochs (default: None)" in flat
        assert "--on_divergence {stop,continue}" in flat and "(default: stop)" in flat


def test_a_missing_package_names_the_extra():
    with pytest.raises(SystemExit, match=r"the recipes need no_such_package_xyz: pip install 'lbopt\[recipes\]'"):
        common.check_packages(("json", "no_such_package_xyz"))


def test_the_optimizer_library_does_not_import_recipe_support():
    support = ("lbopt.data", "lbopt.metrics", "datasets", "evaluate")
    code = f"import sys, lbopt; print([m for m in {support!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stderr[-2000:]
