"""LoraConfig: peft's field names and meanings, frozen and validated on construction."""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn, Union

from minilora.matching import matches_name, pattern_key
from minilora.patterns import PatternError, compile_pattern

__all__ = ["LoraConfig", "INIT_SCHEMES", "pissa_iterations", "decomposes", "BIAS_MODES", "RANK_LIMIT",
           "ALPHA_LIMIT"]

#: Accepted ``init_lora_weights`` values (``True`` is peft's kaiming-uniform default), and
#: ``"pissa_niter_<n>"``: PiSSA from a randomized SVD with n subspace iterations.
INIT_SCHEMES = ("gaussian", True, False, "pissa", "olora", "orthogonal")
# peft takes any count; four digits bound the time a config from a file can ask for.
_PISSA_NITER = re.compile(r"pissa_niter_([0-9]{1,4})")


def pissa_iterations(init: Any) -> int | None:
    """The n of ``init_lora_weights="pissa_niter_<n>"``, else None."""
    match = _PISSA_NITER.fullmatch(init) if isinstance(init, str) else None
    return int(match.group(1)) if match else None


def decomposes(init: Any) -> bool:
    """Whether ``init_lora_weights`` takes the factors from the base weight and leaves the
    residual in it: pissa, pissa_niter_<n>, olora."""
    return (isinstance(init, str) and init in ("pissa", "olora")) or pissa_iterations(init) is not None
BIAS_MODES = ("none", "all", "lora_only")
TASK_TYPES = (None, "SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS",
              "FEATURE_EXTRACTION")

#: The largest rank accepted: no released model has a layer with both dimensions near 65536, so a
#: larger value is a typo (or a hostile file) that would fail later inside torch, unexplained.
RANK_LIMIT = 1 << 16
#: The largest lora_alpha accepted. Recipes use r to 2r; the bound keeps scaling·B·A far from
#: fp32/bf16 overflow for factors of ordinary size.
ALPHA_LIMIT = 1e6

Targets = Union[list[str], str, None]

# The peft feature fields above (see the class), and the bookkeeping ones with their types.
_FEATURES_OFF = ("use_qalora", "loftq_config", "megatron_config", "layer_replication",
                 "eva_config", "corda_config", "lora_ga_config", "velora_config",
                 "alora_invocation_tokens", "monteclora_config", "use_bdlora",
                 "arrow_config", "kasa_config")
_BOOKKEEPING: dict[str, tuple[type, ...]] = {
    "auto_mapping": (dict, type(None)), "peft_version": (str, type(None)), "revision": (str, type(None)),
    "megatron_core": (str, type(None)), "qalora_group_size": (int,), "ensure_weight_tying": (bool,),
}
_NOT_WRITTEN = ("runtime_config",)  # as peft's to_dict: runtime options never go to a file
_EMPTY = (None, {}, [])


def _fail(name: str, value: Any, allowed: str) -> NoReturn:
    shown = repr(value)
    shown = shown if len(shown) <= 200 else shown[:200] + "..."  # a file may hold a huge value
    raise ValueError(f"LoraConfig.{name}={shown} is invalid: {allowed}")


def _is_off(value: Any, off: Any) -> bool:
    """Whether a peft feature field's value means "off": its default, or any empty value where
    the default is empty (peft writes both ``null`` and ``{}``). Booleans must be booleans."""
    if isinstance(off, bool):
        return value is off
    return value == off or (off in _EMPTY and any(value == e and type(value) is type(e) for e in _EMPTY))


