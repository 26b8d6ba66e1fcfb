"""Every method trains a tiny model for real, and its result file is valid and plausible."""

import re
import statistics
from pathlib import Path

import pytest
import yaml

from conftest import FAST, REPO, run_in_process
from harness import results

# every method config that runs on a CPU (those without `requires_cuda`)
METHODS = sorted(p.stem for p in (REPO / "conf/method").glob("*.yaml")
                 if not yaml.safe_load(p.read_text()).get("requires_cuda"))
# The methods that do not improve on the zero-shot score of the default task at the default
# steps, and why. Prompt and prefix tuning learn the least of all methods at small scale
# (Lester et al. 2021: prompt tuning matches fine-tuning only at ~10B parameters): on the
# 0.9M-parameter tiny-1m in 80 steps their loss falls (prompt 2.6 -> 1.3, prefix 1.9 -> 1.0
# nats) but not to where greedy answers come out right; prompt tuning's random virtual tokens
# also take the zero-shot score to 0.00 (measured 2026-12-07, Intel CPU with AMX: prompt 0.00
# -> 0.00, prefix 0.20 -> 0.20; every other method 0.20 -> 0.42-0.90). P-tuning, whose
# virtual tokens come from a trained MLP, likewise: loss 4.1 -> 0.93, score 0.00 -> 0.00 at
# each of 1e-3, 3e-3, 9e-3 and 3e-2.
NOT_LEARNING_AT_DEFAULTS = {"prompt", "prefix", "ptuning"}


@pytest.fixture(scope="module")
def method_results(tmp_path_factory):
    """Each method's default job (the default model, task and steps), zero-shot score included."""
    out = tmp_path_factory.mktemp("methods")
    return {m: run_in_process(out / m, [f"method={m}"]) for m in METHODS}


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_and_writes_a_valid_result(method, method_results):
    result = method_results[method]
    results.validate(result)
    assert result["status"] == "ok", result["error"]
    assert result["method"] == method
    m = result["metrics"]
    losses = m["train_losses"]
    assert len(losses) == result["config"]["train"]["max_steps"] == 80
    # The loss falls: the median of the last 5 steps is at least 0.15 nats below that of the
    # first 5 (a median, so that one spike does not decide).
    assert statistics.median(losses[-5:]) < statistics.median(losses[:5]) - 0.15
    assert m["train_loss_last"] == losses[-1] and m["train_loss_first"] == losses[0]
    assert 0 <= m["score_before"] <= 1 and 0 <= m["score"] <= 1 and 0 <= m["validation_score"] <= 1
    assert m["lr"] == result["config"]["train"]["lr"] * result["config"]["train"]["lr_scale"]
    assert m["tokens_per_s"] > 0 and m["step_time_ms"] > 0
    assert m["peak_memory_mb"] >= 0 and m["memory_source"] == "cpu_malloc_in_use"
    assert 0 < m["trainable_params"] <= m["total_params"]
    assert m["adapter_bytes"] > 0 and m["optimizer_state_bytes"] > 0
    assert result["env"]["packages"]["torch"] and result["env"]["end_time"]


@pytest.mark.parametrize("method", sorted(set(METHODS) - NOT_LEARNING_AT_DEFAULTS))
def test_method_improves_on_its_zero_shot_score_at_the_default_steps(method, method_results):
    """Every method that learns the default task at the default steps (QLoRA, the baseline of
    every verdict, included) answers more held-out problems after training than before."""
    m = method_results[method]["metrics"]
    assert m["score"] > m["score_before"], (m["score_before"], m["score"])


