"""trainable_token_indices against peft on the same weights, and its memory, merge and file format.

Each case injects one config into ``minilora.inject`` and ``peft.get_peft_model`` over copies of
one tiny model; our LoRA factors and token rows (made random, so the adapter is not a no-op) are
copied into peft's model. Models: Llama with an untied head, Llama with
``tie_word_embeddings=True`` and GPT-2 (tied), in float64 and bf16.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import minilora
from minilora.config import LoraConfig
from minilora.trainable_tokens import TrainableTokens, token_hosts
from tiny_models import assert_unchanged, build, copy_to_peft, snapshot

peft = pytest.importorskip("peft")

IDS = [3, 5, 17, 40]
# (model kind, model overrides, LoraConfig fields)
CASES = {
    "llama-list": ("llama", {}, dict(target_modules=["q_proj", "v_proj"], trainable_token_indices=IDS)),
    "llama-dict-head": ("llama", {}, dict(target_modules=["q_proj", "v_proj"],
                                          trainable_token_indices={"embed_tokens": IDS, "lm_head": [1, 40, 7]})),
    "llama-tied-list": ("llama", {"tie_word_embeddings": True},
                        dict(target_modules=["q_proj", "down_proj"], trainable_token_indices=IDS)),
    "llama-tied-dict": ("llama", {"tie_word_embeddings": True},
                        dict(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": IDS})),
    "gpt2-tied": ("gpt2", {}, dict(target_modules=["c_attn"], fan_in_fan_out=True, trainable_token_indices=IDS)),
}

# float64: the two libraries compute the same sums in possibly different orders (peft's head
# multiplies by the whole patched weight, ours by the base weight and the k trained rows apart);
# as argued in test_equivalence_peft.py (n·u·Σ|terms| with n <= 48, two layers, u = 2^-53) the
# gap is below 1e-12 relative; a real difference (rows not applied, applied to the wrong ids, a
# head not following a tied embedding) moves outputs by the order of the rows' change, which
# every case checks is > 1e-2. FP64_TOL sits far from both.
FP64_TOL = 1e-9
# bf16: both run the bf16 base identically and round the fp32 rows to bf16 before use (as the
# merged weight holds them); their results may differ where one rounding of an output to bf16
# (spacing <= 2^-7 relative) falls differently, carried through two layers: at most a few
# spacings, as argued in test_dora_peft.py (4·2^-7 of max|y|; gradients one more rounding per
# layer and direction: twice that). The rows' effect is checked to exceed twice the bound.
BF16_TOL = 4 * 2.0 ** -7
# Lockstep steps in bf16: after a step the fp32 rows and factors of the two differ by lr times
# the gradient gap, and rounding them to bf16 for the next forward can flip one spacing of a row
# value (measured: logits 1.1% apart after one step of llama-dict-head, one 2^-7 spacing); each
# step can add up to one more bound, so step s is held to (s + 1) times the step-0 bound. The
# float64 runs hold every step to FP64_TOL.
TOL = {torch.float64: FP64_TOL, torch.bfloat16: BF16_TOL}
GRAD_TOL = {torch.float64: FP64_TOL, torch.bfloat16: 2 * BF16_TOL}
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def inputs_for(model) -> torch.Tensor:
    """Ids that hold every trained id (some twice) and others."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=g)
    ids[0, :4] = torch.tensor(IDS)
    ids[1, 1], ids[1, 5] = IDS[0], IDS[2]
    return ids


def peft_module(pm, name: str):
    return pm.base_model.model.get_submodule(name)


def randomize_tokens(model, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, host in token_hosts(model):
            if host.follows is None:
                for rows in host.tokens.values():
                    rows.delta.add_(torch.randn(rows.delta.shape, generator=g, dtype=torch.float64).to(rows.delta.dtype))


def build_pair(case: str, dtype: torch.dtype):
    """(base, ours, peft model), with identical random LoRA factors and token rows."""
    kind, overrides, fields = CASES[case]
    base = build(kind, **overrides).to(dtype)
    ours = minilora.inject(copy.deepcopy(base), LoraConfig(**fields, r=4, init_lora_weights=False))
    randomize_tokens(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fields, r=4, init_lora_weights=False))
    copy_to_peft(ours, pm)
    with torch.no_grad():
        for name, host in token_hosts(ours):
            if host.follows is None:
                peft_module(pm, name).token_adapter.trainable_tokens_delta["default"].copy_(host.tokens["default"].delta)
    return base, ours, pm


def peft_name(name: str) -> str:
    """Our trainable parameter's name -> peft's."""
    module, _, rest = name.partition(".adapters.")
    if rest:
        adapter, _, factor = rest.partition(".")
        return f"base_model.model.{module}.{factor}.{adapter}.weight"
    module, _, rest = name.partition(".tokens.")
    return f"base_model.model.{module}.token_adapter.trainable_tokens_delta.{rest.partition('.')[0]}"


