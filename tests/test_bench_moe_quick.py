"""benchmarks/bench_moe.py --quick runs to completion on the CPU and writes its report."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_moe.py"


def test_bench_moe_quick(tmp_path):
    pytest.importorskip("peft")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (report,) = tmp_path.glob("moe-cpu-*-quick.md")
    text = report.read_text()
    for row in ("| grouped_mm | forward+backward |", "| eager | forward+backward |", "minilora / peft"):
        assert row in text, row
    # Checked before timing: minilora against peft in fp32 on the same factors. The fold and the
    # experts' matmuls sum at most 48 products: a few fp32 roundings (6e-8 each) per value.
    found = re.findall(r"output ([0-9.]+e[+-][0-9]+), input gradient ([0-9.]+e[+-][0-9]+)", text)
    assert len(found) == 2 and all(float(v) <= 1e-5 for pair in found for v in pair), found
