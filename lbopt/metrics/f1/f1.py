"""F1 score as an ``evaluate`` metric module, shipped for offline use.

Per class c: precision_c = TP_c/(TP_c+FP_c), recall_c = TP_c/(TP_c+FN_c),
F1_c = 2·precision_c·recall_c/(precision_c+recall_c) (0 where undefined).
``average``: "binary" (F1 of ``pos_label``), "macro" (unweighted mean over classes),
"weighted" (mean weighted by class support), "micro" (F1 of pooled counts, = accuracy for
single-label data), or None (one score per class, in sorted label order).

Load it with ``evaluate.load("<path>/f1.py")`` or ``lbopt.metrics.load_metric("f1")``.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Harmonic mean of precision and recall, per class or averaged over classes."
_INPUTS = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    average (str or None, default "binary"): "binary", "macro", "micro", "weighted" or None.
    pos_label (int, default 1): the positive class when average="binary".
    labels (list of int, optional): classes to score; default: all seen in either input.
Returns:
    f1 (float, or list of float when average is None)
Example:
    >>> m = evaluate.load("lbopt/metrics/f1/f1.py")
    >>> m.compute(predictions=[0, 1, 1], references=[0, 1, 0], average="macro")
    {'f1': 0.6666666666666666}
"""
_CITATION = ""
_AVERAGES = ("binary", "macro", "micro", "weighted", None)


def _safe_div(num, den):
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, average="binary", pos_label=1, labels=None):
        if average not in _AVERAGES:
            raise ValueError(f"average={average!r} is not one of {list(_AVERAGES)}")
        pred, ref = np.asarray(predictions), np.asarray(references)
        if average == "binary":
            classes = np.array([pos_label])
        elif labels is not None:
            classes = np.asarray(labels)
        else:
            classes = np.union1d(pred, ref)
        tp = np.array([np.sum((pred == c) & (ref == c)) for c in classes])
        fp = np.array([np.sum((pred == c) & (ref != c)) for c in classes])
        fn = np.array([np.sum((pred != c) & (ref == c)) for c in classes])
        if average == "micro":
            tp, fp, fn = tp.sum(keepdims=True), fp.sum(keepdims=True), fn.sum(keepdims=True)
        per_class = _safe_div(2 * tp, 2 * tp + fp + fn)
        if average is None:
            return {"f1": per_class.tolist()}
        if average == "weighted":
            support = tp + fn
            total = support.sum()
            return {"f1": float((per_class * support).sum() / total) if total > 0 else 0.0}
        return {"f1": float(per_class.mean()) if len(per_class) else 0.0}
