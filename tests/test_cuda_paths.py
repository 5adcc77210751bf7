"""The training code's CUDA-only paths, run on CPU at toy size where they can be (issue 22): FSDP2 with the CUDA
mixed-precision policy (bf16 parameters, fp32 gradient reduction) on gloo against the fp32 run; activation
checkpointing and `--compile` against the plain model; fused AdamW against the default one; the CUDA RNG state
through a train-state checkpoint; `--cpu-offload` refused on CPU before any work; `--device cuda` refused without
CUDA. What cannot run here is listed, with why, in benchmarks/gpu_check.py (CUDA_BRANCHES), which runs it on a GPU;
`test_every_cuda_branch_is_listed` keeps that list complete.

The two-process case runs this file as a script under torchrun (gloo), as tests/test_plan.py does.
"""
from __future__ import annotations

import ast
import functools
import os
import re
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
import torch

from elo.train import build, distributed
from elo.train.loop import make_optimizer
from elo.train.options import LoopConfig
from tests.conftest import SAMPLE, build_hf_checkpoint

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.gpu_check import CUDA_BRANCHES  # noqa: E402

LR = 1e-3
# (name, bf16 policy, activation checkpointing) of each FSDP2 case the torchrun script runs
FSDP_CASES = [("fp32", False, False), ("bf16", True, False), ("fp32+ac", False, True)]


def batch(rank: int, vocab: int) -> torch.Tensor:
    """Each rank's own (2, 33) token ids: a different micro-batch per rank, as in training."""
    return torch.randint(0, vocab, (2, 33), generator=torch.Generator().manual_seed(100 + rank))


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank calls it), a copy of a plain one."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


# the collectives FSDP2 gathers parameters and reduces gradients with (the first of each pair in torch < 2.13)
COLLECTIVES = {"all_gather_into_tensor": "all-gather", "all_gather_single": "all-gather",
               "reduce_scatter_tensor": "reduce-scatter", "reduce_scatter_single": "reduce-scatter"}


@contextmanager
def recording_collectives(seen: set[tuple[str, str]]) -> Iterator[None]:
    """Add (all-gather | reduce-scatter, dtype of what it sends) to `seen` for each such collective inside."""
    import torch.distributed as dist

    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def recorder(name: str):
        def call(*args, **kwargs):
            sent = kwargs["input"] if "input" in kwargs else kwargs.get("input_tensor", args[1] if len(args) > 1
                                                                                        else None)
            seen.add((COLLECTIVES[name], str(sent.dtype)))
            return originals[name](*args, **kwargs)
        return call
    try:
        for name in originals:
            setattr(dist, name, recorder(name))
        yield
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def train_step(model: torch.nn.Module, ids: torch.Tensor, d: distributed.Dist) -> dict:
    """One optimizer step as elo.train.loop takes it (summed loss scaled to sum / global tokens, gradient norm,
    the loop's AdamW); the loss, each parameter's gradient and updated value, gathered whole on every rank."""
    seen = {}

    def record(module, args, output):  # the dtype the first layer computes in, and its weights as gathered
        seen.setdefault("weight", str(module.down_proj.weight.dtype))
        seen.setdefault("activation", str(output.dtype))
    first = next(iter(model.model.layers.values()))
    hook = first.mlp.register_forward_hook(record)
    n_global = ids[:, 1:].numel() * d.world_size
    collectives = set()
    with recording_collectives(collectives):
        loss, _ = model(ids[:, :-1], targets=ids[:, 1:])
        (loss * d.world_size / n_global).backward()  # FSDP averages over ranks
    hook.remove()
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters()], 1.0)
    out = {"loss": distributed.all_reduce_sum(loss.detach().float(), d).item() / n_global,
           "grad_norm": full(grad_norm).item(), "seen": seen, "collectives": sorted(collectives),
           "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
           "grad_dtypes": sorted({str(p.grad.dtype) for p in model.parameters()}),
           "sharded": sorted({type(p.grad).__name__ for p in model.parameters()}),
           "grads": {n: full(p.grad) for n, p in model.named_parameters()}}
    optimizer = make_optimizer(model, LoopConfig(out="-", lr=LR), d.device)
    optimizer.step()
    out["updated"] = {n: full(p) for n, p in model.named_parameters()}
    return out


def fsdp_cases(directory: Path, d: distributed.Dist) -> dict:
    """Each FSDP_CASES case built by the stages' own `materialize` with the policy forced (a CPU run is fp32)."""
    spec = build.full_spec(str(directory))
    ids = batch(d.rank, spec.config.vocab_size)
    results = {}
    for name, bf16, ac in FSDP_CASES:
        with mock.patch.object(distributed, "parallelize", functools.partial(distributed.parallelize, bf16=bf16)):
            model = build.materialize(build.full_spec(str(directory)), d, activation_checkpointing=ac)
        results[name] = train_step(model, ids, d)
    return results


