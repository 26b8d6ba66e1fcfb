"""One fine-tuning job, start to finish, in its own process (`run_child`).

The Hydra app (`python -m harness`) forks this process for every job from the job server
(harness/launch.py), so that each job's peak memory is its own, and hands it the resolved
config. The job loads the
task's data and the model (with `forgetting`, it measures the base model's loss on general
text), applies the method, scores the model before training, trains, scores it again (and
measures the general-text loss again), and writes `OUT_DIR/result.json` whatever happens:
`ok`, `oom`, `diverged` or `error`.

A job of several ranks (train.nproc_per_node > 1) runs this in each rank process
(harness/distributed.py): the model is sharded once the method is applied, each rank trains on
its share of every batch, and rank 0 alone writes the result.

Exit codes: 0 for ok/oom/diverged, 1 for error, 2 for a bad configuration (one line on
stderr, no result written), 3 for a result the disk refused (full, read-only: one line on
stderr naming the file; the sweep stops).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

from harness.errors import ConfigError, one_line, unwritable
from harness.results import (OUTCOMES_NAME, RESULT_NAME, environment, new_result, now, write_json_atomic,
                             write_jsonl_atomic)

log = logging.getLogger("harness.job")
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def pick_device(name: str):
    """The torch device `device=` names, made this process's current CUDA device (so that
    libraries that use "the current device" use it). A CUDA ordinal this process cannot see is
    a ConfigError naming the devices it can."""
    import torch

    if name == "auto":
        name = "cuda:0" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ConfigError(f"device={name!r}, but no CUDA device is available (allowed: auto, cpu)")
    count = torch.cuda.device_count()
    if (device.index or 0) >= count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ConfigError(f"device={name!r}: this process sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
                          + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""))
    device = torch.device("cuda", device.index or 0)
    torch.cuda.set_device(device)
    return device


def seed_everything(seed: int, deterministic: bool) -> dict:
    """Seed Python, NumPy and torch; ask torch for deterministic algorithms. Returns what was set."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    return {
        "seed": seed,
        "deterministic_algorithms": deterministic,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "data_order": "length-grouped shuffle seeded by `seed`",
    }


def has_native_bf16(device) -> bool:
    """Whether the device computes in bfloat16 natively: a GPU that supports it, a CPU with
    AVX512-BF16 or AMX. Elsewhere bf16 is emulated (on a CPU, about ten times slower than
    float32)."""
    import torch

    if device.type == "cuda":  # Ampere (8.0) and later; older GPUs emulate it (is_bf16_supported() says True)
        return bool(torch.version.hip) or torch.cuda.get_device_capability(device) >= (8, 0)
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    checks = [check for check in checks if check is not None]
    return not checks or any(check() for check in checks)  # a torch without the checks: assume it has


def without_emulated_bf16(method: dict, tcfg: dict, device) -> tuple[dict, dict]:
    """The method and training settings as they run on `device`: where bf16 is not native, the
    bf16 they ask for (the base weights' dtype, 4-bit compute dtype, autocast) runs in float32
    instead, as a user of such a device would run it; said in one line. The result records
    it (env.bf16_native, metrics.autocast_dtype) and the memory model predicts what runs."""
    if has_native_bf16(device):
        return method, tcfg
    asks = (method["base_dtype"] == "bfloat16" or tcfg["precision"] == "bf16"
            or (method.get("quantization") or {}).get("bnb_4bit_compute_dtype") == "bfloat16")
    if not asks:
        return method, tcfg
    log.warning("%s has no native bf16: the bf16 of this method and of train.precision runs in float32",
                "this GPU" if device.type == "cuda" else "this CPU (no AVX512-BF16 or AMX)")
    method = {**method, "base_dtype": "float32" if method["base_dtype"] == "bfloat16" else method["base_dtype"]}
    if method.get("quantization"):
        method["quantization"] = {k: "float32" if k == "bnb_4bit_compute_dtype" and v == "bfloat16" else v
                                  for k, v in method["quantization"].items()}
    return method, {**tcfg, "precision": "fp32"}


