"""Library messages that are noise for someone running the harness, silenced once per process.

Imported first by the job server (harness/launch.py: PRELOAD), so that the jobs forked from it
and the model builds inherit it, and by `python -m harness` itself. What is silenced, and why:

- bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" and the `kernels`
  package's "Skipping publisher trust check ... offline mode": on a CPU with AVX512-BF16,
  importing bitsandbytes asks the `kernels` package (which transformers 5.25 and later
  installs) for a compiled 4-bit kernel from the Hugging Face Hub. Offline, or without the
  package, it falls back to its own CPU code and says so at every start. The fallback is what
  the harness's CPU figures were measured with; with Hub access the downloaded kernel runs.
- transformers' "Loading weights" and "Writing model shards" progress bars: a bar per model
  load or save, which on the tiny models flashes by and in a job log is one more line per job.
  Downloads keep their progress bars (huggingface_hub's), and so do the harness's own.
- transformers' FutureWarning that `is_gradient_checkpointing` is deprecated: PEFT reads that
  attribute on every model it wraps; nothing the user can act on.

Warnings a user can act on (an ignored setting, a method falling back) are kept.
"""

from __future__ import annotations

import logging
import warnings

QUIET_BARS = ("Loading weights", "Writing model shards")


def _hide_weight_bars(factory, args, kwargs):
    """transformers' tqdm hook: its weight-loading and shard-writing bars disabled, every
    other bar as asked."""
    if kwargs.get("desc") in QUIET_BARS:
        kwargs = {**kwargs, "disable": True}
    return factory(*args, **kwargs)


for name in ("bitsandbytes.backends.cpu.ops", "kernels"):
    logging.getLogger(name).setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
try:
    from transformers.utils import logging as _transformers_logging
except ImportError:  # the launching process of a user without transformers' extras: nothing to hide
    pass
else:
    _transformers_logging.set_tqdm_hook(_hide_weight_bars)
