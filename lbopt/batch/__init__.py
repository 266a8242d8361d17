"""Adaptive batch sizes: the controller, its variance estimators and its tests.

See :class:`BatchSizeController` (Lau, Liu & Kolar 2024), :class:`BatchSizeSchedule` (a planned
batch, Gao & Zhong 2020) and the engine plumbing in
:mod:`lbopt.integrations.adaptive_batch`.
"""

from lbopt.batch.controller import BatchDecision, BatchSizeController
from lbopt.batch.criteria import TESTS, GradientSamples, VarianceEstimate, estimate_variance, required_batch
from lbopt.batch.estimators import MicrobatchSamples, PerSampleGradients
from lbopt.batch.policy import LR_RULES, BatchSizePolicy, lr_scale
from lbopt.batch.schedule import BatchSizeSchedule, parse_batch_schedule

__all__ = [
    "LR_RULES",
    "TESTS",
    "BatchDecision",
    "BatchSizeController",
    "BatchSizePolicy",
    "BatchSizeSchedule",
    "GradientSamples",
    "MicrobatchSamples",
    "PerSampleGradients",
    "VarianceEstimate",
    "estimate_variance",
    "lr_scale",
    "parse_batch_schedule",
    "required_batch",
]
