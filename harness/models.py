"""Models: build the tiny Llama family locally, and load any model folder or Hub id.

Every model goes through `load_model`, which calls `from_pretrained` on a folder or a Hub id.
The tiny models are first built once (random weights + a tokenizer trained here on a
synthetic corpus, then with `init: pretrained` a short pretraining, harness/pretrain.py) into
a cache folder keyed by a hash of their config, then loaded from that folder like any local
checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness.errors import ConfigError, one_line

log = logging.getLogger(__name__)

# Bump when the way tiny models are built changes, so old cache entries are not reused.
TINY_BUILD_VERSION = 1
PRETRAIN_VERSION = 1  # of harness/pretrain.py's corpus and loop
RANDOM_BUILD_VERSION = 2  # 2: fast fill (fill_random)
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def cache_root() -> Path:
    return Path(os.environ.get("HARNESS_CACHE", Path.home() / ".cache" / "harness"))


def is_local_path(name_or_path: str) -> bool:
    """True for what can only be a folder (absolute, ./ ../ ~, or more than one '/')."""
    return (
        name_or_path.startswith(("/", "./", "../", "~"))
        or name_or_path.count("/") > 1
        or os.path.isdir(name_or_path)
    )


ARCHITECTURES_DIR = Path(__file__).parent / "architectures"
INIT_CHOICES = ("pretrained", "random")


def architectures() -> list[str]:
    return sorted(p.stem for p in ARCHITECTURES_DIR.glob("*.json"))


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, decided from its config alone (no torch, no download):

    tiny    no name_or_path and a `tiny` block: a tiny Llama built here (pretrained, or not)
    gguf    a GGUF file (`gguf_file`) in a folder, an installed package or a Hub repository,
            converted once into a safetensors checkpoint
    random  `init: random`: a shipped architecture's checkpoint with random weights
    folder  a local model folder
    hub     a Hub id
    """

    kind: str
    name_or_path: str | None = None   # folder, hub; gguf: where its file is
    architecture: dict | None = None  # config.json fields known without loading or building
    tiny: dict | None = None
    pretrained: bool = True           # tiny: with its pretraining
    gguf: Path | None = None          # the GGUF file, when it is local (or already downloaded)

    def folder(self) -> Path | None:
        """The folder the model loads from (built into the cache for tiny, gguf and random);
        None for a Hub id, and for a Hub GGUF file not downloaded yet."""
        if self.kind == "tiny":
            return tiny_cache_dir(self.tiny, self.pretrained)
        if self.kind == "random":
            return random_cache_dir(self.architecture, 0)
        if self.kind == "gguf":
            return gguf_cache_dir(self.gguf) if self.gguf else None
        return Path(self.name_or_path).expanduser() if self.kind == "folder" else None

    @property
    def built(self) -> bool:
        """True when nothing needs building before a job loads it."""
        if self.kind in ("folder", "hub"):
            return True
        folder = self.folder()
        return folder is not None and (folder / "config.json").is_file()


