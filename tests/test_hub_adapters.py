"""Adapters by Hugging Face Hub repository id (``load_adapter``, ``from_pretrained``,
``hotswap_adapter``), as peft's ``PeftModel.from_pretrained`` takes them. Nothing is downloaded:
the repositories are written into a Hugging Face cache in tmp_path, in the cache's own layout,
and HF_HUB_OFFLINE=1 makes huggingface_hub read them from there."""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers

import minilora
from minilora.checkpoint import HUB_FILES, PICKLE_NAME, adapter_folder
from minilora.inject import lora_layers
from tiny_models import build, example_inputs, output_of, randomize_adapters


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline; ``put(repo, folder, revision)`` puts a folder's files
    in as the snapshot that ``revision`` (a branch or tag) points to."""
    import huggingface_hub.constants as hub
    root = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(root))
    commits = iter(f"{i:040x}" for i in range(1, 100))

    def put(repo, folder, revision="main"):
        repo_dir = root / ("models--" + repo.replace("/", "--"))
        commit = next(commits)
        shutil.copytree(folder, repo_dir / "snapshots" / commit)
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / revision).write_text(commit)

    return put


def _trained(tmp_path, name, r, alpha, seed, **fields):
    base = tmp_path / "base"
    if not base.exists():
        build("llama").save_pretrained(base)
    model = minilora.inject(transformers.AutoModelForCausalLM.from_pretrained(base),
                            targets=["q_proj", "v_proj"], r=r, lora_alpha=alpha, task_type="CAUSAL_LM", **fields)
    randomize_adapters(model, seed=seed)
    minilora.save_adapter(model, tmp_path / name)
    return tmp_path / name, model


def _out(model, inputs):
    with torch.no_grad():
        return output_of(model(**inputs))


def test_load_adapter_and_from_pretrained_by_repo_id(tmp_path, cache):
    folder, trained = _trained(tmp_path, "local", 4, 8, seed=3)
    cache("someone/llama-lora", folder)
    inputs = example_inputs("llama", trained)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert torch.equal(_out(minilora.load_adapter(base, "someone/llama-lora"), inputs), _out(trained, inputs))
    model = minilora.from_pretrained("someone/llama-lora")  # the base recorded in the config: tmp_path/base
    assert torch.equal(_out(model, inputs), _out(trained, inputs))


def test_revision_picks_the_version(tmp_path, cache):
    first, _ = _trained(tmp_path, "v1", 4, 8, seed=3)
    second, trained = _trained(tmp_path, "v2", 2, 5, seed=4)
    cache("someone/llama-lora", first)
    cache("someone/llama-lora", second, revision="v2")
    inputs = example_inputs("llama", trained)
    model = minilora.from_pretrained("someone/llama-lora", adapter_revision="v2")
    assert model.model.layers[0].self_attn.q_proj.adapters["default"].r == 2
    assert torch.equal(_out(model, inputs), _out(trained, inputs))
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    minilora.load_adapter(base, "someone/llama-lora", revision="v2")
    assert torch.equal(_out(base, inputs), _out(trained, inputs))


def test_hotswap_by_repo_id(tmp_path, cache):
    first, _ = _trained(tmp_path, "a", 4, 8, seed=3)
    second, trained = _trained(tmp_path, "b", 2, 5, seed=4)
    cache("someone/b", second)
    model = minilora.load_adapter(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"), first)
    minilora.hotswap_adapter(model, "someone/b")
    inputs = example_inputs("llama", trained)
    # The rank-2 factors in the rank-4 room: the same products plus zeros, in another summation
    # order; fp32 sums of <= 48 terms of O(1) values: far below 1e-5 of the output
    torch.testing.assert_close(_out(model, inputs), _out(trained, inputs), rtol=1e-5, atol=1e-6)


def test_unknown_repo_and_local_paths_are_named(tmp_path, cache):
    model = build("llama")
    with pytest.raises(minilora.AdapterFileError, match=r"adapter 'someone/missing' is not a local folder, and the "
                                                        r"Hugging Face Hub repository .* could not be read"):
        minilora.load_adapter(model, "someone/missing")
    with pytest.raises(minilora.AdapterFileError, match=r"at revision 'v9'"):
        minilora.from_pretrained("someone/missing", adapter_revision="v9")
    # A path is never looked up on the Hub: it is named as the missing folder it is
    for path in (str(tmp_path / "missing"), "./missing", "a/b/c"):
        with pytest.raises(minilora.AdapterFileError, match=r"the folder itself does not exist"):
            minilora.load_adapter(model, path)
    with pytest.raises(ValueError, match=r"revision='v2' picks a version .* is a local path"):
        minilora.load_adapter(model, tmp_path, revision="v2")
    assert not list(lora_layers(model))  # nothing injected on refusal


def test_only_adapter_and_tokenizer_files_are_fetched(monkeypatch):
    import huggingface_hub
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, revision=None, allow_patterns=None: asked.append(allow_patterns) or "/x")
    adapter_folder("someone/repo")
    adapter_folder("someone/repo", allow_pickle=True)
    assert asked == [list(HUB_FILES), [*HUB_FILES, PICKLE_NAME]]
    assert PICKLE_NAME not in HUB_FILES and "*.bin" not in HUB_FILES and "*" not in HUB_FILES
