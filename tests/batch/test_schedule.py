"""BatchSizeSchedule: the syntax, its errors, and a real loop whose steps follow the plan."""

import math

import pytest
import torch

from lbopt import BatchSizeSchedule
from lbopt.batch import lr_scale, parse_batch_schedule
from tests.batch import problem as P

N = 120  # samples per epoch (30 micro-batches of 4)


def test_parse_by_epoch_and_by_step():
    assert parse_batch_schedule("0:256,1:1024,3:4096") == ("epoch", [(0.0, 256), (1.0, 1024), (3.0, 4096)])
    assert parse_batch_schedule("epoch:0:8,1.5:16") == ("epoch", [(0.0, 8), (1.5, 16)])
    assert parse_batch_schedule("step:0:256,500:1024") == ("step", [(0, 256), (500, 1024)])


@pytest.mark.parametrize("text, match", [
    ("0:8,x:16", "entry 'x:16'"),
    ("1:8,2:16", "must start at 0"),
    ("0:8,2:16,1:32", "starts must increase"),
    ("0:8,1:18", r"not a multiple of micro_batch_size × world_size = 4 × 2 = 8; use 16 or 24"),
    ("step:0:8,1.5:16", "optimizer step"),
    ("", "expected e.g."),
])
def test_bad_schedules_name_the_problem(text, match):
    with pytest.raises(ValueError, match=match):
        BatchSizeSchedule(text, micro_batch_size=4, world_size=2, samples_per_epoch=N)


def test_epoch_schedule_needs_samples_per_epoch():
    with pytest.raises(ValueError, match="samples_per_epoch"):
        BatchSizeSchedule("0:8,1:16", micro_batch_size=4, world_size=1)


def test_lr_rule():
    assert lr_scale(1024, 256, "linear") == 4.0 and lr_scale(1024, 256, "sqrt") == 2.0
    assert lr_scale(1024, 256, "none") == 1.0
    s = BatchSizeSchedule("step:0:8,2:32", micro_batch_size=4, world_size=1, lr_coupling="sqrt")
    s.step(), s.step()
    assert s.batch_size == 32 and s.lr_factor == pytest.approx(2.0)


@pytest.mark.parametrize("spec", ["0:8,1:16,2.5:40", "step:0:8,5:24,9:40"])
def test_loop_follows_the_schedule_every_sample_once(spec):
    from lbopt.integrations.adaptive_batch import AdaptiveBatchLoop

    model = P.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = BatchSizeSchedule(spec, micro_batch_size=P.MICRO, world_size=1, samples_per_epoch=N, lr_coupling="linear")
    x, y = P.micro_batch(3, N)
    data = torch.utils.data.TensorDataset(x, y, torch.arange(N))
    loader = torch.utils.data.DataLoader(data, batch_size=P.MICRO, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    lrs = []
    opt.register_step_pre_hook(lambda o, *_: lrs.append(o.param_groups[0]["lr"]))
    loop = AdaptiveBatchLoop(model, opt, sched)
    seen = []
    for _ in range(4):
        for step in loop.steps(loader):
            for xb, yb, ib in step:
                seen += ib.tolist()
                step.backward(P.loss_fn(model, xb, yb))
    for e in range(4):
        assert sorted(seen[e * N:(e + 1) * N]) == list(range(N))
    # the plan, recomputed independently from the samples/steps before each step
    by, entries = parse_batch_schedule(spec)
    done = 0
    for t, size in enumerate(loop.batch_sizes):
        pos = t if by == "step" else done / N
        planned = [b for at, b in entries if pos + 1e-12 >= at][-1]
        epoch_left = N - done % N
        assert size == min(planned, epoch_left), (t, size, planned)
        assert lrs[t] == pytest.approx(0.05 * planned / 8)  # linear coupling, base rate restored after
        done += size
    assert opt.param_groups[0]["lr"] == 0.05
    assert sched.samples_seen == 4 * N and math.isclose(sched.epoch, 4.0)


def test_state_dict_round_trip_and_mismatch():
    s = BatchSizeSchedule("0:8,1:16", micro_batch_size=4, world_size=1, samples_per_epoch=N)
    for _ in range(17):
        s.step()
    t = BatchSizeSchedule("0:8,1:16", micro_batch_size=4, world_size=1, samples_per_epoch=N)
    t.load_state_dict(s.state_dict())
    assert (t.batch_size, t.steps, t.samples_seen, t.history) == (s.batch_size, s.steps, s.samples_seen, s.history)
    u = BatchSizeSchedule("0:8,2:16", micro_batch_size=4, world_size=1, samples_per_epoch=N)
    with pytest.raises(ValueError, match="resume with the same schedule"):
        u.load_state_dict(s.state_dict())