def model_source(model_cfg: dict) -> ModelSource:
    """Decide where `model_cfg`'s model comes from, checking what can be checked without
    loading it; a bad value raises ConfigError naming the key and what is allowed. Jobs, the
    launcher, the planner and config validation all ask this one function."""
    name_or_path = model_cfg.get("name_or_path")
    init = model_cfg.get("init", "pretrained")
    if init not in INIT_CHOICES:
        raise ConfigError(f"model.init={init!r}: allowed values are {', '.join(INIT_CHOICES)}")
    shipped = model_cfg.get("architecture")
    if shipped is not None and shipped not in architectures():
        raise ConfigError(f"model.architecture={shipped!r}: not a shipped architecture (allowed: "
                          f"{', '.join(architectures())}; files in {ARCHITECTURES_DIR})")
    architecture = json.loads((ARCHITECTURES_DIR / f"{shipped}.json").read_text()) if shipped else None
    gguf = model_cfg.get("gguf_file")
    if gguf is not None and (not isinstance(gguf, str) or not gguf.endswith(".gguf") or not name_or_path):
        raise ConfigError(f"model.gguf_file={gguf!r}: give the name of a .gguf file inside model.name_or_path "
                          "(a folder, package:NAME or a Hub id), or null")
    if name_or_path is not None and (not isinstance(name_or_path, str) or not name_or_path):
        raise ConfigError(f"model.name_or_path={name_or_path!r}: give a Hub id ('org/name'), a local folder, "
                          "or null for a model with a `tiny` block")

    tiny = model_cfg.get("tiny")
    if not name_or_path and tiny:
        built = tiny_cache_dir(tiny, pretrained=False) / "config.json"
        arch = json.loads(built.read_text()) if built.is_file() else \
            {"model_type": "llama", **{k: v for k, v in tiny.items() if k not in ("seed", "pretrain")}}
        return ModelSource("tiny", architecture=arch, tiny=tiny, pretrained=init == "pretrained")
    if init == "random":
        if architecture is None:
            raise ConfigError(f"model.init=random needs model.architecture, one of {', '.join(architectures())}")
        return ModelSource("random", name_or_path, architecture)
    if not name_or_path:
        raise ConfigError("model.name_or_path: missing; give a Hub id ('org/name') or a local folder, or a "
                          "`tiny` block to build a tiny model here")
    if gguf:
        local = name_or_path.startswith(PACKAGE_PREFIX) or is_local_path(name_or_path)
        path = gguf_path(model_cfg) if local else gguf_path(model_cfg, download=False)
        return ModelSource("gguf", name_or_path, architecture, gguf=path)
    if name_or_path.startswith(PACKAGE_PREFIX):
        raise ConfigError(f"model.name_or_path={name_or_path!r}: a package is a source of GGUF files; "
                          "set model.gguf_file")
    if is_local_path(name_or_path):
        folder = Path(name_or_path).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"model.name_or_path={name_or_path!r}: no such model folder (a folder with "
                              "config.json, or a Hugging Face id like 'org/name')")
        check_model_folder("model.name_or_path", folder)
        return ModelSource("folder", name_or_path, architecture or json.loads((folder / "config.json").read_text()))
    return ModelSource("hub", name_or_path, architecture)


def check_model_folder(key: str, folder: Path) -> None:
    """A local model folder must have a readable config.json and safetensors weights."""
    config = folder / "config.json"
    try:
        parsed = json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}={str(folder)!r}: config.json cannot be read as JSON ({type(e).__name__}); "
                          "a model folder needs the config.json its model was saved with")
    if not isinstance(parsed, dict) or "model_type" not in parsed:
        raise ConfigError(f"{key}={str(folder)!r}: config.json has no model_type; it is not a transformers model config")
    if not any(folder.glob("*.safetensors")):
        raise ConfigError(f"{key}={str(folder)!r}: no *.safetensors weights (the harness loads safetensors "
                          "only, never pickled .bin files); convert them or point at a folder that has them")


def resolve_model_source(model_cfg: dict) -> str:
    """The folder or Hub id to load, building (once, into the cache) what needs building: a
    tiny model, a GGUF file's checkpoint, a random-weight checkpoint (see model_source)."""
    source = model_source(model_cfg)
    if source.kind == "tiny":
        return str(build_tiny_model(source.tiny, pretrained=source.pretrained))
    if source.kind == "gguf":
        return str(build_gguf_model(source.gguf or gguf_path(model_cfg)))
    if source.kind == "random":
        return str(build_random_model(source.architecture, seed=0))
    return source.name_or_path if source.kind == "hub" else str(source.folder())


# --------------------------------------------------------------------------- GGUF files

PACKAGE_PREFIX = "package:"  # model.name_or_path=package:NAME: the folder of an installed Python package
GGUF_BUILD_VERSION = 1


