"""Ingest fanned out (issue 12): memory per worker, workers added, time to the first chunk.

All on the synthetic source (``synthetic://textures?n=N&classes=8&size=S``, images generated
from the key), through the real distributed stack (redis-server, SeaweedFS, ``python -m
kiban.worker`` processes), side by side in one run:

(1) Peak RSS of each ingest worker process (``VmHWM``) for n = 100k vs n = 1M, from the
    trigger until the planner has listed the whole source (``ingest/listing.json``) plus
    ``--settle`` seconds — the stage whose work grows with n (listing, pages, messages) is
    complete, the validation and reduce are measured over the same wall time. Workers are
    fresh processes for each n. Target: within 10 %.
(1b) The same peak RSS over a WHOLE ingest (listed, validated, reduced, batch.json written)
    of n = 10k vs 100k, 2 workers — (1) at 1M would take about an hour here.
(2) Ingest throughput (listed images / s from the trigger to batch.json) with 1 and with 2
    ingest worker processes on the same ``--images`` images, interleaved 1, 2, 1, 2, pages
    of ``--page-size`` (default 1,000, the setting's default; at 100 per page the per-page
    store round trips dominate: 0.91 measured). The images are the synthetic source's,
    written once to a folder: what is timed
    is ingest (read, sha256, validate, de-duplicate), not the generator, whose per-process
    texture bank would be paid once more by the second process.
(3) Time from the trigger to the first encoded chunk (its shard written by an encoder
    worker) for n = 100k vs n = 1M: must be flat, not proportional to n.

Usage: python bench/bench_ingest.py [--quick] [--images 24000] [--page-size 1000] [--no-full]
       [--only-throughput] [--size 224]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def synthetic(n: int, size: int) -> str:
    return f"synthetic://textures?n={n}&classes=8&size={size}"


def hwm_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Stack:
    """A fresh LocalStack with ``ingest`` ingest workers (and an encoder if asked)."""

    def __init__(self, home: Path, ingest: int, encoder: bool, page_size: int) -> None:
        from kiban.celery_app import configure
        from kiban.store import open_store
        from kiban_cli.stack import LocalStack

        self.stack = LocalStack(
            home,
            extra_env={
                "KIBAN_THREADS": "1",
                "KIBAN_INGEST_PAGE_SIZE": str(page_size),
                "KIBAN_ALLOWED_ROOTS": str(home.parent),  # the materialised images of (2)
            },
        )
        self.stack.start_servers()
        os.environ.update(self.stack.env)
        self.ingest = [self.stack.start_worker("ingest", f"ingest-{i}") for i in range(ingest)]
        if encoder:
            self.stack.start_worker("encoder", "encoder")
        env = {k[6:].lower(): v for k, v in self.stack.env.items() if k.startswith("KIBAN_")}
        env["home"] = str(home / "client")
        from kiban.settings import Settings, use_settings

        self.settings = Settings(**env)  # type: ignore[arg-type]
        use_settings(self.settings)
        configure(self.settings)
        self.store = open_store(
            self.settings.resolved_store_uri, self.settings.s3_endpoint_url, create=True
        )
        time.sleep(3)  # workers connected

    def trigger(self, batch: str, source: str, models: list[str], chunk_size: int) -> float:
        from kiban.messages import IngestBatch, RunPlan
        from kiban.workflow import dispatch

        msg = IngestBatch(
            batch_id=batch,
            source=source,
            chunk_size=chunk_size,
            plan=RunPlan(models=models, evaluate=False),
        )
        t0 = time.monotonic()
        dispatch(msg, self.settings)
        return t0

    def wait(self, key: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while not self.store.exists(key):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{key} not written in {timeout:.0f}s")
            time.sleep(0.05)
        return time.monotonic()

    def stop(self) -> None:
        for proc in self.stack.procs.values():
            if proc.name.startswith(("ingest", "encoder")):
                proc.kill()  # do not let a 1M-image batch finish
        self.stack.stop()


_EXPORTED: list[tuple[object, Path]] = []


def publish_model(store: object, home: Path) -> str:
    """effnet-lite0 exported once per bench run, published into each stack's store."""
    from kiban.models.registry import publish
    from kiban_cli.synthetic import sample_images
    from kiban_export import export_model

    if not _EXPORTED:
        out = home / "export"
        out.mkdir(parents=True, exist_ok=True)
        _EXPORTED.append(
            export_model("efficientnet-lite0", "effnet-lite0", None, out, sample_images(4))
        )
    card, path = _EXPORTED[0]
    publish(store, card, path)  # type: ignore[arg-type]
    return "effnet-lite0"


