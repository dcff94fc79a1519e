"""Evaluation at scale: the streamed search and report equal the in-memory ones exactly.

Vectors have four non-zero entries of ±0.5 (unit norm, every dot product a multiple of 0.25,
exact in float32 whatever the summation order), so there are many exact ties and "equal"
means bit for bit: indices, similarities, candidate counts, then every metric of the report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kiban.context import Context
from kiban.messages import EvaluateBatch, EvaluationProtocol
from kiban.models.card import ModelCard, Preprocessing, TrainingProvenance
from kiban.models.registry import card_key, publish_training_set
from kiban.records import (
    BatchInfo,
    ChunkPlan,
    ImageRecord,
    batch_prefix,
    dump_jsonl,
    write_chunk_records,
)
from kiban.settings import Settings
from kiban.shards import ShardMeta, write_shard
from kiban.store import open_store
from kiban_reporter.evaluation import evaluate_batch
from kiban_reporter.html import render_html
from kiban_reporter.markdown import render_markdown
from kiban_reporter.metrics.knn import exact_knn
from kiban_reporter.metrics.knn_stream import StreamedKnn, merge_topk
from kiban_reporter.protocols import stratified_sample, stratified_sample_codes

DIM = 16


def _tie_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    v = np.zeros((n, DIM), np.float32)
    for i in range(n):
        cols = rng.choice(6, size=4, replace=False)  # few columns: many identical vectors
        v[i, cols] = rng.choice([-0.5, 0.5], size=4)
    return v


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("k", [1, 5, 12])
def test_streamed_knn_equals_exact_knn_on_the_whole_matrix(grouped: bool, k: int) -> None:
    rng = np.random.default_rng(k + 10 * grouped)
    n = 90
    vec = _tie_vectors(rng, n)
    groups = rng.integers(0, 12, n) if grouped else np.arange(n)
    cand = rng.random(n) < 0.85
    queries = np.sort(rng.choice(n, 25, replace=False))
    want = exact_knn(vec, k, queries, np.flatnonzero(cand), groups if grouped else None)
    stream = StreamedKnn(queries, vec[queries], groups[queries], k, block_size=7)
    for lo, hi in [(0, 4), (4, 31), (31, 32), (32, 32), (32, 77), (77, 90)]:  # uneven shards
        rows = np.arange(lo, hi)
        stream.add(rows, vec[lo:hi], groups[lo:hi], cand[lo:hi])
    got = stream.result()
    assert got.query_rows.tolist() == want.query_rows.tolist()
    assert got.indices.tolist() == want.indices.tolist()
    assert got.sims.tolist() == want.sims.tolist()
    assert got.n_candidates.tolist() == want.n_candidates.tolist()
    assert (got.indices == -1).any() == (want.indices == -1).any()


def test_shards_out_of_row_order_are_refused() -> None:
    vec = _tie_vectors(np.random.default_rng(0), 6)
    stream = StreamedKnn([0], vec[:1], [0], 2)
    stream.add(np.arange(3, 6), vec[3:], np.arange(3, 6), np.ones(3, bool))
    with pytest.raises(ValueError, match="ascending"):
        stream.add(np.arange(0, 3), vec[:3], np.arange(3), np.ones(3, bool))


def test_merge_keeps_similarity_then_row_order() -> None:
    idx, sims = merge_topk(
        np.array([[5, 9, -1]]),
        np.array([[0.5, 0.25, -np.inf]], np.float32),
        np.array([[2, 7, 8]]),
        np.array([[0.5, 0.5, 0.25]], np.float32),
        4,
    )
    assert idx.tolist() == [[2, 5, 7, 8]]
    assert sims.tolist() == [[0.5, 0.5, 0.5, 0.25]]


def _reference_sample(labels: list[str], n: int, seed: int) -> tuple[list[int], dict[str, int]]:
    """The list-based sampler as it was before the code-based one (issue 12), kept as the
    reference: the in-memory path's samples must not change."""
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    classes = sorted(by_class)
    if n >= len(labels):
        return list(range(len(labels))), {c: len(by_class[c]) for c in classes}
    rng = np.random.default_rng(seed)
    if n < len(classes):
        picked = sorted(rng.choice(len(classes), size=n, replace=False).tolist())
        quota = {c: (1 if i in picked else 0) for i, c in enumerate(classes)}
    else:
        weights = {c: len(by_class[c]) - 1 for c in classes}
        total, wsum = n - len(classes), sum(weights.values())
        exact = {c: total * w / wsum if wsum else 0.0 for c, w in weights.items()}
        extra = {c: int(np.floor(v)) for c, v in exact.items()}
        left = total - sum(extra.values())
        for c in sorted(weights, key=lambda c: (-(exact[c] - extra[c]), c))[:left]:
            extra[c] += 1
        quota = {c: 1 + extra[c] for c in classes}
    chosen: list[int] = []
    for c in classes:
        if quota[c]:
            members = np.asarray(by_class[c], dtype=np.int64)
            chosen.extend(rng.choice(members, size=quota[c], replace=False).tolist())
    return sorted(chosen), {c: quota[c] for c in classes if quota[c]}


