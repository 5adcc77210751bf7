"""studies/smollm2-ko: RESULTS.md and its figures regenerate exactly from the committed results/*.json."""
from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import pytest

STUDY = Path(__file__).resolve().parents[1] / "studies" / "smollm2-ko"


def _results_module():
    spec = importlib.util.spec_from_file_location("study_results", STUDY / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


def test_results_regenerate_exactly(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    results = _results_module()
    results.main(["--out", str(tmp_path)])
    assert (tmp_path / "RESULTS.md").read_text(encoding="utf-8") == (STUDY / "RESULTS.md").read_text(encoding="utf-8")
    committed = sorted(p.name for p in STUDY.glob("*.png"))
    assert committed == sorted(p.name for p in tmp_path.glob("*.png"))
    for name in committed:
        if matplotlib.__version__ == results.MATPLOTLIB:  # the version that drew them: byte for byte
            assert (tmp_path / name).read_bytes() == (STUDY / name).read_bytes(), name
        else:  # another renderer version may place pixels differently; the figure itself is the same
            assert png_size(tmp_path / name) == png_size(STUDY / name), name


def test_gpu_variant_is_planned_under_eight_minutes_on_one_h100(capsys, default_model_dir):
    """gpu.py --plan: the GPU study's arms, at MFU 25% and 30 s per stage to start, fit the issue's 8 minutes."""
    if not (STUDY.parents[1].parent / "shared" / "data" / "pretrain").is_dir():
        pytest.skip("needs ../shared/data (the study's corpora)")
    spec = importlib.util.spec_from_file_location("study_gpu", STUDY / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    seconds = gpu.plan(0.25)
    assert 60 < seconds < 8 * 60
    printed = capsys.readouterr().out
    assert all(arm.name in printed for arm in gpu.GPU_ARMS)
