"""The config schema: frozen dataclasses are the only declaration of a config group's fields.

Every model / train config dataclass derives from `ConfigSchema`, which gives it

  * `from_config(values, group=...)`: the ONE strict loader. `values` is a ConfigDict, a dict (e.g.
    a checkpoint's config.json) or None. Unknown keys fail with a "did you mean" error naming the
    group (`model.unet.num_level`: did you mean model.unet.num_levels?); missing keys take the
    dataclass default; values are checked against the field's type (ints stay ints, a float field
    takes an int, tuples come from lists, dtypes from names); a field whose type is itself a
    `ConfigSchema` is a nested group loaded the same way.
  * `to_dict()`: the plain-dict form config files wrap in a ConfigDict (dtypes by name, nested
    groups as dicts), so `configs/*.py` and `presets.py` derive their groups from the dataclass
    instead of restating every field: `ml_collections.ConfigDict(LLMConfig(num_layers=2).to_dict())`.

Fields computed from another group (e.g. the UNet's `num_train_steps` = `diffusion.num_steps`) are
declared with `derived_field(...)`: they are left out of `to_dict()` and passed to `from_config` as
keyword arguments by the code that knows their source.

Stdlib and jax only, so `models/` may import it.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Mapping

import jax.numpy as jnp

from uniecg_jax.errors import ConfigError

_DTYPE = "uniecg_dtype"       # field metadata: the value is a dtype, given by name in configs
_DERIVED = "uniecg_derived"   # field metadata: filled by code from another group, not configured


def dtype_field(default: Any = jnp.float32) -> Any:
    """A dataclass field holding a dtype: configs name it ("bfloat16"), the dataclass the dtype."""
    return dataclasses.field(default=default, metadata={_DTYPE: True})


def derived_field(default: Any, source: str) -> Any:
    """A field computed from another config group (`source`, for the docs and errors), not set in
    this group: `to_dict()` leaves it out and `from_config` takes it as a keyword argument."""
    return dataclasses.field(default=default, metadata={_DERIVED: source})


def _as_mapping(values: Any) -> dict:
    if values is None:
        return {}
    if isinstance(values, ConfigSchema):
        return values.to_dict()
    if hasattr(values, "to_dict"):       # ml_collections.ConfigDict (without importing it here)
        return dict(values.to_dict())
    if isinstance(values, Mapping):
        return dict(values)
    raise ConfigError(f"expected a config group (mapping), got {type(values).__name__}")


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation))


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """`value` checked against / converted to the field type `annotation` (key names the field)."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if isinstance(annotation, type) and issubclass(annotation, ConfigSchema):
        if isinstance(value, annotation):
            return value
        return annotation.from_config(value, group=key)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected a boolean, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if annotation is tuple or origin is tuple:
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"{key}: expected a tuple/list, got {value!r}")
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        return tuple(value)
    raise ConfigError(f"{key}: field type {_type_name(annotation)} has no config form")


