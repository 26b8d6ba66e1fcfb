"""Analytic memory model: the peak training memory of a job, predicted from its config alone.

`predict(arch, method, ...)` takes a model's config.json fields (no weights), a method config
(conf/method/*.yaml) and the training shape, and returns the predicted peak in MiB with its
breakdown. The planner (`python -m harness.plan`) and every job (`metrics.predicted_memory`)
use it. The terms, in bytes, with their sources:

weights      As stored. bf16 2 B and fp32 4 B per parameter. bitsandbytes quantizes the
             decoder's Linear weights only (not lm_head): LLM.int8 1 B per weight plus one
             fp32 scale per output row; 4-bit (NF4/FP4) 0.5 B per weight plus one absmax per
             block of 64 weights, fp32 (4.5 bits per weight), or with double quantization an
             8-bit absmax plus one fp32 scale per 256 blocks (4 + 8/64 + 32/(64*256) = 4.127
             bits; QLoRA paper, sec. 3). peft.prepare_model_for_kbit_training casts every
             other weight of a quantized model to fp32. PEFT keeps adapter weights in fp32
             (autocast_adapter_dtype).
gradients    One per trainable parameter, in its dtype.
optimizer    torch AdamW: two moments in the parameter's dtype (8 B per fp32 parameter).
             bitsandbytes 8-bit AdamW: 2 B per parameter plus an fp32 absmax per block of 256,
             for tensors of 4096 elements or more (smaller ones keep fp32 moments). AdaLoRA's
             rank allocator adds three fp32 importance averages per adapter parameter.
activations  What autograd saves for the backward pass, per token and layer (a Llama-style
             decoder layer: RMSNorm, attention, SwiGLU MLP). Korthikanti et al. 2022 (eq. 1)
             give 34*h + 5*a*s bytes for a GPT layer in 16-bit; this module re-derives the count
             for the layer as transformers implements it, under bf16 autocast, by what each op
             saves: each RMSNorm keeps its fp32 input (4h); fused (SDPA) attention keeps q, k, v,
             its output and an fp32 log-sum-exp per head, and the padding mask (no s*s score
             matrices; `attention="eager"` adds them); SwiGLU keeps the gate output, its SiLU
             and the up output (3 intermediate-size tensors). A Linear whose weight trains keeps
             its bf16 input. Adapters add what they keep per target module (harness/peft_types.py).
             Virtual tokens: prompt tuning runs v more tokens through every layer; prefix
             tuning lengthens keys and values to s + v. Gradient checkpointing keeps only each
             layer's input, and recomputes one layer at a time in the backward pass.
logits       bf16 logits, the fp32 log-probabilities the loss keeps, and their fp32 gradient
             at the start of the backward pass: (2 + 4 + 4) * V bytes per token.
backward     The backward pass's working set in a layer: gradients of two bf16 MLP
             intermediates and of the fp32 residual stream, (4*I + 4*h) bytes per token.
autocast     Under bf16 autocast, each fp32 weight that enters a matmul is cast to a bf16 copy
             that the backward pass keeps (full fine-tuning: 2 B per weight on top of 16).
overhead     A fixed runtime overhead: on CUDA, the caching allocator's slack and cuBLAS
             workspaces (torch's peak reserved memory is the headline); on CPU, what the
             process's allocator and kernels hold besides tensors (measured: see CPU_OVERHEAD).

Peak: the weights and optimizer states live throughout; on top of them comes the larger of
the forward/backward phase (activations + logits + autocast copies, + gradients already
accumulated when grad_accum > 1) and the optimizer step (gradients + the step's temporaries:
torch's multi-tensor AdamW on CUDA makes one more state-sized buffer, its per-tensor loop one
tensor's worth; bitsandbytes' 8-bit AdamW none on CUDA, 20 B per element of the largest tensor
on a CPU).
"""

from __future__ import annotations

import math

from harness import peft_types

MIB = 2**20

