"""Find a config, read it with line numbers, apply ``key=value`` overrides, validate, dump.

Every error a user can cause here is a one-line :class:`ConfigError` that names where the bad value
came from: ``file:line`` for YAML, ``override 'k=v'`` for a command-line override.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from hydra.errors import HydraException

from .build import build
from .checks import check_config
from .errors import ConfigError, nearest
from .schema import CONFIG_KINDS, GenerationRunConfig, RunConfig

Origin = tuple[str | None, int | None]
"""Where a key was set: (file or ``override 'k=v'``, 1-based line or None)."""


def load_config(name_or_path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (),
                kind: Literal["training", "generation"] = "training", *,
                check: Callable[[Any], None] | None = None) -> RunConfig | GenerationRunConfig:
    """The validated config of ``kind`` from a YAML file or shipped name, with ``key=value`` overrides.

    ``name_or_path``: a YAML path, or a bare name (``llama2_70b`` / ``llama2_70b.yaml``) of a config
    shipped in ``modelzoo.configs/<kind>/``; None starts from the schema defaults. An existing file
    wins over a shipped name. Overrides use hydra's grammar (``training.learning_rate=1e-4``,
    ``model.patches=[]``, ``checkpoint.load_path=null``) and only set keys the schema defines.
    ``check``: further rules run on the built config (the model's: see
    ``modelzoo.models.llama.load_run_config``); their ConfigErrors are located like the schema's.
    """
    if isinstance(overrides, str):
        raise TypeError(f"overrides must be a list of 'key=value' strings, got the string {overrides!r}")
    if kind not in CONFIG_KINDS:
        raise ConfigError(f"unknown config kind '{kind}'; expected one of {', '.join(CONFIG_KINDS)}")
    source, data, origins = None, {}, {}
    if name_or_path is not None:
        source, text = _find_config(os.fspath(name_or_path), kind)
        data, origins = _parse_yaml(text, source)
    for override in overrides:
        _apply_override(data, origins, override)
    try:
        cfg = build(CONFIG_KINDS[kind], data)
        check_config(cfg)
        if check is not None:
            check(cfg)
    except ConfigError as err:
        if err.source is not None:
            raise
        raise err.located(*_locate(origins, err.key, source)) from None
    return cfg


def shipped_configs(kind: Literal["training", "generation"] = "training") -> list[str]:
    """Names of the configs shipped in ``modelzoo.configs/<kind>/`` (without ``.yaml``)."""
    folder = files("modelzoo.configs") / kind
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config (or one section) as plain nested dicts and lists."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    """The resolved config as YAML that ``load_config`` reads back to an equal config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` (no dot) as a float, as YAML 1.2 and users do."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _find_config(name_or_path: str, kind: str) -> tuple[str, str]:
    """(display name, text) of the file ``name_or_path`` or of the shipped config of that name."""
    path = Path(name_or_path)
    if path.is_file():
        return _read(path, _display(path))
    if path.is_dir():
        raise ConfigError(f"config '{name_or_path}' is a directory; give a YAML file or a shipped config name")
    if "/" in name_or_path or os.sep in name_or_path:
        raise ConfigError(f"config file '{name_or_path}' does not exist")
    stem = re.sub(r"\.ya?ml$", "", name_or_path)
    shipped = files("modelzoo.configs") / kind / f"{stem}.yaml"
    if shipped.is_file():
        return _read(shipped, _display(Path(str(shipped))))
    names = shipped_configs(kind)
    near = nearest(stem, names)
    hint = f"did you mean {', '.join(near)}?" if near else f"shipped {kind} configs: {', '.join(names)}"
    raise ConfigError(f"no config file '{name_or_path}' and no shipped {kind} config '{stem}'; {hint}")


def _read(path: Any, display: str) -> tuple[str, str]:
    try:
        return display, path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config: {err}", source=display) from None


def _display(path: Path) -> str:
    """``path`` relative to the working directory when it lies under it, else absolute."""
    relative = os.path.relpath(path.resolve())
    return relative if not relative.startswith("..") else str(path.resolve())


def _parse_yaml(text: str, source: str) -> tuple[dict[str, Any], dict[str, Origin]]:
    """The YAML mapping in ``text`` and the line each dotted key is set on."""
    loader = _YamlLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else {}
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        opened = (f" ({err.context} on line {err.context_mark.line + 1})"
                  if err.context and err.context_mark and err.context_mark.line != mark.line else "")
        raise ConfigError(f"invalid YAML: {err.problem or err.context}{opened}", source=source,
                          line=mark.line + 1 if mark else None) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"invalid YAML: {err}", source=source) from None
    finally:
        loader.dispose()
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of sections at the top level, got {type(data).__name__}",
                          source=source, line=node.start_mark.line + 1)
    origins: dict[str, Origin] = {}
    _record_key_lines(node, "", source, origins)
    return data, origins


def _record_key_lines(node: yaml.Node, prefix: str, source: str, origins: dict[str, Origin]) -> None:
    """Fill ``origins`` with the line of every mapping key under ``node``; reject duplicate keys."""
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
        line = key_node.start_mark.line + 1
        if key in origins:
            raise ConfigError(f"duplicate key '{key}' (first set on line {origins[key][1]})", key=key,
                              source=source, line=line)
        origins[key] = (source, line)
        _record_key_lines(value_node, key, source, origins)


def _apply_override(data: dict[str, Any], origins: dict[str, Origin], text: str) -> None:
    """Set the key named by override ``text`` in ``data``; record the override as its origin."""
    source = f"override '{text}'"
    key, value = _parse_override(text, source)
    parts = key.split(".")
    node = data
    for depth, part in enumerate(parts[:-1], start=1):
        section = ".".join(parts[:depth])
        if node.get(part) is None:
            node[part] = {}
            origins.setdefault(section, (source, None))
        elif not isinstance(node[part], dict):
            raise ConfigError(f"'{section}' holds a value, not a section, so '{key}' cannot be set",
                              key=section, source=source)
        node = node[part]
    node[parts[-1]] = value
    for stale in [k for k in origins if k.startswith(key + ".")]:
        del origins[stale]
    origins[key] = (source, None)


def _parse_override(text: str, source: str) -> tuple[str, Any]:
    """(dotted key, typed value) of a ``key=value`` override, parsed by hydra's grammar."""
    try:
        override = _OVERRIDE_PARSER.parse_override(text)
    except HydraException as err:
        raise ConfigError(f"malformed override, expected key=value: {err}", source=source) from None
    if override.type is not OverrideType.CHANGE or override.package is not None:
        raise ConfigError("only key=value overrides are supported (no '+key', '~key' or '@package'); "
                          "every key already exists in the schema", source=source)
    if override.is_sweep_override():
        raise ConfigError("sweeps (a,b / range() / choice()) are not supported; give one value", source=source)
    if not override.key_or_group:
        raise ConfigError("malformed override, expected key=value: the key is empty", source=source)
    return override.key_or_group, override.value()


def _locate(origins: dict[str, Origin], key: str | None, default_source: str | None) -> Origin:
    """Where ``key`` (or its nearest enclosing section) was set; else the config file, no line."""
    while key:
        if key in origins:
            return origins[key]
        key = key.rpartition(".")[0]
    return default_source, None


_OVERRIDE_PARSER = OverridesParser.create()
