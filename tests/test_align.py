"""align.py: splice while loading, step-0 loss vs a transformers reference splice, what trains, 1 vs 2 processes,
sharded loading, fresh data after ELO, resume after SIGKILL, and one-line errors before any model loads."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import elo
from elo.align import AlignConfig, align, parse_tokens
from elo.tools.cli import parse_config
from elo.hf.checkpoint import CheckpointReader, load_config, memory_name
from elo.data.text import build_dataset
from elo.pretrain import config_from_args, train
from tests.conftest import SAMPLE, killer, perturb_

REPO = Path(__file__).resolve().parents[1]
SEQ, BATCH, EVAL_BATCHES, VAL_TOKENS = 32, 2, 2, 193


def _tiny_with_tokenizer(arch: str, directory: Path, tok_dir: Path) -> Path:
    import transformers

    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                  eos_token_id=2)
    config = (transformers.LlamaConfig(**common, tie_word_embeddings=False) if arch == "llama" else
              transformers.Qwen2Config(**common, tie_word_embeddings=True))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    perturb_(model)
    model.save_pretrained(directory, max_shard_size="2MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tok_dir / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def env(tmp_path_factory, default_model_dir):
    root = tmp_path_factory.mktemp("align")
    data = {}
    for lang, file in (("ko", "ko_wikipedia.jsonl"), ("en", "en_wikipedia.jsonl")):
        with open(SAMPLE / "pretrain" / file, encoding="utf-8") as f:
            lines = [json.dumps({"text": json.loads(next(f))["text"][:1500]}) for _ in range(12)]
        data[lang] = root / f"{lang}.jsonl"
        data[lang].write_text("\n".join(lines) + "\n", encoding="utf-8")
    models = {arch: _tiny_with_tokenizer(arch, root / arch, default_model_dir) for arch in ("llama", "qwen2")}
    return root, data, models


def common(env, out, *extra) -> list[str]:
    root, data, _ = env
    return ["--data", f"ko={data['ko']}", "--data", f"en={data['en']}", "--seq-len", str(SEQ), "--batch-size",
            str(BATCH), "--lr", "1e-3", "--warmup-steps", "1", "--val-tokens", str(VAL_TOKENS), "--eval-batches",
            str(EVAL_BATCHES), "--cache-dir", str(root / "cache"), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def elo_runs(env):
    """One ELO run (layers 1,4, 4 steps) per architecture."""
    root, _, models = env
    runs = {}
    for arch, model in models.items():
        runs[arch] = root / f"elo-{arch}"
        train(config_from_args(common(env, runs[arch], "--model", str(model), "--layers", "1,4", "--max-steps", "4")))
    return runs


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def reference_val_loss(env, arch: str, sub_dir: Path) -> dict[str, float]:
    """transformers on a splice built here: the base's state dict with the submodel's tensors put in."""
    import transformers

    root, data, models = env
    hf = transformers.AutoModelForCausalLM.from_pretrained(models[arch], torch_dtype=torch.float32).eval()
    state = hf.state_dict()
    sub_config, sub = load_config(sub_dir), CheckpointReader(sub_dir)
    for name in sub.keys():
        state[memory_name(name, sub_config)].copy_(sub.get(name))
    tokenizer = elo.load_tokenizer(models[arch])
    source, _ = build_dataset({k: [v] for k, v in data.items()}, tokenizer, SEQ, None, 0,
                              cache_dir=root / "cache", val_tokens=VAL_TOKENS)
    out = {}
    with torch.no_grad():
        for lang in source.langs:
            total = count = 0.0
            for i, b in enumerate(source.val_batches(lang, BATCH)):
                if i == EVAL_BATCHES:
                    break
                logits = hf(b.inputs).logits
                total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), b.targets.flatten(),
                                                           reduction="sum").item()
                count += b.targets.numel()
            out[f"val_loss/{lang}"] = total / count
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_step0_equals_reference_splice_and_everything_trains(env, elo_runs, tmp_path, arch):
    out = tmp_path / "align"
    align(parse_config(AlignConfig, common(env, out, "--elo", str(elo_runs[arch]), "--max-steps", "2"), ""))
    step0 = records(out)[0]
    assert step0["step"] == 0
    reference = reference_val_loss(env, arch, elo_runs[arch] / "model")
    for key, value in reference.items():
        assert abs(step0[key] - value) <= 1e-5, (key, step0[key], value)
    assert set(step0) >= {"base_val_loss/ko", "base_val_loss/en"}  # base -> spliced -> aligned in one log
    # full alignment: every tensor moved from the spliced starting point; transformers loads the output
    base, sub, aligned = (CheckpointReader(p) for p in (env[2][arch], elo_runs[arch] / "model", out / "model"))
    sub_config = load_config(elo_runs[arch] / "model")
    start = {n: base.get(n) for n in base.keys()} | {memory_name(n, sub_config): sub.get(n) for n in sub.keys()}
    assert aligned.keys() == base.keys()
    assert all(not torch.equal(aligned.get(n), start[n]) for n in aligned.keys())
    provenance = json.loads((out / "model" / "elo_run.json").read_text())
    assert provenance["elo_layers"] == [1, 4] and provenance["steps"] == 2 and provenance["continued_elo_stream"]


def test_train_layers_trains_exactly_those(env, elo_runs, tmp_path):
    out = tmp_path / "partial"
    align(parse_config(AlignConfig, common(env, out, "--elo", str(elo_runs["llama"]), "--max-steps", "2",
                                           "--train-layers", "2,3"), ""))
    sub_config = load_config(elo_runs["llama"] / "model")
    base, sub, aligned = (CheckpointReader(p) for p in (env[2]["llama"], elo_runs["llama"] / "model", out / "model"))
    start = {n: base.get(n) for n in base.keys()} | {memory_name(n, sub_config): sub.get(n) for n in sub.keys()}
    changed = {n for n in aligned.keys() if not torch.equal(aligned.get(n), start[n])}
    assert changed == {n for n in base.keys() if n.startswith(("model.layers.1.", "model.layers.2."))}


def test_control_trains_the_base_on_the_same_tokens(env, elo_runs, tmp_path):
    """--control: the base itself (step-0 loss = the base's), the same batches as alignment (same step-1 data
    position), and no ELO tensor in the output's starting point."""
    spliced, control = tmp_path / "spliced", tmp_path / "control"
    for out, extra in ((spliced, []), (control, ["--control"])):
        align(parse_config(AlignConfig, common(env, out, "--elo", str(elo_runs["llama"]), "--max-steps", "2",
                                               *extra), ""))
    step0 = records(control)[0]
    for lang in ("ko", "en"):
        assert step0[f"val_loss/{lang}"] == step0[f"base_val_loss/{lang}"]
        assert records(spliced)[0][f"val_loss/{lang}"] != step0[f"val_loss/{lang}"]
    a, b = (json.loads((out / "model" / "elo_run.json").read_text()) for out in (spliced, control))
    assert a["data_state"] == b["data_state"] and b["control"] and not a["control"]
    with pytest.raises(ValueError, match="no spliced model"):
        align(parse_config(AlignConfig, common(env, tmp_path / "bad", "--elo", str(elo_runs["llama"]),
                                               "--max-steps", "2", "--control", "--save-spliced"), ""))


