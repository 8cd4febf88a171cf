"""DDP and FSDP2 on CPU (gloo, two real processes): same adapter as one process on the global batch.

One launch runs three jobs in two worker processes (this file run as a script): DDP and FSDP2
(``fully_shard`` per decoder layer and at the root) on a float64 model, and FSDP2 with a bf16
MixedPrecisionPolicy over float32 shards. Each trains a tiny Llama with SGD on its half of a
global batch and saves the adapter (FSDP: gathered from the shards by ``save_adapter_sharded``).
The test process hosts the rendezvous store on 127.0.0.1 (port chosen by the OS: no race),
computes the single-process runs on the whole batch (float64) and compares. SGD, not Adam: its
update is linear in the gradient, so a wrong gradient average (sum over ranks, or no all-reduce)
shows; Adam would normalise it away.

Why float64: splitting the batch over ranks only reorders sums. In float32 that moves the adapter
after three steps by a few 1e-6, by an amount that depends on the CPU's kernels (AVX2 and AVX-512
block the sums differently), so no fixed float32 bound is both safe on every machine and tight.
In float64 the same reordering moves it by ~1e-16, and the bound below sits orders of magnitude
from both that and from any real bug. Bounds are derived in the comments at FP64_ATOL and BF16_*.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import minilora  # noqa: E402
import tiny_models  # noqa: E402
from minilora.checkpoint import CONFIG_NAME, WEIGHTS_NAME, save_adapter  # noqa: E402
from minilora.inject import lora_layers  # noqa: E402

WORLD = 2
STEPS = 3
BF16_STEPS = 1  # one step: the update is -LR * gradient, whose bf16 error is bounded below
LR = 2.0
TIMEOUT_S = 240
# o_proj gets r=3: its factors split unevenly over two ranks (FSDP2 pads the second shard).
CONFIG = dict(targets=tiny_models.LLAMA_TARGETS, r=4, lora_alpha=8, init_lora_weights=False,
              rank_pattern={"o_proj": 3}, modules_to_save=["lm_head"])


# float64, u = 2**-53 ~ 1.1e-16. Splitting the batch only reorders sums (per-rank gradients, then
# the all-reduce). A reordered sum of n terms moves by at most ~n*u*sum|terms| (Higham, Accuracy
# and Stability of Numerical Algorithms, ch. 4); here n <= 64 (vocabulary; hidden 48; 28 tokens)
# and values, gradients and their sums are O(1). Three SGD steps at lr 2 carry each step's error
# into the next (the float32 version of this test ended ~2**7 roundings off). Worst case
# 64 * 1.1e-16 * 2**7 ~ 1e-12; measured 4e-16. The one float32 island (transformers' RMSNorm
# computes in float32) rounds equal inputs to equal outputs; a 1e-16 input difference changes an
# fp32 rounding with probability ~2**-29 per element. A real bug (sum instead of mean, no
# all-reduce, an update scaled wrongly) moves the adapter by the size of an update, > 1e-2: the
# guard test checks that each fails this bound by many orders of magnitude.
FP64_ATOL = 1e-11


# ---------------------------------------------------------------- shared by workers and the test
def build(dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """The tiny Llama with its adapter, seeded: the same values in float32 and float64 (the
    adapter is drawn in float32, then the model is cast; float32 -> float64 is exact)."""
    model = tiny_models.build("llama")
    minilora.inject(model, **CONFIG)
    return model.to(dtype).train()


def global_batch() -> torch.Tensor:
    return torch.randint(1, 64, (2 * WORLD, 8), generator=torch.Generator().manual_seed(5))


def loss_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy, computed in float64 whatever the logits' dtype (transformers'
    own loss upcasts only to float32, which would put a float32 step into the float64 runs)."""
    logits = model(input_ids=ids).logits[:, :-1].double()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


