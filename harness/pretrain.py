"""A short pretraining for the tiny models, so that PEFT methods adapt a model that already
knows something, as they do in real use.

The corpus is synthetic and deterministic (`corpus`): sums and differences of two-digit
numbers written as the arithmetic task writes them ("07+32=39"), never of two numbers both
below `held_out_below` (20: every problem the arithmetic task asks by default is held out,
so its test problems are never seen in pretraining), and sentences of a small vocabulary.
The loop is the harness's own training loop (harness/train.py): full training, fp32 AdamW,
cosine schedule, on every token.
"""

from __future__ import annotations

import logging
import random

log = logging.getLogger(__name__)

WORDS = (
    "the a model method memory score train test step loss token adapter rank layer question answer "
    "what is how many number sum difference product of and plus minus times equals fine tune "
    "learning rate batch sequence length value result small large first last"
).split()
PLUS, MINUS = 0.6, 0.75  # cumulative shares of the corpus: sums, differences, then sentences


def corpus(n_texts: int, seed: int, max_operand: int = 49, held_out_below: int = 20) -> list[str]:
    """`n_texts` lines: sums ("07+32=39") and differences ("45-12=33") of two-digit numbers
    up to `max_operand`, never of two numbers both below `held_out_below` (the arithmetic
    task's default problems), and sentences of a small vocabulary."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n_texts):
        kind = rng.random()
        while True:  # draw until not both operands are held out
            a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
            if a >= held_out_below or b >= held_out_below:
                break
        if kind < PLUS:
            texts.append(f"{a:02d}+{b:02d}={a + b:02d}")
        elif kind < MINUS:
            a, b = max(a, b), min(a, b)
            texts.append(f"{a:02d}-{b:02d}={a - b:02d}")
        else:
            texts.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + ".")
    return texts


def pretrain(model, tokenizer, settings: dict) -> list[float]:
    """Train `model` (all weights, fp32 AdamW, cosine schedule) on `corpus` for
    `settings["steps"]` steps of `settings["batch_size"]` texts; returns the losses."""
    import torch

    from harness.data import batch_stream
    from harness.measure import StepTimer
    from harness.train import lr_scheduler, train

    texts = corpus(settings["texts"], settings["seed"], settings["max_operand"], settings["held_out_below"])
    ids = tokenizer(texts)["input_ids"]
    examples = [{"input_ids": x + [tokenizer.eos_token_id], "labels": x + [tokenizer.eos_token_id]} for x in ids]
    batches = batch_stream(examples, settings["batch_size"], settings["seed"], tokenizer.pad_token_id, "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=0.0)
    scheduler = lr_scheduler(optimizer, "cosine", settings["steps"] // 10, settings["steps"])
    losses = train(model, optimizer, scheduler, batches, max_steps=settings["steps"], grad_accum=1,
                   max_grad_norm=1.0, timer=StepTimer(torch.device("cpu"), 0),
                   log_every=max(1, settings["steps"] // 20))  # a line every 5%, with the time left
    log.info("pretrained %d steps: loss %.3f -> %.3f", settings["steps"], losses[0], losses[-1])
    return losses
