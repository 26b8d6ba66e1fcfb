"""Equal-budget comparisons: size a method to the baseline's trainable parameters or memory.

The baseline is QLoRA (conf/method/qlora.yaml) unless the job's `report.baseline` names another
method. With `budget=params`, a job sets its method's size knob (LoRA's rank, AdaLoRA's initial
rank, the number of virtual tokens of prompt and prefix tuning, VeRA's rank) to the value whose
trainable-parameter count comes closest to the baseline's on the same model. With
`budget=memory`, to the largest value whose predicted peak memory fits in the baseline's
predicted peak for the same model, batch and sequence length (harness/memory_model.py).
Methods without a size knob (full fine-tuning, IA3), or whose knob cannot reach the budget,
run with their own settings and are marked unmatched with the reason, so the report never
compares them as if they were matched. `budget=default` (the default) changes nothing.
"""

from __future__ import annotations

import copy

from omegaconf import OmegaConf

from harness import memory_model, peft_types
from harness.config import CONF_DIR, method_title

BUDGETS = ("default", "params", "memory")
REFERENCE = "qlora"  # the method sized to, unless the job's report.baseline names another


def reference_method(name: str = REFERENCE) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "method" / f"{name}.yaml"), resolve=True)


def resize(method: dict, value: int) -> dict:
    """A copy of `method` with its size knob (harness/peft_types.py) set to `value`, and the
    knob's companions kept in proportion (LoRA's alpha, AdaLoRA's target rank)."""
    peft = method["peft"]
    kind = peft_types.TYPES[peft["peft_type"]]
    new = copy.deepcopy(method)
    new["peft"][kind.knob] = value
    new["peft"].update(kind.rescale(peft, peft_types.size(peft), value))
    return new


def _trainable(shapes: dict, method: dict) -> int:
    return memory_model.adapter_params(shapes, method["peft"], method["base_dtype"])[0]


def match(method: dict, arch: dict, budget: str, *, batch_size: int, seq_len: int, limit: int | None = None,
          reference: str = REFERENCE, **predict_kwargs) -> tuple[dict, dict]:
    """The method sized for `budget` against the `reference` method (the report's baseline),
    and what was done: {budget, matched, knob, value, default, target, achieved, reason}.
    `limit` caps virtual tokens (positions left)."""
    info = {"budget": budget, "matched": budget == "default", "knob": None, "value": None, "default": None,
            "target": None, "achieved": None, "reason": None}
    if budget == "default":
        return method, info
    peft = method.get("peft") or {}
    kind = peft_types.TYPES.get(peft.get("peft_type"))
    if peft and kind is None:
        info["reason"] = f"{peft['peft_type']} is not modelled (harness/peft_types.py)"
        return method, info
    knob = kind.knob if kind else None
    if knob is None:
        what = "full fine-tuning" if not peft else f"{peft['peft_type']}"
        info["reason"] = f"{what} has no size knob"
        return method, info
    info.update(knob=f"peft.{knob}", default=peft_types.size(peft))
    shapes = memory_model.layer_shapes(arch)
    title = method_title(reference)
    reference = reference_method(reference)
    high = limit if (limit and knob == "num_virtual_tokens") else 1 << 16
    if budget == "params":
        target = _trainable(shapes, reference)
        size = lambda v: _trainable(shapes, resize(method, v))  # noqa: E731
    else:
        target = memory_model.predict(arch, reference, batch_size=batch_size, seq_len=seq_len,
                                      **predict_kwargs)["peak_mb"]
        size = lambda v: memory_model.predict(arch, resize(method, v), batch_size=batch_size,  # noqa: E731
                                              seq_len=seq_len, **predict_kwargs)["peak_mb"]
    info["target"] = target
    # size(v) grows with v: the largest v with size(v) <= target (1 if even that is over)
    value = memory_model.largest(lambda v: size(v) <= target, high) or 1
    if budget == "params" and size(value) <= target and value < high \
            and abs(size(value + 1) - target) < abs(size(value) - target):
        value += 1  # the closest count, above or below
    achieved = size(value)
    info.update(value=value, achieved=achieved)
    if budget == "memory" and achieved > target:
        info["reason"] = f"needs {achieved:,.0f} MiB at {knob}=1, over {title}'s {target:,.0f} MiB"
    elif budget == "params" and abs(achieved - target) > 0.1 * target:
        info["reason"] = (f"{knob}={value} gives {achieved:,} trainable parameters, {title} has {target:,}"
                          + (f" ({knob} is capped at {high} here)" if value >= high else ""))
    else:
        info["matched"] = True
        return resize(method, value), info
    info.update(value=info["default"], achieved=None)  # what runs: the method's own size
    return method, info
