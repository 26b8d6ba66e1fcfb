"""Scoring a model: greedy generation compared by the task's `evaluate` metric, the likeliest
of a task's choices (log-likelihood), and the loss on general text (for forgetting)."""

from __future__ import annotations

import contextlib
import logging

from harness.errors import ConfigError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def evaluating(model, autocast=contextlib.nullcontext):
    """Eval mode, no gradients and the job's autocast, for the duration; the model's own
    mode (training or not) is restored afterwards."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast():
            yield
    finally:
        model.train(was_training)


def generate_answers(model, tokenizer, prompts: list[str], *, batch_size: int, max_new_tokens: int,
                     device, autocast=contextlib.nullcontext) -> list[str]:
    """Greedy completions of `prompts`, batched by length with left padding, in input order."""
    import torch

    from harness.distributed import synced

    encoded = tokenizer(prompts)["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(prompts)
    with evaluating(model, autocast):
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
                synced_gpus=synced(),  # several FSDP ranks: each runs until all are done
            )
            new_tokens = out[:, width:]
            for i, text in zip(idx, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                answers[i] = text
    return answers


def example_ids(dataset) -> list:
    """Ids that name each example the same way in every job of a task: the dataset's own `id`
    or `idx` column, else the example's position in the split (which the task's seeded
    shuffle fixes)."""
    for column in ("id", "idx"):
        if column in dataset.column_names:
            return [v if isinstance(v, (int, str)) else str(v) for v in dataset[column]]
    return list(range(len(dataset)))


def score_generation(model, tokenizer, dataset, metric, metric_key: str,
                     **kwargs) -> tuple[float, list[dict], list[dict]]:
    """The metric's value on `dataset`, a few (prompt, reference, prediction) samples, and
    each example's outcome (`example_id`, `score`, `prediction`)."""
    predictions = generate_answers(model, tokenizer, list(dataset["prompt"]), **kwargs)
    computed = metric.compute(predictions=predictions, references=list(dataset["answer"]))
    samples = [
        {"prompt": p, "reference": r, "prediction": g}
        for p, r, g in list(zip(dataset["prompt"], dataset["answer"], predictions))[:5]
    ]
    outcomes = [{"example_id": i, "score": float(s), "prediction": g}
                for i, s, g in zip(example_ids(dataset), computed["per_example"], predictions)]
    return float(computed[metric_key]), samples, outcomes