@pytest.mark.parametrize("n", [1, 2, 3, 7, 40, 200, 500])
def test_sampling_codes_draws_the_same_queries_as_before(n: int) -> None:
    rng = np.random.default_rng(n)
    labels = [f"c{x}" for x in rng.integers(0, 5, 300)] + ["rare"]
    classes = sorted(set(labels))
    codes = np.array([classes.index(x) for x in labels])
    want, want_per_class = _reference_sample(labels, n, seed=3)
    picked, per_class = stratified_sample(labels, n, seed=3)
    got, got_per_class = stratified_sample_codes(codes, classes, n, seed=3)
    assert picked.tolist() == got.tolist() == want
    assert per_class == got_per_class == want_per_class


# --- a small batch in a real file store, evaluated in memory and streamed -----------------


def _card(name: str) -> ModelCard:
    return ModelCard(
        name=name,
        family="foundation",
        source="test",
        architecture="test",
        weights="w",
        pretrained=True,
        input_size=8,
        preprocessing=Preprocessing(resize_shorter=8, crop=8, mean=[0.5] * 3, std=[0.5] * 3),
        embedding_dim=DIM,
        params=1,
        file_size=1,
        sha256="0" * 64,
        opset=17,
        exported_at="2026-11-28T00:00:00Z",
    )


SIZES = [17, 13, 20, 1, 9]  # five chunks of uneven size


def _batch(tmp_path: Path, grouped: bool = True, splits: bool = False) -> Context:
    """Two models; model ``b`` failed two images of chunk 2 (left out of both).

    ``splits``: manifest splits (test / train, some images without one).
    """
    store = open_store((tmp_path / "store").as_uri(), create=True)
    rng = np.random.default_rng(7)
    n = sum(SIZES)
    records = [
        ImageRecord(
            key=f"img/{i:04d}.png",
            sha256=f"{i:064x}",
            label=None if i % 11 == 5 else f"class-{rng.integers(0, 3)}",
            group=(None if i % 7 == 3 else f"g{i % 9}") if grouped else None,
            split=(None if i % 13 == 1 else ("test" if i % 4 == 0 else "train"))
            if splits
            else None,
            width=8,
            height=8,
        )
        for i in range(n)
    ]
    chunks, start = [], 0
    for index, size in enumerate(SIZES):
        chunks.append(ChunkPlan(index=index, start=start, stop=start + size))
        start += size
    info = BatchInfo(
        batch_id="night",
        source="file:///src",
        label_source="manifest",
        n_listed=n,
        n_accepted=n,
        n_quarantined=0,
        n_duplicates=0,
        labelled=True,
        classes=sorted({r.label for r in records if r.label}),
        chunks=chunks,
        created_at="2026-11-29T00:00:00+00:00",
    )
    prefix = batch_prefix("night")
    store.put(f"{prefix}/batch.json", info.model_dump_json().encode())
    store.put(f"{prefix}/records.jsonl", dump_jsonl(records))
    store.put(f"{prefix}/quarantine.jsonl", b"")
    write_chunk_records(store, "night", records, chunks)
    for model in ("a", "b"):
        store.put(card_key(model), _card(model).model_dump_json().encode())
        vec = _tie_vectors(rng, n)
        for plan in chunks:
            part = records[plan.start : plan.stop]
            failed = [r.key for r in part[:2]] if (model == "b" and plan.index == 2) else []
            keep = [j for j, r in enumerate(part) if r.key not in failed]
            order = keep[::-1]  # a shard need not be in key order
            meta = ShardMeta(
                model=model,
                model_sha256="0" * 64,
                batch_id="night",
                chunk=plan.index,
                n_images=len(order),
                failures=[(k, "decode error") for k in failed],
                embedding_dim=DIM,
                provider="CPUExecutionProvider",
                threads=1,
                batch_size=8,
                wall_seconds=0.5,
                inference_seconds=0.25,
                batch_seconds=[0.25],
                cores=1,
                device="cpu (test)",
            )
            write_shard(
                store,
                meta,
                [part[j].sha256 for j in order],
                [part[j].key for j in order],
                vec[plan.start : plan.stop][order],
            )
    settings = Settings(home=tmp_path / "home", store_uri=store.uri)
    return Context(settings=settings, store=store)


