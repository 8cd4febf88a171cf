"""`minilora merge`: a sharded checkpoint + a peft-format adapter, merged block by block,
must load with transformers and equal `merge_and_unload` on the same weights, bit for bit;
and peak memory must stay far below the checkpoint size."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import minilora
from minilora.checkpoint import save_adapter
from minilora.cli import main
from minilora.offline_merge import merge_checkpoint
import tiny_models as tm

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def tiny_llama(tie: bool, dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                                      **overrides)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})
    return out


# (name, model builder, LoraConfig fields, how the adapter is saved)
CASES = {
    "llama-lm_head-peft": (lambda: tiny_llama(False), dict(target_modules=tm.LLAMA_TARGETS, modules_to_save=["lm_head"],
                                                           rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3}), "peft"),
    "llama-rslora-embed-peft": (lambda: tiny_llama(False), dict(target_modules=["q_proj", "down_proj", "embed_tokens"],
                                                                use_rslora=True, r=4, lora_alpha=5), "peft"),
    "llama-tied-modules_to_save-minilora": (lambda: tiny_llama(True), dict(target_modules=["q_proj", "v_proj"],
                                                                           modules_to_save=["lm_head"]), "minilora"),
    "llama-tied-lora_on_lm_head-peft": (lambda: tiny_llama(True), dict(target_modules=["q_proj", "lm_head"]), "peft"),
    "gpt2-conv1d-peft": (lambda: tm.build("gpt2"), dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
                         "peft"),
    "llama-bf16-bias-minilora": (lambda: tiny_llama(False, torch.bfloat16, mlp_bias=True),
                                 dict(target_modules=["up_proj", "o_proj"], bias="lora_only", r=2), "minilora"),
}


def make_case(tmp_path: Path, name: str):
    build, fields, writer = CASES[name]
    base = build()
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir, max_shard_size="20KB")  # several shards + index.json
    (base_dir / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    ours = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minilora.inject(ours, minilora.LoraConfig(**fields))
    tm.randomize_adapters(ours)
    if writer == "minilora":
        save_adapter(ours, tmp_path / "adapter")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fields))
        tm.copy_to_peft(ours, theirs)
        theirs.save_pretrained(tmp_path / "adapter")
    return base_dir, tmp_path / "adapter", ours


@pytest.mark.parametrize("name", list(CASES))
def test_merge_equals_merge_and_unload(tmp_path, name):
    base_dir, adapter_dir, ours = make_case(tmp_path, name)
    assert len(list(base_dir.glob("*.safetensors"))) >= 2
    summary = merge_checkpoint(base_dir, adapter_dir, tmp_path / "out", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = minilora.merge_and_unload(ours)
    loaded = type(expected).from_pretrained(tmp_path / "out", dtype=expected.dtype).eval()

    want, got = expected.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    for key in want:
        assert torch.equal(want[key], got[key]), key
    assert loaded.config.tie_word_embeddings == expected.config.tie_word_embeddings
    emb_out = loaded.get_output_embeddings()
    assert (emb_out.weight is loaded.get_input_embeddings().weight) == expected.config.tie_word_embeddings
    assert bool(summary.untied) == (name == "llama-tied-lora_on_lm_head-peft")
    if expected.dtype == torch.float32:  # (a bf16 model cast in memory keeps bf16 rotary buffers: not comparable)
        inputs = tm.example_inputs("llama", expected)
        assert torch.equal(loaded(**inputs).logits, expected(**inputs).logits)

    # The rewritten index names exactly the tensors of the shards, with their byte total.
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    tensors = folder_tensors(tmp_path / "out")
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for key, shard in index["weight_map"].items():
        with safe_open(str(tmp_path / "out" / shard), "pt") as handle:
            assert key in handle.keys()
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"fake": "tokenizer"}'
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp folder left


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_blocked_merge_equals_merge_and_unload(tmp_path, kind, monkeypatch):
    """Tensors bigger than a block are merged block by block (rows of W, or columns of A for the
    transposed layouts: Conv1D and embeddings); the blocks must join to exactly the bits
    merge_and_unload computes for the whole tensor."""
    import minilora.ops as ops_module

    monkeypatch.setattr(ops_module, "_BLOCK_ELEMENTS", 1)  # every block at the 256-row floor
    if kind == "llama":
        torch.manual_seed(0)
        base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=700, hidden_size=32, intermediate_size=520, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False)).eval()
        targets = ["embed_tokens", "lm_head", "gate_proj", "down_proj", "q_proj"]
    else:
        torch.manual_seed(0)
        base = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=600, n_embd=288, n_layer=1,
                                                                    n_head=4, n_positions=32)).eval()
        targets = ["c_attn", "c_fc", "c_proj", "wte"]
    shapes = {k: v.shape for k, v in base.state_dict().items()}
    assert sum(s[0] > 256 for s in shapes.values() if len(s) == 2) >= 3  # several tensors span blocks
    base.save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = minilora.inject(copy.deepcopy(base), target_modules=targets, r=8, lora_alpha=16)
    tm.randomize_adapters(ours)
    save_adapter(ours, tmp_path / "adapter")
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        absolute = copy.deepcopy(ours)
        with torch.no_grad():
            for p in absolute.parameters():
                p.abs_()
        mag = minilora.merge_and_unload(absolute).state_dict()  # |W| + s·|B||A|, in each layout
        want = minilora.merge_and_unload(ours).state_dict()
    got = folder_tensors(tmp_path / "out")
    changed = 0
    for key, value in got.items():
        # Bit-identical when BLAS runs a block of rows of s·B@A on the same kernel as the whole
        # product (MKL on AVX-512 here); MKL's AVX2 kernels sum its r = 8 terms in another order
        # for 256 rows than for 700. Either way each side is within r + 3 float32 roundings of
        # |W| + s·|B||A| of the exact value, so within twice that of each other.
        bound = 2 * (8 + 3) * 2**-24 * mag[key].double()
        assert ((value.double() - want[key].double()).abs() <= bound).all(), key
        changed += not torch.equal(value, base.state_dict()[key])
    assert changed >= 4


@pytest.mark.parametrize("direction", ["backbone-adapter", "backbone-checkpoint"])
def test_adapter_and_checkpoint_with_different_prefixes(tmp_path, direction, capsys):
    """An adapter trained on LlamaModel (names ``layers.0...``) into a LlamaForCausalLM checkpoint
    (``model.layers.0...``), and an adapter of the causal LM into a LlamaModel checkpoint: the
    names are mapped, the mapping is reported, and the result is merge_and_unload's."""
    full = tiny_llama(False)
    ours = minilora.inject(copy.deepcopy(full), target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)
    tm.randomize_adapters(ours)
    want = minilora.merge_and_unload(copy.deepcopy(ours)).state_dict()
    if direction == "backbone-adapter":
        full.save_pretrained(tmp_path / "base")
        backbone = minilora.inject(copy.deepcopy(full.model), target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)
        backbone.load_state_dict({k.removeprefix("model."): v for k, v in ours.state_dict().items()
                                  if k.startswith("model.")})
        save_adapter(backbone, tmp_path / "adapter")  # keys base_model.model.layers.*
        prefix = "model."
    else:
        full.model.save_pretrained(tmp_path / "base")
        save_adapter(ours, tmp_path / "adapter")  # keys base_model.model.model.layers.*
        want = {k.removeprefix("model."): v for k, v in want.items() if k.startswith("model.")}
        prefix = ""
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert any(k.startswith("base_model.model.layers.") for k in f.keys()) == (direction == "backbone-adapter")
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out"),
                 "--no-progress"]) == 0
    assert "mapped accordingly" in capsys.readouterr().out
    got = folder_tensors(tmp_path / "out")
    assert set(got) == set(want)
    for key, value in got.items():
        assert torch.equal(value, want[key]), key
    assert not torch.equal(got[prefix + "layers.0.self_attn.q_proj.weight"],
                           full.state_dict()["model.layers.0.self_attn.q_proj.weight"])


