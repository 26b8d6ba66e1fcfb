"""Equal-budget comparisons (budget=params / budget=memory): sizing, jobs and report views."""

import json

import pytest

from conftest import REPO, FAST, compose, run_in_process
from harness import budget, memory_model

TINY_1M = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 428}
QWEN_7B = json.loads((REPO / "harness/architectures/qwen2.5-7b.json").read_text())


def method(name: str) -> dict:
    return compose([f"method={name}"])["method"]


def trainable(arch: dict, m: dict) -> int:
    return memory_model.adapter_params(memory_model.layer_shapes(arch), m["peft"])[0]


def test_params_budget_matches_qlora_trainable_count():
    target = trainable(TINY_1M, method("qlora"))
    sized, info = budget.match(method("adalora"), TINY_1M, "params", batch_size=16, seq_len=12)
    assert info["matched"] and info["knob"] == "peft.init_r" and info["default"] == 24
    assert sized["peft"]["init_r"] == info["value"] == 16
    assert sized["peft"]["target_r"] == round(16 * 16 / 24)  # the target keeps its ratio to init_r
    assert trainable(TINY_1M, sized) == info["achieved"] == pytest.approx(target, rel=0.01)
    # DoRA's magnitude vectors: one rank less is closer; alpha follows the rank (alpha/r kept)
    sized, info = budget.match(method("dora"), TINY_1M, "params", batch_size=16, seq_len=12)
    assert info["matched"] and sized["peft"]["r"] == 15 and sized["peft"]["lora_alpha"] == pytest.approx(30)
    # rsLoRA's scale is alpha/sqrt(r): alpha follows sqrt(r)
    rslora = method("rslora")
    resized = budget.resize(rslora, rslora["peft"]["r"] * 4)
    assert resized["peft"]["lora_alpha"] == pytest.approx(rslora["peft"]["lora_alpha"] * 2)
    # MiSS: r blocks of r x out per layer; r=40 gives QLoRA's count within 1% on tiny-1m
    sized, info = budget.match(method("miss"), TINY_1M, "params", batch_size=16, seq_len=12)
    assert info["matched"] and info["knob"] == "peft.r" and info["default"] == 64
    assert trainable(TINY_1M, sized) == pytest.approx(target, rel=0.02) and sized["peft"]["r"] < 64
    # P-tuning: its prompt encoder's MLP is fixed; the virtual tokens make up the rest
    sized, info = budget.match(method("ptuning"), TINY_1M, "params", batch_size=16, seq_len=12)
    assert info["matched"] and info["knob"] == "peft.num_virtual_tokens" and info["default"] == 20
    assert trainable(TINY_1M, sized) == pytest.approx(target, rel=0.01) and sized["peft"]["num_virtual_tokens"] > 20
    # The same method sized to the same count is unchanged
    sized, info = budget.match(method("lora"), QWEN_7B, "params", batch_size=1, seq_len=512)
    assert info["matched"] and sized == method("lora")


def test_methods_that_cannot_be_sized_are_marked_unmatched_with_the_reason():
    for name, reason in [("full", "full fine-tuning has no size knob"), ("ia3", "IA3 has no size knob")]:
        sized, info = budget.match(method(name), TINY_1M, "params", batch_size=16, seq_len=12)
        assert sized == method(name) and not info["matched"] and info["reason"] == reason
    # prompt tuning would need more virtual tokens than the model has positions
    sized, info = budget.match(method("prompt"), TINY_1M, "params", batch_size=16, seq_len=12, limit=192)
    assert not info["matched"] and sized == method("prompt") and info["value"] == 20
    assert "capped at 192" in info["reason"]
    # at equal memory on a 7B model, a bf16 base does not fit in QLoRA's memory at any rank
    sized, info = budget.match(method("lora"), QWEN_7B, "memory", batch_size=1, seq_len=512)
    assert not info["matched"] and "over QLoRA's" in info["reason"] and sized == method("lora")


