"""The training loop: plain PyTorch, one function, read top to bottom.

Each optimizer step runs `grad_accum` micro-batches under autocast, clips gradients, steps
the optimizer (then AdaLoRA's rank reallocation, if the model is AdaLoRA) and the LR
schedule, and records the loss and the timing of the step.

The loss of a step is the mean over all its labelled tokens, whatever the micro-batches hold
(as torchtune and transformers normalise it): each micro-batch's mean loss is weighted by its
share of the step's labelled tokens, so `grad_accum=4` x batch 8 makes the update that one
batch of the same 32 examples makes, also when the examples' lengths differ.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
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


def clock(seconds: float) -> str:
    """A duration as people read it: 42s, 3m05s, 1h02m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


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
    compile: bool = False,
    record: dict | None = None,
    probe: Callable[[], None] = lambda: None,
    world_size: int = 1,
) -> list[float]:
    """Train for `max_steps` optimizer steps; returns the loss of every step.

    With `compile`, the forward pass runs through `torch.compile(model, dynamic=True)` (built
    in the first step, which the timer's warm-up covers: about a minute for a tiny model on
    2 CPU cores); if the model cannot be
    compiled, one warning says why and the loop trains eagerly from the same first step.
    `record` (a dict), if given, gets `compiled` (bool) and `compile_error` (str or None).
    `probe` is called where memory peaks (after each forward pass and after the optimizer
    step): the memory sampler's reading from the loop itself.

    `batches` yields dicts of model inputs plus `n_tokens` (non-padding tokens) and
    `n_labels` (tokens that carry a loss), Python ints. Raises `Diverged` as soon as a step's
    loss is not finite.

    With `world_size` > 1 (one of several FSDP ranks, harness/distributed.py) each batch is this
    rank's share of a global batch and also carries `world_labels`, the global batch's labelled
    tokens: each rank's loss is weighted by its share of the step's labelled tokens, times the
    world size (FSDP averages gradients over ranks), so the update is one process's on the
    global batch; the logged loss is summed over the ranks.
    """
    import torch
    import torch.distributed as dist

    params = [p for p in model.parameters() if p.requires_grad]
    adalora = is_adalora(model)
    losses: list[float] = []
    record = {} if record is None else record
    record.update(compiled=compile, compile_error=None)
    # dynamic shapes from the start: batches differ in length (and the last of an epoch in
    # size), and recompiling for each new shape would land inside the timed steps
    forward = torch.compile(model, dynamic=True) if compile else model
    compile_errors = (torch._dynamo.exc.TorchDynamoException,) if compile else ()  # () catches nothing
    model.train()

    def forward_backward(micro_batches: list[dict], shares: list[int], total: int):
        """Gradients of the step's token-mean loss; returns that loss (a tensor)."""
        step_loss = torch.zeros((), device=params[0].device)
        for batch, labelled in zip(micro_batches, shares):
            weight = labelled / total  # 1.0 with one micro-batch and one process
            with autocast():
                out = forward(**batch)
            probe()  # the activations are all held now
            if labelled:
                (out.loss * (weight * world_size)).backward()  # one scalar product, as with one process
            else:  # a rank's share without labels: no loss, but the same collectives as the others
                (out.logits.sum() * 0.0).backward()
                continue
            # Log the task loss: AdaLoRA's objective adds its orthogonality regularizer.
            logged = task_loss(out.logits, batch["labels"]) if adalora else out.loss.detach()
            step_loss += logged * weight
        return step_loss

    progress = tqdm(range(max_steps), desc="train", unit="step", disable=None)
    started = time.monotonic()  # for the log lines' time left only (the timer measures the steps)
    for step in progress:
        timer.start()
        micro_batches = [next(batches) for _ in range(grad_accum)]
        step_tokens = sum(b.pop("n_tokens") for b in micro_batches)
        shares = [b.pop("n_labels") for b in micro_batches]
        total = sum(b.pop("world_labels", labelled) for b, labelled in zip(micro_batches, shares))
        try:
            step_loss = forward_backward(micro_batches, shares, total)
        except compile_errors as e:  # torch.compile failed on this model
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            log.warning("train.compile=true: this model does not compile (%s); training eagerly", reason[:300])
            record.update(compiled=False, compile_error=reason)
            optimizer.zero_grad(set_to_none=True)
            forward, compile_errors = model, ()
            step_loss = forward_backward(micro_batches, shares, total)
        if world_size > 1:  # each rank's share of the step's loss: their sum is the step's
            dist.all_reduce(step_loss)
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        probe()  # gradients, optimizer states and what the step made, at once
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
            spent = time.monotonic() - started
            log.info("step %d/%d  loss %.4f  lr %.3g  %.0f tok/s  %s elapsed, ~%s left", step + 1, max_steps,
                     loss_value, scheduler.get_last_lr()[0], step_tokens / elapsed, clock(spent),
                     clock(spent / (step + 1) * (max_steps - step - 1)))
    return losses
