#!/usr/bin/env bash
# Regenerate the golden results that tests/test_golden.py reruns in CI. Run it (from the repo
# root) only when a change is meant to alter training results, and say so in the commit.
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1
tmp=$(mktemp -d)
python -m harness -m model=tiny-1m method=lora,qlora,full seed=0 train.max_steps=8 task.n_test=20 \
    report.enabled=false "hydra.sweep.dir=$tmp"
for method in lora qlora full; do
    mkdir -p "tests/golden/$method"
    cp "$tmp"/*_"$method"_*/result.json "$tmp"/*_"$method"_*/predictions.jsonl "tests/golden/$method/"
done
rm -rf "$tmp"
echo "golden results written under tests/golden/"
