"""`pipeline.py --plan` / `elo.plan`: the memory model against PyTorch's own accounting, and the paper's recipe planned
offline beside the paper's hours.

The measured model is SmolLM2-135M's shape cut to 4 decoder layers (so that a case takes seconds), saved as a
checkpoint and built by the stages' own code (elo.train.build: the spec, then `materialize`: meta device -> FSDP2 ->
each rank's rows). One step creates the optimizer state; the next runs under
torch.distributed._tools.mem_tracker.MemTracker, which sees every tensor storage made and freed at the dispatcher
(so on CPU as on CUDA, FSDP2's resized unsharded parameters included): its peak, and the tensors the forward pass
leaves behind (its "Activation" category). Parameter, gradient and optimizer bytes are counted from the tensors
themselves and must equal the plan's exactly; activations and peak must be within 20%. One process runs in pytest;
two run this file as a script under torchrun (gloo), as tests/test_train.py runs train.py.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from torch.distributed._tools.mem_tracker import MemTracker

import elo
from elo.config import ModelConfig
from elo.pipeline import resources
from elo.pipeline import run as pipeline
from elo.extensions.distill import distill_middle
from elo.extensions.middle import fit_middle
from elo.extensions.fidelity import compare_gradients
from elo.model import attach_middle
from elo.pretrain import LayerChoice, MiddleChoice, TrainConfig
from elo.train import distributed
from elo.train.build import in_situ_spec, materialize
from elo.train.flops import train_flops_per_token
from elo.train.loop import make_optimizer
from tests.conftest import DATA

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_4_LAYERS = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
                        rope_theta=100000.0, tie_word_embeddings=True)
BATCH, SEQ = 2, 128
TOLERANCE = 0.20  # activations and peak, relative to the measured
# case -> the train.py options that select it (all through TrainConfig, as a recipe's stage is planned). Plain full
# fine-tuning is covered in parts: its activations by grad_accum 2's first micro-batch, its end of backward by
# checkpointing's.
CASES = {"elo": dict(layers="1,4"), "elo, grad_accum 2": dict(layers="1,4", grad_accum=2),
         "lora": dict(layers="all", lora_rank=8),
         "full, checkpointing": dict(layers="all", activation_checkpointing=True),
         "full, grad_accum 2": dict(layers="all", grad_accum=2),
         "elo, linear middle": dict(layers="1,4", middle="linear"),
         "elo, distilled middle": dict(layers="1,4", middle="distilled:1")}
ONE_PROCESS = ["elo, grad_accum 2", "lora", "full, checkpointing", "elo, linear middle", "elo, distilled middle"]
TWO_PROCESSES = ["elo", "full, grad_accum 2"]


def stage_config(checkpoint: Path, case: str) -> TrainConfig:
    options = dict(CASES[case])
    middle = MiddleChoice.parse(options.pop("middle", None))
    return TrainConfig(out="unused", model=str(checkpoint), layers=LayerChoice.parse(options.pop("layers")),
                       batch_size=BATCH, seq_len=SEQ, middle=middle, **options)


def stand_in(checkpoint: Path, cfg: TrainConfig):
    """The run's --middle stand-in for layers 1,4, as train.py builds it (the distilled blocks at their start)."""
    return _stand_in(checkpoint, cfg.middle)


@functools.cache  # frozen, so two tests may share one (the distillation's fidelity gate takes seconds)
def _stand_in(checkpoint: Path, middle: MiddleChoice):
    ids = torch.randint(0, 49152, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    if middle.kind == "linear":
        return fit_middle(str(checkpoint), "1,4", [ids] * 4, tokens=3 * BATCH * SEQ)
    return distill_middle(str(checkpoint), "1,4", [ids] * 2, tokens=BATCH * SEQ, blocks=middle.blocks, steps=0)


class Tracker(MemTracker):
    """MemTracker hooks every parameter's gradient, which raises for frozen ones (ELO, LoRA); without the hooks
    gradients count as "Temp" instead of "Gradient", and the totals are the same."""

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        return super()._track_module_params_and_buffers(module, install_grad_hooks=False)


def local_bytes(tensors) -> int:
    """Bytes of this rank's part of each tensor (a DTensor's local shard), each tensor once."""
    unique = {id(t): t for t in tensors}.values()
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in unique)


