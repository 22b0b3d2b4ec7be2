#!/usr/bin/env bash
# Check adaspec on a device: the exactness tests there, then a small bench and the verify-cost curve.
#   bash scripts/gpu-check.sh                 # the device torch finds (CUDA, else MPS, else the CPU)
#   bash scripts/gpu-check.sh --device cpu    # or cuda, cuda:1, mps
# Options after the device: --limit N (questions per category, default 1), --max-new-tokens N (default 32),
# --target T (default smollm2), --out DIR (default runs/gpu-check-<device>). Exits non-zero if a test fails or if
# greedy `sd` differs from `ar` where it must not (float32 on a CPU); on a GPU it reports exact match and alignment.
# Prints one JSON line at the end. Needs the dev extras (bash scripts/setup.sh --dev).
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
device=auto limit=1 max_new=32 target=smollm2 out=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --limit) limit="$2"; shift 2 ;;
    --max-new-tokens) max_new="$2"; shift 2 ;;
    --target) target="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
# resolve auto and check the device is usable (an error says what is missing)
device=$("$py" -c "from adaspec.core.models import resolve_device; import sys; print(resolve_device(sys.argv[1]))" "$device")
dtype=$("$py" -c "import torch, sys; from adaspec.core.models import default_dtype; print(default_dtype(torch.device(sys.argv[1])))" "$device")
[[ "$device" == cpu ]] && export CUDA_VISIBLE_DEVICES=""  # `auto` anywhere below means the CPU too
out=${out:-runs/gpu-check-${device//:/}}
echo "gpu-check: device $device, dtype $dtype, target $target -> $out" >&2
"$py" - "$device" <<'EOF' >&2
import sys, torch
d = torch.device(sys.argv[1])
if d.type == "cuda":
    p = torch.cuda.get_device_properties(d)
    print(f"  {p.name}, {p.total_memory / 2**30:.0f} GiB, bf16 {torch.cuda.is_bf16_supported()}, torch {torch.__version__}")
else:
    print(f"  torch {torch.__version__}, {torch.get_num_threads()} threads")
EOF

# 1 exactness on the device: greedy sd == ar and lossless sampling on five architectures, the step's reads from the
# device, the CUDA-only tests where CUDA is present
t0=$(date +%s)
ADASPEC_TEST_DEVICE="$device" "$py" -m pytest -q -x -p no:cacheprovider tests/test_architectures.py tests/test_device.py
tests_s=$(( $(date +%s) - t0 ))

# 2 a small bench on the device: every method that runs on torch, greedy, against ar measured in the same run
rm -rf "$out"
.venv/bin/adaspec bench --target "$target" --backend torch --device "$device" --dtype auto --limit "$limit" \
  --max-new-tokens "$max_new" --categories translation,summarization,coding \
  --methods "ar,sd,cmasd,specbound,sd:drafter=eagle" --out "$out" >&2

# 3 the verify-cost curve of the device: ms to score 1..8 positions
.venv/bin/adaspec costs --target "$target" --backends "torch:$dtype" --drafters "" --out "$out/device-costs.json" >&2

"$py" - "$out" "$device" "$dtype" "$tests_s" <<'EOF'
import json, sys
out, device, dtype, tests_s = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
summary = json.load(open(f"{out}/summary.json"))
methods = {name: {k: m.get(k) for k in ("tokens_per_s", "speedup_vs_ar", "mean_accepted", "exact_match", "alignment")}
           for name, m in summary["methods"].items()}
costs = json.load(open(f"{out}/device-costs.json"))
print(json.dumps({"device": device, "dtype": dtype, "tests_s": tests_s, "methods": methods, "costs": costs}))
# on a CPU in float32 the exact methods must equal ar token for token; on a GPU batched kernels may round apart
# (README "Exactness and dtype"): reported above, not asserted
if device == "cpu" and dtype == "float32":
    bad = [n for n in ("sd", "specbound", "sd:drafter=eagle") if n in methods and methods[n]["exact_match"] != 1.0]
    if bad:
        sys.exit(f"gpu-check: {bad} differ from ar on the CPU in float32")
EOF