def materialise(uri: str, folder: Path) -> Path:
    """The synthetic source's objects written as files (same keys, same bytes)."""
    from kiban.store import open_store

    source = open_store(uri)
    for info in source.list():
        path = folder / info.key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(source.get(info.key))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--images", type=int, default=24000, help="(2): images per run")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--settle", type=float, default=20.0, help="(1): seconds after the listing")
    ap.add_argument("--only-throughput", action="store_true", help="(2) alone")
    ap.add_argument("--page-size", type=int, default=1000, help="(2): listing entries per page")
    ap.add_argument("--no-full", action="store_true", help="skip (1b), the whole ingest")
    args = ap.parse_args()
    small, large = (2_000, 20_000) if args.quick else (100_000, 1_000_000)
    images = 300 if args.quick else args.images
    root = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    from kiban.records import batch_prefix
    from kiban.shards import meta_key

    print("AMD EPYC, 2 cores, shared with other jobs; synthetic JPEGs of "
          f"{args.size}x{args.size}, 8 classes; page size 1,000; chunk size 256\n")  # fmt: skip

    # (1) + (3): one fresh stack (2 ingest workers, 1 encoder) per n
    model_home = root / "model"
    rss: dict[int, list[float]] = {}
    first: dict[int, float] = {}
    listed: dict[int, float] = {}
    for n in () if args.only_throughput else (small, large):
        st = Stack(root / f"n{n}", ingest=2, encoder=True, page_size=1000)
        try:
            model = publish_model(st.store, model_home)
            batch = f"rss-{n}"
            t0 = st.trigger(batch, synthetic(n, args.size), [model], 256)
            first[n] = st.wait(meta_key(model, batch, 0), 900) - t0
            listed[n] = st.wait(f"{batch_prefix(batch)}/ingest/listing.json", 3600) - t0
            time.sleep(args.settle)
            rss[n] = [hwm_mb(p.pid) for p in st.ingest]
        finally:
            st.stop()
        print(f"n={n:,}: first chunk encoded {first[n]:.1f} s after the trigger; listing "
              f"done at {listed[n]:.1f} s; ingest workers' peak RSS "
              f"{', '.join(f'{m:.0f} MB' for m in rss[n])}", flush=True)  # fmt: skip

    # (1b): the whole ingest (list, validate, reduce, batch.json) at 10x the size
    full_rss: dict[int, list[float]] = {}
    full_s: dict[int, float] = {}
    for n in () if args.only_throughput or args.no_full else (small // 10, large // 10):
        st = Stack(root / f"full{n}", ingest=2, encoder=False, page_size=1000)
        try:
            batch = f"full-{n}"
            t0 = st.trigger(batch, synthetic(n, args.size), [], 256)
            full_s[n] = st.wait(f"{batch_prefix(batch)}/batch.json", 7200) - t0
            full_rss[n] = [hwm_mb(p.pid) for p in st.ingest]
        finally:
            st.stop()
        print(f"n={n:,}: whole ingest in {full_s[n]:.1f} s; ingest workers' peak RSS "
              f"{', '.join(f'{m:.0f} MB' for m in full_rss[n])}", flush=True)  # fmt: skip

    # (2): 1 vs 2 ingest workers, interleaved, same images
    folder = materialise(synthetic(images, args.size), root / "images")
    rates: dict[int, list[float]] = {1: [], 2: []}
    for rep, workers in enumerate((1, 2, 1, 2)):
        st = Stack(
            root / f"w{workers}-{rep}", ingest=workers, encoder=False, page_size=args.page_size
        )
        try:
            batch = f"tp-{rep}"
            t0 = st.trigger(batch, folder.as_uri(), [], 256)
            seconds = st.wait(f"{batch_prefix(batch)}/batch.json", 1800) - t0
        finally:
            st.stop()
        rates[workers].append(images / seconds)
        print(f"{workers} ingest worker(s): {images} images in {seconds:.1f} s "
              f"({images / seconds:.0f} img/s)", flush=True)  # fmt: skip

    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print("\n| measure | value |\n|---|---|")
    print(f"| ingest throughput, 1 worker ({images} images) | {one:.0f} img/s |")
    print(f"| ingest throughput, 2 workers | {two:.0f} img/s |")
    print(f"| throughput ratio 2 / 1 workers (must not fall below 1) | {two / one:.2f} |")
    if args.only_throughput:
        return
    peak = {n: max(v) for n, v in rss.items()}
    print(f"| peak RSS per ingest worker, n={small:,} | {peak[small]:.0f} MB |")
    print(f"| peak RSS per ingest worker, n={large:,} | {peak[large]:.0f} MB |")
    print(f"| RSS ratio {large:,} / {small:,} (target <= 1.10) | {peak[large] / peak[small]:.3f} |")
    if full_rss:
        lo, hi = sorted(full_rss)
        a, b = max(full_rss[lo]), max(full_rss[hi])
        print(f"| whole ingest, peak RSS per worker, n={lo:,} / n={hi:,} | {a:.0f} / {b:.0f} MB |")
        print(f"| whole-ingest RSS ratio {hi:,} / {lo:,} (target <= 1.10) | {b / a:.3f} |")
        print(
            f"| whole ingest, n={hi:,}, 2 workers | {full_s[hi]:.0f} s "
            f"({hi / full_s[hi]:.0f} img/s) |"
        )
    print(f"| trigger to first encoded chunk, n={small:,} | {first[small]:.1f} s |")
    print(f"| trigger to first encoded chunk, n={large:,} | {first[large]:.1f} s |")
    print(
        f"| first-chunk ratio {large:,} / {small:,} (flat: ~1) | "
        f"{first[large] / first[small]:.2f} |"
    )


if __name__ == "__main__":
    main()
