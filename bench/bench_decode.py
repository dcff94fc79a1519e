"""Decode that keeps up (issue 11 section 3), measured side by side in one run.

(1) Decode img/s, full decode vs reduced-size JPEG decode (``decode_for_model``), and
    ingest validation img/s, full decode vs ``validate_image`` (1/8-scale JPEG), on the
    same bytes, one thread.
(2) EfficientNet-Lite0 end-to-end ÷ bare ONNX Runtime (see bench_encoder.py), with the
    encoder's reader forced to the full decode ("before") and with the reduced decode
    ("after"), same images, same run. Target after ≥ 0.85 on images larger than the input.
(3) Embedding agreement full vs reduced decode (cosine, same model).

Two image sets, reported separately and honestly: synthetic JPEGs of 512-1024 px (larger
than the 256 px resize, so draft applies) and NEU (416 px: 416 < 2 × 256, draft does not
apply and both columns should match).

Usage: python bench/bench_decode.py [--images N] [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import bench_encoder as be
import numpy as np
from PIL import Image


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def large_folder(dst: Path, n: int) -> Path:
    """n synthetic textures saved as JPEGs of 512-1024 px (various aspect ratios)."""
    from kiban_cli.synthetic import sample_images

    rng = np.random.default_rng(0)
    images = sample_images(n=n, seed=3)
    for i, img in enumerate(images):
        w, h = int(rng.integers(512, 1025)), int(rng.integers(512, 1025))
        big = img.convert("RGB").resize((w, h), Image.Resampling.BICUBIC)
        label = f"c{i % 4}"
        (dst / label).mkdir(parents=True, exist_ok=True)
        big.save(dst / label / f"img-{i:04d}.jpg", "JPEG", quality=90)
    return dst


def decode_rates(files: list[Path], prep) -> dict:  # type: ignore[no-untyped-def]
    from kiban.imaging import decode_for_model, decode_image, preprocess, validate_image

    blobs = [f.read_bytes() for f in files]

    def rate(fn) -> float:  # type: ignore[no-untyped-def]
        fn(blobs[0])
        t0 = time.perf_counter()
        for b in blobs:
            fn(b)
        return len(blobs) / (time.perf_counter() - t0)

    return {
        "full_img_s": rate(lambda b: preprocess(decode_image(b), prep)),
        "draft_img_s": rate(lambda b: decode_for_model(b, prep)),
        "validate_full_img_s": rate(lambda b: decode_image(b).size),
        "validate_img_s": rate(validate_image),
    }


def cosines(settings, files: list[Path], model: str) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    from kiban.context import Context
    from kiban.imaging import decode_for_model
    from kiban.models.registry import fetch_model, load_card
    from kiban_encoder.session import load_model

    ctx = Context.from_settings(settings)
    card = load_card(ctx.store, model)
    loaded = load_model(
        fetch_model(ctx.store, card, ctx.cache_dir),
        settings.ort_providers,
        settings.threads,
        card.input_name,
        card.output_name,
    )
    prep = card.preprocessing
    full = np.stack([decode_for_model(f.read_bytes(), prep, draft=False) for f in files])
    draft = np.stack([decode_for_model(f.read_bytes(), prep) for f in files])
    a = np.concatenate([loaded.run(full[i : i + 32]) for i in range(0, len(files), 32)])
    b = np.concatenate([loaded.run(draft[i : i + 32]) for i in range(0, len(files), 32)])
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    cos = (a * b).sum(axis=1)
    return float(cos.min()), float(cos.mean())


def end_to_end(settings, src: Path, model: str, tag: str, n: int) -> dict:  # type: ignore[no-untyped-def]
    import kiban.source_image as source_image
    from kiban.imaging import decode_for_model

    bare = be.bare_throughput(settings, src, model, n)
    row = {"bare_img_s": bare}
    for mode, draft in (("before", False), ("after", True)):

        def patched(data, prep, max_pixels=80_000_000, min_side=8, draft=True, _d=draft):  # type: ignore[no-untyped-def]
            return decode_for_model(data, prep, max_pixels, min_side, draft=_d)  # forced mode

        # the reader decodes through kiban.source_image.load_for_model
        source_image.decode_for_model = patched  # type: ignore[assignment]
        try:
            count, seconds = be.encode_batch(
                settings, src, f"dec-{tag}-{mode}", model, overlap_index=True
            )
        finally:
            source_image.decode_for_model = decode_for_model  # type: ignore[assignment]
        row[f"{mode}_img_s"] = count / seconds
        row[f"{mode}_ratio"] = count / seconds / bare
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--model", default="effnet-lite0")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--home", default=None)
    ap.add_argument("--quick", action="store_true")
    args, _ = ap.parse_known_args()
    n = 64 if args.quick else args.images
    home = Path(args.home or tempfile.mkdtemp(prefix="kiban-bench-decode-"))
    settings = be.make_settings(
        home, batch_size=args.batch_size, threads=args.threads, chunk_size=256
    )
    be.ensure_models(settings, [args.model])
    from kiban.context import Context
    from kiban.models.registry import load_card

    prep = load_card(Context.from_settings(settings).store, args.model).preprocessing
    sets = {
        "synthetic 512-1024 px": large_folder(home / f"large-{n}", n),
        "NEU 416 px (draft n/a)": be.image_folder(home / f"neu-{n}", n),
    }
    print(f"\nCPU: {cpu_model()}, {os.cpu_count()} cores visible; threads={args.threads}")
    rows = []
    for i, (name, src) in enumerate(sets.items()):
        files = sorted(src.glob("*/*"))[:n]
        row = {"set": name, "images": len(files), **decode_rates(files, prep)}
        row["cos_min"], row["cos_mean"] = cosines(settings, files, args.model)
        row.update(end_to_end(settings, src, args.model, f"s{i}", n))
        rows.append(row)
    print("\n## Decode (one thread, decode + resize + crop)")
    print(
        "| images | n | full img/s | reduced img/s | x "
        "| ingest full img/s | ingest validate img/s | x |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['set']} | {r['images']} | {r['full_img_s']:.1f} | {r['draft_img_s']:.1f} "
            f"| {r['draft_img_s'] / r['full_img_s']:.2f} | {r['validate_full_img_s']:.1f} "
            f"| {r['validate_img_s']:.1f} | {r['validate_img_s'] / r['validate_full_img_s']:.2f} |"
        )
    print(f"\n## {args.model} end-to-end ÷ bare ORT (target after ≥ 0.85), embedding cosine")
    print(
        "| images | bare img/s | before e2e img/s | ratio "
        "| after e2e img/s | ratio | cos min | cos mean |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['set']} | {r['bare_img_s']:.1f} | {r['before_img_s']:.1f} "
            f"| {r['before_ratio']:.3f} | {r['after_img_s']:.1f} | {r['after_ratio']:.3f} "
            f"| {r['cos_min']:.4f} | {r['cos_mean']:.4f} |"
        )


if __name__ == "__main__":
    main()