def sequence_logprobs(model, batch: dict):
    """Log-probability of each labelled token of `batch` (input_ids, attention_mask, labels
    with -100 on unscored tokens): a (batch, length - 1) tensor, 0 where unscored. Prompt
    tuning prepends virtual tokens to the logits; only the last `length` positions are read."""
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, -batch["input_ids"].shape[1]:-1]
    targets = batch["labels"][:, 1:]
    scored = targets != -100
    # Only the scored positions in fp32 (for choices: a few tokens, not the whole vocabulary x length).
    chosen = logits[scored].float()
    logprobs = torch.zeros(targets.shape, dtype=torch.float32, device=logits.device)
    logprobs[scored] = chosen.gather(-1, targets[scored].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(chosen, dim=-1)
    return logprobs


def choice_loglikelihoods(model, tokenizer, prompts: list[str], choices: list[list[str]], *, batch_size: int,
                          device, autocast=contextlib.nullcontext) -> list[list[float]]:
    """For each prompt, the summed log-likelihood of each of its choices' tokens after it.
    Prompt and choice are tokenized apart and joined, exactly as training examples are. When
    every choice is a single token (yes/no, A/B/C/D), one forward pass of each prompt scores
    all its choices (`single_token_choices`); otherwise each (prompt, choice) pair is a row."""
    prompt_ids = tokenizer(prompts)["input_ids"]
    choice_ids = [tokenizer(list(options), add_special_tokens=False)["input_ids"] for options in choices]
    if all(len(ids) == 1 for options in choice_ids for ids in options):
        return single_token_choices(model, prompt_ids, [[ids[0] for ids in options] for options in choice_ids],
                                    pad_id=tokenizer.pad_token_id, batch_size=batch_size, device=device,
                                    autocast=autocast)
    return per_choice_loglikelihoods(model, prompt_ids, choice_ids, pad_id=tokenizer.pad_token_id,
                                     batch_size=batch_size, device=device, autocast=autocast)


def per_choice_loglikelihoods(model, prompt_ids: list[list[int]], choice_ids: list[list[list[int]]], *, pad_id: int,
                              batch_size: int, device, autocast=contextlib.nullcontext) -> list[list[float]]:
    """Each choice's summed token log-likelihood after its prompt, one row per (prompt, choice)."""
    from harness.data import IGNORE_INDEX, collate

    rows = []  # (example, choice, token ids, labels)
    for i, (p, options) in enumerate(zip(prompt_ids, choice_ids)):
        for j, ids in enumerate(options):
            rows.append((i, j, {"input_ids": p + ids, "labels": [IGNORE_INDEX] * len(p) + ids}))
    rows.sort(key=lambda r: len(r[2]["input_ids"]))
    scores = [[0.0] * len(options) for options in choice_ids]
    with evaluating(model, autocast):
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            batch = collate([r[2] for r in chunk], pad_id, device)
            totals = sequence_logprobs(model, batch).sum(dim=1).tolist()
            for (i, j, _), total in zip(chunk, totals):
                scores[i][j] = total
    return scores


def single_token_choices(model, prompt_ids: list[list[int]], choice_tokens: list[list[int]], *, pad_id: int,
                         batch_size: int, device, autocast=contextlib.nullcontext) -> list[list[float]]:
    """Each choice's log-likelihood when every choice is one token: the log-softmax of the
    next-token logits after the prompt, read at each choice's token (one forward pass a prompt)."""
    import torch

    from harness.data import collate

    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    scores: list[list[float]] = [[] for _ in prompt_ids]
    with evaluating(model, autocast):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = collate([{"input_ids": prompt_ids[i], "labels": prompt_ids[i]} for i in idx], pad_id, device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits = logits[:, -batch["input_ids"].shape[1]:]  # prompt tuning prepends virtual tokens
            last = torch.tensor([len(prompt_ids[i]) - 1 for i in idx], device=logits.device)
            logprobs = torch.log_softmax(logits[torch.arange(len(idx), device=logits.device), last].float(), dim=-1)
            for row, i in enumerate(idx):
                scores[i] = logprobs[row, choice_tokens[i]].tolist()
    return scores


def score_choice(model, tokenizer, dataset, metric, metric_key: str, *, batch_size: int, device,
                 autocast=contextlib.nullcontext, **_) -> tuple[float, list[dict], list[dict]]:
    """The metric (accuracy) of the likeliest choice against `label`, a few samples, and each
    example's outcome (`example_id`, `score`, `prediction`: the chosen index, and
    `choice_logliks`: each choice's summed log-likelihood)."""
    scores = choice_loglikelihoods(model, tokenizer, list(dataset["prompt"]), list(dataset["choices"]),
                                   batch_size=batch_size, device=device, autocast=autocast)
    predictions = [max(range(len(s)), key=s.__getitem__) for s in scores]
    labels = list(dataset["label"])
    computed = metric.compute(predictions=predictions, references=labels)
    samples = [
        {"prompt": p, "reference": c[label], "prediction": c[pred]}
        for p, c, label, pred in list(zip(dataset["prompt"], dataset["choices"], labels, predictions))[:5]
    ]
    outcomes = [{"example_id": i, "score": float(s), "prediction": pred, "choice_logliks": loglik}
                for i, s, pred, loglik in zip(example_ids(dataset), computed["per_example"], predictions, scores)]
    return float(computed[metric_key]), samples, outcomes


def score_nothing(*args, **kwargs) -> tuple[None, list, list]:
    """scoring: none (task=lengths): no score, no samples, no outcomes."""
    return None, [], []


SCORERS = {"generate": score_generation, "choice": score_choice, "none": score_nothing}


def text_loss(model, tokenizer, texts: list[str], *, max_tokens: int, batch_size: int, device,
              autocast=contextlib.nullcontext) -> float:
    """Mean next-token loss (nats per token) of `model` on `texts`, each cut to `max_tokens`:
    the forgetting metric's measure of general language ability."""
    from harness.data import collate

    encoded = [ids[:max_tokens] for ids in tokenizer(texts)["input_ids"] if len(ids) > 1]
    encoded.sort(key=len)
    total, count = 0.0, 0
    with evaluating(model, autocast):
        for start in range(0, len(encoded), batch_size):
            batch = collate([{"input_ids": ids, "labels": ids} for ids in encoded[start : start + batch_size]],
                            tokenizer.pad_token_id, device)
            total -= sequence_logprobs(model, batch).sum().item()
            count += sum(len(ids) - 1 for ids in encoded[start : start + batch_size])
    if not count:
        raise ConfigError("forgetting: no text of 2 or more tokens to score (raise forgetting.max_tokens, or check the texts)")
    return total / count
