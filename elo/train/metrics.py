"""Training metrics: the peak that MFU is measured against, MFU itself, peak memory, ETA and the progress line."""
from __future__ import annotations

import resource
import time

import torch

# dense bf16 tensor-core peak (FLOP/s) by device name
GPU_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}
_cpu_peak: float | None = None


def _measure_cpu_peak(n: int = 1024, repeats: int = 4, trials: int = 5) -> float:
    """The best fp32 matmul rate over several trials: a CPU shared with another process only ever makes a trial
    slower, so the best one is the closest to what this CPU can reach."""
    a = torch.randn(n, n)
    a @ a  # warm up
    best = float("inf")
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(repeats):
            a @ a
        best = min(best, time.perf_counter() - t)
    return repeats * 2 * n**3 / best


def peak_flops_info(device: torch.device) -> tuple[float, str]:
    """(peak FLOP/s, what it is): a known GPU's dense bf16 tensor-core peak; on CPU the measured fp32 matmul rate."""
    global _cpu_peak
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK.items():
            if key in name:
                return value, f"{name} bf16 dense peak {value / 1e12:.0f} TFLOP/s"
        return float("nan"), f"{name} (peak unknown: MFU not reported)"
    if _cpu_peak is None:
        _cpu_peak = _measure_cpu_peak()
    return _cpu_peak, (f"this CPU's measured fp32 matmul rate {_cpu_peak / 1e9:.1f} GFLOP/s per process "
                       f"(best of 5 trials, {torch.get_num_threads()} threads)")


def mfu(achieved_flops_per_s: float, peak: float) -> float | None:
    """Model FLOPs utilisation; None when the peak is unknown or the ratio exceeds 1 (then the reference peak was
    measured low, e.g. on a busy CPU, and the figure would be meaningless)."""
    value = achieved_flops_per_s / peak
    return value if 0 <= value <= 1 else None


class StepTimer:
    def __init__(self, start_step: int, max_steps: int):
        self.start, self.start_step, self.max_steps = time.perf_counter(), start_step, max_steps

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def eta(self, step: int) -> float:
        return self.elapsed() / max(1, step - self.start_step) * (self.max_steps - step)

    @staticmethod
    def reset_peak_memory(device: torch.device) -> None:
        """Start this stage's peak afresh: stages run one after another in one process (the pipeline) would
        otherwise all report the largest peak so far."""
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            return
        try:  # Linux: "5" resets VmHWM to the current resident size (proc(5), clear_refs)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass  # elsewhere the peak stays the process's own

    @staticmethod
    def peak_memory_gb(device: torch.device) -> float:
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device) / 1e9
        try:  # VmHWM: this process's own peak (ru_maxrss is inherited from the parent across exec)
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1e6
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def format_progress(record: dict, max_steps: int, eta_s: float) -> str:
    mfu_text = "n/a" if record["mfu"] is None else f"{record['mfu']:.1%}"
    vals = " ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("val_loss"))
    return (f"step {record['step']}/{max_steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
            f"{record['tokens_per_s']:,.0f} tok/s | mfu {mfu_text} | mem {record['peak_memory_gb']:.2f} GB | "
            f"eta {eta_s:,.0f}s {vals}").rstrip()