def autocast_for(device, precision: str):
    """A context factory: bf16 autocast for precision bf16 (see without_emulated_bf16), else none."""
    import contextlib
    import functools

    import torch

    if precision == "bf16":
        return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16), "bfloat16"
    return contextlib.nullcontext, None


def check_method_applies(method: dict, model_config, seq_len: int, device) -> None:
    """Refuse, before loading weights, a method that cannot work on this model or device."""
    name = method["name"]
    if method.get("requires_cuda") and device.type != "cuda":
        raise ConfigError(f"method {name!r} needs a CUDA GPU (device here: {device}); it cannot run on a CPU")
    if method.get("quantization") and not method.get("peft"):
        raise ConfigError(f"method {name!r}: a quantized base cannot be fully fine-tuned; add a `peft` block")
    if (method.get("peft") or {}).get("peft_type") == "ADAPTION_PROMPT":
        from peft.tuners.adaption_prompt.config import TRANSFORMERS_MODEL_CONFIG

        if model_config.model_type not in TRANSFORMERS_MODEL_CONFIG:
            raise ConfigError(f"method {name!r}: PEFT's adaption prompts (LLaMA-Adapter) support the model types "
                              f"{', '.join(TRANSFORMERS_MODEL_CONFIG)}, not {model_config.model_type!r}")
    virtual = (method.get("peft") or {}).get("num_virtual_tokens") or 0
    limit = getattr(model_config, "max_position_embeddings", None)
    if virtual and limit and virtual + seq_len > limit:
        raise ConfigError(
            f"method {name!r}: num_virtual_tokens={virtual} + train.seq_len={seq_len} exceeds "
            f"the model's max_position_embeddings={limit}"
        )


def adapter_bytes(model) -> int:
    """Bytes a checkpoint of the trained weights takes: the saved adapter for PEFT methods,
    the trainable tensors' bytes for full fine-tuning (not written: it can be many GB)."""
    from peft import PeftModel

    from harness import adapters
    from harness.distributed import world_size

    if world_size() > 1 or (not isinstance(model, PeftModel) and not adapters.has_adapters(model)):
        # sharded: the trainable tensors' bytes (what the saved adapter holds, less its header)
        return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    folder = Path(tempfile.mkdtemp(prefix="harness-adapter-"))
    try:
        if adapters.has_adapters(model):
            adapters.save_adapters(model, folder)
        else:
            with warnings.catch_warnings():  # PEFT takes AdaLoRA's ranks pruned to 0 for unsaved FSDP shards
                warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape")
                model.save_pretrained(folder)
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def training_flops(model, model_config, method: dict, examples: list[dict], device, tokens_per_s,
                   tokens_per_step: float) -> dict:
    """FLOPs per token, achieved TFLOP/s and MFU of this training (see harness/flops.py)."""
    import torch

    from harness import flops, peft_types
    from harness.methods import PROJECTION_KEYS, projected_weights

    prompt, prefix = peft_types.virtual_tokens(method.get("peft"))
    frozen, trainable, encoder = flops.matmul_weights(model)
    seq_len = sum(len(e["input_ids"]) for e in examples) / len(examples)
    per_token = flops.training_flops_per_token(model_config, frozen, trainable, seq_len=seq_len,
                                               prompt_tokens=prompt, prefix_tokens=prefix, encoder=encoder)
    peft = method.get("peft") or {}
    if peft.get("peft_type") == "ADAPTION_PROMPT":  # LLaMA-Adapter: forward-only lower layers, adapter attention
        adapted = peft_types.TYPES["ADAPTION_PROMPT"].backward_layers(peft, model_config.num_hidden_layers)
        per_token += flops.adaption_prompt_flops(model_config, peft["adapter_len"], adapted, seq_len)
    if method["optimizer"]["name"] in PROJECTION_KEYS:  # GaLore's and APOLLO's projections, per token
        per_token += flops.projection_step_flops(projected_weights(model), method["optimizer"]) / tokens_per_step
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return flops.utilization(per_token, tokens_per_s, properties.name, properties.multi_processor_count)
    return flops.utilization(per_token, tokens_per_s, None)


