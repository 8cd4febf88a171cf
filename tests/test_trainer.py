"""The HF Trainer (and accelerate) on an injected model: only the adapter trains, every checkpoint
gets the peft-format adapter, and resuming from a slim checkpoint continues the same run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import minilora
import tiny_models
from minilora.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_adapter
from minilora.inject import lora_layers

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

STEPS = 4


def _model():
    model = tiny_models.build("llama")
    minilora.inject(model, targets=tiny_models.LLAMA_TARGETS, r=4, lora_alpha=8)
    return model


def _data():
    ids = torch.randint(1, 64, (2 * STEPS, 8), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row} for row in ids]


def _trainer(model, output_dir, **callback_kwargs):
    from transformers import Trainer, TrainingArguments

    from minilora.training import SaveAdapterCallback

    args = TrainingArguments(output_dir=str(output_dir), max_steps=STEPS, save_steps=2, per_device_train_batch_size=2,
                             learning_rate=5e-2, lr_scheduler_type="constant", report_to="none", use_cpu=True,
                             disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0)
    return Trainer(model=model, args=args, train_dataset=_data(),
                   callbacks=[SaveAdapterCallback(**callback_kwargs)])


def _adapter(model):
    return {f"{name}.{k}": v.detach().clone() for name, layer in lora_layers(model)
            for k, v in layer.adapters["default"].state_dict().items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer")
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _trainer(model, out, slim_trainer_checkpoint=True)
    trainer.train()
    return out, model, trainer, before


def test_trainer_trains_only_the_adapter(run):
    _, model, trainer, before = run
    after = model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    adapter_keys = sorted(k for k in before if ".adapters.default." in k)
    # B starts at zero, so after a few steps every factor has moved; nothing else has.
    assert changed == adapter_keys
    optimized = sum(p.numel() for group in trainer.optimizer.param_groups for p in group["params"])
    assert optimized == minilora.trainable_parameters(model)[0] == sum(before[k].numel() for k in adapter_keys)


def test_every_checkpoint_gets_the_peft_adapter(run):
    out, model, _, _ = run
    for step in (2, STEPS):
        assert sorted(os.listdir(out / f"checkpoint-{step}" / "adapter")) == [CONFIG_NAME, WEIGHTS_NAME]
    # The last checkpoint's adapter, loaded into a fresh base, is the trained model, bit for bit.
    fresh = load_adapter(tiny_models.build("llama"), out / f"checkpoint-{STEPS}" / "adapter")
    ids = _data()[0]["input_ids"][None]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    early = load_adapter(tiny_models.build("llama"), out / "checkpoint-2" / "adapter")
    assert not all(torch.equal(a, b) for a, b in zip(_adapter(early).values(), _adapter(fresh).values()))


def test_peft_loads_the_checkpoint_adapter(run):
    peft = pytest.importorskip("peft")
    out, model, _, _ = run
    theirs = peft.PeftModel.from_pretrained(tiny_models.build("llama"), str(out / f"checkpoint-{STEPS}" / "adapter"))
    ids = _data()[1]["input_ids"][None]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_slim_checkpoint_holds_the_adapter_only_and_resumes_the_same_run(run, tmp_path):
    from safetensors.torch import load_file

    out, model, _, _ = run
    checkpoint = out / "checkpoint-2"
    stored = load_file(checkpoint / "model.safetensors")
    assert sorted(stored) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert not list(checkpoint.glob(".*.tmp"))

    # Resume from step 2 on a fresh model: steps 3-4 must land on the uninterrupted result.
    resumed = _model()
    _trainer(resumed, tmp_path / "resumed", slim_trainer_checkpoint=True).train(resume_from_checkpoint=str(checkpoint))
    # Same kernels, same values, same order: bit-identical in practice; the bound allows a few
    # float32 roundings (u = 6e-8) should resuming reorder an accumulation, far under one step.
    for key, value in _adapter(model).items():
        torch.testing.assert_close(_adapter(resumed)[key], value, rtol=1e-6, atol=1e-7, msg=lambda m: f"{key}: {m}")
    # ... and a run resumed from the wrong step would not (the guard that makes the check bite).
    assert not all(torch.equal(a, b) for a, b in zip(_adapter(load_adapter(
        tiny_models.build("llama"), checkpoint / "adapter")).values(), _adapter(model).values()))
    with open(tmp_path / "resumed" / f"checkpoint-{STEPS}" / "adapter" / CONFIG_NAME) as handle:
        assert json.load(handle)["peft_type"] == "LORA"


def test_accelerate_prepare_trains_only_the_adapter():
    from accelerate import Accelerator

    model = _model().train()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    accelerator = Accelerator(cpu=True)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    for batch in _data()[:2]:
        ids = batch["input_ids"][None]
        accelerator.backward(prepared(input_ids=ids, labels=ids).loss)
        optimizer.step()
        optimizer.zero_grad()
    after = accelerator.unwrap_model(prepared).state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in after.items() if k.endswith("lora_B"))


def test_importing_minilora_training_does_not_import_transformers():
    code = ("import sys, minilora, minilora.training; assert 'transformers' not in sys.modules; "
            "minilora.training.SaveAdapterCallback; assert 'transformers' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
