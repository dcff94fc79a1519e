"""Encoder efficiency and memory, measured side by side in one run.

(1) Efficiency = end-to-end encode throughput (bytes in the store → decoded → ONNX →
    L2-normalised → shard in the store → points in Qdrant) divided by bare ONNX Runtime
    throughput on already-decoded uint8 tensors, same model, batch size and threads.
    Target ≥ 0.9 for ViT-B-32 (compute-bound).
(2) Peak RSS of an encoder process for a batch of 1× and 10× the image set (distinct
    images: each copy re-encoded with a one-pixel change so sha256 differ). Target: within
    10% — memory is bounded by the chunk, not the batch.

Usage: python bench/bench_encoder.py [--images N] [--models vit,effnet] [--quick]
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
NEU = REPO.parent / "shared" / "datasets" / "neu-det"
MODELS = {
    "vit-b-32": ("open_clip:ViT-B-32", "foundation"),
    "effnet-lite0": ("efficientnet-lite0", "domain"),
}


def make_settings(home: Path, **kw):  # type: ignore[no-untyped-def]
    from kiban.settings import Settings, use_settings

    settings = Settings(home=home, **kw)
    use_settings(settings)
    return settings


def image_folder(dst: Path, n: int, copies: int = 1) -> Path:
    """NEU images (or synthetic textures if NEU is absent), `copies` distinct variants each."""
    if NEU.is_dir():
        files = sorted(NEU.glob("*/*.jpg"))
        files = files[:: max(1, len(files) // n)][:n]  # spread over all classes
        items = [(f.parent.name, f.name, f.read_bytes()) for f in files]
    else:
        from kiban_cli.synthetic import generate_texture_dataset

        src = generate_texture_dataset(dst.parent / "synthetic", per_class=max(1, n // 6))
        items = [(f.parent.name, f.name, f.read_bytes()) for f in sorted(src.glob("*/*.jpg"))][:n]
    for label, name, data in items:
        (dst / label).mkdir(parents=True, exist_ok=True)
        (dst / label / name).write_bytes(data)
        for c in range(1, copies):
            arr = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
            arr[:8, :8, :] = (arr[:8, :8, :].astype(np.int16) + 7 * c) % 256  # an 8x8 stamp
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, "JPEG", quality=95 - c)
            (dst / label / f"v{c}-{name}").write_bytes(buf.getvalue())
    return dst


def ensure_models(settings, names: list[str]) -> None:  # type: ignore[no-untyped-def]
    from kiban.context import Context
    from kiban.errors import ModelNotFoundError
    from kiban.models.registry import load_card, publish
    from kiban_cli.synthetic import sample_images
    from kiban_export import export_model

    store = Context.from_settings(settings).store
    for name in names:
        try:
            load_card(store, name)
        except ModelNotFoundError:
            spec, family = MODELS[name]
            with tempfile.TemporaryDirectory() as tmp:
                card, path = export_model(spec, name, family, Path(tmp), sample_images(4))
                publish(store, card, path)


def encode_batch(  # type: ignore[no-untyped-def]
    settings, source: Path, batch: str, model: str, after_ingest=None, index_too: bool = True
) -> tuple[int, float]:
    """Ingest once (untimed), then time encode + index of every chunk through the tasks."""
    from kiban.context import Context
    from kiban.messages import EncodeChunk, IndexShard, IngestBatch
    from kiban.tasks import vector_index
    from kiban_encoder.encode import encode_chunk
    from kiban_encoder.index import index_shard
    from kiban_ingest.ingest import ingest_batch

    ctx = Context.from_settings(settings)
    info = ingest_batch(
        IngestBatch(batch_id=batch, source=source.as_uri(), chunk_size=settings.chunk_size), ctx
    )
    index = vector_index(settings) if index_too else None
    if after_ingest is not None:
        after_ingest()
    t0 = time.perf_counter()
    n = 0
    for chunk in info.chunks:
        meta = encode_chunk(EncodeChunk(batch_id=batch, model=model, chunk=chunk.index), ctx)
        if index is not None:
            index_shard(IndexShard(batch_id=batch, model=model, chunk=chunk.index), ctx, index)
        n += meta.n_images
    return n, time.perf_counter() - t0


def bare_throughput(settings, source: Path, model: str, n: int) -> float:  # type: ignore[no-untyped-def]
    """ONNX Runtime alone on already-decoded tensors, same batch size and threads."""
    from kiban.context import Context
    from kiban.imaging import decode_image, preprocess
    from kiban.models.registry import fetch_model, load_card
    from kiban_encoder.session import load_model

    ctx = Context.from_settings(settings)
    card = load_card(ctx.store, model)
    files = sorted(source.glob("*/*"))[:n]
    pixels = np.stack([preprocess(decode_image(f.read_bytes()), card.preprocessing) for f in files])
    loaded = load_model(
        fetch_model(ctx.store, card, ctx.cache_dir),
        settings.ort_providers,
        settings.threads,
        card.input_name,
        card.output_name,
    )
    loaded.run(pixels[: settings.batch_size])  # warm-up
    t0 = time.perf_counter()
    for start in range(0, len(pixels), settings.batch_size):
        loaded.run(pixels[start : start + settings.batch_size])
    return len(pixels) / (time.perf_counter() - t0)


def efficiency(home: Path, models: list[str], n: int, batch_size: int, threads: int) -> list[dict]:
    settings = make_settings(home, batch_size=batch_size, threads=threads, chunk_size=256)
    ensure_models(settings, models)
    src = image_folder(home / f"images-{n}", n)
    rows = []
    for model in models:
        bare = bare_throughput(settings, src, model, n)
        count, seconds = encode_batch(settings, src, f"eff-{model}", model)
        e2e = count / seconds
        rows.append(
            {
                "model": model,
                "images": count,
                "bare_img_s": round(bare, 2),
                "e2e_img_s": round(e2e, 2),
                "efficiency": round(e2e / bare, 3),
            }
        )
    return rows


def _peak_rss_mb() -> float:
    """VmHWM: this process's peak RSS since the last reset (ru_maxrss survives exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(home: str, n: int, copies: int, model: str, index_too: bool) -> None:
    # its own Qdrant path: local mode allows one process per path
    settings = make_settings(
        Path(home),
        batch_size=32,
        chunk_size=256,
        qdrant_path=Path(home) / f"qdrant-mem-{copies}-{index_too}",
    )
    src = image_folder(Path(home) / f"mem-{n}-{copies}x", n, copies)
    marks: list[float] = []

    def reset_peak() -> None:  # measure encoding + indexing, not the ingest before it
        Path("/proc/self/clear_refs").write_text("5")
        marks.append(_peak_rss_mb())

    batch = f"mem-{n}-{copies}x-{'idx' if index_too else 'enc'}"
    count, seconds = encode_batch(settings, src, batch, model, reset_peak, index_too)
    before = marks[0]
    peak = _peak_rss_mb()
    print(
        json.dumps(
            {
                "copies": copies,
                "stage": "encode + index (Qdrant local, in-process)" if index_too else "encode",
                "images": count,
                "peak_rss_mb": round(peak, 1),
                "rss_before_mb": round(before, 1),
                "seconds": round(seconds, 1),
            }
        )
    )