def train(model: torch.nn.Module, ids: torch.Tensor, params=None, steps: int = STEPS, lr: float = LR) -> list[float]:
    params = [p for p in (params or model).parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_of(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def read_folder(folder: str) -> tuple[dict, dict[str, torch.Tensor], bytes]:
    from safetensors.torch import load
    with open(os.path.join(folder, WEIGHTS_NAME), "rb") as handle:
        raw = handle.read()
    with open(os.path.join(folder, CONFIG_NAME)) as handle:
        return json.load(handle), load(raw), raw


# ---------------------------------------------------------------- the worker (run as a script)
def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    from minilora.training import save_adapter_sharded

    store = dist.TCPStore("127.0.0.1", port, WORLD, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    ids = global_batch()[2 * rank: 2 * rank + 2]
    checks: dict = {}

    model = build()
    ddp = DistributedDataParallel(model)
    checks["ddp_losses"] = train(ddp, ids, params=model)
    if rank == 0:
        save_adapter(model, os.path.join(out, "ddp"))

    mesh = init_device_mesh("cpu", (WORLD,))
    for job, policy in (("fsdp", None), ("fsdp_bf16", MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                            reduce_dtype=torch.float32))):
        model = build(torch.float64 if policy is None else torch.float32)  # bf16 over fp32 shards, as in practice
        kwargs = {"mesh": mesh} if policy is None else {"mesh": mesh, "mp_policy": policy}
        for layer in model.model.layers:
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        layers = list(lora_layers(model))
        checks[f"{job}_weights_sharded"] = all(
            isinstance(layer.weight, DTensor) and layer.weight.to_local().shape[0] < layer.weight.shape[0]
            and layer.base_layer.weight is None for _, layer in layers)
        checks[f"{job}_adapter_dtypes"] = sorted({str(p.dtype) for n, p in model.named_parameters()
                                                  if p.requires_grad})
        if job == "fsdp":
            save_adapter_sharded(model, os.path.join(out, "fsdp_init"))
            with torch.no_grad():
                logits = model(input_ids=ids).logits
            torch.save(logits, os.path.join(out, f"fsdp_logits_rank{rank}.pt"))
            # FSDP2 keeps the root's parameters unsharded after a forward under no_grad; without
            # reshard() the next forward reuses those stale copies after optimizer steps (seen with
            # and without minilora: the loss stops following the single-process run).
            model.reshard()
        checks[f"{job}_losses"] = train(model, ids, steps=STEPS if policy is None else BF16_STEPS)
        save_adapter_sharded(model, os.path.join(out, job))
        if job == "fsdp":  # the Trainer callback, as the Trainer calls it on every rank
            from types import SimpleNamespace

            from minilora.training import SaveAdapterCallback
            callback = SaveAdapterCallback(slim_trainer_checkpoint=True)
            os.makedirs(os.path.join(out, "callback", f"checkpoint-{STEPS}"), exist_ok=True)
            callback.on_save(SimpleNamespace(output_dir=os.path.join(out, "callback"), should_save=rank == 0),
                             SimpleNamespace(global_step=STEPS), None, model=model)
    with open(os.path.join(out, f"checks_rank{rank}.json"), "w") as handle:
        json.dump(checks, handle)
    dist.destroy_process_group()


# ---------------------------------------------------------------- launching
def _launch(out: str, timeout: float = TIMEOUT_S, procs: list | None = None) -> None:
    import torch.distributed as dist

    # The test process hosts the store: the OS picks a free port and it stays bound (no race).
    store = dist.TCPStore("127.0.0.1", 0, WORLD, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=60))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), HERE, os.environ.get("PYTHONPATH", "")])}
    procs = [] if procs is None else procs
    procs += [subprocess.Popen([sys.executable, __file__, str(rank), str(store.port), out], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for rank in range(WORLD)]
    deadline = time.monotonic() + timeout
    try:
        logs = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for p in procs]
    finally:
        for p in procs:  # on a timeout or any failure: no worker outlives the test
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [(rank, p.returncode, log[-3000:]) for rank, (p, log) in enumerate(zip(procs, logs)) if p.returncode]
    assert not failed, f"worker(s) failed: {failed}"
    del store


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dist"))
    _launch(out)
    checks = []
    for rank in range(WORLD):
        with open(os.path.join(out, f"checks_rank{rank}.json")) as handle:
            checks.append(json.load(handle))
    return out, checks


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process float64 runs on the whole global batch, as adapter folders: init, trained
    (STEPS steps), one_step (BF16_STEPS), and what the usual bugs would train (for the guard test)."""
    out = str(tmp_path_factory.mktemp("single"))
    model = build()
    save_adapter(model, os.path.join(out, "init"))
    with torch.no_grad():
        logits = model(input_ids=global_batch()).logits
    losses = train(model, global_batch())
    save_adapter(model, os.path.join(out, "trained"))
    torch.save({n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
               os.path.join(out, "trainable.pt"))
    bugs = {"half": dict(ids=global_batch()[:2]),  # a rank training alone (no gradient all-reduce)
            "sum": dict(lr=LR * WORLD),  # gradients summed over ranks: for SGD exactly lr * WORLD
            "mean_twice": dict(lr=LR / WORLD)}  # divided by the world size twice
    runs = {"one_step": dict(steps=BF16_STEPS), **bugs,
            **{f"{name}_one_step": dict(kwargs, steps=BF16_STEPS) for name, kwargs in bugs.items()}}
    for name, kwargs in runs.items():
        model = build()
        train(model, **{"ids": global_batch(), **kwargs})
        save_adapter(model, os.path.join(out, name))
    return out, logits, losses


def _assert_same_adapter(folder: str, reference: str) -> None:
    config, tensors, _ = read_folder(folder)
    ref_config, ref_tensors, _ = read_folder(reference)
    assert config == ref_config
    assert sorted(tensors) == sorted(ref_tensors)
    for key, ref in ref_tensors.items():
        assert tensors[key].dtype == ref.dtype == torch.float64, key
        torch.testing.assert_close(tensors[key], ref, rtol=0, atol=FP64_ATOL, msg=lambda m: f"{key}: {m}")


def _update_errors(folder: str, reference: str, init: str) -> dict[str, float]:
    """Per adapter tensor: its distance from the reference's update, relative to that update."""
    (_, got, _), (_, want, _), (_, start, _) = read_folder(folder), read_folder(reference), read_folder(init)
    return {key: ((got[key].double() - want[key]).norm() / (want[key] - start[key]).norm()).item()
            for key in want}