def sized_for_budget(model_config, method: dict, budget_name: str, tcfg: dict, longest: int, device,
                     reference: str = "qlora"):
    """The method with its size knob matched to the `reference` method's (the report's
    baseline) trainable parameters or predicted memory (harness/budget.py), and a record of
    what was done."""
    from harness import budget, memory_model

    positions = getattr(model_config, "max_position_embeddings", None)
    try:
        sized, info = budget.match(method, model_config.to_dict(), budget_name, batch_size=tcfg["batch_size"],
                                   seq_len=longest, limit=positions - tcfg["seq_len"] if positions else None,
                                   reference=reference, **memory_model.training_setting(tcfg, device.type))
    except memory_model.UnsupportedModel as e:
        raise ConfigError(f"budget={budget_name} sizes methods with the memory model, which cannot model this one: {e}")
    if info["matched"]:
        log.info("budget=%s: %s=%s (default %s)", budget_name, info["knob"], info["value"], info["default"])
    else:
        log.warning("budget=%s: not matched, running the method's own settings: %s", budget_name, info["reason"])
    return sized, info


def predicted_memory(model_config, method: dict, tcfg: dict, longest: int, device) -> dict:
    """The memory model's prediction for this job (harness/memory_model.py): the peak in MiB
    and its breakdown, for the longest batch (padded to its longest example)."""
    from harness import memory_model

    try:
        p = memory_model.predict(model_config.to_dict(), method, batch_size=tcfg["batch_size"], seq_len=longest,
                                 **memory_model.training_setting(tcfg, device.type))
    except memory_model.UnsupportedModel as e:
        log.warning("no memory prediction: %s", e)
        return {"predicted_peak_memory_mb": None, "predicted_memory": None}
    return {"predicted_peak_memory_mb": p["peak_mb"], "predicted_memory": p}


@dataclass
class Setup:
    """What a job prepares before its model loads (a bad task or method setting fails here,
    before any weight is read): the method and training settings as they run, the task's data
    and metric, the model's source, config and tokenizer, and the tokenized training set."""
    method: dict
    tcfg: dict
    splits: dict
    metric: object
    source: str
    model_config: object
    tokenizer: object
    examples: list
    longest: int  # tokens of the longest training example


def prepare(config: dict, device, metrics: dict) -> Setup:
    """Data first, then the model's config and tokenizer, the method checked against them (and
    sized to a budget), and the memory model's prediction, made before the model loads so that
    an out-of-memory result carries it too."""
    from transformers import AutoConfig

    from harness.data import tokenize_examples
    from harness.metrics import load_metric
    from harness.models import load_tokenizer, resolve_model_source
    from harness.tasks import load_task

    model_cfg, task_cfg = config["model"], config["task"]
    method, tcfg = without_emulated_bf16(config["method"], config["train"], device)
    splits, metric = load_task(task_cfg), load_metric(task_cfg["metric"])
    source = resolve_model_source(model_cfg)
    try:
        model_config = AutoConfig.from_pretrained(source, revision=model_cfg["revision"],
                                                  trust_remote_code=model_cfg.get("trust_remote_code", False))
    except OSError as e:
        raise OSError(f"cannot load model {source!r}: {e}") from e
    check_method_applies(method, model_config, tcfg["seq_len"], device)
    tokenizer = load_tokenizer(source, model_cfg["revision"], model_cfg.get("trust_remote_code", False),
                               model_cfg.get("pad_token"))
    examples, dropped = tokenize_examples(splits["train"], tokenizer, tcfg["seq_len"])
    if not examples:
        raise ConfigError(f"train.seq_len={tcfg['seq_len']} is shorter than every training example")
    metrics["train_examples"], metrics["train_examples_dropped"] = len(examples), dropped
    longest = max(len(e["input_ids"]) for e in examples)
    if config.get("budget", "default") != "default":  # size the method to the baseline's budget
        method, metrics["budget"] = sized_for_budget(model_config, method, config["budget"], tcfg, longest, device,
                                                     config.get("report", {}).get("baseline", "qlora"))
        check_method_applies(method, model_config, tcfg["seq_len"], device)
    metrics.update(predicted_memory(model_config, method, tcfg, longest, device))
    return Setup(method, tcfg, splits, metric, source, model_config, tokenizer, examples, longest)


