"""Encoder session options (issue 11): threads for the usable cores, recorded per shard, and
the GPU-only paths (TensorRT options and engine cache, IO binding) built without a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kiban.settings import Settings
from kiban.shards import ShardMeta
from kiban_encoder import session as sess

SHA = "ab" * 32


@pytest.mark.parametrize(
    ("threads", "decode", "usable", "intra", "spinning"),
    [
        (0, 2, 16, 14, True),  # the decode threads get their own cores
        (0, 2, 8, 6, True),
        (0, 2, 4, 2, True),
        (0, 8, 4, 1, False),  # never fewer than one; oversubscribed, so no spin-waiting
        (0, 2, 2, 2, False),  # small box: ORT keeps both cores but yields them to decode
        (0, 1, 1, 1, False),
        (0, 0, 2, 2, True),  # nothing decoding beside it (bare benchmark)
        (3, 2, 16, 3, True),  # KIBAN_THREADS set: taken as given
        (4, 2, 4, 4, False),
    ],
)
def test_intra_op_threads_follow_the_usable_cores_minus_decode(
    threads: int, decode: int, usable: int, intra: int, spinning: bool
) -> None:
    plan = sess.plan_threads(threads, decode, usable)
    assert plan == sess.ThreadPlan(intra_op=intra, inter_op=1, allow_spinning=spinning)


def test_usable_cores_are_the_affinity_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sess.os, "sched_getaffinity", lambda _pid: {0, 3, 5}, raising=False)
    assert sess.affinity_cores() == 3


def test_trt_engine_cache_is_keyed_by_model_sha256(tmp_path: Path) -> None:
    home = Settings(home=tmp_path)
    cache_root = home.home / "cache"
    assert sess.trt_cache_dir(cache_root, SHA) == tmp_path / "cache" / "trt" / SHA[:16]
    assert sess.trt_cache_dir(cache_root, SHA.upper()) == sess.trt_cache_dir(cache_root, SHA)
    assert sess.trt_cache_dir(cache_root, "cd" * 32) != sess.trt_cache_dir(cache_root, SHA)
    for bad in ("", "abc", "../../etc/passwd0000", "zz" * 32):
        with pytest.raises(ValueError):
            sess.trt_cache_dir(cache_root, bad)


def test_trt_options_cache_fp16_and_profile_for_the_batch(tmp_path: Path) -> None:
    opts = sess.trt_provider_options(tmp_path / "trt" / "x", "pixels", 128, 224)
    assert opts["trt_engine_cache_enable"] == "True"
    assert opts["trt_engine_cache_path"] == str(tmp_path / "trt" / "x")
    assert opts["trt_timing_cache_path"] == opts["trt_engine_cache_path"]
    assert opts["trt_fp16_enable"] == "True"
    assert opts["trt_profile_min_shapes"] == "pixels:1x224x224x3"
    assert opts["trt_profile_opt_shapes"] == "pixels:128x224x224x3"
    assert opts["trt_profile_max_shapes"] == "pixels:128x224x224x3"
    assert all(isinstance(v, str) for v in opts.values())  # ORT parses strings
    assert sess.trt_provider_options(tmp_path, "x", 8, 256, fp16=False)["trt_fp16_enable"] == (
        "False"
    )
    with pytest.raises(ValueError):
        sess.trt_profile_shape("x", 0, 224)


def test_provider_list_attaches_gpu_options_and_keeps_cpu_bare() -> None:
    trt = {"trt_fp16_enable": "True"}
    got = sess.provider_list(
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], trt
    )
    assert got[0] == ("TensorrtExecutionProvider", trt)
    assert got[1][0] == "CUDAExecutionProvider"
    assert got[1][1]["arena_extend_strategy"] == "kSameAsRequested"
    assert got[2] == "CPUExecutionProvider"
    # without a cache location TensorRT is left out rather than rebuilding on every start
    assert sess.provider_list(["TensorrtExecutionProvider", "CPUExecutionProvider"], None) == [
        "CPUExecutionProvider"
    ]
    assert sess.provider_list(["CPUExecutionProvider"], trt) == ["CPUExecutionProvider"]


def test_session_record_names_the_options_that_ran() -> None:
    plan = sess.ThreadPlan(2, 1, False)
    cpu = sess.session_record(plan, "CPUExecutionProvider", fp16=True)
    assert cpu["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert (cpu["intra_op_threads"], cpu["inter_op_threads"], cpu["allow_spinning"]) == (2, 1, 0)
    assert "io_binding" not in cpu and "trt_fp16" not in cpu
    trt = sess.session_record(plan, "TensorrtExecutionProvider", fp16=True)
    assert trt["io_binding"] == 1 and trt["trt_fp16"] == 1


def test_old_shards_without_session_options_still_load() -> None:
    old = {
        "model": "m",
        "model_sha256": SHA,
        "batch_id": "b",
        "chunk": 0,
        "n_images": 1,
        "failures": [],
        "embedding_dim": 8,
        "provider": "CPUExecutionProvider",
        "threads": 0,
        "batch_size": 32,
        "wall_seconds": 1.0,
        "inference_seconds": 0.5,
    }
    assert ShardMeta.model_validate_json(json.dumps(old)).session == {}
    new = ShardMeta.model_validate({**old, "session": {"intra_op_threads": 2, "x": "y"}})
    assert ShardMeta.model_validate_json(new.model_dump_json()).session == new.session


def test_gpu_batch_size_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KIBAN_GPU_BATCH_SIZE", raising=False)
    assert Settings().gpu_batch_size == 128
    monkeypatch.setenv("KIBAN_GPU_BATCH_SIZE", "64")
    assert Settings().gpu_batch_size == 64


class _FakeBinding:
    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def bind_cpu_input(self, name: str, array: np.ndarray) -> None:
        self.calls.append(("in", name, str(array.dtype)))

    def bind_output(self, name: str, device: str) -> None:
        self.calls.append(("out", name, device))

    def copy_outputs_to_cpu(self) -> list[np.ndarray]:
        return [np.ones((2, 4), dtype=np.float16)]


class _FakeSession:
    def __init__(self) -> None:
        self.binding = _FakeBinding()
        self.ran_bound = False

    def io_binding(self) -> _FakeBinding:
        return self.binding

    def run_with_iobinding(self, binding: _FakeBinding) -> None:
        self.ran_bound = True

    def run(self, *_a: object) -> None:
        raise AssertionError("a GPU provider must go through IO binding")


def test_gpu_provider_runs_through_io_binding_with_output_on_device() -> None:
    fake = _FakeSession()
    model = sess.LoadedModel(fake, "CUDAExecutionProvider", 0, "pixels", "embedding")
    out = model.run(np.zeros((2, 8, 8, 3), dtype=np.uint8))
    assert fake.ran_bound and out.dtype == np.float32 and out.shape == (2, 4)
    assert fake.binding.calls == [("in", "pixels", "uint8"), ("out", "embedding", "cuda")]


def test_cpu_session_is_unchanged_and_records_its_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["pixels"], ["embedding"], to=TensorProto.FLOAT)],
        "g",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["n", 2, 2, 3])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["n", 2, 2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    monkeypatch.setattr(sess, "affinity_cores", lambda: 8)
    loaded = sess.load_model(
        path,
        ["CPUExecutionProvider"],
        0,
        "pixels",
        "embedding",
        decode_workers=2,
        image_side=2,
        model_sha256=SHA,
        cache_root=tmp_path / "cache",
    )
    assert loaded.provider == "CPUExecutionProvider" and not loaded.on_gpu
    assert loaded.options["intra_op_threads"] == 6 and loaded.options["inter_op_threads"] == 1
    x = np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3)
    np.testing.assert_array_equal(loaded.run(x), x.astype(np.float32))
    assert not (tmp_path / "cache").exists()  # no TensorRT here: no engine cache made
