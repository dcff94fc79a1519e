"""Encoder efficiency and memory, measured side by side in one run.

(1) Efficiency = end-to-end encode throughput (bytes in the store → sha256 check →
    decoded → resized/cropped → ONNX (which normalises and transposes in-graph) →
    L2-normalised → shard in the store → points in Qdrant) divided by bare ONNX Runtime
    throughput on the same images already decoded and cropped to uint8 NHWC: the same
    session object (model file, threads, thread plan, spinning), the same batch size, both
    warmed, interleaved over --rounds, median ratio. Targets ≥ 0.9 for ViT-B-32
    (compute-bound), ≥ 0.85 for EfficientNet-Lite0 (issue 11).
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
from concurrent.futures import Future, ThreadPoolExecutor
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
    settings,
    source: Path,
    batch: str,
    model: str,
    after_ingest=None,
    index_too: bool = True,
    overlap_index: bool = False,
) -> tuple[int, float]:
    """Ingest once (untimed), then time encode + index of every chunk through the tasks.

    ``overlap_index``: shard k is indexed in a second thread while chunk k+1 is encoded, as
    the deployed stack runs them (the indexer is its own worker process beside the encoders;
    Qdrant local mode's per-point SQLite commits wait on the disk, not the CPU). The clock
    still stops when the last point is in Qdrant. Otherwise encode and index alternate.
    """
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
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="indexer") as indexer:
        pending: list[Future[int]] = []
        for chunk in info.chunks:
            meta = encode_chunk(EncodeChunk(batch_id=batch, model=model, chunk=chunk.index), ctx)
            if index is not None:
                msg = IndexShard(batch_id=batch, model=model, chunk=chunk.index)
                if overlap_index:
                    pending.append(indexer.submit(index_shard, msg, ctx, index))
                else:
                    index_shard(msg, ctx, index)
            n += meta.n_images
        for fut in pending:
            fut.result()
    return n, time.perf_counter() - t0


def encoder_session(settings, model: str):  # type: ignore[no-untyped-def]
    """The session encode_chunk will use: the same load_model call, so the same cached object
    (same model file, providers, threads, thread plan with the decode workers, spinning)."""
    from kiban.context import Context
    from kiban.models.registry import fetch_model, load_card
    from kiban_encoder.session import load_model

    ctx = Context.from_settings(settings)
    card = load_card(ctx.store, model)
    return card, load_model(
        fetch_model(ctx.store, card, ctx.cache_dir),
        settings.ort_providers,
        settings.threads,
        card.input_name,
        card.output_name,
        decode_workers=settings.decode_workers,
        gpu_batch_size=settings.gpu_batch_size,
        image_side=card.preprocessing.crop,
        model_sha256=card.sha256,
        cache_root=ctx.cache_dir,
    )


def decoded_pixels(source: Path, prep, n: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The bare baseline's input: the same images, decoded and cropped beforehand (uint8 NHWC)."""
    from kiban.imaging import decode_for_model

    files = sorted(source.glob("*/*"))[:n]
    return np.stack([decode_for_model(f.read_bytes(), prep) for f in files])


def cpu_seconds() -> float:
    """CPU time of this process, all threads (user + system): the work done, whatever the
    load of a shared machine makes of the wall clock."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def bare_pass(loaded, pixels: np.ndarray, batch_size: int) -> float:  # type: ignore[no-untyped-def]
    """ONNX Runtime alone on already-decoded tensors (one pass, img/s), same batches."""
    t0 = time.perf_counter()
    for start in range(0, len(pixels), batch_size):
        loaded.run(pixels[start : start + batch_size])
    return len(pixels) / (time.perf_counter() - t0)


def bare_throughput(settings, source: Path, model: str, n: int) -> float:  # type: ignore[no-untyped-def]
    """One warmed bare pass on the encoder's own session (see ``efficiency``)."""
    card, loaded = encoder_session(settings, model)
    pixels = decoded_pixels(source, card.preprocessing, n)
    loaded.run(pixels[: settings.batch_size])  # warm-up
    return bare_pass(loaded, pixels, settings.batch_size)


def _reference_resize_crop(image, box, new_w, new_h, prep) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The resize before this change: RGB, the whole box resized, then cropped (for
    --reference: the same run measures what the crop-only / grey-channel resize gained)."""
    from kiban.imaging import _RESAMPLE, _crop

    image = image.convert("RGB")
    if (new_w, new_h) != image.size or box != (0, 0, *image.size):
        image = image.resize((new_w, new_h), _RESAMPLE[prep.interpolation], box=box)
    return _crop(image, new_w, new_h, prep)


def timed_encode(  # type: ignore[no-untyped-def]
    settings, src: Path, batch: str, model: str, reference: bool, overlap: bool
) -> tuple[float, float]:
    """(img/s, CPU ms per image) of one end-to-end pass, ingest excluded from both."""
    import kiban.imaging as imaging

    current = imaging._resize_crop
    if reference:
        imaging._resize_crop = _reference_resize_crop  # type: ignore[assignment]
    try:
        marks: list[float] = []
        count, seconds = encode_batch(
            settings, src, batch, model, lambda: marks.append(cpu_seconds()), overlap_index=overlap
        )
        cpu = cpu_seconds() - marks[0]
    finally:
        imaging._resize_crop = current  # type: ignore[assignment]
    return count / seconds, 1000 * cpu / max(count, 1)


def efficiency(
    home: Path,
    models: list[str],
    n: int,
    batch_size: int,
    threads: int,
    rounds: int = 3,
    reference: bool = False,
    serial_too: bool = False,
) -> list[dict]:
    """End-to-end ÷ bare, interleaved: ``rounds`` × (bare pass, end-to-end pass), median ratio.

    Both sides use one warmed session object (the one encode_chunk gets from load_model's
    cache), so neither pays session creation or ORT's first-run allocations inside its timing
    (a worker creates its session once per process), and both run with the same thread plan.
    Interleaving keeps a shared machine's load drift out of the ratio.
    """
    settings = make_settings(home, batch_size=batch_size, threads=threads, chunk_size=256)
    ensure_models(settings, models)
    src = image_folder(home / f"images-{n}", n)
    rows = []
    for model in models:
        card, loaded = encoder_session(settings, model)
        pixels = decoded_pixels(src, card.preprocessing, n)
        loaded.run(pixels[:batch_size])  # warm-up: ORT's first run allocates its arena
        bares, e2es, ratios, refs, serials = [], [], [], [], []
        stamp = time.strftime("%H%M%S")
        bare_cpu, e2e_cpu = [], []
        for r in range(rounds):
            c0 = cpu_seconds()
            bare = bare_pass(loaded, pixels, batch_size)
            bare_cpu.append(1000 * (cpu_seconds() - c0) / len(pixels))
            e2e, cpu = timed_encode(settings, src, f"eff-{model}-{stamp}-{r}", model, False, True)
            e2e_cpu.append(cpu)
            bares.append(bare)
            e2es.append(e2e)
            ratios.append(e2e / bare)
            if reference:
                ref, _ = timed_encode(settings, src, f"ref-{model}-{stamp}-{r}", model, True, True)
                refs.append(ref / bare_pass(loaded, pixels, batch_size))
            if serial_too:
                ser, _ = timed_encode(
                    settings, src, f"ser-{model}-{stamp}-{r}", model, False, False
                )
                serials.append(ser / bare_pass(loaded, pixels, batch_size))
        row = {
            "model": model,
            "images": len(pixels),
            "rounds": rounds,
            "bare_img_s": round(float(np.median(bares)), 2),
            "e2e_img_s": round(float(np.median(e2es)), 2),
            "efficiency": round(float(np.median(ratios)), 3),
            "ratios": [round(x, 3) for x in ratios],
            "bare_cpu_ms_per_img": round(float(np.median(bare_cpu)), 2),
            "e2e_cpu_ms_per_img": round(float(np.median(e2e_cpu)), 2),
            "session": loaded.options,
        }
        if serial_too:
            row["serial_index_efficiency"] = round(float(np.median(serials)), 3)
            row["serial_index_ratios"] = [round(x, 3) for x in serials]
        if reference:
            row["reference_efficiency"] = round(float(np.median(refs)), 3)
            row["reference_ratios"] = [round(x, 3) for x in refs]
        rows.append(row)
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
    ap.add_argument("--rounds", type=int, default=3, help="interleaved bare/e2e rounds")
    ap.add_argument("--no-memory", action="store_true", help="efficiency only")
    ap.add_argument(
        "--eff-images",
        type=int,
        default=480,
        help="images in the efficiency runs (at most --images); with few chunks the last "
        "shard's indexing is an unoverlapped tail",
    )
    ap.add_argument(
        "--reference", action="store_true", help="also e2e with the previous full RGB resize"
    )
    ap.add_argument(
        "--serial-index", action="store_true", help="also e2e with encode and index alternating"
    )
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.home, args.images, args.memory_child, args.mem_model, args.index_too)
        return
    home = Path(args.home or tempfile.mkdtemp(prefix="kiban-bench-"))
    n = 192 if args.quick else args.images
    eff_n = min(n, args.eff_images)
    rows = efficiency(
        home,
        args.models.split(","),
        eff_n,
        args.batch_size,
        args.threads,
        args.rounds,
        args.reference,
        args.serial_index,
    )
    print("\n## Encoder efficiency (end-to-end / bare ONNX Runtime, interleaved, medians)")
    print(
        "| model | images | bare img/s | end-to-end img/s | ratio | per-round ratios "
        "| CPU ms/img bare | CPU ms/img e2e |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['images']} | {r['bare_img_s']} "
            f"| {r['e2e_img_s']} | {r['efficiency']} | {r['ratios']} "
            f"| {r['bare_cpu_ms_per_img']} | {r['e2e_cpu_ms_per_img']} |"
        )
        if "serial_index_efficiency" in r:
            print(
                f"|   (index not overlapped) | | | | {r['serial_index_efficiency']} "
                f"| {r['serial_index_ratios']} |"
            )
        if "reference_efficiency" in r:
            print(
                f"|   (previous full RGB resize) | | | | {r['reference_efficiency']} "
                f"| {r['reference_ratios']} |"
            )
    if args.no_memory:
        (home / "bench-encoder.json").write_text(json.dumps({"efficiency": rows}, indent=2))
        return
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
