"""QLoRA: minilora over bitsandbytes' Linear4bit (nf4; fp4 with double quantization) and
Linear8bitLt, against peft on the same quantized base and the same adapter weights.

A tiny Llama (hidden 64, 2 layers, vocab 128) is saved once per session (its values rounded to
bf16, so that an fp32 and a bf16 checkpoint hold the same numbers) and loaded quantized with
transformers' BitsAndBytesConfig on the CPU, afresh for every model a test needs (bitsandbytes
parameters do not deepcopy reliably, and loading takes well under a second).

Why bit-equality is expected (and asserted) against peft: both libraries run the frozen base
through bitsandbytes' own forward and add s·B(A x), computed in the adapter dtype (fp32) and cast
to the base output's dtype, in the same order; on the same inputs the same kernels run on the
same numbers. On the CPU, bitsandbytes' 8-bit layer in training mode dequantizes its weight and
calls F.linear (``MatMul8bitFp``); in eval mode it quantizes the activations to int8 row-wise
(outlier columns above the 6.0 threshold kept in fp16) and multiplies in int32 (exact) or fp32
(exact too: |sums| <= 127·127·128 < 2**24): every step is deterministic, so 8-bit is bit-equal
as well (measured: 0 in train and eval, with and without outlier columns). A ~1e-3 difference on
8-bit logits is what a *merge* makes (the requantization of W + delta: 1.1e-3 measured), or
comparing a model in eval with one in train mode (int8 activations vs fp32: 3.6e-3), not noise.

Why merges are compared in training mode: in its first eval forward without grad,
bitsandbytes repacks a 4-bit weight for its AVX512-BF16 CPU kernel (bf16 scales, another
layout); peft then dequantizes the packed bytes as if unpacked when merging (garbage). minilora
unpacks a copy of the codes and dequantizes with the bf16 scales the packed kernel computes with
(``test_merge_after_an_eval_forward_stays_within_the_requantization_bound``), and saving never
lets bitsandbytes unpack the live weight in place
(``test_saving_or_loading_after_an_eval_forward_leaves_the_base_alone``).

Run with PYTHONSAFEPATH=1 (the repo's kernels/ folder would shadow Hugging Face's ``kernels``).
"""

from __future__ import annotations

import logging
import os
import re
import warnings

import pytest
import torch
import torch.nn as nn

import minilora
from minilora.inject import lora_layers
from minilora.modules_to_save import ModulesToSave
from tiny_models import LLAMA_TARGETS, assert_unchanged, build, copy_to_peft, snapshot

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from minilora.quantized import LoraLinear4bit, LoraLinear8bit  # noqa: E402  (needs bitsandbytes)

QUANTS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4-dq-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True,
                        bnb_4bit_compute_dtype=torch.bfloat16),
    "int8": dict(load_in_8bit=True),
}
QUANT_IDS = list(QUANTS)
LAYER_CLASS = {"nf4": LoraLinear4bit, "fp4-dq-bf16": LoraLinear4bit, "int8": LoraLinear8bit}
BNB_CLASS = {"nf4": bnb.nn.Linear4bit, "fp4-dq-bf16": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}
VOCAB = 128

# float64 comparisons on the unquantized base (see test_equivalence_peft.py, FP64_TOL: sums of
# <= 128 terms over 2 layers are off by ~1e-14 relative; a real difference is of the order of
# the adapter's effect, checked to be > 1e-2).
FP64_TOL = 1e-9


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_quiet():
    """For this module's tests only (all restored after):

    - one thread: bitsandbytes' CPU kernels (4-bit dequantize, blockwise dequantize) are OpenMP
      loops; on these tiny weights, with the cores already busy (pytest -n 2 on 2 cores), each
      call waits for its second thread: measured 17 ms instead of 0.03 ms per 64x64 dequantize,
      the whole file 83 s instead of 28 s;
    - no transformers loading bars / info logs, and no bitsandbytes "MatMul8bitLt: inputs will
      be cast from torch.float32 to float16" line on every 8-bit eval call."""
    threads = torch.get_num_threads()
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    bnb_logger = logging.getLogger("bitsandbytes")
    bnb_level = bnb_logger.level
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    bnb_logger.setLevel(logging.ERROR)
    yield
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity(verbosity)
    if bars:
        transformers.utils.logging.enable_progress_bar()
    bnb_logger.setLevel(bnb_level)


# ---------------------------------------------------------------- the tiny checkpoint
@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """{"fp32": folder, "bf16": folder}: the same tiny Llama, saved once per session."""
    root = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # bf16-exact: both checkpoints hold the same values
    folders = {"fp32": str(root / "fp32"), "bf16": str(root / "bf16")}
    model.save_pretrained(folders["fp32"])
    model.to(torch.bfloat16).save_pretrained(folders["bf16"])
    return folders


