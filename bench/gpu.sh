#!/usr/bin/env bash
# bench/gpu.sh -- ONE prepared GPU benchmark for the accelerator machine (issue 11, section 4).
# Never run in CI; needs one NVIDIA GPU, onnxruntime-gpu and (for the TensorRT rows) the
# TensorRT 10 libraries. Nothing here needs the network when .venv is carried along.
#
#   bash bench/gpu.sh            # results on stdout, and under $OUT when that is set
#
# Measures, for ViT-B-32 (RANDOM INIT: open_clip without pretrained weights -- the speed of
# the graph does not depend on the weights, so no hub download is needed):
#   1. bare ONNX Runtime img/s on pre-made uint8 224x224 batches: CUDA fp32, TensorRT fp32,
#      TensorRT fp16 (engine build time reported separately from the timed runs);
#   2. end-to-end `kiban run` on synthetic texture images (ingest, decode, encode, index,
#      evaluate), with the encoder's own rate read back from the shard metadata.
# Every step has its own timeout so the whole script stays under 5 minutes.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
RESULTS=${OUT:-$(mktemp -d -t kiban-gpu-XXXXXX)}
mkdir -p "$RESULTS"
WORK=$(mktemp -d -t kiban-gpu-work-XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# -- Python: the carried .venv, or a fresh venv (needs a package index to be reachable) ------
if [[ -x "$REPO/.venv/bin/python" ]]; then
    PY="$REPO/.venv/bin/python"
else
    echo "no .venv: creating one in $WORK/venv (needs PyPI)"
    python3 -m venv "$WORK/venv"
    "$WORK/venv/bin/pip" install -q -e "$REPO[encoder,export,reporter,ingest,cli]"
    PY="$WORK/venv/bin/python"
fi
KIBAN="$(dirname "$PY")/kiban"

export KIBAN_HOME="$WORK/home"
export KIBAN_GPU_BATCH_SIZE="${KIBAN_GPU_BATCH_SIZE:-128}"
export KIBAN_ORT_PROVIDERS="CUDAExecutionProvider,CPUExecutionProvider"
export PYTHONUNBUFFERED=1

{
    echo "## GPU"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    else
        echo "nvidia-smi not found"
    fi
    "$PY" -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_available_providers())'
} | tee "$RESULTS/gpu.txt"

# -- 1. export ViT-B-32 (random init) into the registry -----------------------------------
echo "## export open_clip:ViT-B-32 (random init, fp32)"
t0=$(date +%s)
timeout 150 "$KIBAN" models export "open_clip:ViT-B-32" --name vit-b-32 --family foundation \
    >"$RESULTS/export.log" 2>&1 || { tail -20 "$RESULTS/export.log"; exit 1; }
echo "export took $(($(date +%s) - t0)) s"

# -- 2. bare ORT: CUDA fp32, TensorRT fp32, TensorRT fp16 -------------------------------
echo "## bare ONNX Runtime, ViT-B-32, batch $KIBAN_GPU_BATCH_SIZE"
timeout 200 "$PY" - "$RESULTS/bare.json" <<'PYEOF' || echo "bare ORT step failed or timed out (rc=$?)"
import json, sys, time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from kiban.context import Context
from kiban.models.registry import fetch_model, load_card
from kiban.settings import load_settings
from kiban_encoder import session as S

if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* wheels, when installed
    try:
        ort.preload_dlls()
    except Exception as exc:  # noqa: BLE001
        print("preload_dlls:", exc)

settings = load_settings()
ctx = Context.from_settings(settings)
card = load_card(ctx.store, "vit-b-32")
path = fetch_model(ctx.store, card, ctx.cache_dir)
batch = settings.gpu_batch_size
side = card.preprocessing.crop
x = np.random.default_rng(0).integers(0, 256, (batch, side, side, 3), dtype=np.uint8)
usable = S.usable_providers(["TensorrtExecutionProvider", "CUDAExecutionProvider"])
rows = []


