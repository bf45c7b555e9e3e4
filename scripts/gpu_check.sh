#!/usr/bin/env bash
# The real-shapes check at full depth on a CUDA GPU: every default architecture (Qwen2.5-VL-3B, ViT-L/14-336,
# OWLv2, SD 1.5 and SDXL with their IP-Adapters) built from its published config with random weights, each
# stage (embed, retrieve, instance, answer a turn on a 4000x3000 photo, one token-learning step; for SD 1.5 and
# SDXL one generation step, serve's largest allowed generation, one DPO step and one preference-adapter training
# step with held-out users, each with its command's default settings) run once through the toolkit's own code in
# the GPU's default dtype (bf16 where the GPU has it natively), SD 1.5 at 512 and SDXL at 1024. Under 8 minutes
# on one GPU.
#
#   bash scripts/gpu_check.sh [REPORT_DIR]      # default: $OUT (the device tool's folder), else artifacts/gpu
#
# Writes REPORT_DIR/gpu_report.json ({"environment": ..., "stages": [one object per stage]}) and
# REPORT_DIR/real_shapes.jsonl; exits non-zero when a stage is not ok. Needs torch (CUDA), transformers,
# diffusers, open_clip_torch, peft, accelerate, tokenizers and safetensors importable by $PYTHON (default:
# .venv/bin/python, else python3); the repository itself need not be installed.
set -uo pipefail
cd "$(dirname "$0")/.."
REPORT_DIR="${1:-${OUT:-artifacts/gpu}}"
mkdir -p "$REPORT_DIR"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MMPERSONA_CACHE_DIR="${MMPERSONA_CACHE_DIR:-/tmp/mmpersona-gpu-check-cache}"

"$PY" - "$REPORT_DIR/environment.json" <<'PYEOF' || exit 2
import json, platform, sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA GPU is visible to torch")
import diffusers, transformers
from mmpersona.devices import resolve_dtype
env = {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
       "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
       "memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
       "default_dtype": str(resolve_dtype(None, torch.device("cuda"))).removeprefix("torch."),
       "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
       "diffusers": diffusers.__version__, "python": platform.python_version()}
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(json.dumps(env))
PYEOF

start=$(date +%s)
timeout 470 "$PY" benchmarks/real_shapes.py --full --device cuda --timeout 150 --out "$REPORT_DIR/real_shapes.jsonl"
status=$?
"$PY" - "$REPORT_DIR" "$status" "$(( $(date +%s) - start ))" <<'PYEOF'
import json, sys
from pathlib import Path
folder, status, seconds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
lines = folder / "real_shapes.jsonl"
stages = [json.loads(x) for x in lines.read_text().splitlines() if x.strip()] if lines.exists() else []
report = {"environment": json.loads((folder / "environment.json").read_text()), "seconds": seconds,
          "exit_status": status, "all_ok": bool(stages) and status == 0 and all(s["ok"] for s in stages),
          "stages": stages}
(folder / "gpu_report.json").write_text(json.dumps(report, indent=2))
print(json.dumps({k: report[k] for k in ("seconds", "exit_status", "all_ok")}))
sys.exit(0 if report["all_ok"] else 1)
PYEOF