def measure(checkpoint: Path, case: str, d: distributed.Dist) -> dict[str, int]:
    """One training step as elo's loop takes it (micro-batches, FSDP2 gradient sync on the last one only), measured."""
    cfg = stage_config(checkpoint, case)
    model = materialize(cfg.model_spec(), d, cfg.activation_checkpointing)
    if cfg.middle is not None:
        attach_middle(model, stand_in(checkpoint, cfg))
    optimizer = make_optimizer(model, cfg, d.device)
    ids = torch.randint(0, model.config.vocab_size, (cfg.grad_accum, BATCH, SEQ + 1),
                        generator=torch.Generator().manual_seed(d.rank))
    for p in model.parameters():  # AdamW's state, made as a first step makes it, for the measured step to run beside
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    measured = {}
    tracker = Tracker()
    tracker.track_external(model, optimizer)
    with tracker:
        for i, batch in enumerate(ids):
            if d.sharded:
                model.set_requires_gradient_sync(i == cfg.grad_accum - 1)
            tracker.reset_mod_stats()  # MemTracker follows one forward per module between resets
            before = tracker.get_tracker_snapshot()[d.device]["Activation"]
            loss, _ = model(batch[:, :-1], targets=batch[:, 1:])
            if i == 0:
                measured["activations"] = tracker.get_tracker_snapshot()[d.device]["Activation"] - before
            loss.backward()
        measured["gradients"] = local_bytes(p.grad for p in model.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return measured | {"parameters": local_bytes(model.parameters()),
                       "optimizer": local_bytes(t for state in optimizer.state.values() for t in state.values()),
                       "peak": tracker.get_tracker_snapshot("peak")[d.device]["Total"]}


def planned(checkpoint: Path, case: str, world_size: int) -> resources.Memory:
    cfg = stage_config(checkpoint, case)
    model = resources.stage_model("train", cfg, ModelConfig.from_file(checkpoint / "config.json"))
    shape = resources.Shape(BATCH, SEQ, cfg.grad_accum, world_size, cfg.activation_checkpointing)
    return resources.memory(model, shape, resources.numerics("cpu", world_size))


def check(measured: dict[str, int], plan: resources.Memory, case: str) -> None:
    for key in ("parameters", "gradients", "optimizer"):
        assert measured[key] == getattr(plan, key), (case, key, measured[key], getattr(plan, key))
    for key in ("activations", "peak"):
        ratio = getattr(plan, key) / measured[key]
        assert abs(ratio - 1) <= TOLERANCE, f"{case}: planned {key} {getattr(plan, key):,} vs measured " \
                                            f"{measured[key]:,} ({ratio:.3f}x)"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    import transformers  # a test dependency, not the library's (as in tests/conftest.py)

    directory = tmp_path_factory.mktemp("smollm2-4-layers")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_4_LAYERS)).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("case", ONE_PROCESS)
def test_one_process_memory_matches_pytorch_accounting(checkpoint, case):
    check(measure(checkpoint, case, distributed.Dist(0, 1, torch.device("cpu"))), planned(checkpoint, case, 1), case)


def test_two_processes_memory_matches_pytorch_accounting(checkpoint, tmp_path):
    """FSDP2 on gloo: rank 0 holds the largest shards; gathered root and layer, unsharded accumulated gradients."""
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    __file__, str(checkpoint), str(tmp_path), *TWO_PROCESSES], cwd=REPO, check=True, timeout=300,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    measured = json.loads((tmp_path / "rank0.json").read_text())
    for case in TWO_PROCESSES:
        check(measured[case], planned(checkpoint, case, 2), case)


def llama_in_hub_cache(cache: Path) -> None:
    """meta-llama/Llama-3.1-8B's published config.json, where `hf download meta-llama/Llama-3.1-8B config.json` puts
    it (the model is gated: a planner must not need its weights, or the hub)."""
    repo, commit = cache / "models--meta-llama--Llama-3.1-8B", "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], hidden_act="silu", hidden_size=4096, intermediate_size=14336,
        max_position_embeddings=131072, model_type="llama", num_attention_heads=32, num_hidden_layers=32,
        num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
        vocab_size=128256, bos_token_id=128000, eos_token_id=128001,
        rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192, rope_type="llama3"))))


@pytest.mark.skipif(not DATA.is_dir(), reason="the recipe's data lives in ../shared/data")
def test_paper_recipe_plans_offline_beside_the_papers_hours(tmp_path, monkeypatch, capsys):
    llama_in_hub_cache(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    p = elo.plan(REPO / "recipes" / "llama3.1-8b-ko.toml", "h100-80gb")
    stages = {s.name: s for s in p.stages}
    assert list(stages) == ["train", "align", "control", "sft"] and p.world_size == 8
    assert stages["control"].tokens == stages["align"].tokens  # the same alignment, on the base alone
    assert stages["train"].tokens == 4769 * 8 * 4 * 2048 * 8 and stages["align"].tokens >= 300_000_000
    assert stages["train"].fewest_gpus == 1 and stages["align"].fewest_gpus > 1  # the paper's stated limitation
    assert stages["train"].memory.peak < stages["align"].memory.peak
    table = p.table()
    assert "the paper's Table 1" in table and "19.8 h" in table and "MFU 40% (assumed" in table
    with pytest.raises(ValueError, match="--gpu 'h100'"):
        elo.plan(REPO / "recipes" / "llama3.1-8b-ko.toml", "h100")
    pipeline.main([str(REPO / "recipes" / "llama3.1-8b-ko.toml"), "--plan", "--gpu", "24GB"])
    assert "GPU 24GB: 24 GiB" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["elo, linear middle", "elo, distilled middle"])