def test_the_methods_said_not_to_learn_at_the_defaults_are_methods():
    assert NOT_LEARNING_AT_DEFAULTS <= set(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_measured_weight_bytes_are_the_predicted_ones(method, method_results):
    """The memory model's weight bytes (from the config alone) against the loaded model's."""
    m = method_results[method]["metrics"]
    assert m["predicted_memory"]["weight_bytes"] == pytest.approx(m["weight_bytes"], rel=0.02)
    assert m["predicted_memory"]["trainable_params"] == m["trainable_params"]
    assert m["predicted_peak_memory_mb"] > m["predicted_memory"]["weights_mb"]


def test_parameter_counts_order_methods(method_results):
    trainable = {m: r["metrics"]["trainable_params"] for m, r in method_results.items()}
    total = method_results["full"]["metrics"]["total_params"]
    assert trainable["full"] == total  # every parameter
    assert trainable["full"] > 3 * trainable["lora"]
    assert trainable["qlora"] == trainable["lora8"] == trainable["lora"]  # the same LoRA
    assert trainable["prompt"] < trainable["lora"] / 10
    assert trainable["prefix"] < trainable["lora"] / 10
    assert trainable["prompt"] == 20 * 128  # 20 virtual tokens x hidden size


def test_quantized_weights_are_packed(method_results):
    bits = {m: method_results[m]["metrics"]["quantized_bits_per_weight"] for m in ("qlora", "lora8", "lora")}
    # NF4 + double quantization: 4 + 8/64 + 32/(64*256) = 4.127 bits per weight (QLoRA paper).
    assert bits["qlora"] == pytest.approx(4.127, abs=0.01)
    # int8 + one fp32 scale per output row: 8 + 32/in_features, in_features 128..384.
    assert 8.0 < bits["lora8"] < 8.3
    assert bits["lora"] is None
    weight = {m: method_results[m]["metrics"]["weight_bytes"] for m in ("qlora", "lora8", "lora")}
    assert weight["qlora"] < weight["lora8"] < weight["lora"]


def test_newer_quantized_methods_hold_4bit_weights(method_results):
    for method in ("qdora", "qlora-fp4"):
        assert method_results[method]["metrics"]["quantized_bits_per_weight"] == pytest.approx(4.127, abs=0.01)
    trainable = {m: r["metrics"]["trainable_params"] for m, r in method_results.items()}
    assert trainable["dora"] > trainable["lora"]  # + one magnitude per output feature
    assert trainable["rslora"] == trainable["pissa"] == trainable["lora"]
    assert trainable["ia3"] < trainable["vera"] < trainable["lora"]


def test_hqq_methods_hold_2_3_and_4_bit_weights_with_their_group_scales(method_results):
    """LoRA on HQQ bases: real bits per weight are the packed bits plus a scale and a zero point
    per group of 64 in the compute dtype (bf16, or fp32 where bf16 is emulated): 4.5, 3.7
    (3-bit: ten values per int32 word, 3.2 bits) and 2.5 at bf16. The same LoRA as qlora trains
    on each, and every HQQ layer is a frozen matmul in the FLOP count (the same FLOPs as qlora)."""
    for bits in (2, 3, 4):
        r = method_results[f"lora-hqq{bits}"]
        compute_bits = 16 if r["env"]["bf16_native"] else 32
        packed = {2: 2.0, 3: 3.2, 4: 4.0}[bits]
        assert r["metrics"]["quantized_bits_per_weight"] == pytest.approx(packed + 2 * compute_bits / 64, abs=0.06)
        assert r["metrics"]["trainable_params"] == method_results["qlora"]["metrics"]["trainable_params"]
        assert r["metrics"]["total_params"] == method_results["qlora"]["metrics"]["total_params"]
        assert r["metrics"]["flops_per_token"] == pytest.approx(method_results["qlora"]["metrics"]["flops_per_token"])


def test_8bit_adamw_keeps_a_quarter_of_the_optimizer_state(method_results):
    full = method_results["full"]["metrics"]["optimizer_state_bytes"]
    for method in ("full-adam8bit", "full-paged"):
        m = method_results[method]["metrics"]
        assert m["optimizer"] == method_results[method]["config"]["method"]["optimizer"]["name"]
        assert 0.2 < m["optimizer_state_bytes"] / full < 0.32
        assert "uint8" in m["optimizer_state_dtypes"]


def test_loraplus_trains_loras_b_matrices_16_times_faster_than_its_a_matrices(model_cache):
    """LoRA+ is LoRA with PEFT's create_loraplus_optimizer: every B matrix in a group at 16x
    the learning rate of the A matrices; the same adapter as LoRA's."""
    import torch

    from conftest import compose
    from harness.methods import apply_method, make_optimizer
    from harness.models import load_model, resolve_model_source

    cfg = compose(["method=loraplus"])
    model = load_model(resolve_model_source(cfg["model"]), None, dtype=torch.bfloat16, quantization=None,
                       device="cpu")
    model = apply_method(model, cfg["method"], max_steps=10, gradient_checkpointing=False)
    optimizer = make_optimizer(model, cfg["method"]["optimizer"], lr=2e-4, weight_decay=0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert {lr for n, lr in lr_of.items() if "lora_A" in n} == {2e-4}
    assert [lr for n, lr in lr_of.items() if "lora_B" in n] == pytest.approx([16 * 2e-4] * 4 * 7)  # 4 layers x 7
    assert len(lr_of) == sum(p.requires_grad for p in model.parameters())  # every trainable tensor, once


def test_miss_trains_one_block_per_layer_of_rank_by_output_width(method_results):
    m = method_results["miss"]["metrics"]
    # tiny-1m: 4 layers; q, o: 128 -> 128; k, v: 128 -> 64; gate, up: 128 -> 384; down: 384 -> 128
    assert m["trainable_params"] == 4 * 64 * (128 + 64 + 64 + 128 + 384 + 384 + 128)
    assert method_results["loraplus"]["metrics"]["trainable_params"] == method_results["lora"]["metrics"][
        "trainable_params"]


@pytest.mark.parametrize("method", ["loraplus", "miss", "ptuning", "adapter", "adapter-pfeiffer", "lora-hqq3",
                                    "llama-adapter", "eva"])
def test_a_trained_adapter_saves_reloads_and_answers_the_same(method, tmp_path, model_cache):
    """The methods added in issue 20: a few training steps, save_pretrained, then PEFT's
    from_pretrained onto a fresh base model gives the same logits and the same greedy answers
    (the bottleneck adapters: harness.adapters' save and load, in PEFT's file names; EVA: its
    moved ranks travel in adapter_config.json's rank_pattern)."""
    import torch
    from peft import PeftModel

    from conftest import compose
    from harness import adapters
    from harness.data import batch_stream, one_epoch, tokenize_examples
    from harness.evaluation import generate_answers
    from harness.methods import apply_method, make_optimizer
    from harness.models import load_model, load_tokenizer, resolve_model_source
    from harness.tasks import load_task

    cfg = compose([f"method={method}"])
    source = resolve_model_source(cfg["model"])
    tokenizer = load_tokenizer(source, None)
    splits = load_task(cfg["task"])

    def base():  # a fresh base model, quantized as the method says (HQQ: deterministic)
        return load_model(source, None, dtype=torch.bfloat16, quantization=cfg["method"]["quantization"],
                          device=torch.device("cpu"))

    examples, _ = tokenize_examples(splits["train"], tokenizer, 64)
    model = apply_method(base(), cfg["method"], max_steps=10, gradient_checkpointing=False,
                         init_batches=lambda: one_epoch(examples, 8, 0, tokenizer.pad_token_id, "cpu"))
    optimizer = make_optimizer(model, cfg["method"]["optimizer"], lr=cfg["method"]["lr"], weight_decay=0.0)
    batches = batch_stream(examples, 8, 0, tokenizer.pad_token_id, "cpu")
    model.train()
    for _ in range(5):
        loss = model(**next(batches)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if adapters.has_adapters(model):
        adapters.save_adapters(model, tmp_path / "adapter")
        assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                          "adapter_model.safetensors"]
        reloaded = adapters.load_adapters(base(), tmp_path / "adapter")
    else:
        model.save_pretrained(tmp_path / "adapter")
        reloaded = PeftModel.from_pretrained(base(), tmp_path / "adapter")
    prompts = list(splits["test"]["prompt"][:8])
    batch = tokenizer(prompts[:1], return_tensors="pt")
    with torch.no_grad():
        model.eval(), reloaded.eval()
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)
        assert not torch.equal(base()(**batch).logits, model(**batch).logits)  # it was trained
    answers = [generate_answers(m, tokenizer, prompts, batch_size=8, max_new_tokens=4, device="cpu")
               for m in (model, reloaded)]
    assert answers[0] == answers[1] and all(isinstance(a, str) for a in answers[0])


def test_bottleneck_adapters_sit_after_attention_and_mlp_and_start_as_the_identity(model_cache):
    """Houlsby's adapters wrap o_proj and down_proj of every layer (Pfeiffer's down_proj only):
    2 * width * bottleneck + bottleneck + width trainable parameters each, the base frozen;
    with the zero-initialised up-projection the model's logits are the base model's."""
    import torch

    from conftest import compose
    from harness.adapters import BottleneckAdapter
    from harness.methods import apply_method
    from harness.models import load_model, resolve_model_source

    for method, targets in (("adapter", {"o_proj", "down_proj"}), ("adapter-pfeiffer", {"down_proj"})):
        cfg = compose([f"method={method}", "method.peft.bottleneck_size=8"])
        source = resolve_model_source(cfg["model"])
        base = load_model(source, None, dtype=torch.bfloat16, quantization=None, device=torch.device("cpu"))
        ids = torch.randint(3, base.config.vocab_size, (2, 12))
        with torch.no_grad():
            before = base(input_ids=ids).logits
        model = apply_method(base, cfg["method"], max_steps=10, gradient_checkpointing=False)
        wrapped = {n.rsplit(".", 1)[-1]: m for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)}
        layers, h = model.config.num_hidden_layers, model.config.hidden_size
        assert set(wrapped) == targets
        assert sum(isinstance(m, BottleneckAdapter) for m in model.modules()) == len(targets) * layers
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert all(".adapter_" in n and p.dtype == torch.float32 for n, p in trainable.items())
        assert sum(p.numel() for p in trainable.values()) == len(targets) * layers * (2 * h * 8 + 8 + h)
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, before)


