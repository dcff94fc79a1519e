"""Distributed throughput and queue overhead, measured side by side in one run.

(1) Images per second from trigger to report through the distributed stack (redis-server,
    SeaweedFS, separate worker processes) with 1 and with 2 encoder processes, against the
    embedded run of the same batch on the same machine: the ratio is the price (or gain)
    of the queues. On 2 cores a second encoder process can only compete for the same cores.
(2) Queue overhead per task: a small real task (export_report, two small objects) sent
    through the broker one at a time; overhead = send-to-done wall time minus the task's
    own run time as logged by its worker. Median of 20.

Usage: python bench/bench_distributed.py [--images N] [--model effnet-lite0] [--quick]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NEU = REPO.parent / "shared" / "datasets" / "neu-det"


def source_folder(home: Path, n: int) -> Path:
    if NEU.is_dir():
        files = sorted(NEU.glob("*/*.jpg"))
        files = files[:: max(1, len(files) // n)][:n]
        dst = home / "neu-subset"
        for f in files:
            (dst / f.parent.name).mkdir(parents=True, exist_ok=True)
            (dst / f.parent.name / f.name).write_bytes(f.read_bytes())
        return dst
    from kiban_cli.synthetic import generate_texture_dataset

    dst = home / "synthetic"
    generate_texture_dataset(dst, per_class=max(1, n // 6))
    (dst / "manifest.csv").unlink()
    return dst


def export(model: str, home: Path) -> tuple[object, Path]:
    from kiban_cli.synthetic import sample_images
    from kiban_export import export_model

    spec = {"effnet-lite0": "efficientnet-lite0", "vit-b-32": "open_clip:ViT-B-32"}[model]
    out = home / "export"
    out.mkdir(parents=True, exist_ok=True)
    return export_model(spec, model, None, out, sample_images(4))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1800)
    ap.add_argument("--model", default="effnet-lite0")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = 240 if args.quick else args.images

    from kiban.messages import ExportReport
    from kiban.models.registry import publish
    from kiban.pipeline import run_batch
    from kiban.settings import Settings, use_settings
    from kiban.store import open_store
    from kiban.workflow import dispatch
    from kiban_cli.stack import LocalStack

    home = Path(tempfile.mkdtemp(prefix="kiban-bench-dist-"))
    src = source_folder(home, n)
    card, onnx_path = export(args.model, home)
    common = {"chunk_size": 128, "threads": 2, "batch_size": 32}

    emb = Settings(home=home / "embedded", mode="embedded", **common)  # type: ignore[arg-type]
    publish(open_store(emb.resolved_store_uri, create=True), card, onnx_path)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    report = run_batch(emb, src.as_uri(), [args.model], batch_id="bench-emb")
    embedded_s = time.perf_counter() - t0
    images = report["batch"]["n_accepted"]
    use_settings(None)

    stack = LocalStack(
        home / "stack",
        extra_env={
            **{f"KIBAN_{k.upper()}": str(v) for k, v in common.items()},
            # distributed workers read file:// sources only under the allowed roots
            "KIBAN_ALLOWED_ROOTS": str(home),
        },
    )
    rows = []
    try:
        stack.start_servers()
        os.environ.update(stack.env)
        env = {k[6:].lower(): v for k, v in stack.env.items() if k.startswith("KIBAN_")}
        dist = Settings(**{**env, **common, "home": str(home / "client")})  # type: ignore[arg-type]
        publish(
            open_store(dist.resolved_store_uri, dist.s3_endpoint_url, create=True), card, onnx_path
        )  # type: ignore[arg-type]
        stack.start_worker("ingest")
        stack.start_worker("indexer")
        for n_enc in (1, 2):
            stack.start_worker("encoder", f"encoder-{n_enc - 1}")
            time.sleep(3)  # let the worker connect before timing
            t0 = time.perf_counter()
            run_batch(
                dist,
                src.as_uri(),
                [args.model],
                batch_id=f"bench-dist-{n_enc}",
                timeout=3600,
                poll_seconds=0.2,
            )
            seconds = time.perf_counter() - t0
            rows.append((n_enc, seconds))

        # queue overhead: one small real task at a time through the broker
        overheads = []
        log = stack.procs["indexer"]
        for i in range(20):
            dest = home / "exports" / str(i)
            target = dest / "bench-dist-1" / "0001" / "report.md"
            mark = len(log.log())
            t0 = time.perf_counter()
            dispatch(ExportReport(batch_id="bench-dist-1", destination=dest.as_uri()), dist)
            while not target.exists():
                time.sleep(0.001)
            wall = time.perf_counter() - t0
            time.sleep(0.05)
            ran = re.findall(r"export_report\[[^\]]+\] succeeded in ([0-9.]+)s", log.log()[mark:])
            overheads.append(wall - float(ran[-1]) if ran else wall)
    finally:
        stack.stop()

    print("\n## Distributed vs embedded, same batch, same machine")
    print(
        f"{images} images ({'NEU' if NEU.is_dir() else 'synthetic'}), model {args.model}, "
        f"{os.cpu_count()} cores"
    )
    print("| run | seconds | img/s | ratio vs embedded |")
    print("|---|---|---|---|")
    print(f"| embedded (in-process) | {embedded_s:.1f} | {images / embedded_s:.1f} | 1.00 |")
    for n_enc, seconds in rows:
        print(
            f"| distributed, {n_enc} encoder process{'es' if n_enc > 1 else ''} | {seconds:.1f} "
            f"| {images / seconds:.1f} | {embedded_s / seconds:.2f} |"
        )
    print(
        f"\nqueue overhead per task (median of {len(overheads)}): "
        f"{statistics.median(overheads) * 1000:.1f} ms "
        f"(p90 {sorted(overheads)[int(0.9 * len(overheads))] * 1000:.1f} ms)"
    )


if __name__ == "__main__":
    main()
