"""Training FLOPs per token, achieved FLOP/s and model FLOPs utilization (MFU).

Per token, a weight matmul costs 2 FLOPs per weight forward, 2 backward for the gradient of
its input and 2 for the gradient of its weight (PaLM, Chowdhery et al. 2022, App. B: 6N per
token for training). A frozen weight skips its weight gradient: 4 FLOPs per weight. Attention
scores and their weighted sum have no weights: 4*L*h*s forward per token, 12*L*h*s for
training (PaLM counts the full, non-causal, product). So, per real token of a sequence of s
tokens:

    full fine-tuning      6 * N                       + 12 * L * h * s
    frozen base (LoRA...) 4 * N_frozen + 6 * N_adapter + 12 * L * h * s

where N counts the weights of matmuls (decoder linear layers and lm_head; embeddings are
lookups). Virtual tokens: prompt tuning runs v more tokens through every layer, so the cost
of each real token is scaled by (s + v) / s; prefix tuning only lengthens the attention
context to s + v. Prompt embeddings and prefixes are lookups, not matmuls; P-tuning's prompt
encoder (an MLP of E weights) runs once per sequence on its v virtual tokens, 6 * E * v / s
per real token. GaLore adds its projections once per optimizer step (4 * m * n * r per
projected weight), divided over the step's tokens.

MFU = achieved FLOP/s / the device's peak dense bf16 FLOP/s, from the table below; devices not
in the table get no MFU (never a guess).
"""

from __future__ import annotations

# Dense bf16 tensor-core peaks (NVIDIA datasheets, without sparsity), in TFLOP/s, and the SMs of
# the whole GPU (to scale a MIG slice's peak by its share of them). Each pattern matches whole
# words of the name torch reports ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA L40S",
# "NVIDIA H100 80GB HBM3 MIG 1g.10gb"), so L40 is not L4 and RTX A1000 is not A100. Order
# matters: first match wins.
PEAK_BF16_TFLOPS = [
    (r"\bH100\b.*\bPCIe\b", 756.0, 114),
    (r"\bH100\b.*\bNVL\b", 835.0, 132),
    (r"\bGH200\b", 989.4, 132),
    (r"\bH100\b", 989.4, 132),           # SXM
    (r"\bH200\b.*\bNVL\b", 835.0, 132),   # H200 NVL: 1,671 with sparsity
    (r"\bH200\b", 989.4, 132),           # SXM
    (r"\bA100\b", 312.0, 108),
    (r"\bL40S\b", 362.1, 142),
    (r"\bL40\b", 181.0, 142),
    (r"\bL4\b", 121.0, 58),
    (r"\bRTX 4090\b", 165.2, 128),       # with fp32 accumulation (GeForce)
    (r"\bA10G\b", 70.0, 80),
    (r"\bA10\b", 125.0, 72),
]


def peak_tflops(device_name: str | None, multiprocessors: int | None = None) -> float | None:
    """The device's dense bf16 peak, None for a device not in the table (never a guess). A MIG
    slice (its name says "MIG") gets the whole GPU's peak times its share of the SMs, and None
    if its SM count is not known."""
    import re

    for pattern, peak, sms in PEAK_BF16_TFLOPS:
        if device_name and re.search(pattern, device_name):
            if re.search(r"\bMIG\b", device_name):
                return peak * min(multiprocessors, sms) / sms if multiprocessors else None
            return peak
    return None