def installed_package_folder(package: str) -> Path | None:
    """The folder of an installed Python package, found without importing it (a package that
    ships model or data files may not import without its own dependencies); None if absent."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    return Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None


def package_folder(name_or_path: str, install: str | None = None) -> Path:
    """The folder of the installed Python package `package:NAME` names."""
    package = name_or_path[len(PACKAGE_PREFIX):]
    folder = installed_package_folder(package)
    if folder is None:
        how = f": {install}" if install else ""
        raise ConfigError(f"model.name_or_path={name_or_path!r}: the Python package {package!r} is not installed"
                          f"{how}")
    return folder


def gguf_path(model_cfg: dict, download: bool = True) -> Path | None:
    """The GGUF file `model.gguf_file` names inside `model.name_or_path`: a local folder, an
    installed package (`package:NAME`) or a Hub repository (downloaded into the Hub cache; with
    `download=False`, None when it is not there yet)."""
    name, source = model_cfg["gguf_file"], str(model_cfg.get("name_or_path") or "")
    if source.startswith(PACKAGE_PREFIX) or is_local_path(source):
        folder = package_folder(source, model_cfg.get("install")) if source.startswith(PACKAGE_PREFIX) \
            else Path(source).expanduser()
        path = folder / name
        if not path.is_file():
            present = sorted(p.name for p in folder.glob("*.gguf")) if folder.is_dir() else []
            raise ConfigError(f"model.gguf_file={name!r}: no such file in {folder} "
                              f"(GGUF files there: {', '.join(present) or 'none'})")
        return path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(source, name, revision=model_cfg.get("revision"), local_files_only=not download))
    except LocalEntryNotFoundError:
        if not download:
            return None
        raise
    except Exception as e:  # noqa: BLE001  (not found, no network, gated: one line)
        raise ConfigError(f"model.gguf_file={name!r}: cannot get it from {source!r}: {str(e).splitlines()[0]}")


def file_digest(path: Path) -> str:
    """The sha256 of a file, read once per process for each version (path, size, mtime) of it:
    the launcher and each job ask for it, and GGUF files run to gigabytes."""
    stat = path.stat()
    return _digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_cache_dir(path: Path) -> Path:
    """The converted checkpoint's folder, keyed by the GGUF file's content."""
    return cache_root() / "gguf-models" / f"{file_digest(path)[:16]}-v{GGUF_BUILD_VERSION}"


def build_gguf_model(path: Path) -> Path:
    """Convert (once, into the cache) a GGUF file into a safetensors checkpoint: transformers
    reads it dequantized; its weights are saved in bf16 (what Hub checkpoints of these models
    hold) with its tokenizer, and every job then loads that folder with `from_pretrained` like
    any checkpoint (quantized methods get real bitsandbytes layers)."""
    target = gguf_cache_dir(path)
    if (target / "config.json").is_file():
        return target
    log.info("converting %s into a safetensors checkpoint in %s (once; cached)", path.name, target)

    def save(folder: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        try:
            model = AutoModelForCausalLM.from_pretrained(  # dense weights: a plain checkpoint
                path.parent, gguf_file=path.name, dtype=torch.bfloat16,
                quantization_config=GgufConfig(gguf_file=path.name, dequantize=True))
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except ImportError as e:
            raise ConfigError(f"model.gguf_file={path.name!r}: reading GGUF needs the gguf package "
                              f"(pip install gguf): {str(e).splitlines()[0]}")
        except (ValueError, KeyError, OSError, RuntimeError) as e:
            raise ConfigError(f"model.gguf_file={path.name!r}: transformers cannot read it: "
                              f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "gguf_source.json").write_text(json.dumps(
            {"gguf_file": path.name, "sha256": file_digest(path), "bytes": path.stat().st_size}, indent=1) + "\n")

    return save_into_place(target, save)


# --------------------------------------------------------------------------- tiny family


def tiny_cache_dir(tiny_cfg: dict, pretrained: bool) -> Path:
    if pretrained:
        key = json.dumps({"build": TINY_BUILD_VERSION, "pretrain_version": PRETRAIN_VERSION, **tiny_cfg},
                         sort_keys=True)
    else:  # the random-init build does not depend on the pretraining settings
        key = json.dumps({"build": TINY_BUILD_VERSION, **without_pretrain(tiny_cfg)}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root() / "tiny-models" / digest


def without_pretrain(tiny_cfg: dict) -> dict:
    return {k: v for k, v in tiny_cfg.items() if k != "pretrain"}


def is_built(model_cfg: dict) -> bool:
    """True when the model needs no building (a Hub id or folder, or already in the cache)."""
    return model_source(model_cfg).built


def what_is_built(model_cfg: dict) -> str:
    """One line for the log: what building `model_cfg` into the cache does, and why."""
    source, name = model_source(model_cfg), model_cfg.get("name")
    why = "once, into the cache, before its first job, so that no job's time or memory includes it"
    if source.kind == "tiny":
        tiny = source.tiny
        if source.pretrained:
            steps = tiny["pretrain"]["steps"]
            return (f"building model {name}: a tiny Llama trained here ({tiny['num_hidden_layers']} layers, hidden "
                    f"size {tiny['hidden_size']}; its tokenizer, then {steps} pretraining steps on a synthetic corpus, "
                    f"no download), {why}; progress below")
        return f"building model {name}: a tiny Llama with random weights, {why}"
    if source.kind == "gguf":
        return (f"building model {name}: converting {model_cfg['gguf_file']} into a safetensors checkpoint that "
                f"every job loads like any other, {why}")
    return (f"building model {name}: a {model_cfg.get('architecture')} checkpoint with random weights (no download), "
            f"{why}")


def tiny_llama_config(tiny_cfg: dict, **tokens):
    """The LlamaConfig of a tiny model's `tiny` block (`tokens`: its tokenizer's vocab size and
    special token ids; without them, the block's vocab_size). A key LlamaConfig does not know,
    which it would take silently, or a value it refuses, is one ConfigError."""
    import inspect

    from transformers import LlamaConfig

    arch = {k: v for k, v in tiny_cfg.items() if k not in ("vocab_size", "seed", "pretrain")}
    allowed = set(inspect.signature(LlamaConfig).parameters) - {"kwargs"}
    for key in arch:
        if key not in allowed:
            raise ConfigError(f"model.tiny.{key}: not a LlamaConfig setting (allowed: vocab_size, seed, pretrain, "
                              f"{', '.join(sorted(allowed - {'vocab_size'}))})")
    from transformers.activations import ACT2FN

    if arch.get("hidden_act", "silu") not in ACT2FN:
        raise ConfigError(f"model.tiny.hidden_act={arch['hidden_act']!r}: allowed values are {', '.join(sorted(ACT2FN))}")
    try:
        return LlamaConfig(**{"vocab_size": tiny_cfg["vocab_size"], **tokens}, **arch)
    except Exception as e:  # TypeError, ValueError, huggingface_hub's strict dataclass errors
        raise ConfigError(f"model.tiny: LlamaConfig refuses it: {one_line(e)}")


def build_tiny_model(tiny_cfg: dict, pretrained: bool = False) -> Path:
    """Build (once) and return the folder of a tiny Llama model described by `tiny_cfg`:
    random weights, or with `pretrained` those weights after `tiny_cfg["pretrain"]`'s
    pretraining (harness/pretrain.py).

    The folder is written under a temporary name and renamed into place, so concurrent jobs
    of a sweep never see a half-written model.
    """
    target = tiny_cache_dir(tiny_cfg, pretrained)
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    if pretrained:
        base = build_tiny_model(tiny_cfg, pretrained=False)
        log.info("pretraining tiny model into %s (once; cached)", target)

        def save_pretrained(folder: Path) -> None:
            from harness.pretrain import pretrain

            tokenizer = AutoTokenizer.from_pretrained(base)
            model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(tiny_cfg["pretrain"]["seed"])
                pretrain(model, tokenizer, tiny_cfg["pretrain"])
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)

        return save_into_place(target, save_pretrained)

    log.info("building tiny model into %s", target)

    def save(folder: Path) -> None:
        tokenizer = train_tokenizer(tiny_cfg["vocab_size"], seed=tiny_cfg["seed"])
        config = tiny_llama_config(tiny_cfg, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        with torch.random.fork_rng(devices=[]):  # the job's own random stream must not depend on the cache
            torch.manual_seed(tiny_cfg["seed"])
            model = LlamaForCausalLM(config)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return save_into_place(target, save)


def build_prefix() -> str:
    """The name a build's temporary folder starts with: this host and process, so that a later
    build can tell an abandoned folder from one still being written."""
    return f".build-{socket.gethostname()}-{os.getpid()}-"


def remove_abandoned_builds(folder: Path) -> None:
    """Remove the temporary folders of builds on this host whose process is gone (killed, or
    interrupted with Ctrl-C before its clean-up ran); builds running now, and other hosts'
    builds in a shared cache, are left alone."""
    host = f".build-{socket.gethostname()}-"
    for path in folder.glob(f"{host}*"):
        pid = path.name[len(host):].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # another user's live process
            continue


def save_into_place(target: Path, save) -> Path:
    """Run `save(folder)` on a temporary folder beside `target`, then rename it into place, so
    concurrent jobs of a sweep never see a half-written model (the first one built wins).
    Abandoned temporary folders of earlier builds are removed first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_builds(target.parent)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=build_prefix()))
    try:
        save(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another job built it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def synthetic_corpus(n_lines: int, seed: int) -> list[str]:
    """Deterministic text for the tokenizer: arithmetic and simple English sentences."""
    rng = random.Random(seed)
    words = (
        "the a model method memory score train test step loss token adapter rank layer "
        "question answer what is how many number sum difference product of and plus minus "
        "times equals fine tune learning rate batch sequence length value result"
    ).split()
    lines = []
    for _ in range(n_lines):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        lines.append(f"{a}{rng.choice('+-*')}{b}={a + b}")
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + ".")
    return lines