def test_merge_matches_float64_reference_and_peft(tmp_path):
    """Independent of minilora's own merge: W + s·B@A in float64 from the files, and peft's
    merge_and_unload on the same weights (scaling per rank/alpha pattern, rsLoRA)."""
    base = tiny_llama(False)
    fields = dict(target_modules=["q_proj", "v_proj", "lm_head"], r=4, lora_alpha=6, use_rslora=True,
                  rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3})
    base.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    ours = minilora.inject(copy.deepcopy(base), minilora.LoraConfig(**fields))
    tm.randomize_adapters(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fields))
    tm.copy_to_peft(ours, theirs)
    theirs.save_pretrained(tmp_path / "adapter")
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progress=False)
    got = folder_tensors(tmp_path / "out")
    base_sd = base.state_dict()
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        ad = {k: f.get_tensor(k).double() for k in f.keys()}
    for module, r, alpha in (("model.layers.1.self_attn.q_proj", 2, 6), ("model.layers.0.self_attn.v_proj", 4, 3),
                             ("lm_head", 4, 6)):
        A = ad[f"base_model.model.{module}.lora_A.weight"]
        B = ad[f"base_model.model.{module}.lora_B.weight"]
        assert A.shape[0] == r
        ref = base_sd[module + ".weight"].double() + alpha / r ** 0.5 * (B @ A)
        rel = (got[module + ".weight"].double() - ref).abs().max() / ref.abs().max()
        # W + s·B·A stored in float32: r <= 4 products, scale, sum, cast: <= (r + 2)·2**-24 ~ 3.6e-7
        # of |W| + s|B||A|, which here is within 2x of the largest |W'| (the delta dominates W).
        assert rel <= 1e-6, (module, float(rel))
        delta_rel = (got[module + ".weight"].double() - base_sd[module + ".weight"].double()).abs().max()
        assert delta_rel > 1e-3  # the adapter really changed the weight
    peft_sd = theirs.merge_and_unload().state_dict()
    for key, value in got.items():
        torch.testing.assert_close(value, peft_sd[key], rtol=1e-6, atol=1e-7)


