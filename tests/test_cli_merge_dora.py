"""`minilora merge` of DoRA adapters (``use_dora=True``): the offline merge must give exactly the
bits of ``merge_and_unload`` on the same model (Linear, embeddings, GPT-2's Conv1D, ConvNd; fp32
and bf16; one block per tensor and many), peft's ``merge_and_unload`` within fp32 rounding for a
peft-saved adapter, and refuse a DoRA adapter that does not fit (OUT absent, the module named)."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import minilora
import minilora.ops as ops_module
from minilora.checkpoint import load_adapter, save_adapter
from minilora.cli import main
from minilora.offline_merge import merge_checkpoint
from minilora.inject import lora_layers
from minilora.layers import LoraConv1D, LoraEmbedding
from minilora.ops import merge_dtype

transformers = pytest.importorskip("transformers")

U = 2.0 ** -24  # float32 unit roundoff


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})
    return out


class Convs(nn.Module):
    """ConvNd layers (no config.json: the CLI goes by shapes alone). conv2d has 300 output rows, so
    at the 256-row block floor its weight spans two blocks."""

    def __init__(self):
        super().__init__()
        self.conv2d = nn.Conv2d(3, 300, 3, padding=1)
        self.conv1d = nn.Conv1d(300, 6, 2)
        self.conv3d = nn.Conv3d(2, 5, (1, 2, 2), bias=False)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def build(kind: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, list[str]]:
    """A base model and the DoRA targets. Several tensors of each layout exceed 256 rows."""
    torch.manual_seed(0)
    if kind in ("llama", "llama-tied"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=700, hidden_size=32, intermediate_size=520, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=kind == "llama-tied"))
        targets = (["embed_tokens", "lm_head", "q_proj", "v_proj", "gate_proj", "down_proj"] if kind == "llama"
                   else ["lm_head", "q_proj"])  # tied: LoRA on lm_head alone unties the pair
    elif kind == "gpt2":  # Conv1D (stored (in, out)) and the wte embedding, tied to lm_head
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=600, n_embd=288, n_layer=1,
                                                                     n_head=4, n_positions=32))
        targets = ["c_attn", "c_fc", "c_proj", "wte"]
    else:
        model = Convs()
        targets = ["conv2d", "conv1d", "conv3d"]
    return model.to(dtype).eval(), targets


def save_base(model: nn.Module, folder: Path) -> None:
    if isinstance(model, transformers.PreTrainedModel):
        model.save_pretrained(folder, max_shard_size="200KB")
    else:
        folder.mkdir()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})


def perturb_magnitudes(model: nn.Module, seed: int = 5) -> int:
    """m ← m · (1 + 0.3·N(0, 1)): with init_lora_weights=False (random B) DoRA is no longer LoRA."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for adapter in layer.adapters.values():
                m = adapter.magnitude
                m.mul_(1 + 0.3 * torch.randn(m.shape, generator=g, dtype=torch.float64).to(m.dtype))
                n += 1
    return n


def dora_model(kind: str, dtype: torch.dtype = torch.float32, **fields):
    base, targets = build(kind, dtype)
    ours = _quiet(minilora.inject, copy.deepcopy(base), minilora.LoraConfig(
        target_modules=targets, r=8, lora_alpha=16, use_dora=True, init_lora_weights=False, **fields))
    assert perturb_magnitudes(ours) == len(list(lora_layers(ours)))
    return base, ours


def dora_reference(W, A, B, scaling: float, magnitude, flip: bool, dtype: torch.dtype):
    """One weight's DoRA merge in float64 as (out, K) rows (K: the elements of one output's norm),
    a function laying a stored tensor out as those rows, and how far from the float64 value a
    merge computed in fp32 and rounded once to ``dtype`` may be, per element:

    V = W + s·B@A is within (r + 3)·u·M, M = |W| + s·|B||A| (r products and sums, the scaling,
    the add); ‖V_i‖ over K terms within (K + 3)/2·u relatively, plus what the errors of V move it,
    (r + 3)·u·‖M_i‖ / ‖V_i‖ (the squares and K - 1 sums: (K + 1)·u of the sum of squares, half
    of it through the square root, which adds one u); the division and the product one u each;
    then the rounding to ``dtype`` (bf16: 2**-8 of the result). Two such merges differ by at most
    twice that. Measured: fp32 merges use about a tenth of it, bf16 ones all (the final rounding)."""
    A, B = A.detach().double().flatten(1), B.detach().double().flatten(1)  # (r, K), (out, r)
    rows = lambda t: (t.T if flip else t).reshape(B.shape[0], -1)  # noqa: E731
    Wr = rows(W.detach().double())
    V, M = Wr + scaling * (B @ A), Wr.abs() + abs(scaling) * (B.abs() @ A.abs())
    norm = V.norm(dim=1, keepdim=True)
    scale = magnitude.detach().double().reshape(-1, 1) / norm
    exact = scale * V
    r, K = A.shape[0], V.shape[1]
    rel_norm = (K + 3) / 2 * U + (r + 3) * U * M.norm(dim=1, keepdim=True) / norm
    err = scale.abs() * ((r + 3) * U * M + V.abs() * (rel_norm + 2 * U))
    if dtype != torch.float32:  # |fl(y) - x| <= |y - x| + u_d·|y| <= err·(1 + u_d) + u_d·|x|
        u_d = torch.finfo(dtype).eps / 2
        err = err * (1 + u_d) + u_d * exact.abs()
    return rows, exact, err


