"""Scoring: greedy generation on the test split, compared by the task's `evaluate` metric."""

from __future__ import annotations

import contextlib
import logging

log = logging.getLogger(__name__)


def generate_answers(model, tokenizer, prompts: list[str], *, batch_size: int, max_new_tokens: int,
                     device, autocast=contextlib.nullcontext) -> list[str]:
    """Greedy completions of `prompts`, batched by length with left padding, in input order."""
    import torch

    encoded = tokenizer(prompts)["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = [[tokenizer.pad_token_id] * (width - len(encoded[i])) + encoded[i] for i in idx]
            mask = [[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in idx]
            out = model.generate(
                input_ids=torch.tensor(ids, device=device),
                attention_mask=torch.tensor(mask, device=device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = out[:, width:]
            for i, text in zip(idx, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                answers[i] = text
    model.train(was_training)
    return answers


def score_generation(model, tokenizer, dataset, metric, metric_key: str, **kwargs) -> tuple[float, list[dict]]:
    """The metric's value on `dataset`, and a few (prompt, reference, prediction) samples."""
    predictions = generate_answers(model, tokenizer, list(dataset["prompt"]), **kwargs)
    value = metric.compute(predictions=predictions, references=list(dataset["answer"]))[metric_key]
    samples = [
        {"prompt": p, "reference": r, "prediction": g}
        for p, r, g in list(zip(dataset["prompt"], dataset["answer"], predictions))[:5]
    ]
    return float(value), samples
