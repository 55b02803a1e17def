"""Multiple-choice tasks (HellaSwag, ARC, PIQA … in llm-foundry's .jsonl form): each choice scored by the summed
log-probability of its continuation after the query; accuracy and length-normalised accuracy.

The conventions are lm-evaluation-harness's, so figures compare with published ones: the continuation of a choice
is " " + choice; a query's trailing whitespace moves to the continuation; the continuation's tokens are those the
whole text has past the query's own tokens; the length normalisation divides by the choice's characters; ties go
to the first choice. Every context starts with the token the model's documents start after
(`Tokenizer.document_start`): BOS for a model trained with it (a Llama 3, as its tokenizer adds it), else EOS, the
token raylm's packing ends each document with.

Scoring is batched and sharded like held-out loss: requests are sorted by length and cut into micro-batches once,
rank r runs micro-batches r, r + W, …, and one all-reduce gathers every request's score, so each request is scored
in the same batch on any world size.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from raylm import storage
from raylm.errors import DataError
from trainer.data import rank_micro_batches

DELIMITER = " "


@dataclass(frozen=True)
class Item:
    query: str
    choices: tuple[str, ...]
    gold: int
    where: str = ""
    """Its file and line, for the errors that come with tokenizing it."""


@dataclass
class Task:
    """A task ready to score: what accuracy needs and every choice's token ids, but no text. The driver tokenizes a
    task once and ships this to every rank: a choice's ids are kept as those past what it shares with the choice
    before it (the item's query, mostly), and every array in the smallest dtype its values fit, so it is smaller
    than the task's file."""

    name: str
    gold: np.ndarray
    """(items,) index of each item's right choice."""
    choices: np.ndarray
    """(items,) choices of each item."""
    choice_chars: np.ndarray
    """(requests,) characters of each request's choice: what acc_norm divides by."""
    continuation: np.ndarray
    """(requests,) tokens of each request's continuation, the ones scored."""
    shared: np.ndarray
    """(requests,) leading tokens each request shares with the one before it."""
    own: np.ndarray
    """(requests,) tokens of each request past the shared ones, which follow one another in `tokens`."""
    tokens: np.ndarray

    @property
    def first(self) -> np.ndarray:
        """(items + 1,) index of each item's first request, then the number of requests."""
        return np.concatenate([[0], np.cumsum(self.choices, dtype=np.int64)])

    @property
    def requests(self) -> list[tuple[list[int], int]]:
        """(token ids, continuation length) of every choice of every item, item by item: score_requests' form."""
        out, ids, start = [], [], 0
        for shared, own, n in zip(self.shared.tolist(), self.own.tolist(), self.continuation.tolist()):
            ids = ids[:shared] + self.tokens[start:start + own].tolist()
            out.append((ids, n))
            start += own
        return out


def small(values: list[int]) -> np.ndarray:
    """`values` as uint16 when they fit (counts and lengths mostly do), else int64."""
    return np.array(values, np.uint16 if max(values, default=0) < 1 << 16 else np.int64)


def make_task(name: str, items: list[Item], requests: list[tuple[list[int], int]], dtype: np.dtype) -> Task:
    """The Task of `items`, whose choices tokenize to `requests`; `dtype`: the tokenizer's token dtype."""
    shared, own, before = [], [], np.zeros(0, np.int64)
    for ids, _ in requests:
        ids = np.asarray(ids, np.int64)
        n = min(len(ids), len(before))
        differ = np.flatnonzero(ids[:n] != before[:n])
        shared.append(int(differ[0]) if len(differ) else n)
        own.append(ids[shared[-1]:])
        before = ids
    return Task(name, gold=small([item.gold for item in items]), choices=small([len(item.choices) for item in items]),
                choice_chars=small([len(c) for item in items for c in item.choices]),
                continuation=small([n for _, n in requests]), shared=small(shared), own=small([len(o) for o in own]),
                tokens=np.concatenate(own).astype(dtype) if own else np.zeros(0, dtype))


def task_name(path: str) -> str:
    return posixpath.basename(path.rstrip("/")).removesuffix(".jsonl")


def parse_item(line: str, where: str) -> Item:
    """One task line, `{"query": str, "choices": [str, ...], "gold": int}`; a mistake names the line and field."""
    try:
        record = json.loads(line)
    except ValueError:
        raise DataError(f"{where}: not a JSON object; each line is {{\"query\", \"choices\", \"gold\"}}") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: not a JSON object; each line is {{\"query\", \"choices\", \"gold\"}}")
    query, choices, gold = record.get("query"), record.get("choices"), record.get("gold")
    if not isinstance(query, str):
        raise DataError(f"{where}: \"query\" must be a string, got {query!r}")
    if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
        raise DataError(f"{where}: \"choices\" must be a list of at least 2 non-empty strings, got {choices!r}")
    if not (type(gold) is int and 0 <= gold < len(choices)):
        raise DataError(f"{where}: \"gold\" must be the index of the right choice (0 to {len(choices) - 1}), "
                        f"got {gold!r}")
    return Item(query, tuple(choices), gold, where)


def read_items(path: str) -> list[Item]:
    """The items of a task file (local or s3://)."""
    try:
        text = storage.read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        raise DataError(f"task {path} does not exist; pass a .jsonl file of {{\"query\", \"choices\", \"gold\"}} "
                        "lines") from None
    except OSError as exc:
        raise DataError(f"task {storage.describe_os_error(exc, path)}; pass a readable .jsonl file") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"task {path} is not UTF-8 text (byte {exc.start})") from None
    items = [parse_item(line, f"{path}:{n}") for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not items:
        raise DataError(f"task {path} has no items")
    return items


def encode_pair(tokenizer, context: str, continuation: str, max_len: int, where: str = "a request"
                ) -> tuple[list[int], int]:
    """(document start + context + continuation tokens, cut from the left to max_len + 1; the continuation's
    length). With BOS as the document start these are the ids transformers' tokenizer gives the text."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, prefix = tokenizer.encode([context + continuation, context], num_threads=1)
    cont = whole[len(prefix):]
    if not cont:
        raise DataError(f"{where}: continuation {continuation!r} has no tokens of its own after the query")
    if len(cont) > max_len:
        raise DataError(f"{where}: a continuation of {len(cont)} tokens does not fit the model's {max_len}-token "
                        "context")
    return ([tokenizer.document_start] + whole)[-(max_len + 1):], len(cont)


def load_task(path: str, tokenizer, *, max_len: int, limit: int = 0, seed: int = 0) -> Task:
    """A task ready to score: its items (a seeded `limit` of them, in file order, when limit > 0), tokenized."""
    from raylm.tokenizer import token_dtype

    items = read_items(path)
    if 0 < limit < len(items):
        keep = np.sort(np.random.default_rng([seed, len(items)]).permutation(len(items))[:limit])
        items = [items[i] for i in keep]
    requests = [encode_pair(tokenizer, item.query, DELIMITER + choice, max_len, item.where) for item in items
                for choice in item.choices]
    return make_task(task_name(path), items, requests, token_dtype(tokenizer.vocab_size))


def continuation_logprobs(model, batch: list[tuple[list[int], int]], device: torch.device) -> torch.Tensor:
    """(requests, 2) float64: each continuation's summed log-probability and whether every one of its tokens is the
    model's greedy choice, left on the device (no host sync). The log-softmax is taken over the continuation's
    positions only: a batch's whole (B, T, vocab) in fp32 would not fit beside a large vocabulary. An empty batch
    runs one dummy row (FSDP's forwards are collective) and returns none."""
    rows = batch or [([0, 0], 1)]
    width = max(len(ids) for ids, _ in rows) - 1
    tokens = torch.zeros((len(rows), width + 1), dtype=torch.long, device="cpu")  # built on the host, sent once
    for i, (ids, _) in enumerate(rows):
        tokens[i, :len(ids)] = torch.tensor(ids, device="cpu")
    tokens = tokens.to(device)
    logits, _ = model(tokens[:, :-1])
    out = torch.zeros((len(batch), 2), dtype=torch.float64, device=device)
    for i, (ids, n) in enumerate(batch):
        logprobs = torch.log_softmax(logits[i, len(ids) - 1 - n:len(ids) - 1].float(), dim=-1)
        target = tokens[i, len(ids) - n:len(ids)]
        out[i, 0] = logprobs.gather(1, target[:, None]).sum()
        out[i, 1] = (logprobs.argmax(-1) == target).all()
    return out


@torch.no_grad()
def score_requests(model, requests: list[tuple[list[int], int]], *, micro_batch: int, device: torch.device,
                   rank: int = 0, world: int = 1) -> np.ndarray:
    """(requests, 2): every request's continuation log-probability and greedy flag, on every rank. Collective
    when world > 1."""
    out = torch.zeros((len(requests), 2), dtype=torch.float64, device=device)
    longest_first = np.argsort([-len(ids) for ids, _ in requests], kind="stable")  # little padding per batch
    for chosen in rank_micro_batches(longest_first, micro_batch=micro_batch, rank=rank, world=world):
        scores = continuation_logprobs(model, [requests[i] for i in chosen], device)
        out[torch.from_numpy(chosen).to(device)] = scores
    if world > 1:
        dist.all_reduce(out)  # each request was scored on exactly one rank
    return out.cpu().numpy()


def accuracy(task: Task, loglikelihoods: np.ndarray) -> dict:
    """acc, acc_norm (log-likelihood per character of the choice), which items each got right, and every choice's
    log-likelihood, item by item (to compare with another scorer's, e.g. lm-eval's --log_samples)."""
    correct, correct_norm, per_item, first = [], [], [], task.first
    for gold, lo, hi in zip(task.gold.tolist(), first[:-1].tolist(), first[1:].tolist()):
        ll = loglikelihoods[lo:hi]
        correct.append(int(np.argmax(ll)) == gold)
        correct_norm.append(int(np.argmax(ll / task.choice_chars[lo:hi])) == gold)
        per_item.append(ll.tolist())
    return {"acc": float(np.mean(correct)), "acc_norm": float(np.mean(correct_norm)), "items": len(task.gold),
            "correct": correct, "loglikelihoods": per_item}


def score_task(model, task: Task, *, micro_batch: int, device: torch.device, rank: int = 0, world: int = 1) -> dict:
    scores = score_requests(model, task.requests, micro_batch=micro_batch, device=device, rank=rank, world=world)
    return accuracy(task, scores[:, 0])
