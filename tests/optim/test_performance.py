"""Performance properties that are counts, not timings: host syncs per step, persistent memory,
graph breaks under ``torch.compile``. (Timings live in bench/step_time.py.)"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lbopt
from lbopt.optim.memory import persistent_bytes

# ------------------------------------------------------------------ host syncs


class SyncCounter(TorchDispatchMode):
    """Counts what would stall the host on an accelerator: reading a tensor's value on the host.

    ``item``/``bool``/``float``/``int`` on a tensor all dispatch ``_local_scalar_dense``;
    ``nonzero``/``masked_select`` and boolean-mask indexing size their output from the data.
    ``tolist`` and ``numpy`` read the data without dispatching and are patched separately.
    """

    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_consecutive"}

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        name = func._schema.name.split("::")[-1]
        if name in self.SYNCING:
            self.calls.append(name)
        elif name in ("index", "index_put_", "index_put") and _has_bool_index(args):
            self.calls.append(f"{name}[bool mask]")
        return func(*args, **(kwargs or {}))


def _has_bool_index(args) -> bool:  # noqa: ANN001
    indices = args[1] if len(args) > 1 else []
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or [])


def count_syncs(fn, monkeypatch) -> list[str]:  # noqa: ANN001
    counter = SyncCounter()
    for name in ("tolist", "numpy"):
        original = getattr(torch.Tensor, name)

        def wrapped(self, *a, _orig=original, _name=name, **k):  # noqa: ANN001
            counter.calls.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    with counter:
        fn()
    monkeypatch.undo()
    return counter.calls


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _with_grads(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-2
    return model


SYNC_CASES = {
    "LAMB": lambda m: lbopt.LAMB(m.named_parameters(), lr=1e-3),
    "LARS": lambda m: lbopt.LARS(m.named_parameters(), lr=0.1, weight_decay=1e-4),
    "CBLR": lambda m: lbopt.CBLR(m.named_parameters(), lr=0.1, weight_decay=1e-4),
    "MCLR": lambda m: lbopt.MCLR(m.named_parameters(), lr=0.1, weight_decay=1e-4),
}


@pytest.mark.parametrize("name", sorted(SYNC_CASES))
def test_at_most_one_host_sync_per_step(name: str, monkeypatch) -> None:  # noqa: ANN001
    model = _with_grads(_model())
    opt = SYNC_CASES[name](model)
    opt.step()
    opt.step()  # plans and state built; from here on every step is alike
    calls = count_syncs(opt.step, monkeypatch)
    assert len(calls) <= 1, f"{name}: {len(calls)} host syncs in one step: {calls}"


def test_sync_counter_sees_tolist_and_item(monkeypatch) -> None:  # noqa: ANN001
    """Control: the counter does count the calls the optimizers must avoid."""
    x = torch.arange(4.0)
    calls = count_syncs(lambda: (x.tolist(), x.sum().item(), bool(x.any()), x[x > 1]), monkeypatch)
    assert calls == ["tolist", "_local_scalar_dense", "_local_scalar_dense", "index[bool mask]"]


# ------------------------------------------------------------------ memory


def _big_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*(torch.nn.Linear(256, 256) for _ in range(4)))


def _live_storages() -> dict[int, tuple[int, weakref.ref]]:
    """data_ptr -> (bytes, a weak reference to one live tensor on that storage), for every CPU tensor."""
    for _ in range(3):  # objects freed by one collection's finalizers need another
        gc.collect()
    out = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            out[storage.data_ptr()] = (storage.nbytes(), weakref.ref(obj))
    return out


def _new_storage_bytes(before: dict, after: dict) -> int:
    """Bytes of storages live now that were not live before: memory freed meanwhile does not count
    against them, and an old address reused by a new storage counts as new (its old tensor is dead)."""
    return sum(n for ptr, (n, _) in after.items() if ptr not in before or before[ptr][1]() is None)


MEMORY_CASES = {
    "CBLR": lambda m: lbopt.CBLR(m.named_parameters(), lr=0.1, weight_decay=1e-4),
    "LAMB": lambda m: lbopt.LAMB(m.named_parameters(), lr=1e-3),
    "AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True),
}


@pytest.fixture(scope="module")
def memory_per_param_byte() -> dict[str, tuple[float, float]]:
    """name -> (bytes kept per parameter byte as measured by a scan of live tensors, by persistent_bytes)."""
    out = {}
    for name, make in MEMORY_CASES.items():
        model = _with_grads(_big_model())
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        before = _live_storages()
        opt = make(model)
        for _ in range(3):
            opt.step()
        kept = _new_storage_bytes(before, _live_storages())
        out[name] = (kept / param_bytes, persistent_bytes(opt) / param_bytes)
        # drop what this case holds even if something (a recorded warning) keeps the objects alive,
        # so the next case's scan does not see this case's memory being freed
        opt.state.clear()
        opt.param_groups.clear()
        for p in model.parameters():
            p.grad = None
        del opt, model
    return out


def test_persistent_bytes_matches_a_scan_of_live_tensors(memory_per_param_byte) -> None:  # noqa: ANN001
    for name, (scanned, reported) in memory_per_param_byte.items():
        assert abs(scanned - reported) < 0.02, (name, scanned, reported)


def test_adamw_keeps_two_parameter_copies(memory_per_param_byte) -> None:  # noqa: ANN001
    """Control: the measurement sees AdamW's two moments."""
    scanned, _ = memory_per_param_byte["AdamW"]
    assert 1.99 < scanned < 2.02