def test_cli_merge_prints_summary_and_progress(tmp_path, capsys):
    base_dir, adapter_dir, _ = make_case(tmp_path, "llama-lm_head-peft")
    assert main(["merge", str(base_dir), str(adapter_dir), str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "merged 14 LoRA modules and replaced 1 tensors" in captured.out
    assert "merging" in captured.err and "tensor" in captured.err  # the tqdm bar


def test_single_file_checkpoint(tmp_path):
    base = tiny_llama(False)
    base.save_pretrained(tmp_path / "base")  # one model.safetensors, no index
    ours = minilora.inject(copy.deepcopy(base), target_modules=["k_proj"], init_lora_weights=False)
    save_adapter(ours, tmp_path / "adapter")
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progress=False)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    want = minilora.merge_and_unload(ours).state_dict()
    got = folder_tensors(tmp_path / "out")
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_unsigned_integer_tensors_are_copied_unchanged(tmp_path):
    """safetensors' U16 / U32 / U64 (torch.uint16/32/64: quantization metadata, token maps) are
    copied bit for bit, beside the merged weights."""
    base = tiny_llama(False)
    base.save_pretrained(tmp_path / "base")
    extra = {"quant.u16": torch.tensor([0, 1, 2**16 - 1], dtype=torch.uint16),
             "quant.u32": torch.tensor([[0, 2**32 - 1], [7, 2**31]], dtype=torch.uint32),
             "quant.u64": torch.tensor([2**64 - 1, 3], dtype=torch.uint64)}
    tensors = {k: v.contiguous() for k, v in base.state_dict().items()} | extra
    save_file(tensors, str(tmp_path / "base" / "model.safetensors"), metadata={"format": "pt"})
    ours = minilora.inject(copy.deepcopy(base), target_modules=["q_proj"], init_lora_weights=False)
    save_adapter(ours, tmp_path / "adapter")
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progress=False)
    got = folder_tensors(tmp_path / "out")
    for key, value in extra.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape
        assert torch.equal(got[key].view(torch.uint8), value.view(torch.uint8)), key
    want = minilora.merge_and_unload(ours).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_unmerged_weight_files_are_not_copied(tmp_path, capsys):
    """Weight files other than the merged shards, at any depth, would hold unmerged weights
    (Llama 3's original/consolidated.00.pth, Mistral's consolidated.safetensors): left out and
    reported; every other file and folder is copied."""
    base = tiny_llama(False)
    base.save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "original").mkdir()
    (tmp_path / "base" / "original" / "consolidated.00.pth").write_bytes(b"pickle")
    (tmp_path / "base" / "original" / "params.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "base" / "consolidated.safetensors"))
    ours = minilora.inject(copy.deepcopy(base), target_modules=["q_proj"], init_lora_weights=False)
    save_adapter(ours, tmp_path / "adapter")
    assert main(["merge", "--no-progress", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out")]) == 0
    assert "not copied (weight files other than the merged ones would hold unmerged weights): " \
           "['consolidated.safetensors', 'original/consolidated.00.pth']" in capsys.readouterr().out
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*")) == [
        "config.json", "generation_config.json", "model.safetensors", "original", "original/params.json"]


# ---------------------------------------------------------------- memory
_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch, transformers, safetensors
    from safetensors.torch import load_file
    from minilora.offline_merge import _model_facts, merge_checkpoint

    def kib(field):  # from /proc/self/status: VmRSS (now) or VmHWM (peak since the last reset)
        return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(field)))

    mode, base, adapter, out = sys.argv[1:5]
    # One-time costs that do not grow with the model are paid before measuring: the imports, and
    # transformers' modeling code that the meta-device build loads (about 200 MB for Llama).
    _model_facts(Path(base))
    import gc; gc.collect()  # garbage of the warm-up must not be freed (or not) inside the measurement
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS to the current RSS
    before = kib("VmRSS")
    if mode == "merge":
        merge_checkpoint(base, adapter, out, progress=False)
    else:  # the control: the same instrument, loading the whole checkpoint at once
        tensors = [{k: v.clone() for k, v in load_file(str(f)).items()} for f in sorted(Path(base).glob("*.safetensors"))]
    print(json.dumps({"growth": (kib("VmHWM") - before) * 1024}))