def load(folder: str, quant: str | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The tiny Llama from ``folder``, quantized as QUANTS[quant] (None: unquantized), on the CPU."""
    extra = {} if quant is None else {"quantization_config": transformers.BitsAndBytesConfig(**QUANTS[quant])}
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map="cpu", **extra)


def ids_batch(seed: int = 1, batch: int = 2, seq: int = 7) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def randomize(model: nn.Module, seed: int = 3, adapters: tuple[str, ...] | None = None) -> None:
    """Random adapter factors (A ~ 0.1·N(0,1), B ~ 0.03·N(0,1): s·B@A ~ 0.01, the size of the
    base weights, so B != 0 cannot hide a mistake and merges stay realistic) and modules_to_save
    copies moved by 0.01·N(0,1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for name, adapter in layer.adapters.items():
                if adapters is None or name in adapters:
                    adapter.lora_A.copy_(torch.randn(adapter.lora_A.shape, generator=g) * 0.1)
                    adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * 0.03)
        for m in model.modules():
            if isinstance(m, ModulesToSave):
                for name, copy_ in m.modules_to_save.items():
                    if adapters is None or name in adapters:
                        for p in copy_.parameters():
                            p.add_(torch.randn(p.shape, generator=g) * 0.01)


def pair(folder: str, quant: str, fields: dict, seed: int = 3, dtype: torch.dtype = torch.float32):
    """(ours, peft model): the same quantized base loaded twice, the same config, identical
    random adapter weights."""
    config = dict(fields)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = minilora.inject(load(folder, quant, dtype), minilora.LoraConfig(**config))
        pm = peft.get_peft_model(load(folder, quant, dtype), peft.LoraConfig(**config))
    randomize(ours, seed)
    copy_to_peft(ours, pm)
    return ours, pm


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def loss_of(out: torch.Tensor) -> torch.Tensor:
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.dtype)
    return (out * weights).sum()


def peft_lora_names(pm) -> list[str]:
    from peft.tuners.lora import LoraLayer as PeftLoraLayer
    return sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, PeftLoraLayer))


def factor_pairs(ours: nn.Module, pm, adapter: str = "default") -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, our factor, peft's factor) for every LoRA factor of ``adapter``."""
    modules = dict(pm.base_model.model.named_modules())
    out = []
    for name, layer in lora_layers(ours):
        if adapter in layer.adapters:
            ad, theirs = layer.adapters[adapter], modules[name]
            out += [(f"{name}.lora_A", ad.lora_A, theirs.lora_A[adapter].weight),
                    (f"{name}.lora_B", ad.lora_B, theirs.lora_B[adapter].weight)]
    return out


def deq(module: nn.Module) -> torch.Tensor:
    """The (out, in) fp32 weight a bitsandbytes linear computes with, straight from bitsandbytes
    (not minilora's helper); only for unpacked 4-bit weights."""
    weight = module.weight
    if isinstance(weight, bnb.nn.Params4bit):
        assert not getattr(weight.quant_state, "packing_format_for_cpu", False)
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, scb).float()


def requant_bound(module: nn.Module, wanted: torch.Tensor) -> torch.Tensor:
    """Per element: how far bitsandbytes' quantization of ``wanted`` (fp32, (out, in)) may land
    from it, from the quantization grid, for the format of ``module``'s (new) weight.

    4-bit: each block of ``blocksize`` consecutive values is divided by its absmax and rounded to
    the nearest of the 16 code values, so a value moves by at most half the largest gap between
    adjacent code values, times the block's absmax (nf4: 0.3038/2; fp4: 0.3333/2). With double
    quantization the stored absmax is itself 8-bit quantized: a code value c (|c| <= 1) then comes
    back as c·absmax' instead of c·absmax, at most |absmax' - absmax| further (absmax' read from
    the new quant state). 8-bit: each row is cast to fp16 (relative 2**-11) and rounded to
    absmax/127 steps: at most absmax/254 + |w|·2**-11. Plus 4 fp32 ulps of the scale for the
    products and casts."""
    weight = module.weight
    eps = torch.finfo(torch.float32).eps
    if isinstance(weight, bnb.nn.Params4bit):
        state = weight.quant_state
        code = bnb.functional.get_4bit_type(state.quant_type, device="cpu")
        half_gap = code.sort().values.diff().max().item() / 2
        blocks = wanted.reshape(-1, state.blocksize)
        absmax = blocks.abs().amax(dim=1, keepdim=True)
        bound = half_gap * absmax + 4 * eps * absmax
        if state.nested:
            stored = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
            bound = bound + (stored.view(-1, 1) - absmax).abs()
        return bound.expand_as(blocks).reshape(wanted.shape)
    absmax = wanted.abs().amax(dim=1, keepdim=True)
    return absmax / 254 + wanted.abs() * 2.0**-11 + 4 * eps * absmax


def quantized_model_types(model: nn.Module) -> list[tuple[str, type]]:
    return [(n, type(m)) for n, m in model.named_modules()]


# ---------------------------------------------------------------- 1. which modules, how many parameters
@pytest.mark.parametrize("quant", QUANT_IDS)
@pytest.mark.parametrize("targets", [LLAMA_TARGETS, "all-linear", ["q_proj", "v_proj"]], ids=["tutorial", "all-linear",
                                                                                            "qv"])
