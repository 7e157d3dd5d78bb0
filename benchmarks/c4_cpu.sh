#!/usr/bin/env bash
# The CPU comparison: AdamW (full rank), GaLore and OSD on the same packed C4 tokens (t5-base
# tokenizer), the same seed and token budget, on the `micro` LLaMA preset. About 10-15 minutes
# per optimizer on a 2-core CPU. Writes runs/c4_cpu/<optimizer>/metrics.jsonl, a curves PNG,
# and prints the final validation perplexities.
#
#   bash benchmarks/c4_cpu.sh [SHARED_DIR]     (default: ../shared beside the checkout)
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${1:-../shared}
out=runs/c4_cpu
common=(--model micro --seq-len 256 --batch-size 8 --total-batch-size 16 --tokens 983040
        --eval-interval 40 --eval-batches 8 --seed 0 --rank 32 --update-proj-gap 50 --scale 0.25
        --data "$shared/data/c4_train_sample.jsonl" --tokenizer "$shared/tokenizers/t5_tokenizer.json")
python=${PYTHON:-python}
$python -m osd.train "${common[@]}" --optimizer adamw --lr 3e-3 --out-dir $out/adamw
$python -m osd.train "${common[@]}" --optimizer galore_adamw --lr 1e-2 --out-dir $out/galore_adamw
$python -m osd.train "${common[@]}" --optimizer osd_adamw --lr 1e-2 --out-dir $out/osd_adamw
$python -m osd.cli plot $out/adamw $out/galore_adamw $out/osd_adamw -o $out/curves.png
$python - "$out" <<'PY'
import json, sys
from pathlib import Path
for run in ("adamw", "galore_adamw", "osd_adamw"):
    records = [json.loads(l) for l in (Path(sys.argv[1]) / run / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    seconds = sum(r["tokens"] for r in records[-1:]) / (sum(r["tokens_per_s"] for r in records) / len(records))
    print(f"{run:14s} tokens {last['tokens']:>8d}  val loss {last['val_loss']:.4f}  val ppl {last['val_ppl']:8.2f}  "
          f"optimizer state {last['optimizer_state_bytes'] / 2**20:6.2f} MiB  mean {sum(r['tokens_per_s'] for r in records) / len(records):.0f} tok/s")
PY
