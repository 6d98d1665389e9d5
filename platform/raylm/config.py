"""Job configuration: a YAML file plus `--set dotted.key=value` overrides, validated into
pydantic v2 models that forbid unknown keys.

Every job validates its whole config before it touches Ray. A user error (missing file,
bad YAML, unknown key, wrong type) becomes one `ConfigError` whose message names the field;
`run_main` turns it into that message on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from raylm.storage import StorageError

M = TypeVar("M", bound=BaseModel)

EXIT_CONFIG_ERROR = 2


class ConfigError(Exception):
    """A user error in a config file or an override; the message is meant for the user."""


class Strict(BaseModel):
    """Base of every config model: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value), the value typed as YAML types it
    (`3` is an int, `true` a bool, `[a, b]` a list, `null` None; quote to keep a string)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set tokenizer.vocab_size=4096")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not key.strip() or any(not p for p in parts):
        raise ConfigError(f"--set {item!r}: the key must be a dotted path such as tokenizer.vocab_size")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. `a: b: c`): keep the literal string
    return parts, value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Set each `a.b.c=value` in `data`, creating sections as needed. A numeric part indexes a
    list (`sources.0.uri=...`)."""
    for item in overrides:
        parts, value = parse_override(item)
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {item!r}: `{'.'.join(parts[:i])}` is a list of {len(node)}; "
                                      f"`{part}` is not an index in it")
                key: Any = int(part)
            elif isinstance(node, dict):
                key = part
            else:
                raise ConfigError(f"--set {item!r}: `{'.'.join(parts[:i])}` is a value, not a section, "
                                  f"so it has no `{part}`")
            if last:
                node[key] = value
            else:
                if isinstance(node, dict) and node.get(key) is None:
                    node[key] = {}
                node = node[key]
    return data


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"config file {p} is not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys to values at the top, not a {type(data).__name__}")
    return data


def _fields_at(model: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    """Names of the fields allowed at `loc` (for 'did you mean' hints); [] when unknown."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(part)
        if field is None:
            return []
        current = field.annotation
        # Optional[X] / X | None: look inside for a model
        for arg in getattr(current, "__args__", ()) or ():
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                current = arg
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def format_validation_error(err: ValidationError, model: type[BaseModel], source: str) -> str:
    lines = []
    for e in err.errors():
        loc = list(e["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _fields_at(model, loc[:-1])
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            msg = f"unknown key `{path}`"
            if hint:
                msg += f"; did you mean `{'.'.join(str(p) for p in loc[:-1] + [hint[0]])}`?"
            elif allowed:
                msg += f"; allowed here: {', '.join(allowed)}"
        elif e["type"] == "missing":
            msg = f"`{path}` is required"
        else:
            got = e.get("input")
            msg = f"`{path}`: {e['msg']}"
            if not isinstance(got, (dict, list)):
                shown = repr(got)
                msg += f" (got {shown[:77] + '...' if len(shown) > 80 else shown})"
        lines.append(msg)
    head = f"invalid config ({source}): " if len(lines) == 1 else f"invalid config ({source}), {len(lines)} problems: "
    return head + "; ".join(lines)


def build(model: type[M], data: dict, source: str = "config") -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, model, source)) from None


def load(model: type[M], path: str | Path | None, overrides: Sequence[str] = ()) -> M:
    """Read `path` (YAML; None = empty), apply `--set` overrides, validate into `model`."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    source = str(path) if path is not None else "defaults"
    if overrides:
        source += " + --set " + " ".join(overrides)
    return build(model, data, source)


def job_argparser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set tokenizer.vocab_size=4096 (repeatable)",
    )
    return p


def run_main(fn: Callable[[], int | None]) -> None:
    """Run a job's main: a user error (bad config, missing input) becomes one message on
    stderr and exit code 2, never a stack trace."""
    try:
        code = fn()
    except (ConfigError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    sys.exit(code or 0)
