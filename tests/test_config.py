"""Config: defaults < TOML < CLI, one-line errors naming the field, --help listing every field, TOML round trip."""

from __future__ import annotations

import dataclasses

import pytest

from raylm.config import config_help, dump_toml, load_config, sections
from raylm.errors import ConfigError
from trainer.job import JobConfig


def test_precedence_cli_over_toml_over_defaults(tmp_path):
    toml = tmp_path / "x.toml"
    toml.write_text("[model]\ndim = 96\nn_heads = 4\n[optim]\nlr = 0.002\n")
    job = load_config(JobConfig, str(toml), ["--optim.lr=0.01", "--train.steps", "7", "--model.tie_embeddings=true"])
    assert (job.model.dim, job.model.n_heads, job.optim.lr, job.train.steps, job.model.tie_embeddings) == (96, 4, 0.01, 7, True)
    assert job.optim.warmup_steps == JobConfig().optim.warmup_steps


@pytest.mark.parametrize("args, message", [
    (["--optim.lr=abc"], "--optim.lr='abc' is not a valid float"),
    (["--model.dim=-1"], "model.dim=-1 must be > 0"),
    (["--model.n_kv_heads=3"], "model.n_kv_heads=3 must divide n_heads=8"),
    (["--nope.x=1"], "unknown option --nope.x"),
    (["--train.bogus=1"], "unknown option --train.bogus (see"),
    (["--train.step=3"], "unknown option --train.step; did you mean --train.steps?"),
    (["--optm.lr=1e-3"], "unknown option --optm.lr; did you mean --optim.lr?"),
    (["--train.steps"], "--train.steps needs a value"),
    (["stray"], "unexpected argument 'stray'"),
    (["--parallel.mixed_precision=fp16"], "parallel.mixed_precision must be 'fp32' or 'bf16'"),
    (["--ray.use_gpu=maybe"], "--ray.use_gpu='maybe' is not a valid bool"),
])
def test_bad_values_are_one_line_errors_naming_the_field(args, message):
    with pytest.raises(ConfigError) as info:
        load_config(JobConfig, None, args)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_toml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(JobConfig, str(tmp_path / "missing.toml"), [])
    (tmp_path / "a.toml").write_text("[modle]\ndim = 3\n")
    with pytest.raises(ConfigError, match=r"unknown section \[modle\]"):
        load_config(JobConfig, str(tmp_path / "a.toml"), [])
    (tmp_path / "b.toml").write_text("[model]\ndimm = 3\n")
    with pytest.raises(ConfigError, match="unknown field model.dimm"):
        load_config(JobConfig, str(tmp_path / "b.toml"), [])
    (tmp_path / "c.toml").write_text("[model]\ndim = 'wide'\n")
    with pytest.raises(ConfigError, match="c.toml: model.dim='wide' is not a valid int"):
        load_config(JobConfig, str(tmp_path / "c.toml"), [])


def test_help_lists_every_field_with_default_and_doc():
    text = config_help(JobConfig)
    for name, cls in sections(JobConfig).items():
        for field in dataclasses.fields(cls):
            assert f"--{name}.{field.name} (" in text
    assert "--optim.lr (float, default 0.0003)" in text and "Peak learning rate" in text


def test_resolved_config_round_trips_through_toml(tmp_path):
    job = load_config(JobConfig, "configs/moe.toml", ["--train.steps=3", "--data.path=s3://b/d"])
    (tmp_path / "config.toml").write_text(dump_toml(job))
    assert load_config(JobConfig, str(tmp_path / "config.toml"), []) == job


@pytest.mark.parametrize("preset", ["tiny", "demo", "125m", "350m", "1b", "llama3-8b", "moe", "sft-demo", "sft-llama3-8b"])
def test_presets_load(preset):
    weights = ["--checkpoint.resume_from=runs/demo"] if preset.startswith("sft-") else []  # they fine-tune
    assert load_config(JobConfig, f"configs/{preset}.toml", weights).model.dim > 0


