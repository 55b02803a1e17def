"""python -m trainer.harness --model raylm --model_args checkpoint=RUN_DIR[,batch_size=8,device=cpu] --tasks ...:
EleutherAI's lm-evaluation-harness on a raylm model.

Registers the adapter below as lm-eval's model `raylm`, then hands the command line to lm-eval's own CLI, so every
`lm_eval run` option works (--include_path, --num_fewshot, --limit, --log_samples, --output_path, ...). The
adapter scores with raylm's own multiple-choice code (trainer.eval.multiple_choice), so a task's accuracy through
lm-eval equals raylm's scorer's on the same model, item by item.

--model_args: checkpoint (a run or step directory, a Hugging Face folder or raylm .pt weights), tokenizer (a path
replacing the checkpoint's), batch_size (default: lm-eval's --batch_size), device (default: lm-eval's --device,
else CUDA when present), dtype (float32, or bfloat16 for a big model on a GPU). Sampled generations draw from
torch's global generator, which lm-eval's --seed sets.

lm-eval is an optional extra: pip install 'raylm[eval]'.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from raylm.cli import run_cli
from raylm.errors import ConfigError
from trainer.eval.multiple_choice import encode_pair, score_requests
from trainer.export import DTYPES
from trainer.generate import load_with_tokenizer
from trainer.model.generation import generate

try:
    from lm_eval.api.model import LM
except ModuleNotFoundError as exc:
    if exc.name != "lm_eval":
        raise
    LM = object  # lm-eval is an optional extra: the module still imports, and main() says how to install it

MISSING = "lm-evaluation-harness is not installed; pip install 'raylm[eval]'"
MODEL_ARGS = ("checkpoint", "tokenizer", "batch_size", "device", "dtype")
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")
"""The generation settings the adapter honours; a task asking for any other is refused, not half-obeyed."""
MAX_GEN_TOKS = 256
"""lm-eval's default number of new tokens when a task sets no max_gen_toks."""
LM_EVAL_COMMANDS = ("run", "ls", "validate")


class RaylmLM(LM):
    """lm-eval's model `raylm`: a raylm checkpoint, scored and sampled by raylm's own functions on one device."""

    def __init__(self, checkpoint: str, tokenizer: str | None = None, batch_size: int | str = 1,
                 device: str | None = None, dtype: str = "float32"):
        super().__init__()
        if dtype not in DTYPES:
            raise ConfigError(f"dtype={dtype!r} for raylm: it takes {' or '.join(DTYPES)}")
        weights, self.tokenizer = load_with_tokenizer(checkpoint, tokenizer)
        self.max_len = weights.cfg.max_seq_len
        self.batch_size = micro_batch(batch_size)
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = weights.model().to(self._device, DTYPES[dtype])

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> RaylmLM:
        """--model_args, then lm-eval's --batch_size and --device for what they leave out. lm-eval's CLI always
        passes both (batch_size 1, device cuda:0 when not typed), so its cuda:0 is dropped on a machine without
        CUDA rather than failing every CPU run that does not say device=cpu."""
        unknown = sorted(set(arg_dict) - set(MODEL_ARGS))
        if unknown:
            raise ConfigError(f"--model_args for raylm: unknown {', '.join(unknown)}; it takes {', '.join(MODEL_ARGS)}")
        if "checkpoint" not in arg_dict:
            raise ConfigError("--model_args for raylm need checkpoint=PATH (a run or step directory, a Hugging Face "
                              "folder or raylm .pt weights)")
        cli = {k: v for k, v in (additional_config or {}).items() if k in ("batch_size", "device") and v is not None}
        if str(cli.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
            cli.pop("device")
        return cls(**{**cli, **arg_dict})

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> RaylmLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether it is the greedy continuation), tokenized and scored exactly as
        raylm's multiple-choice scorer does."""
        pairs = [encode_pair(self.tokenizer, context, continuation, self.max_len)
                 for context, continuation in (req.args for req in requests)]
        scores = score_requests(self.model, pairs, micro_batch=self.batch_size, device=self._device)
        return [(float(ll), bool(greedy)) for ll, greedy in scores]

    def loglikelihood_rolling(self, requests) -> list[float]:
        """log P(text) of each whole text after the model's document start (BOS, or EOS), in lm-eval's
        rolling windows of max_seq_len so each token is predicted once, with as much context as fits."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            mine = self.rolling_windows(self.tokenizer.encode([text], num_threads=1)[0])
            windows += mine
            owner += [i] * len(mine)
        scores = score_requests(self.model, windows, micro_batch=self.batch_size, device=self._device)
        return np.bincount(owner, weights=scores[:, 0], minlength=len(requests)).tolist()

    def rolling_windows(self, ids: list[int]) -> list[tuple[list[int], int]]:
        """(window tokens, how many of its last tokens it scores): score_requests' request form."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows = get_rolling_token_windows(ids, prefix_token=self.tokenizer.document_start,
                                            max_seq_len=self.max_len, context_len=1)
        return [(context + continuation, len(continuation))
                for context, continuation in map(make_disjoint_window, windows)]

    def generate_until(self, requests) -> list[str]:
        return [self.continue_text(context, gen_kwargs) for context, gen_kwargs in (req.args for req in requests)]

    def continue_text(self, context: str, gen_kwargs: dict) -> str:
        """The model's continuation of `context` (after the document start, cut from the left so prompt and new
        tokens fit the context), up to the first `until` string: greedy unless the task samples."""
        unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
        if unknown:
            raise ConfigError(f"raylm's adapter does not support generation settings {', '.join(unknown)}; "
                              f"it takes {', '.join(GEN_KWARGS)}")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else until
        max_new = int(gen_kwargs.get("max_gen_toks", MAX_GEN_TOKS))
        # tasks often set do_sample: false next to a temperature; do_sample alone samples at temperature 1
        sample = gen_kwargs.get("do_sample", float(gen_kwargs.get("temperature", 0.0)) > 0)
        temperature = float(gen_kwargs.get("temperature", 1.0)) if sample else 0.0
        prompt = [self.tokenizer.document_start] + self.tokenizer.encode([context], num_threads=1)[0]
        prompt = prompt[-max(1, self.max_len - max_new):]
        out = generate(self.model, prompt, max_new, temperature, int(gen_kwargs.get("top_k") or 0),
                       float(gen_kwargs.get("top_p", 1.0)), eos_id=self.tokenizer.eos_id)
        new = out[len(prompt):]
        if new and new[-1] == self.tokenizer.eos_id:  # a Hugging Face tokenizer would decode it as text
            new = new[:-1]
        text = self.tokenizer.decode(new)
        return text[:min((text.find(stop) for stop in until if stop in text), default=len(text))]


def micro_batch(value: int | str) -> int:
    """Requests per forward. lm-eval's --batch_size arrives as text and may be 'auto', which the adapter lacks."""
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if size < 1:
        raise ConfigError(f"batch_size must be a whole number >= 1 (raylm's adapter has no 'auto'), got {value!r}")
    return size


def main(argv: list[str]) -> int:
    if LM is object:
        raise ConfigError(MISSING)
    from lm_eval.__main__ import cli_evaluate
    from lm_eval.api.registry import register_model

    register_model("raylm")(RaylmLM)
    # lm-eval's CLI parses sys.argv; a command line without one of its subcommands means `run`
    command = [] if argv and argv[0] in LM_EVAL_COMMANDS else ["run"]
    sys.argv = ["python -m trainer.harness", *command, *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
