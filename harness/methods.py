"""Methods: turn a `conf/method/*.yaml` into a trainable model and its optimizer.

A method config is data:
  base_dtype    dtype the (unquantized) base weights are loaded in
  quantization  keyword arguments of transformers' BitsAndBytesConfig, or null
  peft          keyword arguments of the PEFT config class named by `peft_type` (or BOTTLENECK:
                the harness's own bottleneck adapters, harness/adapters.py), or null (full)
  optimizer     name and settings of the optimizer
The only glue here: AdaLoRA's step schedule defaults, and clear errors when a method
cannot apply to the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

from harness.errors import ConfigError

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "galore_adamw", "apollo_adamw")
# The optimizers that keep Adam's moments in a low-rank projection of each attention/MLP
# weight's gradient: their settings (the parameter group keys of galore-torch's GaLoreAdamW and
# apollo-torch's APOLLOAdamW) and allowed projection types
PROJECTION_KEYS = {"galore_adamw": ("rank", "update_proj_gap", "scale", "proj_type"),
                   "apollo_adamw": ("rank", "update_proj_gap", "scale", "proj_type", "scale_type")}
PROJ_TYPES = {"galore_adamw": ("std", "reverse_std", "right", "left", "full"),
              "apollo_adamw": ("std", "reverse_std", "right", "left")}
APOLLO_SCALE_TYPES = ("channel", "tensor")
PROJECTING = {"galore_adamw": "GaLore", "apollo_adamw": "APOLLO"}


def adalora_schedule(peft_kwargs: dict, max_steps: int) -> dict:
    """AdaLoRA's budget schedule is in steps: fill in what is left null from train.max_steps.

    Defaults follow the AdaLoRA paper's shape: no pruning for the first 10% of steps, ranks
    reallocated until 30% before the end, then frozen for the final fine-tuning phase.
    """
    kw = dict(peft_kwargs)
    kw["total_step"] = kw.get("total_step") or max_steps
    if kw.get("tinit") is None:
        kw["tinit"] = max(1, round(0.1 * kw["total_step"]))
    if kw.get("tfinal") is None:
        kw["tfinal"] = max(1, round(0.3 * kw["total_step"]))
    if kw["tinit"] >= kw["total_step"] - kw["tfinal"]:
        raise ConfigError(
            f"adalora: tinit={kw['tinit']} + tfinal={kw['tfinal']} leave no steps to reallocate "
            f"ranks in total_step={kw['total_step']}; raise train.max_steps or lower them"
        )
    return kw


QUANT_TYPES = ("fp4", "nf4")  # bitsandbytes' 4-bit data types
DTYPE_KEYS = {"bnb_4bit_compute_dtype": ("bfloat16", "float16", "float32"),
              "bnb_4bit_quant_storage": ("uint8", "bfloat16", "float16", "float32")}


def quantization_config(quantization: dict):
    """transformers' BitsAndBytesConfig of a method's `quantization` block (HqqConfig with
    `quant_method: hqq`). BitsAndBytesConfig takes unknown keys and unknown 4-bit types silently
    (and fails later, deep in loading): both are refused here with one ConfigError naming the
    key and what is allowed."""
    import inspect

    import torch
    from transformers import BitsAndBytesConfig

    if "quant_method" in quantization:
        return hqq_config(quantization)

    allowed = [k for k in inspect.signature(BitsAndBytesConfig).parameters if k != "kwargs"]
    for key, value in quantization.items():
        if key not in allowed:
            raise ConfigError(f"method.quantization.{key}: not a BitsAndBytesConfig setting "
                              f"(allowed: {', '.join(allowed)})")
        if key in DTYPE_KEYS and value not in DTYPE_KEYS[key]:
            raise ConfigError(f"method.quantization.{key}={value!r}: allowed values are {', '.join(DTYPE_KEYS[key])}")
    kwargs = {k: getattr(torch, v) if k in DTYPE_KEYS else v for k, v in quantization.items()}
    if kwargs.get("bnb_4bit_quant_type", "fp4") not in QUANT_TYPES:
        raise ConfigError(f"method.quantization.bnb_4bit_quant_type={kwargs['bnb_4bit_quant_type']!r}: "
                          f"allowed values are {', '.join(QUANT_TYPES)}")
    try:
        return BitsAndBytesConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"method.quantization: {e}")


HQQ_NBITS = (1, 2, 3, 4, 8)


def hqq_config(quantization: dict):
    """transformers' HqqConfig of a `quantization: {quant_method: hqq, nbits: ..., ...}` block.
    transformers' loader cannot quantize with it yet (5.x), so load_model quantizes the loaded
    model with hqq's own AutoHQQHFModel (harness/models.py)."""
    import importlib.util
    import inspect

    from transformers import HqqConfig

    if quantization["quant_method"] != "hqq":
        raise ConfigError(f"method.quantization.quant_method={quantization['quant_method']!r}: allowed values are "
                          "hqq (leave it out for bitsandbytes)")
    allowed = ["quant_method", *(k for k in inspect.signature(HqqConfig).parameters if k != "kwargs")]
    for key in quantization:
        if key not in allowed:
            raise ConfigError(f"method.quantization.{key}: not an HqqConfig setting (allowed: {', '.join(allowed)})")
    if quantization.get("nbits", 4) not in HQQ_NBITS:
        raise ConfigError(f"method.quantization.nbits={quantization['nbits']!r}: allowed values are "
                          f"{', '.join(map(str, HQQ_NBITS))}")
    if importlib.util.find_spec("hqq") is None:
        raise ConfigError("method.quantization.quant_method=hqq needs the hqq package: pip install hqq")
    try:
        return HqqConfig(**{k: v for k, v in quantization.items() if k != "quant_method"})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"method.quantization: {e}")