def layer_references(model: nn.Module) -> dict[str, tuple]:
    """``dora_reference`` for every DoRA layer of ``model`` (before it is merged), by weight key,
    and whether the offline merge's blocks of s·B@A equal the whole product's rows on this BLAS."""
    refs = {}
    for name, layer in lora_layers(model):
        adapter = layer.adapters["default"]
        flip = isinstance(layer, (LoraConv1D, LoraEmbedding))
        ref = dora_reference(layer.weight, adapter.lora_A, adapter.lora_B, adapter.scaling, adapter.magnitude,
                             flip, layer.weight.dtype)
        whole = layer.delta_weight(adapter).detach()
        same = all(torch.equal(ops_module.lora_delta(adapter.lora_A.detach(), adapter.lora_B.detach(), adapter.scaling,
                                                     merge_dtype(layer.weight.dtype), transposed=flip, rows=rows),
                               whole[rows])
                   for rows in ops_module.row_blocks(tuple(whole.shape)))
        refs[name + ".weight"] = (*ref, same)
    return refs


@pytest.mark.parametrize("blocks", ["one", "many"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["llama", "llama-tied", "gpt2", "conv"])
def test_dora_merge_equals_merge_and_unload(tmp_path, monkeypatch, kind, dtype, blocks):
    """Bit for bit. "many": every block at the 256-row floor (rows of W, or columns of A for
    Conv1D and embeddings), so norms summed over several blocks, and, for the column layouts, the
    two passes (norms, then scaled blocks), are checked against the whole-tensor merge, which
    ``dora_merge_norm`` sums over the same blocks.

    As for LoRA (tests/test_cli_merge.py, test_blocked_merge_equals_merge_and_unload), the bits
    are equal where the BLAS computes a block of rows of s·B@A as it computes those rows of the
    whole product, which is checked here per tensor (true for MKL on AVX-512 and for OpenBLAS;
    with MKL_ENABLE_INSTRUCTIONS=AVX2 the r-term sums of a 256-row block differ). Where it is not,
    V itself differs in the last fp32 bits and both merges are held to the derived bound of
    ``dora_reference`` instead. Either way each merge is within that bound of the float64 value."""
    if blocks == "many":
        monkeypatch.setattr(ops_module, "_BLOCK_ELEMENTS", 1)
    base, ours = dora_model(kind, dtype)
    save_base(base, tmp_path / "base")
    save_adapter(ours, tmp_path / "adapter")
    refs = layer_references(ours)
    summary = merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progress=False)
    assert summary.dora_modules == summary.lora_modules == len(refs)
    want = _quiet(minilora.merge_and_unload, ours).state_dict()
    got = folder_tensors(tmp_path / "out")
    assert set(got) <= set(want)
    base_sd = base.state_dict()
    spanning = 0
    for key, value in got.items():
        assert value.dtype == want[key].dtype == base_sd[key].dtype, key
        if key not in refs:
            assert torch.equal(value, base_sd[key]) and torch.equal(value, want[key]), key
            continue
        rows, exact, err, same = refs[key]
        for t in (value, want[key]):
            assert ((rows(t.double()) - exact).abs() <= err).all(), key
        if same:
            assert torch.equal(value, want[key]), (key, float((value.double() - want[key].double()).abs().max()))
        spanning += blocks == "many" and value.shape[0] > 256
    if blocks == "many":
        assert spanning >= (1 if kind in ("llama-tied", "conv") else 3)
    if kind in ("llama-tied", "gpt2"):  # DoRA on one member of a tied pair unties it, as in memory
        assert summary.untied and json.loads((tmp_path / "out" / "config.json").read_text())[
            "tie_word_embeddings"] is False


