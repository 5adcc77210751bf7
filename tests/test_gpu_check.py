"""benchmarks/gpu_check.py runs on CPU at toy size (its CUDA-only rows say skipped), so it cannot rot unseen."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_on_cpu():
    r = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--steps", "1"], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    for name in ("SDPA flash backend", "FSDP2 + CPU offload, bf16 policy", "bf16 autocast vs fp32"):
        assert any(f"{name} | skipped" in line for line in table), (name, table)
    for name in ("bf16 logits vs transformers | pass", "FSDP2, 1 process | pass", "train ELO", "train align"):
        assert any(name in line for line in table), (name, table)