def test_cblr_keeps_only_its_momentum_buffer(memory_per_param_byte) -> None:  # noqa: ANN001
    """The implicit secant: CBLR's default state is one parameter copy (as LARS), not three."""
    scanned, _ = memory_per_param_byte["CBLR"]
    assert 0.99 < scanned < 1.02


@pytest.mark.parametrize("name", ["LAMB", "CBLR"])
def test_memory_at_most_adamw_plus_one_parameter_copy(name: str, memory_per_param_byte) -> None:  # noqa: ANN001
    scanned, _ = memory_per_param_byte[name]
    adamw, _ = memory_per_param_byte["AdamW"]
    assert scanned <= adamw + 1.0 + 0.02, f"{name} keeps {scanned:.2f}x parameter bytes (AdamW {adamw:.2f}x)"


# ------------------------------------------------------------------ torch.compile

COMPILE_CASES = SYNC_CASES


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COMPILE_CASES))
def test_compiled_step_breaks_the_graph_at_most_once(name: str) -> None:
    """``torch.compile(opt.step)``: one graph break, at the step's single host crossing."""
    model = _with_grads(_model())
    opt = COMPILE_CASES[name](model)
    opt.step()
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(opt.step)()
    finally:
        torch._dynamo.reset()
    assert explained.graph_break_count <= 1, [str(b.reason)[:200] for b in explained.break_reasons]


# ------------------------------------------------------------------ cache-blocked sweeps


def _arrays(n: int, seed: int, count: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(k, generator=g) for k in (n, 7, 3 * n + 5)] for _ in range(count)]