def test_adapted_modules_and_trainable_counts_match_peft(checkpoints, quant, targets):
    base = load(checkpoints["fp32"], quant)
    config = minilora.LoraConfig(target_modules=targets)
    planned = minilora.find_targets(base, config)
    ours = minilora.inject(base, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(load(checkpoints["fp32"], quant), peft.LoraConfig(target_modules=targets))
    names = minilora.adapted_modules(ours)
    assert planned == names
    assert sorted(names) == peft_lora_names(pm)
    expected = 14 if targets != ["q_proj", "v_proj"] else 4  # 7 linears per layer; lm_head never (unquantized)
    assert len(names) == expected and "lm_head" not in names
    for _, layer in lora_layers(ours):
        assert type(layer) is LAYER_CLASS[quant]
        assert isinstance(layer.base_layer, BNB_CLASS[quant])
    assert minilora.trainable_parameters(ours)[0] == pm.get_nb_trainable_parameters()[0]
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        f"{n}.adapters.default.lora_{f}" for n in names for f in "AB"}


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_total_parameter_count_matches_peft(checkpoints, quant):
    ours = minilora.inject(load(checkpoints["fp32"], quant), target_modules=LLAMA_TARGETS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(load(checkpoints["fp32"], quant), peft.LoraConfig(target_modules=LLAMA_TARGETS))
    assert minilora.trainable_parameters(ours) == pm.get_nb_trainable_parameters()


# ---------------------------------------------------------------- 2. outputs and gradients
@pytest.mark.parametrize("quant", QUANT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-model", "bf16-model"])
def test_outputs_and_gradients_equal_peft(checkpoints, quant, dtype):
    """bf16-model: the unquantized parts (and so each layer's input and base output) in bf16, the
    adapters in fp32: the branch is cast to bf16 before it is added (peft's order)."""
    ours, pm = pair(checkpoints["fp32"], quant, dict(target_modules=LLAMA_TARGETS), dtype=dtype)
    base = load(checkpoints["fp32"], quant, dtype).train()
    ids = ids_batch()
    ours.train()
    pm.train()
    y_ours, y_peft = logits(ours, ids), logits(pm, ids)
    assert y_ours.dtype == dtype
    assert [p.dtype for _, p, _ in factor_pairs(ours, pm)] == [p.dtype for _, _, p in factor_pairs(ours, pm)]
    assert torch.equal(y_ours, y_peft)
    with torch.no_grad():
        effect = (y_ours - logits(base, ids)).abs().max().item()
    assert effect > 1e-2, "the adapters had no effect: the comparison proves nothing"
    loss_of(y_ours).backward()
    loss_of(y_peft).backward()
    pairs = factor_pairs(ours, pm)
    assert len(pairs) == 2 * 14
    for name, mine, theirs in pairs:
        assert mine.grad is not None and mine.grad.abs().max() > 0, name
        assert torch.equal(mine.grad, theirs.grad), name
    # the frozen quantized base gets no gradient, in either library
    assert all(p.grad is None for p in ours.parameters() if not p.requires_grad)


@pytest.mark.parametrize("quant", QUANT_IDS)
def test_eval_outputs_equal_peft_also_on_the_packed_and_outlier_paths(checkpoints, quant):
    """Eval without grad: 4-bit runs bitsandbytes' repacked AVX512-BF16 kernel where the CPU has
    it, 8-bit quantizes the activations (outlier columns >= 6.0 kept in fp16). The RMSNorm gains
    are then raised to 4 (inputs of rms 4 to q/k/v and the MLP) to put outliers into the 8-bit
    layers' inputs."""
    ours, pm = pair(checkpoints["fp32"], quant, dict(target_modules="all-linear"))
    ours.eval()
    pm.eval()
    ids = ids_batch(seed=7)
    with torch.no_grad():
        for gain in (1.0, 4.0):
            for model in (ours, pm):
                for name, p in model.named_parameters():
                    if name.endswith("layernorm.weight"):
                        p.fill_(gain)
            y_ours, y_peft = logits(ours, ids), logits(pm, ids)
            assert torch.equal(y_ours, y_peft), gain
            for _ in range(2):  # and deterministic: the same bits again
                assert torch.equal(logits(ours, ids), y_ours)
    if quant == "int8":
        outliers = [layer.base_layer.state.idx for _, layer in lora_layers(ours)]
        assert any(idx is not None and idx.numel() > 0 for idx in outliers), "no outlier column was exercised"


# ---------------------------------------------------------------- 3. training in lockstep
@pytest.mark.parametrize("quant", QUANT_IDS)
def test_three_training_steps_in_lockstep_with_peft(checkpoints, quant):
    ours, pm = pair(checkpoints["fp32"], quant, dict(target_modules=LLAMA_TARGETS, lora_dropout=0.1))
    ours.train()
    pm.train()
    pairs = factor_pairs(ours, pm)
    opt_ours = torch.optim.AdamW([m for _, m, _ in pairs], lr=1e-2)
    opt_peft = torch.optim.AdamW([t for _, _, t in pairs], lr=1e-2)
    start = [m.detach().clone() for _, m, _ in pairs]
    losses = []
    ids = ids_batch(seed=10, batch=4)
    for step in range(3):
        step_losses = []
        for model, opt in ((ours, opt_ours), (pm, opt_peft)):
            torch.manual_seed(step)  # the same dropout masks: both draw them in the same order
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            step_losses.append(loss.item())
        assert step_losses[0] == step_losses[1], step
        losses.append(step_losses[0])
        for name, mine, theirs in pairs:
            assert torch.equal(mine, theirs), (step, name)
    assert all(not torch.equal(m, s) for (_, m, _), s in zip(pairs, start))  # every factor moved
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------- 4. save / load both ways
@pytest.mark.parametrize("quant", QUANT_IDS)
def test_save_load_both_ways_with_peft(checkpoints, quant, tmp_path):
    ours, pm = pair(checkpoints["fp32"], quant, dict(target_modules=LLAMA_TARGETS, r=4, lora_alpha=16))
    ids = ids_batch()
    with torch.no_grad():
        y = logits(ours.train(), ids)
        assert torch.equal(y, logits(pm.train(), ids))

    # minilora -> peft; the files hold the same keys and values as peft's own save
    minilora.save_adapter(ours, tmp_path / "ours")
    pm.save_pretrained(tmp_path / "peft")
    mine = safetensors_torch.load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = safetensors_torch.load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(mine) == sorted(theirs) and len(mine) == 2 * 14
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded_peft = peft.PeftModel.from_pretrained(load(checkpoints["fp32"], quant), tmp_path / "ours")
    # peft -> minilora
    loaded_ours = minilora.load_adapter(load(checkpoints["fp32"], quant), tmp_path / "peft")
    assert all(type(layer) is LAYER_CLASS[quant] for _, layer in lora_layers(loaded_ours))
    with torch.no_grad():
        assert torch.equal(logits(loaded_peft.train(), ids), y)
        assert torch.equal(logits(loaded_ours.train(), ids), y)
        assert torch.equal(logits(loaded_ours.eval(), ids), logits(loaded_peft.eval(), ids))


@pytest.mark.parametrize("quant", QUANT_IDS)
def test_adapter_trained_on_the_quantized_base_loads_onto_the_unquantized_one(checkpoints, quant, tmp_path):
    ours, _ = pair(checkpoints["fp32"], quant, dict(target_modules=LLAMA_TARGETS))
    minilora.save_adapter(ours, tmp_path)
    # float64 on both sides: fp32 LoRA forwards of two correct implementations differ in rounding
    mine = minilora.load_adapter(load(checkpoints["fp32"]).double(), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(load(checkpoints["fp32"]).double(), tmp_path)
    assert all(type(layer) is minilora.layers.LoraLinear for _, layer in lora_layers(mine))
    for name, layer in lora_layers(ours):  # the same factors (cast exactly from fp32)
        got = dict(lora_layers(mine))[name].adapters["default"]
        assert torch.equal(got.lora_A, layer.adapters["default"].lora_A.double())
        assert torch.equal(got.lora_B, layer.adapters["default"].lora_B.double())
    ids = ids_batch()
    with torch.no_grad():
        y_mine, y_theirs = logits(mine.eval(), ids), logits(theirs.eval(), ids)
        y_base = logits(load(checkpoints["fp32"]).double().eval(), ids)
    scale = y_theirs.abs().max().item()
    assert (y_mine - y_theirs).abs().max().item() <= FP64_TOL * scale
    assert (y_mine - y_base).abs().max().item() > 1e-2


# ---------------------------------------------------------------- 5. merging into a quantized weight
@pytest.mark.parametrize("quant", QUANT_IDS)
def test_merge_equals_peft_and_stays_within_the_requantization_bound(checkpoints, quant):
    ours, pm = pair(checkpoints["fp32"], quant, dict(target_modules=LLAMA_TARGETS))
    ours.train()
    pm.train()
    layers = list(lora_layers(ours))
    theirs = dict(pm.base_model.model.named_modules())
    # W_deq + delta, computed here from bitsandbytes' dequantization and the factors
    wanted = {}
    for name, layer in layers:
        ad = layer.adapters["default"]
        wanted[name] = deq(layer.base_layer) + ad.scaling * (ad.lora_B.detach() @ ad.lora_A.detach())
    with torch.no_grad():
        before = logits(ours, ids_batch())
        with pytest.warns(UserWarning) as record:
            minilora.merge(ours)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft warns about rounding on 8-bit
            pm.merge_adapter()
    messages = [str(w.message) for w in record if "requantizes it" in str(w.message)]
    assert len(messages) == len(layers)  # one warning per merged layer, in model order
    worst = 0.0
    for (name, layer), message in zip(layers, messages):
        got = deq(layer.base_layer)
        assert torch.equal(got, deq(theirs[name].base_layer)), name
        error = (got - wanted[name]).abs()
        assert (error <= requant_bound(layer.base_layer, wanted[name])).all(), name
        assert error.max() > 0  # a requantization, not a lossless add: the warning is due
        stated = re.search(r"max error (\S+) on weights up to (\S+)\.", message)
        assert stated, message
        assert float(stated.group(1)) == pytest.approx(error.max().item(), rel=5e-3)  # printed with 3 digits
        assert float(stated.group(2)) == pytest.approx(wanted[name].abs().max().item(), rel=5e-3)
        assert "minilora merge" in message
        worst = max(worst, error.max().item())
    with torch.no_grad():
        merged = logits(ours, ids_batch())
        assert torch.equal(merged, logits(pm, ids_batch()))
        assert not torch.equal(merged, before)  # requantized: the merged model is not the adapted one


@pytest.mark.parametrize("quant", QUANT_IDS)
def test_merge_keep_original_then_unmerge_is_exact(checkpoints, quant, request):
    ours = minilora.inject(load(checkpoints["fp32"], quant), target_modules=LLAMA_TARGETS)
    randomize(ours)
    ours.train()
    ids = ids_batch()
    with torch.no_grad():
        y0 = logits(ours, ids)  # a forward first, as in training
        state0 = {k: v.clone() for k, v in ours.state_dict().items()}
        weights0 = {name: layer.weight for name, layer in lora_layers(ours)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            minilora.merge(ours, keep_original=True)
        y_merged = logits(ours, ids)
        assert not torch.equal(y_merged, y0)
        minilora.unmerge(ours)
        for name, layer in lora_layers(ours):
            assert layer.weight is weights0[name] and not layer.merged
        state1 = ours.state_dict()
        assert list(state1) == list(state0)
        for key, value in state0.items():
            assert torch.equal(state1[key], value), key
        assert torch.equal(logits(ours, ids), y0)


@pytest.mark.parametrize("quant", QUANT_IDS)
def test_merge_and_unload_gives_plain_bitsandbytes_layers(checkpoints, quant):
    ours, pm = pair(checkpoints["fp32"], quant, dict(target_modules=LLAMA_TARGETS))
    reference = load(checkpoints["fp32"], quant)
    ours.train()
    pm.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain_ours = minilora.merge_and_unload(ours)
        plain_peft = pm.merge_and_unload()
    assert quantized_model_types(plain_ours) == quantized_model_types(reference) == quantized_model_types(plain_peft)
    assert not hasattr(plain_ours, "minilora_state") or plain_ours.minilora_state is None
    sd_ours, sd_peft = plain_ours.state_dict(), plain_peft.state_dict()
    assert list(sd_ours) == list(sd_peft) == list(reference.state_dict())
    for key in sd_ours:
        if key.endswith("quant_state.bitsandbytes__nf4") or key.endswith("quant_state.bitsandbytes__fp4"):
            continue  # a JSON blob; its meaning is compared through the dequantized weights below
        assert torch.equal(sd_ours[key], sd_peft[key]), key
    for name, module in plain_ours.named_modules():
        if isinstance(module, BNB_CLASS[quant]):
            assert torch.equal(deq(module), deq(plain_peft.get_submodule(name))), name
    with torch.no_grad():
        ids = ids_batch()
        assert torch.equal(logits(plain_ours.train(), ids), logits(plain_peft.train(), ids))
        assert torch.equal(logits(plain_ours.eval(), ids), logits(plain_peft.eval(), ids))


def _packing_loss(layer: nn.Module) -> torch.Tensor:
    """Per 4-bit block of an unpacked ``layer``: how far the scale (absmax) a block computes with
    may move when bitsandbytes repacks the weight for its CPU kernel. The packing rounds each
    absmax to bf16 (relative 2**-9), and minilora dequantizes with those scales, as the kernel
    computes. With double quantization the bound also allows for bitsandbytes' own unpacking,
    which quantizes the scales again, 8-bit blockwise with the dynamic map around their mean (at
    most half its largest gap, or its distance to -1, times max |absmax - mean|): an upper bound
    either way. A value c·absmax (|c| <= 1) moves at most as far as its scale. (bitsandbytes 0.50's
    unpacking also leaves the scales of a weight without double quantization in the packed
    (in / blocksize, out) order, which minilora does not use: down_proj, 128 > 64 inputs, checks it.)"""
    state = layer.weight.quant_state
    if state.nested:
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    else:
        absmax = state.absmax.float()
    loss = absmax * 2.0**-9
    if state.nested:
        code = bnb.functional.create_dynamic_map(signed=True)
        step = max(code.sort().values.diff().max().item() / 2, 1 + code.min().item())
        rounded = absmax.to(torch.bfloat16).float()
        loss = loss + step * (rounded - rounded.mean()).abs().max() * (1 + 2.0**-8)
    return loss.view(-1, 1)


PACKS = bool(bnb.functional.has_avx512bf16())  # bitsandbytes repacks 4-bit weights in eval on such CPUs


@pytest.mark.skipif(not PACKS, reason="no AVX512-BF16 here: bitsandbytes never repacks 4-bit weights for the CPU")
@pytest.mark.parametrize("quant", ["nf4", "fp4-dq-bf16"])
def test_merge_after_an_eval_forward_stays_within_the_requantization_bound(checkpoints, quant):
    """In its first eval forward without grad bitsandbytes repacks the 4-bit weights (bf16
    scales, another layout); minilora unpacks a copy before dequantizing (peft does not: measured
    max error 0.12 on weights of max 0.087). The merged weight must still be W_deq + delta
    within the requantization bound, widened by what the packing round trip may move the scales."""
    ours = minilora.inject(load(checkpoints["fp32"], quant), target_modules=LLAMA_TARGETS)
    randomize(ours)
    layers = list(lora_layers(ours))
    wanted, loss = {}, {}
    for name, layer in layers:  # before any packing, from bitsandbytes' own dequantization
        ad = layer.adapters["default"]
        wanted[name] = deq(layer.base_layer) + ad.scaling * (ad.lora_B.detach() @ ad.lora_A.detach())
        loss[name] = _packing_loss(layer.base_layer)
    with torch.no_grad():
        logits(ours.eval(), ids_batch())
    assert all(layer.weight.quant_state.packing_format_for_cpu for _, layer in layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minilora.merge(ours)
    for name, layer in layers:
        got = deq(layer.base_layer)  # the merged weight is a new, unpacked parameter
        state = layer.weight.quant_state
        half_gap = bnb.functional.get_4bit_type(state.quant_type, device="cpu").sort().values.diff().max() / 2
        bound = requant_bound(layer.base_layer, wanted[name]).view(-1, state.blocksize)
        bound = (bound + loss[name] * (1 + half_gap)).view(wanted[name].shape)
        error = (got - wanted[name]).abs()
        assert (error <= bound).all(), (name, error.max().item(), wanted[name].abs().max().item())


@pytest.mark.skipif(not PACKS, reason="no AVX512-BF16 here: bitsandbytes never repacks 4-bit weights for the CPU")
@pytest.mark.parametrize("action", ["save_adapter", "load_adapter", "state_dict"])
@pytest.mark.parametrize("quant", ["nf4", "fp4-dq-bf16"])
def test_saving_or_loading_after_an_eval_forward_leaves_the_base_alone(checkpoints, quant, action, tmp_path):
    ours, _ = pair(checkpoints["fp32"], quant, dict(target_modules=LLAMA_TARGETS))
    minilora.save_adapter(ours, tmp_path)  # before any eval forward: a file to load below
    ours.eval()
    ids = ids_batch()
    with torch.no_grad():
        before = logits(ours, ids)
        if action == "save_adapter":
            minilora.save_adapter(ours, tmp_path / "again")
        elif action == "load_adapter":
            minilora.load_adapter(ours, tmp_path, adapter_name="second")
        else:
            ours.state_dict()
        assert torch.equal(logits(ours, ids), before)


# ---------------------------------------------------------------- 6. disabling, several adapters
@pytest.mark.parametrize("quant", QUANT_IDS)
def test_disable_adapters_gives_the_base_model(checkpoints, quant):
    ours, pm = pair(checkpoints["fp32"], quant, dict(target_modules=LLAMA_TARGETS))
    base = load(checkpoints["fp32"], quant)
    ids = ids_batch()
    with torch.no_grad():
        for train in (True, False):  # eval last: it repacks 4-bit weights
            for m in (ours, pm, base):
                m.train(train)
            y_base = logits(base, ids)
            with minilora.disable_adapters(ours):
                assert torch.equal(logits(ours, ids), y_base), train
            with pm.disable_adapter():
                assert torch.equal(logits(pm, ids), y_base), train
            assert (logits(ours, ids) - y_base).abs().max().item() > 1e-2


@pytest.mark.parametrize("quant", QUANT_IDS)
def test_two_adapters_switch_and_combine_as_peft(checkpoints, quant):
    ours, pm = pair(checkpoints["fp32"], quant, dict(target_modules=LLAMA_TARGETS))
    other = dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8)
    minilora.inject(ours, minilora.LoraConfig(**other), adapter_name="other")
    pm.add_adapter("other", peft.LoraConfig(**other))
    randomize(ours, seed=11, adapters=("other",))
    copy_to_peft(ours, pm, "other")
    ids = ids_batch()
    ours.train()
    pm.train()
    outputs = {}
    for active in (["default"], ["other"], ["default", "other"]):
        minilora.set_adapter(ours, active if len(active) > 1 else active[0])
        pm.base_model.set_adapter(active)
        for p in pm.parameters():  # peft's set_adapter([...]) makes only the first trainable; train all active
            p.requires_grad_(False)
        for name, mine, theirs in factor_pairs(ours, pm, active[0]) + (
                factor_pairs(ours, pm, active[1]) if len(active) > 1 else []):
            theirs.requires_grad_(True)
            mine.grad = theirs.grad = None
        y_ours, y_peft = logits(ours, ids), logits(pm, ids)
        assert torch.equal(y_ours, y_peft), active
        loss_of(y_ours).backward()
        loss_of(y_peft).backward()
        for adapter in active:
            for name, mine, theirs in factor_pairs(ours, pm, adapter):
                assert mine.grad is not None and torch.equal(mine.grad, theirs.grad), (active, name)
        outputs[tuple(active)] = y_ours.detach()
    assert len({tuple(y.flatten()[:8].tolist()) for y in outputs.values()}) == 3  # three different models


# ---------------------------------------------------------------- 7. modules_to_save on the unquantized lm_head
@pytest.mark.parametrize("quant", QUANT_IDS)
def test_modules_to_save_lm_head_as_peft(checkpoints, quant, tmp_path):
    fields = dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    ours, pm = pair(checkpoints["fp32"], quant, fields)
    assert type(ours.lm_head.original_module) is nn.Linear  # bitsandbytes leaves lm_head unquantized
    copy_ours = ours.lm_head.modules_to_save["default"]
    copy_peft = pm.base_model.model.lm_head.modules_to_save["default"]
    assert torch.equal(copy_ours.weight, copy_peft.weight)
    assert not torch.equal(copy_ours.weight, ours.lm_head.original_module.weight)
    ids = ids_batch()
    ours.train()
    pm.train()
    y_ours, y_peft = logits(ours, ids), logits(pm, ids)
    assert torch.equal(y_ours, y_peft)
    loss_of(y_ours).backward()
    loss_of(y_peft).backward()
    assert copy_ours.weight.grad.abs().max() > 0
    assert torch.equal(copy_ours.weight.grad, copy_peft.weight.grad)
    assert ours.lm_head.original_module.weight.grad is None
    for name, mine, theirs in factor_pairs(ours, pm):
        assert torch.equal(mine.grad, theirs.grad), name
    assert minilora.trainable_parameters(ours)[0] == pm.get_nb_trainable_parameters()[0]
    minilora.save_adapter(ours, tmp_path / "ours")
    pm.save_pretrained(tmp_path / "peft")
    mine = safetensors_torch.load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = safetensors_torch.load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(mine) == sorted(theirs)
    assert "base_model.model.lm_head.weight" in mine
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


# ---------------------------------------------------------------- 8. prepare_model_for_kbit_training
@pytest.mark.parametrize("quant", QUANT_IDS)
def test_prepare_model_for_kbit_training_as_peft(checkpoints, quant):
    # loaded in bf16: the norms, embeddings and lm_head are then bf16, and both must cast them to fp32
    mine = load(checkpoints["bf16"], quant, dtype=torch.bfloat16)
    theirs = load(checkpoints["bf16"], quant, dtype=torch.bfloat16)
    assert any(p.dtype == torch.bfloat16 for p in mine.parameters())
    assert minilora.prepare_model_for_kbit_training(mine) is mine
    peft.prepare_model_for_kbit_training(theirs)
    assert [(n, p.dtype, p.requires_grad) for n, p in mine.named_parameters()] == \
           [(n, p.dtype, p.requires_grad) for n, p in theirs.named_parameters()]
    assert not any(p.dtype == torch.bfloat16 for p in mine.parameters())
    assert not any(p.requires_grad for p in mine.parameters())
    for model in (mine, theirs):
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())

    fields = dict(target_modules=LLAMA_TARGETS)
    ours = minilora.inject(mine, minilora.LoraConfig(**fields))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(theirs, peft.LoraConfig(**fields))
    randomize(ours)
    copy_to_peft(ours, pm)
    ours.train()
    pm.train()
    ids = ids_batch()
    calls = []  # a module inside the checkpointed blocks runs twice (forward, and again in backward)
    hooks = [m.register_forward_hook(lambda *_: calls.append(1))
             for m in (ours.model.layers[0].self_attn, pm.base_model.model.model.layers[0].self_attn)]
    loss_ours = ours(input_ids=ids, labels=ids).loss
    loss_peft = pm(input_ids=ids, labels=ids).loss
    assert loss_ours.item() == loss_peft.item()
    loss_ours.backward()
    loss_peft.backward()
    assert len(calls) == 2 * 2, "gradient checkpointing did not recompute the blocks in backward"
    for h in hooks:
        h.remove()
    for name, a, b in factor_pairs(ours, pm):
        assert a.grad is not None and a.grad.abs().max() > 0, name
        assert torch.equal(a.grad, b.grad), name


# ---------------------------------------------------------------- 9. refusals
class QuantLinear(nn.Linear):
    """A quantized linear minilora does not know: an int8 weight and its own forward."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        scale = linear.weight.detach().abs().amax(dim=1, keepdim=True) / 127
        self.weight = nn.Parameter(torch.round(linear.weight.detach() / scale).to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone())

    def forward(self, x):
        return nn.functional.linear(x, self.weight.float() * self.scale, self.bias)


class PackedTensor(torch.Tensor):
    """A tensor subclass standing for a packed weight (torchao-style), even with a float dtype."""


def _with_unknown_quantized_layer(kind: str) -> nn.Module:
    model = build("mlp")
    if kind == "int8-parameter":
        model.lin1 = QuantLinear(model.lin1)
    else:
        model.lin1.weight = nn.Parameter(model.lin1.weight.detach().clone().as_subclass(PackedTensor),
                                         requires_grad=False)
    return model


@pytest.mark.parametrize("kind,type_name", [("int8-parameter", "QuantLinear"), ("tensor-subclass", "PackedTensor")])
@pytest.mark.parametrize("targets", [["lin0", "lin1"], "all-linear"])
def test_unknown_quantized_linear_is_refused_by_type(kind, type_name, targets):
    model = _with_unknown_quantized_layer(kind)
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"module 'lin1' matches target_modules but .*{type_name}"):
        minilora.inject(model, target_modules=targets)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match=type_name):
        minilora.find_targets(model, minilora.LoraConfig(target_modules=targets))
    # the layer can be left out, and the rest adapted
    minilora.inject(model, target_modules=["lin0", "head"])
    assert minilora.adapted_modules(model) == ["lin0", "head"]


@pytest.mark.parametrize("quant", QUANT_IDS)
def test_dora_on_a_bitsandbytes_layer_is_refused(checkpoints, quant):
    """peft allows DoRA on 4-bit (and 8-bit) layers; minilora refuses it, before touching anything."""
    model = load(checkpoints["fp32"], quant)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"use_dora=True on 'model\.layers\.0\.self_attn\.q_proj', a "
                                         rf"{BNB_CLASS[quant].__name__}: DoRA over a quantized base is not supported"):
        minilora.inject(model, target_modules=["q_proj"], use_dora=True)
    assert_unchanged(model, before)


# ---------------------------------------------------------------- 10. one adapter per row
def test_per_sample_adapters_on_a_4bit_model(checkpoints):
    ours, pm = pair(checkpoints["fp32"], "nf4", dict(target_modules=LLAMA_TARGETS))
    other = dict(target_modules=["q_proj", "v_proj", "up_proj"], r=4)
    minilora.inject(ours, minilora.LoraConfig(**other), adapter_name="other")
    pm.add_adapter("other", peft.LoraConfig(**other))
    randomize(ours, seed=11, adapters=("other",))
    copy_to_peft(ours, pm, "other")
    ours.eval()
    pm.eval()
    names = ["other", "__base__", "default", "other"]
    ids = ids_batch(batch=len(names))
    with torch.no_grad():
        with minilora.per_sample_adapters(ours, names):
            mixed = logits(ours, ids)
        peft_mixed = pm(input_ids=ids, adapter_names=names).logits  # peft's mixed batch: a loop per adapter
        alone = {}
        for name in ("default", "other"):
            minilora.set_adapter(ours, name)
            alone[name] = logits(ours, ids)
        with minilora.disable_adapters(ours):
            alone["__base__"] = logits(ours, ids)
    assert len({tuple(y.flatten()[:8].tolist()) for y in alone.values()}) == 3
    # Row i against the whole batch run with its adapter: the same base rows; the LoRA branch
    # runs on a sub-batch (and, stacked, as batched products over the rows sharing an adapter),
    # whose fp32 GEMMs may sum in another order than peft's loop or the whole batch's.
    # Bound: 2 layers x 7 linears, sums of <= 128 products: 14 · 128 · 2**-24 ~ 1e-4 of the scale.
    scale = max(y.abs().max().item() for y in alone.values())
    assert (mixed - peft_mixed).abs().max().item() <= 1e-4 * scale
    for i, name in enumerate(names):
        assert (mixed[i] - alone[name][i]).abs().max().item() <= 1e-4 * scale, (i, name)


# ---------------------------------------------------------------- 11. the lossless merge route
def _mean_abs(tensors) -> float:
    return sum(t.abs().mean().item() for t in tensors) / len(tensors)


@pytest.mark.parametrize("regime,lr,steps", [("large-update", 2e-2, 5), ("small-update", 2e-4, 3)])
def test_offline_merge_into_the_bf16_checkpoint(checkpoints, tmp_path, regime, lr, steps, record_property):
    """QLoRA training on the nf4 model, then ``minilora merge`` of the adapter into the original
    bf16 checkpoint, against peft's merge_and_unload into the 4-bit weights (requantized).

    The offline merge writes bf16(W + s·B@A), the sum formed in fp32 (offline_merge.py: ops.lora_delta in
    merge_dtype(bf16) = fp32, .add_(W), .to(bf16)): the model that was meant, W + delta, up to a
    bf16 rounding (<= 2**-9 relative per weight). The QLoRA model itself computes with Q(W) + delta;
    the offline merge differs from it by the base's own quantization error W - Q(W), the
    requantized merge by a new one, Q(Q(W) + delta) - (Q(W) + delta), on blocks whose absmax now
    includes delta. Which of the two lands closer to the QLoRA model depends on delta:

    - large update (|delta| ~ 20x the nf4 rounding of W): the requantization error grows with the
      blocks' absmax beyond W's own, and the offline merge is the closer one;
    - small update (|delta| below the nf4 rounding of W, as in real fine-tuning): requantization
      rounds most of delta away, so the requantized model sits about one adapter effect from the
      QLoRA model (the adapter is lost), and can be nearer to it than the offline merge is.
    In both, only the offline merge keeps what the adapter learned exactly.
    """
    from minilora.offline_merge import merge_checkpoint

    base_q = load(checkpoints["fp32"], "nf4")
    torch.manual_seed(0)  # the kaiming init of A: the same adapter whatever ran before in this process
    ours = minilora.inject(base_q, target_modules=LLAMA_TARGETS, r=8, lora_alpha=16)
    ours.train()
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=lr)
    ids = ids_batch(seed=20, batch=4, seq=12)
    for _ in range(steps):
        ours(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    minilora.save_adapter(ours, tmp_path / "adapter")
    merge_checkpoint(checkpoints["bf16"], tmp_path / "adapter", tmp_path / "merged", progress=False)

    # the merged tensors: exactly bf16(W + s·B@A) with the sum in fp32; the rest untouched
    base = safetensors_torch.load_file(os.path.join(checkpoints["bf16"], "model.safetensors"))
    merged = safetensors_torch.load_file(tmp_path / "merged" / "model.safetensors")
    assert sorted(base) == sorted(merged)
    adapted = dict(lora_layers(ours))
    deltas, quant_errors, requant_errors = [], [], []
    for key, w in base.items():
        name = key.removesuffix(".weight")
        if name not in adapted:
            assert torch.equal(merged[key], w), key
            continue
        layer = adapted[name]
        ad = layer.adapters["default"]
        delta = (ad.lora_B.detach().float() @ ad.lora_A.detach().float()) * ad.scaling
        assert merged[key].dtype == torch.bfloat16
        assert torch.equal(merged[key], (delta + w.float()).to(torch.bfloat16)), key
        w_q = deq(layer.base_layer)
        state = layer.weight.quant_state
        again = bnb.nn.Params4bit(w_q + delta, requires_grad=False, quant_type="nf4", blocksize=state.blocksize,
                                  compress_statistics=state.nested)._quantize("cpu")  # as merge_and_unload
        deltas.append(delta)
        quant_errors.append(w_q - w.float())
        requant_errors.append(bnb.functional.dequantize_4bit(again.data, again.quant_state) - (w_q + delta))
    assert len(deltas) == 14

    probe = ids_batch(seed=21, batch=4, seq=12)
    with torch.no_grad():
        y_qlora = logits(ours, probe)  # train mode: bitsandbytes' unpacked fp32 path
        y_offline = logits(load(str(tmp_path / "merged")).train(), probe)  # the bf16 values, computed in fp32
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.PeftModel.from_pretrained(load(checkpoints["fp32"], "nf4"), tmp_path / "adapter").train()
            y_requant = logits(pm.merge_and_unload(), probe)  # merged before any eval forward: no packing
        y_exact = logits(minilora.load_adapter(load(checkpoints["fp32"]), tmp_path / "adapter").train(), probe)
        y_base_q = logits(load(checkpoints["fp32"], "nf4").train(), probe)
    dist = {
        "offline_vs_qlora": (y_offline - y_qlora).abs().max().item(),
        "requant_vs_qlora": (y_requant - y_qlora).abs().max().item(),
        "offline_vs_exact": (y_offline - y_exact).abs().max().item(),
        "requant_vs_exact": (y_requant - y_exact).abs().max().item(),
        "adapter_effect": (y_qlora - y_base_q).abs().max().item(),
        "mean_abs_delta": _mean_abs(deltas),
        "mean_abs_nf4_error_of_W": _mean_abs(quant_errors),
        "mean_abs_requant_error": _mean_abs(requant_errors),
    }
    for key, value in dist.items():
        record_property(key, value)

    # Only the offline merge is the trained model W + delta: its distance to it is bf16 rounding
    # (2**-9 relative per weight), the requantized one's a 4-bit rounding (nf4 steps up to 0.15
    # of a block's absmax): measured ratio <= 0.02 in both regimes, asserted <= 0.1.
    assert dist["offline_vs_exact"] <= 0.1 * dist["requant_vs_exact"]
    if regime == "large-update":
        assert dist["mean_abs_delta"] > 10 * dist["mean_abs_nf4_error_of_W"]
        assert dist["mean_abs_requant_error"] > dist["mean_abs_nf4_error_of_W"]  # absmax grew with delta
        assert dist["offline_vs_qlora"] < dist["requant_vs_qlora"]  # measured 0.106 vs 0.449
    else:
        assert dist["mean_abs_delta"] < dist["mean_abs_nf4_error_of_W"]
        # the requantized merge lost the adapter: it is about one adapter effect from the QLoRA model
        assert dist["requant_vs_qlora"] >= 0.5 * dist["adapter_effect"]  # measured ratio 1.0
