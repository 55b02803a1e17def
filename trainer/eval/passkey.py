"""Passkey retrieval (Mohtashami & Jaggi 2023): does a model use its whole context? A random 5-digit key is planted
at depth d (0 = the start, 1 = just before the question) of filler text L tokens long, and the model must continue
"The pass key is" with it: right when every token of the key is its greedy choice (one forward, scored like a
multiple-choice continuation: `multiple_choice.score_requests`, sharded and the same on any W). The prompts are a
function of (seed, L, d, trial), built on every rank as on the driver.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from raylm.errors import ConfigError
from trainer.eval.multiple_choice import encode_pair, score_requests

FILLER = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."]
QUESTION = "What is the pass key? The pass key is"


def needle(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def prompt_text(key: str, sentences: int, depth: float) -> str:
    filler = [FILLER[i % len(FILLER)] for i in range(sentences)]
    at = round(depth * sentences)
    return " ".join([*filler[:at], needle(key), *filler[at:], QUESTION])


def passkey_request(tokenizer, key: str, *, length: int, depth: float, max_len: int) -> tuple[list[int], int]:
    """(ids, the key's tokens) of the longest prompt of whole filler sentences that, with its key, is at most
    `length` tokens."""
    def request(sentences: int) -> tuple[list[int], int]:
        return encode_pair(tokenizer, prompt_text(key, sentences, depth), " " + key, max_len=max_len)

    low, high = 0, max(1, length)  # a sentence is at least one token: `length` sentences are too many
    if len(request(0)[0]) > length:
        raise ConfigError(f"eval.passkey={length}: even without filler the prompt is {len(request(0)[0])} tokens; "
                          "give longer lengths")
    while low < high:  # the most sentences that fit
        mid = (low + high + 1) // 2
        low, high = (mid, high) if len(request(mid)[0]) <= length else (low, mid - 1)
    return request(low)


@dataclass
class Passkey:
    lengths: list[int]
    depths: list[float]
    trials: int
    requests: list[tuple[list[int], int]]
    """lengths × depths × trials, in that order."""


def passkey_task(tokenizer, *, lengths: list[int], depths: list[float], trials: int, seed: int,
                 max_len: int) -> Passkey:
    for length in lengths:
        if not 0 < length <= max_len + 1:
            raise ConfigError(f"eval.passkey={length} does not fit the model's context of {max_len} tokens")
    for depth in depths:
        if not 0 <= depth <= 1:
            raise ConfigError(f"eval.passkey_depths has {depth}; a depth is in [0, 1]")
    requests = []
    for length in lengths:
        for depth in depths:
            for trial in range(trials):
                key = str(random.Random(f"{seed}:{length}:{depth}:{trial}").randrange(10000, 100000))
                requests.append(passkey_request(tokenizer, key, length=length, depth=depth, max_len=max_len))
    return Passkey(list(lengths), list(depths), trials, requests)


def score_passkey(model, task: Passkey, *, micro_batch: int, device, rank: int = 0, world: int = 1) -> dict:
    """{"grid": {length: {depth: accuracy}}, "acc": over every prompt, "tokens": {length: mean prompt tokens}};
    collective."""
    right = score_requests(model, task.requests, micro_batch=micro_batch, device=device, rank=rank,
                           world=world)[:, 1].reshape(len(task.lengths), len(task.depths), task.trials)
    sizes = np.array([len(ids) for ids, _ in task.requests]).reshape(right.shape)
    return {"grid": {str(length): {f"{depth:g}": float(right[i, j].mean()) for j, depth in enumerate(task.depths)}
                     for i, length in enumerate(task.lengths)},
            "acc": float(right.mean()), "tokens": {str(length): float(sizes[i].mean())
                                                    for i, length in enumerate(task.lengths)}}


def grid_table(result: dict) -> str:
    """The L × d grid as lines a person reads."""
    depths = list(next(iter(result["grid"].values())))
    lines = [f"{'passkey length':>14s} " + " ".join(f"{'d=' + d:>7s}" for d in depths) + f" {'mean':>7s}"]
    for length, row in result["grid"].items():
        lines.append(f"{length:>14s} " + " ".join(f"{row[d]:7.0%}" for d in depths) +
                     f" {np.mean(list(row.values())):7.0%}")
    return "\n".join(lines)


def plot_grid(result: dict, path: str) -> None:
    """The grid as a heat-map PNG (lengths down, depths across)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raylm import storage

    lengths, depths = list(result["grid"]), list(next(iter(result["grid"].values())))
    values = np.array([[result["grid"][length][d] for d in depths] for length in lengths])
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(depths), 1.0 + 0.5 * len(lengths)))
    image = ax.imshow(values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(depths)), depths)
    ax.set_yticks(range(len(lengths)), lengths)
    ax.set_xlabel("depth of the key")
    ax.set_ylabel("context (tokens)")
    for (i, j), value in np.ndenumerate(values):
        ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="passkey accuracy")
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=120)
    plt.close(fig)
    storage.write_bytes(path, out.getvalue())