def _with(ctx: Context, **update: object) -> Context:
    return Context(settings=ctx.settings.model_copy(update=update), store=ctx.store)


@pytest.mark.parametrize(
    ("protocol", "grouped", "splits"),
    [
        ("auto", True, False),
        ("leave-one-out", True, False),
        ("auto", False, False),
        ("split", True, False),  # hash rule over groups
        ("split", False, True),  # manifest splits
    ],
)
def test_streamed_report_equals_the_in_memory_one_with_the_same_sample(
    tmp_path: Path, protocol: str, grouped: bool, splits: bool
) -> None:
    ctx = _batch(tmp_path, grouped, splits)
    sample = 12 if protocol == "split" else 25
    proto = EvaluationProtocol(
        name=protocol, query_sample=sample, seed=4, bootstrap=200, test_fraction=0.4
    )
    msg = EvaluateBatch(batch_id="night", models=["a", "b"], k=[1, 3, 5], protocol=proto)
    memory = evaluate_batch(msg, ctx)
    streamed = evaluate_batch(msg, _with(ctx, eval_exact_max_vectors=10))

    assert memory.protocol.search is not None and memory.protocol.search.mode == "in-memory"
    assert streamed.protocol.search is not None and streamed.protocol.search.mode == "streamed"
    assert streamed.protocol.search.n_shards == len(SIZES)
    assert streamed.protocol.query_sample is not None
    assert streamed.protocol.query_sample.size == sample
    assert (streamed.protocol.split is not None) == (protocol == "split")
    if streamed.protocol.split is not None:
        assert streamed.protocol.split.source == ("manifest" if splits else "hash")
        assert streamed.protocol.split.n_without_split == (5 if splits else 0)  # i % 13 == 1
        assert streamed.protocol.n_candidates > 0
    skip = {"search"}
    assert streamed.protocol.model_dump(exclude=skip) == memory.protocol.model_dump(exclude=skip)
    for mine, theirs in zip(streamed.models, memory.models, strict=True):
        assert mine.retrieval is not None
        assert mine.retrieval.model_dump() == theirs.retrieval.model_dump()  # type: ignore[union-attr]
        assert mine.model_dump(exclude={"ann_check"}) == theirs.model_dump(exclude={"ann_check"})
    assert [p.model_dump() for p in streamed.comparisons] == [
        p.model_dump() for p in memory.comparisons
    ]
    assert streamed.verdicts == memory.verdicts
    assert streamed.decision == memory.decision
    assert memory.learning_curves is not None and streamed.learning_curves is None

    statement = streamed.protocol.search.statement
    assert statement.startswith(f"{sample} sampled queries of ")
    assert "exact against the full index (streamed over 5 shards" in statement
    assert f"- search: {statement}" in render_markdown(streamed)
    assert f"<li>search: {statement}</li>" in render_html(streamed)
    assert f"evaluation at scale: {statement}" in streamed.warnings
    assert any(w.startswith("learning curves: not computed") for w in streamed.warnings)
    assert any("ANN check skipped" in w for w in streamed.warnings)
    # every other warning is the in-memory path's
    others = [w for w in streamed.warnings if "at scale" not in w and "learning curves" not in w]
    assert [w for w in others if "ANN check" not in w] == [
        w for w in memory.warnings if "ANN check" not in w
    ]


