"""elo.gradient_fidelity against the same quantities computed with transformers: the full model's and the detached
submodel's (loaded by transformers from elo.detach_checkpoint's output) gradients for each chosen layer."""
import pytest
import torch

import elo
from elo.extensions.fidelity import gradient_fidelity


def _hf_layer_grads(model, ids: torch.Tensor) -> tuple[dict[int, torch.Tensor], float]:
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)  # mean next-token loss, as gradient_fidelity's over one batch
    out.loss.backward()
    grads = {i: torch.cat([p.grad.double().flatten() for _, p in sorted(layer.named_parameters())])
             for i, layer in enumerate(model.model.layers)}
    return grads, out.loss.item()


def test_equals_a_transformers_reference(tiny_llama, tmp_path):
    import transformers

    directory, _ = tiny_llama
    sub_dir = tmp_path / "sub"
    elo.detach_checkpoint(directory, "1,4", sub_dir)
    full_hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64)
    sub_hf = transformers.AutoModelForCausalLM.from_pretrained(sub_dir, dtype=torch.float64)
    ids = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))
    full_g, full_loss = _hf_layer_grads(full_hf, ids)
    sub_g, sub_loss = _hf_layer_grads(sub_hf, ids)

    base = elo.load_model(directory, dtype=torch.float64)
    report = gradient_fidelity(base, "1,4", [ids])
    # tolerance 1e-6: elo's fused head + loss takes its log-softmax in fp32 even for an fp64 model
    assert report["loss_full"] == pytest.approx(full_loss, rel=1e-6)
    assert report["loss_submodel"] == pytest.approx(sub_loss, rel=1e-6)
    for layer, hf_sub in ((1, sub_g[0]), (4, sub_g[1])):
        g_full = full_g[layer - 1]
        cosine = float(hf_sub @ g_full / (hf_sub.norm() * g_full.norm()))
        ratio = float(hf_sub.norm() / g_full.norm())
        assert report["layers"][layer]["cosine"] == pytest.approx(cosine, abs=1e-6)
        assert report["layers"][layer]["norm_ratio"] == pytest.approx(ratio, rel=1e-6)
    assert report["layers"][4]["cosine"] < 0.99  # the submodel's signal for the top layer differs


def test_all_layers_is_the_full_model(tiny_llama):
    base = elo.load_model(tiny_llama[0], dtype=torch.float64)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    report = gradient_fidelity(base, "1,2,3,4", [ids, ids.flip(0)])
    assert report["loss_submodel"] == pytest.approx(report["loss_full"], rel=1e-12)
    for layer in (1, 2, 3, 4):
        assert report["layers"][layer]["cosine"] == pytest.approx(1, abs=1e-12)
        assert report["layers"][layer]["norm_ratio"] == pytest.approx(1, abs=1e-12)


@pytest.mark.parametrize("layers, batches, message", [
    ("1,9", [torch.zeros(1, 4, dtype=torch.long)], "layer 9 is out of range"),
    ("1,4", [], "no batches given"),
    ("1,4", [torch.zeros(1, 4)], "expected token id batches"),
])
def test_bad_input_is_a_one_line_error(tiny_llama, layers, batches, message):
    with pytest.raises(ValueError, match=message):
        gradient_fidelity(elo.load_model(tiny_llama[0]), layers, batches)


def test_train_logs_fidelity_at_the_steps_asked_for(run_env, tmp_path):
    import json
    import sys

    from .test_train import args, run

    _, _, env = run_env
    out = tmp_path / "r"
    run([sys.executable, "train.py", *args(run_env, out, "--layers", "1,4", "--max-steps", "4", "--fidelity-every", "2")],
        env)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    measured = {r["step"]: r for r in records if "fidelity/cosine/4" in r}
    assert sorted(measured) == [0, 2, 4]
    for r in measured.values():
        assert -1 <= r["fidelity/cosine/1"] <= 1 and r["fidelity/norm_ratio/4"] > 0
        assert r["fidelity/loss_full"] > 0 and r["fidelity/loss_submodel"] > 0


def test_two_processes_measure_what_one_process_does(run_env, tmp_path):
    """--fidelity-every under FSDP2: each process holds its rows of the full model and takes its own validation batch;
    2 processes x batch 2 log the same fidelity as 1 process x batch 4 (the same windows, the same training), with
    the linear stand-in attached to the sharded submodel."""
    import json
    import sys

    from .test_train import args, run

    _, _, env = run_env
    one, two = tmp_path / "one", tmp_path / "two"
    common = ("--layers", "1,4", "--max-steps", "4", "--fidelity-every", "2", "--middle", "linear", "--middle-tokens",
              "300")
    run([sys.executable, "train.py", *args(run_env, one, "--batch-size", "4", *common)], env)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
         *args(run_env, two, "--batch-size", "2", *common)], env)

    def fidelity(out):
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: {k: v for k, v in r.items() if k.startswith("fidelity/")} for r in records
                if "fidelity/cosine/1" in r}

    a, b = fidelity(one), fidelity(two)
    assert sorted(a) == sorted(b) == [0, 2, 4]
    for step in a:
        assert a[step].keys() == b[step].keys()
        for key, value in a[step].items():
            assert b[step][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (step, key)
