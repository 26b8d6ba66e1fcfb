#!/usr/bin/env bash
# Regenerate the golden results that tests/test_golden.py reruns in CI, for this machine's CPU
# class (tests/golden/<class>/: the tiny models, pretrained here, differ between CPU classes).
# Run it (from the repo root) only when a change is meant to alter training results, or to add
# a set for a new CPU class, and say so in the commit. 60 steps (well past the 10 warm-up
# steps) and 50 test problems, so that the losses compared are those of real training.
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1
class=$(cd tests && python -c 'from conftest import cpu_class; print(cpu_class())')
tmp=$(mktemp -d)
python -m harness -m model=tiny-1m method=lora,qlora,full seed=0 device=cpu train.max_steps=60 task.n_test=50 \
    report.enabled=false "hydra.sweep.dir=$tmp"
for method in lora qlora full; do
    mkdir -p "tests/golden/$class/$method"
    cp "$tmp"/*_"$method"_*/result.json "$tmp"/*_"$method"_*/predictions.jsonl "tests/golden/$class/$method/"
done
rm -rf "$tmp"
echo "golden results written under tests/golden/$class/"