@dataclasses.dataclass(kw_only=True)
class Knobs:
    ratio: float = 0.5
    """A float."""
    flag: bool = False
    name: str = "x"
    limit: int | None = None
    """Optional int."""
    sizes: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    tags: tuple[str, ...] = ()
    weights: dict[str, float] = dataclasses.field(default_factory=dict)
    plan: str | list[int] = ""


@dataclasses.dataclass(kw_only=True)
class Root:
    knobs: Knobs = dataclasses.field(default_factory=Knobs)


def test_values_are_coerced_from_the_annotation(tmp_path):
    toml = tmp_path / "k.toml"
    toml.write_text("[knobs]\nratio = 2\nlimit = 7\nsizes = [3, 4]\nweights = {web = 1, code = 0.5}\n")
    assert load_config(Root, str(toml), []).knobs.weights == {"web": 1.0, "code": 0.5}  # a TOML table
    (tmp_path / "plan.toml").write_text("[knobs]\nplan = [1, 2]\n")  # a union takes its first member that fits
    assert load_config(Root, str(tmp_path / "plan.toml"), []).knobs.plan == [1, 2]
    assert load_config(Root, None, ["--knobs.plan=1,2"]).knobs.plan == "1,2"
    root = load_config(Root, str(toml), ["--knobs.flag", "on", "--knobs.name=12", "--knobs.tags=a, b",
                                         "--knobs.sizes=5,6,7", "--knobs.weights=web=0.6, math=0.4"])
    assert root.knobs == Knobs(ratio=2.0, flag=True, name="12", limit=7, sizes=[5, 6, 7], tags=("a", "b"),
                               weights={"web": 0.6, "math": 0.4})
    assert load_config(Root, str(toml), ["--knobs.limit=none"]).knobs.limit is None
    (tmp_path / "round.toml").write_text(dump_toml(root))
    assert load_config(Root, str(tmp_path / "round.toml"), []) == root


@pytest.mark.parametrize("toml, message", [
    ("[knobs]\nratio = 'high'\n", "k.toml: knobs.ratio='high' is not a valid float"),
    ("[knobs]\nlimit = true\n", "k.toml: knobs.limit=True is not a valid int"),
    ("[knobs]\nname = 5\n", "k.toml: knobs.name=5 is not a valid str"),
    ("[knobs]\nsizes = [1, 'a']\n", "k.toml: knobs.sizes='a' is not a valid int"),
    ("knobs = 3\n", "k.toml: knobs must be a [knobs] table"),
    ("[knobs]\nweights = {web = 'lots'}\n", "k.toml: knobs.weights.web='lots' is not a valid float"),
    ("[knobs]\nweights = 'web'\n", "k.toml: knobs.weights='web' is not NAME=VALUE,NAME=VALUE,..."),
])
def test_toml_values_must_have_the_field_type(tmp_path, toml, message):
    (tmp_path / "k.toml").write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(Root, str(tmp_path / "k.toml"), [])
    assert str(info.value).endswith(message)


def test_partial_root_reads_its_sections_of_a_full_preset(tmp_path):
    (tmp_path / "full.toml").write_text("[knobs]\nratio = 0.25\n[optim]\nlr = 1.0\n")
    assert load_config(Root, str(tmp_path / "full.toml"), [], partial=True).knobs.ratio == 0.25
    with pytest.raises(ConfigError, match=r"unknown section \[optim\]"):
        load_config(Root, str(tmp_path / "full.toml"), [])
    with pytest.raises(ConfigError, match="unknown option --optim.lr"):
        load_config(Root, str(tmp_path / "full.toml"), ["--optim.lr=1"], partial=True)


def test_help_line_format():
    assert "  --knobs.ratio (float, default 0.5): A float." in config_help(Root).splitlines()
    assert "  --knobs.flag (bool, default False)" in config_help(Root).splitlines()
    assert "  --knobs.limit (int | None, default None): Optional int." in config_help(Root).splitlines()


