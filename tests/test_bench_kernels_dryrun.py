"""benchmarks/bench_kernels.py --dry-run runs to completion on the CPU and writes its report."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels.py"
MULTI = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_multi_adapter.py"


def _dry_run(script: Path, out: Path, **env: str) -> None:
    """Run a benchmark script with --dry-run under the Triton interpreter; it must succeed."""
    proc = subprocess.run([sys.executable, str(script), "--dry-run", "--out", str(out)],
                          env=dict(os.environ, TRITON_INTERPRET="1", **env), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_bench_kernels_dry_run(tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("matplotlib")
    _dry_run(SCRIPT, tmp_path, MPLBACKEND="Agg")
    reports = list(tmp_path.glob("kernels-CPU-dry-run-*.md"))
    plots = list(tmp_path.glob("kernels-CPU-dry-run-*.png"))
    assert len(reports) == 1 and len(plots) == 1, list(tmp_path.iterdir())
    text = reports[0].read_text()
    assert "DRY RUN" in text and "All methods within" in text
    for method in ("cublas", "merged", "minilora-torch", "unsloth-addmm", "triton-p0",
                   "triton-p0.05"):
        assert f"| {method} |" in text, method
    assert plots[0].stat().st_size > 1000


def test_bench_multi_adapter_dry_run(tmp_path):
    """benchmarks/bench_multi_adapter.py --dry-run: every method, the check against fp32, the report."""
    pytest.importorskip("triton")
    pytest.importorskip("peft")
    _dry_run(MULTI, tmp_path, PYTHONSAFEPATH="1")
    reports = list(tmp_path.glob("multi-adapter-CPU-dry-run-*.md"))
    assert len(reports) == 1, list(tmp_path.iterdir())
    text = reports[0].read_text()
    assert "DRY RUN" in text and "All methods within" in text and "## decode" in text and "## prefill" in text
    for method in ("base", "triton", "minilora-torch", "minilora-loop", "peft"):
        assert f"| {method} |" in text, method
    assert "extra cost over base" in text
