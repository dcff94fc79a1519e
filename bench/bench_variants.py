"""Precision variants and fused graphs, ViT-B-32 (random init: speed does not depend on weights).

On the same pre-decoded crops and the same threads, measured interleaved in one run:
- fused fp32 graph ÷ unfused fp32 graph (ONNX Runtime transformer optimiser)
- int8 variant (dynamic and static QDQ) ÷ fp32 ORT, and ÷ PyTorch eager (`torch.no_grad`)
plus the variant's top-5 neighbour overlap and worst cosine against fp32.

    python bench/bench_variants.py [--model open_clip:ViT-B-32] [--images 32] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="open_clip:ViT-B-32")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    args, _ = ap.parse_known_args()

    import torch

    from kiban_cli.synthetic import sample_images
    from kiban_export import export_model
    from kiban_export.builders import build
    from kiban_export.fusion import fuse
    from kiban_export.parity import cosines, normalise
    from kiban_export.spec import parse_spec
    from kiban_export.variants import (
        _embed,
        as_crops,
        default_threads,
        machine,
        measure_rates,
        quantize_model,
    )

    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    print(f"machine: {machine()}; threads: {threads}; torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="bench-variants-") as tmp:
        work = Path(tmp)
        card, path = export_model(args.model, "vit", "foundation", work, sample_images(n=4))
        crops = as_crops(sample_images(n=args.images, seed=1), card.preprocessing)
        fused_path = work / "fused.onnx"
        fused_path.write_bytes(path.read_bytes())
        fusion = fuse(fused_path, crops.crops, threads)
        print(f"fusions: {fusion.fusions}; kept: {fusion.applied}; {fusion.note}")
        variants = {}
        for mode in ("dynamic", "static"):
            vcard, vpath = quantize_model(
                card,
                path,
                f"vit-{mode}",
                work / mode,
                "int8",
                crops,
                crops,
                mode=mode,
                threads=threads,
            )
            assert vcard.variant is not None
            variants[vcard.variant.mode] = (vcard.variant, vpath)
        graphs = {"fp32": path, "fp32-fused": fused_path}
        graphs.update({f"int8-{m}": p for m, (_, p) in variants.items()})
        rates = measure_rates(graphs, crops.crops, threads, rounds=args.rounds, seconds=2.0)

        module = build(parse_spec(args.model)).module.eval()
        x = torch.from_numpy(
            np.ascontiguousarray(
                normalise(crops.crops, card.preprocessing.mean, card.preprocessing.std).transpose(
                    0, 3, 1, 2
                )
            )
        )
        eager = []
        with torch.no_grad():
            module(x[:2])
            for _ in range(args.rounds):
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < 2.0:
                    module(x)
                    n += len(x)
                eager.append(n / (time.perf_counter() - t0))
        rates["torch-eager"] = round(statistics.median(eager), 2)
        fp32 = _embed(path, crops.crops, threads)
        print("\n| graph | img/s | ÷ fp32 ORT | ÷ PyTorch eager | top-5 overlap | min cos |")
        print("|---|---|---|---|---|---|")
        for name, rate in rates.items():
            over, mincos = "-", "-"
            if name.startswith("int8-"):
                info = variants[name[5:]][0]
                over, mincos = f"{info.neighbour_overlap:.3f}", f"{info.min_cosine:.4f}"
            elif name == "fp32-fused":
                mincos = f"{cosines(_embed(fused_path, crops.crops, threads), fp32).min():.6f}"
            print(
                f"| {name} | {rate:.1f} | {rate / rates['fp32']:.2f} | "
                f"{rate / rates['torch-eager']:.2f} | {over} | {mincos} |"
            )


if __name__ == "__main__":
    main()