# ---- FSDP2: the CUDA mixed-precision policy on gloo ----

@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory) -> dict:
    """Both checkpoints' FSDP_CASES on two gloo processes (one torchrun): an untied Llama and a tied Qwen2 with
    biases, so that a tied head and biases go through the policy too."""
    root = tmp_path_factory.mktemp("fsdp-policy")
    checkpoints = []
    for arch in ("llama", "qwen2"):
        build_hf_checkpoint(arch, root / arch)
        checkpoints.append(str(root / arch))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    __file__, str(root), *checkpoints], cwd=REPO, check=True, timeout=300,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    return torch.load(root / "results.pt", weights_only=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fsdp2_bf16_policy_on_gloo_matches_fp32_and_keeps_fp32_gradients(fsdp_results, arch):
    """The policy FSDP2 gets on CUDA (bf16 parameters for compute, fp32 reduction) on two gloo processes against
    the fp32 policy CPU runs use, one optimizer step as the loop takes it.

    Tolerances, from bf16's 8 significant bits (unit roundoff 2^-9 = 0.2%): the mean loss within 1e-3 relative
    (rounding errors of single logits largely cancel in a mean over 64 tokens; measured 3e-5 to 9e-5). Gradients
    are computed from bf16 weights and bf16 activations in backward, every matmul input rounded: the whole
    gradient within 3e-2 relative in norm, each tensor's within 1e-1 (measured 1.5% and at most 4.5%, a RoPE'd
    k bias). AdamW's first step moves each weight by lr * g / |g|, so an updated weight is equal to the fp32 run's
    (within 1e-6) or, where a near-zero gradient changed sign, off by exactly 2 * lr: never more, and on at most
    3% of the elements (measured 1.2%)."""
    runs = fsdp_results[arch]
    fp32, bf16 = runs["fp32"], runs["bf16"]
    # the policy is really in force: parameters are gathered in bf16 and the layer computes on them, gradients are
    # reduce-scattered in fp32 (reduce_dtype); FSDP2's sharded (master) parameters stay fp32, and so do their
    # gradients (what the clipping and the optimizer see)
    assert bf16["collectives"] == [("all-gather", "torch.bfloat16"), ("reduce-scatter", "torch.float32")], \
        bf16["collectives"]
    assert fp32["collectives"] == [("all-gather", "torch.float32"), ("reduce-scatter", "torch.float32")]
    assert bf16["seen"] == {"weight": "torch.bfloat16", "activation": "torch.bfloat16"}, bf16["seen"]
    assert fp32["seen"] == {"weight": "torch.float32", "activation": "torch.float32"}, fp32["seen"]
    assert bf16["param_dtypes"] == bf16["grad_dtypes"] == ["torch.float32"]
    assert bf16["sharded"] == fp32["sharded"] == ["DTensor"]
    assert all(bf16["updated"][n].dtype == torch.float32 for n in bf16["updated"])

    assert abs(bf16["loss"] - fp32["loss"]) <= 1e-3 * fp32["loss"], (bf16["loss"], fp32["loss"])
    whole = {run: torch.cat([g.flatten() for g in results["grads"].values()]) for run, results in runs.items()}
    assert rel(whole["bf16"], whole["fp32"]) <= 3e-2
    assert abs(bf16["grad_norm"] - fp32["grad_norm"]) <= 3e-2 * fp32["grad_norm"]
    worst = max(fp32["grads"], key=lambda n: rel(bf16["grads"][n], fp32["grads"][n]))
    assert rel(bf16["grads"][worst], fp32["grads"][worst]) <= 1e-1, worst
    flipped = total = 0
    for name, w in fp32["updated"].items():
        diff = (bf16["updated"][name] - w).abs()
        assert diff.max() <= 2 * LR * (1 + 1e-3), name  # never more than one sign flip of the Adam step
        flipped += int((diff > 1e-6).sum())
        total += w.numel()
    assert flipped <= 0.03 * total, (flipped, total)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_activation_checkpointing_under_fsdp2_gives_the_same_gradients(fsdp_results, arch):
    """Checkpointed layers wrapped by FSDP2 (the order parallelize applies them in) recompute exactly: same loss,
    gradients within 1e-6 relative (fp32, the same kernels run again), same update."""
    plain, ac = fsdp_results[arch]["fp32"], fsdp_results[arch]["fp32+ac"]
    assert abs(plain["loss"] - ac["loss"]) <= 1e-6 * plain["loss"]
    for name in plain["grads"]:
        assert rel(ac["grads"][name], plain["grads"][name]) <= 1e-6, name
        assert torch.allclose(ac["updated"][name], plain["updated"][name], rtol=0, atol=1e-6), name


# ---- one process: activation checkpointing, compile, fused AdamW ----

ONE = distributed.Dist(0, 1, torch.device("cpu"))


def one_process_step(directory: Path, **wrappers) -> dict:
    model = build.materialize(build.full_spec(str(directory)), ONE, **wrappers)
    return train_step(model, batch(0, model.config.vocab_size), ONE)


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tiny_llama):
    """--activation-checkpointing on one process (no FSDP2): the recomputed forward is the same fp32 computation,
    so the loss and every gradient agree within 1e-6 relative."""
    plain = one_process_step(tiny_llama[0])
    ac = one_process_step(tiny_llama[0], activation_checkpointing=True)
    assert abs(plain["loss"] - ac["loss"]) <= 1e-6 * plain["loss"]
    for name in plain["grads"]:
        assert rel(ac["grads"][name], plain["grads"][name]) <= 1e-6, name


