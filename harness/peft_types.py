"""What the harness knows of each PEFT type, in one table: its trainable parameters, what its
modules keep for the backward pass, its size knob, and its virtual tokens.

The memory model (harness/memory_model.py), equal-budget sizing (harness/budget.py) and the
FLOP count (harness/job.py) read this table and nothing else about a PEFT type. A method whose
`peft_type` is not here still trains (PEFT builds it); the planner shows it as "not modelled"
and `budget=params|memory` runs it at its own size, marked unmatched. Teaching the harness a new
type is one entry in TYPES.

Byte counts are per token and per targeted Linear module, in multiples of its input width
(fan_in), output width (fan_out) and rank, with c the compute dtype's bytes. PEFT casts a
module's input to the adapter's fp32; dropout then keeps its mask (`mask` bytes per element:
an fp32 noise tensor on a CPU, a bool mask on CUDA), and the adapter's first matmul keeps its
bf16 input.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

# A targeted Linear: (name, fan_in, fan_out, has_bias), as memory_model.layer_shapes lists them
Module = tuple[str, int, int, bool]


def _nothing(*_args) -> float:
    return 0.0


@dataclass(frozen=True)
class PeftType:
    """One PEFT type. `params(peft, shapes, modules, base_dtype)` gives (trainable parameters,
    frozen adapter buffers) for the whole model; `saves(peft, name, fan_in, fan_out, c, mask,
    layers)` the bytes a targeted module keeps per token (in a layer of `layers`, on average);
    `weight_saves(peft, fan_in, fan_out, c)` the
    weight-sized tensors it keeps whatever the batch."""

    params: Callable[[dict, dict, list[Module], str], tuple[int, int]]
    saves: Callable[[dict, str, int, int, int, int, int], float] = _nothing
    weight_saves: Callable[[dict, int, int, int], float] = _nothing
    knob: str | None = None            # the size key in the peft block (budget=params|memory)
    knob_default: int | None = None    # PEFT's default for it
    # companions of the knob to keep in proportion when it changes: (peft, old, new) -> changes
    rescale: Callable[[dict, int, int], dict] = lambda peft, old, new: {}
    casts_weights: bool = False        # autocast keeps a bf16 copy of each fp32 adapter weight
    # bytes kept per sequence outside the decoder layers: (peft, shapes, c) -> bytes
    sequence_saves: Callable[[dict, dict, int], float] = _nothing
    optimizer_extra_bytes: int = 0     # per trainable parameter, beside the optimizer's states
    # bytes kept per token in each layer that runs a backward pass, beside the modules': (peft, shapes, c)
    layer_saves: Callable[[dict, dict, int], float] = _nothing
    # the decoder layers that run a backward pass (the top ones): (peft, layers) -> count
    backward_layers: Callable[[dict, int], int] = lambda peft, layers: layers
    params_in_base_dtype: bool = False  # its trainable tensors take the base weights' dtype, not fp32
    virtual: str | None = None         # "prompt": v more positions; "prefix": keys/values s + v
    not_modelled: Callable[[dict], str | None] = lambda peft: None  # a setting the model lacks
    # why it cannot run on a model of this type (transformers' model_type), or None
    not_for_model: Callable[[str], str | None] = lambda model_type: None


def size(peft: dict) -> int | None:
    """The value of a type's size knob in this peft block (PEFT's default if unset)."""
    kind = TYPES[peft["peft_type"]]
    return peft.get(kind.knob, kind.knob_default) if kind.knob else None


def _dropout_mask(peft: dict, key: str, fan_in: int, mask: int) -> float:
    return mask * fan_in if (peft.get(key) or 0) > 0 else 0


# --------------------------------------------------------------------------- LoRA (and DoRA)

def qualified_name(layer: int, name: str) -> str:
    """A Llama-style decoder Linear's module name, as PEFT's rank_pattern keys match it."""
    block = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"model.layers.{layer}.{block}.{name}"


def lora_ranks(peft: dict, name: str, layers: int) -> list[int]:
    """A targeted module's LoRA rank in each layer: its `rank_pattern` entry (PEFT's matching:
    the key is a suffix of the module's name, or a regex of it; EVA writes one per module it
    moved rank to or from) or `r`. A rank of 0 (EVA) leaves that layer's Linear unadapted."""
    pattern, r = peft.get("rank_pattern") or {}, size(peft)

    def rank(qualified: str) -> int:
        key = next((k for k in pattern if re.match(rf"(.*\.)?({k})$", qualified)), None)
        return r if key is None else pattern[key]

    return [rank(qualified_name(i, name)) for i in range(layers)]


def _lora_params(peft, shapes, mods, base_dtype):
    dora = peft.get("use_dora")
    return sum(r * (i + o) + (o if dora else 0)
               for name, i, o, _ in mods for r in lora_ranks(peft, name, shapes["layers"]) if r), 0


