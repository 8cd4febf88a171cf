"""`minilora inspect`: adaptable modules grouped by repeated structure, what a targets spec
matches, and the trainable-parameter count it gives (checked against a formula and peft)."""

from __future__ import annotations

import copy
import re
import warnings

import pytest

from minilora.cli import main
from minilora.model_config import group_names
import tiny_models as tm

transformers = pytest.importorskip("transformers")


def write_config(folder, config, arch):
    config.architectures = [arch]
    config.save_pretrained(folder)
    return folder


def llama_7b_config():
    return transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)


def inspect_cli(capsys, *argv) -> str:
    assert main(["inspect", *map(str, argv)]) == 0
    return capsys.readouterr().out


def trainable_line(out: str) -> tuple[int, int]:
    match = re.search(r"r=\d+: ([\d,]+) trainable parameters of ([\d,]+)", out)
    assert match, out
    return int(match.group(1).replace(",", "")), int(match.group(2).replace(",", ""))


def test_llama_7b_from_config_alone(tmp_path, capsys):
    folder = write_config(tmp_path, llama_7b_config(), "LlamaForCausalLM")
    out = inspect_cli(capsys, folder, "--targets", "q_proj", "v_proj")
    lines = [" ".join(line.split()) for line in out.splitlines()]
    assert lines[0].endswith("LlamaForCausalLM, 6,738,415,616 parameters; modules LoRA can adapt:")
    for expected in ("model.embed_tokens Embedding 32000x4096 x1",
                     "model.layers.{0..31}.self_attn.q_proj Linear 4096->4096 x32",
                     "model.layers.{0..31}.mlp.down_proj Linear 11008->4096 x32",
                     "lm_head Linear 4096->32000 x1",
                     "targets ['q_proj', 'v_proj'] select 64 modules:"):
        assert expected in lines, (expected, out)
    assert sum(line.startswith("model.layers.{0..31}") for line in lines) == 7 + 2  # all, then the 2 chosen
    # 32 layers x 2 modules x r (in + out)
    assert trainable_line(out) == (32 * 2 * 8 * (4096 + 4096), 6_738_415_616 + 32 * 2 * 8 * 8192)
    out = inspect_cli(capsys, folder, "--targets", "all-linear", "--r", "16")
    per_layer = 4 * (4096 + 4096) + 2 * (4096 + 11008) + (11008 + 4096)
    assert trainable_line(out)[0] == 32 * 16 * per_layer  # all-linear leaves lm_head out