# bf16 keeps 8 significant bits: one rounding is off by at most u = 2**-8 ~ 3.9e-3 (relative).
# Under the policy the step's gradient is computed from bf16 parameters and bf16 activations
# (float32 accumulation inside each op, then one rounding) and is itself rounded to bf16 before
# the float32 reduction. Along its longest path it passes k sequential roundings: per decoder layer
# about 20 forward (norm, LoRA A and B, their sum with the base, RoPE, scores, softmax, PV, o_proj,
# residual, norm, gate, up, SiLU, product, down, residual), two layers, the head, and as many
# backward: k ~ 2 * (2 * 20 + 4) ~ 90. To first order, without catastrophic cancellation, the
# relative error of each tensor's gradient, hence of the one-step update, is at most k * u ~ 0.35
# (measured: 0.03-0.15 over the 29 tensors). A wrong average is off by exactly 1 (sum over two
# ranks) or 0.5 (divided twice), no all-reduce by 0.5-1.5 (the guard test checks each).
BF16_MAX_ERROR = 90 * 2**-8
# Each gradient is stored in bf16, so no tensor of dozens of entries lands closer than ~u/10 to
# the exact update; float32 compute (the policy not applied) lands at ~1e-6.
BF16_MIN_ERROR = 2**-12


# ---------------------------------------------------------------- tests
def test_fsdp_shards_the_layer_parameters_it_runs(runs, single):
    out, checks = runs
    _, logits, _ = single
    # Every LoRA layer's base weight is a DTensor shard, and base_layer keeps no full copy.
    assert all(c["fsdp_weights_sharded"] and c["fsdp_bf16_weights_sharded"] for c in checks)
    # Sharded params keep their dtype; under the bf16 policy too (it casts only for compute).
    assert all(c["fsdp_adapter_dtypes"] == ["torch.float64"] for c in checks)
    assert all(c["fsdp_bf16_adapter_dtypes"] == ["torch.float32"] for c in checks)
    # The forward gathers the same weights: each rank's logits are the single run's rows
    # (float64; only the order of sums may differ: see FP64_ATOL).
    for rank in range(WORLD):
        got = torch.load(os.path.join(out, f"fsdp_logits_rank{rank}.pt"))
        torch.testing.assert_close(got, logits[2 * rank: 2 * rank + 2], rtol=0, atol=FP64_ATOL)


def test_adapter_saved_from_shards_is_byte_identical(runs, single):
    # Before training both hold the same seeded weights: gathering must reproduce them exactly.
    (out, _), (ref, _, _) = runs, single
    config, _, raw = read_folder(os.path.join(out, "fsdp_init"))
    ref_config, _, ref_raw = read_folder(os.path.join(ref, "init"))
    assert config == ref_config
    assert raw == ref_raw
    assert sorted(os.listdir(os.path.join(out, "fsdp_init"))) == [CONFIG_NAME, WEIGHTS_NAME]