def memory(home: Path, n: int, model: str) -> list[dict]:
    """Peak RSS for 1x and 10x the images: encoding alone, and encoding + local indexing."""
    settings = make_settings(home)
    ensure_models(settings, [model])
    rows = []
    for index_too in (False, True):
        pair = []
        for copies in (1, 10):
            argv = [sys.executable, __file__, "--memory-child", str(copies), "--images", str(n),
                    "--home", str(home), "--mem-model", model]  # fmt: skip
            if index_too:
                argv.append("--index-too")
            out = subprocess.run(argv, check=True, capture_output=True, text=True)
            pair.append(json.loads(out.stdout.strip().splitlines()[-1]))
        pair[1]["ratio_vs_1x"] = round(pair[1]["peak_rss_mb"] / pair[0]["peak_rss_mb"], 3)
        rows += pair
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1800)
    ap.add_argument("--models", default="vit-b-32,effnet-lite0")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--home", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--memory-child", type=int, default=0)
    ap.add_argument("--mem-model", default="effnet-lite0")
    ap.add_argument("--index-too", action="store_true")
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.home, args.images, args.memory_child, args.mem_model, args.index_too)
        return
    home = Path(args.home or tempfile.mkdtemp(prefix="kiban-bench-"))
    n = 192 if args.quick else args.images
    eff_n = min(n, 480)
    rows = efficiency(home, args.models.split(","), eff_n, args.batch_size, args.threads)
    print("\n## Encoder efficiency (end-to-end / bare ONNX Runtime, same run)")
    print("| model | images | bare img/s | end-to-end img/s | ratio |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['images']} | {r['bare_img_s']} "
            f"| {r['e2e_img_s']} | {r['efficiency']} |"
        )
    mem = memory(home, 180 if args.quick else n, args.mem_model)
    print(f"\n## Encoder peak memory vs batch size ({args.mem_model})")
    print("| stage | batch | images | peak RSS MB | seconds | 10x/1x |")
    print("|---|---|---|---|---|---|")
    for r in mem:
        print(
            f"| {r['stage']} | {r['copies']}x | {r['images']} | {r['peak_rss_mb']} "
            f"| {r['seconds']} | {r.get('ratio_vs_1x', '')} |"
        )
    (home / "bench-encoder.json").write_text(
        json.dumps({"efficiency": rows, "memory": mem}, indent=2)
    )


if __name__ == "__main__":
    main()