class Evaluator:
    """Everything a job scores, on a clock of its own (`seconds`): the task's splits, the
    capability benchmark (`capability=`) and the loss on general text (`forgetting=`); each
    scored example's outcome is appended to `outcomes` (predictions.jsonl). Its data loads when
    it is made, before the model; `use(model, autocast)` says what to score."""

    def __init__(self, config: dict, setup: Setup, device, outcomes: list):
        from harness.metrics import load_metric
        from harness.tasks import general_texts, load_task

        self.config, self.setup, self.device, self.outcomes = config, setup, device, outcomes
        self.forgetting, self.capability = config.get("forgetting"), config.get("capability")
        self.forgetting_texts = general_texts(self.forgetting) if self.forgetting else None
        if self.capability:
            self.capability_test = load_task(self.capability)["test"]
            self.capability_metric = load_metric(self.capability["metric"])
        self.seconds = 0.0
        self.model = self.autocast = None

    def use(self, model, autocast) -> None:
        self.model, self.autocast = model, autocast

    def _scored(self, task: dict, metric, dataset, split: str, stage: str):
        from harness.distributed import gathered_root
        from harness.evaluation import SCORERS

        started = time.time()
        with gathered_root(self.model):
            value, samples, per_example = SCORERS[task["scoring"]](
                self.model, self.setup.tokenizer, dataset, metric, task["metric"],
                batch_size=self.config["eval"]["batch_size"], max_new_tokens=task["max_new_tokens"],
                device=self.device, autocast=self.autocast)
        self.outcomes.extend({"split": split, "stage": stage, **o} for o in per_example)
        self.seconds += time.time() - started
        return value, samples

    def task(self, stage: str, split: str = "test"):
        """The task's score of `split` and a few samples of predictions."""
        return self._scored(self.config["task"], self.setup.metric, self.setup.splits[split], split, stage)

    def capability_score(self, stage: str) -> float:
        return self._scored(self.capability, self.capability_metric, self.capability_test, "capability", stage)[0]

    def general_loss(self) -> float:
        from harness.evaluation import text_loss

        started = time.time()
        value = text_loss(self.model, self.setup.tokenizer, self.forgetting_texts,
                          max_tokens=self.forgetting["max_tokens"], batch_size=self.forgetting["batch_size"],
                          device=self.device, autocast=self.autocast)
        self.seconds += time.time() - started
        return value


def load(setup: Setup, config: dict, device, sampler):
    """The model as the method needs it loaded (dtype, quantization); the sampler counts its
    file-mapped weights and moves to the "prepare" phase."""
    import torch

    from harness.distributed import world_size
    from harness.models import load_model

    model_cfg = config["model"]
    # several ranks: each loads the model on the CPU; sharding moves its shard to its device
    model = load_model(setup.source, model_cfg["revision"], dtype=getattr(torch, setup.method["base_dtype"]),
                       quantization=setup.method.get("quantization"),
                       device=torch.device("cpu") if world_size() > 1 else device,
                       trust_remote_code=model_cfg.get("trust_remote_code", False))
    sampler.note_model(model)
    sampler.phase("prepare")  # the model is loaded: the method is applied, scores before training
    return model


def score_base_model(evaluator: Evaluator, metrics: dict) -> None:
    """The base model, as loaded for this method, before the method changes it: general-text
    loss (forgetting) and the capability benchmark."""
    if evaluator.forgetting:
        metrics["forgetting_loss_before"] = evaluator.general_loss()
        log.info("general-text loss before training (%s): %.4f", evaluator.forgetting["name"],
                 metrics["forgetting_loss_before"])
    if evaluator.capability:
        metrics["capability_before"] = evaluator.capability_score("before")
        log.info("capability (%s) before training: %.4f", evaluator.capability["name"], metrics["capability_before"])


