"""μP: the coordinate check across widths, parameter groups by name, an exact resume, the Hugging Face export folding
the multipliers into the weights, the proxy model, and Tune's marks at exactly equal tokens."""

from __future__ import annotations

import pytest
import torch

from helpers import TINY, losses, run_captured
from raylm.errors import ConfigError
from trainer.loss import lm_loss
from trainer.model.config import ModelConfig, is_hidden
from trainer.model.transformer import Transformer
from trainer.optim import OptimConfig, build_optimizer
from tune.config import TuneConfig, proxy_model

WIDTHS = (64, 128, 256, 512)
HEAD_DIM = 16


def coordinates(width: int, *, mup: bool, steps: int = 4, lr: float = 1e-2) -> dict[str, float]:
    """Mean |activation| of the embedding, each block and the logits after `steps` AdamW steps on a fixed batch of
    random tokens, for a 2-block model of this width (heads of HEAD_DIM, μP's base width 64)."""
    torch.manual_seed(0)
    cfg = ModelConfig(dim=width, n_layers=2, n_heads=width // HEAD_DIM, ffn_hidden=4 * width, vocab_size=256,
                      max_seq_len=32, mup_base_dim=64 if mup else 0)
    model = Transformer(cfg)
    model.init_weights(0)
    optimizer = build_optimizer(model, optim=OptimConfig(lr=lr, weight_decay=0.0), width_mult=cfg.width_mult)
    batch = torch.randint(0, 256, (8, 33), generator=torch.Generator().manual_seed(1))
    seen: dict[str, float] = {}
    hooks = [model.tok_embeddings.register_forward_hook(lambda m, i, o: seen.__setitem__("embedding", o.abs().mean()))]
    for n, block in enumerate(model.layers):
        hooks.append(block.register_forward_hook(
            lambda m, i, o, n=n: seen.__setitem__(f"block {n}", o[0].abs().mean())))
    for _ in range(steps):
        loss, _ = lm_loss(model, batch)
        (loss / batch[:, 1:].numel()).backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        logits, _ = model(batch[:, :-1])
    for hook in hooks:
        hook.remove()
    return {**{k: float(v) for k, v in seen.items()}, "logits": float(logits.abs().mean())}


def spread(mup: bool) -> dict[str, float]:
    """Per layer: the largest mean |activation| over the widths ÷ the smallest."""
    by_width = [coordinates(w, mup=mup) for w in WIDTHS]
    return {k: max(c[k] for c in by_width) / min(c[k] for c in by_width) for k in by_width[0]}


@pytest.mark.heavy
def test_coordinate_check_activations_stay_put_across_widths_under_mup_and_grow_without():
    mup, standard = spread(True), spread(False)
    assert all(ratio <= 2 for ratio in mup.values()), mup
    assert standard["logits"] > 4 and max(standard.values()) > 2 * max(mup.values()), standard


def test_hidden_matrices_train_at_lr_over_m_by_name_and_the_rest_at_lr():
    cfg = ModelConfig(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=300, mup_base_dim=32)
    model = Transformer(cfg)
    optimizer = build_optimizer(model, optim=OptimConfig(lr=1e-2), width_mult=cfg.width_mult)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    hidden = [n for n in names if is_hidden(n)]
    assert len(hidden) == 2 * 7  # wq wk wv wo w1 w2 w3 per block
    assert all(lr_of[id(names[n])] == pytest.approx(1e-2 / 4) for n in hidden)
    assert all(lr_of[id(p)] == 1e-2 for n, p in names.items() if n not in hidden)  # embeddings, norms, head
    assert optimizer.param_groups[0]["lr"] == 1e-2, "the logged lr (the first group's) is the base lr"
    assert optimizer.param_groups[-1]["weight_decay"] == pytest.approx(0.1 * 4), "lr · weight decay kept"
    wrapped = "layers.0._checkpoint_wrapped_module."  # the names under activation checkpointing
    assert all(is_hidden(wrapped + n) for n in ("attention.wq.weight", "feed_forward.w2.weight",
                                                 "feed_forward.experts_w13", "feed_forward.gate.weight"))
    assert not any(is_hidden(n) for n in ("output.weight", "tok_embeddings.weight", wrapped + "ffn_norm.weight"))
    standard = build_optimizer(model, optim=OptimConfig(lr=1e-2), width_mult=1.0)
    assert [len(g["params"]) for g in standard.param_groups] == [len(hidden) + 1, 2 * 2 + 2]


