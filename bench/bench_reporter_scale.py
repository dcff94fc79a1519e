"""Reporter peak memory at scale: a 1M-vector batch vs a 100k one, 10k sampled queries each.

Issue 12's target: above ``KIBAN_EVAL_EXACT_MAX_VECTORS`` the reporter evaluates a seeded,
class-stratified query sample exactly against the full index, streaming the shards, so its
peak RSS is bounded by the chunk (one shard, the queries, one similarity block), not by the
batch: 1M and 100k vectors should need about the same memory.

Each batch is written with kiban's real writers into a FileStore under a temp dir: the
chunk plan in ``batch.json``, labels in the chunk record files (no ``records.jsonl``: the
streamed path must not read it), random L2-normalised float32 vectors (D = 512) as shards
(``kiban.shards.write_shard``), a model card. ``evaluate_batch`` then runs in a fresh
subprocess which reports its wall time and ``ru_maxrss``. As a contrast the in-memory path
(every vector and record loaded, the same 10k query sample) runs on the 100k batch.
The temp data is deleted afterwards.

Run: ``python bench/bench_reporter_scale.py`` (``--quick``: 20k vs 50k vectors, 2k queries;
``--all-vs-all 60000``: the in-memory all-vs-all the default threshold was chosen from).
Numbers are machine-dependent; they are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from kiban.context import Context
from kiban.messages import EvaluateBatch, EvaluationProtocol
from kiban.models.card import ModelCard, Preprocessing
from kiban.models.registry import card_key
from kiban.records import (
    BatchInfo,
    ChunkPlan,
    ImageRecord,
    batch_prefix,
    chunk_records_key,
    dump_jsonl,
)
from kiban.settings import Settings
from kiban.shards import ShardMeta, write_shard
from kiban.store import open_store
from kiban_reporter.evaluation import evaluate_batch

DIM = 512
CLASSES = 10


def _card(name: str, dim: int) -> ModelCard:
    return ModelCard(
        name=name,
        family="foundation",
        source="bench",
        architecture="bench",
        weights="random",
        pretrained=True,
        input_size=224,
        preprocessing=Preprocessing(resize_shorter=256, crop=224, mean=[0.5] * 3, std=[0.5] * 3),
        embedding_dim=dim,
        params=1,
        file_size=1,
        sha256="0" * 64,
        opset=17,
        exported_at="2026-11-29T00:00:00Z",
    )


def build_batch(
    root: Path, n: int, chunk: int, dim: int, seed: int, with_records: bool, models: int = 1
) -> str:
    """Write an n-image labelled batch with ``models`` models' shards; returns the store URI.

    Vectors are noise plus a class centre (model i weaker than model i-1), normalised, so
    the models differ and the paired comparison has something to say.
    """
    store = open_store((root / "store").as_uri(), create=True)
    rng = np.random.default_rng(seed)
    chunks = [
        ChunkPlan(index=i, start=s, stop=min(s + chunk, n))
        for i, s in enumerate(range(0, n, chunk))
    ]
    centres = np.random.default_rng(0).standard_normal((CLASSES, dim), dtype=np.float32)
    cards = [_card(f"m{dim}-{i + 1}", dim) for i in range(models)]
    for card in cards:
        store.put(card_key(card.name), card.model_dump_json().encode())
    all_lines: list[bytes] = []
    for plan in chunks:
        size = plan.stop - plan.start
        labels = rng.integers(0, CLASSES, size)
        records = [
            ImageRecord(
                key=f"img/{plan.start + j:08d}.png",
                sha256=f"{plan.start + j:064x}",
                label=f"class-{labels[j]}",
                width=224,
                height=224,
            )
            for j in range(size)
        ]
        data = dump_jsonl(records)
        store.put(chunk_records_key("bench", plan.index), data)
        if with_records:
            all_lines.append(data)
        for i, card in enumerate(cards):
            vec = rng.standard_normal((size, dim), dtype=np.float32)
            vec += (0.12 - 0.02 * i) * centres[labels]
            vec /= np.linalg.norm(vec, axis=1, keepdims=True)
            meta = ShardMeta(
                model=card.name,
                model_sha256=card.sha256,
                batch_id="bench",
                chunk=plan.index,
                n_images=size,
                failures=[],
                embedding_dim=dim,
                provider="CPUExecutionProvider",
                threads=1,
                batch_size=32,
                wall_seconds=1.0,
                inference_seconds=1.0,
                cores=1,
                device="cpu (bench)",
            )
            keys = [r.key for r in records]
            write_shard(store, meta, [r.sha256 for r in records], keys, vec)
    prefix = batch_prefix("bench")
    if with_records:
        store.put(f"{prefix}/records.jsonl", b"".join(all_lines))
    store.put(f"{prefix}/quarantine.jsonl", b"")
    info = BatchInfo(
        batch_id="bench",
        source="file:///bench",
        label_source="manifest",
        n_listed=n,
        n_accepted=n,
        n_quarantined=0,
        n_duplicates=0,
        labelled=True,
        classes=[f"class-{c}" for c in range(CLASSES)],
        chunks=chunks,
        created_at="2026-11-29T00:00:00+00:00",
    )
    store.put(f"{prefix}/batch.json", info.model_dump_json().encode())
    return store.uri


def child(store_uri: str, home: str, exact_max: int, sample: int, models: int) -> None:
    """Run one evaluation and print its wall time and peak RSS as JSON (sample 0: all)."""
    settings = Settings(home=Path(home), store_uri=store_uri, eval_exact_max_vectors=exact_max)
    ctx = Context(settings=settings, store=open_store(store_uri))
    msg = EvaluateBatch(
        batch_id="bench",
        models=[f"m{DIM}-{i + 1}" for i in range(models)],
        protocol=EvaluationProtocol(
            name="leave-one-out", query_sample=sample or None, ann_check_queries=0
        ),
    )
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    report = evaluate_batch(msg, ctx)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    search = report.protocol.search
    f1 = [
        m.retrieval.at(5).mv_macro_f1.value if m.retrieval is not None else None
        for m in report.models
    ]
    print(
        json.dumps(
            {
                "wall_s": wall,
                "peak_rss_mb": peak / 1024,
                "rss_before_mb": base / 1024,
                "mode": search.mode if search else None,
                "statement": search.statement if search else None,
                "n_queries": report.protocol.n_queries,
                "mv5_f1": f1,
                "verdicts": report.verdicts,
            }
        )
    )


def run_child(store_uri: str, home: Path, exact_max: int, sample: int, models: int) -> dict:
    """``child`` in a fresh interpreter, so ru_maxrss is this evaluation's alone."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", store_uri, str(home)]
        + [str(exact_max), str(sample), str(models)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "KIBAN_LOG_LEVEL": "WARNING"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--chunk", type=int, default=10_000)
    ap.add_argument("--models", type=int, default=1, help="models (2: the paired path too)")
    ap.add_argument("--child", nargs=5, metavar=("STORE", "HOME", "EXACT_MAX", "SAMPLE", "MODELS"))
    ap.add_argument(
        "--all-vs-all",
        type=int,
        metavar="N",
        help="instead: in-memory all-vs-all on an N-vector batch (how the default "
        "KIBAN_EVAL_EXACT_MAX_VECTORS was chosen)",
    )
    args, _ = ap.parse_known_args()
    if args.child:
        store_uri, home, exact_max, sample, models = args.child
        child(store_uri, home, int(exact_max), int(sample), int(models))
        return 0
    if args.all_vs_all:
        root = Path(tempfile.mkdtemp(prefix="kiban-bench-reporter-"))
        try:
            n = args.all_vs_all
            uri = build_batch(root, n, args.chunk, DIM, seed=1, with_records=True)
            res = run_child(uri, root / "home", n, 0, 1)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print(
            f"all-vs-all in memory, {n:,} x {DIM}, one model: {res['wall_s']:.1f} s, "
            f"peak RSS {res['peak_rss_mb']:.0f} MB, {res['n_queries']:,} queries"
        )
        return 0
    small, large, sample = (20_000, 50_000, 2_000) if args.quick else (100_000, 1_000_000, 10_000)
    exact_max = small // 2  # both sizes above the threshold: both streamed
    rows = []
    for n, in_memory_too in ((small, True), (large, False)):
        root = Path(tempfile.mkdtemp(prefix="kiban-bench-reporter-"))
        try:
            uri = build_batch(root, n, args.chunk, DIM, n, in_memory_too, args.models)
            disk = sum(p.stat().st_size for p in (root / "store").rglob("*") if p.is_file())
            res = run_child(uri, root / "home", exact_max, sample, args.models)
            rows.append((n, "streamed", res, disk))
            if in_memory_too:
                res = run_child(uri, root / "home", n, sample, args.models)
                rows.append((n, "in memory", res, disk))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print(
        f"\nReporter peak RSS, D = {DIM}, {sample:,} sampled queries, chunks of {args.chunk:,}, "
        f"{args.models} model(s), leave-one-out (AMD EPYC, 2 cores, shared)\n"
    )
    print("| vectors | path | peak RSS MB | wall s | queries | store on disk MB | MV@5 macro-F1 |")
    print("|---|---|---|---|---|---|---|")
    for n, path, res, disk in rows:
        f1 = ", ".join(f"{x:.4f}" for x in res["mv5_f1"] if x is not None)
        print(
            f"| {n:,} | {path} | {res['peak_rss_mb']:.0f} | {res['wall_s']:.1f} | "
            f"{res['n_queries']:,} | {disk / 2**20:.0f} | {f1} |"
        )
    streamed = {n: res for n, path, res, _ in rows if path == "streamed"}
    ratio = streamed[large]["peak_rss_mb"] / streamed[small]["peak_rss_mb"]
    print(
        f"\nstreamed peak RSS {large:,} / {small:,} vectors: {ratio:.2f}x "
        f"(the batch is {large // small}x larger); statement at {large:,}: "
        f"{streamed[large]['statement']}"
    )
    for verdict in streamed[large]["verdicts"]:
        print(f"verdict at {large:,}: {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