def with_method(model, setup: Setup, config: dict, device, sampler, metrics: dict):
    """The method applied; its parameter counts and weight bytes recorded."""
    from harness import measure
    from harness.data import one_epoch
    from harness.methods import apply_method
    from harness.models import checkpoint_files

    weights = checkpoint_files(setup.source, config["model"]["revision"]) if setup.method.get("loftq_init") else []
    model = apply_method(model, setup.method, max_steps=setup.tcfg["max_steps"],
                         gradient_checkpointing=setup.tcfg["gradient_checkpointing"], weights_files=weights,
                         init_batches=lambda: one_epoch(setup.examples, setup.tcfg["batch_size"], config["seed"],
                                                        setup.tokenizer.pad_token_id, device))
    sampler.note_model(model)
    if (setup.method.get("peft") or {}).get("init_lora_weights") == "eva":
        # EVA's ranks are known once it has initialised: the prediction is redone with them
        ranks = dict(model.peft_config["default"].rank_pattern)
        metrics["eva_rank_pattern"] = ranks
        method = {**setup.method, "peft": {**setup.method["peft"], "rank_pattern": ranks}}
        metrics.update(predicted_memory(setup.model_config, method, setup.tcfg, setup.longest, device))
    metrics.update(measure.count_params(model))
    metrics.update(measure.weight_bytes(model))
    # A real architecture with random weights measures memory and speed; its scores mean nothing.
    # So does a task that scores nothing (task=lengths).
    metrics["score_meaningful"] = (config["model"].get("init", "pretrained") != "random"
                                   and config["task"]["scoring"] != "none")
    return model


def fine_tune(model, setup: Setup, config: dict, device, autocast, sampler, metrics: dict, started: float,
              eval_seconds: float):
    """Train, with the sampler in its "train" phase (the headline peak) and the step timer.
    The job's time until training starts, less its `eval_seconds` of scoring, is its setup
    time (`started`: when its process was launched). Returns the optimizer."""
    from harness import distributed, measure
    from harness.data import batch_stream
    from harness.methods import make_optimizer
    from harness.train import lr_scheduler, train

    tcfg = setup.tcfg
    metrics["lr"] = tcfg["lr"] * tcfg.get("lr_scale", 1.0)
    optimizer = make_optimizer(model, setup.method["optimizer"], metrics["lr"], tcfg["weight_decay"],
                               tcfg["adamw_impl"])
    scheduler = lr_scheduler(optimizer, tcfg["schedule"], tcfg["warmup_steps"], tcfg["max_steps"])
    timer = measure.StepTimer(device, config["measure"]["warmup_steps"])
    batches = batch_stream(setup.examples, tcfg["batch_size"], config["seed"], setup.tokenizer.pad_token_id, device)
    world = distributed.world_size()
    if world > 1:  # every rank draws the same global batches and takes its share
        batches = distributed.rank_batches(batches, distributed.rank(), world)
    sampler.phase("train")  # the headline peak: training's (harness/measure.py)
    train_start = time.time()
    metrics["wall_setup_s"] = train_start - started - eval_seconds
    losses = train(model, optimizer, scheduler, batches, max_steps=tcfg["max_steps"],
                   grad_accum=tcfg["grad_accum"], max_grad_norm=tcfg["max_grad_norm"], timer=timer,
                   autocast=autocast, log_every=tcfg["log_every"], compile=tcfg["compile"], record=metrics,
                   probe=sampler.probe, world_size=world)
    metrics["wall_train_s"] = time.time() - train_start
    metrics.update(distributed.per_rank_memory(sampler.stop()) if world > 1 else sampler.stop())
    metrics.update(timer.summary())
    metrics.update(train_loss_first=losses[0], train_loss_last=losses[-1], train_losses=losses)
    return optimizer


