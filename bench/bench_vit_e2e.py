"""ViT-B-32 end to end with kiban's best CPU variant vs PyTorch eager, and what it costs in quality.

Speed, measured interleaved in one run on the same images and the same threads:
- **kiban end to end, int8 dynamic variant**: JPEG bytes in the store → decode → resize/crop →
  ONNX Runtime (the variant made by `kiban models export --precision int8` / `models
  quantize`, i.e. ``kiban_cli.models.publish_variant``) → L2-normalised shard in the store →
  points in Qdrant, through the encoder's own tasks (``bench_encoder.encode_batch``; ingest
  is untimed);
- **kiban end to end, fp32** (the parent), for context;
- **PyTorch eager**: the open_clip ViT-B-32 visual tower as ``kiban_export`` builds it, under
  ``torch.no_grad()`` with ``torch.set_num_threads(threads)``, fed images **already decoded,
  resized, cropped and normalised** (float32 NCHW tensors made before timing) — the most
  favourable case for PyTorch. Target: kiban int8 end to end ÷ PyTorch eager ≥ 2.0.

Weights: random initialisation for both (no CLIP weights can be installed offline; speed does
not depend on the weight values — quality does, see below).

Graph fusion: the fp32 fused graph ÷ the unfused one (ONNX Runtime transformer optimiser,
``kiban_export.fusion.fuse``, interleaved on the same crops and threads).

Quality on NEU-DET (read in place from ../shared/datasets/neu-det): kiban's own pipeline
(``kiban.pipeline.run_batch``, embedded mode) runs the batch with the fp32 parent and its int8
variant; the report's paired comparison gives MV@5 macro-F1 of each with its bootstrap CI and
the paired difference (int8 − fp32) with its 95% CI (the reporter's paired bootstrap). "Within
0.01" means the CI's lower bound is above −0.01. Random-init weights: the absolute F1 values are
those of a random ViT, the paired difference is what the variant costs.

    python bench/bench_vit_e2e.py [--images 192] [--rounds 3] [--quality-images 1800] [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_encoder import NEU, encode_batch, ensure_models, image_folder, make_settings  # noqa: E402

PARENT = "vit-b-32"  # bench_encoder.MODELS: open_clip:ViT-B-32, random init
VARIANT = f"{PARENT}-int8"
NEU_IMAGES = 1800


def torch_eager_inputs(folder: Path, card: Any) -> np.ndarray:
    """Decoded, resized, cropped and normalised float32 NCHW — all of it before any timing."""
    from kiban.imaging import decode_image, preprocess
    from kiban_export.parity import normalise

    files = sorted(folder.glob("*/*"))
    crops = np.stack([preprocess(decode_image(f.read_bytes()), card.preprocessing) for f in files])
    x = normalise(crops, card.preprocessing.mean, card.preprocessing.std)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def time_torch(module: Any, x: Any, batch_size: int) -> float:
    import torch

    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            module(x[start : start + batch_size])
    return len(x) / (time.perf_counter() - t0)


def speed(settings: Any, home: Path, n: int, rounds: int, threads: int) -> dict[str, Any]:
    """Rounds of (int8 e2e, fp32 e2e, PyTorch eager), order alternated to cancel drift."""
    import torch

    from kiban.context import Context
    from kiban.models.registry import load_card
    from kiban_export.builders import build
    from kiban_export.spec import parse_spec

    store = Context.from_settings(settings).store
    card = load_card(store, PARENT)
    src = image_folder(home / f"images-{n}", n)
    warm = image_folder(home / "images-warm", 16)
    torch.set_num_threads(threads)
    module = build(parse_spec("open_clip:ViT-B-32")).module.eval()
    x = torch.from_numpy(torch_eager_inputs(src, card))
    with torch.no_grad():
        module(x[:2])  # warm-up
    for model in (VARIANT, PARENT):  # load + warm the encoder's sessions, untimed
        encode_batch(settings, warm, f"warm-{model}", model)
    samples: dict[str, list[float]] = {"int8-e2e": [], "fp32-e2e": [], "torch-eager": []}
    paired: list[float] = []
    for r in range(rounds):
        order = ["int8-e2e", "fp32-e2e", "torch-eager"]
        if r % 2:
            order.reverse()
        got: dict[str, float] = {}
        for what in order:
            if what == "torch-eager":
                got[what] = time_torch(module, x, settings.batch_size)
            else:
                model = VARIANT if what == "int8-e2e" else PARENT
                count, seconds = encode_batch(settings, src, f"r{r}-{model}", model)
                got[what] = count / seconds
            samples[what].append(got[what])
        paired.append(got["int8-e2e"] / got["torch-eager"])
        print(f"round {r}: " + ", ".join(f"{k} {v:.1f} img/s" for k, v in got.items()), flush=True)
    med = {k: round(statistics.median(v), 2) for k, v in samples.items()}
    return {
        "images": len(x),
        "rounds": rounds,
        "median_img_s": med,
        "samples_img_s": {k: [round(s, 2) for s in v] for k, v in samples.items()},
        "int8_e2e_over_torch": round(med["int8-e2e"] / med["torch-eager"], 3),
        "int8_e2e_over_torch_per_round": [round(p, 3) for p in paired],
        "fp32_e2e_over_torch": round(med["fp32-e2e"] / med["torch-eager"], 3),
    }


def fusion_ratio(settings: Any, threads: int, n: int) -> dict[str, Any]:
    """fp32 fused ÷ unfused, on a copy of the parent (the published model is not touched)."""
    from kiban.context import Context
    from kiban.models.registry import fetch_model, load_card
    from kiban_cli.synthetic import sample_images
    from kiban_export.fusion import fuse
    from kiban_export.variants import as_crops

    ctx = Context.from_settings(settings)
    card = load_card(ctx.store, PARENT)
    with tempfile.TemporaryDirectory(prefix="bench-fuse-") as tmp:
        copy = Path(tmp) / "vit.onnx"
        shutil.copyfile(fetch_model(ctx.store, card, ctx.cache_dir), copy)
        crops = as_crops(sample_images(n=n, seed=1), card.preprocessing).crops
        result = fuse(copy, crops, threads)
    return result.model_dump(mode="json")


def quality_source(home: Path, n: int) -> Path:
    """NEU in place, or a stratified subset: the first n/6 images of each class by name."""
    if n >= NEU_IMAGES:
        return NEU
    dst = home / f"neu-subset-{n}"
    classes = sorted(p for p in NEU.iterdir() if p.is_dir())
    per_class = max(2, n // len(classes))
    for cls in classes:
        (dst / cls.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(cls.glob("*.jpg"))[:per_class]:
            shutil.copyfile(f, dst / cls.name / f.name)
    return dst


def quality(home: Path, threads: int, batch_size: int, n: int) -> dict[str, Any]:
    """Both models through kiban's own pipeline on NEU; the report's paired comparison."""
    from kiban.pipeline import run_batch

    settings = make_settings(home, batch_size=batch_size, threads=threads, chunk_size=256)
    source = quality_source(home, n)
    t0 = time.perf_counter()
    report = run_batch(settings, source.as_uri(), [PARENT, VARIANT], batch_id="neu-quality")
    seconds = time.perf_counter() - t0
    per_model = {}
    for m in report["models"]:
        (at5,) = [x for x in m["retrieval"]["metrics"] if x["k"] == 5]
        per_model[m["name"]] = at5["mv_macro_f1"]
    (pair,) = report["comparisons"]
    (diff,) = [d for d in pair["differences"] if d["key"] == "mv_macro_f1" and d["k"] == 5]
    sign = 1.0 if pair["name_a"] == VARIANT else -1.0  # orient as int8 − fp32
    lo, hi = sorted((sign * diff["ci_low"], sign * diff["ci_high"]))
    return {
        "source": "NEU-DET (all)" if source == NEU else f"NEU-DET stratified subset {source.name}",
        "images": report["batch"]["n_accepted"],
        "protocol": report["protocol"]["name"],
        "bootstrap_unit": pair["bootstrap_unit"],
        "bootstrap_resamples": pair["bootstrap_resamples"],
        "confidence": pair["confidence"],
        "mv5_macro_f1": per_model,
        "difference_int8_minus_fp32": round(sign * diff["difference"], 4),
        "ci": [round(lo, 4), round(hi, 4)],
        "within_0_01": lo > -0.01,
        "mcnemar_p": diff["mcnemar_p"],
        "pipeline_seconds": round(seconds, 1),
        "weights": "random init (open_clip ViT-B-32, no CLIP weights offline)",
    }


def main() -> None:
    from kiban.context import Context
    from kiban.errors import ModelNotFoundError
    from kiban.models.registry import load_card
    from kiban_cli.models import publish_variant, variant_name_for
    from kiban_export.variants import default_threads, machine

    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=192, help="images per timed round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="0: the cores available")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--quality-images", type=int, default=NEU_IMAGES, help="0 skips quality")
    ap.add_argument("--home", default=None)
    ap.add_argument("--parts", default="speed,fusion,quality", help="which measurements to run")
    ap.add_argument("--quick", action="store_true")
    args, _ = ap.parse_known_args()
    parts = set(args.parts.split(","))
    threads = args.threads or default_threads()
    n, rounds, nq = args.images, args.rounds, args.quality_images
    if args.quick:
        n, rounds, nq = 64, 2, min(nq, 120)
    home = Path(args.home or tempfile.mkdtemp(prefix="kiban-bench-vit-e2e-"))
    settings = make_settings(home, batch_size=args.batch_size, threads=threads, chunk_size=256)
    print(f"machine: {machine()}; threads: {threads}; batch size {args.batch_size}; home {home}")
    ensure_models(settings, [PARENT])
    store = Context.from_settings(settings).store
    assert variant_name_for(PARENT, "int8") == VARIANT
    try:
        vcard = load_card(store, VARIANT)  # a --home reused from an earlier run
    except ModelNotFoundError:
        vcard = publish_variant(
            settings, store, load_card(store, PARENT), VARIANT, "int8", None, 32, "dynamic"
        )
    assert vcard.variant is not None
    print(
        f"{VARIANT}: {vcard.variant.mode}, {vcard.variant.speedup}× fp32 ORT (bare, card), "
        f"top-{vcard.variant.neighbour_k} overlap {vcard.variant.neighbour_overlap:.3f}"
    )
    result: dict[str, Any] = {"machine": machine(), "threads": threads}
    result["variant_card"] = vcard.variant.model_dump(mode="json")
    if "speed" in parts:
        report_speed(result, settings, home, n, rounds, threads)
    if "fusion" in parts:
        result["fusion"] = f = fusion_ratio(settings, threads, 16 if args.quick else 32)
        print(
            f"\n## fp32 fused ÷ unfused (ViT-B-32): {f.get('speedup')} "
            f"(kept: {f.get('applied')}; {f.get('note')})"
        )
    if "quality" in parts and nq > 0 and NEU.is_dir():
        report_quality(result, home, threads, args.batch_size, nq)
    (home / "bench-vit-e2e.json").write_text(json.dumps(result, indent=2))
    print(f"\nresults: {home / 'bench-vit-e2e.json'}")


def report_speed(  # type: ignore[no-untyped-def]
    result: dict[str, Any], settings, home: Path, n: int, rounds: int, threads: int
) -> None:
    from kiban_export.variants import machine

    result["speed"] = s = speed(settings, home, n, rounds, threads)
    print("\n## ViT-B-32 end to end (kiban) vs PyTorch eager, same run, random-init weights")
    print(f"{machine()}, shared; {threads} threads; {s['images']} NEU images × {rounds} rounds")
    print("| path | median img/s | ÷ PyTorch eager |")
    print("|---|---|---|")
    labels = {
        "int8-e2e": "kiban end to end, int8 dynamic (bytes in store → Qdrant)",
        "fp32-e2e": "kiban end to end, fp32",
        "torch-eager": "PyTorch eager fp32, pre-decoded tensors, no_grad",
    }
    med = s["median_img_s"]
    for key, label in labels.items():
        print(f"| {label} | {med[key]} | {med[key] / med['torch-eager']:.2f} |")
    print(f"int8 e2e ÷ PyTorch per round: {s['int8_e2e_over_torch_per_round']} (target ≥ 2.0)")


def report_quality(result: dict[str, Any], home: Path, threads: int, batch: int, nq: int) -> None:
    result["quality"] = q = quality(home, threads, batch, nq)
    f1 = q["mv5_macro_f1"]
    print(f"\n## MV@5 macro-F1 on {q['source']} ({q['images']} images, {q['protocol']})")
    print("| model | MV@5 macro-F1 | 95% CI |")
    print("|---|---|---|")
    for name in (PARENT, VARIANT):
        e = f1[name]
        print(f"| {name} | {e['value']:.4f} | [{e['ci_low']:.4f}, {e['ci_high']:.4f}] |")
    print(
        f"paired int8 − fp32: {q['difference_int8_minus_fp32']:+.4f}, 95% CI "
        f"[{q['ci'][0]:+.4f}, {q['ci'][1]:+.4f}] ({q['bootstrap_unit']} bootstrap, "
        f"{q['bootstrap_resamples']} resamples); within 0.01: {q['within_0_01']}"
    )


if __name__ == "__main__":
    main()
