"""Run every benchmark: ``python -m benchmarks`` (JSON in benchmarks/results/, tables in docs/).

Each one is a separate process (fresh memory, fresh torch threads), run one after the other.
"""

import subprocess
import sys

STEPS = [
    ["benchmarks.bench_generate", "memory", "throughput"],
    ["benchmarks.bench_landmarks"],
    ["benchmarks.bench_quality"],
    ["benchmarks.bench_batch"],
    ["benchmarks.bench_live"],
    ["benchmarks.bench_silence"],
]

if __name__ == "__main__":
    failed = 0
    for module, *args in STEPS:
        print(f"== python -m {module} {' '.join(args)}", flush=True)
        failed += subprocess.call([sys.executable, "-m", module, *args]) != 0
    sys.exit(1 if failed else 0)
