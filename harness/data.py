"""Turn prompt/answer examples into token ids and length-grouped, padding-light batches."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)


def tokenize_examples(dataset, tokenizer, seq_len: int) -> tuple[list[dict], int]:
    """Token ids and labels (loss on the answer and EOS only); drops examples over seq_len.

    Returns the examples and how many were dropped. The prompt is tokenized on its own, with
    the tokenizer's special tokens (BOS), exactly as it is at generation time. Examples that
    are only lengths (task=lengths) get random token ids instead (random_token_examples).
    """
    if "length" in dataset.column_names:
        return random_token_examples(dataset, tokenizer, seq_len)
    prompts = tokenizer(list(dataset["prompt"]))["input_ids"]
    answers = tokenizer(list(dataset["answer"]), add_special_tokens=False)["input_ids"]
    examples, dropped = [], 0
    for p, a in zip(prompts, answers):
        a = a + [tokenizer.eos_token_id]
        if len(p) + len(a) > seq_len:
            dropped += 1
            continue
        examples.append({"input_ids": p + a, "labels": [IGNORE_INDEX] * len(p) + a})
    return examples, dropped


def random_token_examples(dataset, tokenizer, seq_len: int) -> tuple[list[dict], int]:
    """Examples of `length` token ids each, drawn uniformly from the tokenizer's vocabulary less
    its special tokens (seeded by the row's `token_seed`), every token carrying the loss; those
    over `seq_len` dropped."""
    special = set(tokenizer.all_special_ids)
    vocabulary = [i for i in range(len(tokenizer)) if i not in special]
    examples, dropped = [], 0
    for length, seed in zip(dataset["length"], dataset["token_seed"]):
        if length > seq_len:
            dropped += 1
            continue
        ids = random.Random(seed).choices(vocabulary, k=length)
        examples.append({"input_ids": ids, "labels": list(ids)})
    return examples, dropped


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of indices, epoch after epoch, grouping examples of similar length.

    Each epoch shuffles, cuts the order into mega-batches of 64 batches, sorts each by length
    and cuts it into batches, then shuffles the batches (HF's LengthGroupedSampler idea), so
    padding stays small while the order stays random and depends only on `seed`.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    mega = batch_size * 64
    while True:
        rng.shuffle(order)
        batches = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start : start + mega], key=lambda i: lengths[i], reverse=True)
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        rng.shuffle(batches)
        yield from batches


def collate(examples: list[dict], pad_id: int, device) -> dict:
    """Right-pad a batch to its longest example; returns tensors on `device`."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    ids, labels, mask = [], [], []
    for e in examples:
        pad = width - len(e["input_ids"])
        ids.append(e["input_ids"] + [pad_id] * pad)
        labels.append(e["labels"] + [IGNORE_INDEX] * pad)
        mask.append([1] * len(e["input_ids"]) + [0] * pad)
    as_tensor = lambda rows: torch.tensor(rows, dtype=torch.long, device=device)  # noqa: E731
    return {"input_ids": as_tensor(ids), "attention_mask": as_tensor(mask), "labels": as_tensor(labels)}


def batch_stream(examples: list[dict], batch_size: int, seed: int, pad_id: int, device) -> Iterator[dict]:
    """Endless length-grouped batches of `examples` as the training loop takes them: model
    inputs on `device`, plus `n_tokens` (non-padding tokens) and `n_labels` (tokens whose next
    token carries a loss, as the causal-LM loss counts them)."""
    lengths = [len(e["input_ids"]) for e in examples]
    labelled = [sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in examples]
    for idx in length_grouped_batches(lengths, batch_size, seed):
        batch = [examples[i] for i in idx]
        yield {**collate(batch, pad_id, device), "n_tokens": sum(lengths[i] for i in idx),
               "n_labels": sum(labelled[i] for i in idx)}


def one_epoch(examples: list[dict], batch_size: int, seed: int, pad_id: int, device) -> list[dict]:
    """The first pass over `examples` of `batch_stream` (model inputs only), for a data-driven
    initialisation (EVA) to cycle through."""
    batches = batch_stream(examples, batch_size, seed, pad_id, device)
    return [{k: b[k] for k in ("input_ids", "attention_mask", "labels")}
            for b in itertools.islice(batches, -(-len(examples) // batch_size))]