def trainable_pairs(ours, pm) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    theirs = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    mine = {peft_name(n): (n, p) for n, p in ours.named_parameters() if p.requires_grad}
    assert set(mine) == set(theirs), sorted(set(mine) ^ set(theirs))
    return [(n, p, theirs[key]) for key, (n, p) in mine.items()]


def logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids).logits


def embedding_shape(model) -> tuple[int, int]:
    return tuple(model.get_input_embeddings().weight.shape)


# ---------------------------------------------------------------- config
@pytest.mark.parametrize("value", [[3, 5], {"embed_tokens": [1]}, {"embed_tokens": [1], "lm_head": [2, 3]}])
def test_config_round_trip(value):
    config = LoraConfig(target_modules=["q_proj"], trainable_token_indices=value)
    assert LoraConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["trainable_token_indices"] == value
    peft_config = peft.LoraConfig(target_modules=["q_proj"], trainable_token_indices=value)
    assert LoraConfig.from_dict(peft_config.to_dict()).trainable_token_indices == value


@pytest.mark.parametrize("value, words", [
    ([3, True], "non-negative integers"), ([-1], "non-negative integers"), ([2, 2, 3], "[2] are listed twice"),
    ({"embed_tokens": []}, "non-empty"), ({"": [1]}, "keys are module names"), ("3,5", "a list of token ids"),
    ([1.0], "non-negative integers"),
])
def test_config_refuses_bad_indices(value, words):
    with pytest.raises(ValueError, match="trainable_token_indices") as err:
        LoraConfig(target_modules=["q_proj"], trainable_token_indices=value)
    assert words in str(err.value)


# ---------------------------------------------------------------- against peft
@DTYPES
@pytest.mark.parametrize("case", list(CASES))
def test_counts_outputs_gradients_and_steps_match_peft(case, dtype):
    base, ours, pm = build_pair(case, dtype)
    ids = inputs_for(base)
    assert minilora.trainable_parameters(ours) == tuple(pm.get_nb_trainable_parameters())
    pairs = trainable_pairs(ours, pm)
    for name, mine, theirs in pairs:  # fp32 rows and factors over a bf16 base, as peft
        assert mine.dtype == theirs.dtype == torch.promote_types(dtype, torch.float32), name
    tol = TOL[dtype]
    y_base, y_ours, y_peft = logits(base, ids), logits(ours, ids), logits(pm, ids)
    assert max_rel_err(y_ours, y_peft) <= tol
    assert max_rel_err(y_ours, y_base) > 2 * tol  # the adapter matters: a dropped term would fail
    optimizers = [torch.optim.SGD([p for _, p, _ in pairs], lr=0.1),
                  torch.optim.SGD([p for _, _, p in pairs], lr=0.1)]
    for step in range(3):
        for model, opt in zip((ours, pm), optimizers):
            opt.zero_grad()
            logits(model, ids).float().logsumexp(-1).mean().backward()
        scale = max(theirs.grad.abs().max().item() for _, _, theirs in pairs)
        grows = 1 if dtype == torch.float64 else step + 1
        for name, mine, theirs in pairs:
            assert (mine.grad - theirs.grad).abs().max().item() <= grows * GRAD_TOL[dtype] * scale, (step, name)
        for opt in optimizers:
            opt.step()
        assert max_rel_err(logits(ours, ids), logits(pm, ids)) <= (1 if dtype == torch.float64 else step + 2) * tol


def test_tied_head_follows_the_embedding_rows():
    _, ours, pm = build_pair("llama-tied-list", torch.float64)
    head, embedding = ours.lm_head, ours.model.embed_tokens
    assert isinstance(head, TrainableTokens) and head.follows is embedding
    assert head.weight is embedding.weight
    assert head.tokens["default"] is embedding.tokens["default"]
    assert [k for k in ours.state_dict() if ".tokens." in k] == ["model.embed_tokens.tokens.default.delta"]
    assert type(peft_module(pm, "lm_head")).__name__ == "TrainableTokensWrapper"  # peft ties it too