# Decoder families whose layer shapes this module knows (Llama-style: RMSNorm, rotary
# attention with grouped KV heads, SwiGLU MLP). Qwen2 adds biases to q/k/v; Qwen3 adds
# RMSNorms on q and k.
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# Fixed runtime overhead in MiB. CPU, on the basis of the CPU headline (malloc's bytes in use
# plus file-mapped weights, harness/measure.py): measured on tiny-13m, 2 cores, torch 2.13,
# batch 16 and 48, as measured minus the predicted tensors: 3-15 MiB for 13 methods (AdaLoRA
# 25-30, prompt tuning -10): the data and evaluation objects, oneDNN scratch and small
# library buffers. CUDA: the allocator's slack and cuBLAS workspace, an estimate that a GPU
# run must check.
CPU_OVERHEAD_MB = 10.0
CUDA_OVERHEAD_MB = 256.0
# What a GPU holds before the job's first tensor: the CUDA context of torch (not in the job's
# measured peak, whose baseline is taken after it, but in what must fit on the card).
CUDA_CONTEXT_MB = 512.0

NF4_BLOCK = 64           # bitsandbytes 4-bit block size (weights per absmax)
DQ_BLOCK = 256           # double quantization: absmaxes per second-level fp32 scale
ADAM8BIT_BLOCK = 256     # bitsandbytes 8-bit optimizer block size
ADAM8BIT_MIN_SIZE = 4096  # smaller tensors keep 32-bit states (bnb min_8bit_size)
# bitsandbytes' 8-bit AdamW on a CPU steps each tensor through fp32 torch ops (its states
# dequantized, the update, requantized): 20 B per element of the tensor being stepped, measured
# on bitsandbytes 0.50 (one 28M-element tensor: 540 MiB; a 2.4M one: 45 MiB)
ADAM8BIT_CPU_STEP_BYTES = 20


class UnsupportedModel(ValueError):
    """The memory model does not know this architecture."""


class UnsupportedMethod(UnsupportedModel):
    """The memory model does not know this method (a PEFT type or setting it does not model)."""


class MethodDoesNotApply(UnsupportedMethod):
    """A method that cannot run on this model at all (its jobs refuse it before loading)."""


# --------------------------------------------------------------------------- shapes


def layer_shapes(arch: dict) -> dict:
    """Shapes of a Llama-style decoder from its config.json fields."""
    model_type = arch.get("model_type", "llama")
    if model_type not in MODEL_TYPES:
        raise UnsupportedModel(f"model_type {model_type!r} (the memory model knows: {', '.join(MODEL_TYPES)})")
    h = arch["hidden_size"]
    heads = arch["num_attention_heads"]
    kv_heads = arch.get("num_key_value_heads") or heads
    head_dim = arch.get("head_dim") or h // heads
    q_dim, kv_dim, inter = heads * head_dim, kv_heads * head_dim, arch["intermediate_size"]
    qkv_bias = model_type == "qwen2" or bool(arch.get("attention_bias"))
    o_bias = bool(arch.get("attention_bias")) and model_type != "qwen2"
    mlp_bias = bool(arch.get("mlp_bias"))
    # (name, in_features, out_features, has_bias) of each Linear of one layer
    linears = [
        ("q_proj", h, q_dim, qkv_bias), ("k_proj", h, kv_dim, qkv_bias), ("v_proj", h, kv_dim, qkv_bias),
        ("o_proj", q_dim, h, o_bias),
        ("gate_proj", h, inter, mlp_bias), ("up_proj", h, inter, mlp_bias), ("down_proj", inter, h, mlp_bias),
    ]
    norms = 2 * h + (2 * head_dim if model_type == "qwen3" else 0)  # per layer
    return {
        "hidden": h, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "q_dim": q_dim,
        "kv_dim": kv_dim, "intermediate": inter, "layers": arch["num_hidden_layers"],
        "vocab": arch["vocab_size"], "tied": bool(arch.get("tie_word_embeddings", False)),
        "linears": linears, "norm_params": norms, "model_type": model_type,
    }


def parameter_count(arch: dict) -> int:
    """All parameters of the model (embeddings, lm_head unless tied, decoder, final norm)."""
    s = layer_shapes(arch)
    per_layer = sum(i * o + (o if b else 0) for _, i, o, b in s["linears"]) + s["norm_params"]
    embed = s["vocab"] * s["hidden"]
    return embed * (1 if s["tied"] else 2) + s["layers"] * per_layer + s["hidden"]