@pytest.mark.parametrize("kind, arch, fields", [
    ("llama", "LlamaForCausalLM", dict(target_modules="all-linear", modules_to_save=["lm_head"])),
    ("gpt2", "GPT2LMHeadModel", dict(target_modules=["c_attn", "c_proj"])),
    ("llama", "LlamaForCausalLM", dict(target_modules=r"model\.layers\.1\..*_proj", r=4)),
])
def test_count_equals_peft(tmp_path, capsys, kind, arch, fields):
    peft = pytest.importorskip("peft")
    model = tm.build(kind)
    folder = write_config(tmp_path, copy.deepcopy(model.config), arch)
    targets = fields["target_modules"]
    argv = ["--targets-regex", targets] if isinstance(targets, str) and targets != "all-linear" else \
        ["--targets", *([targets] if isinstance(targets, str) else targets)]
    argv += ["--r", str(fields.get("r", 8))]
    if fields.get("modules_to_save"):
        argv += ["--modules-to-save", *fields["modules_to_save"]]
    out = inspect_cli(capsys, folder, *argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(model, peft.LoraConfig(**fields))
    assert trainable_line(out) == theirs.get_nb_trainable_parameters()
    chosen = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    matched = re.search(r"select (\d+) modules", out)
    assert matched and int(matched.group(1)) == len(chosen)


def test_gpt2_describes_conv1d(tmp_path, capsys):
    folder = write_config(tmp_path, tm.build("gpt2").config, "GPT2LMHeadModel")
    lines = [" ".join(line.split()) for line in inspect_cli(capsys, folder).splitlines()]
    assert "transformer.h.{0,1}.attn.c_attn Conv1D 32->96 x2" in lines
    assert "transformer.h.{0,1}.mlp.c_proj Conv1D 128->32 x2" in lines
    assert lines[-1].startswith("(--targets")


def test_unmatched_target_shows_closest_and_keeps_going(tmp_path, capsys):
    folder = write_config(tmp_path, tm.build("llama").config, "LlamaForCausalLM")
    out = inspect_cli(capsys, folder, "--targets", "q_proj", "o_prj")
    assert ("target 'o_prj' matches no module; closest: model.layers.0.self_attn.o_proj" in out)
    assert "targets ['q_proj', 'o_prj'] select 2 modules:" in out


def test_group_names_folds_layer_numbers():
    described = {f"encoder.block.{b}.layer.{i}.{m}": "Linear 8->8" for b in range(3) for i, m in
                 ((0, "SelfAttention.q"), (1, "DenseReluDense.wi"))}
    described["encoder.block.5.layer.0.SelfAttention.q"] = "Linear 8->8"
    described["head"] = "Linear 8->2"
    described["odd.3.x"] = "Linear 8->16"  # same name pattern as nothing else: kept as is
    assert group_names(described) == [
        ("encoder.block.{0,1,2,5}.layer.0.SelfAttention.q", "Linear 8->8", 4),
        ("encoder.block.{0..2}.layer.1.DenseReluDense.wi", "Linear 8->8", 3),
        ("head", "Linear 8->2", 1),
        ("odd.3.x", "Linear 8->16", 1),
    ]
    # The same name pattern with different shapes is two groups.
    assert len(group_names({"l.0.a": "Linear 8->8", "l.1.a": "Linear 8->4"})) == 2


def test_minilm_folder(capsys):
    lines = [" ".join(line.split()) for line in inspect_cli(capsys, tm.minilm_dir(), "--targets-regex",
                                                            r".*attention\.self\.(query|value)").splitlines()]
    assert "encoder.layer.{0..5}.attention.self.query Linear 384->384 x6" in lines
    assert "encoder.layer.{0..5}.intermediate.dense Linear 384->1536 x6" in lines
    assert "embeddings.word_embeddings Embedding 30522x384 x1" in lines
    assert trainable_line("\n".join(lines))[0] == 6 * 2 * 8 * (384 + 384)


def test_moe_expert_parameters_listed(tmp_path, capsys):
    """Fused expert stacks (transformers v5 MoE) are 3-D parameters, not modules: listed as
    target_parameters candidates with their expert count and per-expert shape."""
    config = transformers.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4)
    out = inspect_cli(capsys, write_config(tmp_path, config, "MixtralForCausalLM"))
    lines = [" ".join(line.split()) for line in out.splitlines()]
    start = lines.index("parameters LoRA can adapt (target_parameters; a 3-D one gets an update per expert):")
    listed = lines[start + 1:lines.index("", start)]
    assert len(listed) == 3, out  # the router's weight is a 2-D parameter too
    assert "model.layers.{0..2}.mlp.experts.gate_up_proj 4 experts x (48, 16) x3" in listed, out
    assert "model.layers.{0..2}.mlp.experts.down_proj 4 experts x (16, 24) x3" in listed, out
    # weights of adaptable modules (q_proj, the embedding) and 1-D norms are not parameter targets
    assert not any("q_proj" in line or "norm" in line or "embed" in line for line in listed), out


def test_target_parameters_selected_and_counted(tmp_path, capsys):
    """--target-parameters: the stacks it selects, and E·r·(in + out) trainable per stack."""
    config = transformers.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4)
    folder = write_config(tmp_path, config, "MixtralForCausalLM")
    out = inspect_cli(capsys, folder, "--targets", "q_proj", "--target-parameters", "experts.gate_up_proj",
                      "experts.down_proj", "--r", "2")
    lines = [" ".join(line.split()) for line in out.splitlines()]
    assert "targets ['q_proj'] select 3 modules:" in lines, out
    assert "target_parameters ['experts.gate_up_proj', 'experts.down_proj'] select 6 parameters:" in lines, out
    start = lines.index("target_parameters ['experts.gate_up_proj', 'experts.down_proj'] select 6 parameters:")
    assert lines[start + 1:start + 3] == ["model.layers.{0..2}.mlp.experts.gate_up_proj 4 experts x (48, 16) x3",
                                          "model.layers.{0..2}.mlp.experts.down_proj 4 experts x (16, 24) x3"], out
    per_layer = 2 * (16 + 16) + 4 * 2 * (16 + 48) + 4 * 2 * (24 + 16)  # q_proj, gate_up_proj, down_proj
    assert trainable_line(out)[0] == 3 * per_layer
    out = inspect_cli(capsys, folder, "--target-parameters", "experts.down_proj", "--r", "4")
    assert "select 3 modules" not in out and trainable_line(out)[0] == 3 * 4 * 4 * (24 + 16)
