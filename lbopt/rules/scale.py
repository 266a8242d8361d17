"""Layer-wise scales: functions of per-layer statistics (1-D tensors over layers).

Convention: a layer whose scale cannot be formed (a zero or non-finite norm, no usable
curvature) gets factor 1, as in LARS/LAMB. ``valid`` masks mark where a formula applied.
"""

from __future__ import annotations

import torch

__all__ = [
    "curvature_rate",
    "ema_update",
    "limit_growth",
    "median_of",
    "model_projection",
    "ratio_ema_update",
    "rayleigh_curvature",
    "secant_curvature",
    "trust_ratio",
    "weight_ratio_curvature",
]


def _usable(x: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(x) & (x > 0)


def trust_ratio(w_norm: torch.Tensor, u_norm: torch.Tensor) -> torch.Tensor:
    """LAMB trust ratio ``r_l = ‖w_l‖ / ‖u_l‖``, 1 where either norm is 0 (You et al. 2019)."""
    ok = _usable(w_norm) & _usable(u_norm)
    return torch.where(ok, w_norm / torch.where(ok, u_norm, 1.0), torch.ones_like(w_norm))


def weight_ratio_curvature(
    w_norm: torch.Tensor, g_norm: torch.Tensor, weight_decay: torch.Tensor
) -> torch.Tensor:
    """``C_l = (‖g_l‖ + β‖w_l‖) / ‖w_l‖`` (Gao & Zhong 2020).

    The curvature of a quadratic whose minimum sits at the origin and whose gradient at
    ``w_l`` is ``g_l + βw_l``. Its optimal step ``1/C_l`` times κ is LARS's local rate.
    NaN where ``‖w_l‖ = 0`` (no estimate).
    """
    num = g_norm + weight_decay * w_norm
    return torch.where(w_norm > 0, num / torch.where(w_norm > 0, w_norm, 1.0), torch.nan)


def secant_curvature(dg_norm: torch.Tensor, dw_norm: torch.Tensor) -> torch.Tensor:
    """``C_l = ‖h_l,t − h_l,t−1‖ / ‖w_l,t − w_l,t−1‖`` with ``h = g + βw`` (layer-wise secant).

    The change of the (regularised) gradient per unit of movement along the last step: a
    Barzilai–Borwein estimate of the layer's curvature, free of extra backward passes.
    NaN where the layer did not move.
    """
    return torch.where(dw_norm > 0, dg_norm / torch.where(dw_norm > 0, dw_norm, 1.0), torch.nan)


def rayleigh_curvature(dh_dot_dw: torch.Tensor, dw_sq: torch.Tensor) -> torch.Tensor:
    """``C_l = ⟨Δh_l, Δw_l⟩ / ‖Δw_l‖²``: the secant's Rayleigh quotient (inverse Barzilai–Borwein step).

    The mean Hessian's curvature along the last step. Unlike ``‖Δh‖/‖Δw‖`` it is not
    inflated by gradient noise: the batch-to-batch noise in ``Δh`` is nearly orthogonal to
    ``Δw`` in a large layer, so it averages out of the inner product. Negative or NaN
    where the layer did not move or the loss is locally concave (no usable estimate).
    """
    return torch.where(dw_sq > 0, dh_dot_dw / torch.where(dw_sq > 0, dw_sq, 1.0), torch.nan)


def ema_update(
    ema: torch.Tensor, has_ema: torch.Tensor, estimate: torch.Tensor, decay: float, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Ĉ ← ρĈ + (1−ρ)C``; the first usable estimate initialises ``Ĉ`` (no bias correction).

    Only layers in ``mask`` with a usable (finite, positive) estimate change.
    """
    take = mask & _usable(estimate)
    blended = torch.where(has_ema, decay * ema + (1.0 - decay) * estimate, estimate)
    return torch.where(take, blended, ema), has_ema | take


def ratio_ema_update(
    num_ema: torch.Tensor,
    den_ema: torch.Tensor,
    has_ema: torch.Tensor,
    num: torch.Tensor,
    den: torch.Tensor,
    decay: float,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Separate EMAs of a ratio's numerator and denominator: ``Ĉ = EMA(num) / EMA(den)``.

    A ratio of averages weights each step's estimate by its denominator (the size of the
    step that measured it), so a tiny, noise-dominated step cannot swing ``Ĉ`` the way it
    swings an average of ratios. Layers in ``mask`` with a finite ``num`` and ``den > 0``
    take part; the first one initialises both averages.
    """
    take = mask & torch.isfinite(num) & torch.isfinite(den) & (den > 0)
    n = torch.where(has_ema, decay * num_ema + (1.0 - decay) * num, num)
    d = torch.where(has_ema, decay * den_ema + (1.0 - decay) * den, den)
    return torch.where(take, n, num_ema), torch.where(take, d, den_ema), has_ema | take


def model_projection(h_dot_d: torch.Tensor, d_sq: torch.Tensor) -> torch.Tensor:
    """``p_l = max(⟨h_l, d_l⟩, 0) / ‖d_l‖²``: the quadratic model's step along ``d`` per unit of ``1/C``.

    Minimising ``−s⟨h, d⟩ + ½ s² C ‖d‖²`` over ``s`` gives ``s* = ⟨h, d⟩ / (C ‖d‖²) = p/C``:
    for ``d = h`` that is ``1/C``; for a momentum or Adam direction it is the projection of
    the gradient on ``d``. A direction that does not descend (``⟨h, d⟩ ≤ 0``) gets no step.
    0 where ``‖d‖ = 0``.
    """
    ok = d_sq > 0
    return torch.where(ok, h_dot_d.clamp(min=0.0) / torch.where(ok, d_sq, 1.0), torch.zeros_like(d_sq))


def limit_growth(rate: torch.Tensor, previous: torch.Tensor, growth: float) -> torch.Tensor:
    """``min(rate, growth · previous)`` where a finite previous rate exists, else ``rate``.

    Rates may fall at once (a sharper layer is a safety matter) but rise at most by
    ``growth`` per step, so one low curvature estimate cannot launch a layer.
    """
    known = torch.isfinite(previous) & (previous > 0)
    return torch.where(known, torch.minimum(rate, growth * torch.where(known, previous, 0.0)), rate)


def curvature_rate(
    curvature: torch.Tensor,
    trust_coefficient: torch.Tensor | float,
    eps: torch.Tensor | float,
    clip: tuple[float, float] | None = None,
) -> torch.Tensor:
    """``λ_l = κ / (Ĉ_l + ε)``, clipped to ``[lo, hi]``; 1 where there is no usable curvature.

    The learning rate of layer l is then ``η·λ_l``: the optimal step of the layer's
    quadratic model, damped by the trust coefficient κ (Gao & Zhong 2020).
    """
    ok = _usable(curvature)
    rate = trust_coefficient / (torch.where(ok, curvature, 1.0) + eps)
    if clip is not None:
        rate = rate.clamp(clip[0], clip[1])
    return torch.where(ok, rate, torch.ones_like(curvature))


def median_of(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Median of the usable ``values`` under ``mask``; mean of the two middle ones for an even count.

    NaN when no value is usable.
    """
    pool = values[mask & _usable(values)]
    if pool.numel() == 0:
        return torch.tensor(float("nan"), dtype=values.dtype, device=values.device)
    ordered, _ = pool.sort()
    n = ordered.numel()
    return 0.5 * (ordered[(n - 1) // 2] + ordered[n // 2])
