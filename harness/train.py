"""The training loop: plain PyTorch, one function, read top to bottom.

Each optimizer step runs `grad_accum` micro-batches under autocast, clips gradients, steps
the optimizer (then AdaLoRA's rank reallocation, if the model is AdaLoRA) and the LR
schedule, and records the loss and the timing of the step.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator

from tqdm import tqdm

log = logging.getLogger(__name__)

SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


class Diverged(Exception):
    """The loss became NaN or infinite."""

    def __init__(self, step: int, loss: float, losses: list[float]):
        super().__init__(f"loss is {loss} at step {step}")
        self.step = step
        self.losses = losses  # the finite losses before it


def lr_scheduler(optimizer, schedule: str, warmup_steps: int, max_steps: int):
    """Linear warm-up, then the named decay (transformers' schedules)."""
    from transformers import get_scheduler

    return get_scheduler(SCHEDULES[schedule], optimizer, num_warmup_steps=warmup_steps,
                         num_training_steps=max_steps)


def task_loss(logits, labels):
    """Mean next-token cross-entropy over labelled tokens (what the model's loss is for
    plain causal LM), computed without gradient for logging."""
    import torch

    with torch.no_grad():
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def is_adalora(model) -> bool:
    from peft import AdaLoraModel

    return isinstance(getattr(model, "base_model", None), AdaLoraModel)


def train(
    model,
    optimizer,
    scheduler,
    batches: Iterator[dict],
    *,
    max_steps: int,
    grad_accum: int,
    max_grad_norm: float | None,
    timer,
    autocast: Callable = contextlib.nullcontext,
    log_every: int = 10,
) -> list[float]:
    """Train for `max_steps` optimizer steps; returns the loss of every step.

    `batches` yields dicts of model inputs plus `n_tokens` (non-padding tokens, a Python int).
    Raises `Diverged` as soon as a step's loss is not finite.
    """
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    adalora = is_adalora(model)
    losses: list[float] = []
    model.train()
    progress = tqdm(range(max_steps), desc="train", unit="step", disable=None)
    for step in progress:
        timer.start()
        step_loss = torch.zeros((), device=params[0].device)
        step_tokens = 0
        for _ in range(grad_accum):
            batch = next(batches)
            step_tokens += batch.pop("n_tokens")
            with autocast():
                out = model(**batch)
            (out.loss / grad_accum).backward()
            # Log the task loss: AdaLoRA's objective adds its orthogonality regularizer.
            logged = task_loss(out.logits, batch["labels"]) if adalora else out.loss.detach()
            step_loss += logged / grad_accum
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        if adalora:  # AdaLoRA prunes and reallocates ranks from the current gradients
            model.base_model.update_and_allocate(step)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = step_loss.item()
        elapsed = timer.stop(step_tokens)

        if not math.isfinite(loss_value):
            raise Diverged(step, loss_value, losses)
        losses.append(loss_value)
        progress.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{step_tokens / elapsed:.0f}")
        if (step + 1) % log_every == 0 or step + 1 == max_steps:
            log.info("step %d/%d  loss %.4f  lr %.3g  %.0f tok/s", step + 1, max_steps, loss_value,
                     scheduler.get_last_lr()[0], step_tokens / elapsed)
    return losses