def training_metrics(model, optimizer, setup: Setup, device, metrics: dict) -> None:
    """What training leaves to record: FLOPs and MFU, the optimizer's state, AdaLoRA's ranks."""
    from harness.distributed import world_size
    from harness.methods import adamw_impl_used, optimizer_state_bytes, optimizer_state_dtypes

    mean_length = sum(len(e["input_ids"]) for e in setup.examples) / len(setup.examples)
    per_device = metrics["tokens_per_s"] / world_size() if metrics["tokens_per_s"] else None  # MFU over all ranks
    metrics.update(training_flops(model, setup.model_config, setup.method, setup.examples, device, per_device,
                                  setup.tcfg["batch_size"] * setup.tcfg["grad_accum"] * mean_length))
    metrics["optimizer"] = setup.method["optimizer"]["name"]
    metrics["adamw_impl"] = adamw_impl_used(optimizer)
    if setup.tcfg["adamw_impl"] != "default" and metrics["adamw_impl"] is None:
        log.warning("train.adamw_impl=%s applies to torch's AdamW; %s has one implementation",
                    setup.tcfg["adamw_impl"], metrics["optimizer"])
    metrics["optimizer_state_bytes"] = optimizer_state_bytes(optimizer)
    metrics["optimizer_state_dtypes"] = optimizer_state_dtypes(optimizer)
    if hasattr(model, "peft_config") and setup.method["peft"]["peft_type"] == "ADALORA":
        pattern = model.peft_config["default"].rank_pattern or {}
        metrics["adalora_final_ranks"] = {k: int(sum(v)) for k, v in pattern.items()}
    metrics["adapter_bytes"] = adapter_bytes(model)


def score_fine_tuned_model(evaluator: Evaluator, config: dict, metrics: dict) -> None:
    """The fine-tuned model: validation (for choosing learning rates; the test split stays
    unseen by that choice) and test scores, general-text loss and capability again."""
    metric = config["task"]["metric"]
    if config["eval"].get("validation"):
        metrics["validation_score"], _ = evaluator.task("after", "validation")
    metrics["score"], metrics["score_samples"] = evaluator.task("after")
    if metrics["score"] is not None:
        log.info("score after training: %s=%.4f", metric, metrics["score"])
    if evaluator.forgetting:
        metrics["forgetting_loss_after"] = evaluator.general_loss()
        metrics["forgetting"] = metrics["forgetting_loss_after"] - metrics["forgetting_loss_before"]
        log.info("general-text loss after training: %.4f (forgetting %+.4f)", metrics["forgetting_loss_after"],
                 metrics["forgetting"])
    if evaluator.capability:
        metrics["capability_after"] = evaluator.capability_score("after")
        metrics["capability_change"] = metrics["capability_after"] - metrics["capability_before"]
        log.info("capability (%s) after training: %.4f (change %+.4f)", evaluator.capability["name"],
                 metrics["capability_after"], metrics["capability_change"])


def train_and_score(config: dict, device, metrics: dict, sampler, started: float, outcomes: list) -> None:
    """Everything a job measures, filled into `metrics` as soon as it is known, and each
    scored example's outcome appended to `outcomes`. `started` is when the job's process was
    launched (time.time()); wall times are split into setup (process start, imports, model
    load, data), training and evaluation."""
    from harness import distributed

    setup = prepare(config, device, metrics)
    evaluator = Evaluator(config, setup, device, outcomes)
    model = load(setup, config, device, sampler)
    autocast, metrics["autocast_dtype"] = autocast_for(device, setup.tcfg["precision"])
    evaluator.use(model, autocast)
    score_base_model(evaluator, metrics)
    model = with_method(model, setup, config, device, sampler, metrics)
    if distributed.world_size() > 1:
        model = distributed.shard(model, device)
    evaluator.use(model, autocast)
    if config["eval"]["before"]:
        metrics["score_before"], _ = evaluator.task("before")
        if metrics["score_before"] is not None:
            log.info("score before training: %s=%.4f", config["task"]["metric"], metrics["score_before"])
    metrics["wall_eval_s"] = evaluator.seconds
    optimizer = fine_tune(model, setup, config, device, autocast, sampler, metrics, started, evaluator.seconds)
    training_metrics(model, optimizer, setup, device, metrics)
    score_fine_tuned_model(evaluator, config, metrics)
    metrics["wall_eval_s"] = evaluator.seconds


