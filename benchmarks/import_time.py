"""How long `import mmpersona, concept_db, pipelines` takes in a fresh interpreter, against a bare interpreter.

    python benchmarks/import_time.py [--runs 15]

Target (foundation issue): import_s <= 0.3 and torch not imported. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CODE = "import sys, mmpersona, concept_db, pipelines; print('torch' in sys.modules)"


def timed(code: str) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return time.perf_counter() - start, out.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    timed(CODE)  # warm the file cache
    base = [timed("pass")[0] for _ in range(args.runs)]
    runs = [timed(CODE) for _ in range(args.runs)]
    base_p50 = statistics.median(base)
    total_p50 = statistics.median(t for t, _ in runs)
    result = {
        "runs": args.runs,
        "baseline_s": round(base_p50, 4),
        "total_s": round(total_p50, 4),
        "import_s": round(total_p50 - base_p50, 4),
        "ratio": round(total_p50 / base_p50, 3),
        "torch_imported": any(flag == "True" for _, flag in runs),
    }
    print(f"interpreter start {base_p50 * 1000:.1f} ms, with imports {total_p50 * 1000:.1f} ms")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
