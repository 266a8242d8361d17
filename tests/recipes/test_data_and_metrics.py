"""The shipped data set and metric modules the recipes use offline."""

from __future__ import annotations

import gzip
import hashlib
import json

import numpy as np
import pytest

from lbopt.data import STDLIB_TOPICS_LABELS, check_columns, load_stdlib_corpus, load_stdlib_topics, load_text_dataset
from lbopt.metrics import SHIPPED_METRICS, load_metric, metric_script


def test_stdlib_topics_is_real_deterministic_text():
    ds = load_stdlib_topics()
    assert (len(ds["train"]), len(ds["validation"])) == (3049, 533)
    assert ds["train"].features["label"].names == list(STDLIB_TOPICS_LABELS)
    texts = ds["train"]["text"]
    assert not set(texts) & set(ds["validation"]["text"])
    # prose, not token noise: most texts hold common English words
    english = sum(any(w in t.split() for w in ("the", "Return", "a", "of")) for t in texts)
    assert english / len(texts) > 0.8
    # the split rule documented in stdlib_topics/LICENSE.md
    for text in ds["validation"]["text"][:50]:
        assert int(hashlib.sha1(text.encode()).hexdigest(), 16) % 100 < 15
    counts = np.bincount(ds["train"]["label"], minlength=9)
    assert counts.min() >= 100 and counts.max() / counts.sum() < 0.3  # no class dominates
    assert load_stdlib_topics()["train"]["text"][:5] == texts[:5]


def test_stdlib_corpus_shares_the_text():
    corpus = load_stdlib_corpus()
    assert corpus["train"].column_names == ["text"]
    assert corpus["validation"]["text"] == load_stdlib_topics()["validation"]["text"]


def test_load_text_dataset_json_lines_and_validation_file(tmp_path):
    train, val = tmp_path / "train.jsonl.gz", tmp_path / "val.jsonl"
    with gzip.open(train, "wt") as fh:
        fh.writelines(json.dumps({"body": f"text {i}", "y": i % 3}) + "\n" for i in range(30))
    val.write_text("".join(json.dumps({"body": f"held out {i}", "y": i % 3}) + "\n" for i in range(6)))
    ds = load_text_dataset(str(train), validation_file=str(val))
    assert (len(ds["train"]), len(ds["validation"])) == (30, 6)
    check_columns(ds, "body", "y")
    with pytest.raises(ValueError, match="column 'text' not found in the 'train' split"):
        check_columns(ds, "text")


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.usefixtures("offline")
def test_shipped_metrics_match_sklearn():
    from sklearn.metrics import accuracy_score, f1_score

    rng = np.random.default_rng(0)
    ref, pred = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    pred[:80] = ref[:80]
    accuracy, f1 = load_metric("accuracy"), load_metric("f1")
    assert accuracy.compute(predictions=pred, references=ref)["accuracy"] == pytest.approx(accuracy_score(ref, pred))
    for average in ("macro", "micro", "weighted"):
        got = f1.compute(predictions=pred, references=ref, average=average)["f1"]
        assert got == pytest.approx(f1_score(ref, pred, average=average)), average
    per_class = f1.compute(predictions=pred, references=ref, average=None)["f1"]
    assert per_class == pytest.approx(list(f1_score(ref, pred, average=None)))
    b_ref, b_pred = ref % 2, pred % 2
    assert f1.compute(predictions=b_pred, references=b_ref)["f1"] == pytest.approx(f1_score(b_ref, b_pred))
    weights = rng.random(200)
    assert accuracy.compute(predictions=pred, references=ref, sample_weight=weights)["accuracy"] == pytest.approx(
        accuracy_score(ref, pred, sample_weight=weights)
    )


@pytest.mark.usefixtures("offline")
def test_metrics_accumulate_batches_and_load_by_path():
    import evaluate

    metric = evaluate.load(str(metric_script("accuracy")))
    metric.add_batch(predictions=[1, 2], references=[1, 1])
    metric.add_batch(predictions=[0], references=[0])
    assert metric.compute()["accuracy"] == pytest.approx(2 / 3)
    assert set(SHIPPED_METRICS) >= {"accuracy", "f1"}
    with pytest.raises(ValueError, match="shipped: accuracy, f1"):
        metric_script("bleu")
