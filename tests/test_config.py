"""Config spine: shipped configs, name resolution, overrides, located errors, TP rule, CLI."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from importlib.resources import files

import pytest
import yaml

from modelzoo.config import (
    CONFIG_KINDS,
    ConfigError,
    ModelConfig,
    TrainingConfig,
    config_to_dict,
    dump_yaml,
    shipped_configs,
)
from modelzoo.models.llama import load_run_config
from modelzoo.models.llama.parallelize import check_tensor_parallel, valid_n_chips

SHIPPED = [(kind, name) for kind in CONFIG_KINDS for name in shipped_configs(kind)]


def shipped_path(kind: str, name: str):
    return files("modelzoo.configs") / kind / f"{name}.yaml"


def write_yaml(tmp_path, text: str, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def line_of(text: str, fragment: str) -> int:
    """1-based number of the line of ``text`` containing ``fragment``."""
    return next(i for i, line in enumerate(text.splitlines(), start=1) if fragment in line)


def raises_config_error(*args, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_run_config(*args, **kwargs)
    assert "\n" not in str(info.value)
    return info.value


# ---- shipped configs and name resolution ----

def test_bundled_defaults_are_shipped():
    assert "llama_tiny" in shipped_configs("training")
    assert "llama_tiny" in shipped_configs("generation")


@pytest.mark.parametrize("kind,name", SHIPPED)
def test_shipped_config_loads_and_round_trips(kind, name, tmp_path):
    cfg = load_run_config(name, kind=kind)
    assert isinstance(cfg, CONFIG_KINDS[kind])
    raw = yaml.safe_load(shipped_path(kind, name).read_text())
    for section, values in raw.items():  # every value written in the file reaches the config
        if isinstance(values, dict):
            for key, value in values.items():
                assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"
        else:
            assert getattr(cfg, section) == values
    snapshot = write_yaml(tmp_path, dump_yaml(cfg))
    assert load_run_config(snapshot, kind=kind) == cfg


def test_bare_name_suffix_and_path_resolve_to_the_same_config():
    path = shipped_path("training", "llama2_70b")
    by_name = load_run_config("llama2_70b")
    assert load_run_config("llama2_70b.yaml") == by_name
    assert load_run_config(str(path)) == by_name
    assert by_name.samba_compile.n_chips == yaml.safe_load(path.read_text())["samba_compile"]["n_chips"]


def test_local_file_wins_over_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_yaml(tmp_path, "training:\n  max_steps: 3\n", name="llama_tiny.yaml")
    assert load_run_config("llama_tiny.yaml").training.max_steps == 3


def test_unknown_config_name_lists_nearest_shipped_names():
    err = raises_config_error("llama2_70")
    assert "llama2_70b" in str(err)


def test_no_config_gives_schema_defaults():
    cfg = load_run_config(None)
    assert cfg == CONFIG_KINDS["training"]()


def test_missing_sections_take_defaults(tmp_path):
    cfg = load_run_config(write_yaml(tmp_path, "backend: inductor\ntraining:\n"))
    assert cfg.backend == "inductor"
    assert cfg.training == TrainingConfig()
    assert cfg.model == ModelConfig()


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    cfg = load_run_config(write_yaml(tmp_path, "training:\n  learning_rate: 1e-4\n  min_learning_rate: 0\n"))
    assert cfg.training.learning_rate == 1e-4
    assert type(cfg.training.min_learning_rate) is float


# ---- overrides ----

def test_overrides_are_typed_and_applied(tmp_path):
    path = write_yaml(tmp_path, "checkpoint:\n  load_path: some/dir\n")
    cfg = load_run_config(path, ["training.learning_rate=1e-4", "model.patches=[weighted_loss]", "training.batch_size=2.0",
                             "model.overrides.num_hidden_layers=4", "checkpoint.load_path=null",
                             "training.clip_grad_norm=2"])
    assert cfg.training.learning_rate == 1e-4
    assert cfg.model.patches == ["weighted_loss"]
    assert cfg.training.batch_size == 2 and type(cfg.training.batch_size) is int
    assert cfg.model.overrides == {"num_hidden_layers": 4}
    assert cfg.checkpoint.load_path is None
    assert cfg.training.clip_grad_norm == 2.0 and type(cfg.training.clip_grad_norm) is float


@pytest.mark.parametrize("patches", ["[]", "[static_attention,fp32_ln]"])
def test_training_refuses_patches_without_the_weighted_loss(patches):
    """Stock HF's loss ignores token types (it would train on padding and across articles), so a
    training config whose allow-list leaves out ``weighted_loss`` is refused; generation runs stock."""
    err = raises_config_error("llama_tiny", [f"model.patches={patches}"])
    assert err.key == "model.patches" and "'weighted_loss'" in str(err)
    assert err.source == f"override 'model.patches={patches}'"
    assert load_run_config("llama_tiny", ["model.patches=[]"], kind="generation").model.patches == []
    assert load_run_config("llama_tiny", ["model.patches=[]", "command=compile"]).model.patches == []


def test_generation_overrides():
    cfg = load_run_config("llama_tiny", ["generation.stop=['###', END]", "generation.top_p=0.9"], kind="generation")
    assert cfg.generation.stop == ["###", "END"]
    assert cfg.generation.top_p == 0.9


def test_unknown_key_via_override():
    err = raises_config_error("llama_tiny", ["training.lerning_rate=1e-4"])
    assert str(err).startswith("override 'training.lerning_rate=1e-4': ")
    assert "'training.lerning_rate'" in str(err)
    assert "did you mean 'training.learning_rate'" in str(err)
    assert err.key == "training.lerning_rate" and err.line is None


def test_renamed_key_names_its_replacement():
    err = raises_config_error("llama_tiny", ["training.activation_checkpointing=true"])
    assert "training.recompute" in str(err) and "recompute=full" in str(err)


@pytest.mark.parametrize(("override", "key", "words"), [
    (["training.mixed_precision=bfloat16"], "training.mixed_precision", "training.fsdp=true"),
    (["training.mixed_precision=bfloat16", "training.fsdp=true"], "training.mixed_precision", "world_size > 1"),
    (["samba_compile.sequence_parallel=true"], "samba_compile.sequence_parallel", "raise n_chips"),
])
def test_parallelism_settings_that_cannot_apply_are_refused(override, key, words):
    err = raises_config_error("llama_tiny", override)
    assert err.key == key and words in str(err)


def test_recompute_lists_its_modes():
    err = raises_config_error("llama_tiny", ["training.recompute=some"])
    assert all(mode in str(err) for mode in ("none", "selective", "full"))


def test_key_in_wrong_section_suggests_the_right_one():
    err = raises_config_error(None, ["training.n_chips=2"])
    assert "did you mean 'samba_compile.n_chips'" in str(err)


@pytest.mark.parametrize("override", ["training.batch_size=[1", "training.batch_size", "+training.foo=1",
                                      "training.batch_size=1,2"])
def test_malformed_or_unsupported_override_names_it(override):
    err = raises_config_error(None, [override])
    assert f"override '{override}'" in str(err)


# ---- located errors from YAML ----

def test_unknown_key_in_yaml_names_file_line_key_and_suggestion(tmp_path):
    text = "model:\n  name_or_path: llama_tiny\n\ntraining:\n  batch_size: 4\n  lerning_rate: 1.0e-4\n"
    path = write_yaml(tmp_path, text)
    err = raises_config_error(path)
    line = line_of(text, "lerning_rate")
    assert f"{path.name}:{line}: " in str(err)
    assert "'training.lerning_rate'" in str(err)
    assert "did you mean 'training.learning_rate'" in str(err)
    assert (err.key, err.line) == ("training.lerning_rate", line)
    assert err.source.endswith(path.name)


def test_wrong_type_in_yaml_names_line_expected_type_and_value(tmp_path):
    text = "training:\n  max_steps: 10\n  batch_size: eight\n"
    err = raises_config_error(write_yaml(tmp_path, text))
    assert f":{line_of(text, 'batch_size')}: " in str(err)
    assert "'training.batch_size' expects int" in str(err) and "'eight'" in str(err)


def test_yaml_syntax_error_names_line(tmp_path):
    text = "training:\n  batch_size: 4\n  max_steps: [1\n"
    err = raises_config_error(write_yaml(tmp_path, text))
    assert err.line is not None and err.line >= line_of(text, "max_steps")
    assert "invalid YAML" in str(err)


def test_duplicate_key_is_rejected(tmp_path):
    text = "training:\n  batch_size: 4\n  batch_size: 8\n"
    err = raises_config_error(write_yaml(tmp_path, text))
    assert err.line == line_of(text, "batch_size: 8") and "duplicate" in str(err)


# ---- types, literals, ranges ----

@pytest.mark.parametrize("override,key,expected,shown", [
    ("training.batch_size=abc", "training.batch_size", "int", "'abc'"),
    ("training.batch_size=1.5", "training.batch_size", "int", "1.5"),
    ("training.batch_size=true", "training.batch_size", "int", "True"),
    ("training.deterministic=3", "training.deterministic", "bool", "3"),
    ("training.learning_rate=true", "training.learning_rate", "float", "True"),
    ("checkpoint.save_dir=7", "checkpoint.save_dir", "str", "7"),
    ("model.patches=[a,1]", "model.patches", "a list of str or null", "['a', 1]"),
])
def test_wrong_type_via_override(override, key, expected, shown):
    err = raises_config_error(None, [override])
    assert f"'{key}' expects {expected}" in str(err)
    assert f"got {shown}" in str(err)
    assert err.key == key and err.source == f"override '{override}'"


def test_literal_violation_lists_allowed_values():
    err = raises_config_error(None, ["model.dtype=bf16"])
    for allowed in typing.get_args(typing.get_type_hints(ModelConfig)["dtype"]):
        assert f"'{allowed}'" in str(err)
    assert "did you mean 'bfloat16'" in str(err)


def test_int_accepted_for_float():
    assert load_run_config(None, ["training.learning_rate=1"]).training.learning_rate == 1.0


@pytest.mark.parametrize("override,kind", [
    ("training.batch_size=0", "training"), ("training.max_steps=0", "training"),
    ("training.prompt_loss_weight=1.5", "training"), ("training.grad_accum_steps=0", "training"),
    ("generation.temperature=-0.5", "generation"), ("generation.top_p=0", "generation"),
    ("generation.max_new_tokens=0", "generation"), ("data_parallel.world_size=0", "training"),
    ("samba_compile.n_chips=0", "training"), ("samba_compile.arch=sn99", "training"),
])
def test_out_of_range_values_are_rejected(override, kind):
    key = override.split("=")[0]
    err = raises_config_error(None, [override], kind=kind)
    assert err.key == key and key in str(err)


# ---- tensor parallelism vs. attention heads ----

def heads_of(preset: str) -> tuple[int, int]:
    from modelzoo.models.llama.presets import get_preset

    arch = get_preset(preset)
    return arch.num_attention_heads, arch.num_key_value_heads


def test_n_chips_not_dividing_heads_lists_valid_values():
    heads, kv = heads_of("llama3_8b")
    bad = next(n for n in range(2, heads) if heads % n)
    err = raises_config_error("llama3_8b", [f"samba_compile.n_chips={bad}"])
    valid = ", ".join(map(str, valid_n_chips(heads, kv)))
    assert f"samba_compile.n_chips={bad}" in str(err)
    assert f"num_attention_heads={heads}" in str(err) and "'llama3_8b'" in str(err)
    assert f"valid n_chips: {valid}" in str(err)
    assert err.source == f"override 'samba_compile.n_chips={bad}'"


def test_more_chips_than_kv_heads_replicates_kv():
    heads, kv = heads_of("llama2_70b")
    n_chips = 2 * kv
    assert heads % n_chips == 0
    cfg = load_run_config("llama2_70b", [f"samba_compile.n_chips={n_chips}"])
    assert check_tensor_parallel(heads, kv, cfg.samba_compile.n_chips, "llama2_70b") == "replicate"


def test_chips_dividing_kv_heads_shard_kv():
    heads, kv = heads_of("llama2_7b")
    cfg = load_run_config("llama2_7b", ["samba_compile.n_chips=2"])
    assert check_tensor_parallel(heads, kv, cfg.samba_compile.n_chips, "llama2_7b") == "shard"


def test_n_chips_neither_dividing_nor_multiple_of_kv_heads_is_rejected():
    heads, kv = 24, 8  # llama3_2_3b-like: 12 divides 24 but neither divides nor is a multiple of 8
    with pytest.raises(ConfigError, match="num_key_value_heads=8"):
        check_tensor_parallel(heads, kv, 12, "m")


@pytest.mark.parametrize("heads,kv", [(8, 2), (4, 4), (6, 2), (4, 1)])
def test_every_accepted_tp_degree_splits_the_model_evenly(heads, kv):
    """What the rule accepts, the TP plan really splits: every chip gets equal shards holding whole
    heads, and unsharding gives the tensor back; what it refuses is a one-line ConfigError."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from modelzoo.models.llama.parallelize import shard_tensor, tp_layout, unshard_tensors

    head_dim = 2
    config = LlamaConfig(hidden_size=heads * head_dim, intermediate_size=12, num_hidden_layers=1,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=10, head_dim=head_dim)
    torch.manual_seed(0)
    state = LlamaForCausalLM(config).state_dict()
    accepted = []
    for n in range(1, 2 * heads + 1):
        try:
            layout = tp_layout(config, n)
        except ConfigError as err:
            assert f"n_chips={n}" in str(err) and "valid n_chips" in str(err) and "\n" not in str(err)
            continue
        accepted.append(n)
        for name, full in state.items():
            shards = [shard_tensor(name, full, layout, rank, head_dim) for rank in range(n)]
            assert len({s.shape for s in shards}) == 1, (n, name)
            if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
                assert shards[0].shape[0] % head_dim == 0, (n, name)  # whole heads per chip
            assert torch.equal(unshard_tensors(name, shards, layout, config.vocab_size), full), (n, name)
    assert accepted == valid_n_chips(heads, kv, 2 * heads, intermediate_size=12)
    assert 1 in accepted and len(accepted) < 2 * heads