def _compiler_missing() -> str | None:
    if shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("c++") is None:
        return "torch.compile's CPU backend (inductor) needs a C++ compiler; none on PATH"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_compiler_missing() is not None, reason=str(_compiler_missing()))
def test_compile_gives_the_same_loss_and_gradients(tiny_llama):
    """--compile (torch.compile per decoder layer, inductor): fused kernels round differently from eager, so the
    loss and gradients agree within 1e-5 relative (fp32 rounding through 4 layers), not bit for bit."""
    plain = one_process_step(tiny_llama[0])
    compiled = one_process_step(tiny_llama[0], compile=True)
    assert abs(plain["loss"] - compiled["loss"]) <= 1e-5 * plain["loss"]
    for name in plain["grads"]:
        assert rel(compiled["grads"][name], plain["grads"][name]) <= 1e-5, name


def test_fused_adamw_as_on_cuda_matches_the_default(tiny_llama):
    """make_optimizer asks for fused AdamW on CUDA; PyTorch has the fused kernel on CPU too, so the loop's param
    groups (weight decay on matrices only) run through it here: two steps equal the default (foreach) AdamW's
    within 1e-6."""
    updated = {}
    for kind in ("cpu", "cuda"):
        model = build.materialize(build.full_spec(str(tiny_llama[0])), ONE)
        optimizer = make_optimizer(model, LoopConfig(out="-", lr=LR), torch.device(kind))
        assert optimizer.defaults["fused"] == (kind == "cuda")
        ids = batch(0, model.config.vocab_size)
        for _ in range(2):
            model(ids[:, :-1], targets=ids[:, 1:])[0].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        updated[kind] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, p in updated["cpu"].items():
        assert torch.allclose(updated["cuda"][name], p, rtol=0, atol=1e-6), name


# ---- the CUDA RNG state in a train-state checkpoint ----