def train_tokenizer(vocab_size: int, seed: int):
    """A byte-level BPE tokenizer with single-digit tokens (as Llama 3 and Qwen split digits)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_corpus(2000, seed), trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def random_cache_dir(architecture: dict, seed: int, vocab_size: int = 512) -> Path:
    key = json.dumps({"build": RANDOM_BUILD_VERSION, "arch": architecture, "seed": seed, "vocab": vocab_size},
                     sort_keys=True)
    return cache_root() / "random-models" / hashlib.sha256(key.encode()).hexdigest()[:12]


def build_random_model(architecture: dict, seed: int, vocab_size: int = 512) -> Path:
    """Build (once, into the cache) a checkpoint of `architecture` (a config.json) with random
    bf16 weights and a small local tokenizer, so a real-size model can be measured with no
    download. Weights are initialized once, on the GPU if the model fits its free memory, else
    on the CPU (a 70B model: 141 GB, no card holds it), then loaded with `from_pretrained` like
    any checkpoint (quantized methods get real bitsandbytes layers)."""
    target = random_cache_dir(architecture, seed, vocab_size)
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    log.info("building a random-weight %s model into %s", architecture.get("model_type"), target)

    def save(folder: Path) -> None:
        tokenizer = train_tokenizer(vocab_size, seed=seed)
        fields = {k: v for k, v in architecture.items() if k not in ("architectures", "torch_dtype")}
        fields.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
        config = AutoConfig.for_model(**fields)
        with torch.device("meta"):  # shapes only: transformers' own init would take minutes at 7B
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.to_empty(device=build_device(sum(p.numel() * p.element_size() for p in model.parameters())))
        fill_random(model, std=getattr(config, "initializer_range", 0.02), seed=seed)
        model.tie_weights()
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return save_into_place(target, save)


def build_device(model_bytes: int) -> str:
    """Where a random-weight model of `model_bytes` is initialized: the GPU when it takes at most
    90% of the GPU's free memory (fast), else the CPU when the host has the memory free, else a
    ConfigError saying what it needs."""
    import psutil
    import torch

    if torch.cuda.is_available() and model_bytes <= 0.9 * torch.cuda.mem_get_info()[0]:
        return "cuda"
    available = psutil.virtual_memory().available
    if model_bytes > 0.9 * available:
        raise ConfigError(f"building its random bf16 weights takes {model_bytes / 2**30:,.1f} GiB, and neither the "
                          f"GPU nor this host has that much free (host: {available / 2**30:,.1f} GiB available)")
    return "cpu"


def fill_random(model, std: float, seed: int, block: int = 1 << 22) -> None:
    """Matrices from N(0, std), biases 0, norm weights 1, as transformers initializes a new
    model, but fast: each matrix repeats one block of 4M normal draws (the values of a
    random-weight model only have to be plausible: it measures memory and speed)."""
    import torch

    for name, p in model.named_parameters():
        with torch.no_grad():
            if p.dim() < 2:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
                continue
            generator = torch.Generator(device=p.device).manual_seed(seed)
            draws = torch.empty(min(block, p.numel()), dtype=p.dtype, device=p.device)
            draws.normal_(0.0, std, generator=generator)
            flat = p.view(-1)
            for start in range(0, flat.numel(), draws.numel()):
                end = min(start + draws.numel(), flat.numel())
                flat[start:end] = draws[: end - start]


# --------------------------------------------------------------------------- loading


def load_tokenizer(source: str, revision: str | None, trust_remote_code: bool = False, pad_token: str | None = None):
    """The model's tokenizer, with a padding token: its own, else the model config's
    `pad_token` (Llama 3: its reserved "<|finetune_right_pad_id|>"), else its EOS token.
    The harness pads batches itself (training on the right, generation on the left), so the
    tokenizer's padding side does not matter."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise OSError(f"cannot load the tokenizer of {source!r}: {e}") from e
    if tokenizer.pad_token is None:  # Llama, SmolLM2 and others ship without one
        if pad_token is not None and pad_token not in tokenizer.get_vocab():
            raise ConfigError(f"model.pad_token={pad_token!r} is not a token of {source!r}'s tokenizer "
                              "(null: pad with its EOS token)")
        tokenizer.pad_token = pad_token if pad_token is not None else tokenizer.eos_token
    return tokenizer


