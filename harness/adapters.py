"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021), the harness's own: PEFT
has none, and AdapterHub's `adapters` package pins a transformers older than the one in use.

An adapter is a small feed-forward network on the output h of a Linear layer, with a skip
connection: h + up(f(down(h))), down to `bottleneck_size` features and back. With its
up-projection zero-initialised (the default) it starts as the identity, so training starts from
the pretrained model. Houlsby places one after each layer's attention (on o_proj's output) and
one after its MLP (on down_proj's output); Pfeiffer only the one after the MLP. That is the
method's `target_modules`, matched by the last part of a module's name as PEFT matches them.

A method asks for them with `peft: {peft_type: BOTTLENECK, ...}`; everything else (the memory
model's table entry in harness/peft_types.py, the budget's size knob, the FLOP count of the
trainable Linear layers) treats them like a PEFT type. Saved as `adapter_model.safetensors`
(the adapters' tensors) and `adapter_config.json` (the settings), as PEFT saves its adapters.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

PEFT_TYPE = "BOTTLENECK"
NONLINEARITIES = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "silu": torch.nn.SiLU, "tanh": torch.nn.Tanh}
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


@dataclasses.dataclass
class BottleneckConfig:
    """The settings of a method's bottleneck adapters (the keys of its `peft` block)."""

    target_modules: list[str] = dataclasses.field(default_factory=lambda: ["o_proj", "down_proj"])
    bottleneck_size: int = 64
    nonlinearity: str = "relu"
    zero_init_up: bool = True

    def __post_init__(self):
        size = self.bottleneck_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"bottleneck_size={size!r}: must be a positive integer")
        if self.nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity={self.nonlinearity!r}: allowed values are {', '.join(NONLINEARITIES)}")
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError(f"target_modules={self.target_modules!r}: must be a non-empty list of module names")
        self.target_modules = list(self.target_modules)


class BottleneckAdapter(torch.nn.Module):
    """A Linear layer followed by a bottleneck adapter on its output: h + up(f(down(h)))."""

    def __init__(self, base_layer: torch.nn.Module, config: BottleneckConfig):
        super().__init__()
        width = base_layer.out_features
        self.base_layer = base_layer
        self.adapter_down = torch.nn.Linear(width, config.bottleneck_size)
        self.adapter_act = NONLINEARITIES[config.nonlinearity]()
        self.adapter_up = torch.nn.Linear(config.bottleneck_size, width)
        if config.zero_init_up:
            torch.nn.init.zeros_(self.adapter_up.weight)
            torch.nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x):
        h = self.base_layer(x)
        a = self.adapter_up(self.adapter_act(self.adapter_down(h.to(self.adapter_down.weight.dtype))))
        return h + a.to(h.dtype)


def add_adapters(model: torch.nn.Module, config: BottleneckConfig) -> torch.nn.Module:
    """Freeze the model and put a trainable fp32 adapter on every targeted Linear layer (plain
    or bitsandbytes'). Raises ValueError when no module matches, as PEFT does."""
    model.requires_grad_(False)
    targets = [(name, module) for name, module in model.named_modules()
               if name.rsplit(".", 1)[-1] in config.target_modules and hasattr(module, "out_features")]
    if not targets:
        raise ValueError(f"Target modules {config.target_modules} not found in the base model")
    for name, module in targets:
        parent, _, child = name.rpartition(".")
        adapter = BottleneckAdapter(module, config).to(module.weight.device)
        setattr(model.get_submodule(parent), child, adapter)
    model.bottleneck_config = config
    return model


def has_adapters(model) -> bool:
    return isinstance(getattr(model, "bottleneck_config", None), BottleneckConfig)


def adapter_state_dict(model) -> dict:
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if ".adapter_" in name}


def save_adapters(model, folder) -> None:
    """Write the adapters' tensors and settings into `folder` (PEFT's file names)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model), folder / WEIGHTS_FILE)
    settings = {"peft_type": PEFT_TYPE, **dataclasses.asdict(model.bottleneck_config)}
    (folder / CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n")


def load_adapters(model, folder) -> torch.nn.Module:
    """The base `model` with the adapters saved in `folder` (save_adapters) put back on it."""
    from safetensors.torch import load_file

    folder = Path(folder)
    settings = json.loads((folder / CONFIG_FILE).read_text())
    settings.pop("peft_type")
    model = add_adapters(model, BottleneckConfig(**settings))
    saved = load_file(folder / WEIGHTS_FILE)
    expected = adapter_state_dict(model)
    if set(saved) != set(expected):
        raise ValueError(f"{folder / WEIGHTS_FILE}: its tensors do not match this model's adapters")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in saved:
                p.copy_(saved[name])
    return model