def targeted(shapes: dict, target_modules) -> list[tuple[str, int, int, bool]]:
    """The Linear layers of one decoder layer that a PEFT `target_modules` selects."""
    if target_modules in ("all-linear", None):
        return shapes["linears"]
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    return [lin for lin in shapes["linears"] if lin[0] in names]


# --------------------------------------------------------------------------- parameters


def peft_type(peft: dict) -> peft_types.PeftType:
    """The table entry of a PEFT config's type (harness/peft_types.py)."""
    kind = peft_types.TYPES.get(peft["peft_type"])
    if kind is None:
        raise UnsupportedMethod(f"peft_type {peft['peft_type']!r} is not modelled")
    reason = kind.not_modelled(peft)
    if reason:
        raise UnsupportedMethod(f"{reason} is not modelled")
    return kind


def adapter_params(shapes: dict, peft: dict | None, base_dtype: str = "bfloat16") -> tuple[int, int]:
    """(trainable adapter parameters, frozen adapter buffers) of a PEFT config, whole model,
    on base weights of `base_dtype`."""
    if not peft:
        return 0, 0
    return peft_type(peft).params(peft, shapes, targeted(shapes, peft.get("target_modules")), base_dtype)


# HQQ's packing (hqq.core.bitpack), by bits per weight: (values per word, bytes per word)
HQQ_PACKING = {8: (1, 1), 4: (2, 1), 3: (10, 4), 2: (4, 1), 1: (8, 1)}


def is_hqq(method: dict) -> bool:
    return (method.get("quantization") or {}).get("quant_method") == "hqq"


def kbit_prep_casts(method: dict) -> bool:
    """Whether PEFT's prepare_model_for_kbit_training casts the model's norms, embeddings and
    lm_head to fp32: on a bitsandbytes-quantized model, not on an HQQ one."""
    return bool(method.get("quantization")) and not is_hqq(method)


def hqq_weight_bytes(shapes: dict, quant: dict, compute_bytes: int) -> float:
    """Bytes of the HQQ-quantized Linear weights of the decoder layers: each out x in weight in
    groups of `group_size` (rows of the packed tensor: out * in / group_size), packed along
    them (3 bits: ten values per int32 word, the rows padded to a multiple of ten), with a scale
    and a zero point per group in the compute dtype."""
    nbits, group = quant.get("nbits", 4), quant.get("group_size", 64)
    per_word, word_bytes = HQQ_PACKING[nbits]
    total = 0.0
    for _, n, m, _ in shapes["linears"]:
        groups = m * n / group
        total += math.ceil(groups / per_word) * group * word_bytes + 2 * groups * compute_bytes
    return shapes["layers"] * total


def weight_bytes(shapes: dict, method: dict) -> dict:
    """Bytes of the model's weights as stored, and the parameter counts behind them."""
    quant = method.get("quantization") or {}
    base_bytes = 4 if method["base_dtype"] == "float32" else 2
    layers, h, vocab = shapes["layers"], shapes["hidden"], shapes["vocab"]
    linear_weights = layers * sum(i * o for _, i, o, _ in shapes["linears"])
    root_params = h + vocab * h * (1 if shapes["tied"] else 2)  # outside the layers: final norm, embeddings, lm_head
    other = layers * (sum(o for _, _, o, b in shapes["linears"] if b) + shapes["norm_params"]) + root_params
    if quant.get("quant_method") == "hqq":
        base = hqq_weight_bytes(shapes, quant, base_bytes) + other * base_bytes  # kbit prep casts nothing
    elif quant.get("load_in_4bit"):
        blocks = linear_weights / NF4_BLOCK
        if quant.get("bnb_4bit_use_double_quant"):
            scales = blocks * 1 + blocks / DQ_BLOCK * 4  # 8-bit absmax + fp32 second-level scales
        else:
            scales = blocks * 4
        # lookup tables, per layer: the 4-bit code (16 fp32), and with double quantization the
        # 8-bit code of the absmaxes (256 fp32) and their fp32 offset
        modules = layers * len(shapes["linears"])
        tables = modules * (16 * 4 + (256 * 4 + 4 if quant.get("bnb_4bit_use_double_quant") else 0))
        base = linear_weights / 2 + scales + tables + other * 4  # other weights cast to fp32 (kbit prep)
    elif quant.get("load_in_8bit"):
        rows = layers * sum(o for _, _, o, _ in shapes["linears"])
        base = linear_weights + rows * 4 + other * 4
    else:
        base = (linear_weights + other) * base_bytes
    # the weights outside the decoder layers, as stored
    root_bytes = root_params * (4 if quant.get("load_in_4bit") or quant.get("load_in_8bit") else base_bytes)
    trainable, buffers = adapter_params(shapes, method.get("peft"), method["base_dtype"])
    if not method.get("peft"):
        trainable = linear_weights + other
    # PEFT keeps adapters in fp32; LLaMA-Adapter's prompts take the base dtype
    adapter_bytes = (base_bytes if peft_type(method["peft"]).params_in_base_dtype else 4) if method.get("peft") else 0
    return {
        "weights": base + trainable * adapter_bytes + buffers * 4,
        "trainable_params": trainable,
        "trainable_bytes_per_param": adapter_bytes or base_bytes,
        "linear_weights": linear_weights,
        "quantized": bool(quant),
        "root_params": root_params,
        "root_bytes": root_bytes,
    }


