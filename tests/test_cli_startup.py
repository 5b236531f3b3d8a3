"""Console scripts answer ``--help``, usage errors and config errors without importing torch or
transformers (issue #17): the CLI modules and the config-check path import them lazily.

Each check runs in a fresh interpreter (this test process has torch loaded already); nothing here
is timed, only which modules were imported.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import textwrap
from importlib.metadata import distribution
from pathlib import Path

import pytest

import modelzoo.cli

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers")
#: console script -> "module:function", as installed from pyproject's [project.scripts]
SCRIPTS = {ep.name: ep.value for ep in distribution("modelzoo").entry_points if ep.group == "console_scripts"}
CLI_MODULES = sorted({f"modelzoo.cli.{m.name}" for m in pkgutil.iter_modules(modelzoo.cli.__path__)}
                     | {"modelzoo.data_prep.cli"})
#: the modules a config check goes through (besides modelzoo.config)
CONFIG_PATH_MODULES = ["modelzoo.models.llama", "modelzoo.models.llama.checks", "modelzoo.models.llama.presets",
                       "modelzoo.models.llama.tp_rule"]

#: runs ``module.function(argv)``, then fails (status 99) if torch or transformers were imported;
#: otherwise exits with the entry point's status (SystemExit from argparse included)
WRAPPER = textwrap.dedent("""
    import importlib, sys
    module, function, *argv = sys.argv[1:]
    try:
        status = getattr(importlib.import_module(module), function)(argv)
    except SystemExit as exit:
        status = exit.code
    heavy = [name for name in {heavy!r} if name in sys.modules]
    if heavy:
        print("imported " + ", ".join(heavy), file=sys.stderr)
        sys.exit(99)
    sys.exit(status)
""").format(heavy=HEAVY)


def run_python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


def run_entry_point(script: str, *argv: str) -> subprocess.CompletedProcess:
    module, function = SCRIPTS[script].split(":")
    return run_python("-c", WRAPPER, module, function, *argv)


def test_the_script_table_lists_every_cli_module():
    assert {target.split(":")[0] for target in SCRIPTS.values()} <= set(CLI_MODULES)
    assert len(SCRIPTS) >= 8


@pytest.mark.parametrize("module", CLI_MODULES + CONFIG_PATH_MODULES)
def test_module_imports_without_torch_or_transformers(module):
    code = f"import {module}, sys; assert not [m for m in {HEAVY!r} if m in sys.modules], sorted(sys.modules)"
    result = run_python("-c", code)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_exits_0_without_torch(script):
    result = run_entry_point(script, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout


@pytest.mark.parametrize("argv", [["llama2_70b", "samba_compile.n_chips=3"],
                                  ["--config", "llama2_70b", "samba_compile.n_chips=3"]])
def test_config_error_is_one_line_without_torch(argv):
    result = run_entry_point("modelzoo-config-check", *argv)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "samba_compile.n_chips=3 does not divide num_attention_heads=64" in lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize("script,argv", [
    ("modelzoo-train", ["--config", "llama2_70b", "samba_compile.n_chips=3"]),
    ("modelzoo-check", ["--config", "llama2_70b", "samba_compile.n_chips=3"]),
    ("modelzoo-generate", ["--config", "llama_tiny", "--temperature", "-1"]),
    ("modelzoo-generate", ["--checkpoint", "no_such_preset"]),
])
def test_other_scripts_report_config_errors_without_torch(script, argv):
    result = run_entry_point(script, *argv)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


# ---- config-check's --config flag (in process: it imports nothing heavy) ----

def test_config_flag_and_positional_give_the_same_config(capsys):
    from modelzoo.cli.config_check import main

    assert main(["llama_tiny", "training.max_steps=7"]) == 0
    positional = capsys.readouterr().out
    assert main(["--config", "llama_tiny", "training.max_steps=7"]) == 0
    assert capsys.readouterr().out == positional
    assert main(["training.max_steps=7", "--config", "llama_tiny"]) == 0
    assert capsys.readouterr().out == positional
    assert main(["llama_tiny", "--config", "llama_tiny", "training.max_steps=7"]) == 0
    assert capsys.readouterr().out == positional


@pytest.mark.parametrize("argv,message", [(["llama_tiny", "--config", "llama2_70b"], "two configs given"),
                                          ([], "no config given")])
def test_config_flag_usage_errors(capsys, argv, message):
    from modelzoo.cli.config_check import main

    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    assert message in capsys.readouterr().err


# ---- what the lazy imports must keep ----

def test_preset_architecture_from_the_dict_equals_llama_config():
    from modelzoo.models.llama.checks import _preset_arch
    from modelzoo.models.llama.presets import get_preset, preset_names

    for name in preset_names():
        config = get_preset(name)
        assert _preset_arch(name, {}) == (config.num_attention_heads, config.num_key_value_heads,
                                          config.intermediate_size), name


def test_package_names_stay_the_functions():
    import modelzoo.models.llama as llama
    import modelzoo.models.llama.patch_llama  # noqa: F401 (binds the submodule's name on the package)
    from modelzoo.models.llama import patch_llama, presets

    assert callable(patch_llama) and patch_llama.__module__ == "modelzoo.models.llama.patch_llama"
    assert llama.patch_llama is patch_llama and presets.__name__ == "modelzoo.models.llama.presets"
    assert sorted(llama.__all__) == sorted(llama._EXPORTS)
    with pytest.raises(AttributeError):
        llama.no_such_name  # noqa: B018


def test_user_errors_of_torch_modules_are_reported_once_imported(capsys):
    from modelzoo.backends import BackendUnavailableError
    from modelzoo.cli.errors import run_reporting_errors
    from modelzoo.compile.plan import PlanError
    from modelzoo.models.llama import UnsupportedTransformersError

    def fail(error):
        raise error

    for error in (PlanError("p"), BackendUnavailableError("b"), UnsupportedTransformersError("u")):
        assert run_reporting_errors(fail, error) == 2
        assert capsys.readouterr().err == f"error: {error}\n"
    with pytest.raises(RuntimeError, match="a bug"):
        run_reporting_errors(fail, RuntimeError("a bug"))
