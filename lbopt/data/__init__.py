"""Data sets for the recipes: a shipped offline one, local files, or a hub name.

The shipped ``stdlib-topics`` set (see ``stdlib_topics/LICENSE.md``) is real English text:
docstrings of the CPython 3.11 standard library, each labelled with one of nine topics of its
module. 3049 training and 533 validation examples; a fine-tuned MiniLM gets well below 100 %, so
optimizers can be told apart. Its texts double as a small causal-LM corpus.

``datasets`` is imported inside the loaders only, so ``import lbopt.data`` stays light.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from datasets import DatasetDict

__all__ = [
    "STDLIB_TOPICS",
    "STDLIB_TOPICS_LABELS",
    "load_stdlib_topics",
    "load_stdlib_corpus",
    "load_text_dataset",
    "check_columns",
]

STDLIB_TOPICS = "stdlib-topics"
STDLIB_TOPICS_LABELS: tuple[str, ...] = (
    "concurrency",
    "data_formats",
    "data_structures",
    "date_and_time",
    "dev_tools",
    "files_and_os",
    "math_and_numbers",
    "networking",
    "text",
)
_SHIPPED_DIR = Path(__file__).resolve().parent / "stdlib_topics"
_LOCAL_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _read_shipped(split: str) -> list[dict]:
    with gzip.open(_SHIPPED_DIR / f"{split}.jsonl.gz", "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def load_stdlib_topics() -> DatasetDict:
    """The shipped classification set: columns ``text`` (str) and ``label`` (ClassLabel, 9 names)."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    features = Features({"text": Value("string"), "label": ClassLabel(names=list(STDLIB_TOPICS_LABELS))})
    splits = {}
    for split in ("train", "validation"):
        rows = _read_shipped(split)
        splits[split] = Dataset.from_dict(
            {"text": [r["text"] for r in rows], "label": [r["label"] for r in rows]}, features=features
        )
    return DatasetDict(splits)


def load_stdlib_corpus() -> DatasetDict:
    """The same texts as a causal-LM corpus: one column ``text``, splits train/validation."""
    from datasets import Dataset, DatasetDict

    return DatasetDict(
        {
            split: Dataset.from_dict({"text": [r["text"] for r in _read_shipped(split)]})
            for split in ("train", "validation")
        }
    )


def _local_format(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    fmt = _LOCAL_FORMATS.get(suffixes[-1] if suffixes else "")
    if fmt is None:
        raise ValueError(f"--dataset {path}: unsupported file type; use one of {', '.join(sorted(_LOCAL_FORMATS))}")
    return fmt


def load_text_dataset(
    name_or_path: str, validation_file: str | None = None, validation_fraction: float = 0.1, seed: int = 0
) -> DatasetDict:
    """Load ``name_or_path`` as a ``DatasetDict`` with ``train`` and ``validation`` splits.

    ``name_or_path`` is ``"stdlib-topics"`` (shipped), a local csv/tsv/json/jsonl/parquet file
    (optionally ``.gz``), a local directory of such files, or a hub data set name. Without a
    validation split one is carved from train (``validation_fraction``, fixed ``seed``).
    """
    from datasets import DatasetDict, load_dataset

    if name_or_path == STDLIB_TOPICS:
        return load_stdlib_topics()
    path = Path(name_or_path)
    if path.is_file():
        fmt = _local_format(path)
        files = {"train": str(path)}
        if validation_file:
            files["validation"] = validation_file
        kwargs = {"delimiter": "\t"} if ".tsv" in path.suffixes else {}
        ds = load_dataset(fmt, data_files=files, **kwargs)
    else:  # a directory of data files, or a hub name
        ds = load_dataset(str(path) if path.is_dir() else name_or_path)
    if not isinstance(ds, DatasetDict):
        ds = DatasetDict({"train": ds})
    if "validation" not in ds:
        if "test" in ds:
            ds["validation"] = ds["test"]
        else:
            parts = ds["train"].train_test_split(test_size=validation_fraction, seed=seed)
            ds = DatasetDict({"train": parts["train"], "validation": parts["test"]})
    return DatasetDict({"train": ds["train"], "validation": ds["validation"]})


def check_columns(ds: DatasetDict, *columns: str | None) -> None:
    """Raise ``ValueError`` (one line) if a requested column is missing from any split."""
    for split, part in ds.items():
        for column in columns:
            if column is not None and column not in part.column_names:
                raise ValueError(
                    f"column {column!r} not found in the {split!r} split; available columns: "
                    f"{', '.join(part.column_names)}"
                )
