"""Data sets for the recipes: a shipped offline one, local files, or a hub name.

Recipe support, not part of the optimizer library: it needs ``datasets`` (``pip install
'lbopt[recipes]'``), imported only inside the loaders, and nothing in ``lbopt`` imports it.

The shipped ``stdlib-topics`` set (see ``stdlib_topics/LICENSE.md``) is real English text:
docstrings of the CPython 3.11 standard library, each labelled with one of nine topics of its
module. 3049 training and 533 validation examples; a fine-tuned MiniLM gets well below 100 %, so
optimizers can be told apart. Its texts double as a small causal-LM corpus.

``datasets`` is imported inside the loaders only, so ``import lbopt.data`` stays light.
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from datasets import DatasetDict

__all__ = [
    "STDLIB_TOPICS",
    "STDLIB_TOPICS_LABELS",
    "load_stdlib_topics",
    "load_stdlib_corpus",
    "load_text_dataset",
    "check_columns",
    "check_labels",
    "check_texts",
    "encode_labels",
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


def _require_datasets() -> None:
    """ImportError naming the extra to install when ``datasets`` is missing."""
    import importlib.util

    if importlib.util.find_spec("datasets") is None:
        raise ImportError("lbopt.data needs the 'datasets' package: pip install 'lbopt[recipes]'")


def _read_shipped(split: str) -> list[dict]:
    with gzip.open(_SHIPPED_DIR / f"{split}.jsonl.gz", "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def load_stdlib_topics() -> DatasetDict:
    """The shipped classification set: columns ``text`` (str) and ``label`` (ClassLabel, 9 names)."""
    _require_datasets()
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
    _require_datasets()
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
    name_or_path: str,
    validation_file: str | None = None,
    validation_fraction: float = 0.1,
    seed: int = 0,
    check: Callable[[DatasetDict], None] | None = None,
) -> DatasetDict:
    """Load ``name_or_path`` as a ``DatasetDict`` with ``train`` and ``validation`` splits.

    ``name_or_path`` is ``"stdlib-topics"`` (shipped), a local csv/tsv/json/jsonl/parquet file
    (optionally ``.gz``), a local directory of such files, or a hub data set name. Without a
    validation split one is carved from train (``validation_fraction``, fixed ``seed``).
    ``check`` (e.g. :func:`check_texts`) sees the splits as loaded, before any carving, so the
    row numbers in its messages are the rows of the files.
    """
    _require_datasets()
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
    if check is not None:
        check(ds)
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


def _rows(values: list[Any], bad: Callable[[Any], bool]) -> list[int]:
    return [i for i, v in enumerate(values) if bad(v)]


def _row_text(rows: list[int], limit: int = 5) -> str:
    shown = ", ".join(str(r + 1) for r in rows[:limit])
    more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
    return f"row{'s' if len(rows) > 1 else ''} {shown}{more}"


def check_texts(ds: DatasetDict, column: str) -> None:
    """Raise ``ValueError`` naming the rows (1-based, per split) whose text is missing or blank."""
    for split, part in ds.items():
        rows = _rows(part[column], lambda v: not isinstance(v, str) or not v.strip())
        if rows:
            raise ValueError(
                f"text column {column!r} is empty in {len(rows)} of {len(part)} {split!r} examples "
                f"({_row_text(rows)}): fill or remove them"
            )


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def check_labels(ds: DatasetDict, column: str) -> None:
    """Raise ``ValueError`` naming the rows whose label is missing, not an integer/string, or out of range.

    Labels are integers or strings (a ``ClassLabel`` column: integers in ``[0, num_classes)``).
    Floats are refused (an empty cell turns a CSV's integer column into floats).
    """
    for split, part in ds.items():
        values = part[column]
        rows = _rows(values, _missing)
        if rows:
            raise ValueError(
                f"label column {column!r} is empty in {len(rows)} of {len(part)} {split!r} examples "
                f"({_row_text(rows)}): fill or remove them"
            )
        rows = _rows(values, lambda v: isinstance(v, bool) or not isinstance(v, int | str))
        if rows:
            example = values[rows[0]]
            raise ValueError(
                f"label column {column!r} holds {type(example).__name__} values such as {example!r} in {split!r} "
                f"({_row_text(rows)}); labels must be integers or strings"
            )
        names = getattr(part.features[column], "names", None)
        if names is not None:
            n = len(names)
            rows = [i for i, v in enumerate(values) if not 0 <= v < n]
            if rows:
                raise ValueError(
                    f"label column {column!r} has values outside 0..{len(names) - 1} (e.g. {values[rows[0]]!r}) "
                    f"in {split!r} ({_row_text(rows)}); unlabelled examples (-1) cannot be trained on"
                )


def encode_labels(ds: DatasetDict, column: str) -> list[str]:
    """Class names, index = class id: a ``ClassLabel``'s names, else the training labels' text forms.

    Without a ``ClassLabel`` every label is matched by its text form (``1`` and ``"1"`` are one
    class); classes are sorted, numerically when every label is an integer. A validation label
    never seen in training raises ``ValueError`` naming it and its rows (it could not be learned).
    """
    feature = ds["train"].features[column]
    if hasattr(feature, "names"):
        return list(feature.names)
    train = {str(v) for v in ds["train"][column]}
    if all(isinstance(v, int) for v in ds["train"][column]):
        names = [str(v) for v in sorted({int(v) for v in train})]
    else:
        names = sorted(train)
    for split, part in ds.items():
        unseen = [i for i, v in enumerate(part[column]) if str(v) not in train]
        if unseen:
            labels = sorted({str(part[column][i]) for i in unseen})
            raise ValueError(
                f"label{'s' if len(labels) > 1 else ''} {', '.join(map(repr, labels[:5]))} of the {split!r} split "
                f"never occur in training ({_row_text(unseen)}): the model could not learn "
                f"{'them' if len(labels) > 1 else 'it'}; move such examples to training or drop them"
            )
    return names