def _check_choices(config, given: dict, prefix: str) -> None:
    """Values of a PEFT config's Literal-typed fields (e.g. LoRA's `bias`) that it would take."""
    import typing

    try:
        hints = typing.get_type_hints(type(config))
    except Exception:  # an annotation typing cannot evaluate: PEFT checks what it checks
        return
    for key, value in given.items():
        hint = hints.get(key)
        if typing.get_origin(hint) is typing.Literal and value not in typing.get_args(hint):
            raise ConfigError(f"{prefix}.{key}={value!r}: allowed values are "
                              f"{', '.join(map(str, typing.get_args(hint)))}")


def peft_config(method_cfg: dict, max_steps: int):
    """The PEFT config object of a method (a BottleneckConfig for the harness's adapters)."""
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING, PeftType

    from harness import adapters

    kwargs = dict(method_cfg["peft"])
    peft_type = kwargs.pop("peft_type")
    own = peft_type == adapters.PEFT_TYPE  # the harness's bottleneck adapters, not PEFT's
    if own:
        config_cls = adapters.BottleneckConfig
    else:
        try:
            config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(peft_type)]
        except ValueError:
            allowed = ", ".join([*(t.value for t in PeftType), adapters.PEFT_TYPE])
            raise ConfigError(f"method.peft.peft_type={peft_type!r} is not a PEFT type (allowed: {allowed})")
    if peft_type == "ADALORA":
        kwargs = adalora_schedule(kwargs, max_steps)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    for key in kwargs:
        if key not in fields:
            owner = "harness.adapters'" if own else "PEFT's"
            raise ConfigError(f"method.peft.{key}: not a setting of {owner} {config_cls.__name__} "
                              f"(allowed: {', '.join(sorted(fields))})")
    if isinstance(kwargs.get("eva_config"), dict):  # PEFT would drop an unknown key silently
        from peft import EvaConfig

        allowed = {f.name for f in dataclasses.fields(EvaConfig)}
        for key in kwargs["eva_config"]:
            if key not in allowed:
                raise ConfigError(f"method.peft.eva_config.{key}: not a setting of PEFT's EvaConfig "
                                  f"(allowed: {', '.join(sorted(allowed))})")
    try:
        config = config_cls(**kwargs) if own else config_cls(task_type="CAUSAL_LM", **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"method {method_cfg['name']!r}: bad PEFT setting: {e}")
    _check_choices(config, kwargs, "method.peft")
    return config


OPTIMIZER_KEYS = ("name", "betas", "eps", "loraplus_lr_ratio", *PROJECTION_KEYS["apollo_adamw"])


