#!/usr/bin/env bash
# One short check on a machine with a CUDA GPU (about 3-6 minutes; every part has a time limit):
#   1. the CUDA tests (tests/test_cuda.py: steps on the GPU against the CPU, the fused full-rank
#      path, the compiled step, `osd train --device cuda` learning and resuming exactly);
#   2. `osd bench projection --device cuda`: one update of P per rule at the 1B and 7B MLP shapes;
#   3. `osd bench step --device cuda`: the optimizer step at 60m and 130m beside its floor, and the
#      60m training throughput OSD / AdamW.
# Then one summary table. Exit status 0 if every part passed, 1 if one failed, 2 without CUDA.
#
#   benchmarks/gpu_check.sh                  # from the repository root; PYTHON=... to pick the interpreter
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d -t osd-gpu-check.XXXXXX)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device visible to $PYTHON (torch.cuda.is_available() is False, or torch is missing); nothing was run" >&2
    exit 2
fi
"$PYTHON" -c "import pytest, transformers, tqdm" 2>/dev/null || {
    echo "gpu_check: needs pytest, transformers and tqdm: pip install -e '.[train,test]'" >&2
    exit 2
}

status=0
declare -A RESULT SECONDS_TAKEN
part() {  # part NAME LIMIT_S COMMAND...: run one part with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    if timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
        RESULT[$name]=ok
    else
        local rc=$?
        RESULT[$name]="FAILED (exit $rc$([ $rc = 124 ] && echo ", over ${limit} s"))"
        status=1
    fi
    SECONDS_TAKEN[$name]=$((SECONDS - start))
    echo "gpu_check: $name: ${RESULT[$name]} in ${SECONDS_TAKEN[$name]} s (log: $OUT/$name.log)" >&2
}

part tests 180 "$PYTHON" -m pytest tests/test_cuda.py -q -rs
part projection 90 "$PYTHON" -m osd.cli bench projection --device cuda --shapes 2048x5461:512 4096x11008:1024 \
    --repeats 5 --warmup 2 --out "$OUT/projection"
part step 200 "$PYTHON" -m osd.cli bench step --device cuda --random-tokens --presets 60m 130m --throughput-presets 60m \
    --repeats 5 --warmup 2 --refresh-repeats 2 --train-repeats 5 --train-warmup 2 --out "$OUT/step"

"$PYTHON" - "$OUT" "${RESULT[tests]}" "${RESULT[projection]}" "${RESULT[step]}" \
    "${SECONDS_TAKEN[tests]}" "${SECONDS_TAKEN[projection]}" "${SECONDS_TAKEN[step]}" <<'EOF' || status=1
import json, re, sys
from pathlib import Path

out = Path(sys.argv[1])
results, seconds = dict(zip(("tests", "projection", "step"), sys.argv[2:5])), dict(zip(("tests", "projection", "step"), sys.argv[5:8]))
rows = []
log = (out / "tests.log").read_text() if (out / "tests.log").exists() else ""
summary = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|errors?|deselected).*?) in [\d.]+s", log, re.MULTILINE)
rows.append(("tests/test_cuda.py", results["tests"], seconds["tests"], summary[-1] if summary else "no pytest summary"))
projection = out / "projection" / "projection.json"
if projection.exists():
    payload = json.loads(projection.read_text())
    rows.append(("bench projection", results["projection"], seconds["projection"], payload["machine"].get("gpu", "")))
    for r in payload["results"]:
        ms = {rule: r["rules"][rule]["median_ms"] for rule in ("online_pca", "svd", "eigh", "randomized")}
        rows.append((f"  P update {r['m']}x{r['n']} r{r['rank']}", "", "", ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items())))
else:
    rows.append(("bench projection", results["projection"], seconds["projection"], "no results"))
step = out / "step" / "step.json"
if step.exists():
    payload = json.loads(step.read_text())
    rows.append(("bench step", results["step"], seconds["step"], ""))
    for res in payload["results"]:
        for name, e in res["optimizers"].items():
            extra = f", throughput {e['throughput_vs_adamw']:.3f}x AdamW" if "throughput_vs_adamw" in e else ""
            ops = f", {e['aten_ops_per_projected_weight']} aten ops/weight" if "aten_ops_per_projected_weight" in e else ""
            rows.append((f"  {res['preset']} {name}", "", "", f"step {e['step']['median_ms']:.2f} ms, floor {e['floor_ms']:.2f} ms ({e['vs_floor']:.2f}x){ops}{extra}"))
        g = res["full_rank_group"]
        rows.append((f"  {res['preset']} full-rank group", "", "", f"osd {g['osd']['median_ms']:.2f} ms vs torch fused {g['torch_fused']['median_ms']:.2f} ms ({g['osd_vs_torch_fused']:.2f}x)"))
else:
    rows.append(("bench step", results["step"], seconds["step"], "no results"))
width = max(len(r[0]) for r in rows)
print(f"\n{'check'.ljust(width)} | status | s    | result")
print(f"{'-' * width}-|--------|------|-------")
for name, status, secs, text in rows:
    print(f"{name.ljust(width)} | {status:<6} | {str(secs):<4} | {text}")
print(f"\nlogs and JSON in {out}")
EOF
exit $status