def test_n_chips_without_tensor_parallel_is_rejected():
    err = raises_config_error("llama_tiny", ["samba_compile.n_chips=2"])
    assert "samba_compile.tensor_parallel=weight" in str(err) and "samba_compile.n_chips=1" in str(err)


def test_model_overrides_change_the_heads_checked():
    heads, _ = heads_of("llama_tiny")
    err = raises_config_error("llama_tiny", ["samba_compile.tensor_parallel=weight",
                                             f"samba_compile.n_chips={heads * 2}"])
    assert f"num_attention_heads={heads}" in str(err)
    cfg = load_run_config("llama_tiny", ["samba_compile.tensor_parallel=weight", f"samba_compile.n_chips={heads * 2}",
                                     f"model.overrides.num_attention_heads={heads * 2}",
                                     f"model.overrides.num_key_value_heads={heads * 2}"])
    assert cfg.samba_compile.n_chips == heads * 2


def test_unknown_patch_name_is_rejected(tmp_path):
    text = "model:\n  patches: [fp32_ln, fp32_logit]\n"
    err = raises_config_error(write_yaml(tmp_path, text))
    assert err.line == line_of(text, "patches") and "did you mean 'fp32_logits'" in str(err)


def test_unknown_architecture_override_is_rejected():
    err = raises_config_error("llama_tiny", ["model.overrides.num_hiden_layers=1"])
    assert "did you mean 'model.overrides.num_hidden_layers'" in str(err)


