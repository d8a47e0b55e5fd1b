"""Run configs: dataclasses, read from TOML files or named presets, every key overridable on the command line.

A config class is a dataclass whose fields carry `metadata={"help": ..., "group": ...}`. Files are TOML
(`tomllib`); sections, the fields' groups such as `[model]` or `[train]`, only group keys for the reader
and are merged. `add_config_arguments` turns each field into a `--kebab-case` flag; a flag given on the
command line wins over the file, which wins over the defaults. An unknown key or section, or a value of
the wrong type (in a file, a quoted number is a string), is an error that names it, the file and the
closest valid name. The resolved config is saved with every run (`dump_toml`).
"""

from __future__ import annotations

import argparse
import collections.abc
import copy
import dataclasses
import difflib
import os
import re
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from .errors import ScratchLLMError

if typing.TYPE_CHECKING:
    from _typeshed import DataclassInstance

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

C = TypeVar("C", bound="DataclassInstance")
PRESET_PACKAGE = "scratchllm.configs"


def setting(
    default: Any,
    help: str,
    group: str = "settings",
    *,
    path: bool | str | tuple[str, ...] = False,
    flags: tuple[str, ...] = (),
    positional: bool | str = False,
    choices: tuple[Any, ...] | None = None,
    repeat: bool = False,
    metavar: str | None = None,
    required: bool = False,
    exclusive: str = "",
    only: tuple[str, ...] = (),
) -> Any:
    """A config field with its help text and the `[group]` it belongs to (mutable defaults are copied).

    `path`: the value is a path, which the run's saved settings hold as an absolute one (`dump_toml`):
    True, always a path; a tuple, a path where one exists (or a glob), else `hf:...`, `tiktoken:...` or
    one of these names, which win over a path of the same name (`builtin`, `gpt2`); "dir", a
    directory where one exists, else a name (a model: a directory wins over the hub name).

    How the command line spells it (`add_config_arguments`): `flags`, its spellings instead of
    `--field-name`; `positional`, an argument without a flag (True, or argparse's nargs "?", "*", "+");
    `choices`; `repeat`, a list given as a repeated flag (`--prompt A --prompt B`) instead of several
    values after one; `metavar`; `required`; `exclusive`, the name of a group of settings of which one
    at most may be given (required if any of them is). A field whose type is itself a settings
    dataclass (`GenerationConfig`) lends its fields to the command as flags of their own: all of them, or
    `only` these."""
    cli = dict(
        flags=flags,
        positional=positional,
        choices=choices,
        repeat=repeat,
        metavar=metavar,
        required=required,
        exclusive=exclusive,
        only=only,
    )
    meta = {"help": help, "group": group, "path": path, "cli": cli}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One setting of a config class as flags and files see it: a field, or a field of an embedded
    settings dataclass (`owner` names the embedding field)."""

    field: dataclasses.Field
    type: Any
    default: Any
    owner: str = ""

    @property
    def name(self) -> str:
        return self.field.name

    @property
    def cli(self) -> dict[str, Any]:
        return self.field.metadata.get("cli", {})


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _embedded(tp: Any) -> type | None:
    inner, _ = _unwrap_optional(tp)
    return inner if isinstance(inner, type) and dataclasses.is_dataclass(inner) else None


def _leaves(cls: type) -> list[_Leaf]:
    """The settings of `cls`: its fields, with an embedded settings dataclass's fields in its place."""
    types_ = typing.get_type_hints(cls)
    leaves = []
    for f in dataclasses.fields(cls):
        sub = _embedded(types_[f.name])
        if sub is None:
            leaves.append(_Leaf(f, types_[f.name], _default(f)))
            continue
        only = f.metadata.get("cli", {}).get("only") or ()
        sub_default, sub_types = _default(f), typing.get_type_hints(sub)
        for g in dataclasses.fields(sub):
            if not only or g.name in only:
                leaves.append(_Leaf(g, sub_types[g.name], getattr(sub_default, g.name), owner=f.name))
    names = [leaf.name for leaf in leaves]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise TypeError(f"{cls.__name__}: settings named twice (an embedded dataclass's too): {twice}")
    return leaves