def test_alignment_never_sees_an_elo_sequence_again(env, elo_runs, tmp_path):
    """The ELO run's data stream continues: the windows align draws are disjoint from those ELO drew."""
    root, data, models = env
    tokenizer = elo.load_tokenizer(models["llama"])

    def drawn(skip: int, n: int) -> set[tuple[int, ...]]:
        source, _ = build_dataset({k: [str(v.resolve())] for k, v in data.items()}, tokenizer, SEQ, None, 0,
                                  cache_dir=root / "cache", val_tokens=VAL_TOKENS)
        if skip:
            source.load_state_dict(json.loads((elo_runs["llama"] / "model" / "elo_run.json").read_text())["data_state"])
        return {tuple(row.tolist()) for _ in range(n) for row in source.next_batch(BATCH).inputs}

    elo_windows = drawn(0, 4)  # the ELO run: 4 steps of BATCH
    align_windows = drawn(1, 40)
    assert len(elo_windows) == 4 * BATCH and not elo_windows & align_windows


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = dict(__import__("os").environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_two_processes_match_one_and_sharded_loading_is_exact(env, elo_runs, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # lr 1e-4: Adam turns a reduction-order difference in a near-zero gradient into up to ~lr of weight change
    base_args = ["--elo", str(elo_runs["qwen2"]), "--max-steps", "3", "--lr", "1e-4"]
    r1 = run([sys.executable, "align.py", *common(env, one, *base_args, "--batch-size", "4")])
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "align.py",
              *common(env, two, *base_args, "--batch-size", "2")])
    assert r2.returncode == 0, r2.stderr[-3000:]
    l1 = {r["step"]: r.get("loss") for r in records(one)}
    l2 = {r["step"]: r.get("loss") for r in records(two)}
    assert l1.keys() == l2.keys() == {0, 1, 2, 3}
    assert all(abs(l1[s] - l2[s]) <= 1e-5 for s in (1, 2, 3))
    a, b = CheckpointReader(one / "model"), CheckpointReader(two / "model")
    assert a.keys() == b.keys()
    worst = max((a.get(n) - b.get(n)).abs().max().item() for n in a.keys())
    assert worst <= 1e-6, worst
    check = tmp_path / "check.py"
    check.write_text(
        "import torch, elo\nfrom elo.train import distributed\nfrom elo.train.build import full_spec, materialize\n"
        f"d = distributed.init()\nm = materialize(full_spec({str(env[2]['llama'])!r}), d)\n"
        f"full = elo.load_model({str(env[2]['llama'])!r})\nref = dict(full.named_parameters())\n"
        "for n, p in m.named_parameters():\n"
        "    local = p.to_local()\n    assert local.numel() < ref[n].numel() or ref[n].shape[0] < 2, n\n"
        "    assert torch.equal(p.full_tensor(), ref[n]), n\n"
        # one write per rank: print('exact', rank) writes its pieces separately, and two ranks interleave them
        "import sys\nsys.stdout.write(f'exact {d.rank}\\n')\nsys.stdout.flush()\ndistributed.close(d)\n")
    r = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(check)])
    assert r.returncode == 0 and "exact 0" in r.stdout and "exact 1" in r.stdout, r.stderr[-3000:]


