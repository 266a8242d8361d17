"""Classification accuracy as an ``evaluate`` metric module, shipped for offline use.

accuracy = (1/N) Σ_i w_i·[prediction_i = reference_i] / (1/N) Σ_i w_i   (w_i = 1 by default)

Load it with ``evaluate.load("<path>/accuracy.py")`` or ``lbopt.metrics.load_metric("accuracy")``.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Fraction of predictions equal to their reference label (optionally sample-weighted)."
_INPUTS = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    normalize (bool, default True): return the fraction; False returns the (weighted) count.
    sample_weight (list of float, optional): one weight per example.
Returns:
    accuracy (float)
Example:
    >>> m = evaluate.load("lbopt/metrics/accuracy/accuracy.py")
    >>> m.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""
_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        hits = np.asarray(predictions) == np.asarray(references)
        weights = np.ones(len(hits)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        if len(weights) != len(hits):
            raise ValueError(f"sample_weight has {len(weights)} entries, expected {len(hits)}")
        correct = float(np.sum(weights * hits))
        if not normalize:
            return {"accuracy": correct}
        total = float(np.sum(weights))
        return {"accuracy": correct / total if total > 0 else 0.0}