def test_eva_starts_lora_a_from_the_inputs_svd_and_moves_rank_keeping_the_total(model_cache, monkeypatch):
    """EVA: each LoRA A starts as the top right-singular vectors of its layer's inputs over the
    training batches (orthonormal rows; B zero, so the outputs are unchanged), rank moves between
    modules with the total kept and none above r x rho, as the rank_pattern the memory model
    reads says, and every adapter is fp32 (PEFT rebuilds moved ones in bf16). The two ways
    PEFT's loop would never end are one line each: batches with fewer token rows than
    components, and SVDs that do not converge."""
    import torch
    from peft.tuners.lora import LoraLayer

    from conftest import compose
    from harness import methods
    from harness.data import one_epoch, tokenize_examples
    from harness.errors import ConfigError
    from harness.models import load_model, load_tokenizer, resolve_model_source
    from harness.tasks import load_task

    cfg = compose(["method=eva"])
    method, peft = cfg["method"], cfg["method"]["peft"]
    source = resolve_model_source(cfg["model"])
    tokenizer = load_tokenizer(source, None)
    examples, _ = tokenize_examples(load_task(cfg["task"])["train"], tokenizer, 64)

    def base():
        return load_model(source, None, dtype=torch.bfloat16, quantization=None, device=torch.device("cpu"))

    def eva(model, batches, m=method):
        return methods.apply_method(model, m, max_steps=10, gradient_checkpointing=False, init_batches=lambda: batches)

    batches = one_epoch(examples, 16, 0, tokenizer.pad_token_id, "cpu")
    prompt = tokenizer(["12+30="], return_tensors="pt")
    with torch.no_grad():
        before = base()(**prompt).logits
    model = eva(base(), batches)
    pattern = model.peft_config["default"].rank_pattern
    adapted = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    ranks = {n: m.r["default"] for n, m in adapted.items()}
    assert ranks == {n: pattern.get(n, peft["r"]) for n in adapted}
    modules = model.config.num_hidden_layers * 7  # every Linear of every layer (all-linear)
    assert sum(ranks.values()) == peft["r"] * modules
    assert len(set(ranks.values())) > 1 and max(ranks.values()) <= peft["r"] * peft["eva_config"]["rho"]
    for m in adapted.values():
        a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0]), atol=5e-3, rtol=0)  # low-rank SVD: ~1e-3
        assert not b.any()
    with torch.no_grad():
        torch.testing.assert_close(model(**prompt).logits, before)

    few = [{k: v[:1, :3] for k, v in b.items()} for b in batches[:2]]  # 3 token rows a batch
    with pytest.raises(ConfigError, match=r"^method.peft.eva_config: EVA needs at least r x rho = 32 token rows "
                                          r"per batch for its SVDs and the largest training batch has 3 "
                                          r"\(raise train.batch_size\)$"):
        eva(base(), few)
    monkeypatch.setattr(methods, "EVA_MAX_BATCHES", 2)  # one pass to compare inputs, one SVD step
    with pytest.raises(RuntimeError, match=r"^EVA's SVDs did not converge in 2 batches \(method.peft.eva_config"
                                           r".tau=0.99: a lower tau converges sooner\)$"):
        eva(base(), batches)


