"""Gradient checkpointing: checkpointed runs give the non-checkpointed gradients, frozen embedding
included (peft #137: reentrant checkpointing needs the block input to require grad)."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import minilora
import tiny_models
from minilora.inject import lora_state
from minilora.training import require_input_grads

pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning",
                                        "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def _llama(dropout: float = 0.1, **fields) -> nn.Module:
    model = tiny_models.build("llama")
    minilora.inject(model, targets=tiny_models.LLAMA_TARGETS, r=4, lora_alpha=8, lora_dropout=dropout,
                    init_lora_weights=False, **fields)
    return model.train()


def _grads(model: nn.Module, **inputs) -> dict[str, torch.Tensor | None]:
    torch.manual_seed(11)  # same dropout masks in every run (checkpointing replays the RNG state)
    output = model(**inputs)
    loss = output.loss if hasattr(output, "loss") else output.square().mean()
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_grads(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    missing = [n for n, g in got.items() if g is None]
    assert not missing, f"no gradient reached {missing[:3]}"
    # Recomputation replays the same kernels on the same values: bit-identical as measured on
    # every CPU tried; the bound leaves room for gradients accumulated in another order (a few
    # float32 roundings, u = 6e-8, of O(1) values), three orders under a wrong or missing gradient.
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


IDS = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference():
    return _grads(_llama(), input_ids=IDS, labels=IDS)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_transformers_checkpointing_gives_the_same_gradients(reference, use_reentrant):
    model = _llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert model.is_gradient_checkpointing
    _assert_same_grads(_grads(model, input_ids=IDS, labels=IDS), reference)


def test_minilora_hook_alone_makes_reentrant_checkpointing_work(reference):
    # transformers adds its own input-grad hook; take it away: minilora's suffices.
    model = _llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.disable_input_require_grads()
    _assert_same_grads(_grads(model, input_ids=IDS, labels=IDS), reference)
    # Without either hook the adapters inside the checkpointed blocks get no gradient at all:
    # this is the silent failure the hook exists for (and what makes the test above meaningful).
    lora_state(model).input_grad_hook.remove()
    # (here the frozen lm_head then leaves backward nothing at all to do).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "None of the inputs have requires_grad=True"
        with pytest.raises(RuntimeError, match="does not require grad"):
            _grads(model, input_ids=IDS, labels=IDS)


def test_matches_peft_gradients_with_checkpointing():
    peft = pytest.importorskip("peft")
    # float64: two implementations may sum in different orders, which in float32 moves the
    # gradients by an amount that depends on the CPU; in float64 by ~1e-16 of their scale.
    ours = _llama(dropout=0.0).double()
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    theirs = peft.get_peft_model(tiny_models.build("llama").double(), peft.LoraConfig(
        target_modules=tiny_models.LLAMA_TARGETS, r=4, lora_alpha=8, init_lora_weights=False)).train()
    tiny_models.copy_to_peft(ours, theirs)
    theirs.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    got = _grads(ours, input_ids=IDS, labels=IDS)
    _grads(theirs, input_ids=IDS, labels=IDS)
    want = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert len(got) == len(want) == 2 * 2 * len(tiny_models.LLAMA_TARGETS)
    # Sums of n <= 48 terms through 2 layers: ~n·u·depth ~ 1e-14 of the largest gradient (the
    # loss itself is float32 in transformers, but on logits that agree to 1e-16 it rounds alike).
    scale = max(g.abs().max().item() for g in want.values())
    for name, grad in got.items():
        module, _, factor = name.rpartition(".adapters.default.")
        torch.testing.assert_close(grad, want[f"base_model.model.{module}.{factor}.default.weight"],
                                   rtol=0, atol=1e-10 * scale)


@pytest.mark.parametrize("fields", [{"modules_to_save": ["embed_tokens"]}, {"targets": ["embed_tokens", "q_proj"]}],
                         ids=["embedding-trained", "embedding-lora"])
def test_trainable_embedding_with_checkpointing(fields):
    fields = dict(fields)
    targets = fields.pop("targets", tiny_models.LLAMA_TARGETS)
    reference = _grads(_llama_with(targets, fields), input_ids=IDS, labels=IDS)
    model = _llama_with(targets, fields)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.disable_input_require_grads()
    _assert_same_grads(_grads(model, input_ids=IDS, labels=IDS), reference)


def _llama_with(targets, fields):
    model = tiny_models.build("llama")
    minilora.inject(model, targets=targets, r=4, lora_alpha=8, init_lora_weights=False, **fields)
    return model.train()


# ---------------------------------------------------------------- torch.utils.checkpoint by hand
class Blocks(nn.Module):
    """Embedding -> two checkpointed Linear+tanh blocks -> head; no get_input_embeddings."""

    def __init__(self, mode: str | None):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2))
        self.head = nn.Linear(8, 3)
        self.mode = mode  # None: no checkpointing; "reentrant" / "non-reentrant"

    def forward(self, ids):
        h = self.emb(ids)
        for block in self.blocks:
            h = block(h) if self.mode is None else checkpoint(block, h, use_reentrant=self.mode == "reentrant")
        return self.head(h)


class BlocksWithEmbeddings(Blocks):
    def get_input_embeddings(self):
        return self.emb


def _blocks(cls, mode):
    model = cls(mode)
    minilora.inject(model, targets=["blocks.0.0", "blocks.1.0"], r=2, init_lora_weights=False, lora_dropout=0.2)
    return model.train()


TOKENS = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_torch_checkpoint_model_with_input_embeddings(mode):
    reference = _grads(_blocks(BlocksWithEmbeddings, None), ids=TOKENS)
    _assert_same_grads(_grads(_blocks(BlocksWithEmbeddings, mode), ids=TOKENS), reference)


def test_torch_checkpoint_model_without_input_embeddings_needs_require_input_grads():
    reference = _grads(_blocks(Blocks, None), ids=TOKENS)
    model = _blocks(Blocks, "reentrant")
    assert lora_state(model).input_grad_hook is None  # nothing to hook automatically
    # The head is frozen and nothing before it requires grad: backward has nothing to do.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(RuntimeError, match="does not require grad"):
            _grads(model, ids=TOKENS)
    handle = require_input_grads(model.emb)
    _assert_same_grads(_grads(model, ids=TOKENS), reference)
    handle.remove()
    assert not model.emb._forward_hooks


# ---------------------------------------------------------------- the hook's life cycle
def test_hook_only_in_training_with_grad_and_values_unchanged():
    model = _llama(dropout=0.0)
    embedding = model.get_input_embeddings()
    outputs = []
    embedding.register_forward_hook(lambda m, a, out: outputs.append(out))
    model(input_ids=IDS)
    with torch.no_grad():
        model(input_ids=IDS)
    model.eval()
    model(input_ids=IDS)
    assert [o.requires_grad for o in outputs] == [True, False, False]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_hook_follows_the_embedding_and_unload_removes_it():
    model = _llama(dropout=0.0)
    first = model.get_input_embeddings()
    assert len(first._forward_hooks) == 1
    # A second adapter that wraps the embedding moves the hook onto the wrapper (one hook in all).
    minilora.inject(model, targets=["q_proj"], adapter_name="other", modules_to_save=["embed_tokens"])
    wrapper = model.get_input_embeddings()
    assert wrapper is not first and len(wrapper._forward_hooks) == 1 and not first._forward_hooks
    minilora.unload(model)
    assert not model.get_input_embeddings()._forward_hooks and not first._forward_hooks


def test_model_whose_get_input_embeddings_raises_is_injected_without_hook():
    # transformers' PreTrainedModel.get_input_embeddings raises NotImplementedError for models
    # without token embeddings; inject must not fail on them.
    class NoEmbeddings(Blocks):
        def get_input_embeddings(self):
            raise NotImplementedError("no input embeddings")

    model = _blocks(NoEmbeddings, None)
    assert lora_state(model).input_grad_hook is None
    assert minilora.adapted_modules(model) == ["blocks.0.0", "blocks.1.0"]


def test_require_input_grads_rejects_a_non_module():
    with pytest.raises(TypeError, match="needs an nn.Module.*got str"):
        require_input_grads("emb")


@settings(max_examples=12, deadline=None)
@given(r=st.integers(1, 4), dropout=st.sampled_from([0.0, 0.3]), mode=st.sampled_from(["reentrant", "non-reentrant"]),
       batch=st.integers(1, 3), seq=st.integers(1, 6), use_rslora=st.booleans())
def test_checkpointed_gradients_equal_plain_ones_property(r, dropout, mode, batch, seq, use_rslora):
    def build(checkpointing):
        model = BlocksWithEmbeddings(checkpointing)
        minilora.inject(model, targets=["blocks.0.0", "blocks.1.0", "head"], r=r, lora_alpha=3,
                        lora_dropout=dropout, use_rslora=use_rslora, init_lora_weights=False)
        return model.train()

    ids = torch.randint(0, 20, (batch, seq), generator=torch.Generator().manual_seed(batch * 7 + seq))
    _assert_same_grads(_grads(build(mode), ids=ids), _grads(build(None), ids=ids))