def load_model(source: str, revision: str | None, *, dtype, quantization: dict | None, device,
               trust_remote_code: bool = False):
    """Load a causal LM from a folder or Hub id, quantized through BitsAndBytesConfig if asked.

    Safe loading: weights from safetensors only (nothing is unpickled), and no code from the
    model's repository runs unless the model config sets trust_remote_code: true.
    """
    from transformers import AutoModelForCausalLM

    from harness.methods import quantization_config

    kwargs = {"revision": revision, "dtype": dtype, "attn_implementation": "sdpa", "use_safetensors": True,
              "trust_remote_code": trust_remote_code}
    config = quantization_config(quantization) if quantization else None
    hqq = config is not None and config.quant_method == "hqq"
    if config is not None and not hqq:
        kwargs["quantization_config"] = config
        kwargs["device_map"] = {"": str(device)}  # bitsandbytes quantizes while placing weights
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if hqq:  # quantized from the host: hqq moves each layer to the device as it quantizes it
        quantize_with_hqq(model, config, dtype, device)
    elif config is None:
        model.to(device)
    keep_4bit_layout_trainable(model)
    return model


def checkpoint_files(source: str, revision: str | None) -> list[str]:
    """The safetensors files of the checkpoint `source` names (a folder, or a Hub id at
    `revision`, already in the local Hub cache once the model has loaded): its one
    model.safetensors, or the shards its model.safetensors.index.json lists; [] without either."""
    folder = Path(source)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(source, revision=revision, local_files_only=True,
                                        allow_patterns=["*.safetensors", "*.safetensors.index.json"]))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [str(folder / name) for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = folder / "model.safetensors"
    return [str(single)] if single.is_file() else []


def quantize_with_hqq(model, config, dtype, device) -> None:
    """Quantize every Linear of the decoder layers with HQQ (hqq's AutoHQQHFModel: transformers
    5 cannot yet load with an HqqConfig), computing in `dtype`, and run its layers through
    hqq's PyTorch backend with autograd support, which dequantizes each weight again in the
    backward pass instead of keeping a dequantized copy for it (the default backend keeps it)."""
    from hqq.core.quantize import HQQBackend, HQQLinear
    from hqq.models.hf.base import AutoHQQHFModel

    AutoHQQHFModel.quantize_model(model, quant_config=config.quant_config, compute_dtype=dtype, device=str(device))
    HQQLinear.set_backend(HQQBackend.PYTORCH_BACKPROP)
    move_outside(model, HQQLinear, device)  # what hqq does not place itself (rotary buffers)


def move_outside(model, kind: type, device) -> None:
    """Move every parameter and buffer of `model` to `device` as `model.to(device)` would,
    except those of `kind` modules (HQQLinear places its quantized weight and scales itself, and
    moving it with `.to` would move its weight without its scales), module by module."""
    for module in model.modules():
        if not isinstance(module, kind):
            module._apply(lambda t: t.to(device), recurse=False)  # Module.to, for this module's own tensors


def keep_4bit_layout_trainable(model) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference in eval mode.

    On CPUs with AVX512-BF16, `Linear4bit` repacks its weight the first time it runs in eval
    mode and never packs it back; training after that (we score before training) runs a
    kernel without autograd support, so gradients stop flowing through the frozen layers.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