def test_leakage_check_is_the_same_streamed(tmp_path: Path) -> None:
    """Model b trained on some of the batch: those queries leave both models, in both paths."""
    ctx = _batch(tmp_path)
    training = TrainingProvenance(
        mode="head",
        base_model="a",
        base_source="x",
        batches=["old"],
        split="all",
        training_set_sha256="0" * 64,
        n_images=6,
        images_per_class={"class-0": 6},
        objective="arcface",
        epochs=1,
        seed=0,
        loss_per_epoch=[1.0],
        wall_seconds=1.0,
        device="cpu",
    )
    card = _card("b").model_copy(update={"training": training})
    publish_training_set(ctx.store, "b", [f"{i:064x}" for i in range(0, 60, 5)])
    ctx.store.put(card_key("b"), card.model_dump_json().encode())
    proto = EvaluationProtocol(query_sample=30, seed=1, bootstrap=50)
    msg = EvaluateBatch(batch_id="night", models=["a", "b"], protocol=proto)
    memory = evaluate_batch(msg, ctx)
    streamed = evaluate_batch(msg, _with(ctx, eval_exact_max_vectors=10))
    assert memory.leakage and memory.leakage[0].overlap_queries > 0
    assert [c.model_dump() for c in streamed.leakage] == [c.model_dump() for c in memory.leakage]
    assert streamed.protocol.n_queries == memory.protocol.n_queries < 30
    for mine, theirs in zip(streamed.models, memory.models, strict=True):
        assert mine.retrieval is not None and theirs.retrieval is not None
        assert mine.retrieval.model_dump() == theirs.retrieval.model_dump()


def test_streamed_path_reads_chunk_records_not_records_jsonl(tmp_path: Path) -> None:
    ctx = _batch(tmp_path)
    ctx.store.delete(f"{batch_prefix('night')}/records.jsonl")
    msg = EvaluateBatch(batch_id="night", models=["a"], protocol=EvaluationProtocol(bootstrap=0))
    report = evaluate_batch(msg, _with(ctx, eval_exact_max_vectors=10, eval_sample_queries=12))
    assert report.protocol.query_sample is not None
    assert report.protocol.query_sample.requested == 12  # the setting, no query_sample asked
    assert report.protocol.n_queries == 12
    assert report.models[0].retrieval is not None
    assert report.models[0].retrieval.n_queries == 12


def test_cross_batch_at_scale_is_not_scored_and_says_why(tmp_path: Path) -> None:
    ctx = _batch(tmp_path)
    msg = EvaluateBatch(
        batch_id="night", models=["a", "b"], protocol=EvaluationProtocol(name="cross-batch")
    )
    report = evaluate_batch(msg, _with(ctx, eval_exact_max_vectors=10))
    assert all(m.retrieval is None for m in report.models)
    assert report.protocol.name == "none"
    assert any(
        w.startswith("protocol cross-batch is not evaluated above KIBAN_EVAL_EXACT_MAX_VECTORS")
        for w in report.warnings
    )
    assert report.models[1].images_encoded == sum(SIZES) - 2  # cost and counts still reported


def test_chunks_out_of_key_order_are_refused_by_name(tmp_path: Path) -> None:
    ctx = _batch(tmp_path)
    info_key = f"{batch_prefix('night')}/batch.json"
    info = BatchInfo.model_validate_json(ctx.store.get(info_key))
    swapped = [info.chunks[1], info.chunks[0], *info.chunks[2:]]
    swapped = [
        ChunkPlan(index=c.index, start=s.start, stop=s.stop)
        for c, s in zip(swapped, info.chunks, strict=True)
    ]
    ctx.store.put(info_key, info.model_copy(update={"chunks": swapped}).model_dump_json().encode())
    msg = EvaluateBatch(batch_id="night", models=["a"])
    with pytest.raises(ValueError, match="chunk 0 starts at key"):
        evaluate_batch(msg, _with(ctx, eval_exact_max_vectors=10))