def test_unknown_model_name_lists_nearest_presets():
    err = raises_config_error(None, ["model.name_or_path=llama3_8bb"])
    assert err.key == "model.name_or_path" and "llama3_8b" in str(err)


def test_hf_directory_as_model(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=8,
                num_key_value_heads=2, vocab_size=128).save_pretrained(tmp_path)
    tp = ["samba_compile.tensor_parallel=weight", f"model.name_or_path={tmp_path}"]
    cfg = load_run_config("llama_tiny", [*tp, "samba_compile.n_chips=4"])
    assert cfg.model.name_or_path == str(tmp_path)
    err = raises_config_error("llama_tiny", [*tp, "samba_compile.n_chips=3"])
    assert "num_attention_heads=8" in str(err) and "valid n_chips: 1, 2, 4, 8" in str(err)


def test_not_yet_existing_path_skips_architecture_checks(tmp_path):
    cfg = load_run_config(None, [f"model.name_or_path={tmp_path}/later", "samba_compile.tensor_parallel=weight",
                             "samba_compile.n_chips=3"])
    assert cfg.samba_compile.n_chips == 3


# ---- CLI ----

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modelzoo.cli.config_check", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_prints_resolved_config():
    result = run_cli("llama_tiny", "training.max_steps=7")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout) == config_to_dict(load_run_config("llama_tiny", ["training.max_steps=7"]))


def test_cli_reports_one_line_error_without_traceback(tmp_path):
    text = "training:\n  batch_size: 4\n  lerning_rate: 1.0e-4\n"
    path = write_yaml(tmp_path, text)
    result = run_cli(str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert f"{path.name}:{line_of(text, 'lerning_rate')}:" in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_schema_sections_have_docstrings():
    sections = {tp for top in CONFIG_KINDS.values() for tp in typing.get_type_hints(top).values()
                if dataclasses.is_dataclass(tp)}
    for cls in {*CONFIG_KINDS.values(), *sections}:
        assert not cls.__doc__.startswith(cls.__name__ + "("), f"{cls.__name__} lacks a docstring"


def test_n_chips_must_divide_the_mlp_width():
    """13B has 40 heads (5 divides them) but an FFN width of 13824 (5 does not): refused."""
    with pytest.raises(ConfigError, match=r"n_chips=5 does not divide intermediate_size=13824.*valid n_chips: 1, 2, 4, 8$"):
        load_run_config("llama2_13b", ["samba_compile.n_chips=5"])
    assert valid_n_chips(40, 40, intermediate_size=13824) == [1, 2, 4, 8]
    assert valid_n_chips(24, 8, intermediate_size=8192) == [1, 2, 4, 8]