def matmul_weights(model) -> tuple[int, int, int]:
    """(frozen, trainable, encoder) weights that take part in matmuls: Linear layers (lm_head
    and quantized ones included, bitsandbytes' and HQQ's packed weights counted at their
    logical size) and
    trainable adapter tensors (LoRA, AdaLoRA), run for every token; and the Linear weights of a
    prompt encoder (P-tuning's MLP), run once per sequence. Embeddings, prompt embeddings and
    prefixes are lookups."""
    import torch

    frozen = trainable = encoder = 0
    prompt_encoder = getattr(model, "prompt_encoder", None)
    in_encoder = {id(m) for m in prompt_encoder.modules()} if isinstance(prompt_encoder, torch.nn.Module) else set()
    in_linear_or_lookup = set()
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            in_linear_or_lookup.update(id(p) for p in module.parameters(recurse=False))
        if isinstance(module, torch.nn.Linear) and id(module) in in_encoder:
            encoder += module.weight.numel()
        elif type(module).__name__ == "HQQLinear":  # HQQ's quantized Linear: a frozen matmul
            frozen += module.meta["shape"].numel()
        elif isinstance(module, torch.nn.Linear):
            quant_state = getattr(module.weight, "quant_state", None)
            n = quant_state.shape.numel() if quant_state is not None else module.weight.numel()
            if module.weight.requires_grad:
                trainable += n
            else:
                frozen += n
    for name, p in model.named_parameters():  # adapter tensors that are not Linear layers
        if name.endswith("adaption_prompt"):  # LLaMA-Adapter's prompts: see adaption_prompt_flops
            continue
        if p.requires_grad and id(p) not in in_linear_or_lookup and p.dim() > 1:
            trainable += p.numel()
    return frozen, trainable, encoder


def training_flops_per_token(model_config, frozen: int, trainable: int, seq_len: float,
                             prompt_tokens: int = 0, prefix_tokens: int = 0, encoder: int = 0) -> float:
    """Training FLOPs per real (non-virtual) token; see the module docstring."""
    layers = model_config.num_hidden_layers
    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    context = seq_len + prompt_tokens + prefix_tokens
    attention = 12 * layers * heads * head_dim * context
    per_token = 4 * frozen + 6 * trainable + attention
    return per_token * (seq_len + prompt_tokens) / seq_len + 6 * encoder * prompt_tokens / seq_len


def adaption_prompt_flops(model_config, adapter_len: int, adapted_layers: int, context: float) -> float:
    """What LLaMA-Adapter changes in the training FLOPs per token (PEFT's AdaptedAttention, on
    Llama-style layers). The layers below the adapters run forward only: their frozen matmuls
    cost 2 FLOPs per weight instead of 4, their attention 4 per head dimension and position
    instead of 12. Each adapted layer adds its adapter attention: q_proj recomputed (forward and
    input gradient) and v_proj recomputed (forward; unused), scores and output over adapter_len
    prompt positions (2 + 4 FLOPs each per query dimension and position), o_proj on the output
    (forward and input gradient). The prompts' own key/value projections, once per step, are
    left out."""
    layers, heads = model_config.num_hidden_layers, model_config.num_attention_heads
    h, inter = model_config.hidden_size, model_config.intermediate_size
    head_dim = getattr(model_config, "head_dim", None) or h // heads
    q, kv = heads * head_dim, (getattr(model_config, "num_key_value_heads", None) or heads) * head_dim
    layer_weights = h * q + 2 * h * kv + q * h + 3 * h * inter
    below = layers - adapted_layers
    saved = below * (2 * layer_weights + 8 * q * context)
    added = adapted_layers * (4 * h * q + 2 * h * kv + 12 * q * adapter_len + 4 * q * h)
    return added - saved


def projection_step_flops(weights, optimizer: dict) -> float:
    """FLOPs of GaLore's or APOLLO's projections in one optimizer step. GaLore projects each
    m x n gradient to rank r' = min(r, m, n) and its update back: 2 * m * n * r' FLOPs each way
    (the SVD that refreshes a projection every update_proj_gap steps is not counted). APOLLO
    projects the gradient only (2 * m * n * r; its random projection is not clipped to the
    weight's sides): the update is the raw gradient scaled per channel."""
    rank = optimizer["rank"]
    total = 0.0
    for w in weights:
        m, n = w.shape
        if optimizer["name"] == "galore_adamw":
            total += 4 * m * n * min(rank, m, n)
        else:
            total += 2 * m * n * rank
    return total


def utilization(flops_per_token: float, tokens_per_s: float | None, device_name: str | None,
                multiprocessors: int | None = None) -> dict:
    achieved = flops_per_token * tokens_per_s / 1e12 if tokens_per_s else None
    peak = peak_tflops(device_name, multiprocessors)
    return {
        "flops_per_token": flops_per_token,
        "train_tflops": achieved,
        "peak_bf16_tflops": peak,
        "mfu": achieved / peak if achieved is not None and peak else None,
    }
