"""LoraConfig: peft's field names and meanings, frozen and validated on construction."""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn, Union

__all__ = ["LoraConfig", "INIT_SCHEMES", "BIAS_MODES"]

#: Accepted ``init_lora_weights`` values (``True`` is peft's kaiming-uniform default).
INIT_SCHEMES = ("gaussian", True, False, "pissa", "olora")
BIAS_MODES = ("none", "all", "lora_only")
TASK_TYPES = (None, "SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS",
              "FEATURE_EXTRACTION")

# peft fields minilora does not implement, with the value that means "feature off". A config that
# carries one of them at that value loads fine (the value is kept for the round trip); any other
# value is refused, because silently ignoring it would give a different model than peft gives.
_PEFT_FEATURES_OFF: dict[str, Any] = {
    "use_dora": False, "use_qalora": False, "loftq_config": {}, "megatron_config": None,
    "layer_replication": None, "trainable_token_indices": None, "eva_config": None,
    "corda_config": None, "lora_ga_config": None, "velora_config": None,
    "alora_invocation_tokens": None, "monteclora_config": None, "target_parameters": None,
    "use_bdlora": None, "arrow_config": None, "kasa_config": None,
}
# peft bookkeeping fields with no effect on the model; kept verbatim for the round trip.
_PEFT_PASSTHROUGH = ("peft_type", "auto_mapping", "peft_version", "revision", "megatron_core",
                     "runtime_config", "qalora_group_size", "ensure_weight_tying")

Targets = Union[list[str], str, None]


def _fail(name: str, value: Any, allowed: str) -> NoReturn:
    raise ValueError(f"LoraConfig.{name}={value!r} is invalid: {allowed}")