def optimizer_bytes(trainable: int, bytes_per_param: int, optimizer: str, largest_tensor: int) -> float:
    if optimizer == "adamw":
        return 2 * trainable * bytes_per_param
    # bitsandbytes 8-bit: tensors below min_8bit_size keep fp32 states; assume the big ones do not
    small = min(trainable, ADAM8BIT_MIN_SIZE) if largest_tensor < ADAM8BIT_MIN_SIZE else 0
    big = trainable - small
    return big * 2 + 2 * (big / ADAM8BIT_BLOCK) * 4 + small * 8


def galore_bytes(shapes: dict, optimizer: dict, trainable: int) -> tuple[float, float]:
    """(optimizer state bytes, step temporaries) of GaLore (galore-torch's GaLoreAdamW) on fp32
    weights. Each attention/MLP weight (out m x in n) keeps its two Adam moments in the rank-r'
    projection of its gradient (r' = min(r, m, n); 2 * 4 * r' * max(m, n)) and its projection
    matrix: a slice of the SVD's U or Vh, which keeps all of it alive (4 * min(m, n)^2). Every
    other parameter has AdamW's 8 B. The step: a projected weight's update comes back full size
    and is scaled (two fp32 m x n temporaries); a plain one makes two temporaries of its size;
    each projection's SVD (at the first step and every update_proj_gap steps) holds U, Vh and
    LAPACK's work space (about 7 k^2 floats, k = min(m, n))."""
    r, layers = optimizer["rank"], shapes["layers"]
    projected = states = 0
    largest_step = 0.0
    for _, n, m, _ in shapes["linears"]:  # (name, in, out, bias): the weight is out x in
        k = min(m, n)
        projected += layers * m * n
        states += layers * (2 * 4 * min(r, k) * max(m, n) + 4 * k * k)
        largest_step = max(largest_step, 2 * 4 * m * n, 4 * (m * k + k * n + 7 * k * k))
    rest = trainable - projected
    largest_rest = shapes["vocab"] * shapes["hidden"]  # the embeddings (and an untied lm_head)
    return states + 8 * rest, max(largest_step, 2 * 4 * min(rest, largest_rest))


def apollo_bytes(shapes: dict, optimizer: dict, trainable: int) -> tuple[float, float]:
    """(optimizer state bytes, step temporaries) of APOLLO (apollo-torch's APOLLOAdamW) on fp32
    weights. Each attention/MLP weight (out m x in n) keeps its two Adam moments in a rank-r
    random projection of its gradient (r is not clipped to the sides) and the r x side random
    matrix: with proj_type std the moments keep the longer side, 2 * 4 * r * max(m, n), and the
    matrix the shorter, 4 * r * min(m, n) (reverse_std the other way; right keeps the out side
    in the moments, left the in side). Every other parameter has AdamW's 8 B. The step: the
    projected gradient, Adam's denominator and normalized update (three moment-sized fp32
    temporaries), then the gradient scaled per channel and the norm-growth limiter's copy (two
    fp32 m x n); a plain parameter makes two temporaries of its size."""
    r, layers, kind = optimizer["rank"], shapes["layers"], optimizer["proj_type"]
    projected = states = 0
    largest_step = 0.0
    for _, n, m, _ in shapes["linears"]:  # (name, in, out, bias): the weight is out x in
        kept = {"std": max(m, n), "reverse_std": min(m, n), "right": m, "left": n}[kind]
        projected += layers * m * n
        states += layers * (2 * 4 * r * kept + 4 * r * (m + n - kept))
        largest_step = max(largest_step, 2 * 4 * m * n + 3 * 4 * r * kept)
    rest = trainable - projected
    largest_rest = shapes["vocab"] * shapes["hidden"]  # the embeddings (and an untied lm_head)
    return states + 8 * rest, max(largest_step, 2 * 4 * min(rest, largest_rest))