def _field_types(cls: type) -> dict[str, Any]:
    return {leaf.name: leaf.type for leaf in _leaves(cls)}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _item_type(tp: Any) -> Any:
    """The item type of a list setting (`list[str]`, `tuple[str, ...]`, `Sequence[str]`), else None."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list or (origin in (tuple, collections.abc.Sequence) and args and args[-1:] != ((),)):
        return args[0]
    return None


def _type_name(tp: Any) -> str:
    inner, optional = _unwrap_optional(tp)
    item = _item_type(inner)
    name = f"list of {item.__name__}" if item is not None else getattr(inner, "__name__", str(inner))
    return f"{name} or none" if optional else name


def coerce(key: str, value: Any, tp: Any, where: str, *, toml: bool = False) -> Any:
    """Check/convert a TOML or command-line value to the field's type, or explain what is wrong.
    `toml`: the value comes typed from a TOML file, so a quoted number or `true` must not stand for
    one (`lr = "0.001"`, `compile = 1`); command-line values are strings, parsed by the type."""
    inner, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ScratchLLMError(f"{where}: {key} needs a value of type {_type_name(tp)}")
    item = _item_type(inner)
    if item is not None:
        items = value if isinstance(value, (list, tuple)) else [value]
        values = [coerce(key, v, item, where, toml=toml) for v in items]
        return values if typing.get_origin(inner) is list else tuple(values)
    if toml and isinstance(value, (dict, list)):
        raise ScratchLLMError(
            f"{where}: {key} is a TOML {'table' if isinstance(value, dict) else 'list'}, but it takes "
            f"{_a(_type_name(tp))}; write {key} = {_example(inner)}"
        )
    if toml and not _toml_type_fits(value, inner):
        raise ScratchLLMError(
            f"{where}: {key} = {_shown(value)} is not a valid {_type_name(tp)}{_toml_hint(key, value, inner)}"
        )
    try:
        if inner is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError
        if inner is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                try:
                    return int(value)
                except ValueError:  # allow 1e4 and 2000.0, not 2.5
                    number = float(value)
                    if not number.is_integer():
                        raise
                    return int(number)
            if isinstance(value, int):
                return value
            raise ValueError
        if inner is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if inner is str:
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                return str(value)
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        shown = _shown(value) if toml else repr(value)
        hint = "; it takes a whole number" if inner is int and isinstance(value, (float, str)) else ""
        raise ScratchLLMError(f"{where}: {key} = {shown} is not a valid {_type_name(tp)}{hint}") from None
    return value


def _toml_type_fits(value: Any, tp: Any) -> bool:
    """Whether a TOML value has the kind of `tp`: a bool for a bool, a number for a number (an int for
    a float setting; a float for an int one is checked for a fraction later), no bool for either."""
    if tp is bool:
        return isinstance(value, bool)
    if tp in (int, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, (str, int, float)) and not isinstance(value, bool)
    return True


def _shown(value: Any) -> str:
    """A TOML value as it is written in the file."""
    try:
        return _toml_value(value)
    except TypeError:
        return repr(value)


def _example(tp: Any) -> str:
    return {bool: "true", int: "1", float: "0.5", str: '"..."'}.get(tp, "...")


def _toml_hint(key: str, value: Any, tp: Any) -> str:
    """How to write `value` as `tp` in TOML, for the error."""
    if isinstance(value, str):
        try:
            parsed = coerce(key, value, tp, "")
        except ScratchLLMError:
            parsed = None
        if parsed is not None:
            return f" (a quoted string); write it without quotes: {key} = {_toml_value(parsed)}"
        return f" (a string); write {_a(_type_name(tp))}, e.g. {key} = {_example(tp)}"
    if tp is bool:
        return f"; write {key} = true or {key} = false"
    return f"; write {_a(_type_name(tp))}, e.g. {key} = {_example(tp)}"


def _a(name: str) -> str:
    return f"an {name}" if name[:1] in "aeiou" else f"a {name}"


def _suggest(key: str, valid: list[str], form: str = "{!r}") -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f" (did you mean {form.format(close[0])}?)" if close else ""


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ScratchLLMError(f"cannot read config {path}: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ScratchLLMError(f"config {path} is not valid TOML: {e}") from e
    except UnicodeDecodeError as e:
        raise ScratchLLMError(f"config {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from e


def preset_names() -> list[str]:
    return sorted(
        p.name[: -len(".toml")] for p in resources.files(PRESET_PACKAGE).iterdir() if p.name.endswith(".toml")
    )


def find_config(spec: str) -> tuple[dict[str, Any], str]:
    """A TOML file path, or the name of a preset shipped in scratchllm/configs (a directory of that
    name in the current directory does not hide the preset)."""
    path = Path(spec).expanduser()
    if path.is_file():
        try:
            return read_toml(path), str(path)
        except ScratchLLMError as e:
            if read_preset(spec) is None:
                raise
            raise ScratchLLMError(
                f"{e} (the file {spec} here hides the preset {spec!r}: rename it, or run elsewhere)"
            ) from None
    preset = read_preset(spec)
    if preset is not None:
        return preset, f"preset {spec!r}"
    if path.exists():
        raise ScratchLLMError(f"config {spec} is a directory; give a TOML file or a preset name")
    raise ScratchLLMError(
        f"config {spec!r} is neither a file nor a preset; presets: "
        f"{', '.join(preset_names())}{_suggest(spec, preset_names())}"
    )


def read_preset(name: str) -> dict[str, Any] | None:
    """A preset shipped in scratchllm/configs, or None if there is none of that name."""
    res = resources.files(PRESET_PACKAGE) / f"{name}.toml"
    if not res.is_file():
        return None
    with resources.as_file(res) as p:
        return read_toml(p)


def _flatten(
    data: dict[str, Any], where: str, sections: set[str], keys: set[str]
) -> dict[str, tuple[Any, str]]:
    """Merge `[section]` tables into one flat mapping of key -> (value, where it is set): sections only
    group keys (any of `sections`, in any), no setting is a table, and a `[section.sub]` table is none."""
    flat: dict[str, tuple[Any, str]] = {}
    shown = ", ".join(f"[{s}]" for s in sorted(sections))

    def put(key: str, value: Any, place: str) -> None:
        if key in flat:
            raise ScratchLLMError(f"{place}: key {key!r} is set twice")
        flat[key] = (value, place)

    for name, value in data.items():
        if not isinstance(value, dict) or (name in keys and name not in sections):
            put(name, value, where)  # a top-level setting (a table there is reported by `coerce`)
            continue
        if name not in sections:
            raise ScratchLLMError(
                f"{where}: unknown section [{name}]{_suggest(name, sorted(sections), '[{}]')}; the sections "
                f"are {shown}"
            )
        for key, v in value.items():
            if isinstance(v, dict) and key not in keys:
                raise ScratchLLMError(
                    f"{where}: unknown section [{name}.{key}]{_suggest(key, sorted(keys))}; sections are "
                    f"one level ({shown}): put its keys under [{name}]"
                )
            put(key, v, f"{where} [{name}]")
    return flat


def build_config(
    cls: type[C],
    file_values: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    where: str = "config",
) -> C:
    """Defaults <- file values (TOML: typed) <- overrides (the command line: strings parsed by type),
    each checked against the dataclass's settings and types."""
    leaves = {leaf.name: leaf for leaf in _leaves(cls)}
    valid = sorted(leaves)
    sections = {leaf.field.metadata.get("group", "settings") for leaf in leaves.values()}
    from_file = _flatten(file_values or {}, where, sections, set(leaves))
    from_flags = {k: (v, "command line") for k, v in (overrides or {}).items()}
    values: dict[str, Any] = {}
    for flat, toml in ((from_file, True), (from_flags, False)):
        for key, (value, place) in flat.items():
            if key not in leaves:
                raise ScratchLLMError(f"{place}: unknown key {key!r}{_suggest(key, valid)}")
            values[key] = coerce(key, value, leaves[key].type, place, toml=toml)
    own = {k: v for k, v in values.items() if not leaves[k].owner}
    for f in dataclasses.fields(cls):
        given = {k: v for k, v in values.items() if leaves[k].owner == f.name}
        if given:
            own[f.name] = dataclasses.replace(_default(f), **given)
    return cls(**own)


