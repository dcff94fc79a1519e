"""Train a small projection head on a base model's stored embeddings (no image is re-read).

The head maps the base's L2-normalised embedding (what the encoder stores) to a new
embedding; the encoder L2-normalises the head's output as it does every model's. It is
exported together with the base as one ONNX graph (``compose.py``).

Objective — chosen on held-out MV@5 macro-F1 among pytorch-metric-learning losses (queries =
the split protocol's held-out groups, index = the training side, effnet-lite0 embeddings,
40 epochs, mean of seeds 0-2; measured 2026-11-29 on 2 CPU threads):

===================================  ======================  ================
objective                            synthetic textures [1]  NEU-DET [2]
===================================  ======================  ================
base model, no head                  0.795                   0.991
NormalizedSoftmaxLoss, T = 0.05      0.854                   0.993
NormalizedSoftmaxLoss, T = 0.1       0.862 (0.864 at 128-d)  0.994
ArcFaceLoss (28.6°, s = 64)          0.859                   0.993
MultiSimilarityLoss + miner          0.858                   0.995
===================================  ======================  ================

[1] ``kiban_cli.synthetic``: 6 classes x 160 images, 32 px, 40 lots per class (248 queries).
[2] 1,799 images, no groups, so the hash unit is the image (344 queries).

Every loss gains the same within noise (about ±0.005 between seeds), so the choice is made on
the rest: ``NormalizedSoftmaxLoss`` (a cosine classifier with a temperature; Zhai & Wu 2019) has
one hyperparameter, uses every image in every step (no miner, no dependence on how batches are
composed, which pair losses such as MultiSimilarity need large class-balanced batches for), and
converges in a few epochs where ArcFace's margin needs many more (its loss is still falling
after 40). T = 0.1 was at least as good as 0.05 on both sets; 128 output dimensions cost half
the index storage of 256 at no loss.

The head is a 2-layer MLP (Linear → ReLU → Linear) with a linear skip from the input, so at
start it is close to a random projection of the base embedding, which already retrieves
well; dropout on the input regularises against the few hundred images a class usually has.

Deterministic: the same data, seed and epochs give bit-identical weights and losses on the
same machine and thread count (``torch.use_deterministic_algorithms``, a seeded generator
for initialisation, shuffling and dropout, no data-dependent parallel reductions).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_EPOCHS = 40


@dataclass(frozen=True)
class HeadConfig:
    """Shape and optimisation of the head; the defaults are what ``kiban train`` uses."""

    hidden_dim: int = 512
    out_dim: int = 128
    objective: str = "normalized-softmax"
    temperature: float = 0.1
    lr: float = 1e-3
    loss_lr: float = 1e-2
    weight_decay: float = 1e-4
    batch_size: int = 128
    input_dropout: float = 0.1
    skip: bool = True

    def describe(self) -> str:
        losses = {
            "normalized-softmax": f"NormalizedSoftmaxLoss(temperature={self.temperature:g})",
            "arcface": "ArcFaceLoss(margin=28.6, scale=64)",
            "multi-similarity": "MultiSimilarityLoss + MultiSimilarityMiner",
        }
        return f"{losses[self.objective]} (pytorch-metric-learning), AdamW, cosine LR"


OBJECTIVES = ("normalized-softmax", "arcface", "multi-similarity")


@dataclass
class HeadResult:
    """The trained head (eval mode, CPU) and what training recorded."""

    module: Any  # ProjectionHead
    config: HeadConfig
    loss_per_epoch: list[float]
    seconds: float
    notes: list[str] = field(default_factory=list)


def _projection_head_class() -> Any:
    import torch

    class ProjectionHead(torch.nn.Module):
        """x → W2·relu(W1·dropout(x) + b1) + b2 (+ Ws·x): the head exported after the base."""

        def __init__(self, in_dim: int, config: HeadConfig) -> None:
            super().__init__()
            self.in_dim, self.out_dim = in_dim, config.out_dim
            self.dropout = torch.nn.Dropout(config.input_dropout)
            self.fc1 = torch.nn.Linear(in_dim, config.hidden_dim)
            self.fc2 = torch.nn.Linear(config.hidden_dim, config.out_dim)
            self.skip = torch.nn.Linear(in_dim, config.out_dim, bias=False) if config.skip else None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.dropout(x)
            out = self.fc2(torch.relu(self.fc1(x)))
            if self.skip is not None:
                out = out + self.skip(x)
            return out

        def layers(self) -> dict[str, np.ndarray]:
            """The weights as float32 numpy arrays, for the ONNX graph (compose.py)."""
            arrays = {
                "fc1_weight": self.fc1.weight,
                "fc1_bias": self.fc1.bias,
                "fc2_weight": self.fc2.weight,
                "fc2_bias": self.fc2.bias,
            }
            if self.skip is not None:
                arrays["skip_weight"] = self.skip.weight
            return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in arrays.items()}

    return ProjectionHead


def build_head(in_dim: int, config: HeadConfig, seed: int) -> Any:
    """A freshly initialised head; the same seed gives the same weights."""
    import torch

    cls = _projection_head_class()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(in_dim, config)


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """torch.use_deterministic_algorithms for the duration, restored afterwards."""
    import torch

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _make_loss(config: HeadConfig, n_classes: int) -> tuple[Any, Any]:
    """(loss, miner or None) of pytorch-metric-learning for the objective."""
    from pytorch_metric_learning import losses, miners

    if config.objective == "normalized-softmax":
        return (
            losses.NormalizedSoftmaxLoss(n_classes, config.out_dim, temperature=config.temperature),
            None,
        )
    if config.objective == "arcface":
        return losses.ArcFaceLoss(n_classes, config.out_dim, margin=28.6, scale=64), None
    if config.objective == "multi-similarity":
        return (
            losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5),
            miners.MultiSimilarityMiner(epsilon=0.1),
        )
    raise ValueError(f"unknown objective {config.objective!r} (known: {', '.join(OBJECTIVES)})")


def batches(n: int, batch_size: int, generator: Any) -> list[Any]:
    """A seeded permutation of range(n) cut into near-equal batches (no tiny last batch)."""
    import torch

    perm = torch.randperm(n, generator=generator)
    count = max(1, round(n / batch_size))
    return list(torch.tensor_split(perm, count))


def train_head(
    vectors: np.ndarray,
    labels: np.ndarray,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    config: HeadConfig | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> HeadResult:
    """Train a head on ``vectors`` (float32 [N, D], L2-normalised) with class ``labels`` [N].

    CPU, deterministic: see the module docstring. ``progress(epoch, loss)`` after each epoch.
    """
    import torch

    config = config or HeadConfig()
    if vectors.ndim != 2 or len(vectors) != len(labels) or len(vectors) < 2:
        raise ValueError(f"need [N, D] vectors and N labels, got {vectors.shape} / {len(labels)}")
    x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    n_classes = int(y.max().item()) + 1
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]), deterministic():
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        head = build_head(x.shape[1], config, seed)
        loss_fn, miner = _make_loss(config, n_classes)
        params = [{"params": head.parameters(), "lr": config.lr}]
        extra = list(loss_fn.parameters())
        if extra:
            params.append({"params": extra, "lr": config.loss_lr})
        optimiser = torch.optim.AdamW(params, weight_decay=config.weight_decay)
        steps = epochs * max(1, round(len(x) / config.batch_size))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps)
        history: list[float] = []
        head.train()
        for epoch in range(epochs):
            total = torch.zeros((), dtype=torch.float64)
            for idx in batches(len(x), config.batch_size, generator):
                emb = head(x[idx])
                target = y[idx]
                loss = loss_fn(emb, target, miner(emb, target)) if miner else loss_fn(emb, target)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
                total += loss.detach().double() * len(idx)
            history.append(float(total) / len(x))
            if progress is not None:
                progress(epoch + 1, history[-1])
        head.eval()
    return HeadResult(
        module=head,
        config=config,
        loss_per_epoch=history,
        seconds=time.perf_counter() - started,
    )


def apply_head(head: Any, vectors: np.ndarray) -> np.ndarray:
    """The head's output for float32 [N, D] inputs (no normalisation), as float32 numpy."""
    import torch

    with torch.no_grad():
        return head(torch.from_numpy(np.ascontiguousarray(vectors, np.float32))).numpy()


def count_params(head: Any) -> int:
    return int(sum(p.numel() for p in head.parameters()))