""")


def test_peak_memory_is_far_below_checkpoint_size(tmp_path):
    """A 212 MiB bf16 checkpoint (8 wide Llama layers, 3 shards) and an all-linear r=8 adapter:
    the merge's peak RSS growth (peak reset through /proc/self/clear_refs) must stay at a few
    blocks (about 4 MiB of fp32 each), far below the checkpoint size. glibc's allocator is pinned to a fixed mmap threshold in the measured process: with its
    default dynamic threshold, freed blocks stay in the heap and RSS drifts up by a model-independent
    20-40 MiB (measured), noise that would swamp what this test is about. The growth is printed (-s)."""
    hidden, inter, vocab, layers = 1024, 2816, 4096, 8
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                                      tie_word_embeddings=False, architectures=["LlamaForCausalLM"], dtype="bfloat16")
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base_dir.mkdir()
    config.save_pretrained(base_dir)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in transformers.LlamaForCausalLM(config).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}, {}, {}]
    for i, (key, shape) in enumerate(sorted(shapes.items())):
        shards[i % 3][key] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file(tensors, str(base_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * 2 for t in tensors.values())
    del shards, tensors
    (base_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    assert total > 200 * 2**20

    # The adapter in peft's format, written directly: LoRA r=8 on every linear layer of the blocks.
    r, adapter = 8, {}
    for key, shape in shapes.items():
        if key.endswith("_proj.weight"):
            module = key[: -len(".weight")]
            adapter[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, shape[1], generator=g) * 0.01
            adapter[f"base_model.model.{module}.lora_B.weight"] = torch.randn(shape[0], r, generator=g) * 0.01
    adapter_dir.mkdir()
    save_file(adapter, str(adapter_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = minilora.LoraConfig(r=r, lora_alpha=16, target_modules=tm.LLAMA_TARGETS).to_dict()
    (adapter_dir / "adapter_config.json").write_text(json.dumps(cfg))

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "MALLOC_MMAP_THRESHOLD_": "262144"}

    def peak_growth(mode: str) -> int:
        result = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, mode, str(base_dir), str(adapter_dir),
                                 str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout.strip().splitlines()[-1])["growth"]

    merged, loaded = peak_growth("merge"), peak_growth("load")
    largest = 2 * max(hidden * inter, vocab * hidden)  # bytes of the largest tensor (bf16)
    print(f"checkpoint {total / 2**20:.0f} MiB, largest tensor {largest / 2**20:.1f} MiB: peak RSS growth "
          f"{merged / 2**20:.0f} MiB merging, {loaded / 2**20:.0f} MiB loading it whole")
    assert loaded > 0.9 * total  # the instrument does see memory proportional to the checkpoint
    # Measured 14 MiB alone and up to 26 MiB beside a busy test run: a few blocks of about 4 MiB,
    # plus Python objects of the meta-device model built to read the architecture (their garbage
    # collection timing varies). Holding any shard (70 MiB) or the checkpoint would fail this.
    assert merged < 0.2 * total

    # Spot-check one merged tensor against a float64 reference.
    key = "model.layers.5.mlp.down_proj"
    with safe_open(str(base_dir / weight_map[key + ".weight"]), "pt") as f:
        w = f.get_tensor(key + ".weight").double()
    A, B = adapter[f"base_model.model.{key}.lora_A.weight"].double(), adapter[f"base_model.model.{key}.lora_B.weight"].double()
    got = folder_tensors(tmp_path / "out")[key + ".weight"]
    assert got.dtype == torch.bfloat16
    ref = (w + 2.0 * B @ A)
    assert (got.double() - ref).abs().max() <= 2 ** -8 * ref.abs().max()  # one bf16 rounding
    assert not torch.equal(got, w.to(torch.bfloat16))


def test_token_rows_of_a_backbone_adapter_follow_the_mapped_prefix(tmp_path):
    """LoRA and token rows trained on LlamaModel (``embed_tokens``), merged into a LlamaForCausalLM
    checkpoint (``model.embed_tokens``): the rows go where the LoRA modules' mapping says."""
    full = tiny_llama(False)
    full.save_pretrained(tmp_path / "base")
    backbone = minilora.inject(copy.deepcopy(full.model), target_modules=["q_proj"], trainable_token_indices=[3, 5])
    tm.randomize_adapters(backbone)
    rows = backbone.embed_tokens.tokens["default"].delta
    with torch.no_grad():
        rows.copy_(torch.randn(rows.shape, generator=torch.Generator().manual_seed(0)))
    save_adapter(backbone, tmp_path / "adapter")
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progress=False)
    got = folder_tensors(tmp_path / "out")
    merged = minilora.merge_and_unload(backbone).state_dict()
    for key in ("embed_tokens.weight", "layers.0.self_attn.q_proj.weight", "layers.1.self_attn.q_proj.weight"):
        assert torch.equal(got["model." + key], merged[key]), key
    assert torch.equal(got["model.embed_tokens.weight"][[3, 5]], rows.detach())
    assert torch.equal(got["lm_head.weight"], full.lm_head.weight)