def test_blocked_sweeps_equal_the_formulas() -> None:
    from lbopt.rules.direction import scaled_adam_direction
    from lbopt.rules.sweeps import heavy_ball_, secant_sq_norms

    w, g, wp, hp = _arrays(100, 0, 4)
    beta = [0.1, 0.0, 0.01]
    dw, dh = [a - b for a, b in zip(w, wp)], [a + c * b - h for a, b, c, h in zip(g, w, beta, hp)]
    want = [torch.stack([x.double().square().sum() for x in xs]) for xs in (w, g, dh, dw)]
    for block in (None, 16):
        got = secant_sq_norms(w, g, wp, [hp[0], None, hp[2]], beta, block=block)
        for k in (0, 1):
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=0)
        for k in (2, 3):
            torch.testing.assert_close(got[k][[0, 2]], want[k][[0, 2]], rtol=1e-6, atol=0)
            assert got[k][1] == 0

    results = {}
    for block in (None, 16):
        for nest in (False, True):
            for hist in (False, True):
                ws, vs = [x.clone() for x in w], [x.clone() * 0.1 for x in g]
                h = ([x.clone() for x in wp], [x.clone() for x in hp]) if hist else None
                heavy_ball_(ws, g, vs, [0.5, 0.2, 0.1], beta, [0.9] * 3, [nest] * 3, history=h, block=block)
                results[block, nest, hist] = ws
                d = [a + c * b for a, b, c in zip(g, w, beta)]
                v = [0.9 * (x * 0.1) + a * y for x, y, a in zip(g, d, [0.5, 0.2, 0.1])]
                ref = [x - (0.9 * y + a * z if nest else y) for x, y, z, a in zip(w, v, d, [0.5, 0.2, 0.1])]
                for a, b in zip(ws, ref):
                    torch.testing.assert_close(a, b)
                if hist:
                    for a, b in zip(h[1], d):
                        torch.testing.assert_close(a, b)
                    for a, b in zip(h[0], w):
                        assert torch.equal(a, b)
    for key in results:  # blocking changes nothing elementwise
        if key[0] == 16:
            for a, b in zip(results[key], results[(None, *key[1:])]):
                assert torch.equal(a, b)

    m, v = [x.abs() * 0.1 for x in g], [x.square() for x in g]
    outs = {}
    for block in (None, 16):
        mm, vv, work = [x.clone() for x in m], [x.clone() for x in v], [torch.empty_like(x) for x in w]
        k, sq = scaled_adam_direction(g, mm, vv, work, [0.9] * 3, [0.99] * 3, [0.5] * 3, [0.2] * 3, [1e-6] * 3,
                                      w, beta, block=block)
        u = [ki * d for ki, d in zip(k, work)]
        m_new = [0.9 * a + 0.1 * b for a, b in zip(m, g)]
        v_new = [0.99 * a + 0.01 * b * b for a, b in zip(v, g)]
        ref = [(a / 0.5) / ((b / 0.2).sqrt() + 1e-6) + c * x for a, b, c, x in zip(m_new, v_new, beta, w)]
        for a, b in zip(u, ref):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(sq * torch.tensor(k, dtype=torch.float64) ** 2,
                                   torch.stack([x.double().square().sum() for x in ref]), rtol=1e-5, atol=0)
        outs[block] = work
    for a, b in zip(outs[None], outs[16]):
        assert torch.equal(a, b)


def test_layer_sums_by_blocks_equal_the_whole_segment_sums() -> None:
    from lbopt.rules.sweeps import layer_sums

    w, g, m, wp, hp = _arrays(100, 3, 5)
    beta = [0.1, 0.0, 0.01]
    bufs = [m[0], None, None]  # segment 2: decayed, no buffer yet (a first step)
    hist = ([wp[0], wp[1], None], [hp[0], hp[1], None])
    plain = layer_sums(w, g, beta, bufs, hist, with_decay_dots=True, block=None)
    blocked = layer_sums(w, g, beta, bufs, hist, with_decay_dots=True, block=16)
    assert plain.keys() == blocked.keys()
    for key in plain:
        torch.testing.assert_close(blocked[key], plain[key], rtol=1e-5, atol=1e-4, msg=key)
    # ‖h‖² needs ⟨g, w⟩ on a decayed segment before it has a momentum buffer
    torch.testing.assert_close(plain["gw"][2], torch.dot(g[2].double(), w[2].double()), rtol=1e-5, atol=1e-4)
    dh = g[0] + 0.1 * w[0] - hp[0]
    torch.testing.assert_close(blocked["dhdw"][0], (dh.double() * (w[0] - wp[0]).double()).sum(), rtol=1e-5, atol=1e-4)
