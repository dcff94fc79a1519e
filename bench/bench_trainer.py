"""Trainer speed, measured side by side in one run.

(1) Fine-tune loop efficiency = images/s of kiban's fine-tune loop (``kiban_trainer.finetune.
    train_loop``: uint8 NHWC batches sliced from the pre-decoded tensor, in-graph
    normalisation, random horizontal flips, NormalizedSoftmaxLoss, AdamW) divided by images/s
    of the faster of two bare PyTorch loops over the same network, loss, optimiser, batch size
    and threads on float tensors normalised beforehand: NCHW (what a hand-written loop does)
    and channels-last. Rounds alternate so machine noise hits all alike. Target ≥ 0.9.
(2) Head training time on 10,000 stored embeddings (synthetic 1280-d vectors, 10 classes,
    the default head and the default epochs for that many vectors (``default_epochs``): what
    ``kiban train --mode head`` does after reading shards).

Usage: python bench/bench_trainer.py [--quick] [--threads N] [--model SPEC] [--images N]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import numpy as np


def _fresh(built, pixels_shape):  # type: ignore[no-untyped-def]
    """An independent trainable copy of the base network, BatchNorm frozen as kiban does."""
    from kiban_trainer.finetune import _freeze_batchnorm

    module = copy.deepcopy(built.module)
    for p in module.parameters():
        p.requires_grad_(True)
    module.train()
    _freeze_batchnorm(module)
    return module


def _loss_and_optimiser(params, dim: int, n_classes: int):  # type: ignore[no-untyped-def]
    import torch
    from pytorch_metric_learning import losses

    from kiban_trainer.finetune import FinetuneConfig

    cfg = FinetuneConfig()
    loss_fn = losses.NormalizedSoftmaxLoss(n_classes, dim, temperature=cfg.temperature)
    optimiser = torch.optim.AdamW(
        [{"params": params, "lr": cfg.lr}, {"params": list(loss_fn.parameters()), "lr": 1e-2}],
        weight_decay=cfg.weight_decay,
    )
    return loss_fn, optimiser


def kiban_round(built, pixels: np.ndarray, labels: np.ndarray, batch: int, dim: int) -> float:  # type: ignore[no-untyped-def]
    import torch

    from kiban_export.wrapper import StandardInterface
    from kiban_trainer.finetune import train_loop

    prep = built.preprocessing
    net = StandardInterface(_fresh(built, pixels.shape), prep.mean, prep.std)
    loss_fn, optimiser = _loss_and_optimiser(list(net.parameters()), dim, int(labels.max()) + 1)
    x, y = torch.from_numpy(pixels), torch.from_numpy(labels)
    started = time.perf_counter()
    train_loop(net, loss_fn, optimiser, x, y, 1, batch, torch.Generator().manual_seed(0), "cpu")
    return len(pixels) / (time.perf_counter() - started)


def plain_round(  # type: ignore[no-untyped-def]
    built, pixels: np.ndarray, labels: np.ndarray, batch: int, dim: int, channels_last: bool
) -> float:
    """The reference: a textbook loop on float tensors normalised beforehand, in NCHW (the
    default layout) or channels-last (model and input converted, the usual CPU speed-up)."""
    import torch

    prep = built.preprocessing
    mean = torch.tensor(prep.mean).view(1, 3, 1, 1)
    std = torch.tensor(prep.std).view(1, 3, 1, 1)
    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=layout)
    y = torch.from_numpy(labels)
    model = _fresh(built, pixels.shape).to(memory_format=layout)
    loss_fn, optimiser = _loss_and_optimiser(list(model.parameters()), dim, int(labels.max()) + 1)
    started = time.perf_counter()
    perm = torch.randperm(len(x))
    for i in range(0, len(x), batch):
        idx = perm[i : i + batch]
        loss = loss_fn(model(x[idx]), y[idx])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return len(pixels) / (time.perf_counter() - started)


def bench_finetune(spec: str, n_images: int, batch: int, rounds: int) -> dict:  # type: ignore[type-arg]
    import torch

    from kiban.imaging import preprocess
    from kiban_cli.synthetic import sample_images
    from kiban_export.spec import parse_spec
    from kiban_trainer.finetune import build_base

    built = build_base(parse_spec(spec))
    prep = built.preprocessing
    crops = [preprocess(img.convert("RGB"), prep) for img in sample_images(n=8, seed=0)]
    pixels = np.stack([crops[i % len(crops)] for i in range(n_images)])
    labels = (np.arange(n_images) % 4).astype(np.int64)
    with torch.no_grad():
        dim = int(built.module(torch.zeros(1, 3, prep.crop, prep.crop)).shape[1])
    kiban_round(built, pixels[:batch], labels[:batch], batch, dim)  # warm-up every path
    plain_round(built, pixels[:batch], labels[:batch], batch, dim, False)
    plain_round(built, pixels[:batch], labels[:batch], batch, dim, True)
    ours, nchw, nhwc = [], [], []
    for _ in range(rounds):  # interleaved: machine noise hits all three alike
        nchw.append(plain_round(built, pixels, labels, batch, dim, False))
        nhwc.append(plain_round(built, pixels, labels, batch, dim, True))
        ours.append(kiban_round(built, pixels, labels, batch, dim))
    kiban = statistics.median(ours)
    best_plain = max(statistics.median(nchw), statistics.median(nhwc))
    return {
        "model": spec,
        "images": n_images,
        "batch": batch,
        "plain_nchw": statistics.median(nchw),
        "plain_channels_last": statistics.median(nhwc),
        "kiban": kiban,
        "ratio": kiban / best_plain,
    }


def bench_head(n: int, dim: int, classes: int, epochs: int) -> dict:  # type: ignore[type-arg]
    from kiban_trainer.compose import l2_normalise
    from kiban_trainer.head import HeadConfig, train_head

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(classes, dim))
    labels = rng.integers(0, classes, size=n)
    noisy = centres[labels] + 6.0 * rng.normal(size=(n, dim))  # overlapping classes
    vectors = l2_normalise(noisy.astype(np.float32))
    cfg = HeadConfig()
    result = train_head(vectors, labels, epochs=epochs, seed=0, config=cfg)
    steps = epochs * max(1, round(n / cfg.batch_size))
    return {
        "n": n,
        "dim": dim,
        "epochs": epochs,
        "seconds": result.seconds,
        "steps_per_s": steps / result.seconds,
        "vectors_per_s": n * epochs / result.seconds,
        "loss": (result.loss_per_epoch[0], result.loss_per_epoch[-1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and rounds")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--model", default="efficientnet-lite0", help="export spec to fine-tune")
    parser.add_argument("--images", type=int, default=0, help="images per fine-tune round")
    args = parser.parse_args()

    import torch

    from kiban_trainer.provenance import cpu_model, worker_threads

    if args.threads:
        torch.set_num_threads(args.threads)
    n_images = args.images or (64 if args.quick else 128)
    rounds = 2 if args.quick else 3
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    print(
        f"CPU: {cpu_model()}, {worker_threads()} cores available, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads"
        + (f" (GPU {gpu} present, not used: both loops run on the CPU)" if gpu else "")
    )
    ft = bench_finetune(args.model, n_images, 32, rounds)
    print("\n## Fine-tune loop efficiency (kiban / plain PyTorch loop, same run; target >= 0.9)")
    print(
        "| model | images/round | batch | plain NCHW img/s | plain channels-last img/s "
        "| kiban img/s | kiban / best plain |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {ft['model']} | {ft['images']} | {ft['batch']} | {ft['plain_nchw']:.1f} | "
        f"{ft['plain_channels_last']:.1f} | {ft['kiban']:.1f} | {ft['ratio']:.2f} |"
    )
    print(
        "kiban's batches are uint8 NHWC permuted to NCHW inside the standard interface, i.e. "
        "channels-last strides: the layout oneDNN convolutions run fastest on a CPU."
    )
    from kiban_trainer.train import default_epochs

    n_head = 10_000 if not args.quick else 5_000
    head = bench_head(n_head, 1280, 10, default_epochs("head", n_head))
    print("\n## Head training on stored embeddings (default head, default epochs)")
    print("| vectors | dim | epochs | seconds | steps/s | vectors/s | loss first → last |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {head['n']:,} | {head['dim']} | {head['epochs']} | {head['seconds']:.1f} | "
        f"{head['steps_per_s']:.0f} | {head['vectors_per_s']:,.0f} | "
        f"{head['loss'][0]:.3f} → {head['loss'][1]:.3f} |"
    )
    if os.environ.get("KIBAN_BENCH_STRICT") and ft["ratio"] < 0.9:
        raise SystemExit(f"fine-tune loop ratio {ft['ratio']:.2f} < 0.9")


if __name__ == "__main__":
    main()
