"""Experiment configs: `--config FILE[:ARG]` and `--config.path.to.field=value` overrides.

As in big_vision, an experiment is a Python file with `get_config(arg=None)` returning an
ml_collections.ConfigDict; `arg` is the text after the colon, e.g.
`experiments/pretrain.py:backbone=dinov2-large,runlocal`, and `parse_arg` turns it into a dict.

An override's text is converted to the type of the field it replaces (bool, int, float, str,
tuple), so `--config.optim.lr=3e-4`, `--config.loss.center=false` and
`--config.data.shots=1,4,8` all work, and a key the config does not have is an error naming it.
The groups whose keys are the user's to choose (per method, per class: `OPEN_GROUPS`) take new
keys, e.g. `--config.eval.method_settings.glass.epochs=100`, or a whole dict,
`--config.eval.method_settings="{'glass': {'epochs': 100}}"`.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import sys
import types
from typing import Any, Iterable, Mapping, Sequence

import ml_collections

OVERRIDE_PREFIX = "--config."
# Groups keyed by names of the user's choosing (methods, classes), empty by default: an override
# may add keys under them.
OPEN_GROUPS = ("eval.method_settings", "eval.class_resize")
_TRUE = {"true", "1", "yes", "y", "on", "t"}
_FALSE = {"false", "0", "no", "n", "off", "f"}


# ----------------------------------------------------------------------------- config files
def parse_config_spec(spec: str) -> tuple[str, str | None]:
  """Splits `FILE[:ARG]` into (FILE, ARG or None).

  The split is at the first ':' after a '.py' so that ARG may itself hold colons.
  """
  marker = spec.find(".py:")
  if marker >= 0:
    return spec[:marker + 3], spec[marker + 4:]
  return spec, None


def load_module(path: str) -> types.ModuleType:
  """Imports a Python file as a module (a fresh module object on every call).

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: it is not a .py file.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file not found: {path}")
  if not path.endswith(".py"):
    raise ValueError(f"config file must be a .py file with get_config(arg), got {path}")
  name = "_adjax_config_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
  spec = importlib.util.spec_from_file_location(name, os.path.abspath(path))
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses and pickling look their module up by name
  try:
    spec.loader.exec_module(module)
  except BaseException:
    sys.modules.pop(name, None)
    raise
  return module


def load_config(spec: str | None) -> ml_collections.ConfigDict:
  """Loads `FILE[:ARG]` by calling the file's `get_config(ARG)`; None gives the default config.

  Args:
    spec: `path/to/file.py` or `path/to/file.py:arg`, or None for `adjax.configs.default_config()`.

  Returns:
    The ConfigDict.

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file has no get_config, or it does not return a ConfigDict.
  """
  if spec is None:
    from adjax.configs import default_config
    return default_config()
  path, arg = parse_config_spec(spec)
  module = load_module(path)
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise ValueError(f"config file {path} has no get_config(arg) function")
  config = get_config(arg) if arg is not None else get_config()
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(f"{path}: get_config returned {type(config).__name__}, expected a "
                     "ml_collections.ConfigDict")
  return config


def parse_arg(arg: str | None, **defaults: Any) -> dict[str, Any]:
  """Parses a config argument `key=value,flag,...` into a dict (big_vision's convention).

  A bare `flag` is True. Values are converted to the type of the key's default when it has one
  (e.g. `parse_arg("steps=5", steps=10)` -> {"steps": 5}); keys without a default are an error.

  Args:
    arg: the text after the ':' of `--config FILE:ARG` (None or "" for none).
    **defaults: every allowed key with its default value.

  Returns:
    `defaults` updated with the parsed values.

  Raises:
    ValueError: an unknown key or a value of the wrong type.
  """
  out = dict(defaults)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, raw = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r} in {arg!r}; known: "
                       f"{', '.join(sorted(defaults)) or '(none)'}")
    if not sep:
      out[key] = True
    else:
      out[key] = coerce(raw.strip(), defaults[key], f"config argument {key!r}")
  return out