# the optimizers that keep Adam's moments in a low-rank projection (harness/methods.py)
PROJECTION_BYTES = {"galore_adamw": galore_bytes, "apollo_adamw": apollo_bytes}


# --------------------------------------------------------------------------- activations

def layer_activation_bytes(shapes: dict, method: dict, *, tokens: float, seq: float, context: float,
                           compute_bytes: int, device: str, attention: str, padded: bool) -> float:
    """Bytes one decoder layer keeps for the backward pass, for `tokens` tokens in sequences of
    `seq` tokens attending to `context` positions (seq + virtual prefix)."""
    c = compute_bytes
    h, q_dim, kv_dim, inter, heads = (shapes[k] for k in ("hidden", "q_dim", "kv_dim", "intermediate", "heads"))
    hqq, bnb = is_hqq(method), kbit_prep_casts(method)  # bnb: a bitsandbytes-quantized base
    full = not method.get("peft")
    base_is_fp32 = method["base_dtype"] == "float32"
    residual = 4 if (base_is_fp32 or bnb) else c  # kbit prep casts norms and embeddings to fp32
    # bitsandbytes layers return their input's dtype (fp32 after kbit prep); others (HQQ's
    # included), autocast's
    linear_out = residual if bnb else c

    per_token = 0.0
    # RMSNorm (x2): the fp32 input and 1/rms; a trained norm weight also keeps the normalized x
    per_token += 2 * (4 * h + 4 + (residual * h if full else 0))
    # Attention: SDPA keeps q, k, v, its output, an fp32 log-sum-exp per head, and the padding
    # mask; with a mask, transformers repeats grouped KV heads to all heads first.
    kv_kept = q_dim if (padded and kv_dim != q_dim) else kv_dim
    ctx = context / seq
    per_token += c * q_dim + 2 * c * kv_kept * ctx + c * q_dim + 4 * heads
    if padded:
        per_token += c * context  # one bf16 mask row per token
    if attention == "eager":  # scores and probabilities: heads x context per token
        per_token += 2 * c * heads * context
    # SwiGLU MLP: gate output (SiLU input), SiLU output, up output
    per_token += 3 * linear_out * inter
    if full:  # every Linear keeps its bf16 input; fp32 inputs are cast once per Linear
        casts_per_input = 1 if residual == c else None
        qkv_in = c * h * (casts_per_input or 3)
        gate_up_in = c * h * (casts_per_input or 2)
        per_token += qkv_in + gate_up_in + c * q_dim + c * inter  # + o_proj and down_proj inputs
    if hqq:  # HQQ's autograd function keeps each layer's input as it came: the fp32 normed
        # residual (once for q/k/v, once for gate/up), the attention output, the MLP product
        per_token += 2 * residual * h + c * q_dim + c * inter
    peft = method.get("peft")
    fixed = 0.0
    if peft:  # what each adapter module keeps (harness/peft_types.py)
        kind, mask = peft_type(peft), 4 if device == "cpu" else 1
        for name, fan_in, fan_out, _ in targeted(shapes, peft.get("target_modules")):
            per_token += kind.saves(peft, name, fan_in, fan_out, c, mask, shapes["layers"])
            fixed += kind.weight_saves(peft, fan_in, fan_out, c)
        per_token += kind.layer_saves(peft, shapes, c)
    return per_token * tokens + fixed