def measure(label, providers, seconds=15.0):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    t = time.perf_counter()
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    model = S.LoadedModel(sess, sess.get_providers()[0], 0, card.input_name, card.output_name)
    model.run(x)  # TensorRT builds (or loads) its engine here
    build = time.perf_counter() - t
    for _ in range(3):
        model.run(x)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        model.run(x)
        n += batch
    rate = n / (time.perf_counter() - t)
    row = {"variant": label, "ran_on": model.provider, "img_per_s": round(rate, 1),
           "session_plus_first_batch_s": round(build, 1), "batch": batch}
    print(json.dumps(row), flush=True)
    rows.append(row)


if "CUDAExecutionProvider" in usable:
    measure("cuda-fp32", [("CUDAExecutionProvider", S.cuda_provider_options())])
else:
    print("CUDAExecutionProvider not usable here: no GPU rows")
if "TensorrtExecutionProvider" in usable:
    for fp16 in (False, True):
        cache = S.trt_cache_dir(Path(ctx.cache_dir), card.sha256) / ("fp16" if fp16 else "fp32")
        cache.mkdir(parents=True, exist_ok=True)
        trt = S.trt_provider_options(cache, card.input_name, batch, side, fp16=fp16)
        label = "tensorrt-fp16" if fp16 else "tensorrt-fp32"
        # the engine build is the first session + batch; a second session loads the cache
        measure(label + " (engine build)", [("TensorrtExecutionProvider", trt)], seconds=1.0)
        measure(label, [("TensorrtExecutionProvider", trt),
                        ("CUDAExecutionProvider", S.cuda_provider_options())])
else:
    print("TensorrtExecutionProvider not usable here (libnvinfer.so.10 missing?): no TRT rows")
Path(sys.argv[1]).write_text(json.dumps(rows, indent=1))
PYEOF

# -- 3. end to end: kiban run on synthetic images (CUDA, KIBAN_GPU_BATCH_SIZE) --------------
echo "## end to end: kiban run, synthetic textures"
"$PY" -c "
from pathlib import Path
from kiban_cli.synthetic import generate_texture_dataset
generate_texture_dataset(Path('$WORK/images'), per_class=400)
"
n_images=$(find "$WORK/images" -type f | wc -l)
t0=$(date +%s.%N)
timeout 150 "$KIBAN" run --source "file://$WORK/images" --models vit-b-32 --batch gpu-e2e \
    >"$RESULTS/run.log" 2>&1 || { echo "kiban run failed (rc=$?)"; tail -20 "$RESULTS/run.log"; }
t1=$(date +%s.%N)
"$PY" - "$n_images" "$t0" "$t1" "$RESULTS/e2e.json" <<'PYEOF'
import json, sys
from kiban.context import Context
from kiban.settings import load_settings
from kiban.shards import list_shards, read_meta

n, t0, t1, out = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
ctx = Context.from_settings(load_settings())
metas = [read_meta(ctx.store, r.model, r.batch_id, r.chunk)
         for r in list_shards(ctx.store, "vit-b-32", "gpu-e2e")]
metas = [m for m in metas if m is not None]
enc = sum(m.n_images for m in metas)
wall = sum(m.wall_seconds for m in metas)
row = {
    "images": n,
    "kiban_run_wall_s": round(t1 - t0, 1),
    "kiban_run_img_per_s": round(n / (t1 - t0), 1),
    "encoded": enc,
    "encoder_img_per_s": round(enc / wall, 1) if wall else None,
    "provider": metas[0].provider if metas else None,
    "batch_size": metas[0].batch_size if metas else None,
    "session": metas[0].session if metas else None,
    "device": metas[0].device if metas else None,
}
print(json.dumps(row, indent=1))
open(out, "w").write(json.dumps(row, indent=1))
PYEOF
echo "results in $RESULTS"