class _Source:
    """The least a batch source gives RunDir.save / _load."""

    def __init__(self):
        self.position = 7

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def test_cuda_rng_state_round_trips_through_a_checkpoint(tiny_llama, tmp_path, monkeypatch):
    """On CUDA every GPU's RNG state is saved beside the CPU's and restored on resume. A CPU build has no CUDA
    generator, so torch.cuda's three calls are stood in for: the states (one ByteTensor per GPU) must pass the
    checkpoint's safe loader (weights_only) and come back equal, in order."""
    from elo.train import run_dir
    from elo.train.run_dir import RunDir

    states = [torch.randint(0, 256, (16,), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
              for i in range(2)]
    restored = []
    # run_dir's own `torch` only: DCP, which writes the checkpoint, must still see no CUDA
    seen_by_run_dir = types.ModuleType("torch")
    seen_by_run_dir.__dict__.update(vars(torch))
    seen_by_run_dir.cuda = types.SimpleNamespace(is_available=lambda: True, set_rng_state_all=restored.extend,
                                                 get_rng_state_all=lambda: [s.clone() for s in states])
    monkeypatch.setattr(run_dir, "torch", seen_by_run_dir)
    model = build.materialize(build.full_spec(str(tiny_llama[0])), ONE)
    optimizer = make_optimizer(model, LoopConfig(out="-", lr=LR), ONE.device)
    run = RunDir(tmp_path / "run")
    run.save(1, model, optimizer, _Source(), ONE, tokens=64, keep=0)
    assert run.load_latest(model, optimizer, _Source(), ONE)["step"] == 1
    assert len(restored) == 2 and all(torch.equal(a, b) for a, b in zip(restored, states))


# ---- what needs CUDA is refused without it, before any work ----

@pytest.fixture
def refuse_work(monkeypatch):
    """Loading a model or reading data fails the test: a refusal must come before them."""
    import elo.align
    import elo.pretrain
    import elo.sft

    def refuse(*a, **k):
        raise AssertionError("work started before --cpu-offload was refused")
    for module, name in ((build, "materialize"), (elo.sft, "materialize"), (elo.align, "materialize"),
                         (elo.pretrain, "materialize"), (elo.pretrain, "load_tokenizer"),
                         (elo.sft, "build_chat_source"), (elo.sft, "add_chat_vector"),
                         (elo.align, "load_tokenizer"), (elo.align, "splice_checkpoint")):
        monkeypatch.setattr(module, name, refuse)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU --cpu-offload runs (benchmarks/gpu_check.py)")
@pytest.mark.parametrize("stage", ["train", "sft", "align"])
def test_cpu_offload_is_refused_on_cpu_in_one_line_before_any_work(stage, tiny_llama, tmp_path, capsys,
                                                                   refuse_work):
    import elo
    import elo.align
    import elo.sft
    from elo.tools.cli import run_main

    out = tmp_path / "out"
    if stage == "train":
        main = elo.pretrain.main
        argv = ["--model", str(tiny_llama[0]), "--data", f"ko={SAMPLE / 'pretrain' / 'ko_wikipedia.jsonl'}",
                "--max-steps", "1", "--seq-len", "32"]
    elif stage == "sft":
        main = elo.sft.main
        argv = ["--model", str(tiny_llama[0]), "--data", f"ko={SAMPLE / 'sft' / 'ko_chatbot_data.jsonl'}",
                "--max-steps", "1", "--seq-len", "32"]
    else:
        main = elo.align.main
        sub = elo.detach_checkpoint(tiny_llama[0], "1,4", tmp_path / "sub")
        argv = ["--elo", str(sub), "--data", f"ko={SAMPLE / 'pretrain' / 'ko_wikipedia.jsonl'}", "--max-steps",
                "1", "--seq-len", "32"]
    with pytest.raises(SystemExit) as e:
        run_main(main, argv + ["--cpu-offload", "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: --cpu-offload") and "needs CUDA" in err, err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_evaluate_device_cuda_is_refused_without_cuda(tmp_path):
    from elo.evaluation import evaluate

    args = evaluate.parse_args(["--model", "unused", "--device", "cuda", "--out", str(tmp_path / "r.json")])
    with pytest.raises(ValueError, match="--device cuda: CUDA is not available on this machine; use --device cpu"):
        evaluate.check_options(args)


# ---- every CUDA branch is tested above or run by benchmarks/gpu_check.py ----

def cuda_branches() -> set[str]:
    """`file:function` of every function (or method) in elo/ whose code names CUDA: torch.cuda, or a string
    holding "cuda" (docstrings and comments aside)."""
    found = set()

    def visit(node: ast.AST, file: str, scope: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, file, scope + [child.name])
                continue
            if isinstance(child, ast.Expr) and isinstance(child.value, ast.Constant):
                continue  # a docstring
            for n in ast.walk(child):
                if (isinstance(n, ast.Attribute) and n.attr == "cuda") or (
                        isinstance(n, ast.Constant) and isinstance(n.value, str) and "cuda" in n.value):
                    found.add(f"{file}:{'.'.join(scope) or '<module>'}")
    for path in sorted((REPO / "elo").rglob("*.py")):
        visit(ast.parse(path.read_text()), str(path.relative_to(REPO)), [])
    return found


def test_every_cuda_branch_is_listed():
    listed = {entry[0] for entry in CUDA_BRANCHES}
    assert cuda_branches() == listed, {"unlisted": cuda_branches() - listed, "gone": listed - cuda_branches()}
    tests = {name for name in globals() if name.startswith("test_")}
    for place, what, covered in CUDA_BRANCHES:
        named = set(re.findall(r"tests/test_cuda_paths\.py::(\w+)", covered))
        assert named <= tests, (place, named - tests)
        assert covered, place


if __name__ == "__main__":  # under torchrun: ROOT CHECKPOINT...; rank 0 writes ROOT/results.pt
    root, *checkpoints = sys.argv[1:]
    torch.set_num_threads(1)
    d = distributed.init()
    try:
        results = {Path(c).name: fsdp_cases(Path(c), d) for c in checkpoints}
        if d.main:
            torch.save(results, Path(root) / "results.pt")
    finally:
        distributed.close(d)


def test_cpu_offload_on_cuda_without_torchrun_is_refused_naming_torchrun(monkeypatch):
    """FSDP2 needs a process group even on one GPU: on CUDA, --cpu-offload outside torchrun is a one-line error
    naming the command (CUDA's presence stood in for by a patch; nothing else is touched)."""
    from elo.train import distributed

    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=r"^--cpu-offload .* launch with torchrun, one GPU too \(torchrun --standalone "
                                         r"--nproc_per_node 1 SCRIPT \.\.\.\)$"):
        distributed.check_cpu_offload(True)
    distributed.check_cpu_offload(False)  # off: nothing to check
    monkeypatch.setenv("WORLD_SIZE", "1")
    distributed.check_cpu_offload(True)  # under torchrun with CUDA: allowed