# ----------------------------------------------------------------------------- overrides
def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """Takes the `--config.key=value` / `--config.key value` arguments out of argv.

  Returns:
    (the other arguments, [(dotted key, raw value text), ...] in command-line order).

  Raises:
    ValueError: an override without a key or without a value.
  """
  rest: list[str] = []
  overrides: list[tuple[str, str]] = []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg == "--":  # everything after is positional
      rest.extend(argv[i:])
      break
    if arg.startswith(OVERRIDE_PREFIX):
      body = arg[len(OVERRIDE_PREFIX):]
      key, sep, value = body.partition("=")
      if not key:
        raise ValueError(f"override {arg!r} has no key; expected --config.path.to.key=value")
      if not sep:
        if i + 1 >= len(argv):
          raise ValueError(f"override {arg!r} has no value; expected --config.{key}=value")
        value = argv[i + 1]
        i += 1
      overrides.append((key, value))
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any] | Iterable[tuple[str, Any]]
                    ) -> ml_collections.ConfigDict:
  """Sets dotted keys in `config` (in place), converting each value to the field's type.

  Args:
    config: the ConfigDict to change.
    overrides: `{"optim.lr": "3e-4"}` or pairs; string values are parsed according to the
      existing field's type, other values are checked against it (int -> float and
      list -> tuple are converted).

  Returns:
    `config`, for chaining.

  Raises:
    ValueError: an unknown key (the message names it and lists its neighbours) or a value that
      cannot be converted to the field's type.
  """
  items = overrides.items() if isinstance(overrides, Mapping) else overrides
  for key, value in items:
    parent, leaf = _resolve_parent(config, key)
    if leaf not in parent:   # a new key in an open group: typed by its text
      parent[leaf] = _new_value(value) if isinstance(value, str) else value
      continue
    field_type = _field_type(parent, leaf)
    current = parent[leaf]
    if isinstance(current, ml_collections.ConfigDict):
      if _in_open_group(key):
        parent[leaf] = ml_collections.ConfigDict(_group_value(key, value))
        continue
      raise ValueError(f"config key {key!r} is a group of settings, not a value; set one of "
                       f"{', '.join(f'{key}.{k}' for k in sorted(current.keys()))}")
    what = f"config key {key!r}"
    if isinstance(value, str):
      new = coerce(value, current, what, field_type=field_type)
    else:
      new = _check_typed(value, current, what, field_type)
    try:
      parent[leaf] = new
    except (TypeError, ValueError) as err:
      raise ValueError(f"{what}: cannot set {new!r} ({err})") from err
  return config


def _new_value(text: str) -> Any:
  """A new key's value from its text: true/false, else as `coerce` reads a field without a
  type (none/null, a Python literal, else the text)."""
  word = text.strip().lower()
  if word in ("true", "false"):
    return word == "true"
  return coerce(text.strip(), None, "a new config key")


def _in_open_group(key: str) -> bool:
  return any(key == group or key.startswith(group + ".") for group in OPEN_GROUPS)


def _group_value(key: str, value: Any) -> dict:
  """A whole open group's value: a dict, or its text (a Python or JSON literal)."""
  parsed = value
  if isinstance(value, str):
    try:
      parsed = json.loads(value)
    except ValueError:
      try:
        parsed = ast.literal_eval(value.strip())
      except (ValueError, SyntaxError):
        parsed = None
  if not isinstance(parsed, Mapping):
    raise ValueError(f"config key {key!r} is a group keyed by your names: expected a dict, "
                     f"e.g. {{'glass': {{'epochs': 100}}}}, or set one key of it "
                     f"(--config.{key}.NAME=VALUE); got {value!r}")
  return dict(parsed)


def _resolve_parent(config: ml_collections.ConfigDict, key: str):
  parts = key.split(".")
  if not all(parts):
    raise ValueError(f"bad config key {key!r}")
  node = config
  for depth, part in enumerate(parts):
    if (isinstance(node, ml_collections.ConfigDict) and part not in node
        and _in_open_group(".".join(parts[:depth]))):
      if depth == len(parts) - 1:
        return node, part        # a new key of an open group
      node[part] = ml_collections.ConfigDict()
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      where = ".".join(parts[:depth])
      known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(part, known, n=1)
      hint = f"; did you mean {'.'.join(parts[:depth] + close)!r}?" if close else ""
      scope = f"under {where!r}" if where else "at the top level"
      raise ValueError(f"unknown config key {key!r}{hint} (known keys {scope}: "
                       f"{', '.join(known) if known else 'none: it is a value'})")
    if depth < len(parts) - 1:
      node = node[part]
  return node, parts[-1]


