"""Fine-tune a base network's weights on the training images, then export it.

The base is rebuilt from its export spec by ``kiban_export.builders.build`` (torchvision, timm,
efficientnet-lite0, open_clip: whatever ``kiban models export`` accepts as a torch source),
wrapped in the standard interface (``kiban_export.wrapper.StandardInterface``: uint8 NHWC in,
normalisation inside), and trained with a cosine-classifier loss on its embedding
(pytorch-metric-learning ``NormalizedSoftmaxLoss``: the class proxies are thrown away, the
exported network is the embedding alone, so its interface and dimension stay the base's).

The loop is a plain PyTorch loop on purpose — the images are decoded and preprocessed once
into one uint8 tensor; each step slices a seeded permutation, flips half of the batch
horizontally (the only augmentation: textures and tissue have no "up"), runs forward and
backward and steps AdamW. No DataLoader, no per-step host sync. ``bench/bench_trainer.py``
measures it against a bare loop of the same model. BatchNorm layers keep their pretrained
running statistics (eval mode): small batches would otherwise corrupt them.

Export and parity are the export tool's own (``torch_export.export_torch``, ``parity``): the
ONNX graph run by ONNX Runtime on real images of the batch against the trained torch module.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiban.models.card import ParityResult, Preprocessing
from kiban_export.spec import ExportSpec
from kiban_trainer.errors import TrainingError

DEFAULT_EPOCHS = 3
OPSET = 17


@dataclass(frozen=True)
class FinetuneConfig:
    batch_size: int = 32
    lr: float = 1e-4
    loss_lr: float = 1e-2
    weight_decay: float = 1e-4
    temperature: float = 0.05
    hflip: bool = True
    freeze_batchnorm: bool = True

    def describe(self) -> str:
        return (
            f"NormalizedSoftmaxLoss(temperature={self.temperature:g}) (pytorch-metric-learning) "
            f"on the embedding, AdamW lr {self.lr:g} (proxies {self.loss_lr:g}), "
            f"batch {self.batch_size}, horizontal flips"
            + (", BatchNorm statistics frozen" if self.freeze_batchnorm else "")
        )


@dataclass
class FinetuneResult:
    module: Any  # the embedding module (normalised float NCHW → [N, D]), eval mode, CPU
    built: Any  # kiban_export.builders.BuiltModel
    loss_per_epoch: list[float]
    seconds: float
    images_per_second: float
    device: str
    embedding_dim: int


def torch_source(spec: ExportSpec) -> None:
    """Refuse specs that have no torch network to train."""
    if spec.source == "onnx":
        raise TrainingError(
            f"cannot fine-tune {spec.raw!r}: an ONNX file has no trainable torch network; "
            "use --mode head, or give a torchvision/timm/open_clip/efficientnet-lite0 spec"
        )


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _freeze_batchnorm(module: Any) -> None:
    import torch

    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def train_loop(
    net: Any,
    loss_fn: Any,
    optimiser: Any,
    pixels: Any,
    labels: Any,
    epochs: int,
    batch_size: int,
    generator: Any,
    device: str,
    hflip: bool = True,
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """The training loop proper: ``pixels`` uint8 [N, S, S, 3] (CPU), ``labels`` int64 [N]."""
    import torch

    from kiban_trainer.head import batches

    history: list[float] = []
    n = len(pixels)
    for epoch in range(epochs):
        total = torch.zeros((), dtype=torch.float64, device=device)
        for idx in batches(n, batch_size, generator):
            xb = pixels[idx].to(device, non_blocking=True)
            yb = labels[idx].to(device, non_blocking=True)
            if hflip:
                flip = torch.rand(len(idx), generator=generator) < 0.5
                if bool(flip.any()):
                    xb[flip.to(device)] = xb[flip.to(device)].flip(2)
            loss = loss_fn(net(xb), yb)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += loss.detach().double() * len(idx)
        history.append(float(total) / n)
        if on_epoch is not None:
            on_epoch(epoch + 1, history[-1])
    return history


def build_base(spec: ExportSpec) -> Any:
    """The base network (``kiban_export.builders.BuiltModel``) of a torch export spec."""
    from kiban_export.builders import build

    torch_source(spec)
    return build(spec)


def finetune(
    built: Any,
    pixels: np.ndarray,
    labels: np.ndarray,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    config: FinetuneConfig | None = None,
    device: str | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> FinetuneResult:
    """Train ``built`` (``build_base``) on ``pixels`` (uint8 [N, S, S, 3]) with ``labels``."""
    import torch
    from pytorch_metric_learning import losses

    from kiban_export.wrapper import StandardInterface

    config = config or FinetuneConfig()
    device = device or pick_device()
    prep: Preprocessing = built.preprocessing
    if pixels.shape[1:] != (prep.crop, prep.crop, 3):
        raise TrainingError(f"pixels {pixels.shape[1:]} do not match the base's crop {prep.crop}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        net = StandardInterface(built.module, prep.mean, prep.std).to(device)
        with torch.no_grad():
            dim = int(net.eval()(torch.from_numpy(pixels[:1]).to(device)).shape[1])
        for p in net.parameters():
            p.requires_grad_(True)
        net.train()
        if config.freeze_batchnorm:
            _freeze_batchnorm(net)
        n_classes = int(labels.max()) + 1
        loss_fn = losses.NormalizedSoftmaxLoss(n_classes, dim, temperature=config.temperature).to(
            device
        )
        optimiser = torch.optim.AdamW(
            [
                {"params": [p for p in net.parameters() if p.requires_grad], "lr": config.lr},
                {"params": list(loss_fn.parameters()), "lr": config.loss_lr},
            ],
            weight_decay=config.weight_decay,
        )
        x = torch.from_numpy(np.ascontiguousarray(pixels))
        y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        if device != "cpu":
            x = x.pin_memory()
        started = time.perf_counter()
        history = train_loop(
            net,
            loss_fn,
            optimiser,
            x,
            y,
            epochs,
            config.batch_size,
            generator,
            device,
            hflip=config.hflip,
            on_epoch=progress,
        )
        if device != "cpu":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    module = net.model.to("cpu").eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return FinetuneResult(
        module=module,
        built=built,
        loss_per_epoch=history,
        seconds=seconds,
        images_per_second=len(pixels) * epochs / seconds if seconds > 0 else 0.0,
        device=device,
        embedding_dim=dim,
    )


def export_finetuned(
    result: FinetuneResult, out_path: Path, parity_crops: np.ndarray, parity_source: str
) -> ParityResult:
    """Export the trained module with the standard interface; parity on ``parity_crops``."""
    import torch

    from kiban_export import parity
    from kiban_export.torch_export import export_torch

    prep: Preprocessing = result.built.preprocessing
    export_torch(
        result.module, prep.mean, prep.std, prep.crop, out_path, OPSET, disable_mha_fastpath=True
    )
    graph = parity.run_graph(out_path, parity_crops)

    def forward(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return result.module(torch.from_numpy(x)).float().numpy()

    reference = parity.torch_reference(forward, parity.normalise(parity_crops, prep.mean, prep.std))
    return parity.compare(graph, reference, len(parity_crops), parity_source)