KILLER = killer("align")


def test_resume_after_sigkill_matches_uninterrupted(env, elo_runs, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    extra = ["--elo", str(elo_runs["llama"]), "--max-steps", "4", "--save-every", "2"]
    assert run([sys.executable, "align.py", *common(env, full, *extra)]).returncode == 0
    died = run([sys.executable, "-c", KILLER, *common(env, killed, *extra)])
    assert died.returncode == -9, died.stderr[-2000:]
    resumed = run([sys.executable, "align.py", *common(env, killed, *extra, "--resume")])
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-2000:]
    a, b = records(full), records(killed)
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4]  # every step exactly once
    assert all(abs(x.get("loss", 0) - y.get("loss", 0)) <= 1e-5 for x, y in zip(a, b))
    ra, rb = CheckpointReader(full / "model"), CheckpointReader(killed / "model")
    assert all(torch.allclose(ra.get(n), rb.get(n), atol=1e-5, rtol=0) for n in ra.keys())


@pytest.mark.parametrize("make_args, message", [
    (lambda e, r: ["--elo", str(e[0])], "holds no ELO submodel"),
    (lambda e, r: ["--elo", str(r["llama"]), "--base", str(e[2]["qwen2"])], "fingerprint|different model|model"),
    (lambda e, r: ["--elo", str(r["llama"]), "--tokens", "0"], "--tokens 0: expected a positive budget"),
    (lambda e, r: ["--elo", str(r["llama"]), "--tokens", "lots"], "--tokens 'lots'"),
    (lambda e, r: ["--elo", str(r["llama"] / "model"), "--tokens", "10%"], "a percentage needs --elo to be a"),
    (lambda e, r: ["--elo", str(r["llama"]), "--max-steps", "1", "--train-layers", "1,9"], "layer 9 is out of range"),
])
def test_bad_input_is_one_line_before_any_model_loads(env, elo_runs, tmp_path, monkeypatch, capsys, make_args,
                                                    message):
    import re

    import elo.align as align_module
    import elo.train.build
    from elo.tools.cli import run_main

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(elo.train.build, "materialize", refuse)
    monkeypatch.setattr(align_module, "materialize", refuse)
    out = tmp_path / "bad"
    with pytest.raises(SystemExit) as exit_info:
        run_main(align_module.main, common(env, out, *make_args(env, elo_runs)))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not out.exists()


def test_parse_tokens():
    assert parse_tokens("300M", None) == 300_000_000 and parse_tokens("2.5e6", None) == 2_500_000
    assert parse_tokens("11%", 1000) == 110 and parse_tokens("40000", None) == 40000


def test_warmup_follows_the_budget_and_the_world_size_is_an_argument(tmp_path, tiny_llama):
    """Alignment's default warmup is a tenth of its steps (at least 1): a short budget still reaches --lr. The step
    count comes from the budget and the number of processes the caller names (no environment is read)."""
    from elo.align import AlignConfig, plan

    sub = tmp_path / "sub"
    elo.detach_checkpoint(tiny_llama[0], "1,4", sub)
    data = {"ko": [str(SAMPLE / "pretrain" / "ko_wikipedia.jsonl")]}
    for world, steps, warmup in ((1, 32, 3), (4, 8, 1)):
        cfg = AlignConfig(elo=str(sub), base=str(tiny_llama[0]), out=str(tmp_path / "out"), data=data, tokens="4096",
                          seq_len=32, batch_size=4)
        plan(cfg, world_size=world)
        assert (cfg.max_steps, cfg.warmup_steps) == (steps, warmup)
    cfg = AlignConfig(elo=str(sub), base=str(tiny_llama[0]), out=str(tmp_path / "out"), data=data, max_steps=5,
                      warmup_steps=3)
    plan(cfg, world_size=1)
    assert (cfg.max_steps, cfg.warmup_steps) == (5, 3)  # given values stay