def test_a_mup_run_resumes_exactly(stdlib_dataset, tmp_path):
    from trainer.__main__ import main

    args = ["--no-ray", *TINY, "--data.path", stdlib_dataset, "--model.mup_base_dim=32", "--train.log_every=1",
            "--train.eval_every=0", "--checkpoint.every=2"]
    assert run_captured(main, [*args, "--run.dir", tmp_path / "straight", "--train.steps=4"])[0] == 0
    assert run_captured(main, [*args, "--run.dir", tmp_path / "resumed", "--train.steps=2"])[0] == 0
    assert run_captured(main, [*args, "--run.dir", tmp_path / "resumed", "--train.steps=4"])[0] == 0
    assert losses(str(tmp_path / "resumed")) == losses(str(tmp_path / "straight"))
    standard = [a for a in args if not a.startswith("--model.mup_base_dim")]
    code, _, err = run_captured(main, [*standard, "--run.dir", tmp_path / "resumed", "--train.steps=6"])
    assert code == 2 and "trained with model.mup_base_dim=32" in err and "model.mup_base_dim=0" in err, err


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_the_export_folds_mup_into_the_weights_and_computes_the_same_logits(tmp_path, tied):
    transformers = pytest.importorskip("transformers")
    from trainer.hf import export

    cfg = ModelConfig(vocab_size=300, dim=128, n_layers=2, n_heads=8, n_kv_heads=2, ffn_hidden=256, max_seq_len=64,
                      tie_embeddings=tied, mup_base_dim=32)
    model = Transformer(cfg)
    model.init_weights(3)
    export(model.state_dict(), cfg, str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.tie_word_embeddings == tied, "the fold keeps the tie"
    tokens = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, _ = model.eval()(tokens)
        theirs = hf(tokens).logits
    assert ours.abs().mean() > 0 and torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_the_proxy_keeps_depth_and_head_width_with_fewer_heads():
    target = ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden=14336, mup_base_dim=512)
    proxy = proxy_model(target, 512)
    assert (proxy.dim, proxy.n_layers, proxy.n_heads, proxy.kv_heads, proxy.ffn_hidden, proxy.head_dim) == \
        (512, 32, 4, 1, 1792, 128)
    with pytest.raises(ConfigError, match="multiple of head_dim × \\(n_heads / n_kv_heads\\) = 512"):
        proxy_model(target, 256)
    with pytest.raises(ConfigError, match="only under μP; set --model.mup_base_dim"):
        proxy_model(ModelConfig(dim=4096, n_heads=32), 512)
    auto = ModelConfig(dim=2048, n_heads=32, n_kv_heads=8, ffn_multiplier=1.3, mup_base_dim=256)  # the 1b preset
    assert proxy_model(auto, 256).hidden / 256 == pytest.approx(auto.hidden / 2048, rel=0.01), "the FFN shrinks too"
    with pytest.raises(ConfigError, match="narrower than the model's dim=2048"):
        proxy_model(auto, 2048)


def test_a_proxy_or_mup_run_that_starts_from_other_weights_is_refused():
    from raylm.config import load_config
    from trainer.job import JobConfig
    from tune.config import TuneJobConfig

    with pytest.raises(ConfigError, match="--init.from_hf=hf starts from a standard-parametrisation model"):
        load_config(JobConfig, None, ["--init.from_hf=hf", "--model.mup_base_dim=256"])
    with pytest.raises(ConfigError, match="tune.proxy_dim=256 trains proxies from scratch; --checkpoint.resume_from"):
        load_config(TuneJobConfig, None, ["--checkpoint.resume_from=runs/x", "--model.mup_base_dim=256",
                                          "--tune.proxy_dim=256"])


def test_trials_of_every_batch_size_meet_at_exactly_the_same_token_counts():
    from tune.study import trial_steps

    tune = TuneConfig(batch=[8, 12, 16], budget_tokens=20000, marks=4)  # 5,000 a mark divides none of them
    marks = {batch: [k * every * batch * 64 for k in range(1, 5)]
             for batch in tune.batch for steps, every in [trial_steps(batch, 64, tune)]}
    assert len({tuple(m) for m in marks.values()}) == 1, marks
    assert marks[8] == [3072, 6144, 9216, 12288]  # lcm(8, 12, 16) × 64 a mark: the most of whole steps in 5,000
    with pytest.raises(ConfigError, match="raise it to at least 24,576"):
        TuneConfig(batch=[8, 12, 16], budget_tokens=20000, marks=8).mark_tokens(64)
