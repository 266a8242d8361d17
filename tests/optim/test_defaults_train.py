"""Every lbopt optimizer trains the usual small problems at its default hyperparameters.

Issue 8, item 2: ``lbopt.X(model.parameters())`` with nothing tuned must at least halve the
training loss of a small MLP (LayerNorm, cross-entropy, 5 linearly separable classes) and of a
small transformer classifier within 100 steps. Not timed; tiny settings (a few seconds each).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lbopt

OPTIMIZERS = ["LARS", "LAMB", "CBLR", "MCLR", "AdaGrad", "AdaGradNorm", "AdAdaGrad", "AdAdaGradNorm"]
STEPS = 100


def _mlp_task(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(20, 5, generator=g)
    x = torch.randn(2048, 20, generator=g)
    y = (x @ w).argmax(1)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(20, 64), nn.LayerNorm(64), nn.ReLU(),
        nn.Linear(64, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 5),
    )
    return model, x, y, 64


class TinyTransformer(nn.Module):
    """Embedding + 2 pre-norm encoder layers + mean pooling + linear head."""

    def __init__(self, vocab: int = 32, dim: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(16, dim))
        layer = nn.TransformerEncoderLayer(dim, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(tokens) + self.pos[: tokens.shape[1]])
        return self.head(h.mean(1))


def _transformer_task(seed: int = 1):
    """Class = which of 4 marker tokens appears most often in a sequence of 16 random tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(4, 32, (2048, 16), generator=g)
    y = torch.randint(0, 4, (2048,), generator=g)
    marks = torch.rand(2048, 16, generator=g) < 0.3
    x = torch.where(marks, y[:, None].expand(-1, 16), x)
    torch.manual_seed(seed)
    return TinyTransformer(), x, y, 64


TASKS = {"mlp": _mlp_task, "transformer": _transformer_task}


def _train(name: str, task: str) -> tuple[float, float]:
    model, x, y, batch = TASKS[task]()
    kwargs = {"initial_batch_size": batch, "micro_batch_size": batch // 4} if name.startswith("AdAdaGrad") else {}
    opt = getattr(lbopt, name)(model.parameters(), **kwargs)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        start = nn.functional.cross_entropy(TASKS[task]()[0](x), y).item()
        end = nn.functional.cross_entropy(model(x), y).item()
    return start, end


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_default_hyperparameters_halve_the_loss(name: str, task: str) -> None:
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a skipped (non-finite) step fails the test
        start, end = _train(name, task)
    assert end == end and end <= 0.5 * start, f"{name} on {task}: full-data loss {start:.3f} -> {end:.3f}"