def import_libraries() -> None:
    """The job server's modules (harness.launch.PRELOAD), imported here when the job runs in
    a process not forked from it (tests, harness.repro in-process): a no-op otherwise."""
    import importlib

    from harness.launch import PRELOAD

    for name in PRELOAD:
        importlib.import_module(name)


def run_job(config: dict, out_dir: Path, command: str = "", overrides: list[str] = (),
            launched_at: float | None = None) -> dict:
    """Run one job and write `out_dir/result.json`; returns the result. Raises ConfigError
    (and writes nothing) when the configuration cannot run."""
    started = launched_at or time.time()
    from harness.train import Diverged

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    import_libraries()  # before the memory baseline, so library code is not counted as the job's
    result = new_result(config)
    metrics = result["metrics"]
    outcomes: list[dict] = []
    try:  # the device's first calls: a CUDA error there is the job's result too, not a crash
        device, sampler = start_on_device(config, result, command, list(overrides))
    except ConfigError:
        raise
    except Exception as e:
        log.error("the device failed before the job started:\n%s", traceback.format_exc())
        result.update(status="oom" if is_out_of_memory(e) else "error", error=f"{type(e).__name__}: {one_line(e)}")
        result["env"] = result["env"] or environment(None, command, list(overrides), {})
        return finish(result, out_dir, outcomes, started)
    try:
        train_and_score(config, device, metrics, sampler, started, outcomes)
        result["status"] = "ok"
    except ConfigError:
        raise
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (see run_child): record, then stop
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)  # let the result be written
        result.update(status="cancelled", error=f"cancelled by {e.args[0] if e.args else 'SIGINT'}")
    except Diverged as e:
        result.update(status="diverged", error=str(e))
        metrics.update(diverged_step=e.step, train_losses=e.losses)
    except Exception as e:
        if is_out_of_memory(e) or sampler.exceeded_mb is not None:
            message = (f"memory limit exceeded: {sampler.exceeded_mb:,.0f} MiB in use, over memory_limit_mb="
                       f"{sampler.limit_mb:g}" if sampler.exceeded_mb is not None else f"{type(e).__name__}: {e}")
            if metrics.get("predicted_peak_memory_mb"):
                message += f" (predicted need: {metrics['predicted_peak_memory_mb']:,.0f} MiB)"
            result.update(status="oom", error=message.strip())
        else:
            log.error("job failed:\n%s", traceback.format_exc())
            result.update(status="error", error=f"{type(e).__name__}: {e}")
    finally:
        for key, value in sampler.stop().items():  # on failure, the peak so far; after training, kept as
            if metrics.get(key) is None:             # training recorded it (across ranks: the highest rank's)
                metrics[key] = value
    return finish(result, out_dir, outcomes, started)


def start_on_device(config: dict, result: dict, command: str, overrides: list[str]):
    """The job's device (this rank's, across ranks), seeded, its facts in `result["env"]`, and
    the memory sampler started on it: everything before training that asks the device."""
    import torch

    from harness import distributed
    from harness.measure import MemorySampler, release_freed_cpu_memory

    world = distributed.world_size()
    device = distributed.init(config["device"]) if world > 1 else pick_device(config["device"])
    if device.type == "cpu" and os.environ.get("HARNESS_CPU_THREADS"):  # set by the local-gpus launcher
        torch.set_num_threads(int(os.environ["HARNESS_CPU_THREADS"]))
    determinism = seed_everything(config["seed"], config["deterministic"])
    result["env"] = environment(device, command, overrides, determinism)
    result["env"]["bf16_native"] = has_native_bf16(device)
    if world > 1:
        result["env"]["launch"].update(distributed.launch_facts(device))
    if device.type == "cpu":
        result["env"]["malloc_mmap_threshold"] = release_freed_cpu_memory(
            config["measure"].get("cpu_mmap_threshold_kb"))
    sampler = MemorySampler(device, config["measure"]["sample_interval_s"], config.get("memory_limit_mb")).start()
    return device, sampler