# ---------------------------------------------------------------- memory
class _Shapes(TorchDispatchMode):
    """Records the shape of every new tensor (not a view) an op produces."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:  # views: no memory
                self.shapes.add(tuple(t.shape))
        return out


@pytest.mark.parametrize("case", ["llama-list", "llama-tied-list"])
def test_trainable_state_and_gradients_are_rows_not_the_matrix(case):
    base, ours, pm = build_pair(case, torch.float32)
    full = embedding_shape(base)
    ids = inputs_for(base)
    trainable = [p for p in ours.parameters() if p.requires_grad]
    assert all(p.numel() < full[0] * full[1] for p in trainable)
    assert ours.model.embed_tokens.tokens["default"].delta.shape == (len(IDS), full[1])
    for model, expect_full in ((ours, False), (pm, True)):
        loss = logits(model, ids).logsumexp(-1).mean()
        with _Shapes() as seen:
            loss.backward()
        # peft patches a full copy of the weight and gets a full-size gradient for it; we do not.
        assert (full in seen.shapes) == expect_full, (type(model).__name__, sorted(seen.shapes))
    assert all(p.grad is None or p.grad.numel() < full[0] * full[1] for p in ours.parameters())


# ---------------------------------------------------------------- merge
def _reference_rows(host, dtype):
    """The weight with the trained rows written in, from float64 values rounded once."""
    rows = host.tokens["default"]
    return host.weight.detach().double().index_copy(0, rows.indices, rows.delta.detach().double()).to(dtype)


@DTYPES
@pytest.mark.parametrize("case", list(CASES))
def test_merge_unmerge_and_merge_and_unload_match_peft(case, dtype):
    base, ours, pm = build_pair(case, dtype)
    ids = inputs_for(base)
    before = snapshot(ours)
    y = logits(ours, ids)
    references = {name: _reference_rows(host, dtype) for name, host in token_hosts(ours) if host.follows is None}
    minilora.merge(ours, keep_original=True)
    for name, reference in references.items():  # bit-exact: each row is one rounding of the trained values
        assert torch.equal(ours.get_submodule(name).weight, reference), name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.merge_adapter()
    assert max_rel_err(logits(ours, ids), logits(pm, ids)) <= TOL[dtype]
    assert max_rel_err(logits(ours, ids), y) <= TOL[dtype]
    minilora.unmerge(ours)
    assert_unchanged(ours, before)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.unmerge_adapter()
        plain_peft = pm.merge_and_unload()
    plain = minilora.merge_and_unload(ours)
    assert not any(isinstance(m, TrainableTokens) for m in plain.modules())
    assert [type(m) for m in plain.modules()] == [type(m) for m in plain_peft.modules()]
    ours_sd, peft_sd = plain.state_dict(), plain_peft.state_dict()
    assert list(ours_sd) == list(peft_sd)
    for name, reference in references.items():
        assert torch.equal(ours_sd[name + ".weight"], reference)
        assert torch.equal(peft_sd[name + ".weight"], reference)
    assert (plain.lm_head.weight is plain.get_input_embeddings().weight) == \
        (plain_peft.lm_head.weight is plain_peft.get_input_embeddings().weight)


def test_merge_refuses_overlapping_rows_and_leaves_the_model():
    base = build("llama")
    model = minilora.inject(base, target_modules=["q_proj"], trainable_token_indices=[3, 5])
    minilora.inject(model, target_modules=["q_proj"], trainable_token_indices=[5, 6], adapter_name="other")
    before = snapshot(model)
    with pytest.raises(ValueError, match="both train token row 5"):
        minilora.merge(model, adapter_names=["default", "other"])
    assert_unchanged(model, before)


# ---------------------------------------------------------------- several adapters
def test_adapters_switch_disable_delete():
    base = build("llama", tie_word_embeddings=True)
    ids = inputs_for(base)
    model = minilora.inject(copy.deepcopy(base), target_modules=["q_proj"], trainable_token_indices=[3, 5])
    minilora.inject(model, target_modules=["v_proj"], trainable_token_indices=[5, 17], adapter_name="other")
    randomize_tokens(model)
    y_default = logits(model, ids)
    assert model.model.embed_tokens.tokens["other"].delta.requires_grad is False
    minilora.set_adapter(model, "other")
    assert model.model.embed_tokens.tokens["other"].delta.requires_grad
    y_other = logits(model, ids)
    assert max_rel_err(y_other, y_default) > 1e-2
    with pytest.raises(ValueError, match="each train token rows of 'model.embed_tokens'"):
        minilora.set_adapter(model, ["default", "other"])
    with minilora.disable_adapters(model):
        torch.testing.assert_close(logits(model, ids), logits(base, ids), rtol=0, atol=0)
    with minilora.per_sample_adapters(model, ["default", "__base__"]):
        y_rows = logits(model, ids)
    # (LoRA's per-row path adds its branch by index_add: fp32 rounding apart, hence assert_close's
    # fp32 defaults; rows applied to the wrong batch entry would differ by the rows' effect, > 1e-2.)
    torch.testing.assert_close(y_rows[0], y_default[0])
    torch.testing.assert_close(y_rows[1], logits(base, ids)[1])
    with pytest.raises(ValueError, match="trainable_token_indices"):
        minilora.add_weighted_adapter(model, ["default", "other"], [0.5, 0.5], "mix")
    minilora.delete_adapter(model, "other")
    assert list(model.lm_head.tokens) == ["default"]
    torch.testing.assert_close(logits(model, ids), y_default, rtol=0, atol=0)
    minilora.delete_adapter(model, "default")
    assert type(model.model.embed_tokens) is torch.nn.Embedding and type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert list(model.state_dict()) == list(base.state_dict())


# ---------------------------------------------------------------- files
@DTYPES
@pytest.mark.parametrize("case", list(CASES))
def test_save_and_load_both_ways_with_peft(tmp_path, case, dtype):
    from safetensors.torch import load_file
    base, ours, pm = build_pair(case, dtype)
    ids = inputs_for(base)
    minilora.save_adapter(ours, tmp_path / "ours")
    pm.save_pretrained(tmp_path / "peft")
    mine, theirs = load_file(tmp_path / "ours" / "adapter_model.safetensors"), \
        load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(mine) == sorted(theirs)
    for key in mine:
        assert mine[key].dtype == theirs[key].dtype and torch.equal(mine[key], theirs[key]), key
    assert any(k.endswith(".token_adapter.trainable_tokens_delta") for k in mine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_ours = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    from_peft = minilora.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    y = logits(ours, ids)
    torch.testing.assert_close(logits(from_ours, ids), logits(pm, ids), rtol=0, atol=0)
    assert max_rel_err(logits(from_peft, ids), y) == 0.0


def test_inject_refuses_what_it_cannot_do_and_leaves_the_model():
    base = build("llama", tie_word_embeddings=True)
    before = snapshot(base)
    bad = [
        (dict(target_modules=["q_proj"], trainable_token_indices=[64]), "out of range"),
        (dict(target_modules=["q_proj", "embed_tokens"], trainable_token_indices=[3]), "carries LoRA"),
        (dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"], trainable_token_indices=[3]),
         "modules_to_save"),
        (dict(target_modules=["q_proj", "lm_head"], trainable_token_indices=[3]), "shares its weight"),
        (dict(target_modules=["q_proj"], trainable_token_indices={"embed_token": [3]}), "closest"),
        (dict(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [3], "lm_head": [4]}),
         "share one weight"),
        (dict(target_modules=["q_proj"], trainable_token_indices={"norm": [3]}), "RMSNorm"),
    ]
    for fields, words in bad:
        with pytest.raises(ValueError, match=words):
            minilora.inject(base, **fields)
        assert_unchanged(base, before)


@pytest.mark.parametrize("change, words", [
    (dict(trainable_token_indices=None), "unexpected key"),
    (dict(trainable_token_indices=[3, 5, 6]), r"\(3, 32\)"),
    (dict(trainable_token_indices={"lm_head": [3, 5]}), "lacks 1 key"),
])
def test_load_refuses_token_rows_against_their_config_and_leaves_the_model(tmp_path, change, words):
    import json
    from safetensors.torch import load_file
    from minilora.peft_format import safetensors_bytes
    base = build("llama")
    minilora.save_adapter(minilora.inject(copy.deepcopy(base), target_modules=["q_proj"],
                                          trainable_token_indices=[3, 5]), tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    weights = tmp_path / "adapter_model.safetensors"  # without minilora's config digest, as peft's
    weights.write_bytes(safetensors_bytes(load_file(weights), {"format": "pt"}))
    before = snapshot(base)
    with pytest.raises(minilora.AdapterFileError, match=words):
        minilora.load_adapter(base, tmp_path)
    assert_unchanged(base, before)


def test_head_named_alone_in_a_tied_model_takes_the_embedding_along():
    # peft trains the head's rows alone over the shared weight (its merged model then differs from
    # the unmerged one: merging writes the rows into the embedding too); minilora keeps the pair tied.
    base = build("llama", tie_word_embeddings=True)
    ids = inputs_for(base)
    model = minilora.inject(copy.deepcopy(base), target_modules=["q_proj"], trainable_token_indices={"lm_head": IDS})
    assert model.model.embed_tokens.follows is model.lm_head
    randomize_tokens(model)
    y = logits(model, ids)
    minilora.merge(model)
    torch.testing.assert_close(logits(model, ids), y)  # (fp32: q_proj's merge rounds)
    # a later adapter naming the (now following) head alone gets rows through its owner
    minilora.unmerge(model)
    minilora.inject(model, target_modules=["q_proj"], trainable_token_indices={"lm_head": [7]}, adapter_name="b")
    assert model.model.embed_tokens.tokens["b"] is model.lm_head.tokens["b"]
