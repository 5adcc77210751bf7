"""The training loop: 1 vs 2 processes (FSDP2 on gloo), frozen tensors, resume after SIGKILL, baselines, errors."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import elo
from elo.hf.checkpoint import CheckpointReader
from elo.pretrain import TrainConfig, config_from_args, train
from elo.train.loop import lr_at
from tests.conftest import SAMPLE, build_smollm2_vocab_llama, killer

REPO = Path(__file__).resolve().parents[1]


def args(run_env, out, *extra):
    root, data, _ = run_env
    return ["--model", str(root / "model"), "--data", f"ko={data['ko']}", "--data", f"en={data['en']}",
            "--seq-len", "32", "--max-steps", "6", "--lr", "1e-3", "--warmup-steps", "2", "--out", str(out),
            "--val-tokens", "256", "--eval-batches", "2", *extra]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def run(cmd, env, **kw):
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600, **kw)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.mark.parametrize("middle", [(), ("--middle", "linear", "--middle-tokens", "300"),
                                    ("--middle", "distilled:2", "--middle-tokens", "128", "--middle-steps", "2")],
                         ids=["plain", "middle", "distilled"])
def test_two_processes_match_one_and_only_chosen_layers_change(run_env, tmp_path, middle):
    root, _, env = run_env
    one, two = tmp_path / "one", tmp_path / "two"
    run([sys.executable, "train.py", *args(run_env, one, "--batch-size", "4", "--layers", "1,4", *middle)], env)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
         *args(run_env, two, "--batch-size", "2", "--layers", "1,4", *middle)], env)
    l1, l2 = losses(one), losses(two)
    assert sorted(l1) == list(range(1, 7)) and l1.keys() == l2.keys()
    assert max(abs(l1[s] - l2[s]) for s in l1) <= 1e-5
    assert l1[6] < l1[1]  # it learns
    # the saved submodel: a 2-layer HF model; only its decoder layers differ from the base
    base = CheckpointReader(root / "model")
    for out in (one, two):
        sub = CheckpointReader(out / "model")
        assert json.loads((out / "model" / "config.json").read_text())["elo"]["layers"] == [1, 4]
        for name in sub.keys():
            mem = elo.hf.checkpoint.memory_name(name, elo.hf.checkpoint.load_config(out / "model"))
            same = torch.equal(sub.get(name), base.get(mem))
            assert same == (not name.startswith("model.layers.")), name
    a, b = CheckpointReader(one / "model"), CheckpointReader(two / "model")
    assert all(torch.allclose(a.get(n), b.get(n), atol=1e-5) for n in a.keys())


KILLER = killer("pretrain")


def test_resume_after_sigkill_matches_uninterrupted(run_env, tmp_path):
    _, _, env = run_env
    full, killed = tmp_path / "full", tmp_path / "killed"
    run([sys.executable, "train.py", *args(run_env, full, "--batch-size", "2")], env)
    cmd = args(run_env, killed, "--batch-size", "2", "--save-every", "3")
    died = subprocess.run([sys.executable, "-c", KILLER, *cmd], env=env, cwd=REPO, capture_output=True, timeout=600)
    assert died.returncode == -9
    assert [p.name for p in (killed / "checkpoints").iterdir()] == ["step_00000003"]
    assert not (killed / "model").exists()
    with pytest.raises(subprocess.CalledProcessError):  # same --out without --resume is refused
        subprocess.run([sys.executable, "train.py", *cmd], env=env, cwd=REPO, capture_output=True, check=True)
    resumed = run([sys.executable, "train.py", *cmd, "--resume"], env)
    assert "resumed from" in resumed.stdout
    lf, lk = losses(full), losses(killed)
    assert sorted(lk) == list(range(1, 7))  # every step logged exactly once
    assert abs(lf[6] - lk[6]) <= 1e-5
    assert all(abs(lf[s] - lk[s]) <= 1e-5 for s in lf)


def test_crash_during_checkpoint_write_is_not_resumed(run_env, tmp_path):
    """A checkpoint being written lives in a hidden directory; --resume ignores it and starts from the last whole one."""
    _, _, env = run_env
    out = tmp_path / "crash"
    script = KILLER.replace("path = original(*args, **kwargs)",
                            "import torch.distributed.checkpoint as dcp\n"
                            "    if args[1] == 4:\n"
                            "        dcp.save = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
                            "    path = original(*args, **kwargs)\n    if args[1] == 4: return path")
    script = script.replace("    os.kill(os.getpid(), signal.SIGKILL)\nr.RunDir.save", "    return path\nr.RunDir.save")
    cmd = args(run_env, out, "--batch-size", "2", "--save-every", "2")
    died = subprocess.run([sys.executable, "-c", script, *cmd], env=env, cwd=REPO, capture_output=True, timeout=600)
    assert died.returncode == -9
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [".tmp-step_00000004", "step_00000002"]
    resumed = run([sys.executable, "train.py", *cmd, "--resume"], env)
    assert "step_00000002 at step 2" in resumed.stdout


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_baselines_train_and_save_full_models(run_env, tmp_path, monkeypatch, mode):
    root, _, env = run_env
    out = tmp_path / mode
    extra = ["--layers", "all"] if mode == "full" else ["--lora-rank", "4"]
    cfg = config_from_args(args(run_env, out, "--batch-size", "2", "--max-steps", "3", *extra))
    monkeypatch.setenv("ELO_CACHE", env["ELO_CACHE"])
    train(cfg)
    base, trained = CheckpointReader(root / "model"), CheckpointReader(out / "model")
    assert trained.keys() == base.keys()  # LoRA merged away: a plain HF model
    changed = {n for n in base.keys() if not torch.equal(base.get(n), trained.get(n))}
    if mode == "full":
        assert changed == set(base.keys())
    else:  # LoRA touches exactly the decoder linears
        assert changed == {n for n in base.keys() if n.startswith("model.layers.") and n.endswith("proj.weight")}


def test_lr_schedule():
    cfg = TrainConfig(out="x", lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55) and lr_at(110, cfg) == pytest.approx(0.1)


def test_bad_arguments(run_env, tmp_path, monkeypatch):
    monkeypatch.setenv("ELO_CACHE", run_env[2]["ELO_CACHE"])
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        train(config_from_args(args(run_env, tmp_path / "a", "--layers", "1,9")))
    with pytest.raises(ValueError, match="'ja'"):
        train(config_from_args(args(run_env, tmp_path / "b", "--mix", "en:1,ja:9")))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty and holds no elo run"):
        train(config_from_args(args(run_env, tmp_path / "c")))
    train(config_from_args(args(run_env, tmp_path / "d", "--max-steps", "1")))
    with pytest.raises(ValueError, match="different arguments.*lr=0.01"):
        train(config_from_args(args(run_env, tmp_path / "d", "--max-steps", "1", "--lr", "1e-2", "--resume")))
    with pytest.raises(ValueError, match="--seq-len 0: expected a positive integer"):
        train(config_from_args(args(run_env, tmp_path / "e", "--seq-len", "0")))


@pytest.mark.slow
def test_thirty_elo_steps_lower_heldout_korean_loss_on_default_model(tmp_path, default_model_dir):
    """The real thing, small: SmolLM2-135M, layers 1 and 30, Korean + English at 9:1 from the bundled sample, 30
    steps."""
    data = {lang: SAMPLE / "pretrain" / f"{lang}_wikipedia.jsonl" for lang in ("ko", "en")}
    out = tmp_path / "elo"
    cfg = config_from_args(["--layers", "1,30", "--data", f"ko={data['ko']}", "--data", f"en={data['en']}",
                            "--seq-len", "128", "--batch-size", "4", "--max-steps", "30", "--lr", "2e-4",
                            "--warmup-steps", "3", "--eval-every", "30", "--eval-batches", "4",
                            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    train(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    before, after = records[0], records[-1]
    assert before["step"] == 0 and after["step"] == 30
    assert after["val_loss/ko"] < before["val_loss/ko"] - 0.05, (before, after)
    # the submodel splices back into the base checkpoint as a loadable 30-layer model
    spliced = elo.splice_checkpoint(elo.DEFAULT_MODEL, out / "model", tmp_path / "spliced")
    assert elo.load_model(spliced).config.num_hidden_layers == 30


@pytest.mark.parametrize("flag, steps, tol", [
    ("--activation-checkpointing", 3, 1e-6),
    pytest.param("--compile", 2, 1e-5, marks=pytest.mark.slow),  # compiled kernels fuse ops and round differently
])
def test_layer_wrappers_give_the_same_losses(run_env, tmp_path, monkeypatch, flag, steps, tol):
    monkeypatch.setenv("ELO_CACHE", run_env[2]["ELO_CACHE"])
    train(config_from_args(args(run_env, tmp_path / "plain", "--max-steps", str(steps))))
    train(config_from_args(args(run_env, tmp_path / "wrapped", "--max-steps", str(steps), flag)))
    plain, wrapped = losses(tmp_path / "plain"), losses(tmp_path / "wrapped")
    assert plain.keys() == wrapped.keys() and all(abs(plain[s] - wrapped[s]) <= tol for s in plain)


# ---- hardening: interruptions, damaged state, bad values (issue 9) ----

DIE_AT = """
import os, signal, sys
import elo.pretrain, elo.train.run_dir as r
import torch.distributed.checkpoint as dcp
point, at = sys.argv[1], int(sys.argv[2])
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if point == "log":  # during training: right after step `at` is logged
    log = r.RunDir.log
    def log_then_die(self, record):
        log(self, record)
        if record["step"] == at and "loss" in record:
            die()
    r.RunDir.log = log_then_die