def check_settings(method_cfg: dict, train_cfg: dict) -> None:
    """Build what a job hands to the libraries for this method (BitsAndBytesConfig, the PEFT
    config, the optimizer on a stand-in parameter), so that a bad value is one ConfigError
    naming its key before any job starts, not a traceback from inside one."""
    import torch

    if method_cfg.get("quantization"):
        quantization_config(method_cfg["quantization"])
    if method_cfg.get("peft"):
        peft_config(method_cfg, train_cfg["max_steps"])
    optimizer = method_cfg["optimizer"]
    for key in optimizer:
        if key not in OPTIMIZER_KEYS:
            raise ConfigError(f"method.optimizer.{key}: not an optimizer setting (allowed: {', '.join(OPTIMIZER_KEYS)})")
    ratio = optimizer.get("loraplus_lr_ratio")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio < 1):
        raise ConfigError(f"method.optimizer.loraplus_lr_ratio={ratio!r}: must be a number >= 1 (LoRA+: B's "
                          "learning rate over A's), or null")
    if ratio is not None and (method_cfg.get("peft") or {}).get("peft_type") != "LORA":
        raise ConfigError(f"method.optimizer.loraplus_lr_ratio: LoRA+ needs a LoRA method (peft_type LORA), not "
                          f"{(method_cfg.get('peft') or {}).get('peft_type') or 'full fine-tuning'}")
    name = optimizer["name"]
    for key in PROJECTION_KEYS["apollo_adamw"]:
        if key in optimizer and key not in PROJECTION_KEYS.get(name, ()):
            needs = " or ".join(f"method.optimizer.name={o}" for o, keys in PROJECTION_KEYS.items() if key in keys)
            raise ConfigError(f"method.optimizer.{key}: a setting of a projecting optimizer; it needs {needs}")
    if name in PROJECTION_KEYS:
        check_projection(optimizer, method_cfg)
    lr = train_cfg["lr"] * train_cfg["lr_scale"]
    try:
        make_optimizer(torch.nn.Linear(1, 1), optimizer, lr, train_cfg["weight_decay"], train_cfg["adamw_impl"])
    except (TypeError, ValueError, RuntimeError) as e:  # torch's and bitsandbytes' checks: name the key
        named = {"beta": ("method.optimizer.betas", optimizer.get("betas")),
                 "epsilon": ("method.optimizer.eps", optimizer.get("eps")),
                 "learning rate": ("train.lr * train.lr_scale", lr),
                 "weight_decay": ("train.weight_decay", train_cfg["weight_decay"])}
        key, value = next((kv for word, kv in named.items() if word in str(e).lower()), ("method.optimizer", optimizer))
        raise ConfigError(f"{key}={value!r}: {e}")


def check_projection(optimizer: dict, method_cfg: dict) -> None:
    """GaLore's and APOLLO's settings."""
    name = optimizer["name"]
    for key in ("rank", "update_proj_gap"):
        value = optimizer.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"method.optimizer.{key}={value!r}: must be a positive integer")
    scale = optimizer.get("scale")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0:
        raise ConfigError(f"method.optimizer.scale={scale!r}: must be a positive number")
    if optimizer.get("proj_type") not in PROJ_TYPES[name]:
        raise ConfigError(f"method.optimizer.proj_type={optimizer.get('proj_type')!r}: allowed values are "
                          f"{', '.join(PROJ_TYPES[name])}")
    if name == "apollo_adamw" and optimizer.get("scale_type") not in APOLLO_SCALE_TYPES:
        raise ConfigError(f"method.optimizer.scale_type={optimizer.get('scale_type')!r}: allowed values are "
                          f"{', '.join(APOLLO_SCALE_TYPES)}")
    if method_cfg.get("peft") or method_cfg.get("quantization"):
        raise ConfigError(f"method.optimizer.name={name}: {PROJECTING[name]} trains every weight of a "
                          "full-precision model; set method.peft and method.quantization to null")


def projected_weights(model) -> list:
    """The weights GaLore and APOLLO project: every Linear of the decoder's attention and MLP
    blocks (as transformers' Trainer targets them); embeddings, norms and lm_head keep plain AdamW."""
    import torch

    return [m.weight for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and (".self_attn." in name or ".mlp." in name) and m.weight.requires_grad]