@pytest.mark.parametrize("job", ["ddp", "fsdp"])
def test_two_processes_train_the_same_adapter_as_one(runs, single, job):
    (out, checks), (ref, _, losses) = runs, single
    # Each rank's loss is over its half; their mean is the global-batch loss of the single run.
    # Losses are O(1) float64 means of 28 (14) positive terms: same bound as the weights.
    rank_mean = [sum(c[f"{job}_losses"][i] for c in checks) / WORLD for i in range(STEPS)]
    assert rank_mean == pytest.approx(losses, rel=FP64_ATOL, abs=0)
    _assert_same_adapter(os.path.join(out, job), os.path.join(ref, "trained"))


def test_trainer_callback_on_sharded_model(runs, single):
    # SaveAdapterCallback on FSDP2 shards: the adapter gathered as by save_adapter_sharded, and
    # the slim Trainer weights hold exactly the trainable tensors, gathered, under model keys.
    from safetensors.torch import load_file

    (out, _), (ref, _, _) = runs, single
    folder = os.path.join(out, "callback", f"checkpoint-{STEPS}")
    assert read_folder(os.path.join(folder, "adapter"))[2] == read_folder(os.path.join(out, "fsdp"))[2]
    slim = load_file(os.path.join(folder, "model.safetensors"))
    want = torch.load(os.path.join(ref, "trainable.pt"))
    assert sorted(slim) == sorted(want)
    for key, value in want.items():  # float64 training on both sides: see FP64_ATOL
        assert slim[key].dtype == value.dtype == torch.float64, key
        torch.testing.assert_close(slim[key], value, rtol=0, atol=FP64_ATOL, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("bug", ["half", "sum", "mean_twice"])
def test_comparisons_would_catch_a_wrong_gradient_average(single, bug):
    # Guard on the tests themselves: what each bug trains lands far outside both bounds.
    ref, _, _ = single
    _, init, _ = read_folder(os.path.join(ref, "init"))
    _, trained, _ = read_folder(os.path.join(ref, "trained"))
    _, wrong, _ = read_folder(os.path.join(ref, bug))
    assert max((trained[k] - init[k]).abs().max().item() for k in init) > 1e-2  # the steps really moved it
    assert max((wrong[k] - trained[k]).abs().max().item() for k in init) > 1e6 * FP64_ATOL
    errors = _update_errors(os.path.join(ref, f"{bug}_one_step"), os.path.join(ref, "one_step"),
                            os.path.join(ref, "init"))
    assert max(errors.values()) > BF16_MAX_ERROR, errors


def test_fsdp_bf16_mixed_precision_trains_close_to_exact(runs, single):
    # bf16 compute (params all-gathered in bf16), fp32 gradient reduction and fp32 master shards:
    # the adapter stays fp32 on disk and its one-step update lands within bf16 rounding of the
    # float64 run's (BF16_MAX_ERROR), but not as close as float32 compute would (BF16_MIN_ERROR).
    (out, checks), (ref, _, losses) = runs, single
    config, tensors, _ = read_folder(os.path.join(out, "fsdp_bf16"))
    ref_config, ref_tensors, _ = read_folder(os.path.join(ref, "one_step"))
    assert config == ref_config and sorted(tensors) == sorted(ref_tensors)
    assert all(tensor.dtype == torch.float32 for tensor in tensors.values())
    errors = _update_errors(os.path.join(out, "fsdp_bf16"), os.path.join(ref, "one_step"), os.path.join(ref, "init"))
    assert max(errors.values()) < BF16_MAX_ERROR, errors
    assert min(errors.values()) > BF16_MIN_ERROR, f"no bf16 rounding at all: the policy was not applied {errors}"
    # The first loss (before any update) passes only the forward half of the k roundings.
    rank_mean = sum(c["fsdp_bf16_losses"][0] for c in checks) / WORLD
    assert rank_mean == pytest.approx(losses[0], rel=BF16_MAX_ERROR / 2)


def test_save_adapter_sharded_bad_name_leaves_the_folder_as_it_was(tmp_path):
    from minilora.training import save_adapter_sharded

    model = build()
    save_adapter(model, tmp_path / "adapter")
    before = {f: (tmp_path / "adapter" / f).read_bytes() for f in os.listdir(tmp_path / "adapter")}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no adapter named 'nope'; this model has \\['default'\\]"):
        save_adapter_sharded(model, tmp_path / "adapter", "nope")
    assert {f: (tmp_path / "adapter" / f).read_bytes() for f in os.listdir(tmp_path / "adapter")} == before
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_launcher_kills_workers_that_overrun(tmp_path):
    procs: list = []
    with pytest.raises(subprocess.TimeoutExpired):
        _launch(str(tmp_path), timeout=1.0, procs=procs)
    assert len(procs) == WORLD and all(p.poll() is not None for p in procs)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