def test_llama_adapter_trains_gated_prompts_in_the_top_layers_and_refuses_other_model_types():
    """LLaMA-Adapter: adapter_len x hidden prompts and a gate in each of the top N layers (every
    layer when adapter_layers is null), in the base dtype; a model type PEFT's adaption prompts
    do not support is refused in one line before any weights load."""
    import torch
    from transformers import Qwen2Config

    from conftest import compose
    from harness.errors import ConfigError
    from harness.job import check_method_applies
    from harness.methods import apply_method
    from harness.models import load_model, resolve_model_source

    for layers in (None, 2):
        cfg = compose(["method=llama-adapter", f"method.peft.adapter_layers={'null' if layers is None else layers}"])
        model = load_model(resolve_model_source(cfg["model"]), None, dtype=torch.bfloat16, quantization=None,
                           device=torch.device("cpu"))
        n, h = model.config.num_hidden_layers, model.config.hidden_size
        model = apply_method(model, cfg["method"], max_steps=10, gradient_checkpointing=False)
        trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        adapted = sorted({int(name.split(".layers.")[1].split(".")[0]) for name in trainable})
        assert adapted == list(range(n - (layers or n), n))
        assert sum(p.numel() for p in trainable.values()) == len(adapted) * (10 * h + 1)
        assert all(p.dtype == torch.bfloat16 for p in trainable.values())
    with pytest.raises(ConfigError, match="adaption prompts .* support the model types llama, mistral.*not 'qwen2'"):
        check_method_applies(cfg["method"], Qwen2Config(), 64, torch.device("cpu"))