def _alpha_ok(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= ALPHA_LIMIT


def _rank_ok(value: Any) -> bool:  # an integral float (4.0) is read as the int it names
    return _alpha_ok(value) and float(value).is_integer() and value <= RANK_LIMIT


def _check_pattern(name: str, value: Any, pattern: str, what: str) -> None:
    """``pattern`` (``value`` itself or a part of it) must compile as a regular expression."""
    try:
        compile_pattern(pattern)
    except PatternError as err:
        _fail(name, value, f"{what}, and {err}")


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

    Attributes:
        r: rank of the update B·A (A: (r, in), B: (out, r)).
        lora_alpha: scale numerator; the update is multiplied by lora_alpha / r
            (lora_alpha / sqrt(r) with ``use_rslora``).
        lora_dropout: dropout probability on the LoRA branch's input (never on the base path).
        target_modules: list of names (exact, or suffix on a dot boundary), a regex string
            (``re.fullmatch`` on the full name), or ``"all-linear"``.
        exclude_modules: names or regex never adapted.
        target_parameters: parameter names (``"experts.gate_up_proj"``: exact, or suffix on a
            dot boundary of ``<module>.<parameter>``) to adapt directly, e.g. the 3-D expert stacks
            of MoE models, where each expert gets its own rank-r pair; no dropout, fan_in_fan_out,
            lora_bias, DoRA or pissa/olora there. With these, ``target_modules`` may be ``[]`` or
            None (no module).
        modules_to_save: modules trained in full (a trainable copy per adapter), e.g.
            ``["lm_head", "embed_tokens"]`` or a classifier head.
        bias: ``"none"``, ``"all"`` (every ``*.bias`` trains) or ``"lora_only"`` (biases of
            adapted layers).
        use_rslora: rank-stabilised scaling lora_alpha / sqrt(r).
        init_lora_weights: ``"gaussian"`` (A ~ N(0, 1/r²), B = 0), ``True`` (A kaiming-uniform,
            B = 0; peft's default), ``False`` (both random: not a no-op), ``"pissa"``,
            ``"pissa_niter_<n>"``, ``"olora"`` (factors from the base weight's SVD, randomized SVD
            with n subspace iterations, or QR; the base keeps the residual), ``"orthogonal"`` (A
            and B random from orthogonal halves of one random basis, so BA = 0; even r; Linear,
            Conv1D and Embedding layers).
        layers_to_transform: layer index or indices to adapt (list targets only).
        layers_pattern: the name before the layer index, e.g. ``"layers"`` or ``"h"``.
        rank_pattern: ``{name regex: r}`` overrides per module (first match wins).
        alpha_pattern: ``{name regex: alpha}`` overrides per module.
        fan_in_fan_out: the base weight is stored (in, out) — transformers' Conv1D; detected
            and corrected automatically, with a warning.
        lora_bias: a trainable bias on B (peft's ``lora_bias``).
        use_dora: DoRA (weight-decomposed LoRA): a trainable magnitude per output rescales the
            adapted weight's direction, (m / ‖W + sBA‖) ⊙ (W + sBA); see docs/guide.md.
        trainable_token_indices: token ids whose embedding rows train (k rows, not the whole
            matrix): a list for the model's input embedding, or ``{module name: [ids]}``; a head
            sharing the embedding's weight (tied) follows the same rows. See docs/guide.md.
        task_type: peft's task type; ``"SEQ_CLS"`` also trains ``classifier``/``score`` heads
            and keeps "all-linear" off them.
        inference_mode: adapters are frozen after inject/load.
        base_model_name_or_path: written into adapter_config.json.
        use_qalora, loftq_config, eva_config, ...: every
            other field of ``peft.LoraConfig``, for features minilora does not implement; accepted
            at the value that switches the feature off (a no-op), refused (ValueError) otherwise.
        peft_type, peft_version, revision, auto_mapping, ...: peft's bookkeeping; kept for the
            round trip, no effect.
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
    target_parameters: list[str] | None = None
    use_dora: bool = False
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    # peft's fields for features minilora does not implement, at their "off" value (see the docstring).
    use_qalora: bool = False
    loftq_config: dict[str, Any] = field(default_factory=dict)
    megatron_config: dict[str, Any] | None = None
    layer_replication: list[Any] | None = None
    eva_config: Any = None
    corda_config: Any = None
    lora_ga_config: Any = None
    velora_config: Any = None
    alora_invocation_tokens: Any = None
    monteclora_config: Any = None
    use_bdlora: Any = None
    arrow_config: Any = None
    kasa_config: Any = None
    # peft's bookkeeping fields: no effect on the model, kept as given for the round trip.
    # (compare=False: two configs that build the same model are equal.)
    peft_type: str = field(default="LORA", compare=False)
    auto_mapping: dict[str, Any] | None = field(default=None, compare=False)
    peft_version: str | None = field(default=None, compare=False)
    revision: str | None = field(default=None, compare=False)
    megatron_core: str | None = field(default="megatron.core", compare=False)
    qalora_group_size: int = field(default=16, compare=False)
    ensure_weight_tying: bool = field(default=False, compare=False)
    runtime_config: Any = field(default=None, compare=False)  # runtime-only; peft never writes it
    #: fields of newer peft versions that minilora does not know, kept only so that
    #: ``to_dict(from_dict(d)) == d``; never read by minilora.
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        # Bounded, so a hostile or mistyped file fails here rather than deep inside torch.
        if isinstance(self.r, bool) or not isinstance(self.r, int) or not 0 < self.r <= RANK_LIMIT:
            _fail("r", self.r, f"the rank must be an integer from 1 to {RANK_LIMIT}, e.g. 8 or 16")
        if not _alpha_ok(self.lora_alpha):
            _fail("lora_alpha", self.lora_alpha, f"must be a number in (0, {ALPHA_LIMIT:g}], e.g. 16 or 32")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) \
                or not 0.0 <= self.lora_dropout < 1.0:
            _fail("lora_dropout", self.lora_dropout, "must be a probability in [0, 1)")
        for name in ("target_modules", "exclude_modules"):
            value = _as_name_list(name, getattr(self, name))
            set_(name, value)
            if isinstance(value, str) and value.lower() != "all-linear":
                _check_pattern(name, value, value, "a string is a regular expression")
        self._validate_parameters()
        if self.target_modules == [] and not self.target_parameters:
            _fail("target_modules", [], "name at least one module, give a regex, or 'all-linear' (or name "
                                        "parameters in target_parameters)")
        mts = self.modules_to_save
        if mts is not None:
            mts = _as_name_list("modules_to_save", mts)
            if isinstance(mts, str):
                _fail("modules_to_save", mts, "must be a list of module names, e.g. ['lm_head']")
            for entry in mts:  # peft splices each entry into a regular expression
                _check_pattern("modules_to_save", mts, entry, "each entry is used as a regular expression")
            set_("modules_to_save", mts)
        if self.bias not in BIAS_MODES:
            _fail("bias", self.bias, f"allowed values are {BIAS_MODES}")
        init = self.init_lora_weights
        if not any(init is s if isinstance(s, bool) else init == s for s in INIT_SCHEMES) \
                and pissa_iterations(init) is None:
            _fail("init_lora_weights", init, f"allowed values are {INIT_SCHEMES}, or 'pissa_niter_<n>' (n subspace "
                                             "iterations, up to 9999)")
        self._validate_layers()
        self._validate_tokens()
        for name, ok, kind in (("rank_pattern", _rank_ok, f"an integer rank from 1 to {RANK_LIMIT}"),
                               ("alpha_pattern", _alpha_ok, f"an alpha in (0, {ALPHA_LIMIT:g}]")):
            pattern = getattr(self, name)
            if not isinstance(pattern, Mapping):
                _fail(name, pattern, "must be a dict mapping a module-name pattern to a value")
            for key, value in pattern.items():
                if not isinstance(key, str) or not ok(value):
                    _fail(name, {key: value}, f"each key is a module-name pattern and each value {kind}")
                _check_pattern(name, key, key, "keys are regular expressions")
            set_(name, {k: int(v) if ok is _rank_ok else v for k, v in pattern.items()})
        for name in ("use_rslora", "fan_in_fan_out", "lora_bias", "inference_mode", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be True or False")
        if self.use_dora and self.lora_bias:  # as peft: DoRA's norm has no place for a bias on B
            _fail("lora_bias", self.lora_bias, "lora_bias=True does not work with use_dora=True (as in peft); "
                                               "set one of them to False")
        task = self.task_type.value if hasattr(self.task_type, "value") else self.task_type
        if task not in TASK_TYPES:
            _fail("task_type", self.task_type, f"allowed values are {TASK_TYPES}")
        set_("task_type", task)
        self._validate_peft_fields()

    def _validate_parameters(self) -> None:
        value = self.target_parameters
        if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset, type(None))):
            _fail("target_parameters", value, "must be a list of parameter names, e.g. ['experts.gate_up_proj', "
                                              "'experts.down_proj'] (a regex string is not supported, as in peft)")
        value = _as_name_list("target_parameters", value)
        object.__setattr__(self, "target_parameters", value)
        if not value:
            return
        # A parameter's LoRA changes the weight the module's forward reads: there is no branch input
        # to drop out, no layout flag to honour, no bias slot and no per-output norm (as in peft).
        # peft runs pissa/olora/orthogonal on a parameter only where it is a module's 2-D ``weight``
        # (its code reads ``base_layer.weight``); here they are refused on every parameter.
        for name, on, peft, why in (
                ("lora_dropout", self.lora_dropout != 0, True,
                 "dropout needs a separate LoRA branch input; set it to 0"),
                ("fan_in_fan_out", self.fan_in_fan_out, True, "the layout is read from the parameter; set it to False"),
                ("lora_bias", self.lora_bias, True, "a parameter has no bias to pair with B; set it to False"),
                ("use_dora", self.use_dora, True, "DoRA is not defined on parameters; set it to False"),
                ("init_lora_weights", decomposes(self.init_lora_weights) or self.init_lora_weights == "orthogonal",
                 False, "pissa/olora decompose a module's weight and orthogonal splits one rank's basis, which an "
                        "expert stack's factors do not have; use True, False or 'gaussian'")):
            if on:
                _fail(name, getattr(self, name), f"it does not work with target_parameters{' (as in peft)' * peft}: "
                                                 f"{why}, "
                                                 "or adapt those layers through target_modules")

    def _validate_peft_fields(self) -> None:
        for name in _FEATURES_OFF:
            value, off = getattr(self, name), _DEFAULTS[name]
            if not _is_off(value, off):
                _fail(name, value, f"{name} switches on a peft feature minilora does not implement; only "
                                   f"{name}={off!r} (off) is accepted")
        peft_type = getattr(self.peft_type, "value", self.peft_type) or "LORA"  # peft's enum, or unset
        if peft_type != "LORA":
            _fail("peft_type", self.peft_type, "minilora builds only LoRA adapters (peft_type 'LORA')")
        object.__setattr__(self, "peft_type", peft_type)
        for name, types in _BOOKKEEPING.items():
            value = getattr(self, name)
            if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
                _fail(name, value, f"expected {' or '.join(t.__name__ for t in types)}")

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
            for item in items:  # peft splices it into a regular expression
                _check_pattern("layers_pattern", pattern, item, "it is used as a regular expression")

    def _validate_tokens(self) -> None:
        value = self.trainable_token_indices
        if value is None or _is_off(value, None):
            return  # (peft writes null; an empty list or dict trains nothing either)
        form = "a list of token ids, e.g. [32000, 32001], or {module name: [token ids]}, e.g. {'embed_tokens': [32000]}"

        def ids(part: Any) -> list[int]:
            if not isinstance(part, (list, tuple)) or not part or \
                    not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in part):
                _fail("trainable_token_indices", value, f"expected {form}, each list non-empty and of "
                                                        "non-negative integers")
            if len(set(part)) != len(part):
                twice = sorted({i for i in part if list(part).count(i) > 1})
                _fail("trainable_token_indices", value, f"token ids {twice} are listed twice; give each id once")
            return list(part)

        if isinstance(value, Mapping):
            if not all(isinstance(k, str) and k for k in value):
                _fail("trainable_token_indices", value, f"expected {form}; the keys are module names")
            object.__setattr__(self, "trainable_token_indices", {k: ids(v) for k, v in value.items()})
        else:
            object.__setattr__(self, "trainable_token_indices", ids(value))

    # ----------------------------------------------------------------- derived values
    def scaling_for(self, r: int, alpha: float) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """(rank, alpha) of one module: the first ``rank_pattern`` / ``alpha_pattern`` key matching
        ``module_name`` as ``(.*\\.)?(key)$`` (peft's lookup), else ``r`` / ``lora_alpha``. Its
        scaling is ``scaling_for(rank, alpha)``."""
        key_r, key_a = pattern_key(self.rank_pattern, module_name), pattern_key(self.alpha_pattern, module_name)
        return (self.rank_pattern[key_r] if key_r is not None else self.r,
                self.alpha_pattern[key_a] if key_a is not None else self.lora_alpha)

    def token_indices_for(self, module_name: str) -> list[int] | None:
        """The token ids ``trainable_token_indices`` gives ``module_name``: the dict entry naming
        it (exact, or a suffix on a dot boundary), or the list itself (which names the model's
        input embedding: the caller knows whether ``module_name`` is that); None otherwise."""
        value = self.trainable_token_indices
        if not value:
            return None
        if isinstance(value, list):
            return value
        return next((ids for key, ids in value.items() if matches_name(module_name, [key])), None)

    def replace(self, **changes: Any) -> "LoraConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------- peft's JSON
    def to_dict(self) -> dict[str, Any]:
        """peft's ``adapter_config.json`` fields (``"peft_type": "LORA"``), JSON-ready."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name != "extra" and f.name not in _NOT_WRITTEN:
                value = getattr(self, f.name)
                out[f.name] = dict(value) if isinstance(value, dict) else value
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LoraConfig":
        """Build from peft's ``adapter_config.json`` fields (the same validation as the constructor).

        Fields minilora does not know (a newer peft's) are kept in ``extra`` for saving, with a warning.

        Raises:
            ValueError: for a non-LoRA ``peft_type``, or a peft feature minilora does not
                implement switched on (e.g. ``use_qalora=True``): loading it would silently give
                another model than peft builds.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"LoraConfig.from_dict needs a dict of peft's LoraConfig fields, got a "
                             f"{type(data).__name__}")
        data = dict(data)
        peft_type = getattr(data.get("peft_type"), "value", data.get("peft_type"))
        if peft_type not in ("LORA", None):
            raise ValueError(f"adapter config has peft_type={peft_type!r}; minilora reads only 'LORA' adapters")
        data.pop("peft_type", None)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(k for k in data if k not in names)
        if unknown:
            warnings.warn(f"adapter config has fields minilora does not know: {unknown}; they are "
                          "kept unchanged for saving but have no effect", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in names}, extra={k: data[k] for k in unknown})


_DEFAULTS = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
             for f in dataclasses.fields(LoraConfig)}
