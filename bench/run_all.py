"""`make bench`: every benchmark in one run, results printed as Markdown tables.

Targets are ratios measured side by side in the same run (the machines are shared and
noisy), never timed assertions in tests.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = [
    "bench_encoder.py",
    "bench_decode.py",
    "bench_knn.py",
    "bench_qdrant.py",
    "bench_distributed.py",
    "bench_ingest.py",
    "bench_decision.py",
    "bench_trainer.py",
    "bench_variants.py",
    "bench_vit_e2e.py",
    "bench_reporter_scale.py",
    "bench_broker.py",
]


def main() -> int:
    extra = sys.argv[1:]
    failed = 0
    for name in BENCHES:
        print(f"\n# {name}", flush=True)
        rc = subprocess.call([sys.executable, str(HERE / name), *extra])
        failed += rc != 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
