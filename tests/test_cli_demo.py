"""`minilora demo --quick` end to end on the real pretrained MiniLM, and on a user's causal LM.

The checks do not trust the demo's own report: parameter counts are recomputed from the model
shapes and by peft, and the saved best adapter is loaded again (minilora and peft) and must
reproduce the reported held-out accuracy.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import minilora
from minilora.cli import main
from minilora.demo import experiment, tasks
import tiny_models as tm

transformers = pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

NAMES = ["head only", "LoRA attention", "LoRA attention + embeddings", "LoRA attention+MLP",
         "LoRA attention+MLP + embeddings"]


@pytest.fixture(scope="module")
def quick_task():
    return tasks.classification_task(tasks.QUICK, seed=0, quick=True)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    code = main(["demo", "--quick", "--out", str(out)])
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


def test_quick_demo_outputs(quick_run, capsys):
    out, results = quick_run
    rows = results["scenarios"]
    assert [r["name"] for r in rows] == NAMES
    for row in rows:
        assert len(row["losses"]) == tasks.QUICK.steps and all(math.isfinite(x) for x in row["losses"])
        assert 0.0 <= row["accuracy"] <= 1.0 and row["seconds"] > 0
    png = (out / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    report = (out / "results.md").read_text()
    assert "| scenario | LoRA on | trained in full | trainable params |" in report
    assert all(f"| {name} |" in report for name in NAMES)
    assert f"Best LoRA scenario: **{results['best']}**" in report
    assert results["merge_check"]["relative"] <= 1e-4
    assert results["best"] != "head only"


def test_quick_demo_parameter_counts(quick_run):
    """Trainable counts from the shapes of MiniLM (hidden 384, MLP 1536, 6 layers, vocab 30522,
    4 classes), r=8; and the same from peft for each LoRA scenario."""
    peft = pytest.importorskip("peft")
    _, results = quick_run
    rows = {r["name"]: r for r in results["scenarios"]}
    r, h, f, layers, labels, vocab = 8, 384, 1536, 6, len(tasks.QUICK_LABELS), 30522
    head = h * labels + labels
    attention = layers * 4 * r * (h + h)
    mlp = layers * 2 * r * (h + f)
    expected = {"head only": head, "LoRA attention": attention + head, "LoRA attention+MLP": attention + mlp + head}
    expected["LoRA attention + embeddings"] = expected["LoRA attention"] + vocab * h
    expected["LoRA attention+MLP + embeddings"] = expected["LoRA attention+MLP"] + vocab * h
    assert {n: rows[n]["trainable"] for n in NAMES} == expected

    base = transformers.AutoModelForSequenceClassification.from_pretrained(tm.minilm_dir(), num_labels=labels)
    task = tasks.Task("t", base, [], [], None, None, ["classifier"], ["bert.embeddings.word_embeddings"],
                     *tasks.block_targets(base, {"classifier"}), task_type="SEQ_CLS", description="")
    for scenario in experiment.scenarios(task, tasks.QUICK)[1:]:
        fields = {k: v for k, v in scenario.config.to_dict().items()
                  if k in ("r", "lora_alpha", "target_modules", "modules_to_save", "task_type")}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fields))
        assert theirs.get_nb_trainable_parameters() == (rows[scenario.name]["trainable"], rows[scenario.name]["total"])


def test_saved_best_adapter_reproduces_reported_accuracy(quick_run, quick_task):
    """Load best-adapter/ into a fresh MiniLM (minilora and peft): same held-out accuracy as reported."""
    peft = pytest.importorskip("peft")
    out, results = quick_run
    best = next(r for r in results["scenarios"] if r["name"] == results["best"])
    task = quick_task
    fresh = copy.deepcopy(task.model)
    ours = minilora.load_adapter(fresh, out / "best-adapter")
    assert experiment.evaluate(task, ours) == best["accuracy"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(task.model), out / "best-adapter").eval()
    batch = {k: v for k, v in task.test[0].items() if k != "labels"}
    with torch.no_grad():  # the same float32 ops in the same order (ops.py): bit-identical in practice
        torch.testing.assert_close(theirs(**batch).logits, ours(**batch).logits, rtol=1e-5, atol=1e-5)


def test_training_is_deterministic_given_seed(quick_task):
    task = quick_task
    runs = []
    for seed in (0, 0, 1):
        scenario = experiment.scenarios(task, tasks.QUICK)[3]  # LoRA attention+MLP (dropout in BERT is on)
        with experiment.deterministic():
            experiment.train_scenario(task, scenario, tasks.Settings(**{**tasks.QUICK.__dict__, "steps": 3}), seed)
        runs.append(scenario.losses)
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_docstring_dataset():
    data = tasks.docstring_dataset(("json", "math", "pathlib"), per_label=15)
    assert data == tasks.docstring_dataset(("json", "math", "pathlib"), per_label=15)
    texts = [t for t, _ in data]
    assert len(texts) == len(set(texts))  # no text twice, nor under two labels
    counts = [sum(1 for _, y in data if y == label) for label in range(3)]
    assert all(0 < c <= 15 for c in counts) and counts[1] == counts[2] == 15
    assert all(len(t) >= 20 and "\n" not in t for t in texts)
    train, test = tasks.split(len(data), [y for _, y in data], seed=0)
    assert sorted(train + test) == list(range(len(data))) and not set(train) & set(test)
    assert {data[i][1] for i in test} == {0, 1, 2}  # stratified: every class held out


def test_demo_on_a_users_causal_lm(tmp_path, capsys):
    """--model/--data: a tiny Llama saved with save_pretrained, MiniLM's (BERT) tokenizer files
    for its vocabulary, and real text; lm_head / embed_tokens are the fully trained modules."""
    vocab, hidden, inter, layers = 30522, 16, 24, 2
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                      tie_word_embeddings=False, pad_token_id=0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "lm")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(Path(tm.minilm_dir()) / name, tmp_path / "lm" / name)
    text = "\n\n".join(t for t, _ in tasks.docstring_dataset(("pathlib", "json"), per_label=40))
    (tmp_path / "data.txt").write_text(text)
    assert main(["demo", "--quick", "--model", str(tmp_path / "lm"), "--data", str(tmp_path / "data.txt"),
                 "--out", str(tmp_path / "out"), "--steps", "3"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {r["name"]: r for r in results["scenarios"]}
    assert list(rows) == NAMES
    r = 8
    attention = layers * r * (2 * (hidden + hidden) + 2 * (hidden + hidden // 2))  # q, o; k, v (1 kv head of 8)
    mlp = layers * r * (2 * (hidden + inter) + (inter + hidden))
    assert rows["head only"]["trainable"] == vocab * hidden
    assert rows["head only"]["full"] == ["lm_head"]
    assert rows["LoRA attention"]["trainable"] == attention
    assert rows["LoRA attention+MLP"]["trainable"] == attention + mlp
    assert rows["LoRA attention + embeddings"]["trainable"] == attention + 2 * vocab * hidden
    assert rows["LoRA attention + embeddings"]["full"] == ["model.embed_tokens", "lm_head"]
    assert all(len(row["losses"]) == 3 and 0 <= row["accuracy"] <= 1 for row in rows.values())
    assert results["merge_check"]["relative"] <= 1e-4
    assert "held-out next-token accuracy" in (tmp_path / "out" / "results.md").read_text()
    assert (tmp_path / "out" / "best-adapter" / "adapter_model.safetensors").is_file()
