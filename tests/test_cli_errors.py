"""Every CLI error: one line on stderr naming what was wrong, a non-zero exit code, no
traceback (unless --debug), and nothing on disk changed (OUT absent, inputs untouched)."""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import minilora
from minilora.checkpoint import save_adapter
from minilora.cli import main
from minilora.cli import merge as merge_module

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
    import re
    assert re.search(pattern, lines[0]), lines[0]


# ---------------------------------------------------------------- merge
def _edit_adapter(adapter: Path, change) -> None:
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    change(tensors)
    save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})


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
        "base_model.model.lm_head.weight": torch.zeros(65, 32)})),
        r"'base_model\.model\.lm_head\.weight' has shape \[65, 32\] but 'lm_head\.weight' .* is \[64, 32\]"),
    "rank-vs-config": (lambda base, ad: (ad / "adapter_config.json").write_text(json.dumps(
        {**json.loads((ad / "adapter_config.json").read_text()), "r": 4})),
        r"gives 'model\.layers\.\d\.self_attn\.[qv]_proj' rank 4, but its lora_A has rank 8"),
    "half-pair": (lambda base, ad: _edit_adapter(ad, lambda t: t.pop(
        "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight")),
        r"adapter has lora_A but not lora_B for 'model\.layers\.0\.self_attn\.v_proj'"),
    "dora": (lambda base, ad: _edit_adapter(ad, lambda t: t.update({
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(32)})),
        r"is not plain LoRA \(DoRA or another variant\?\)"),
    "dora-config": (lambda base, ad: (ad / "adapter_config.json").write_text(json.dumps(
        {**json.loads((ad / "adapter_config.json").read_text()), "use_dora": True})),
        r"use_dora=True, a peft feature minilora does not implement"),
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
}


@pytest.mark.parametrize("case", list(MERGE_ERRORS))
def test_merge_errors_leave_out_absent(ckpt, capsys, case):
    base, adapter = ckpt
    breaker, pattern = MERGE_ERRORS[case]
    breaker(base, adapter)
    before = snapshot(base), snapshot(adapter)
    out = base.parent / "out"
    code, stdout, err = run_cli(capsys, "merge", "--no-progress", base, adapter, out)
    assert code == 1
    assert_one_line_error(err, pattern, "merge")
    assert not out.exists()
    assert [p.name for p in base.parent.iterdir() if p.name.startswith(".out")] == []
    assert (snapshot(base), snapshot(adapter)) == before


def test_merge_refuses_existing_out_and_keeps_it(ckpt, capsys):
    base, adapter = ckpt
    out = base.parent / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "merge", base, adapter, out)
    assert code == 1
    assert_one_line_error(err, r"FileExistsError: OUT .*out already exists; give a new folder name", "merge")
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
    assert_one_line_error(err, r"OSError: \[Errno 28\] No space left on device", "merge")
    assert len(calls) == 3
    assert sorted(p.name for p in base.parent.iterdir()) == ["adapter", "base"]


def test_debug_shows_the_traceback(ckpt):
    base, adapter = ckpt
    with pytest.raises(FileExistsError, match="already exists"):
        main(["--debug", "merge", str(base), str(adapter), str(base)])
    with pytest.raises(FileExistsError, match="already exists"):
        main(["merge", "--debug", str(base), str(adapter), str(base)])


# ---------------------------------------------------------------- inspect
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
    assert_one_line_error(err, r"LoraConfig\.r=0 is invalid: the rank must be a positive integer", "inspect")


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
    import re
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