# What running out of memory says when it does not come as torch.OutOfMemoryError: a cuBLAS or
# cuDNN workspace that cannot be allocated (RuntimeError), an asynchronous CUDA error
# (torch.AcceleratorError, a RuntimeError), NCCL's buffers ("Cuda failure 'out of memory'"),
# torch's CPU allocator.
OOM_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                "cudaErrorMemoryAllocation", "CUDA_ERROR_OUT_OF_MEMORY", "can't allocate memory")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from (libraries wrap it: transformers while
    loading, accelerate), is running out of memory."""
    import torch

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
            return True
        if isinstance(error, RuntimeError) and any(m.lower() in str(error).lower() for m in OOM_MESSAGES):
            return True
        error = error.__cause__ or error.__context__
    return False


def finish(result: dict, out_dir: Path, outcomes: list, started: float) -> dict:
    """Complete the job's result and write it (rank 0; another rank writes how it ended)."""
    from harness import distributed

    result["metrics"]["wall_total_s"] = time.time() - started
    result["env"]["end_time"] = now()
    if distributed.rank() != 0:  # rank 0 writes the job's result; another says how it ended if not ok
        if result["status"] != "ok":
            write_json_atomic(out_dir / distributed.rank_result_name(distributed.rank()),
                              {"status": result["status"], "error": result["error"]})
        return result
    if outcomes:  # first, so that a whole result.json never names a missing or torn file
        write_jsonl_atomic(out_dir / OUTCOMES_NAME, outcomes)
        result["outcomes"] = {"file": OUTCOMES_NAME, "rows": len(outcomes)}
    write_json_atomic(out_dir / RESULT_NAME, result)
    return result


UNWRITABLE_EXIT = 3  # the job's result could not be written (see the module's docstring)


def setup_logging(out_dir: Path | None) -> None:
    """The job's log lines on stderr and in its folder's job.log (`out_dir` None: stderr only,
    for a model build)."""
    logging.raiseExceptions = False  # a full disk: no traceback per log line (the result's write says it)
    handlers = [logging.StreamHandler(sys.stderr)]
    if out_dir is not None:
        handlers.append(logging.FileHandler(out_dir / "job.log"))
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, handlers=handlers, force=True)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # bitsandbytes' CPU 8-bit matmul warns on every call that it casts inputs to fp16.
    warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast")


def die_with_parent() -> None:
    """On Linux, have the kernel send this process SIGTERM when its parent (the job server)
    dies, so a killed sweep leaves no job running on: the job records itself as cancelled and
    exits (a rerun then runs it again)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_child(payload: dict, out_dir: str) -> None:
    """Body of a job process: run the job, exit 0 (ok/oom/diverged), 1 (error or cancelled)
    or 2 (bad config)."""
    die_with_parent()
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)  # SIGTERM cancels like Ctrl-C
    os.environ.update(payload.get("env", {}))  # e.g. the GPU this job may use (before CUDA starts)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(out_dir)
    result = run_payload(payload, out_dir)
    sys.exit(1 if result["status"] in ("error", "cancelled") else 0)


def run_payload(payload: dict, out_dir: Path, say_config_error: bool = True) -> dict:
    """run_job on a job's payload; returns its result. A bad configuration exits 2 (said in one
    line, with `say_config_error`), a result the disk refused exits 3 (said in one line)."""
    try:
        return run_job(payload["config"], out_dir, payload.get("command", ""), payload.get("overrides", []),
                       payload.get("launched_at"))
    except ConfigError as e:
        if say_config_error:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if (stop := unwritable(e)) is None:
            raise
        print(f"error: {stop}", file=sys.stderr)
        sys.exit(UNWRITABLE_EXIT)
