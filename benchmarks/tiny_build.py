"""Building the trained tiny preset on a shared machine: torch's default threads against the build's own choice
(`mmpersona.models.tiny.build_threads`: only the cores other processes leave idle), alone and beside another
2-thread torch job (what a second test run, or anything else, is on a 2-core laptop).

    python benchmarks/tiny_build.py [--fraction 0.1] [--hog-threads 2]

Each build is `tiny:sd-trained` (its VAE and UNet training, `fraction` of the steps) in a fresh process and cache.
Prints one JSON line per run, then one with `alone_default_s`, `alone_adaptive_s`, `busy_default_s`,
`busy_adaptive_s`, `busy_slowdown_default` and `busy_slowdown_adaptive` (busy over alone) and `adaptive_vs_default_busy`
(adaptive's time over default's, beside the other job). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import sys, time
import mmpersona.models.tiny as tiny
fraction = float(sys.argv[1])
tiny.ensure_tiny("sd")
# a fraction of the steps, and the build's checks always passing, so that it trains no more than that
tiny.TRAINED_SD = {**tiny.TRAINED_SD, "vae_steps": max(1, int(tiny.TRAINED_SD["vae_steps"] * fraction)),
                   "unet_steps": max(1, int(tiny.TRAINED_SD["unet_steps"] * fraction)),
                   "vae_hue_error": 0.5, "hue_coverage": 0.0}
start = time.perf_counter()
with tiny.build_threads() as threads:
    pass
tiny.ensure_tiny("sd-trained")
print("RESULT", time.perf_counter() - start, threads)
"""

HOG = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
a = torch.randn(384, 384)
while True:
    for _ in range(50):
        a = torch.tanh(a @ a.T / 384)
"""


def build(fraction: float, adaptive: bool) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "MMPERSONA_CACHE_DIR": cache, "PYTHONPATH": str(ROOT)}
        env.pop("MMPERSONA_BUILD_THREADS", None)
        if not adaptive:  # torch's default: one thread per core
            env["MMPERSONA_BUILD_THREADS"] = str(len(os.sched_getaffinity(0)))
        out = subprocess.run([sys.executable, "-c", CHILD, str(fraction)], capture_output=True, text=True, env=env,
                             timeout=7200)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
        if out.returncode or not line:
            raise SystemExit(out.stderr[-3000:])
        _, seconds, threads = line[-1].split()
        return float(seconds), int(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.1, help="share of the preset's training steps")
    parser.add_argument("--hog-threads", type=int, default=2, help="threads of the other torch job")
    args = parser.parse_args()
    results = {}
    for busy in (False, True):
        hog = None
        if busy:
            hog = subprocess.Popen([sys.executable, "-c", HOG, str(args.hog_threads)])
            time.sleep(3)  # running before the build looks at the machine
        try:
            for adaptive in (False, True):
                seconds, threads = build(args.fraction, adaptive)
                name = f"{'busy' if busy else 'alone'}_{'adaptive' if adaptive else 'default'}_s"
                results[name] = round(seconds, 1)
                print(json.dumps({"run": name, "seconds": round(seconds, 1), "threads": threads}), flush=True)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
    summary = {**results, "fraction": args.fraction, "hog_threads": args.hog_threads,
               "busy_slowdown_default": round(results["busy_default_s"] / results["alone_default_s"], 2),
               "busy_slowdown_adaptive": round(results["busy_adaptive_s"] / results["alone_adaptive_s"], 2),
               "adaptive_vs_default_busy": round(results["busy_adaptive_s"] / results["busy_default_s"], 2),
               "adaptive_vs_default_alone": round(results["alone_adaptive_s"] / results["alone_default_s"], 2)}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