def test_the_stand_in_is_planned_at_the_runs_flops_and_bytes(checkpoint, case):
    """--middle: the plan's meta stand-in costs what the run's fitted one costs: the same FLOPs per token (the run's
    own count, which MFU uses) and the same fp32 bytes."""
    cfg = stage_config(checkpoint, case)
    built = attach_middle(materialize(cfg.model_spec(), distributed.Dist(0, 1, torch.device("cpu"))),
                          stand_in(checkpoint, cfg))
    config = ModelConfig.from_file(checkpoint / "config.json")
    model = resources.stage_model("train", cfg, config)
    assert train_flops_per_token(model, SEQ) == train_flops_per_token(built, SEQ) > train_flops_per_token(
        resources.stage_model("train", dataclasses.replace(cfg, middle=None), config), SEQ)
    assert planned(checkpoint, case, 1).stand_in == 4 * sum(b.numel() for b in built.middle.buffers())


def test_the_fidelity_probe_is_planned_as_it_measures(checkpoint):
    """--fidelity-every: the full model the probe keeps (the oracle's spec, checkpointed) and one measurement on a
    batch per language, under PyTorch's accounting, beside the trained submodel and its optimizer state."""
    d = distributed.Dist(0, 1, torch.device("cpu"))
    cfg = stage_config(checkpoint, "elo")
    model = materialize(cfg.model_spec(), d)
    optimizer = make_optimizer(model, cfg, d.device)
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    probe = materialize(in_situ_spec(str(checkpoint), "1,4"), d, activation_checkpointing=True)
    # one batch (the probe takes one per language, one after the other, so its peak is one batch's; MemTracker
    # follows one forward per module)
    ids = torch.randint(0, 49152, (1, BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    tracker = Tracker()
    tracker.track_external(model, optimizer, probe)
    with tracker:
        compare_gradients(probe, model, [(b[:, :-1], b[:, 1:]) for b in ids], [1, 4], d)
    measured = tracker.get_tracker_snapshot("peak")[d.device]["Total"]

    config, n = ModelConfig.from_file(checkpoint / "config.json"), resources.numerics("cpu", 1)
    shape = resources.Shape(BATCH, SEQ, 1, 1, False)
    m = resources.memory(resources.stage_model("train", cfg, config), shape, n)
    p = resources.memory(resources.stage_model("train", dataclasses.replace(cfg, in_situ=True), config),
                         dataclasses.replace(shape, activation_checkpointing=True), n)
    plan = resources.measuring_peak(m, p, cpu_offload=False)
    assert abs(plan / measured - 1) <= TOLERANCE, f"planned {plan:,} vs measured {measured:,} ({plan / measured:.3f}x)"


def test_the_oracle_is_planned_as_the_full_model_with_elos_layers_training(checkpoint):
    """--in-situ trains ELO's layers inside the full model: the plan's model is the stage's own (elo.train.build's
    in_situ_spec, materialized on the meta device), not the 2-layer submodel."""
    from elo.train.build import in_situ_spec, meta_model
    from elo.train.flops import train_flops_per_token

    cfg = TrainConfig(out="unused", model=str(checkpoint), layers=LayerChoice.parse("1,4"), in_situ=True, seq_len=SEQ)
    planned = resources.stage_model("train", cfg, ModelConfig.from_file(checkpoint / "config.json"))
    built = meta_model(in_situ_spec(str(checkpoint), "1,4"))
    assert planned.config.num_hidden_layers == 4
    assert ([n for n, p in planned.named_parameters() if p.requires_grad]
            == [n for n, p in built.named_parameters() if p.requires_grad])
    assert train_flops_per_token(planned, SEQ) == train_flops_per_token(built, SEQ)
    elo_cost = train_flops_per_token(resources.stage_model("train", dataclasses.replace(cfg, in_situ=False),
                                                           planned.config), SEQ)
    assert elo_cost < train_flops_per_token(planned, SEQ)


if __name__ == "__main__":  # under torchrun: CHECKPOINT OUT CASE...; each rank writes OUT/rank{R}.json
    directory, out, *names = sys.argv[1:]
    torch.set_num_threads(1)
    d = distributed.init()
    try:
        results = {name: measure(Path(directory), name, d) for name in names}
        (Path(out) / f"rank{d.rank}.json").write_text(json.dumps(results))
    finally:
        distributed.close(d)

