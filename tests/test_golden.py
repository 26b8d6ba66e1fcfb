"""Golden reproducibility: rerun the committed tiny-model results and compare.

The golden sets (tests/golden/<CPU class>/*/result.json) were produced by the code with
tests/golden/regenerate.sh, one set per CPU class (conftest.cpu_class): the tiny models are
pretrained on the machine, and come out different on CPUs with other vector units. Regenerate
a set only when a change is meant to alter results. Tolerances here are a little looser than
`harness.repro`'s bit-identity on one machine, so that they hold across CPU models of a class.
"""

from pathlib import Path

import pytest

from conftest import cpu_class
from harness.repro import rerun, within
from harness.results import read_result

SETS = Path(__file__).parent / "golden"
GOLDEN = sorted((SETS / cpu_class()).glob("*/result.json"))
TOLERANCE = {"train_losses": ("rel", 1e-2), "score_before": ("abs", 0.05), "score": ("abs", 0.05),
             "trainable_params": ("exact", 0), "total_params": ("exact", 0), "weight_bytes": ("exact", 0)}


def test_golden_set_is_present():
    if not GOLDEN:  # a CPU class no golden set was recorded on (CI's machines have one)
        pytest.skip(f"no golden set for CPU class {cpu_class()} (have: {', '.join(p.name for p in SETS.iterdir() if p.is_dir())}); "
                    "record one with: bash tests/golden/regenerate.sh")
    assert {p.parent.name for p in GOLDEN} == {"lora", "qlora", "full"}
    for path in GOLDEN:  # trained well past the warm-up, scored on enough problems to tell
        recorded = read_result(path)
        assert recorded["config"]["train"]["max_steps"] == 60 > recorded["config"]["train"]["warmup_steps"]
        assert recorded["config"]["task"]["n_test"] >= 50


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.parent.name)
def test_golden_result_reproduces(path, tmp_path):
    recorded = read_result(path)
    again = rerun(recorded, tmp_path)
    assert again["status"] == recorded["status"] == "ok"
    for metric, (kind, bound) in TOLERANCE.items():
        assert within(recorded["metrics"][metric], again["metrics"][metric], kind, bound), (
            metric, recorded["metrics"][metric], again["metrics"][metric])