def predict(arch: dict, method: dict, *, batch_size: int, seq_len: float, device: str = "cuda",
            precision: str = "bf16", gradient_checkpointing: bool = False, grad_accum: int = 1,
            attention: str = "sdpa", padded: bool = True, adamw_impl: str = "default", world_size: int = 1) -> dict:
    """Predicted peak training memory (MiB) and its breakdown; see the module docstring.

    `seq_len` is the tokens of one sequence (the longest in a batch); `device` is "cuda" or
    "cpu" (dropout masks and the runtime overhead differ); `padded` says whether batches
    carry a padding mask.

    `world_size` > 1: the peak of each of that many FSDP ranks (harness/distributed.py), with
    `batch_size` the global batch, split across them. Weights, gradients and optimizer states
    are sharded (1/N each); each rank's activations are those of its share of the batch; on top
    come what FSDP gathers while it computes: the parameters outside the decoder layers (the
    root's, gathered for the whole forward and backward pass), two decoder layers' parameters
    (the one computed and the next, prefetched) and two layers' unsharded gradients (the one
    being reduce-scattered and its copy into the reduce-scatter buffer); and, with full
    fine-tuning, the root's unsharded gradients, reduce-scattered at the end of the backward
    pass. Autocast's bf16 copies are made from the gathered weights and kept whole.
    """
    device = "cpu" if str(device).startswith("cpu") else "cuda"
    shapes = layer_shapes(arch)
    refused = peft_type(method["peft"]).not_for_model(shapes["model_type"]) if method.get("peft") else None
    if refused:
        raise MethodDoesNotApply(refused)
    w = weight_bytes(shapes, method)
    peft = method.get("peft") or {}
    prompt, prefix = peft_types.virtual_tokens(peft)
    c = 2 if precision == "bf16" else (4 if method["base_dtype"] == "float32" else 2)
    seq = seq_len + prompt                 # positions each layer processes
    batch_size = batch_size / world_size   # this rank's share of the batch
    tokens = batch_size * seq
    layers = shapes["layers"]

    one_layer = layer_activation_bytes(shapes, method, tokens=tokens, seq=seq, context=seq + prefix,
                                       compute_bytes=c, device=device, attention=attention, padded=padded)
    residual = 4 if (method["base_dtype"] == "float32" or kbit_prep_casts(method)) else c
    # the layers that keep tensors for a backward pass: all, but for LLaMA-Adapter's top ones
    # (kbit prep makes the embeddings' output require a gradient: every layer then)
    kept = peft_type(peft).backward_layers(peft, layers) if peft and not method.get("quantization") else layers
    if gradient_checkpointing:  # each layer's input, plus one layer recomputed in the backward
        activations = kept * tokens * shapes["hidden"] * residual + one_layer
    else:
        activations = kept * one_layer
    if peft:  # outside the layers, per sequence (P-tuning's prompt encoder)
        activations += batch_size * peft_type(peft).sequence_saves(peft, shapes, c)
    logits = tokens * shapes["vocab"] * (2 + 4 + 4)
    # the backward pass's working set while it runs through a layer: gradients of the MLP's
    # bf16 intermediates (two at a time) and of the fp32 residual stream
    backward_working = tokens * (2 * c * shapes["intermediate"] + 4 * shapes["hidden"])

    trainable, tbytes = w["trainable_params"], w["trainable_bytes_per_param"]
    gradients = trainable * tbytes
    largest = max(i * o for _, i, o, _ in shapes["linears"])
    if not peft:
        largest = max(largest, shapes["vocab"] * shapes["hidden"])
    optimizer_name = method.get("optimizer", {}).get("name", "adamw")
    if optimizer_name in PROJECTION_BYTES:
        optimizer, projection_step = PROJECTION_BYTES[optimizer_name](shapes, method["optimizer"], trainable)
    else:
        optimizer = optimizer_bytes(trainable, tbytes, optimizer_name, largest)
    if peft:  # e.g. AdaLoRA's rank allocator: three fp32 importance averages per parameter
        optimizer += peft_type(peft).optimizer_extra_bytes * trainable
    # bf16 copies of fp32 weights that enter matmuls under autocast (kept for the backward)
    autocast_copies = 0.0
    if precision == "bf16":
        lm_head = shapes["vocab"] * shapes["hidden"]
        if not peft and method["base_dtype"] == "float32":
            autocast_copies = 2 * (w["linear_weights"] + lm_head)
        else:
            autocast_copies = 2 * trainable if peft and peft_type(peft).casts_weights else 0
            if kbit_prep_casts(method):  # kbit prep leaves lm_head in fp32
                autocast_copies += 2 * lm_head
    # dequantized weight of the layer being computed, forward or backward: bitsandbytes' bf16
    # copy; HQQ's unpacked weight, less the zero point, times the scale (three alive at once)
    dequant = (3 * c if is_hqq(method) else 2) * largest if method.get("quantization") else 0
    accumulated = gradients / world_size if grad_accum > 1 else 0
    gathered = 0.0
    if world_size > 1:  # what FSDP holds unsharded while a rank computes (see the docstring)
        root_grads = w["root_params"] * tbytes if not peft else 0
        layer_weights = (w["weights"] - w["root_bytes"]) / layers
        layer_grads = (gradients - root_grads) / layers
        gathered = w["root_bytes"] + 2 * layer_weights + 2 * layer_grads + root_grads
    forward_backward = (activations + logits + backward_working + autocast_copies + dequant + accumulated
                        + gathered)
    # the step: multi-tensor ("foreach") AdamW, torch's default on CUDA, builds a state-sized
    # temporary; the per-tensor loop (the CPU default) one tensor's worth; fused AdamW none
    multi_tensor = adamw_impl == "foreach" or (adamw_impl == "default" and device == "cuda")
    if optimizer_name in PROJECTION_BYTES:
        step_temp = projection_step
    elif optimizer_name == "adamw" and adamw_impl != "fused":
        step_temp = trainable * tbytes if multi_tensor else min(trainable, largest) * tbytes
    elif optimizer_name != "adamw" and device == "cpu":  # bitsandbytes' 8-bit step on a CPU: fp32
        step_temp = ADAM8BIT_CPU_STEP_BYTES * min(trainable, largest)  # copies for the tensor stepped
    else:  # fused AdamW; bitsandbytes' CUDA kernels, which update the 8-bit states in place
        step_temp = 0
    step = (gradients + step_temp) / world_size  # each rank steps its shards
    overhead = (CPU_OVERHEAD_MB if device == "cpu" else CUDA_OVERHEAD_MB) * MIB
    peak = (w["weights"] + optimizer) / world_size + max(forward_backward, step) + overhead
    mb = lambda b: b / MIB  # noqa: E731
    return {
        "peak_mb": mb(peak),
        "weights_mb": mb(w["weights"] / world_size),
        "gradients_mb": mb(gradients / world_size),
        "optimizer_mb": mb(optimizer / world_size),
        "fsdp_gathered_mb": mb(gathered),
        "activations_mb": mb(activations),
        "logits_mb": mb(logits),
        "backward_working_mb": mb(backward_working),
        "autocast_copies_mb": mb(autocast_copies),
        "overhead_mb": mb(overhead),
        "peak_phase": "forward_backward" if forward_backward >= step else "optimizer_step",
        "trainable_params": trainable,
        "weight_bytes": w["weights"],
    }


def largest(fits, limit: int = 1 << 16) -> int:
    """The largest v in 1..limit with fits(v), for a `fits` that holds up to some v and not
    beyond (a predicted peak grows with batch size, rank and virtual tokens); 0 if fits(1) is
    false. Doubling, then bisection: about 2*log2(v) predictions."""
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # fits(lo) and not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def max_batch_size(arch: dict, method: dict, budget_mb: float, *, seq_len: float, limit: int = 1 << 16,
                   **kwargs) -> int:
    """The largest batch size whose predicted peak fits in `budget_mb` (0 if none does)."""
    return largest(lambda b: predict(arch, method, batch_size=b, seq_len=seq_len, **kwargs)["peak_mb"] <= budget_mb,
                   limit)


def training_setting(train_cfg: dict, device: str) -> dict:
    """predict()'s keyword arguments for a job's `train` config on `device` ("cuda"/"cpu"),
    batch size and sequence length aside."""
    return {"device": device, "precision": train_cfg["precision"],
            "gradient_checkpointing": train_cfg["gradient_checkpointing"], "grad_accum": train_cfg["grad_accum"],
            "adamw_impl": train_cfg.get("adamw_impl", "default"), "world_size": train_cfg.get("nproc_per_node", 1)}
