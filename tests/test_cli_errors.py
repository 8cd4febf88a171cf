"""Every CLI error: one line on stderr naming what was wrong, a non-zero exit code, no
traceback (unless --debug), and nothing on disk changed (OUT absent, inputs untouched)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import minilora
from minilora.checkpoint import save_adapter
from minilora.cli import main
from minilora import offline_merge as merge_module

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[1]


def tiny_llama(**overrides):
    torch.manual_seed(0)
    fields = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**fields, **overrides})).eval()


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def ckpt(tmp_path):
    """A sharded tiny Llama and a matching minilora adapter (q_proj, v_proj, lm_head copy)."""
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    model = minilora.inject(copy.deepcopy(base), target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                            init_lora_weights=False)
    save_adapter(model, tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, pattern: str, command: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"minilora {command}: error: ")
    assert "Traceback" not in err
    assert not re.search(r"\b[A-Z]\w*(Error|Exception)\b", lines[0]), lines[0]  # says what, not which class
    assert re.search(pattern, lines[0]), lines[0]


# ---------------------------------------------------------------- merge
def merge_fails(capsys, base, adapter, out, pattern: str) -> None:
    """`minilora merge` exits 1 with one line matching ``pattern`` and leaves no OUT."""
    code, _, err = run_cli(capsys, "merge", "--no-progress", base, adapter, out)
    assert code == 1
    assert_one_line_error(err, pattern, "merge")
    assert not Path(out).exists()


def _edit_adapter(adapter: Path, change) -> None:
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    change(tensors)
    save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _remap_first_shard(shard):
    return lambda base, ad: _edit_json(base / "model.safetensors.index.json", lambda d: d["weight_map"].update(
        {next(iter(d["weight_map"])): shard}))


def _replace_by_folder(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _replace_by_pipe(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _tensor_in_two_shards(base: Path) -> None:
    first, second = sorted(base.glob("model-*.safetensors"))[:2]
    tensors = load_file(str(second))
    tensors.update(dict([next(iter(load_file(str(first)).items()))]))
    save_file(tensors, str(second), metadata={"format": "pt"})


def _single_file_is_a_folder(base: Path) -> None:
    for p in base.glob("model*.safetensors*"):
        p.unlink()
    (base / "model.safetensors").mkdir()


def _symlink_loop(base: Path) -> None:
    (base / "sub").mkdir()
    os.symlink("..", base / "sub" / "loop")


_Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
_Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
_Q = r"adapter_model\.safetensors: LoRA module 'model\.layers\.0\.self_attn\.q_proj': "


MERGE_ERRORS = {
    "missing-module": (lambda base, ad: _edit_adapter(ad, lambda t: t.update({
        "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight": torch.zeros(8, 32),
        "base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight": torch.zeros(32, 8)})),
        r"LoRA module 'model\.layers\.7\.self_attn\.q_proj' needs 'model\.layers\.7\.self_attn\.q_proj\.weight', "
        r"which is not in .*closest: model\.layers\.\d\.self_attn\.q_proj\.weight"),
    "shape-mismatch": (lambda base, ad: _edit_adapter(ad, lambda t: t.update({
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 40)})),
        r"'model\.layers\.0\.self_attn\.q_proj' has weight \[32, 32\] .* delta is \[32, 40\] \(lora_A \[8, 40\], "
        r"lora_B \[32, 8\]\); was it trained on another model\?"),
    "modules_to_save-shape": (lambda base, ad: _edit_adapter(ad, lambda t: t.update({
        "base_model.model.lm_head.weight": torch.zeros(64, 33)})),
        r"'base_model\.model\.lm_head\.weight' has shape \[64, 33\] but 'lm_head\.weight' .* is \[64, 32\]"),
    # rows for a grown vocabulary in the head only: the embedding's new rows are unknown
    "grown-head-only": (lambda base, ad: _edit_adapter(ad, lambda t: t.update({
        "base_model.model.lm_head.weight": torch.zeros(65, 32)})),
        r"gives \['lm_head\.weight'\] 65 rows .* holds no rows for 'model\.embed_tokens\.weight' \(64 in .*its "
        r"new rows are unknown"),
    # a peft-written file (no config digest: _edit_adapter rewrites it without) with a config that lies
    "rank-vs-config": (lambda base, ad: (_edit_adapter(ad, lambda t: None), (ad / "adapter_config.json").write_text(
        json.dumps({**json.loads((ad / "adapter_config.json").read_text()), "r": 4}))),
        r"gives 'model\.layers\.\d\.self_attn\.[qv]_proj' rank 4, but its lora_A has rank 8"),
    # D8: a minilora-written file beside another config (a save killed between its two renames)
    "config-not-saved-with-weights": (lambda base, ad: (ad / "adapter_config.json").write_text(json.dumps(
        {**json.loads((ad / "adapter_config.json").read_text()), "lora_alpha": 3})),
        r"adapter_model\.safetensors was saved together with another adapter_config\.json than the one beside it"),
    "half-pair": (lambda base, ad: _edit_adapter(ad, lambda t: t.pop(
        "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight")),
        r"adapter has lora_A but not lora_B for 'model\.layers\.0\.self_attn\.v_proj'"),
    # DoRA is merged (tests/test_cli_merge_dora.py), but its magnitudes must agree with use_dora, as for load_adapter
    "dora-magnitude-without-use_dora": (lambda base, ad: _edit_adapter(ad, lambda t: t.update({
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(32)})),
        r"has the unexpected key 'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_magnitude_vector', "
        r"a DoRA magnitude of LoRA module 'model\.layers\.0\.self_attn\.q_proj', but adapter_config\.json says "
        r"use_dora=false"),
    "dora-config-without-magnitudes": (lambda base, ad: (_edit_adapter(ad, lambda t: None), _edit_json(
        ad / "adapter_config.json", lambda d: d.update(use_dora=True))),
        r"lacks 'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_magnitude_vector' \(and 3 more "
        r"module\(s\)\), the DoRA magnitude of LoRA module 'model\.layers\.0\.self_attn\.q_proj' that the config "
        r"implies"),
    "unknown-variant": (lambda base, ad: _edit_adapter(ad, lambda t: t.update({
        "base_model.model.model.layers.0.self_attn.q_proj.lora_E": torch.ones(8)})),
        r"'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_E' is neither LoRA nor DoRA "
        r"\(another variant\?\)"),
    "not-peft-keys": (lambda base, ad: _edit_adapter(ad, lambda t: t.update({"lm_head.weight": torch.zeros(64, 32)})),
                      r"'lm_head\.weight' does not start with 'base_model\.model\.'"),
    "bad-json": (lambda base, ad: (ad / "adapter_config.json").write_text("{not json"),
                 r"adapter_config\.json is not valid JSON"),
    "no-adapter-config": (lambda base, ad: (ad / "adapter_config.json").unlink(),
                          r"has no adapter_config\.json; is it a peft adapter folder\?"),
    "pickled-adapter": (lambda base, ad: ((ad / "adapter_model.safetensors").rename(ad / "adapter_model.bin")),
                        r"has no adapter_model\.safetensors \(it has adapter_model\.bin, which minilora never unpickles"),
    "pickled-base": (lambda base, ad: [p.unlink() for p in list(base.glob("model*.safetensors*"))]
                     + [(base / "pytorch_model.bin").write_bytes(b"not a pickle")],
                     r"neither model\.safetensors nor model\.safetensors\.index\.json; it has \['pytorch_model\.bin'\], "
                     r"which minilora never unpickles"),
    "missing-shard": (lambda base, ad: sorted(base.glob("model-*.safetensors"))[0].unlink(),
                      r"names shard 'model-00001-of-\d+\.safetensors', which does not exist"),
    # BASE's config.json: read whenever it exists (OUT would get a copy); an unknown model only means "use shapes"
    "config-not-json": (lambda base, ad: (base / "config.json").write_text("{broken"),
                        r"base/config\.json is not valid JSON"),
    "config-not-object": (lambda base, ad: (base / "config.json").write_text("[1, 2]"),
                          r"base/config\.json holds a JSON list, expected an object of model config fields"),
    "config-too-deep": (lambda base, ad: (base / "config.json").write_text("[" * 100_000 + "]" * 100_000),
                        r"base/config\.json nests JSON values more than 64 deep"),
    "config-folder": (lambda base, ad: _replace_by_folder(base / "config.json"), r"base/config\.json is a folder"),
    "config-pipe": (lambda base, ad: _replace_by_pipe(base / "config.json"),
                    r"base/config\.json is not a regular file \(a pipe or a device\?\)"),
    "config-architectures-string": (
        lambda base, ad: _edit_json(base / "config.json", lambda d: d.update(architectures="LlamaForCausalLM")),
        r"base/config\.json: 'architectures' is 'LlamaForCausalLM', expected a list of model class names"),
    "config-model_type-list": (lambda base, ad: _edit_json(base / "config.json", lambda d: d.update(model_type=["llama"])),
                               r"base/config\.json: 'model_type' is \['llama'\], expected a name such as 'llama'"),
    # the shard index
    "index-not-object": (lambda base, ad: (base / "model.safetensors.index.json").write_text("[]"),
                         r"index\.json holds a JSON list, expected an object with a 'weight_map'"),
    "index-weight_map-list": (
        lambda base, ad: _edit_json(base / "model.safetensors.index.json", lambda d: d.update(weight_map=[1])),
        r"index\.json has no 'weight_map' object of tensor name -> shard file"),
    "index-shard-not-a-name": (_remap_first_shard(1), r"index\.json: weight_map maps '[\w.]+' to 1; a shard must be "
                                                      r"the name of a \.safetensors file directly in BASE"),
    "index-shard-dotdot": (_remap_first_shard("../model.safetensors"),
                           r"index\.json: weight_map maps '[\w.]+' to '\.\./model\.safetensors'; a shard must be"),
    "index-shard-absolute": (_remap_first_shard("/etc/passwd"), r"index\.json: weight_map maps '[\w.]+' to '/etc/passwd'"),
    "index-metadata-list": (
        lambda base, ad: _edit_json(base / "model.safetensors.index.json", lambda d: d.update(metadata=[1])),
        r"index\.json: 'metadata' is a list, expected an object"),
    "index-shard-folder": (lambda base, ad: (_remap_first_shard("sub.safetensors")(base, ad),
                                             (base / "sub.safetensors").mkdir()),
                           r"names shard 'sub\.safetensors', which is not a regular file"),
    "tensor-in-two-shards": (lambda base, ad: _tensor_in_two_shards(base),
                             r"tensor '[\w.]+' is in two shards of .*base, model-00001-of-\d+\.safetensors and "
                             r"model-00002-of-\d+\.safetensors; remove one"),
    "single-file-folder": (lambda base, ad: _single_file_is_a_folder(base), r"base/model\.safetensors is not a regular file"),
    # LoRA factors of the wrong dims or ranks
    "lora_A-1-D": (lambda base, ad: _edit_adapter(ad, lambda t: t.update({_Q_A: torch.zeros(8)})),
                   _Q + r"lora_A \[8\] and lora_B \[32, 8\] must both be 2-D for its 2-D weight \[32, 32\]"),
    "lora_A-3-D": (lambda base, ad: _edit_adapter(ad, lambda t: t.update({_Q_A: torch.zeros(8, 32, 1)})),
                   _Q + r"lora_A \[8, 32, 1\] and lora_B \[32, 8\] must both be 2-D"),
    "lora_B-1-D": (lambda base, ad: _edit_adapter(ad, lambda t: t.update({_Q_B: torch.zeros(32)})),
                   _Q + r"lora_A \[8, 32\] and lora_B \[32\] must both be 2-D"),
    "lora_B-rank": (lambda base, ad: _edit_adapter(ad, lambda t: t.update({_Q_B: torch.zeros(32, 4)})),
                    _Q + r"lora_A \[8, 32\] has rank 8 but lora_B \[32, 4\] has rank 4"),
    "embedding-lora_A-1-D": (lambda base, ad: _edit_adapter(ad, lambda t: t.update({
        "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(8),
        "base_model.model.model.embed_tokens.lora_embedding_B": torch.zeros(32, 8)})),
        r"adapter_model\.safetensors: LoRA module 'model\.embed_tokens': lora_A \[8\] and lora_B \[32, 8\] must both "
        r"be 2-D"),
    # what BASE holds besides the weights (copied into OUT)
    "base-symlink-loop": (lambda base, ad: _symlink_loop(base),
                          r"base: the folder link sub/loop leads back to .*base, which contains it \(a symlink loop\)"),
    "base-pipe": (lambda base, ad: os.mkfifo(base / "pipe"),
                  r"base: pipe is a named pipe, not a file or folder, so it cannot be copied into OUT"),
    "base-broken-symlink": (lambda base, ad: os.symlink("nowhere", base / "tokenizer.json"),
                            r"base: tokenizer\.json is a symlink to 'nowhere', which does not exist"),
}


@pytest.mark.parametrize("case", list(MERGE_ERRORS))
def test_merge_errors_leave_out_absent(ckpt, capsys, case):
    base, adapter = ckpt
    breaker, pattern = MERGE_ERRORS[case]
    breaker(base, adapter)
    before = snapshot(base), snapshot(adapter)
    merge_fails(capsys, base, adapter, base.parent / "out", pattern)
    assert [p.name for p in base.parent.iterdir() if p.name.startswith(".out")] == []
    assert (snapshot(base), snapshot(adapter)) == before


def test_lora_bias_of_the_wrong_shape_is_refused(tmp_path, capsys):
    """A lora_B.bias of shape (1,) would be broadcast over every output unnoticed."""
    base = tiny_llama(attention_bias=True)
    base.save_pretrained(tmp_path / "base")
    model = minilora.inject(copy.deepcopy(base), target_modules=["q_proj"], lora_bias=True, init_lora_weights=False)
    save_adapter(model, tmp_path / "adapter")
    _edit_adapter(tmp_path / "adapter", lambda t: t.update(
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias": torch.ones(1)}))
    capsys.readouterr()  # (save_pretrained's progress bar)
    code, _, err = run_cli(capsys, "merge", "--no-progress", tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert code == 1
    assert_one_line_error(err, r"the lora_bias of 'model\.layers\.0\.self_attn\.q_proj' has shape \[1\] and its bias "
                               r"in .*base \[32\], but lora_B \[32, 8\] makes 32 outputs", "merge")
    assert not (tmp_path / "out").exists()


def test_out_parent_is_a_file(ckpt, capsys):
    base, adapter = ckpt
    code, _, err = run_cli(capsys, "merge", base, adapter, base / "config.json" / "out")
    assert code == 1
    assert_one_line_error(err, r"the parent folder of OUT, .*base/config\.json, is not a folder", "merge")


def test_unexpected_errors_are_marked_internal_and_os_errors_name_the_path(capsys, monkeypatch):
    """A failure no check turned into a message shows as an internal error (so the gap is seen);
    an OSError says which path the system refused, without errno noise."""
    from minilora.cli import inspect as inspect_module

    monkeypatch.setattr(inspect_module, "run", lambda args: [][1])
    code, _, err = run_cli(capsys, "inspect", "x")
    assert code == 1
    assert err.startswith("minilora inspect: error: internal error, please report: IndexError: list index out of "
                          "range (--debug shows the traceback)")

    def refuse(args):
        raise PermissionError(13, "Permission denied", "/models/x/config.json")

    monkeypatch.setattr(inspect_module, "run", refuse)
    code, _, err = run_cli(capsys, "inspect", "x")
    assert_one_line_error(err, r"^minilora inspect: error: /models/x/config\.json: Permission denied \(--debug", "inspect")


def test_merge_refuses_existing_out_and_keeps_it(ckpt, capsys):
    base, adapter = ckpt
    out = base.parent / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "merge", base, adapter, out)
    assert code == 1
    assert_one_line_error(err, r"OUT .*out already exists; give a new folder name", "merge")
    assert snapshot(out) == {"keep.txt": hashlib.sha256(b"mine").hexdigest()}


@pytest.mark.parametrize("which", ["BASE", "ADAPTER"])
def test_merge_missing_folders(ckpt, capsys, which):
    base, adapter = ckpt
    args = [base.parent / "nope", adapter] if which == "BASE" else [base, base.parent / "nope"]
    code, _, err = run_cli(capsys, "merge", *args, base.parent / "out")
    assert code == 1
    assert_one_line_error(err, rf"{which} .*nope is not a folder", "merge")
    assert not (base.parent / "out").exists()


def test_merge_failure_while_writing_leaves_nothing(ckpt, capsys, monkeypatch):
    """A failure after some shards are written (disk full, ...) removes the partial folder."""
    base, adapter = ckpt
    real, calls = merge_module._write_safetensors, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(merge_module, "_write_safetensors", failing)
    code, _, err = run_cli(capsys, "merge", "--no-progress", base, adapter, base.parent / "out")
    assert code == 1
    assert_one_line_error(err, r"merging into OUT .*out failed \(No space left on device\); nothing was written", "merge")
    assert len(calls) == 3
    assert sorted(p.name for p in base.parent.iterdir()) == ["adapter", "base"]


def test_debug_shows_the_traceback(ckpt):
    base, adapter = ckpt
    with pytest.raises(FileExistsError, match="already exists"):
        main(["--debug", "merge", str(base), str(adapter), str(base)])
    with pytest.raises(FileExistsError, match="already exists"):
        main(["merge", "--debug", str(base), str(adapter), str(base)])


# ---------------------------------------------------------------- inspect
INSPECT_ERRORS = {
    "not-json": (lambda p: p.write_text("{broken"), r"config\.json is not valid JSON"),
    "empty": (lambda p: p.write_text(""), r"config\.json is not valid JSON \(Expecting value"),
    "not-object": (lambda p: p.write_text('"llama"'), r"config\.json holds a JSON str, expected an object"),
    "too-deep": (lambda p: p.write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"),
                 r"config\.json nests JSON values more than 64 deep"),
    "too-large": (lambda p: p.write_text(" " * (17 << 20) + "{}"), r"config\.json is larger than 16 MiB"),
    "folder": (_replace_by_folder, r"config\.json is a folder"),
    "pipe": (_replace_by_pipe, r"config\.json is not a regular file"),
    "architectures-string": (lambda p: _edit_json(p, lambda d: d.update(architectures="LlamaForCausalLM")),
                             r"config\.json: 'architectures' is 'LlamaForCausalLM', expected a list of model class"),
    "architecture-not-a-model": (lambda p: _edit_json(p, lambda d: d.update(architectures=["pipeline"])),
                                 r"config\.json names architecture 'pipeline', which transformers .* does not have"),
    "architecture-of-another-type": (lambda p: _edit_json(p, lambda d: d.update(architectures=["GPT2LMHeadModel"])),
                                     r"config\.json names architecture 'GPT2LMHeadModel', which takes a GPT2Config, but "
                                     r"its model_type 'llama' makes a LlamaConfig"),
    "no-model_type": (lambda p: _edit_json(p, lambda d: d.pop("model_type")),
                      r"config\.json has no 'model_type', which names the config class"),
    "unknown-model_type": (lambda p: _edit_json(p, lambda d: d.update(model_type="my-own")),
                           r"config\.json has model_type 'my-own', which transformers .* does not know"),
    "field-of-wrong-type": (lambda p: _edit_json(p, lambda d: d.update(hidden_size="abc")),
                            r"config\.json: transformers .* refuses it as a model_type 'llama' config: .*'hidden_size'"),
    "dict-field-as-list": (lambda p: _edit_json(p, lambda d: d.update(id2label=[1, 2])),
                           r"config\.json: transformers .* refuses it .*; check 'id2label' is \[1, 2\] where LlamaConfig "
                           r"has an object"),
    "negative-size": (lambda p: _edit_json(p, lambda d: d.update(vocab_size=-3)),
                      r"config\.json: transformers .* could not build LlamaForCausalLM from it: .*negative dimension -3"),
    "too-many-layers": (lambda p: _edit_json(p, lambda d: d.update(num_hidden_layers=1000)),
                        r"config\.json describes a model of more than 50 modules"),
}


@pytest.mark.parametrize("case", list(INSPECT_ERRORS))
def test_inspect_config_errors(tmp_path, capsys, monkeypatch, case):
    from minilora import model_config

    monkeypatch.setattr(model_config, "MAX_MODULES", 50, raising=False)  # (the real bound takes seconds)
    config = tiny_llama().config
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp_path)
    breaker, pattern = INSPECT_ERRORS[case]
    breaker(tmp_path / "config.json")
    code, out, err = run_cli(capsys, "inspect", tmp_path, "--targets", "q_proj")
    assert code == 1 and out == ""
    assert_one_line_error(err, pattern, "inspect")


def test_inspect_errors(tmp_path, capsys):
    code, _, err = run_cli(capsys, "inspect", tmp_path)
    assert code == 1
    assert_one_line_error(err, r"MODEL_DIR .* has no config\.json; give a transformers model folder", "inspect")

    (tmp_path / "config.json").write_text("{broken")
    code, _, err = run_cli(capsys, "inspect", tmp_path)
    assert_one_line_error(err, r"config\.json is not valid JSON", "inspect")

    config = tiny_llama().config
    config.architectures = ["NotAModelForCausalLM"]
    config.save_pretrained(tmp_path)
    code, _, err = run_cli(capsys, "inspect", tmp_path)
    assert code == 1
    assert_one_line_error(err, r"architecture 'NotAModelForCausalLM', which transformers .* does not have", "inspect")


def test_inspect_nothing_matches(tmp_path, capsys):
    config = tiny_llama().config
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp_path)
    code, out, err = run_cli(capsys, "inspect", tmp_path, "--targets", "q_prj")
    assert code == 1
    assert_one_line_error(err, r"no module matches target_modules: 'q_prj' \(closest: model\.layers\.0\.self_attn\.q_proj",
                          "inspect")
    code, _, err = run_cli(capsys, "inspect", tmp_path, "--targets", "q_proj", "--targets-regex", ".*")
    assert code == 1
    assert_one_line_error(err, r"give either --targets NAME \.\.\. or --targets-regex PATTERN, not both", "inspect")
    code, _, err = run_cli(capsys, "inspect", tmp_path, "--targets", "q_proj", "--r", "0")
    assert_one_line_error(err, r"LoraConfig\.r=0 is invalid: the rank must be an integer from 1", "inspect")


# ---------------------------------------------------------------- demo (errors are raised before any work)
@pytest.mark.parametrize("argv, pattern", [
    (["--model", "m"], r"--model and --data go together"),
    (["--data", "d.txt"], r"--model and --data go together"),
    (["--steps", "0"], r"--steps 0: give a positive number of training steps"),
    (["--threads", "0"], r"--threads 0: give a positive number of threads"),
])
def test_demo_argument_errors(tmp_path, capsys, argv, pattern):
    code, _, err = run_cli(capsys, "demo", "--out", tmp_path / "demo", *argv)
    assert code == 1
    assert_one_line_error(err, pattern, "demo")
    assert not (tmp_path / "demo").exists()


def test_demo_missing_model_and_data(tmp_path, capsys):
    code, _, err = run_cli(capsys, "demo", "--out", tmp_path / "o", "--model", tmp_path, "--data", tmp_path / "x.txt")
    assert_one_line_error(err, r"--model .* has no config\.json", "demo")
    tiny_llama().config.save_pretrained(tmp_path)
    code, _, err = run_cli(capsys, "demo", "--out", tmp_path / "o", "--model", tmp_path, "--data", tmp_path / "x.txt")
    assert code == 1
    assert_one_line_error(err, r"--data .*x\.txt is not a file; give a UTF-8 text file", "demo")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- usage errors (argparse), laziness
@pytest.mark.parametrize("argv, pattern", [
    (["merge", "a"], r"minilora merge: error: the following arguments are required: ADAPTER, OUT \(see minilora merge --help\)"),
    (["frobnicate"], r"minilora: error: argument COMMAND: invalid choice: 'frobnicate'"),
    (["inspect", "x", "--r", "two"], r"minilora inspect: error: argument --r: invalid int value: 'two'"),
])
def test_usage_errors_are_one_line(capsys, argv, pattern):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(pattern, err), err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "merge" in capsys.readouterr().err


def test_python_dash_m_and_lazy_imports():
    """`python -m minilora` works; building the CLI imports neither transformers nor matplotlib;
    the library never imports the CLI."""
    code = ("import sys, minilora; assert 'minilora.cli' not in sys.modules; "
            "import minilora.cli as c; c._build_parser(); "
            "print(sorted(m for m in ('transformers', 'matplotlib', 'peft') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    result = subprocess.run([sys.executable, "-m", "minilora", "bench"], capture_output=True, text=True, cwd=REPO,
                            timeout=120)
    assert result.returncode == 0 and "bench_cpu.py" in result.stdout
    result = subprocess.run([sys.executable, "-m", "minilora", "merge", "/nonexistent/a", "/nonexistent/b", "/tmp/x"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == ("minilora merge: error: BASE /nonexistent/a is not a folder "
                                     "(--debug shows the traceback)")


# ---------------------------------------------------------------- D1: one validation for both readers
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
HEAD = "base_model.model.lm_head.weight"


def _set(key, value_fn):
    return lambda t: t.update({key: value_fn(t[key])})


# (change to the adapter file, what both load_adapter and `minilora merge` must say)
BAD_VALUES = {
    # was: 1024 non-finite merged weights and exit 0
    "nan lora_B": (_set(Q_B, lambda v: v.clone().fill_(float("nan"))),
                   rf"'{re.escape(Q_B)}' has 256 value\(s\) that are NaN or inf as torch\.float32"),
    # was: accepted and merged as integers
    "int8 lora_A": (_set(Q_A, lambda v: v.to(torch.int8)),
                    rf"'{re.escape(Q_A)}' has dtype torch\.int8, but adapter tensors are floating point"),
    # D3: finite in the file, inf in the dtype it is used in (factors are used in fp32)
    "fp64 beyond fp32": (_set(Q_A, lambda v: v.double().fill_(1e300)),
                         rf"'{re.escape(Q_A)}' has 256 value\(s\) that are NaN or inf as torch\.float32"),
    "inf in a modules_to_save copy": (_set(HEAD, lambda v: v.clone().fill_(float("inf"))),
                                      rf"'{re.escape(HEAD)}' has 2048 value\(s\) that are NaN or inf"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_load_adapter_and_merge_refuse_the_same_bad_values(ckpt, capsys, case):
    base, adapter = ckpt
    change, pattern = BAD_VALUES[case]
    _edit_adapter(adapter, change)
    model = tiny_llama()
    with pytest.raises(minilora.AdapterFileError, match=pattern):
        minilora.load_adapter(model, adapter)
    assert not hasattr(model, "minilora_state")
    merge_fails(capsys, base, adapter, base.parent / "out", pattern)


def test_merge_refuses_a_value_that_overflows_an_fp16_checkpoint(tmp_path, capsys):
    # fp32 1e5 is finite in the file and inf in the fp16 checkpoint tensor it replaces
    base = tiny_llama().half()
    base.save_pretrained(tmp_path / "base")
    model = minilora.inject(copy.deepcopy(base).float(), target_modules=["q_proj"], modules_to_save=["lm_head"])
    save_adapter(model, tmp_path / "adapter")
    _edit_adapter(tmp_path / "adapter", _set(HEAD, lambda v: v.clone().fill_(1e5)))
    capsys.readouterr()
    merge_fails(capsys, tmp_path / "base", tmp_path / "adapter", tmp_path / "out",
                rf"'{re.escape(HEAD)}' has 2048 value\(s\) that are NaN or inf as torch\.float16")


def test_merge_refuses_an_update_that_overflows_the_weight(ckpt, capsys):
    # every factor finite (1e20 fits fp32), the product s * B @ A (1e40 * 8 * 0.125 ...) does not
    base, adapter = ckpt
    _edit_adapter(adapter, lambda t: (t[Q_A].fill_(1e20), t[Q_B].fill_(1e20)))
    merge_fails(capsys, base, adapter, base.parent / "out",
                r"merging the adapter into 'model\.layers\.0\.self_attn\.q_proj\.weight' gives 1024 inf "
                r"or NaN value\(s\) in torch\.float32: the update .* is beyond that dtype's range")
    assert [p.name for p in base.parent.iterdir() if p.name.startswith(".out")] == []


def test_merge_refuses_a_catastrophic_rank_pattern_in_seconds(ckpt, capsys, monkeypatch):
    # D7: `(.|.)*q` backtracks exponentially on "model.layers.0.self_attn.q_proj" (Python's re, and
    # so peft, spins for hours). The budget is 5 s; 1 s here tests the same mechanism faster.
    from minilora import patterns

    monkeypatch.setattr(patterns, "MATCH_BUDGET_S", 1.0)
    base, adapter = ckpt
    _edit_adapter(adapter, lambda t: None)  # a peft-written file: no digest tying it to its config
    _edit_json(adapter / "adapter_config.json", lambda d: d.update(rank_pattern={"(.|.)*q": 8}))
    start = time.monotonic()
    merge_fails(capsys, base, adapter, base.parent / "out", r"adapter_config\.json: matching module names against "
                r"the regular expression .* took more than 1 s, so it was stopped")
    assert time.monotonic() - start < 10  # generous for a busy CI machine
