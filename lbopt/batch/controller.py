"""The adaptive batch-size controller (Lau, Liu & Kolar 2024), usable with any optimizer.

Once per optimizer step the controller turns gradient samples (see
:mod:`lbopt.batch.estimators`) into per-sample variance estimates, applies one of the tests
of :mod:`lbopt.batch.criteria`, and sets the global batch for the *next* step::

    B_{t+1} = min(B_max, max(B_t, unit·⌈ B_test / unit ⌉)),   unit = micro_batch × world

(``monotone=False`` lets it shrink, down to the initial batch). It never computes the
batch: engines read ``batch_size`` / ``accumulation_steps`` and change what they feed
(see :mod:`lbopt.integrations.adaptive_batch`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lbopt.batch.criteria import TESTS, GradientSamples, VarianceEstimate, estimate_variance, required_batch
from lbopt.batch.estimators import MetricFn, MicrobatchSamples
from lbopt.batch.policy import LR_RULES, BatchSizePolicy
from lbopt.validation import check_choice, check_int, check_range

__all__ = ["BatchDecision", "BatchSizeController"]

ESTIMATORS = ("microbatch", "per_sample")
LR_COUPLINGS = LR_RULES  # the one LR rule (lbopt.batch.policy.lr_scale)
_NEEDS_DIRECTION = ("inner_product", "orthogonality", "augmented")


@dataclass
class BatchDecision:
    """What the controller decided at one optimizer step (all plain numbers, for logging).

    ``required``: the real-valued batch the test asked for (NaN: no estimate, batch held).
    ``reason``: ``"grown"``, ``"shrunk"``, ``"held"``, ``"capped"``, ``"no-estimate"`` or
    ``"not-tested"`` (between test steps).
    """

    step: int
    batch_size: int
    previous_batch_size: int
    tested: bool = False
    required: float = float("nan")
    reason: str = "not-tested"
    estimate: VarianceEstimate | None = None

    def as_dict(self, prefix: str = "batch/") -> dict[str, float]:
        out: dict[str, float] = {
            f"{prefix}size": float(self.batch_size),
            f"{prefix}required": float(self.required),
        }
        if self.estimate is not None:
            out.update({f"{prefix}{k}": float(v) for k, v in self.estimate.as_dict().items()})
        return out


@dataclass
class _Config:
    initial_batch_size: int
    max_batch_size: int
    micro_batch_size: int
    world_size: int
    test: str
    eta: float
    theta: float
    nu: float
    test_interval: int
    monotone: bool
    lr_coupling: str
    estimator: str
    microbatch_scale: float | None
    history: list[tuple[int, int]] = field(default_factory=list)


class BatchSizeController(BatchSizePolicy):
    r"""Adaptive global batch size from gradient-noise tests (Lau, Liu & Kolar 2024).

    Tests (``test=``), with ``V = Σ_j Var_j(∇f_i)`` the per-sample variance and ``ḡ`` the
    batch's mean gradient (full formulas in :mod:`lbopt.batch.criteria`):

    - ``"norm"`` (Byrd et al. 2012): ``B ≥ V / (η²‖ḡ‖²)``;
    - ``"inner_product"`` (Bollapragada et al. 2018): ``B ≥ Var(⟨∇f_i,ḡ⟩) / (θ²‖ḡ‖⁴)``;
    - ``"orthogonality"``: ``B ≥ Σ_j Var_j(∇f_i − proj_ḡ∇f_i) / (ν²‖ḡ‖²)``;
    - ``"augmented"``: the larger of inner-product and orthogonality;
    - ``"coordinate"``: the norm test in the AdaGrad metric ``P = diag(1/(√s_{t−1}+ε))``,
      ``B ≥ Σ_j P_j Var_j(∇f_i) / (η²‖ḡ‖²_P)`` (needs ``set_metric``; AdAdaGrad sets it).

    Args:
        initial_batch_size: global batch of the first step (all ranks, all micro-batches).
        max_batch_size: cap; both must be multiples of ``micro_batch_size × world_size``.
        micro_batch_size: samples per forward/backward on one rank.
        world_size: data-parallel size (default: ``torch.distributed`` world size, else 1).
        eta, theta, nu: test constants η (norm, coordinate), θ (inner product), ν
            (orthogonality). Defaults θ = 0.9, ν = tan 80° ≈ 5.84 as in Bollapragada et
            al.; η = 0.5. Smaller means "grow sooner".
        test_interval: test every k optimizer steps (hooks are idle in between).
        monotone: never shrink (default). Otherwise the batch follows the test, bounded
            below by ``initial_batch_size``.
        lr_coupling: ``"none"``, ``"sqrt"`` or ``"linear"``: ``lr_factor = (B/B₀)^{0, ½, 1}``.
            lbopt's AdAdaGrad optimizers apply it inside ``step``; for other optimizers wrap
            the step in :meth:`scaled_lr` (LR schedulers are unaffected either way).
        estimator: ``"microbatch"`` (default; hooks, law of total variance over the
            micro-batch × rank samples, one 5-number all-reduce) or ``"per_sample"`` (exact:
            feed :meth:`observe_samples` with :class:`lbopt.batch.PerSampleGradients`).
        microbatch_scale: factor turning a hook gradient into its micro-batch's mean
            gradient; None (default) = the local micro-batch count (loss divided by it).
        process_group: data-parallel group for the all-reduce (default: the world).
    """

    def __init__(
        self,
        initial_batch_size: int,
        max_batch_size: int,
        micro_batch_size: int,
        world_size: int | None = None,
        *,
        test: str = "norm",
        eta: float = 0.5,
        theta: float = 0.9,
        nu: float = 5.84,
        test_interval: int = 1,
        monotone: bool = True,
        lr_coupling: str = "none",
        estimator: str = "microbatch",
        microbatch_scale: float | None = None,
        process_group: Any = None,
    ) -> None:
        check_int("micro_batch_size", micro_batch_size)
        if world_size is None:
            world_size = dist.get_world_size(process_group) if dist.is_available() and dist.is_initialized() else 1
        check_int("world_size", world_size)
        check_int("initial_batch_size", initial_batch_size)
        check_int("max_batch_size", max_batch_size)
        unit = micro_batch_size * world_size
        for name, value in (("initial_batch_size", initial_batch_size), ("max_batch_size", max_batch_size)):
            if value % unit:
                lo, hi = max(unit, value // unit * unit), (value // unit + 1) * unit
                raise ValueError(
                    f"Invalid {name}: {value} is not a multiple of micro_batch_size × world_size = "
                    f"{micro_batch_size} × {world_size} = {unit}; use {lo} or {hi}"
                )
        if max_batch_size < initial_batch_size:
            raise ValueError(
                f"Invalid max_batch_size: {max_batch_size} is below initial_batch_size={initial_batch_size}; "
                f"set max_batch_size >= {initial_batch_size}"
            )
        check_choice("test", test, TESTS)
        check_choice("estimator", estimator, ESTIMATORS)
        check_choice("lr_coupling", lr_coupling, tuple(LR_COUPLINGS))
        if estimator == "microbatch" and initial_batch_size // micro_batch_size < 2:
            raise ValueError(
                f"Invalid initial_batch_size: {initial_batch_size} gives one micro-batch sample per step "
                f"(micro_batch_size={micro_batch_size}, world_size={world_size}); the micro-batch "
                "variance estimator needs at least two: use initial_batch_size >= 2 × micro_batch_size, "
                "a smaller micro_batch_size, or estimator='per_sample'"
            )
        if microbatch_scale is not None:
            check_range("microbatch_scale", microbatch_scale, lo_open=True)
        self.config = _Config(
            initial_batch_size=initial_batch_size, max_batch_size=max_batch_size,
            micro_batch_size=micro_batch_size, world_size=world_size, test=test,
            eta=float(check_range("eta", eta, lo_open=True)),
            theta=float(check_range("theta", theta, lo_open=True)),
            nu=float(check_range("nu", nu, lo_open=True)),
            test_interval=check_int("test_interval", test_interval), monotone=bool(monotone),
            lr_coupling=lr_coupling, estimator=estimator, microbatch_scale=microbatch_scale,
        )
        self.process_group = process_group
        self._init_policy(initial_batch_size)
        self.last = BatchDecision(step=0, batch_size=initial_batch_size, previous_batch_size=initial_batch_size)
        self.params: list[torch.Tensor] = []
        self.samples = MicrobatchSamples()
        self.samples.active = self._is_test_step(1)
        self._pending: GradientSamples | None = None
        self._warned: set[str] = set()

    @property
    def owns_gradients(self) -> bool:
        return True

    # ------------------------------------------------------------------ wiring
    def attach(self, params: Iterable[Any] | nn.Module) -> BatchSizeController:
        """Watch these parameters: hooks for the micro-batch estimator, ``.grad`` for ‖ḡ‖².

        Accepts a module, tensors, ``(name, tensor)`` pairs or param-group dicts.
        """
        flat: list[torch.Tensor] = []
        items = params.parameters() if isinstance(params, nn.Module) else params
        for item in items:
            if isinstance(item, dict):
                flat.extend(q[1] if isinstance(q, tuple) else q for q in item["params"])
            else:
                flat.append(item[1] if isinstance(item, tuple) else item)
        known = {id(p) for p in self.params}
        new = [p for p in flat if p.requires_grad and id(p) not in known]
        self.params.extend(new)
        if self.config.estimator == "microbatch":
            self.samples.attach(new)
        return self

    def set_metric(self, metric_fn: MetricFn | None) -> None:
        """Per-parameter weights ``P`` for the coordinate test: ``metric_fn(param) -> tensor | None``."""
        self.samples.metric_fn = metric_fn

    @property
    def needs_direction(self) -> bool:
        return self.config.test in _NEEDS_DIRECTION and self.config.estimator == "microbatch"

    # ------------------------------------------------------------------ observations
    def observe_microbatch(self, sq_norm: float | torch.Tensor, sq_norm_metric: float | None = None,
                           dot: float | None = None) -> None:
        """Record one local micro-batch's gradient statistics (engines without hooks).

        Same scale convention as the hooks (the gradient as accumulated for this micro-batch).
        """
        self.samples.observe(sq_norm, sq_norm_metric, dot)

    def observe_samples(self, samples: GradientSamples) -> None:
        """Use these (already globally reduced) samples at the next :meth:`step`."""
        self._pending = samples

    # ------------------------------------------------------------------ the decision
    def _is_test_step(self, step: int) -> bool:
        return step % self.config.test_interval == 0

    def _reduce(self, local: list[float]) -> list[float]:
        """SUM over the data-parallel group: one all-reduce of five numbers (none on one process)."""
        if not (dist.is_available() and dist.is_initialized()) or self.config.world_size == 1:
            return local
        device = torch.device("cpu")
        if dist.get_backend(self.process_group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        buf = torch.tensor(local, dtype=torch.float64, device=device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.process_group)
        return buf.cpu().tolist()

    def _grad_sq_norm(self) -> float:
        grads = [p.grad for p in self.params]
        if not grads or any(g is None for g in grads):
            return float("nan")
        return float(sum(torch.sum(g.detach().double().square()) for g in grads))

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    @property
    def wants_direction(self) -> bool:
        """True when the step about to close must leave its mean gradient ḡ for the next test step.

        (Inner-product tests with the micro-batch estimator: the next step's hooks take
        ``⟨h, ḡ⟩``.) Optimizers that see ḡ only on partitions pass it densely to :meth:`step`.
        """
        return self.needs_direction and self._is_test_step(self.steps + 2)

    def step(
        self,
        grad_sq_norm: float | None = None,
        grad_sq_norm_metric: float | None = None,
        *,
        direction: Sequence[torch.Tensor | None] | None = None,
        metric_square_sum: float | None = None,
    ) -> BatchDecision:
        """Close one optimizer step: test (on test steps) and set the batch for the next one.

        ``grad_sq_norm``: the global ``‖ḡ‖²`` of the *unclipped* mean gradient (lbopt
        optimizers pass it from the statistics engine; otherwise it is read from the attached
        parameters' ``.grad``, which is right for one process and DDP without clipping).
        ``grad_sq_norm_metric``: ``‖ḡ‖²_P`` for the coordinate test.
        ``direction``: this step's dense ḡ, one tensor per attached parameter (see
        :attr:`wants_direction`); default: read from ``.grad``.
        ``metric_square_sum``: ``Σ_j P_j S_j`` over the parameters whose squared hook
        gradients ``S`` were kept (:meth:`MicrobatchSamples.square_sums`), summed over all
        ranks and partitions by the caller (hook scale).

        Raises ``RuntimeError`` instead of holding the batch silently when a test step lacks
        what its test needs (no gradient, no samples, no direction, no metric).
        """
        self.steps += 1
        previous = self.batch_size
        testing = self._is_test_step(self.steps)
        cfg = self.config
        samples = None
        if cfg.estimator == "microbatch":
            kept_squares = bool(self.samples.square_sums())
            if kept_squares and metric_square_sum is None and testing:
                raise RuntimeError(
                    "BatchSizeController: the coordinate test's metric lives on engine partitions (ZeRO) and "
                    "the optimizer did not pass metric_square_sum to step(); use lbopt.AdAdaGrad, whose step "
                    "completes it on the partitions"
                )
            local = self.samples.local_sums(cfg.microbatch_scale)
            if testing:
                c, sq, sq_m, dot, dot_sq = self._reduce(local)
                if c == 0 and self.samples.params:
                    raise RuntimeError(
                        "BatchSizeController: the gradient hooks saw no micro-batch at this test step on any rank "
                        "(the watched tensors are not the ones autograd fills, e.g. FSDP2's sharded parameters: "
                        "use lbopt.integrations.fsdp.watch_unsharded, or attach() the module actually run)"
                    )
                if kept_squares:
                    scale = float(local[0] if cfg.microbatch_scale is None else cfg.microbatch_scale)
                    sq_m = (0.0 if math.isnan(sq_m) else sq_m) + float(metric_square_sum) * scale * scale
                samples = GradientSamples(
                    count=c, sample_size=cfg.micro_batch_size, sum_sq=sq, sum_sq_metric=sq_m,
                    sum_dot=dot, sum_dot_sq=dot_sq, dir_sq_norm=self._direction_sq_norm,
                )
        else:
            samples, self._pending = self._pending, None
        decision = BatchDecision(step=self.steps, batch_size=previous, previous_batch_size=previous, tested=testing)
        if testing:
            decision = self._decide(decision, samples, grad_sq_norm, grad_sq_norm_metric)
        if self.needs_direction and self._is_test_step(self.steps + 1):
            if direction is not None:
                self._set_direction([None if d is None else d.detach().float() for d in direction])
            else:
                self._remember_direction()
        self.samples.active = self._is_test_step(self.steps + 1)
        self.last = decision
        self._change_batch(decision.batch_size)
        return decision

    def _decide(self, decision: BatchDecision, samples: GradientSamples | None, grad_sq_norm: float | None,
                grad_sq_norm_metric: float | None) -> BatchDecision:
        cfg = self.config
        if grad_sq_norm is None:
            grad_sq_norm = self._grad_sq_norm()
            if math.isnan(grad_sq_norm) and self.params:
                raise RuntimeError(
                    "BatchSizeController: no gradient on the watched parameters at a test step (under ZeRO "
                    "they live on partitions); pass grad_sq_norm to step(), or use lbopt.AdAdaGrad/AdAdaGradNorm "
                    "as the engine's optimizer"
                )
        if samples is None:
            raise RuntimeError(
                "BatchSizeController: no gradient samples at a test step (no hooks attached, no "
                "observe_samples()/observe_microbatch() call); attach() the model or feed samples"
            )
        if cfg.test == "coordinate" and math.isnan(samples.sum_sq_metric) and math.isnan(samples.mean_sq_norm_metric):
            raise RuntimeError(
                "BatchSizeController: test='coordinate' needs the AdaGrad metric (set_metric(); lbopt.AdAdaGrad "
                "sets it) and grad_sq_norm_metric in step()"
            )
        est = estimate_variance(
            samples, float(grad_sq_norm),
            float("nan") if grad_sq_norm_metric is None else float(grad_sq_norm_metric),
        )
        decision.estimate = est
        decision.required = required_batch(cfg.test, est, cfg.eta, cfg.theta, cfg.nu)
        decision.batch_size, decision.reason = self._propose(decision.required, decision.previous_batch_size)
        if decision.reason == "no-estimate":
            why = ("fewer than two gradient samples" if est.count < 2 else
                   "no previous mean gradient yet (inner-product tests start at the second test step)"
                   if self.needs_direction and math.isnan(est.variance_inner) else "a zero or non-finite gradient")
            self._warn_once(f"noest:{why}", f"BatchSizeController: step {self.steps}: batch held, {why}")
        return decision

    def _propose(self, required: float, current: int) -> tuple[int, str]:
        cfg = self.config
        if not math.isfinite(required):
            return current, "no-estimate"
        unit = self.unit
        # Clamp before ceil: a huge finite request must not overflow int().
        proposal = int(math.ceil(min(required, float(cfg.max_batch_size)) / unit)) * unit
        proposal = max(proposal, unit)
        floor = current if cfg.monotone else cfg.initial_batch_size
        new = min(cfg.max_batch_size, max(floor, proposal))
        if new > current:
            return new, "capped" if required > cfg.max_batch_size else "grown"
        if new < current:
            return new, "shrunk"
        return current, "held"

    _direction: list[torch.Tensor | None] | None = None
    _direction_sq_norm: float = float("nan")

    def _remember_direction(self) -> None:
        grads = [p.grad for p in self.params]
        if not grads or any(g is None for g in grads):
            raise RuntimeError(
                f"BatchSizeController: test={self.config.test!r} with the micro-batch estimator needs this "
                "step's mean gradient ḡ, and the watched parameters have no .grad (ZeRO partitions?); pass "
                "direction= to step() (lbopt.AdAdaGrad/AdAdaGradNorm do), or use estimator='per_sample'"
            )
        self._set_direction([g.detach().float().clone() for g in grads])

    def _set_direction(self, direction: list[torch.Tensor | None] | None) -> None:
        self._direction = direction
        self.samples.direction = direction
        if direction is None:
            self._direction_sq_norm = float("nan")
        else:
            self._direction_sq_norm = float(sum(d.double().square().sum() for d in direction if d is not None))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        cfg = asdict(self.config)
        cfg.pop("history", None)
        return {
            "batch_size": self.batch_size,
            "steps": self.steps,
            "history": list(self.history),
            "config": cfg,
            "direction": None if self._direction is None else [
                None if d is None else d.clone() for d in self._direction
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        cfg = state.get("config", {})
        for key in ("micro_batch_size", "world_size", "test"):
            if key in cfg and cfg[key] != getattr(self.config, key):
                self._warn_once("cfg", f"BatchSizeController.load_state_dict: {key} was {cfg[key]!r}, now "
                                f"{getattr(self.config, key)!r}; the trajectory will differ")
        batch = int(state["batch_size"])
        if batch % self.unit or batch > self.config.max_batch_size:
            raise ValueError(
                f"Invalid state batch_size: {batch} is not a multiple of {self.unit} or exceeds "
                f"max_batch_size={self.config.max_batch_size}; load it into a controller with matching "
                "micro_batch_size, world_size and max_batch_size"
            )
        self.batch_size = batch
        self.steps = int(state["steps"])
        self.history = [tuple(h) for h in state.get("history", [(0, batch)])]  # type: ignore[misc]
        direction = state.get("direction")
        if direction is not None and self.params:
            direction = [None if d is None else d.to(p.device) for d, p in zip(direction, self.params)]
        self._set_direction(direction)
        self.samples.reset()
        self.samples.active = self._is_test_step(self.steps + 1)