def test_dora_merge_of_large_embedding_in_default_blocks(tmp_path):
    """Default blocks (about 1M elements): a 40000 x 32 embedding (1.28M) spans two of them."""
    torch.manual_seed(0)
    base = nn.Module()
    base.emb = nn.Embedding(40000, 32)
    base.proj = nn.Linear(32, 40000, bias=False)
    assert len(ops_module.row_blocks(tuple(base.emb.weight.shape))) == 2
    save_base(base, tmp_path / "base")
    ours = minilora.inject(copy.deepcopy(base), target_modules=["emb", "proj"], r=4, use_dora=True,
                           init_lora_weights=False)
    perturb_magnitudes(ours)
    save_adapter(ours, tmp_path / "adapter")
    refs = layer_references(ours)
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progress=False)
    want = minilora.merge_and_unload(ours).state_dict()
    got = folder_tensors(tmp_path / "out")
    for key in ("emb.weight", "proj.weight"):
        rows, exact, err, same = refs[key]
        assert ((rows(got[key].double()) - exact).abs() <= err).all(), key
        assert torch.equal(got[key], want[key]) or not same, key


# ---------------------------------------------------------------- peft
peft_cases = {
    "llama": (lambda: build("llama")[0], dict(target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"])),
    "gpt2": (lambda: build("gpt2")[0], dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "conv": (lambda: build("conv")[0], dict(target_modules=["conv2d", "conv1d"])),
}


@pytest.mark.parametrize("kind", list(peft_cases))
def test_peft_dora_adapter(tmp_path, kind):
    """A peft-saved DoRA adapter: the offline merge equals minilora's in-memory merge of it
    (``load_adapter`` + ``merge_and_unload``) bit for bit, and peft's ``merge_and_unload`` within
    fp32 rounding: each within the bound derived in ``dora_reference`` of the
    float64 value, so within twice that of each other."""
    peft = pytest.importorskip("peft")
    make, fields = peft_cases[kind]
    base = make()
    save_base(base, tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False, **fields)
    theirs = _quiet(peft.get_peft_model, copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
    _quiet(theirs.save_pretrained, tmp_path / "adapter")
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        ad = {k: f.get_tensor(k).double() for k in f.keys()}
    magnitudes = {k.removeprefix("base_model.model.").removesuffix(".lora_magnitude_vector"): v
                  for k, v in ad.items() if k.endswith(".lora_magnitude_vector")}
    assert magnitudes

    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progress=False)
    got = folder_tensors(tmp_path / "out")
    ours = _quiet(load_adapter, copy.deepcopy(base), tmp_path / "adapter")
    want = _quiet(minilora.merge_and_unload, ours).state_dict()
    peft_sd = _quiet(theirs.merge_and_unload).state_dict()
    base_sd = base.state_dict()
    assert set(base_sd) - set(got) <= {"lm_head.weight"}  # (GPT-2's, tied to wte, is not stored)
    for key, value in got.items():
        assert torch.equal(value, want[key]), key
        module = key.removesuffix(".weight")
        if module not in magnitudes:
            assert torch.equal(value, peft_sd[key]), key
            continue
        emb = f"base_model.model.{module}.lora_embedding_A" in ad
        A = ad[f"base_model.model.{module}." + ("lora_embedding_A" if emb else "lora_A.weight")]
        B = ad[f"base_model.model.{module}." + ("lora_embedding_B" if emb else "lora_B.weight")]
        W = base_sd[key]
        rows, exact, err = dora_reference(W, A, B, 8 / 4, magnitudes[module], emb or kind == "gpt2", W.dtype)
        for side, t in (("minilora", value), ("peft", peft_sd[key])):  # each within err; so 2·err apart
            dist = (rows(t.double()) - exact).abs()
            assert (dist <= err).all(), (side, key, float((dist / err).max()))
        apart = (rows(value.double()) - rows(peft_sd[key].double())).abs()
        assert (apart <= 2 * err).all() and not torch.equal(value, W), key
        assert (exact - rows(W.double())).abs().max() > 1e-3  # the adapter really changed the weight


# ---------------------------------------------------------------- errors
def _edit_adapter(adapter: Path, change) -> None:
    """Rewrite the weights without minilora's config digest (as a peft-written file): edits and a
    changed config are then checked on their own merits."""
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    change(tensors)
    save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})


def _edit_config(adapter: Path, **fields) -> None:
    _edit_adapter(adapter, lambda t: None)
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def _zero_output(base: Path, adapter: Path, module: str, i: int, column: bool) -> None:
    """Make output i of W + s·B@A all zeros: W's row (column for embeddings) and B's row i."""
    tensors = load_file(str(base / "model.safetensors"))
    w = tensors[module + ".weight"]
    (w[:, i] if column else w[i]).zero_()
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    suffix = "lora_embedding_B" if column else "lora_B.weight"
    _edit_adapter(adapter, lambda t: t[f"base_model.model.{module}.{suffix}"][i].zero_())


Q = "base_model.model.model.layers.0.self_attn.q_proj"
QM = r"LoRA module 'model\.layers\.0\.self_attn\.q_proj'"
MAG = r"'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_magnitude_vector'"

DORA_ERRORS = {
    "magnitude-shape": (lambda base, ad: _edit_adapter(ad, lambda t: t.update({Q + ".lora_magnitude_vector":
                                                                               torch.ones(31)})),
                        QM + r": its DoRA magnitude \(lora_magnitude_vector\) has shape \[31\], but its weight "
                        r"\[32, 32\] has 32 outputs, so it must be \[32\]; the adapter file is malformed"),
    "magnitude-2d": (lambda base, ad: _edit_adapter(ad, lambda t: t.update({Q + ".lora_magnitude_vector":
                                                                            torch.ones(1, 32)})),
                     QM + r": its DoRA magnitude .* has shape \[1, 32\].* must be \[32\]"),
    "magnitude-missing": (lambda base, ad: _edit_adapter(ad, lambda t: t.pop(Q + ".lora_magnitude_vector")),
                          r"lacks " + MAG + r", the DoRA magnitude of " + QM + r" that the config implies "
                          r"\(adapter_config\.json says use_dora=true\); the file does not belong to this config"),
    "magnitudes-without-use_dora": (lambda base, ad: _edit_config(ad, use_dora=False),
                                    r"has the unexpected key 'base_model\.model\.model\.embed_tokens\."
                                    r"lora_magnitude_vector' \(and 3 more module\(s\)\), a DoRA magnitude of "
                                    r"LoRA module 'model\.embed_tokens', but adapter_config\.json says use_dora=false"),
    "magnitude-alone": (lambda base, ad: _edit_adapter(ad, lambda t: (t.pop(Q + ".lora_A.weight"),
                                                                      t.pop(Q + ".lora_B.weight"))),
                        r"adapter has lora_magnitude_vector but neither lora_A nor lora_B for "
                        r"'model\.layers\.0\.self_attn\.q_proj'; the file is incomplete"),
    "magnitude-inf": (lambda base, ad: _edit_adapter(ad, lambda t: t[Q + ".lora_magnitude_vector"].__setitem__(
        3, float("inf"))), MAG + r" has 1 value\(s\) that are NaN or inf as torch\.float32"),
    # finite in the file (float64), inf in the fp32 it is used in
    "magnitude-beyond-fp32": (lambda base, ad: _edit_adapter(ad, lambda t: t.update({
        Q + ".lora_magnitude_vector": torch.full((32,), 1e300, dtype=torch.float64)})),
        MAG + r" has 32 value\(s\) that are NaN or inf as torch\.float32"),
    "magnitude-int": (lambda base, ad: _edit_adapter(ad, lambda t: t.update({
        Q + ".lora_magnitude_vector": torch.ones(32, dtype=torch.int32)})), MAG + r" has dtype torch\.int32"),
    "zero-norm-row": (lambda base, ad: _zero_output(base, ad, "model.layers.0.self_attn.q_proj", 5, column=False),
                      r"merging the DoRA adapter into 'model\.layers\.0\.self_attn\.q_proj\.weight': "
                      r"‖W \+ s·B@A‖ of output 5 is 0 \(W \+ s·B@A is all zeros there\), so DoRA's scale .* "
                      r"is not finite there"),
    "zero-norm-embedding-dim": (lambda base, ad: _zero_output(base, ad, "model.embed_tokens", 7, column=True),
                                r"into 'model\.embed_tokens\.weight': ‖W \+ s·B@A‖ of output 7 is 0"),
    "nan-in-base": (lambda base, ad: _edit_base(base, "model.layers.0.mlp.down_proj.weight",
                                                lambda w: w[2].__setitem__(4, float("nan"))),
                    r"into 'model\.layers\.0\.mlp\.down_proj\.weight': ‖W \+ s·B@A‖ of output 2 is nan "
                    r"\(the checkpoint's weight holds NaN there\)"),
    "norm-overflows": (lambda base, ad: _edit_base(base, "model.layers.0.self_attn.q_proj.weight",
                                                   lambda w: w[1].fill_(1e30)),
                       r"into 'model\.layers\.0\.self_attn\.q_proj\.weight': ‖W \+ s·B@A‖ of output 1 is inf "
                       r"\(its sum of squares overflows torch\.float32\)"),
}


def _edit_base(base: Path, key: str, change) -> None:
    tensors = load_file(str(base / "model.safetensors"))
    change(tensors[key])
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture
def dora_ckpt(tmp_path):
    """A tiny Llama (one model.safetensors) and a minilora DoRA adapter on q_proj, v_proj,
    down_proj and embed_tokens."""
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False)).eval()
    base.save_pretrained(tmp_path / "base")
    ours = _quiet(minilora.inject, copy.deepcopy(base), use_dora=True, init_lora_weights=False,
                  target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"])
    perturb_magnitudes(ours)
    save_adapter(ours, tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter"


@pytest.mark.parametrize("case", list(DORA_ERRORS))
def test_dora_errors_leave_out_absent(dora_ckpt, case):
    base, adapter = dora_ckpt
    breaker, pattern = DORA_ERRORS[case]
    breaker(base, adapter)
    out = base.parent / "out"
    with pytest.raises(ValueError, match=pattern):
        merge_checkpoint(base, adapter, out, progress=False)
    assert not out.exists()
    assert [p.name for p in base.parent.iterdir() if p.name.startswith(".out")] == []


def test_dora_errors_agree_with_load_adapter(dora_ckpt):
    """load_adapter refuses the same files: a missing magnitude, and magnitudes its config does not
    ask for (both keys named)."""
    base, adapter = dora_ckpt
    model = transformers.LlamaForCausalLM.from_pretrained(base)
    _edit_adapter(adapter, lambda t: t.pop(Q + ".lora_magnitude_vector"))
    with pytest.raises(minilora.AdapterFileError, match=r"lacks 1 key\(s\) the config implies: " + MAG):
        load_adapter(copy.deepcopy(model), adapter)
    _edit_adapter(adapter, lambda t: t.update({Q + ".lora_magnitude_vector": torch.ones(32)}))
    _edit_config(adapter, use_dora=False)
    with pytest.raises(minilora.AdapterFileError, match=r"has 4 unexpected key\(s\): .*lora_magnitude_vector"):
        load_adapter(copy.deepcopy(model), adapter)


def test_dora_overflow_of_fp16_checkpoint_is_refused(tmp_path):
    """Finite factors and magnitudes whose merged weight m / ‖V‖ · V is beyond fp16's range."""
    torch.manual_seed(0)
    base = nn.Module()
    base.proj = nn.Linear(16, 8, bias=False).half()
    save_base(base, tmp_path / "base")
    ours = minilora.inject(copy.deepcopy(base), target_modules=["proj"], r=2, use_dora=True, init_lora_weights=False)
    with torch.no_grad():
        ours.proj.adapters.default.magnitude.fill_(1e6)  # fp32: finite; times V / ‖V‖ ~ 0.3: beyond 65504
    save_adapter(ours, tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"merging the adapter into 'proj\.weight' gives \d+ inf or NaN value\(s\) in "
                                         r"torch\.float16: DoRA's rescaled weight .* is beyond that dtype's range"):
        merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_conv_magnitude_in_linear_layout_is_refused(tmp_path):
    """peft saves a ConvNd magnitude as (1, out, 1, 1); (out,) is refused, not broadcast."""
    base, ours = dora_model("conv")
    save_base(base, tmp_path / "base")
    save_adapter(ours, tmp_path / "adapter")
    _edit_adapter(tmp_path / "adapter", lambda t: t.update({
        "base_model.model.conv2d.lora_magnitude_vector": t["base_model.model.conv2d.lora_magnitude_vector"].flatten()}))
    with pytest.raises(ValueError, match=r"LoRA module 'conv2d': its DoRA magnitude \(lora_magnitude_vector\) has "
                                         r"shape \[300\], but its weight \[300, 3, 3, 3\] has 300 outputs, so it "
                                         r"must be "
                                         r"\[1, 300, 1, 1\]"):
        merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_reports_dora_modules(dora_ckpt, capsys):
    base, adapter = dora_ckpt
    assert main(["merge", "--no-progress", str(base), str(adapter), str(base.parent / "out")]) == 0
    assert "merged 4 LoRA modules (4 of them DoRA) and replaced" in capsys.readouterr().out