def apply_method(model, method_cfg: dict, *, max_steps: int, gradient_checkpointing: bool,
                 weights_files: list[str] = (), init_batches=None):
    """Make the loaded model trainable as the method says; returns the model to train.
    `weights_files` (the checkpoint's safetensors files) are read by LoftQ's initialisation;
    `init_batches` (a callable returning a list of model-input batches) feeds a data-driven
    initialisation (EVA)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from harness import adapters

    gc_kwargs = {"use_reentrant": False}
    if method_cfg.get("quantization"):
        # Casts norms/embeddings to fp32 and enables input grads, as the QLoRA recipe does.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs=gc_kwargs,
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)

    if not method_cfg.get("peft"):
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    if method_cfg["peft"]["peft_type"] == "ADAPTION_PROMPT" and method_cfg["peft"].get("adapter_layers") is None:
        # LLaMA-Adapter with adapter_layers null: every layer (PEFT needs the number)
        method_cfg = {**method_cfg, "peft": {**method_cfg["peft"], "adapter_layers": model.config.num_hidden_layers}}
    config = peft_config(method_cfg, max_steps)
    try:
        if isinstance(config, adapters.BottleneckConfig):
            model = adapters.add_adapters(model, config)
        else:
            model = get_peft_model(model, config)
    except ValueError as e:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)})
        raise ConfigError(
            f"method {method_cfg['name']!r} cannot apply to this model: {e} "
            f"(the model's linear layers: {', '.join(linear)})"
        )
    if method_cfg.get("loftq_init"):
        loftq_init(model, weights_files)
    if getattr(config, "init_lora_weights", None) == "eva":
        initialize_eva(model, config, init_batches())
    return model


def loftq_init(model, weights_files: list[str]) -> None:
    """LoftQ (Li et al. 2023), as PEFT's replace_lora_weights_loftq does it: each 4-bit layer's
    LoRA starts as the rank-r SVD of its quantization error (the original weight, read from the
    checkpoint's safetensors `weights_files` — one file, or the shards of a sharded one — less
    the dequantized 4-bit one), B = U sqrt(S), A = sqrt(S) V^T, so that base + B A starts near the
    original weights when LoRA's scale (lora_alpha / r) is 1. Computed here on the weights'
    device, on every device: PEFT's own runs on CUDA or XPU only, and finds the checkpoint by
    itself, without the model's revision (a pinned Hub model reads another commit's weights, or
    none offline) and without a sharded local folder's index."""
    import bitsandbytes as bnb
    import torch
    from peft.tuners.lora import Linear4bit
    from safetensors import safe_open

    if not weights_files:
        raise ConfigError("method.loftq_init: LoftQ reads the original weights from the model's safetensors "
                          "checkpoint, which this model does not have")
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(safe_open(f, framework="pt")) for f in weights_files]
        where = {key: f for f in files for key in f.keys()}
        for name, module in model.named_modules():
            if not isinstance(module, Linear4bit):
                continue
            key = name.removeprefix("base_model.model.") + ".weight"
            if key not in where:
                raise ConfigError(f"method.loftq_init: the checkpoint has no tensor {key!r} for the 4-bit layer {name}")
            device = module.weight.device
            weight = where[key].get_tensor(key).to(device).float()
            quantized = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            u, s, vh = torch.linalg.svd(weight - quantized, full_matrices=False)
            r = module.r["default"]
            root = s[:r].sqrt()
            module.lora_A["default"].weight.data = (root[:, None] * vh[:r]).to(module.lora_A["default"].weight.dtype)
            module.lora_B["default"].weight.data = (u[:, :r] * root).to(module.lora_B["default"].weight.dtype)


EVA_MAX_BATCHES = 2000  # forward passes EVA's incremental SVDs may take to converge


def initialize_eva(model, config, batches: list[dict]) -> None:
    """EVA (Paischer et al. 2024): each LoRA A starts as the top right-singular vectors of its
    layer's inputs over training batches (PEFT's initialize_lora_eva_weights, which cycles
    through `batches` until every SVD has converged), and rank moves to the layers whose inputs
    explain the most variance (up to r x rho per layer, the total kept). PEFT skips a batch with
    fewer token rows than components, forever if every batch has fewer, and sets no limit on
    the passes: both end here in one line instead of a hang."""
    from peft import initialize_lora_eva_weights
    from peft.tuners.lora.eva import forward_fn_dict
    from peft.tuners.tuners_utils import cast_adapter_dtype

    eva = config.eva_config
    needed = round(config.r * eva.rho)

    def rows(batch):  # the token rows PEFT's language-modelling hooks feed the SVD
        mask = batch["attention_mask"].bool()
        return int((mask & (batch["labels"] != eva.label_mask_value) if eva.use_label_mask else mask).sum())

    most = max(rows(b) for b in batches)
    if most < needed:
        raise ConfigError(f"method.peft.eva_config: EVA needs at least r x rho = {needed} token rows per batch "
                          f"for its SVDs and the largest training batch has {most} (raise train.batch_size"
                          + (", or set method.peft.eva_config.use_label_mask=false)" if eva.use_label_mask else ")"))
    passes = 0

    def forward(model, inputs):
        nonlocal passes
        passes += 1
        if passes > EVA_MAX_BATCHES:
            raise RuntimeError(f"EVA's SVDs did not converge in {EVA_MAX_BATCHES} batches "
                               f"(method.peft.eva_config.tau={eva.tau}: a lower tau converges sooner)")
        return forward_fn_dict(model, inputs)

    initialize_lora_eva_weights(model, dataloader=batches, forward_fn=forward, show_progress_bar=False)
    # PEFT rebuilds each module whose rank moved in the base weights' dtype (bf16), where
    # get_peft_model keeps adapters in fp32: back to fp32, as every other LoRA trains
    cast_adapter_dtype(model, "default")
    moved = model.peft_config["default"].rank_pattern
    log.info("EVA: its SVDs converged in %d batches; %d modules moved from rank %d (to %s)", passes, len(moved),
             config.r, f"{min(moved.values())}-{max(moved.values())}" if moved else "-")