def _lora_saves(peft, name, fan_in, fan_out, c, mask, layers):
    # per layer on average: a module whose rank is 0 keeps nothing
    ranks = lora_ranks(peft, name, layers)
    adapted = sum(1 for r in ranks if r) / layers
    saved = adapted * (_dropout_mask(peft, "lora_dropout", fan_in, mask) + c * fan_in) + c * sum(ranks) / layers
    if peft.get("use_dora"):  # rescales base and adapter outputs by the weight norm
        saved += 2 * c * fan_out
    return saved


def _lora_weight_saves(peft, fan_in, fan_out, c):
    # DoRA with dropout recomputes the base output from a bf16 copy of the weight
    return c * fan_in * fan_out if peft.get("use_dora") and (peft.get("lora_dropout") or 0) > 0 else 0.0


def _lora_rescale(peft, old, new):
    # alpha follows the rank so the scale (alpha/r, or alpha/sqrt(r) with rsLoRA) stays the same
    if "lora_alpha" not in peft:
        return {}
    ratio = math.sqrt(new / old) if peft.get("use_rslora") else new / old
    return {"lora_alpha": peft["lora_alpha"] * ratio}


# --------------------------------------------------------------------------- AdaLoRA

def _adalora_params(peft, shapes, mods, base_dtype):
    # P (r x in), Q (out x r), the singular values E (r), and the rank count, a one-element
    # parameter that comes out trainable when PEFT upcasts a half-precision model's adapters
    r, count = size(peft), 0 if base_dtype == "float32" else 1
    return shapes["layers"] * sum(r * (i + o) + r + count for _, i, o, _ in mods), 0


def _adalora_saves(peft, name, fan_in, fan_out, c, mask, layers):
    saved = _dropout_mask(peft, "lora_dropout", fan_in, mask) + c * fan_in + c * size(peft)
    return saved + c * fan_out  # divides the adapter's output by the rank count


def _adalora_rescale(peft, old, new):
    # the target rank keeps its ratio to the initial rank
    return {"target_r": max(1, round(peft["target_r"] * new / old))} if peft.get("target_r") else {}


# --------------------------------------------------------------------------- IA3, VeRA

def _ia3_params(peft, shapes, mods, base_dtype):
    # one scaling vector per module: of the input for feedforward modules, else of the output
    ff = set(peft.get("feedforward_modules") or [])
    return shapes["layers"] * sum(i if name in ff else o for name, i, o, _ in mods), 0


def _ia3_saves(peft, name, fan_in, fan_out, c, mask, layers):
    # scales the fp32 input (feedforward) or the output
    return 4 * fan_in if name in (peft.get("feedforward_modules") or []) else c * fan_out


def _vera_params(peft, shapes, mods, base_dtype):
    # per module lambda_b (out) and lambda_d (r); one shared random A (r x in) and B (out x r)
    r = size(peft)
    max_in, max_out = max(i for _, i, _, _ in mods), max(o for _, _, o, _ in mods)
    return shapes["layers"] * sum(o + r for _, _, o, _ in mods), r * max_in + max_out * r


def _vera_saves(peft, name, fan_in, fan_out, c, mask, layers):
    return _dropout_mask(peft, "vera_dropout", fan_in, mask) + c * fan_out + 2 * c * size(peft)


def _vera_weight_saves(peft, fan_in, fan_out, c):
    # every module casts its slices of the shared A and B to bf16
    return c * size(peft) * (fan_in + fan_out)


# --------------------------------------------------------------------------- MiSS

def _miss_params(peft, shapes, mods, base_dtype):
    # one r x out block per module (init "bat": out/r blocks of r x r, as many)
    return shapes["layers"] * sum(size(peft) * o for _, _, o, _ in mods), 0


def _miss_saves(peft, name, fan_in, fan_out, c, mask, layers):
    # the input, cast to fp32, is summed over its shards of r features (a sum keeps nothing);
    # the r-wide sum enters the block's matmul as bf16, which keeps it
    return _dropout_mask(peft, "miss_dropout", fan_in, mask) + c * size(peft)


# --------------------------------------------------------------------------- virtual tokens

def _prompt_params(peft, shapes, mods, base_dtype):
    return size(peft) * shapes["hidden"], 0


def _prefix_params(peft, shapes, mods, base_dtype):
    # a key and a value per layer and virtual token (KV heads)
    return size(peft) * shapes["layers"] * 2 * shapes["kv_dim"], 0


def _encoder_width(peft, shapes):
    return peft.get("encoder_hidden_size") or shapes["hidden"]  # PEFT's default: the model's width


def _ptuning_params(peft, shapes, mods, base_dtype):
    # v virtual-token embeddings and an MLP (h -> e -> e -> h, with biases) that maps them
    v, h, e = size(peft), shapes["hidden"], _encoder_width(peft, shapes)
    return v * h + (h * e + e) + (e * e + e) + (e * h + h), 0


