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
    """CBLR's default rule (Rayleigh secant, model step along momentum); ``median=True`` gives MCLR.

    Written from the formulas in the CBLR docstring: per tensor, ``h = g + βw``;
    ``C = EMA⟨Δh, Δw⟩ / EMA‖Δw‖²``; ``r = min(κ/(C+ε), growth·r_prev)`` (previous rate
    without a usable C, ``κτ₀‖w‖/‖h‖``-style first step); excluded tensors take the median
    rate of the adapted ones; ``m ← μm + h`` (μ = 0 where ``⟨h, m'⟩ ≤ 0``);
    ``λ = min(r max(⟨h,m⟩,0)/‖m‖², τ_max‖w‖/(η‖m‖))``; ``w ← w − η λ m``.
    """

    def __init__(self, params, lr=1.0, momentum=0.9, weight_decay=0.0, trust_coefficient=1.0,
                 eps=1e-8, ema=0.9, median=False, initial_step=1e-2, rate_growth=2.0, max_update=0.1):
        self.params = list(params)
        self.lr, self.mu, self.wd, self.k, self.eps, self.rho = lr, momentum, weight_decay, trust_coefficient, eps, ema
        self.median, self.tau, self.growth, self.max_update = median, initial_step, rate_growth, max_update
        n = len(self.params)
        self.m = [torch.zeros_like(p) for p in self.params]
        self.prev_w, self.prev_h = [None] * n, [None] * n
        self.num, self.den = [None] * n, [None] * n
        self.rate = [None] * n

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @staticmethod
    def _median(values):
        pool = sorted(v for v in values if v is not None and math.isfinite(v) and v > 0)
        if not pool:
            return None
        n = len(pool)
        return 0.5 * (pool[(n - 1) // 2] + pool[n // 2])

    @torch.no_grad()
    def step(self):
        hs, curv, first = [], [], []
        for i, p in enumerate(self.params):
            wd = self.wd if _adapted(p) else 0.0
            h = p.grad.double() + wd * p.double()
            hs.append(h)
            if self.prev_w[i] is not None:
                dw = p.double() - self.prev_w[i]
                dh = h - self.prev_h[i]
                num, den = float((dh * dw).sum()), float((dw * dw).sum())
                if den > 0:
                    if self.num[i] is None:
                        self.num[i], self.den[i] = num, den
                    else:
                        self.num[i] = self.rho * self.num[i] + (1 - self.rho) * num
                        self.den[i] = self.rho * self.den[i] + (1 - self.rho) * den
            c = self.num[i] / self.den[i] if self.num[i] is not None and self.den[i] > 0 else None
            curv.append(c if c is not None and c > 0 else None)
            wn, gn = float(p.double().norm()), float(p.grad.double().norm())
            first.append((gn + wd * wn) / wn / self.tau if wn > 0 else None)
            self.prev_w[i], self.prev_h[i] = p.double().clone(), h.clone()
        adapted = [i for i, p in enumerate(self.params) if _adapted(p)]
        if self.median:
            cm = self._median([curv[i] for i in adapted])
            fm = self._median([first[i] for i in adapted])
            curv = [cm] * len(curv)
            first = [fm] * len(first)
        rates = []
        for i in range(len(self.params)):
            prev = self.rate[i]
            if curv[i] is not None:
                r = self.k / (curv[i] + self.eps)
                if prev is not None:
                    r = min(r, self.growth * prev)
            elif prev is not None:
                r = prev
            else:
                r = self.k / (first[i] + self.eps) if first[i] is not None else None
            rates.append(r)
        shared = self._median([rates[i] for i in adapted])
        rates = [r if i in adapted else shared for i, r in enumerate(rates)]
        self.rate = [r if r is not None else old for r, old in zip(rates, self.rate)]
        new_m = []
        for m, h in zip(self.m, hs):
            cand = self.mu * m.double() + h
            new_m.append(cand if float((h * cand).sum()) > 0 else h.clone())  # adaptive restart
        hd = [float((h * m).sum()) for h, m in zip(hs, new_m)]
        dd = [float((m * m).sum()) for m in new_m]
        if self.median:
            proj = [max(sum(hd), 0.0) / sum(dd)] * len(hd)
        else:
            proj = [max(a, 0.0) / b if b > 0 else 0.0 for a, b in zip(hd, dd)]
        for i, p in enumerate(self.params):
            self.m[i].copy_(new_m[i])
            lam = (rates[i] or 0.0) * proj[i]
            wn, dn = float(p.double().norm()), dd[i] ** 0.5
            if wn > 0 and dn > 0:  # relative trust region ‖η λ d‖ ≤ τ_max ‖w‖
                lam = min(lam, self.max_update * wn / (self.lr * dn))
            p.sub_((self.lr * lam * new_m[i]).to(p.dtype))
