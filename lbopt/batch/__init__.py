"""Adaptive batch sizes: the controller, its variance estimators and its tests.

See :class:`BatchSizeController` (Lau, Liu & Kolar 2024) and the engine plumbing in
:mod:`lbopt.integrations.adaptive_batch`.
"""

from lbopt.batch.controller import BatchDecision, BatchSizeController
from lbopt.batch.criteria import TESTS, GradientSamples, VarianceEstimate, estimate_variance, required_batch
from lbopt.batch.estimators import MicrobatchSamples, PerSampleGradients

__all__ = [
    "TESTS",
    "BatchDecision",
    "BatchSizeController",
    "GradientSamples",
    "MicrobatchSamples",
    "PerSampleGradients",
    "VarianceEstimate",
    "estimate_variance",
    "required_batch",
]