def _ptuning_sequence_saves(peft, shapes, c):
    # the MLP runs on each sequence's v embeddings: its first Linear keeps its bf16 input, each
    # ReLU its output (the next Linear's input)
    v, h, e = size(peft), shapes["hidden"], _encoder_width(peft, shapes)
    return v * (c * h + 2 * c * e)


def _ptuning_not_modelled(peft):
    kind = str(peft.get("encoder_reparameterization_type", "MLP")).rsplit(".", 1)[-1].upper()
    return "P-tuning with an LSTM prompt encoder" if kind != "MLP" else None


# --------------------------------------------------------------------------- bottleneck adapters

def _bottleneck_params(peft, shapes, mods, base_dtype):
    b = size(peft)  # down (o x b) and up (b x o), with biases, on each targeted module's output
    return shapes["layers"] * sum(2 * o * b + b + o for _, _, o, _ in mods), 0


def _bottleneck_saves(peft, name, fan_in, fan_out, c, mask, layers):
    # the down-projection's bf16 input (the module's output, cast), and the bottleneck: ReLU and
    # tanh keep their output, which is also the up-projection's input; GELU and SiLU their input too
    kept = 1 if peft.get("nonlinearity", "relu") in ("relu", "tanh") else 2
    return c * fan_out + kept * c * size(peft)


# --------------------------------------------------------------------------- LLaMA-Adapter

def _adapted_layers(peft, layers):
    return min(peft.get("adapter_layers") or layers, layers)  # the top ones; null: every layer


def _adaption_params(peft, shapes, mods, base_dtype):
    # per adapted layer: an adapter_len x hidden prompt and one zero-initialised gate
    return _adapted_layers(peft, shapes["layers"]) * (size(peft) * shapes["hidden"] + 1), 0


def _adaption_not_for_model(model_type):
    return None if model_type in ("llama", "mistral") else \
        f"LLaMA-Adapter on a {model_type} model: PEFT supports llama and mistral only"


def _adaption_layer_saves(peft, shapes, c):
    # the adapter attention over the prompt (PEFT's AdaptedAttention): the recomputed rotated
    # queries, the fp32 softmax over adapter_len positions per head, its bf16 cast (kept by the
    # gate's product) and the gated scores (kept by the matmul with the prompt's values)
    heads = shapes["heads"] * size(peft)
    return c * shapes["q_dim"] + 4 * heads + 2 * c * heads


TYPES: dict[str, PeftType] = {
    "LORA": PeftType(_lora_params, _lora_saves, _lora_weight_saves, knob="r", knob_default=8,
                     rescale=_lora_rescale, casts_weights=True),
    "ADALORA": PeftType(_adalora_params, _adalora_saves, knob="init_r", knob_default=12,
                        rescale=_adalora_rescale, casts_weights=True,
                        optimizer_extra_bytes=3 * 4),  # the rank allocator's three fp32 EMAs
    "IA3": PeftType(_ia3_params, _ia3_saves),
    "VERA": PeftType(_vera_params, _vera_saves, _vera_weight_saves, knob="r", knob_default=256,
                     casts_weights=True),
    "MISS": PeftType(_miss_params, _miss_saves, knob="r", knob_default=64, casts_weights=True,
                     not_modelled=lambda peft: "MiSS with init_weights=mini"
                     if peft.get("init_weights") == "mini" else None),
    "PROMPT_TUNING": PeftType(_prompt_params, knob="num_virtual_tokens", virtual="prompt"),
    "P_TUNING": PeftType(_ptuning_params, knob="num_virtual_tokens", virtual="prompt", casts_weights=True,
                         sequence_saves=_ptuning_sequence_saves, not_modelled=_ptuning_not_modelled),
    # layers below the adapters run forward only (the lowest adapted layer's attention, which
    # keeps nothing either, is counted: an upper bound by one layer's attention)
    "ADAPTION_PROMPT": PeftType(_adaption_params, knob="adapter_len", layer_saves=_adaption_layer_saves,
                                backward_layers=_adapted_layers, params_in_base_dtype=True,
                                not_for_model=_adaption_not_for_model),
    # the harness's own bottleneck adapters (harness/adapters.py): not a PEFT type
    "BOTTLENECK": PeftType(_bottleneck_params, _bottleneck_saves, knob="bottleneck_size", knob_default=64,
                           casts_weights=True),
    "PREFIX_TUNING": PeftType(_prefix_params, knob="num_virtual_tokens", virtual="prefix",
                              not_modelled=lambda peft: "prefix tuning with prefix_projection"
                              if peft.get("prefix_projection") else None),
}


def virtual_tokens(peft: dict | None) -> tuple[int, int]:
    """(prompt tokens, prefix tokens) a method adds to each sequence."""
    kind = TYPES.get((peft or {}).get("peft_type"))
    if kind is None or kind.virtual is None:
        return 0, 0
    v = size(peft) or 0
    return (v, 0) if kind.virtual == "prompt" else (0, v)