def _as_name_list(name: str, value: Any) -> list[str] | str | None:
    """peft accepts a list, a set, a tuple or a regex string; we store a sorted-stable list or str."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
        if not all(isinstance(v, str) and v for v in items):
            _fail(name, value, "expected non-empty module-name strings")
        return items
    _fail(name, value, "expected a list of module names, a regex string, or None")


@dataclass(frozen=True)
class LoraConfig:
    """What LoRA to put where. Field names and meanings are peft's (``peft.LoraConfig``).

    Differences from peft, all deliberate: ``init_lora_weights`` defaults to ``"gaussian"``
    (A ~ N(0, 1/r²), B = 0); the config is frozen and validated when built; ``modules_to_save``
    matches on dot boundaries (peft's loose suffix match wraps "myhead" for "head").

    Attributes:
        r: rank of the update B·A (A: (r, in), B: (out, r)).
        lora_alpha: scale numerator; the update is multiplied by lora_alpha / r
            (lora_alpha / sqrt(r) with ``use_rslora``).
        lora_dropout: dropout probability on the LoRA branch's input (never on the base path).
        target_modules: list of names (exact, or suffix on a dot boundary), a regex string
            (``re.fullmatch`` on the full name), or ``"all-linear"``.
        exclude_modules: names or regex never adapted.
        modules_to_save: modules trained in full (a trainable copy per adapter), e.g.
            ``["lm_head", "embed_tokens"]`` or a classifier head.
        bias: ``"none"``, ``"all"`` (every ``*.bias`` trains) or ``"lora_only"`` (biases of
            adapted layers).
        use_rslora: rank-stabilised scaling lora_alpha / sqrt(r).
        init_lora_weights: ``"gaussian"`` (A ~ N(0, 1/r²), B = 0), ``True`` (A kaiming-uniform,
            B = 0; peft's default), ``False`` (both random: not a no-op), ``"pissa"``, ``"olora"``
            (factors from the base weight's SVD / QR; the base keeps the residual).
        layers_to_transform: layer index or indices to adapt (list targets only).
        layers_pattern: the name before the layer index, e.g. ``"layers"`` or ``"h"``.
        rank_pattern: ``{name regex: r}`` overrides per module (first match wins).
        alpha_pattern: ``{name regex: alpha}`` overrides per module.
        fan_in_fan_out: the base weight is stored (in, out) — transformers' Conv1D; detected
            and corrected automatically, with a warning.
        lora_bias: a trainable bias on B (peft's ``lora_bias``).
        task_type: peft's task type; ``"SEQ_CLS"`` also trains ``classifier``/``score`` heads
            and keeps "all-linear" off them.
        inference_mode: adapters are frozen after inject/load.
        base_model_name_or_path: written into adapter_config.json.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Targets = None
    exclude_modules: Targets = None
    modules_to_save: list[str] | None = None
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = "gaussian"
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    lora_bias: bool = False
    task_type: str | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    #: peft fields we keep only so that ``to_dict(from_dict(d)) == d``; never read by minilora.
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            _fail("r", self.r, "the rank must be a positive integer, e.g. 8 or 16")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) \
                or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            _fail("lora_alpha", self.lora_alpha, "must be a positive finite number, e.g. 16 or 32")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) \
                or not 0.0 <= self.lora_dropout < 1.0:
            _fail("lora_dropout", self.lora_dropout, "must be a probability in [0, 1)")
        set_("target_modules", _as_name_list("target_modules", self.target_modules))
        set_("exclude_modules", _as_name_list("exclude_modules", self.exclude_modules))
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str) and value.lower() != "all-linear":
                try:
                    re.compile(value)
                except re.error as err:
                    _fail(name, value, f"a string is a regular expression and this one does not compile ({err})")
        if self.target_modules == []:
            _fail("target_modules", [], "name at least one module, give a regex, or 'all-linear'")
        mts = self.modules_to_save
        if mts is not None:
            mts = _as_name_list("modules_to_save", mts)
            if isinstance(mts, str):
                _fail("modules_to_save", mts, "must be a list of module names, e.g. ['lm_head']")
            set_("modules_to_save", mts)
        if self.bias not in BIAS_MODES:
            _fail("bias", self.bias, f"allowed values are {BIAS_MODES}")
        if not isinstance(self.use_rslora, bool):
            _fail("use_rslora", self.use_rslora, "must be True or False")
        init = self.init_lora_weights
        if not any(init is s if isinstance(s, bool) else init == s for s in INIT_SCHEMES):
            _fail("init_lora_weights", init, f"allowed values are {INIT_SCHEMES}")
        self._validate_layers()
        for name, cast in (("rank_pattern", int), ("alpha_pattern", float)):
            pattern = getattr(self, name)
            if not isinstance(pattern, Mapping):
                _fail(name, pattern, "must be a dict mapping a module-name pattern to a value")
            for key, value in pattern.items():
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
                if not isinstance(key, str) or not ok or (cast is int and value != int(value)):
                    kind = "positive integer rank" if cast is int else "positive alpha"
                    _fail(name, {key: value}, f"each key is a module-name pattern and each value a {kind}")
                try:
                    re.compile(key)
                except re.error as err:
                    _fail(name, key, f"keys are regular expressions and this one does not compile ({err})")
            set_(name, {k: cast(v) if cast is int else v for k, v in pattern.items()})
        for name in ("fan_in_fan_out", "lora_bias", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be True or False")
        task = self.task_type.value if hasattr(self.task_type, "value") else self.task_type
        if task not in TASK_TYPES:
            _fail("task_type", self.task_type, f"allowed values are {TASK_TYPES}")
        set_("task_type", task)

    def _validate_layers(self) -> None:
        ltt, pattern = self.layers_to_transform, self.layers_pattern
        if ltt is not None:
            items = [ltt] if isinstance(ltt, int) else ltt
            if isinstance(ltt, bool) or not isinstance(items, (list, tuple)) or \
                    not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
                _fail("layers_to_transform", ltt, "must be a layer index or a list of non-negative indices")
            object.__setattr__(self, "layers_to_transform", ltt if isinstance(ltt, int) else list(ltt))
            if isinstance(self.target_modules, str):
                _fail("layers_to_transform", ltt,
                      "it only works with a list target_modules, not a regex string (as in peft); "
                      "put the layer numbers into the regex instead")
        if pattern is not None:
            if ltt is None:
                _fail("layers_pattern", pattern, "it only has a meaning together with layers_to_transform")
            items = [pattern] if isinstance(pattern, str) else pattern
            if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) for p in items):
                _fail("layers_pattern", pattern, "must be a module-name pattern or a list of them, e.g. 'layers'")

    # ----------------------------------------------------------------- derived values
    def scaling_for(self, r: int, alpha: float) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def replace(self, **changes: Any) -> "LoraConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------- peft's JSON
    def to_dict(self) -> dict[str, Any]:
        """peft's ``adapter_config.json`` fields (``"peft_type": "LORA"``), JSON-ready."""
        out: dict[str, Any] = {"peft_type": "LORA"}
        out.update(_PEFT_FEATURES_OFF)
        out.update(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                value = getattr(self, f.name)
                out[f.name] = dict(value) if isinstance(value, dict) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LoraConfig":
        """Build from peft's ``adapter_config.json`` fields.

        Raises:
            ValueError: for a non-LoRA ``peft_type``, or a peft feature minilora does not
                implement switched on (e.g. ``use_dora=True``): loading it would silently give
                another model than peft builds.
        """
        data = dict(data)
        peft_type = data.get("peft_type", "LORA")
        if peft_type not in ("LORA", None):
            raise ValueError(f"adapter config has peft_type={peft_type!r}; minilora reads only 'LORA' adapters")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in names}
        extra: dict[str, Any] = {}
        unknown = []
        for key, value in data.items():
            if key in names:
                continue
            if key in _PEFT_FEATURES_OFF:
                if value != _PEFT_FEATURES_OFF[key] and not (value in (None, {}, []) and
                                                             _PEFT_FEATURES_OFF[key] in (None, {}, [])):
                    raise ValueError(
                        f"adapter config sets {key}={value!r}, a peft feature minilora does not implement; "
                        f"only {key}={_PEFT_FEATURES_OFF[key]!r} can be loaded")
                if value != _PEFT_FEATURES_OFF[key]:
                    extra[key] = value
            elif key in _PEFT_PASSTHROUGH:
                extra[key] = value
            else:
                unknown.append(key)
                extra[key] = value
        if unknown:
            warnings.warn(f"adapter config has fields minilora does not know: {sorted(unknown)}; they are "
                          "kept unchanged for saving but have no effect", stacklevel=2)
        return cls(**kwargs, extra=extra)
