"""Straightforward per-parameter reference implementations, written from the papers.

Deliberately naive (a Python loop over parameters, no shared code with lbopt) so that
agreement means something. 1-D parameters are excluded from adaptation and decay.
"""

from __future__ import annotations

import math

import torch


def _adapted(p: torch.Tensor) -> bool:
    return p.ndim > 1


class RefLARS:
    def __init__(self, params, lr=1.0, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001, eps=1e-8):
        self.params = list(params)
        self.lr, self.mu, self.wd, self.k, self.eps = lr, momentum, weight_decay, trust_coefficient, eps
        self.v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        for p, v in zip(self.params, self.v):
            g = p.grad
            if _adapted(p):
                wn, gn = p.norm().item(), g.norm().item()
                denom = gn + self.wd * wn + self.eps * wn
                lam = self.k * wn / denom if wn > 0 and gn + self.wd * wn > 0 else 1.0
                d = g + self.wd * p
            else:
                lam, d = 1.0, g
            v.mul_(self.mu).add_(self.lr * lam * d)
            p.sub_(v)


class RefLAMB:
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01):
        self.params = list(params)
        self.lr, self.b1, self.b2, self.eps, self.wd = lr, betas[0], betas[1], eps, weight_decay
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        self.t += 1
        for p, m, v in zip(self.params, self.m, self.v):
            g = p.grad
            m.mul_(self.b1).add_((1 - self.b1) * g)
            v.mul_(self.b2).add_((1 - self.b2) * g * g)
            mh = m / (1 - self.b1**self.t)
            vh = v / (1 - self.b2**self.t)
            u = mh / (vh.sqrt() + self.eps)
            if _adapted(p):
                u = u + self.wd * p
                wn, un = p.norm().item(), u.norm().item()
                r = wn / un if wn > 0 and un > 0 else 1.0
            else:
                r = 1.0
            p.sub_(self.lr * r * u)


class RefCBLR:
    """Secant CBLR with EMA; ``median=True`` gives MCLR."""

    def __init__(self, params, lr=1.0, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001,
                 eps=1e-8, ema=0.9, median=False):
        self.params = list(params)
        self.lr, self.mu, self.wd, self.k, self.eps, self.rho = lr, momentum, weight_decay, trust_coefficient, eps, ema
        self.median = median
        self.v = [torch.zeros_like(p) for p in self.params]
        self.prev_w = [None] * len(self.params)
        self.prev_h = [None] * len(self.params)
        self.c = [None] * len(self.params)

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        used = []
        for i, p in enumerate(self.params):
            g = p.grad
            wd = self.wd if _adapted(p) else 0.0
            h = g + wd * p
            wn, gn = p.norm().item(), g.norm().item()
            ratio = (gn + wd * wn) / wn if wn > 0 else math.nan
            if self.prev_w[i] is not None:
                dw = (p - self.prev_w[i]).norm().item()
                dh = (h - self.prev_h[i]).norm().item()
                est = dh / dw if dw > 0 else math.nan
                if math.isfinite(est) and est > 0:
                    self.c[i] = est if self.c[i] is None else self.rho * self.c[i] + (1 - self.rho) * est
            self.prev_w[i], self.prev_h[i] = p.clone(), h.clone()
            used.append(self.c[i] if self.c[i] is not None else ratio)
        if self.median:
            pool = sorted(c for c, p in zip(used, self.params) if _adapted(p) and math.isfinite(c) and c > 0)
            n = len(pool)
            med = 0.5 * (pool[(n - 1) // 2] + pool[n // 2])
            used = [med] * len(used)
        for i, (p, v) in enumerate(zip(self.params, self.v)):
            c = used[i]
            lam = self.k / (c + self.eps) if _adapted(p) and math.isfinite(c) and c > 0 else 1.0
            wd = self.wd if _adapted(p) else 0.0
            v.mul_(self.mu).add_(self.lr * lam * (p.grad + wd * p))
            p.sub_(v)