else:  # inside the checkpoint write of step `at`
    save, dcp_save = r.RunDir.save, dcp.save
    def save_and_die(self, step, *a, **k):
        if step == at:
            dcp.save = lambda *x, **y: die()
        return save(self, step, *a, **k)
    r.RunDir.save = save_and_die
elo.pretrain.main(sys.argv[3:])
"""


@pytest.fixture(scope="module")
def uninterrupted(run_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    run([sys.executable, "train.py", *args(run_env, out, "--batch-size", "2", "--save-every", "2")], run_env[2])
    return out


@pytest.mark.parametrize("point, at", [("log", 1), ("log", 3), ("checkpoint", 2), ("checkpoint", 4)])
def test_sigkill_anywhere_then_resume_logs_each_step_once_and_matches(run_env, uninterrupted, tmp_path, point, at):
    _, _, env = run_env
    out = tmp_path / "run"
    cmd = args(run_env, out, "--batch-size", "2", "--save-every", "2")
    died = subprocess.run([sys.executable, "-c", DIE_AT, point, str(at), *cmd], env=env, cwd=REPO,
                          capture_output=True, timeout=600)
    assert died.returncode == -9, died.stderr[-2000:]
    run([sys.executable, "train.py", *cmd, "--resume"], env)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 5, 6], steps
    a, b = losses(uninterrupted), losses(out)
    assert all(abs(a[s] - b[s]) <= 1e-5 for s in a)
    ra, rb = CheckpointReader(uninterrupted / "model"), CheckpointReader(out / "model")
    assert all(torch.allclose(ra.get(n), rb.get(n), atol=1e-5, rtol=0) for n in ra.keys())


def test_sigterm_checkpoints_and_exits_then_resumes(run_env, tmp_path):
    import signal
    import time

    _, _, env = run_env
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", *args(run_env, out, "--batch-size", "2", "--max-steps", "400")]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file()
                                          and len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in err.strip().splitlines()[-1]
    (ckpt,) = (out / "checkpoints").iterdir()
    stopped = int(ckpt.name.split("_")[1])
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == stopped and stopped < 400


def test_resume_falls_back_past_a_damaged_checkpoint_and_prunes(run_env, uninterrupted, tmp_path):
    _, _, env = run_env
    out = tmp_path / "run"
    cmd = args(run_env, out, "--batch-size", "2", "--save-every", "1", "--keep-checkpoints", "2")
    died = subprocess.run([sys.executable, "-c", DIE_AT, "log", "5", *cmd], env=env, cwd=REPO,
                          capture_output=True, timeout=600)
    assert died.returncode == -9
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000003", "step_00000004"]  # pruned
    for f in (out / "checkpoints" / "step_00000004").glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:100])  # damaged
    resumed = run([sys.executable, "train.py", *cmd, "--resume"], env)
    assert "damaged" in resumed.stderr and "step_00000003 at step 3" in resumed.stdout
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 5, 6]
    a, b = losses(uninterrupted), losses(out)
    assert all(abs(a[s] - b[s]) <= 1e-5 for s in a)


def test_resume_of_a_finished_run_does_nothing(run_env, uninterrupted):
    _, _, env = run_env
    before = (uninterrupted / "metrics.jsonl").read_text()
    result = run([sys.executable, "train.py", *args(run_env, uninterrupted, "--batch-size", "2", "--save-every", "2"),
                  "--resume"], env)
    assert "nothing to do" in result.stdout and (uninterrupted / "metrics.jsonl").read_text() == before


def test_nan_weight_stops_the_run_naming_the_step(run_env, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file, save_file

    from elo.tools.cli import run_main
    from elo.pretrain import main

    root, _, env = run_env
    broken = tmp_path / "broken"
    shutil.copytree(root / "model", broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setenv("ELO_CACHE", env["ELO_CACHE"])
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, args(run_env, out, "--model", str(broken)))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "step 1: loss nan" in err and len(err.strip().splitlines()) == 1
    assert not (out / "model").exists()
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))


def test_grad_clip_zero_means_no_clipping(run_env, tmp_path, monkeypatch):
    root, _, env = run_env
    monkeypatch.setenv("ELO_CACHE", env["ELO_CACHE"])
    out = tmp_path / "run"
    train(config_from_args(args(run_env, out, "--grad-clip", "0", "--max-steps", "2", "--layers", "1,4")))
    base, sub = CheckpointReader(root / "model"), CheckpointReader(out / "model")
    assert not torch.equal(sub.get("model.layers.0.mlp.up_proj.weight"), base.get("model.layers.0.mlp.up_proj.weight"))
    assert all(r["grad_norm"] > 0 for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
               if "grad_norm" in r)


@pytest.mark.parametrize("option, value", [
    ("--seq-len", "0"), ("--seq-len", "100000"), ("--batch-size", "0"), ("--grad-accum", "-1"),
    ("--max-steps", "0"), ("--lr", "-1"), ("--lr", "nan"), ("--min-lr-ratio", "5"), ("--warmup-steps", "-3"),
    ("--weight-decay", "-0.1"), ("--grad-clip", "-1"), ("--save-every", "-1"), ("--keep-checkpoints", "-1"),
    ("--eval-every", "-2"), ("--eval-batches", "0"), ("--val-tokens", "0"), ("--seed", "-1"),
    ("--lora-rank", "-4"), ("--lora-alpha", "0"), ("--layers", "1,99"), ("--layers", "x"), ("--mix", "en:1,ja:9"),
    ("--mix", "en:-1,ko:9"), ("--data", "ko"), ("--data", "ko=/nonexistent.jsonl"), ("--model", "/nonexistent"),
    ("--max-steps", "three"),
])
def test_bad_option_values_are_one_line_errors_leaving_nothing(run_env, tmp_path, monkeypatch, capsys, option, value):
    from elo.tools.cli import run_main
    from elo.pretrain import main

    monkeypatch.setenv("ELO_CACHE", run_env[2]["ELO_CACHE"])
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, args(run_env, out, option, value))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error:"), err
    named = option.lstrip("-").split("-")[0]
    assert option in err or named in err or value in err, err
    assert "Traceback" not in err and not out.exists()


# ---- --middle linear and --layers auto:K ----

def test_middle_surrogate_trains_resumes_bit_exact_and_ships_with_the_submodel(run_env, tmp_path):
    import transformers

    from elo.hf.checkpoint import MIDDLE_NAME, load_middle

    _, _, env = run_env
    full, killed = tmp_path / "full", tmp_path / "killed"
    extra = ("--batch-size", "2", "--save-every", "2", "--layers", "1,4", "--middle", "linear", "--middle-tokens", "300")
    result = run([sys.executable, "train.py", *args(run_env, full, *extra)], env)
    assert "middle surrogate (linear) attached" in result.stdout
    died = subprocess.run([sys.executable, "-c", DIE_AT, "log", "3", *args(run_env, killed, *extra)], env=env,
                          cwd=REPO, capture_output=True, timeout=600)
    assert died.returncode == -9
    run([sys.executable, "train.py", *args(run_env, killed, *extra), "--resume"], env)
    a, b = losses(full), losses(killed)
    assert all(abs(a[s] - b[s]) <= 1e-5 for s in a)
    fitted, shipped = load_middle(full / "checkpoints"), load_middle(full / "model")
    assert all(torch.equal(x, y) for x, y in zip(fitted.state_dict().values(), shipped.state_dict().values()))
    assert (full / "model" / MIDDLE_NAME).is_file()
    transformers.AutoModelForCausalLM.from_pretrained(full / "model")  # the surrogate file is ignored there
    sub = elo.load_model(full / "model")  # ... and used by elo
    assert sub.middle is not None


def test_middle_bad_input(run_env, tmp_path, monkeypatch, capsys):
    from elo.tools.cli import run_main
    from elo.pretrain import main

    monkeypatch.setenv("ELO_CACHE", run_env[2]["ELO_CACHE"])
    for extra, message in [(("--middle", "cubic", "--layers", "1,4"), "--middle 'cubic'"),
                           (("--middle", "linear", "--layers", "1,2"), "no gap"),
                           (("--middle", "linear", "--layers", "1,4", "--middle-tokens", "10"), "--middle-tokens 10"),
                           (("--middle", "linear", "--layers", "all"), "needs ELO mode")]:
        with pytest.raises(SystemExit):
            run_main(main, args(run_env, tmp_path / "bad", *extra))
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "bad").exists()


def test_layers_auto_trains_the_layers_it_logs(run_env, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ELO_CACHE", run_env[2]["ELO_CACHE"])
    out = tmp_path / "auto"
    train(config_from_args(args(run_env, out, "--layers", "auto:2", "--max-steps", "2")))
    printed = capsys.readouterr().out
    chosen = [int(x) for x in printed.split("chosen layers: ")[1].split()[0].split(",")]
    assert len(chosen) == 2
    assert json.loads((out / "model" / "config.json").read_text())["elo"]["layers"] == chosen
    run_record = json.loads((out / "model" / "elo_run.json").read_text())
    assert run_record["layer_scores"]["suggested"] == chosen


def test_in_situ_step_equals_a_full_step_on_those_layers_and_exports_the_submodel(run_env, tmp_path):
    """--in-situ (ELO's oracle): with clipping off, AdamW updates each parameter from its own gradient, so one in-situ
    step gives the chosen layers exactly what one full fine-tuning step gives them; the run writes the submodel."""
    from elo.align import find_submodel
    from elo.hf.checkpoint import CheckpointReader, load_config

    root, _, env = run_env
    in_situ, full = tmp_path / "in-situ", tmp_path / "full"
    common = ("--max-steps", "1", "--warmup-steps", "1", "--grad-clip", "0")
    run([sys.executable, "train.py", *args(run_env, in_situ, "--layers", "1,4", "--in-situ", *common)], env)
    run([sys.executable, "train.py", *args(run_env, full, "--layers", "all", *common)], env)
    config = load_config(in_situ / "model")
    assert config.elo["layers"] == [1, 4] and config.num_hidden_layers == 2
    sub, ft, base = (CheckpointReader(d) for d in (in_situ / "model", full / "model", root / "model"))
    for layer, disk in ((0, 0), (3, 1)):
        for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            trained = sub.get(f"model.layers.{disk}.{name}")
            torch.testing.assert_close(trained, ft.get(f"model.layers.{layer}.{name}"), rtol=1e-5, atol=1e-6)
            assert not torch.equal(trained, base.get(f"model.layers.{layer}.{name}"))
    torch.testing.assert_close(sub.get("model.embed_tokens.weight"), base.get("model.embed_tokens.weight"), rtol=0,
                               atol=0)  # not trained: exactly the base's
    assert find_submodel(str(in_situ)).run["mode"] == "in-situ"  # align.py takes it as an ELO run


def test_peak_flops_sets_what_mfu_is_measured_against(run_env, tmp_path):
    """MFU = FLOPs per token x tokens/s / peak: with --peak-flops the same run implies the same FLOPs per token
    whatever peak is given, so MFU scales exactly as 1 / peak."""
    _, _, env = run_env
    per_token = {}
    for peak in ("1e15", "4e15"):
        out = tmp_path / peak
        result = run([sys.executable, "train.py", *args(run_env, out, "--max-steps", "2", "--peak-flops", peak)], env)
        assert f"MFU against --peak-flops {float(peak):.3g} FLOP/s per process" in result.stdout
        steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "mfu" in r]
        per_token[peak] = [r["mfu"] * float(peak) / r["tokens_per_s"] for r in steps]
    assert per_token["1e15"] == pytest.approx(per_token["4e15"], rel=1e-9)
    assert len(set(round(x, 3) for x in per_token["1e15"])) == 1


@pytest.fixture(scope="module")
def six_layers(run_env, tmp_path_factory) -> Path:
    """A 6-layer tiny Llama with an untied head and run_env's tokenizer: room for ends of two layers around a gap."""
    root, _, _ = run_env
    return build_smollm2_vocab_llama(tmp_path_factory.mktemp("six-layers") / "model", root / "model", layers=6,
                                     tied=False, seed=1)


def on_model(run_env, model: Path, out: Path, *extra) -> list[str]:
    """args() with another base model."""
    a = args(run_env, out, *extra)
    a[a.index("--model") + 1] = str(model)
    return a


def changed_in_submodel(out: Path, base: Path) -> set[str]:
    """The saved submodel's tensor names (in the base's numbering) that differ from the base's."""
    sub, reader = CheckpointReader(out / "model"), CheckpointReader(base)
    config = elo.hf.checkpoint.load_config(out / "model")
    names = {elo.hf.checkpoint.memory_name(n, config): n for n in sub.keys()}
    return {mem for mem, disk in names.items() if not torch.equal(sub.get(disk), reader.get(mem))}


@pytest.mark.parametrize("middle", [(), ("--middle", "linear", "--middle-tokens", "300"),
                                    ("--middle", "distilled:1", "--middle-tokens", "128", "--middle-steps", "2")],
                         ids=["plain", "linear", "distilled"])
def test_multi_layer_ends_train_and_splice_back(run_env, six_layers, tmp_path, middle):
    """--layers 1,2,5,6 (the paper's 1,32 widened to two layers per end, as 1,2,29,30 on SmolLM2): a 4-layer
    submodel, with or without a stand-in for the gap 3-4; only those layers train, and splicing puts each back where
    it came from while layers 3-4, embedding, norm and head stay the base's."""
    _, _, env = run_env
    out = tmp_path / "ends"
    run([sys.executable, "train.py", *on_model(run_env, six_layers, out, "--layers", "1,2,5,6", "--max-steps", "3",
                                               *middle)], env)
    config = elo.hf.checkpoint.load_config(out / "model")
    assert config.num_hidden_layers == 4 and config.elo["layers"] == [1, 2, 5, 6]
    trained = {f"model.layers.{i}." for i in (0, 1, 4, 5)}
    changed = changed_in_submodel(out, six_layers)
    assert {n[:len("model.layers.0.")] for n in changed} == trained  # every chosen layer moved, nothing else
    assert (out / "model" / "middle.safetensors").is_file() == bool(middle)

    spliced = CheckpointReader(elo.splice_checkpoint(six_layers, out / "model", tmp_path / "spliced"))
    sub, base = CheckpointReader(out / "model"), CheckpointReader(six_layers)
    for disk, layer in enumerate((0, 1, 4, 5)):
        assert torch.equal(spliced.get(f"model.layers.{layer}.mlp.up_proj.weight"),
                           sub.get(f"model.layers.{disk}.mlp.up_proj.weight"))
    for name in base.keys():
        if not name.startswith(tuple(trained)):
            assert torch.equal(spliced.get(name), base.get(name)), name


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_train_embeddings_trains_embedding_norm_and_head_and_splices_them(run_env, six_layers, tmp_path, tied):
    """--train-embeddings: the embedding, final norm and head train beside the layers; a tied head stays tied (one
    tensor on disk, the same in the spliced model transformers loads)."""
    import transformers

    root, _, env = run_env
    base = root / "model" if tied else six_layers
    out = tmp_path / "emb"
    run([sys.executable, "train.py", *on_model(run_env, base, out, "--layers", "1,-1", "--train-embeddings",
                                               "--max-steps", "2")], env)
    last = elo.hf.checkpoint.load_config(base).num_hidden_layers - 1
    expected = {"model.embed_tokens.weight", "model.norm.weight", *([] if tied else ["lm_head.weight"])}
    changed = changed_in_submodel(out, base)
    assert expected <= changed and {n for n in changed if n not in expected} == {
        n for n in changed if n.startswith(("model.layers.0.", f"model.layers.{last}."))}
    assert ("lm_head.weight" in CheckpointReader(out / "model").keys()) == (not tied)

    spliced_dir = elo.splice_checkpoint(base, out / "model", tmp_path / "spliced")
    hf = transformers.AutoModelForCausalLM.from_pretrained(spliced_dir)
    sub = CheckpointReader(out / "model")
    assert torch.equal(hf.model.embed_tokens.weight, sub.get("model.embed_tokens.weight"))
    assert torch.equal(hf.model.norm.weight, sub.get("model.norm.weight"))
    head = sub.get("model.embed_tokens.weight" if tied else "lm_head.weight")
    assert torch.equal(hf.lm_head.weight, head)
    assert torch.equal(hf.model.layers[1].mlp.up_proj.weight, CheckpointReader(base).get(
        "model.layers.1.mlp.up_proj.weight"))  # a middle layer: the base's


def test_in_situ_with_embeddings_equals_a_full_step_on_those_parameters(run_env, tmp_path):
    """--in-situ --train-embeddings: one oracle step gives the layers, embedding and final norm exactly what one full
    fine-tuning step gives them (clipping off: AdamW updates each parameter from its own gradient); the middle stays."""
    root, _, env = run_env
    in_situ, full = tmp_path / "in-situ", tmp_path / "full"
    common = ("--max-steps", "1", "--warmup-steps", "1", "--grad-clip", "0")
    run([sys.executable, "train.py", *args(run_env, in_situ, "--layers", "1,4", "--in-situ", "--train-embeddings",
                                           *common)], env)
    run([sys.executable, "train.py", *args(run_env, full, "--layers", "all", *common)], env)
    sub, ft, base = (CheckpointReader(d) for d in (in_situ / "model", full / "model", root / "model"))
    for name, full_name in (("model.embed_tokens.weight",) * 2, ("model.norm.weight",) * 2,
                            ("model.layers.1.self_attn.o_proj.weight", "model.layers.3.self_attn.o_proj.weight")):
        torch.testing.assert_close(sub.get(name), ft.get(full_name), rtol=1e-5, atol=1e-6)
        assert not torch.equal(sub.get(name), base.get(full_name))
    spliced = CheckpointReader(elo.splice_checkpoint(root / "model", in_situ / "model", tmp_path / "spliced"))
    assert torch.equal(spliced.get("model.layers.1.mlp.up_proj.weight"), base.get("model.layers.1.mlp.up_proj.weight"))