def load_config(
    cls: type[C], spec: str | None = None, overrides: dict[str, Any] | None = None, *, preset: bool = False
) -> C:
    """`spec` is a TOML path or preset name (or None for the defaults); `overrides` win over it.
    `preset`: `spec` is a shipped preset's name, never a file (a command's own preset)."""
    if spec and preset:
        values = read_preset(spec)
        if values is None:
            raise ScratchLLMError(f"no preset {spec!r}; presets: {', '.join(preset_names())}")
        return build_config(cls, values, overrides, f"preset {spec!r}")
    file_values, where = find_config(spec) if spec else ({}, "defaults")
    cfg = build_config(cls, file_values, overrides, where)
    check_required(cfg)
    return cfg


def add_config_arguments(
    parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (), preset: str | None = None
) -> None:
    """One `--kebab-case` flag per setting (or as `setting` spells it), default None (= not given),
    grouped by the settings' `group`. The help shows each default: the dataclass's, or with `preset`
    the preset's values."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    exclusive: dict[str, argparse._MutuallyExclusiveGroup] = {}
    # the preset's own values, read from the package (never from a file of that name in the cwd)
    preset_values = _flat_values(build_config(cls, read_preset(preset))) if preset else {}
    leaves = [leaf for leaf in _leaves(cls) if leaf.name not in skip]
    for leaf in leaves:
        group_name = leaf.field.metadata.get("group", "settings")
        group = groups.get(group_name) or groups.setdefault(
            group_name, parser.add_argument_group(f"{group_name} settings")
        )
        cli = leaf.cli
        if cli.get("exclusive"):
            name = cli["exclusive"]
            if name not in exclusive:  # a required one is checked with the file's values (`check_required`)
                exclusive[name] = group.add_mutually_exclusive_group()
            group = exclusive[name]
        names, kwargs = _argument(leaf, preset_values.get(leaf.name, leaf.default))
        group.add_argument(*names, **kwargs)


def _argument(leaf: _Leaf, default: Any) -> tuple[list[str], dict[str, Any]]:
    """argparse's names and keywords for one setting: a flag (or positional) whose value, None when
    not given, becomes the `cfg__NAME` override."""
    cli = leaf.cli
    help_text = leaf.field.metadata.get("help", "")
    unset = default in (None, [], "")
    must_give = cli.get("required") or (cli.get("positional") and unset)
    if not must_give and (not unset or "(default:" not in help_text):  # the help may say what empty means
        help_text = re.sub(r"\s*\(default: [^)]*\)", "", help_text)
        help_text = f"{help_text} (default: {default!r})".strip()
    inner, _ = _unwrap_optional(leaf.type)
    is_list = _item_type(inner) is not None
    kwargs: dict[str, Any] = {"default": None, "help": help_text}
    if cli.get("choices") is not None:
        kwargs["choices"] = [str(c) for c in cli["choices"]] if inner is not str else list(cli["choices"])
    metavar = cli.get("metavar") or ("VALUE" if is_list else _type_name(leaf.type).split()[0].upper())
    positional = cli.get("positional")
    if positional:
        nargs = positional if isinstance(positional, str) else ("+" if is_list else None)
        kwargs.update(metavar=cli.get("metavar") or leaf.name.upper())
        if nargs:
            kwargs["nargs"] = nargs
        if nargs == "*":
            kwargs["default"] = argparse.SUPPRESS  # left out: not given (argparse would give [])
        return [f"cfg__{leaf.name}"], kwargs
    kwargs["dest"] = f"cfg__{leaf.name}"
    if is_list:
        # a flag alone empties a list whose default is not empty (`--special-tokens`: none)
        nargs = "*" if default else "+"
        kwargs.update(action="append") if cli.get("repeat") else kwargs.update(nargs=nargs)
        kwargs["metavar"] = metavar
    elif inner is bool:  # `--mask-prompt` alone is `--mask-prompt true`
        kwargs.update(nargs="?", const="true", metavar="BOOL")
    elif "choices" not in kwargs:
        kwargs["metavar"] = metavar
    names = list(cli.get("flags") or ()) or ["--" + leaf.name.replace("_", "-")]
    return names, kwargs


def _flat_values(cfg: Any) -> dict[str, Any]:
    """Every setting of a config object by its flat name (an embedded dataclass's fields too)."""
    values = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if _embedded(type(value)) is not None and dataclasses.is_dataclass(value):
            values.update({g.name: getattr(value, g.name) for g in dataclasses.fields(value)})
        else:
            values[f.name] = value
    return values


def check_required(cfg: Any) -> None:
    """A one-line error naming the required settings (`setting(..., required=True)`) that neither the
    flags nor the settings file gave; of a one-of group (`exclusive`), one must be given."""
    missing: list[str] = []
    groups: dict[str, list[tuple[str, bool]]] = {}
    for leaf in _leaves(type(cfg)):
        if not leaf.cli.get("required"):
            continue
        flag = (leaf.cli.get("flags") or ("--" + leaf.name.replace("_", "-"),))[0]
        if leaf.cli.get("positional"):
            flag = leaf.cli.get("metavar") or leaf.name.upper()
        value = _leaf_value(cfg, leaf)
        given = value is not None and value is not False and value not in ("", [], ())
        if leaf.cli.get("exclusive"):
            groups.setdefault(leaf.cli["exclusive"], []).append((flag, given))
        elif not given:
            missing.append(flag)
    missing += [
        " or ".join(f for f, _ in members) for members in groups.values() if not any(g for _, g in members)
    ]
    if missing:
        raise ScratchLLMError(
            f"the following arguments are required: {', '.join(missing)} (on the command line, or in a "
            "--config file)"
        )


def reject_unused_flags(flags: dict[str, Any], prefix: str, needs: str) -> None:
    """A one-line error when command-line `flags` set any setting named `prefix...`, which only works
    with `needs` (so that e.g. --lora-rank without LoRA is not silently ignored)."""
    given = [f"--{n.replace('_', '-')}" for n in flags if n.startswith(prefix)]
    if given:
        raise ScratchLLMError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} {needs}")


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line."""
    return {k[len("cfg__") :]: v for k, v in vars(args).items() if k.startswith("cfg__") and v is not None}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _absolute(value: str, kind: bool | str | tuple[str, ...]) -> str:
    """`value` as an absolute path where `kind` (`setting`'s `path`) says it is one; else as it is."""
    if not value or kind is False:
        return value
    path = Path(value).expanduser()
    if kind == "dir" and not path.is_dir():
        return value  # a hub name: a directory of that name would have won
    if isinstance(kind, tuple):
        if value in kind or value.startswith(("hf:", "tiktoken:")):
            return value
        if not (path.exists() or any(c in value for c in "*?[")):
            return value  # a path that is not there: its error names it as given
    return os.path.abspath(path)


def _leaf_value(cfg: Any, leaf: _Leaf) -> Any:
    return getattr(getattr(cfg, leaf.owner), leaf.name) if leaf.owner else getattr(cfg, leaf.name)


def saved_value(cfg: Any, name: str) -> Any:
    """The setting `name` as the run's saved settings hold it: a path as an absolute one (`setting`'s
    `path`), so that it means the same from any directory."""
    leaf = next(leaf for leaf in _leaves(type(cfg)) if leaf.name == name)
    value, kind = _leaf_value(cfg, leaf), leaf.field.metadata.get("path", False)
    if value is None:
        return value
    return [_absolute(v, kind) for v in value] if isinstance(value, list) else _absolute(value, kind)


def dump_toml(cfg: Any) -> str:
    """The resolved config as TOML, grouped in sections by the fields' `group` (None values omitted).
    Relative paths become absolute, so the saved settings (a run's config.toml, which `--resume`
    reads) mean the same from any directory."""
    sections: dict[str, list[str]] = {}
    for leaf in _leaves(type(cfg)):
        if _leaf_value(cfg, leaf) is None:
            continue
        sections.setdefault(leaf.field.metadata.get("group", "settings"), []).append(
            f"{leaf.name} = {_toml_value(saved_value(cfg, leaf.name))}"
        )
    return "\n".join(f"[{name}]\n" + "\n".join(lines) + "\n" for name, lines in sections.items())
