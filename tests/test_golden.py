"""Golden reproducibility: rerun the committed tiny-model results and compare.

The golden set (tests/golden/*/result.json) was produced by the code with
tests/golden/regenerate.sh; regenerate it only when a change is meant to alter results.
Tolerances here are a little looser than `harness.repro`'s bit-identity on one machine, so that
they hold across CPU models (bf16 kernels differ between instruction sets).
"""

from pathlib import Path

import pytest

from harness.repro import rerun, within
from harness.results import read_result

GOLDEN = sorted(Path(__file__).parent.glob("golden/*/result.json"))
TOLERANCE = {"train_losses": ("rel", 1e-2), "score_before": ("abs", 0.05), "score": ("abs", 0.05),
             "trainable_params": ("exact", 0), "total_params": ("exact", 0), "weight_bytes": ("exact", 0)}


def test_golden_set_is_present():
    assert {p.parent.name for p in GOLDEN} == {"lora", "qlora", "full"}


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.parent.name)
def test_golden_result_reproduces(path, tmp_path):
    recorded = read_result(path)
    again = rerun(recorded, tmp_path)
    assert again["status"] == recorded["status"] == "ok"
    for metric, (kind, bound) in TOLERANCE.items():
        assert within(recorded["metrics"][metric], again["metrics"][metric], kind, bound), (
            metric, recorded["metrics"][metric], again["metrics"][metric])