@pytest.mark.parametrize("method", ["galore", "apollo"])
def test_galore_and_apollo_project_the_attention_and_mlp_weights_and_keep_small_moments(model_cache, method):
    """GaLore and APOLLO: every attention/MLP weight in the rank group (galore-torch's
    GaLoreAdamW, apollo-torch's APOLLOAdamW), the rest (embeddings, norms, lm_head) with plain
    AdamW; after a step each projected weight's moments are rank x max(m, n), and the recorded
    state bytes count the projection matrices (GaLore's: a slice of the SVD's U or Vh, whose
    whole storage stays alive; APOLLO's: a random rank x min(m, n) matrix)."""
    import torch

    from conftest import compose
    from harness.methods import apply_method, make_optimizer, optimizer_state_bytes, projected_weights
    from harness.models import load_model, resolve_model_source

    cfg = compose([f"method={method}", "model=tiny-5m", "model.init=random", "method.optimizer.rank=16"])
    model = load_model(resolve_model_source(cfg["model"]), None, dtype=torch.float32, quantization=None,
                       device="cpu")
    model = apply_method(model, cfg["method"], max_steps=10, gradient_checkpointing=False)
    optimizer = make_optimizer(model, cfg["method"]["optimizer"], lr=1e-4, weight_decay=0.0)
    assert type(optimizer).__module__.split(".")[0] == {"galore": "galore_torch", "apollo": "apollo_torch"}[method]
    rest, projected = optimizer.param_groups
    layers = model.config.num_hidden_layers
    assert len(projected["params"]) == 7 * layers and projected["rank"] == 16
    assert projected["params"] == projected_weights(model)
    assert len(rest["params"]) + len(projected["params"]) == len(list(model.parameters()))
    ids = torch.randint(3, model.config.vocab_size, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    for w in projected["params"]:
        m, n = w.shape
        moments = optimizer.state[w]["exp_avg"]
        assert moments.shape == ((m, 16) if m >= n else (16, n))  # 'std': the longer side kept
    plain = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    if method == "galore":
        matrices = sum(min(w.shape) ** 2 * 4 for w in projected["params"])  # U or Vh, whole
    else:
        matrices = sum(16 * min(w.shape) * 4 for w in projected["params"])
    assert optimizer_state_bytes(optimizer) == plain + matrices


def test_loftq_starts_each_4bit_layer_near_its_original_weights(model_cache, tmp_path, monkeypatch):
    """LoftQ: each 4-bit layer's LoRA is the rank-r SVD of its quantization error, as PEFT's own
    decomposition gives it (peft.utils.loftq_utils._low_rank_decomposition), so that base + B A
    (LoRA scale 1) is nearer the original weight than the 4-bit base alone. The harness computes
    it on every device (PEFT's replace_lora_weights_loftq runs on CUDA or XPU only, and reads a
    sharded or revision-pinned checkpoint wrongly), from one checkpoint file or its shards, of a
    folder or of a Hub id at its revision."""
    import bitsandbytes as bnb
    import torch
    from peft.tuners.lora import Linear4bit
    from peft.utils.loftq_utils import _low_rank_decomposition
    from safetensors.torch import load_file

    from conftest import compose
    from harness.errors import ConfigError
    from harness.methods import apply_method, loftq_init
    from harness.models import checkpoint_files, load_model, resolve_model_source

    cfg = compose(["method=loftq"])
    source = Path(resolve_model_source(cfg["model"]))
    model = load_model(str(source), None, dtype=torch.bfloat16, quantization=cfg["method"]["quantization"],
                       device=torch.device("cpu"))
    assert checkpoint_files(str(source), None) == [str(source / "model.safetensors")]
    model = apply_method(model, cfg["method"], max_steps=10, gradient_checkpointing=False,
                         weights_files=checkpoint_files(str(source), None))
    original = load_file(source / "model.safetensors")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    assert len(layers) == model.config.num_hidden_layers * 7
    for name, module in layers:
        weight = original[name.removeprefix("base_model.model.") + ".weight"].float()
        error = weight - bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        peft = _low_rank_decomposition(error, reduced_rank=module.r["default"])
        torch.testing.assert_close(a, peft["R"])
        torch.testing.assert_close(b, peft["L"])
        assert module.scaling["default"] == 1
        assert (error - b @ a).norm() < 0.9 * error.norm(), name
    initialised = {n: (m.lora_A["default"].weight.clone(), m.lora_B["default"].weight.clone()) for n, m in layers}

    def same_start(files):
        loftq_init(model, files)
        for name, module in layers:
            torch.testing.assert_close(module.lora_A["default"].weight, initialised[name][0], rtol=0, atol=0)
            torch.testing.assert_close(module.lora_B["default"].weight, initialised[name][1], rtol=0, atol=0)

    # the same weights as shards (model-0000N-of-0000M.safetensors and their index)
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(source).save_pretrained(sharded, max_shard_size="1MB")
    shards = checkpoint_files(str(sharded), None)
    assert len(shards) > 1 and all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", Path(f).name) for f in shards)
    same_start(shards)
    # a Hub id pinned to a revision, in the local Hub cache: that commit's files, not main's
    repo = tmp_path / "hub" / "models--org--tiny"
    pinned, newer = "a" * 40, "b" * 40
    for commit in (pinned, newer):
        (repo / "snapshots" / commit).mkdir(parents=True)
    for f in sharded.iterdir():
        (repo / "snapshots" / pinned / f.name).write_bytes(f.read_bytes())
    (repo / "snapshots" / newer / "model.safetensors").write_bytes(b"another commit")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(newer)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    from_hub = checkpoint_files("org/tiny", pinned)
    assert [Path(f).name for f in from_hub] == [Path(f).name for f in shards]
    assert all(f"snapshots/{pinned}/" in f for f in from_hub)
    same_start(from_hub)
    assert checkpoint_files("org/tiny", None) == [str(repo / "snapshots" / newer / "model.safetensors")]
    with pytest.raises(ConfigError, match=r"^method.loftq_init: LoftQ reads the original weights from the model's "
                                          r"safetensors checkpoint, which this model does not have$"):
        loftq_init(model, [])


def test_full_finetuning_names_its_optimizer_and_precision(method_results):
    m = method_results["full"]["metrics"]
    assert m["optimizer"] == "adamw"
    assert m["optimizer_state_dtypes"] == ["float32"]
    # AdamW keeps two fp32 moments per trainable parameter.
    assert m["optimizer_state_bytes"] >= 8 * m["trainable_params"]
    assert method_results["full"]["config"]["method"]["base_dtype"] == "float32"
    # bf16 autocast where the CPU has native bf16; elsewhere float32 (harness/job.py: without_emulated_bf16)
    assert m["autocast_dtype"] == ("bfloat16" if method_results["full"]["env"]["bf16_native"] else None)


def test_bf16_runs_in_float32_where_the_device_only_emulates_it():
    import torch

    from conftest import compose
    from harness.job import has_native_bf16, without_emulated_bf16

    config = compose(["method=qlora"])
    method, tcfg = without_emulated_bf16(config["method"], config["train"], torch.device("cpu"))
    if has_native_bf16(torch.device("cpu")):
        assert (method, tcfg) == (config["method"], config["train"])
    else:
        assert method["base_dtype"] == "float32" and tcfg["precision"] == "fp32"
        assert method["quantization"]["bnb_4bit_compute_dtype"] == "float32"
        assert method["quantization"]["bnb_4bit_quant_type"] == "nf4" and method["peft"] == config["method"]["peft"]
    assert config["method"]["base_dtype"] == "bfloat16"  # the config itself is left as asked


def test_adalora_reallocates_ranks(method_results):
    result = method_results["adalora"]
    ranks = result["metrics"]["adalora_final_ranks"]
    peft_cfg = result["config"]["method"]["peft"]
    assert len(ranks) == 4 * 7  # every linear layer of the 4 decoder layers
    assert all(0 <= r <= peft_cfg["init_r"] for r in ranks.values())
    assert min(ranks.values()) < max(ranks.values())  # ranks differ between layers
    # The final budget is the LoRA-comparable one: on average target_r per layer.
    assert sum(ranks.values()) <= peft_cfg["target_r"] * len(ranks)


def test_quantized_layers_hold_bitsandbytes_parameters(model_cache):
    import bitsandbytes as bnb
    import torch

    from conftest import compose
    from harness.methods import apply_method
    from harness.models import load_model, resolve_model_source

    for method, layer_type, param_type, dtype in [
        ("qlora", bnb.nn.Linear4bit, bnb.nn.Params4bit, torch.uint8),
        ("lora8", bnb.nn.Linear8bitLt, bnb.nn.Int8Params, torch.int8),
    ]:
        cfg = compose([f"method={method}"])
        source = resolve_model_source(cfg["model"])
        model = load_model(source, None, dtype=torch.bfloat16, quantization=cfg["method"]["quantization"],
                           device=torch.device("cpu"))
        model = apply_method(model, cfg["method"], max_steps=10, gradient_checkpointing=False)
        q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
        assert isinstance(q_proj.base_layer, layer_type)
        assert isinstance(q_proj.base_layer.weight, param_type)
        assert q_proj.base_layer.weight.dtype == dtype
        assert not q_proj.base_layer.weight.requires_grad
        assert q_proj.lora_A["default"].weight.requires_grad
        if method == "qlora":  # two 4-bit weights per byte
            assert q_proj.base_layer.weight.numel() == 128 * 128 // 2


def test_full_finetuning_of_the_default_model_beats_zero_shot(method_results):
    """The pretrained tiny model answers some held-out problems zero-shot; fine-tuning at the
    default size and steps clearly improves on that, so methods can differ in score (from
    0.18 to 0.5 with the tiny model pretrained on an AVX512-BF16 CPU, from 0.06 to 0.2 with
    the one pretrained on an AVX2 CPU: the pretraining comes out different)."""
    result = method_results["full"]  # the default job with method=full
    assert result["status"] == "ok"
    assert 0.0 < result["metrics"]["score_before"] < 0.5
    assert result["metrics"]["score"] >= result["metrics"]["score_before"] + 0.1


def test_lora_adapts_the_pretrained_tiny_model_far_better_than_a_random_one(tmp_path, method_results):
    """The point of pretraining the tiny models: at the same steps and settings, LoRA on the
    pretrained base scores far higher than LoRA on the same model with random weights."""
    from conftest import run_in_process

    scores = {"pretrained": method_results["lora"]["metrics"]["score"],  # the default job with method=lora
              "random": run_in_process(tmp_path, ["method=lora", "model.init=random"])["metrics"]["score"]}
    # 0.6 against at most 0.2 with the tiny model pretrained on an AVX512-BF16 CPU; 0.14 against
    # 0.04 with the weaker one pretrained on an AVX2 CPU
    assert scores["pretrained"] >= scores["random"] + 0.08 and scores["random"] <= 0.2, scores


# Published sizes of the shipped architectures (parameters, embeddings included).
PUBLISHED = {"smollm2-135m": 135e6, "smollm2-360m": 362e6, "smollm2-1.7b": 1.71e9, "qwen2.5-0.5b": 494e6,
             "qwen2.5-1.5b": 1.54e9, "qwen2.5-3b": 3.09e9, "qwen2.5-7b": 7.62e9, "llama-3.2-1b": 1.24e9,
             "llama-3.2-3b": 3.21e9, "llama-3.1-8b": 8.03e9, "llama-3.1-70b": 70.6e9, "qwen2.5-72b": 72.7e9}
UNPINNED = ("llama-3.1-70b", "qwen2.5-72b")  # added without Hub access: random weights unless a revision is given


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shipped_architectures_have_their_published_size(name):
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import compose
    from harness.models import ARCHITECTURES_DIR

    model_cfg = compose([f"model={name}"])["model"]
    init = "random" if name in UNPINNED else "pretrained"
    assert model_cfg["architecture"] == name and model_cfg["init"] == init and "/" in model_cfg["name_or_path"]
    arch = json.loads((ARCHITECTURES_DIR / f"{name}.json").read_text())
    config = AutoConfig.for_model(**{k: v for k, v in arch.items() if k != "architectures"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    count = sum(p.numel() for p in model.parameters())
    assert count == pytest.approx(PUBLISHED[name], rel=0.01)
    from harness.memory_model import parameter_count

    assert parameter_count(arch) == count  # the memory model's count, from the config alone


@pytest.mark.slow  # builds and loads a 0.5B model: run by .ci/run with -m slow
def test_a_real_architecture_with_random_weights_trains_quantized(tmp_path):
    """model=qwen2.5-0.5b model.init=random: no download, real 4-bit layers, scores flagged."""
    from conftest import run_in_process

    result = run_in_process(tmp_path, ["model=qwen2.5-0.5b", "model.init=random", "method=qlora",
                                       "train.max_steps=2", "train.batch_size=2", "task.n_test=1",
                                       "eval.validation=false", "eval.before=false", "measure.warmup_steps=1"])
    assert result["status"] == "ok", result["error"]
    m = result["metrics"]
    assert m["quantized_bits_per_weight"] == pytest.approx(4.127, abs=0.01)
    assert m["total_params"] > 490e6 and m["score_meaningful"] is False
    assert len(m["train_losses"]) == 2 and m["tokens_per_s"] > 0
