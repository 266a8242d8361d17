"""Batch-size tests: variance estimates from gradient samples, and the batch each test asks for.

A *gradient sample* is the mean gradient ``g_k`` of ``b`` samples drawn from the batch: one
per-sample gradient (``b = 1``, the exact per-sample estimator) or one micro-batch on one
rank (``b`` = micro-batch size, the cheap estimator). With ``K`` such samples and their
mean ``ḡ`` (the global batch gradient, ``B = K·b``), each ``g_k`` is an unbiased estimate
of the mean gradient with covariance ``Σ/b``, where ``Σ`` is the per-sample covariance.
The law of total variance then gives unbiased estimates of the per-sample variances from
scalars only::

    Σ_j Var_j(∇f_i)        ≈ V     = b/(K−1) · (Σ_k ‖g_k‖² − K‖ḡ‖²)
    Var(⟨∇f_i, d⟩)         ≈ V_d   = b/(K−1) · (Σ_k ⟨g_k,d⟩² − (Σ_k ⟨g_k,d⟩)²/K)
    Σ_j P_j Var_j(∇f_i)    ≈ V_P   = b/(K−1) · (Σ_k ‖g_k‖²_P − K‖ḡ‖²_P)

The tests then ask for the batch ``B`` that makes the batch mean accurate enough
(Byrd et al. 2012; Bollapragada, Byrd, Nocedal 2018; Lau, Liu, Kolar 2024)::

    norm:           B ≥ V / (η² ‖ḡ‖²)
    inner product:  B ≥ Var(⟨∇f_i, ḡ⟩) / (θ² ‖ḡ‖⁴)
    orthogonality:  B ≥ (V − Var(⟨∇f_i, ḡ⟩)/‖ḡ‖²) / (ν² ‖ḡ‖²)
    augmented:      max(inner product, orthogonality)
    coordinate:     B ≥ V_P / (η² ‖ḡ‖²_P),   P = diag(1/(√s_{t−1} + ε))

``coordinate`` is the norm test in the metric of the AdaGrad preconditioner: coordinate j
weighted by ``P_j = 1/(√s_{t−1,j} + ε)`` with ``s_{t−1}`` the accumulator *before* this
step's update (fixed during the step's micro-batches, so the same metric weighs every
sample and the mean). On the first step all ``s_0`` are equal and it is the norm test.

``Var(⟨∇f_i, ḡ⟩)`` is ``V_d·‖ḡ‖²/‖d‖²`` for a direction ``d``: ``d = ḡ`` exactly with
the per-sample estimator; the micro-batch estimator accumulates inner products during
backward, before ``ḡ`` exists, so it uses the previous step's ``ḡ`` (the variance along a
direction one step old).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = ["TESTS", "GradientSamples", "VarianceEstimate", "estimate_variance", "required_batch"]

TESTS = ("norm", "inner_product", "orthogonality", "augmented", "coordinate")
_NAN = float("nan")


@dataclass
class GradientSamples:
    """Scalar sums over ``count`` gradient samples of ``sample_size`` samples each.

    ``sum_sq = Σ_k ‖g_k‖²``; ``sum_sq_metric = Σ_k ‖g_k‖²_P`` (NaN when no metric);
    ``sum_dot = Σ_k ⟨g_k,d⟩``, ``sum_dot_sq = Σ_k ⟨g_k,d⟩²`` and ``dir_sq_norm = ‖d‖²``
    for a direction d (NaN when none). ``mean_sq_norm``/``mean_sq_norm_metric``: ‖ḡ‖²,
    ‖ḡ‖²_P of these samples' mean when the estimator knows them (NaN: take the optimizer's).
    """

    count: float = 0.0
    sample_size: float = 1.0
    sum_sq: float = 0.0
    sum_sq_metric: float = _NAN
    sum_dot: float = _NAN
    sum_dot_sq: float = _NAN
    dir_sq_norm: float = _NAN
    mean_sq_norm: float = _NAN
    mean_sq_norm_metric: float = _NAN


@dataclass
class VarianceEstimate:
    """Per-sample variances (see module docstring) and the norms they are compared with."""

    count: float
    sample_size: float
    grad_sq_norm: float
    grad_sq_norm_metric: float
    variance: float  # Σ_j Var_j(∇f_i)
    variance_inner: float  # Var(⟨∇f_i, ḡ⟩)
    variance_orth: float  # Σ_j Var_j(∇f_i − proj_ḡ ∇f_i)
    variance_metric: float  # Σ_j P_j Var_j(∇f_i)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _unbiased(b: float, k: float, sum_sq: float, mean_term: float) -> float:
    if not (k >= 2 and math.isfinite(sum_sq) and math.isfinite(mean_term)):
        return _NAN
    return max(0.0, b * (sum_sq - mean_term) / (k - 1))


def estimate_variance(
    samples: GradientSamples, grad_sq_norm: float = _NAN, grad_sq_norm_metric: float = _NAN
) -> VarianceEstimate:
    """Unbiased per-sample variance estimates from gradient samples (law of total variance).

    ``grad_sq_norm``: ``‖ḡ‖²`` of the samples' mean, used unless the samples carry their own.
    NaN entries mean "not estimable" (fewer than two samples, no direction, no metric).
    """
    s = samples
    k, b = float(s.count), float(s.sample_size)
    gsq = s.mean_sq_norm if math.isfinite(s.mean_sq_norm) else float(grad_sq_norm)
    gsq_p = s.mean_sq_norm_metric if math.isfinite(s.mean_sq_norm_metric) else float(grad_sq_norm_metric)
    var = _unbiased(b, k, s.sum_sq, k * gsq)
    var_p = _unbiased(b, k, s.sum_sq_metric, k * gsq_p)
    var_inner = _NAN
    if k >= 2 and math.isfinite(s.dir_sq_norm) and s.dir_sq_norm > 0 and math.isfinite(s.sum_dot_sq):
        var_d = _unbiased(b, k, s.sum_dot_sq, s.sum_dot**2 / k)
        var_inner = var_d * gsq / s.dir_sq_norm
    var_orth = _NAN
    if math.isfinite(var) and math.isfinite(var_inner) and gsq > 0:
        var_orth = max(0.0, var - var_inner / gsq)
    return VarianceEstimate(k, b, gsq, gsq_p, var, var_inner, var_orth, var_p)


def required_batch(test: str, est: VarianceEstimate, eta: float, theta: float, nu: float) -> float:
    """The (real-valued) batch size ``test`` asks for; NaN when it cannot be formed.

    Never infinite: a zero or non-finite gradient norm gives NaN ("hold the batch").
    """
    gsq = est.grad_sq_norm
    if not (math.isfinite(gsq) and gsq > 0):
        return _NAN
    if test == "norm":
        out = est.variance / (eta**2 * gsq)
    elif test == "inner_product":
        out = est.variance_inner / (theta**2 * gsq**2)
    elif test == "orthogonality":
        out = est.variance_orth / (nu**2 * gsq)
    elif test == "augmented":
        out = max(est.variance_inner / (theta**2 * gsq**2), est.variance_orth / (nu**2 * gsq))
    elif test == "coordinate":
        gp = est.grad_sq_norm_metric
        if not (math.isfinite(gp) and gp > 0):
            return _NAN
        out = est.variance_metric / (eta**2 * gp)
    else:
        raise ValueError(f"Invalid test: {test!r}; expected one of {TESTS}")
    return out if math.isfinite(out) else _NAN