def test_help_shows_a_default_once_when_the_doc_names_it():
    from dataprep.config import DataprepConfig

    line = next(x for x in config_help(DataprepConfig).splitlines() if x.startswith("  --workers.num_workers"))
    assert "default None" not in line and line.endswith("(default: one per CPU present).")


def test_dataprep_preset_loads_with_the_shared_loader():
    from dataprep.__main__ import parse_args

    cfg, demo = parse_args(["--config", "configs/dataprep-web.toml", "--input.paths=s3://b/corpus/",
                            "--output", "s3://b/datasets/web", "--seq-len", "1024"])
    assert not demo and cfg.input.paths == ["s3://b/corpus/"] and cfg.output.dir == "s3://b/datasets/web"
    assert cfg.pack.seq_len == 1024 and cfg.pack.unit_mb == 256.0 and cfg.workers.num_workers == 256


def test_the_sft_demo_preset_fine_tunes_the_demo_model():
    """configs/sft-demo.toml warm-starts from the README's demo run: its [model] must be the demo's."""
    sft = load_config(JobConfig, "configs/sft-demo.toml", ["--checkpoint.resume_from=runs/demo"])
    assert sft.model == load_config(JobConfig, "configs/demo.toml", []).model


def test_flex_attention_is_refused_on_cpu_before_any_work():
    with pytest.raises(ConfigError, match="model.attention=flex needs GPUs"):
        load_config(JobConfig, None, ["--model.attention=flex", "--train.device=cpu"])


def test_auto_attention_is_flexattention_on_cuda_and_sdpa_elsewhere():
    """The default steers packed rows on a GPU to FlexAttention's block-sparse kernel: CUDA's SDPA with a dense mask
    and grouped-query heads falls back to its math kernel (fp32 (B, H, T, T) scores in every layer)."""
    import torch

    from trainer.model.attention import attention_kernel
    from trainer.model.config import ModelConfig

    assert ModelConfig().attention == "auto"
    assert attention_kernel("auto", torch.device("cuda", 0)) == "flex"
    assert attention_kernel("auto", torch.device("cpu")) == "sdpa"
    assert attention_kernel("sdpa", torch.device("cuda", 0)) == "sdpa"
    load_config(JobConfig, None, ["--train.device=cpu"])  # auto is never refused


def test_dump_toml_writes_what_tomllib_reads_back_for_any_string_and_number():
    """raylm writes its TOML itself (no writer package on a bare GPU box): every string and number survives."""
    import tomllib

    from raylm.config import toml_value

    values = ['plain', 'quote " and \\ backslash', "new\nline\ttab", "emoji 🎉 and ▁", "del \x7f bell \x07", "",
              0, -3, 1e-05, 3.0e-4, 1e300, float("inf"), True, False, ["a", "b"], [1, 2.5], {"k": "v", "n": 1}]
    for value in values:
        assert tomllib.loads(f"x = {toml_value(value)}")["x"] == value, value


def test_a_roots_own_section_defaults_are_where_loading_starts():
    """`python -m trainer.rl`'s root sets other optimizer, checkpoint and run defaults than training's: the loader
    starts from them (as --help shows them), the TOML and the command line still override them."""
    from trainer.rl.config import RLJob

    job = load_config(RLJob, None, ["--optim.lr=2e-3"])
    assert (job.optim.lr, job.optim.warmup_steps, job.optim.schedule, job.optim.weight_decay) == (2e-3, 0, "constant",
                                                                                                 0.0)
    assert job.checkpoint.every == 10 and job.run.dir == "runs/rl"
    assert load_config(RLJob, None, ["--optim.warmup_steps=5", "--run.dir=x"]).optim.warmup_steps == 5
    assert load_config(RLJob, None, ["--run.dir=x"]).run.dir == "x"