class ConfigSchema:
    """Mixin for frozen config dataclasses: the strict `from_config` and the derived `to_dict`."""

    # The config path of the group this dataclass reads (for error messages), e.g. "model.llm".
    config_group: typing.ClassVar[str] = ""

    @classmethod
    def from_config(cls, values: Any = None, group: str | None = None, **derived: Any):
        """The dataclass from a config group (ConfigDict, dict, instance or None = all defaults).

        Args:
          values: the group's keys; every key must be a (non-derived) field of `cls`.
          group: the group's dotted path for messages (default `cls.config_group`).
          **derived: values of `derived_field`s (and overrides of any field), set by the caller.
        Raises:
          ConfigError: an unknown key ("did you mean ..."), a wrong type, or a field's own check.
        """
        group = group if group is not None else cls.config_group
        prefix = f"{group}." if group else ""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        configurable = [name for name, f in fields.items() if _DERIVED not in f.metadata]
        values = check_group_keys(values, configurable, group)
        bad = sorted(set(derived) - set(fields))
        if bad:
            raise TypeError(f"{cls.__name__}.from_config: no fields {bad}")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for name, value in {**values, **derived}.items():
            field = fields[name]
            if field.metadata.get(_DTYPE):
                try:
                    kwargs[name] = jnp.dtype(value)
                except TypeError:
                    raise ConfigError(f"{prefix}{name}: not a dtype: {value!r}") from None
            else:
                kwargs[name] = _coerce(value, hints[name], prefix + name)
        missing = [name for name, f in fields.items() if name not in kwargs
                   and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"config group {group or cls.__name__} is missing "
                              f"{', '.join(prefix + m for m in missing)}")
        try:
            return cls(**kwargs)
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from None

    def to_dict(self) -> dict:
        """Configurable fields as plain values (dtypes by name, nested groups as dicts, tuples
        kept): what a config file wraps in a ConfigDict and a checkpoint's config.json stores."""
        out = {}
        for field in dataclasses.fields(self):
            if _DERIVED in field.metadata:
                continue
            value = getattr(self, field.name)
            if field.metadata.get(_DTYPE):
                value = jnp.dtype(value).name
            elif isinstance(value, ConfigSchema):
                value = value.to_dict()
            out[field.name] = value
        return out

    def replace(self, **changes: Any):
        """A copy with `changes` (checked by the dataclass's own `__post_init__`)."""
        return dataclasses.replace(self, **changes)


def check_group_keys(values: Any, allowed: typing.Iterable[str], group: str) -> dict:
    """`values` as a dict after checking every key is in `allowed` (the same "did you mean" error as
    `ConfigSchema.from_config`); for composite groups whose keys are sub-groups of other schemas."""
    values = _as_mapping(values)
    allowed = list(allowed)
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        prefix = f"{group}." if group else ""
        messages = []
        for key in unknown:
            close = difflib.get_close_matches(key, allowed, n=3)
            hint = f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else ""
            messages.append(f"{prefix}{key}{hint}")
        raise ConfigError(f"unknown key(s) in config group {group or '(top level)'}: "
                          f"{'; '.join(messages)}")
    return values


# Choices of `InputFormatConfig` (the data layer implements them: `data.chat_format` formats and
# placeholders, `data.record.ENCODER_LEAD_ORDERS`).
PROMPT_FORMATS = ("vicuna", "llava_v1")
PLACEHOLDER_KINDS = ("token", "sentinel")
ECG_LEAD_ORDERS = ("canonical", "mimic_iv")


@dataclasses.dataclass(frozen=True)
class InputFormatConfig(ConfigSchema):
    """How a UniECG model's inputs were laid out in training (`model.input`); part of the model,
    so every checkpoint states it and serving follows it.

    prompt_format: "vicuna" (the project's own chat format) or "llava_v1" (LLaVA's `conv_llava_v1`,
      GEM's training and serving prompt, token for token).
    placeholder: "token" (an added `<ecg>` token with its own embedding row) or "sentinel" (a
      negative id, LLaVA's IMAGE_TOKEN_INDEX -200, spliced away before the embedding lookup, so
      the vocabulary keeps its size).
    ecg_lead_order: the row order the ECG encoder was trained on ("canonical", or "mimic_iv", the
      MIMIC-IV-ECG file order that ECG-CoCa / GEM weights saw).
    """
    config_group = "model.input"
    prompt_format: str = "vicuna"
    placeholder: str = "token"
    ecg_lead_order: str = "canonical"

    def __post_init__(self):
        for name, choices in (("prompt_format", PROMPT_FORMATS),
                              ("placeholder", PLACEHOLDER_KINDS),
                              ("ecg_lead_order", ECG_LEAD_ORDERS)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"model.input.{name}={getattr(self, name)!r}; choose from "
                                  f"{', '.join(choices)}")
