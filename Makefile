# One command each, from a fresh machine with only Python and pip.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel lies on disk on our machines; elsewhere pip takes a normal torch.
TORCH ?= torch==2.13.0

.PHONY: venv test demo bench bench-dora bench-qlora bench-hotswap bench-multi-adapter bench-multi-adapter-gpu \
	bench-moe

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" || $(PY) -m pip install -q "torch>=2.4,<2.15"
	$(PY) -m pip install -q -e ".[test,demo]"
	touch $@

venv: $(VENV)/.installed

# Tests run with the working directory off sys.path (PYTHONSAFEPATH): the repo's kernels/ folder
# must not shadow Hugging Face's `kernels` package. pytest's exit 5 ("no tests collected") is
# not a failure; any other non-zero exit is.
# The second pass re-runs the float-heavy tests on other summation orders, as another x86-64 CPU
# would sum: ATen's scalar kernels (ATEN_CPU_CAPABILITY=default), MKL capped at AVX2 and one thread
# per process (OMP_NUM_THREADS=1: no split reductions; the first pass uses every core).
NUMERIC_TESTS := tests/test_equivalence_peft.py tests/test_distributed.py tests/test_merge.py \
	tests/test_cli_merge.py tests/test_kernels_interpret.py tests/test_properties.py \
	tests/test_adapters.py tests/test_grad_checkpointing.py tests/test_init.py \
	tests/test_dora_norm.py tests/test_dora_peft.py tests/test_dora_adapters.py \
	tests/test_cli_merge_dora.py tests/test_qlora.py tests/test_hotswap.py tests/test_multi_lora.py \
	tests/test_target_parameters.py tests/test_param_delta.py tests/test_cli_merge_params.py \
	tests/test_trainable_tokens.py tests/test_mha.py tests/test_offline_merge_equality.py \
	tests/test_from_pretrained.py tests/test_hub_adapters.py
OTHER_SUMS := ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=AVX2 OMP_NUM_THREADS=1

test: $(VENV)/.installed
	PYTHONSAFEPATH=1 $(PY) -m pytest -q -n auto tests || [ $$? -eq 5 ]
	$(OTHER_SUMS) PYTHONSAFEPATH=1 $(PY) -m pytest -q -n auto $(NUMERIC_TESTS) || [ $$? -eq 5 ]

demo: $(VENV)/.installed
	$(VENV)/bin/minilora demo

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_cpu.py

# QLoRA training step (4-bit NF4 Llama, ~100M parameters) vs peft: time and peak memory (needs peft).
bench-qlora: $(VENV)/.installed
	PYTHONSAFEPATH=1 $(PY) benchmarks/bench_qlora.py

# DoRA vs LoRA and vs peft's DoRA on one layer, with the memory of a training step (needs peft).
bench-dora: $(VENV)/.installed
	PYTHONSAFEPATH=1 $(PY) benchmarks/bench_dora.py

# Hot-swapping under torch.compile: swap time, recompiles with and without prepare_for_hotswap.
bench-hotswap: $(VENV)/.installed
	PYTHONSAFEPATH=1 $(PY) benchmarks/bench_hotswap.py

# Mixed batches (per_sample_adapters): a tiny Llama with 16 adapters, 64 rows, vs peft's adapter_names= (needs peft).
bench-multi-adapter: $(VENV)/.installed
	PYTHONSAFEPATH=1 $(PY) benchmarks/bench_multi_adapter.py --cpu

# The same on one layer K=N=4096, bf16, 1-64 adapters, decode and prefill: Triton vs loop vs peft (needs a GPU).
bench-multi-adapter-gpu: $(VENV)/.installed
	PYTHONSAFEPATH=1 $(PY) benchmarks/bench_multi_adapter.py
# LoRA on the experts of one MoE layer (target_parameters) vs peft, forward and forward+backward (needs peft).
bench-moe: $(VENV)/.installed
	PYTHONSAFEPATH=1 $(PY) benchmarks/bench_moe.py