def _field_type(parent: ml_collections.ConfigDict, leaf: str) -> type | None:
  try:
    field_type = parent.get_type(leaf)
  except (AttributeError, KeyError):
    return None
  return None if field_type is type(None) else field_type


def coerce(raw: str, current: Any, what: str, *, field_type: type | None = None) -> Any:
  """Converts override text to the type of the value it replaces.

  Args:
    raw: the text from the command line.
    current: the field's present value (its type decides the conversion).
    what: how to name the field in errors.
    field_type: the declared type when `current` is None (a typed FieldReference).

  Returns:
    The converted value.

  Raises:
    ValueError: the text does not fit the type.
  """
  kind = type(current) if current is not None else field_type
  text = raw.strip()
  if current is None and text.lower() in ("none", "null"):
    return None
  if kind is bool:
    if text.lower() in _TRUE:
      return True
    if text.lower() in _FALSE:
      return False
    raise ValueError(f"{what}: expected a boolean (true/false), got {raw!r}")
  if kind is int:
    try:
      return int(text)
    except ValueError:
      try:
        as_float = float(text)
      except ValueError:
        as_float = None
      if as_float is not None and as_float.is_integer():
        return int(as_float)
      raise ValueError(f"{what}: expected an integer, got {raw!r}") from None
  if kind is float:
    try:
      return float(text)
    except ValueError:
      raise ValueError(f"{what}: expected a number, got {raw!r}") from None
  if kind is str:
    return raw
  if kind in (tuple, list):
    return _coerce_sequence(text, current, what, kind)
  # No type to go by (a None without a declared type): a Python literal, else the text.
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return raw


def _coerce_sequence(text: str, current: Any, what: str, kind: type) -> Any:
  try:
    parsed = ast.literal_eval(text) if text else ()
  except (ValueError, SyntaxError):
    parsed = None
  if isinstance(parsed, (tuple, list)):
    items = list(parsed)
  elif parsed is not None and not isinstance(parsed, str) and "," not in text:
    items = [parsed]  # a single number: `--config.data.shots=4`
  else:  # `a,b,c` without quotes
    items = [part.strip() for part in text.split(",") if part.strip()]
  template = current[0] if current else None
  if template is not None:
    items = [coerce(str(item), template, f"{what} item {i}") if isinstance(item, str)
             else _check_typed(item, template, f"{what} item {i}", None)
             for i, item in enumerate(items)]
  else:
    items = [_literal_or_text(item) if isinstance(item, str) else item for item in items]
  return kind(items)


def _literal_or_text(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _check_typed(value: Any, current: Any, what: str, field_type: type | None) -> Any:
  """Checks a Python value (from a sweep) against the field's type, converting the harmless."""
  kind = type(current) if current is not None else field_type
  if value is None or kind is None:
    return value
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if kind in (tuple, list) and isinstance(value, (tuple, list)):
    return kind(value)
  if kind is int and isinstance(value, bool):
    raise ValueError(f"{what}: expected an integer, got the boolean {value!r}")
  if not isinstance(value, kind):
    raise ValueError(f"{what}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
  return value


def format_override(key: str, value: Any) -> str:
  """The command-line form of one override, `--config.key=value`, that `coerce` reads back."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, bool):
    text = "true" if value else "false"
  elif isinstance(value, (tuple, list)):
    text = ",".join(str(v) for v in value) if value else "()"
  elif value is None:
    text = "none"
  elif isinstance(value, Mapping):
    text = repr(dict(value))   # a Python literal, which _group_value reads back
  else:
    text = str(value)
  return f"{OVERRIDE_PREFIX}{key}={text}"