def _is_linear(module) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear)


# train.adamw_impl -> torch.optim.AdamW's keyword arguments ("default": torch picks foreach on
# CUDA and the for-loop on a CPU)
ADAMW_IMPLS = {"default": {}, "forloop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def make_optimizer(model, optimizer_cfg: dict, lr: float, weight_decay: float, adamw_impl: str = "default"):
    """The method's optimizer. `adamw_impl` picks torch AdamW's implementation; bitsandbytes'
    8-bit optimizers have one implementation each and ignore it (see `adamw_impl_used`). With
    `loraplus_lr_ratio`, LoRA+ (PEFT's create_loraplus_optimizer): LoRA's B matrices learn
    that many times faster than its A matrices."""
    import torch

    name = optimizer_cfg["name"]
    kwargs = {"lr": lr, "betas": tuple(optimizer_cfg.get("betas", (0.9, 0.999))), "eps": optimizer_cfg.get("eps", 1e-8),
              "weight_decay": weight_decay}
    if name == "adamw":
        cls, kwargs = torch.optim.AdamW, {**kwargs, **ADAMW_IMPLS[adamw_impl]}
    elif name in PROJECTION_KEYS:
        cls = None
    elif name in ("adamw_8bit", "paged_adamw_8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit if name == "adamw_8bit" else bnb.optim.PagedAdamW8bit
    else:
        raise ConfigError(f"method.optimizer.name={name!r} is unknown (allowed: {', '.join(OPTIMIZERS)})")
    if name in PROJECTION_KEYS:  # Adam states in a rank-r projection of the gradient
        projected = projected_weights(model)
        ids = {id(p) for p in projected}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        group = {key: optimizer_cfg[key] for key in PROJECTION_KEYS[name]}
        if name == "galore_adamw":  # GaLore: an SVD of the gradient every update_proj_gap steps
            from galore_torch import GaLoreAdamW as cls
        else:  # APOLLO: a random projection; the update is the raw gradient scaled per channel
            from apollo_torch import APOLLOAdamW as cls

            group["proj"] = "random"
        return cls([{"params": rest}, {"params": projected, **group}], no_deprecation_warning=True, **kwargs)
    ratio = optimizer_cfg.get("loraplus_lr_ratio")
    if ratio is not None:
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(model, cls, loraplus_lr_ratio=ratio, loraplus_weight_decay=weight_decay,
                                         **kwargs)
    return cls([p for p in model.parameters() if p.requires_grad], **kwargs)


def adamw_impl_used(optimizer) -> str | None:
    """Which implementation torch's AdamW runs ("fused", "foreach", "forloop"); None for
    other optimizers. Under "default" torch decides at the first step, by device."""
    import torch

    if type(optimizer) is not torch.optim.AdamW:
        return None
    group = optimizer.param_groups[0]
    if group.get("fused"):
        return "fused"
    if group.get("foreach") is None:  # torch's default: foreach for CUDA tensors, else the for-loop
        from torch.optim.optimizer import _default_to_fused_or_foreach

        params = [p for g in optimizer.param_groups for p in g["params"]]
        return "foreach" if _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)[1] else "forloop"
    return "foreach" if group["foreach"] else "forloop"


def optimizer_state_bytes(optimizer) -> int:
    """Bytes held by the optimizer's state tensors (e.g. AdamW's two moments), and by GaLore's
    projection matrices: the whole storage each one keeps alive (galore-torch keeps a slice of
    the SVD's U or Vh, which holds all of it)."""
    import torch

    total = sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
                if isinstance(t, torch.Tensor))
    storages = {}
    for state in optimizer.state.values():
        matrix = getattr(state.get("projector"), "ortho_matrix", None)
        for t in matrix if isinstance(matrix, list) else [matrix]:
            if isinstance(t, torch.Tensor):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return total + sum(storages.values())


def optimizer_state_dtypes(optimizer) -> list[str]:
    import torch

    return sorted(
        {
            str(t.dtype).removeprefix("torch.")
            for state in optimizer.state.values()
            for t in state.values()
            if isinstance(t, torch.Tensor) and t.numel() > 1
        }
    )
