"""The configuration's schema: the types and allowed values of the top-level keys and of the
`train`, `measure`, `eval` and `report` blocks, as dataclasses registered in Hydra's ConfigStore
(as optimum-benchmark does).

conf/config.yaml names `base_config` first in its defaults, so Hydra merges every value onto
these types: a value of the wrong type, or a key that is not here (`+train.max_step=100`, a
typo of max_steps), is refused by Hydra while composing, before any job. The values themselves
stay in conf/config.yaml with their comments; the fields here carry no defaults but MISSING.
Ranges and choices are checked by each dataclass's `__post_init__`, which `check(config)`
runs on a resolved job configuration. The model, method, task, forgetting and capability
blocks stay open: each config group's builder takes keys of its own (harness/config.py checks
their common keys).

Each field's metadata says what is allowed: `min` (and `above`: strictly greater), `choices`
(a tuple, or a function returning one), `pattern`, `nullable`; tests draw wrong values from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from harness.errors import ConfigError

DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"


def _method_names() -> tuple[str, ...]:
    from harness.config import group_options

    return tuple(group_options("method"))


def _schedules() -> tuple[str, ...]:
    from harness.train import SCHEDULES

    return tuple(SCHEDULES)


def _adamw_impls() -> tuple[str, ...]:
    from harness.methods import ADAMW_IMPLS

    return tuple(ADAMW_IMPLS)


def spec(**allowed) -> Any:
    """A required field (its value comes from conf/config.yaml) with what it allows."""
    return field(default=MISSING, metadata=allowed)


def allowed(f) -> str:
    """What a field allows, in words."""
    m, kind = f.metadata, f.type.replace("Optional[", "").rstrip("]")
    choices = m.get("choices")
    if choices is not None:
        values = choices() if callable(choices) else choices
        text = f"allowed values are {', '.join(map(str, values))}"
    elif "pattern" in m:
        text = m.get("says", f"must match {m['pattern']}")
    elif kind == "bool":
        text = "must be true or false"
    elif kind == "int":
        text = "must be a positive integer" if m.get("min") == 1 else f"must be an integer >= {m.get('min', 0)}"
    elif kind == "float":
        text = "must be a positive number" if m.get("above") == 0 else "must be a non-negative number"
    else:
        text = f"must be a {kind}"
    return text + (", or null" if m.get("nullable") else "")


SCALARS = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}


def check_values(kind, values: dict, section: str) -> None:
    """Raise ConfigError naming the first scalar field of dataclass `kind` whose value in
    `values` is not allowed (of the wrong type, out of range, not a choice)."""
    for f in fields(kind):
        base = f.type.replace("Optional[", "").rstrip("]")
        if base not in SCALARS:  # a block (checked on its own) or an open group
            continue
        value, m = values.get(f.name), f.metadata
        if value == MISSING or (value is None and m.get("nullable")):  # MISSING: the bare schema
            continue
        choices = m.get("choices")
        options = choices() if callable(choices) else choices
        wrong_type = not isinstance(value, SCALARS[base]) or (base != "bool" and isinstance(value, bool))
        bad = (
            wrong_type
            or (options is not None and value not in options)
            or ("pattern" in m and not re.fullmatch(m["pattern"], str(value)))
            or ("min" in m and value < m["min"])
            or ("above" in m and value <= m["above"])
            or (base == "str" and not value.strip())
        )
        if bad:
            raise ConfigError(f"{section + '.' if section else ''}{f.name}={value!r}: {allowed(f)}")


@dataclass
class TrainConfig:
    max_steps: int = spec(min=1)
    batch_size: int = spec(min=1)
    grad_accum: int = spec(min=1)
    lr: float = spec(above=0)
    lr_scale: float = spec(above=0)
    weight_decay: float = spec(min=0)
    warmup_steps: int = spec(min=0)
    schedule: str = spec(choices=_schedules)
    max_grad_norm: float = spec(min=0)
    seq_len: int = spec(min=1)
    precision: str = spec(choices=("bf16", "fp32"))
    gradient_checkpointing: bool = spec()
    nproc_per_node: int = spec(min=1)
    compile: bool = spec()
    adamw_impl: str = spec(choices=_adamw_impls)
    log_every: int = spec(min=1)

    def __post_init__(self):
        check_values(type(self), vars(self), "train")


@dataclass
class MeasureConfig:
    warmup_steps: int = spec(min=0)
    sample_interval_s: float = spec(above=0)
    cpu_mmap_threshold_kb: Optional[int] = spec(min=1, nullable=True)

    def __post_init__(self):
        check_values(type(self), vars(self), "measure")


@dataclass
class EvalConfig:
    before: bool = spec()
    validation: bool = spec()
    batch_size: int = spec(min=1)

    def __post_init__(self):
        check_values(type(self), vars(self), "eval")


@dataclass
class ReportConfig:
    enabled: bool = spec()
    out: Optional[str] = spec(nullable=True)
    baseline: str = spec(choices=_method_names)

    def __post_init__(self):
        check_values(type(self), vars(self), "report")


@dataclass
class Config:
    sweep_name: str = spec(pattern=NAME_PATTERN, says="must be a name of letters, digits, '.', '_' and '-' "
                                                      "(it names the sweep's folder and report)")
    seed: int = spec(min=0)
    device: str = spec(pattern=DEVICE_PATTERN, says="allowed values are auto, cpu, cuda, cuda:N")
    deterministic: bool = spec()
    memory_limit_mb: Optional[float] = spec(above=0, nullable=True)
    force: bool = spec()
    budget: str = spec(choices=("default", "params", "memory"))
    train: TrainConfig = field(default_factory=TrainConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    # the config groups' blocks: open, each builder's keys (checked by harness/config.py)
    model: Any = MISSING
    method: Any = MISSING
    task: Any = MISSING
    forgetting: Any = None
    capability: Any = None

    def __post_init__(self):
        check_values(type(self), vars(self), "")


SECTIONS = {"train": TrainConfig, "measure": MeasureConfig, "eval": EvalConfig, "report": ReportConfig}


def check(config: dict) -> None:
    """Check a resolved job configuration against the schema: one ConfigError naming the first
    bad key. Hydra has refused wrong types already, but not keys added with `+` (its way to
    append), so unknown keys are refused here; then ranges and choices, and the types again for
    configurations that did not come through Hydra."""
    for section, kind in [("", Config), *SECTIONS.items()]:
        values = config[section] if section else config
        known = [f.name for f in fields(kind)]
        for key in values:
            if key not in known:
                raise ConfigError(unknown_key(f"{section}.{key}" if section else key))
        check_values(kind, values, section)


def _field(dotted: str):
    """The schema's field of a dotted key (train.max_steps), or None."""
    section, _, name = dotted.rpartition(".")
    kind = SECTIONS.get(section) if section else Config
    return next((f for f in fields(kind) if f.name == name), None) if kind else None


def unknown_key(dotted: str) -> str:
    """The line for a key the schema does not have, with the nearest one it has."""
    import difflib

    section, _, name = dotted.rpartition(".")
    kind = SECTIONS.get(section) if section else Config
    if kind is None:
        return f"{dotted}: no such key"
    known = [f.name for f in fields(kind)]
    near = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    where = f"in {section}" if section else "at the top level"
    hint = f"did you mean {section + '.' if section else ''}{near[0]}?" if near else f"the keys {where}: {', '.join(known)}"
    return f"{dotted}: no such key {where} ({hint})"


def wrong_value(dotted: str, value) -> str:
    """The line for a value of the wrong type for a key (Hydra's ValidationError)."""
    f = _field(dotted)
    return f"{dotted}={value!r}: {allowed(f) if f is not None else 'a value of the wrong type'}"


def register() -> None:
    """Put the schema in Hydra's ConfigStore as `base_config` (conf/config.yaml's first default)."""
    ConfigStore.instance().store(name="base_config", node=Config)


register()