def test_the_budget_sizes_to_the_reports_baseline_when_it_is_not_qlora():
    """report.baseline=vera: budget=params sizes the methods to VeRA's trainable parameters,
    and the job's configuration hash says so (a change of baseline reruns sized jobs only)."""
    from conftest import compose
    from harness.results import config_hash

    target = trainable(TINY_1M, method("vera"))  # far fewer than QLoRA's
    sized, info = budget.match(method("adalora"), TINY_1M, "params", batch_size=16, seq_len=12, reference="vera")
    assert info["target"] == target < trainable(TINY_1M, method("qlora")) / 4
    # AdaLoRA cannot come down to VeRA's count (at init_r=1 it has more): unmatched, said so
    assert not info["matched"] and f"VeRA has {target:,}" in info["reason"]
    # at LoRA's memory on a 7B model (a bf16 base), QLoRA's 4-bit base leaves room for a far larger rank
    sized, info = budget.match(method("qlora"), QWEN_7B, "memory", batch_size=1, seq_len=512, reference="lora")
    assert info["matched"] and info["value"] > 4 * info["default"]
    sized_job = compose(["budget=params", "method=adalora"])
    plain_job = compose(["method=adalora"])
    other = lambda cfg: {**cfg, "report": {**cfg["report"], "baseline": "lora"}}  # noqa: E731
    assert config_hash(other(sized_job)) != config_hash(sized_job)
    assert config_hash(other(plain_job)) == config_hash(plain_job)


def test_memory_budget_gives_the_largest_size_that_fits_qlora_memory():
    kwargs = dict(batch_size=16, seq_len=12, device="cpu")
    target = memory_model.predict(TINY_1M, method("qlora"), **kwargs)["peak_mb"]
    for name in ("lora", "adalora", "prefix"):
        sized, info = budget.match(method(name), TINY_1M, "memory", **kwargs)
        assert info["matched"] and info["target"] == target
        assert memory_model.predict(TINY_1M, sized, **kwargs)["peak_mb"] <= target
        bigger = budget.resize(method(name), info["value"] + 1)
        assert memory_model.predict(TINY_1M, bigger, **kwargs)["peak_mb"] > target
    sized, info = budget.match(method("qlora-fp4"), QWEN_7B, "memory", batch_size=1, seq_len=512)
    assert info["matched"] and sized["peft"]["r"] == 16  # same memory as NF4 at the same rank


def test_a_job_with_budget_params_trains_the_sized_method(tmp_path):
    result = run_in_process(tmp_path, ["method=adalora", "budget=params", *FAST, "train.max_steps=10",
                                       "eval.before=false", "eval.validation=false"])
    assert result["status"] == "ok", result["error"]
    m = result["metrics"]
    assert m["budget"]["matched"] and m["budget"]["value"] == 16
    assert m["trainable_params"] == m["budget"]["achieved"]  # what ran is what was sized
    assert m["trainable_params"] == pytest.approx(m["budget"]["target"], rel=0.01)
    assert result["config"]["budget"] == "params" and result["config"]["method"]["peft"]["init_r"] == 24


def test_report_has_a_verdict_section_per_budget_view(tmp_path):
    from test_report import Page, fake_result

    from harness.report import build_report

    n = 0
    for view in ("default", "params", "memory"):
        for name, score, size in [("qlora", 0.5, 16), ("lora", 0.6, 23), ("full", 0.9, None)]:
            for seed in (0, 1):
                result = fake_result("small", name, seed, score=score + 0.01 * seed)
                result["config"]["budget"] = view
                if view != "default":
                    result["metrics"]["budget"] = {
                        "budget": view, "matched": size is not None, "knob": "peft.r" if size else None,
                        "value": size, "default": 16, "target": 1, "achieved": 1,
                        "reason": None if size else "full fine-tuning has no size knob"}
                job = tmp_path / "sweep" / f"{n}_job"
                job.mkdir(parents=True)
                (job / "result.json").write_text(json.dumps(result))
                n += 1
    page = Page(build_report([tmp_path / "sweep"], tmp_path / "out").read_text())
    text = " ".join(page.text)
    for heading in ("Verdicts against QLoRA", "At equal trainable parameters", "At equal memory"):
        assert heading in text
    cells = page.tables["verdict"]
    assert cells.count("r=23") == 2 and cells.count("r=16") == 2  # lora and qlora in both views
    assert cells.count("not matched: full fine-tuning has no size knob") == 2
    assert cells.count("not comparable: not sized to the budget") == 2
    assert "budget" in page.tables["runs"] and "memory" in page.tables["runs"]


def test_the_equal_budget_sweep_composes():
    from harness.config import compose_jobs

    assert len(compose_jobs(["-m", "sweep=equal-budget"])) > 1
    text = (REPO / "sweeps" / "equal-budget.yaml").read_text()
    assert "budget: params,memory" in text and "python -m harness -m sweep=equal-budget" in text
