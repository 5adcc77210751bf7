"""The middle-layer surrogates. Linear (elo.extensions.middle): the streamed ridge fit against an exactly linear middle
and a one-shot lstsq, its file beside a submodel's HF files, and on the default model a closer match to the full model.
Distilled (elo.extensions.distill): deterministic, closer to the full model than where it starts, bit-exact on file,
the middle itself when it keeps every skipped layer untrained, counted in the FLOPs, and train.py end to end."""
from __future__ import annotations

import itertools

import pytest
import torch

import elo
from elo.data.text import Batch
from elo.extensions.hidden import layer_states
from elo.hf.checkpoint import MIDDLE_NAME
from tests.conftest import SAMPLE


class Affine(torch.nn.Module):
    """A decoder layer replaced by x ↦ x A + c: exactly linear."""

    def __init__(self, d: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = torch.eye(d) + 0.2 * torch.randn(d, d, generator=g)
        self.c = torch.randn(d, generator=g)

    def forward(self, x, *args):
        return x @ self.a + self.c


def random_batches(vocab: int, n: int, shape=(4, 32), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, shape, generator=g) for _ in range(n)]


def six_layers(directory) -> elo.Transformer:
    config = elo.load_model(directory).config
    config = config.replace(num_hidden_layers=6, layer_ids=list(range(6)), layer_types=["full_attention"] * 6)
    torch.manual_seed(0)
    return elo.Transformer(config)


def test_fit_recovers_an_exactly_linear_middle(tiny_llama):
    """Layers 2 (gap 1 -> 3) and 4, 5 (gap 3 -> 6) are affine maps: the fit finds them exactly, R² = 1."""
    model = six_layers(tiny_llama[0])
    d = model.config.hidden_size
    maps = {i: Affine(d, i) for i in (1, 3, 4)}
    for i, m in maps.items():
        model.model.layers[str(i)] = m
    surrogate = elo.fit_middle(model, [1, 3, 6], random_batches(256, 6), tokens=600, ridge=0)
    assert list(surrogate) == ["2", "5"] and surrogate.stats["gaps"] == [[1, 3], [3, 6]]
    expected = {"2": (maps[1].a, maps[1].c), "5": (maps[3].a @ maps[4].a, maps[3].c @ maps[4].a + maps[4].c)}
    for key, (a, c) in expected.items():
        torch.testing.assert_close(surrogate[key].weight, a.T, rtol=0, atol=1e-4)
        torch.testing.assert_close(surrogate[key].bias, c, rtol=0, atol=1e-4)
    assert surrogate.stats["r2"] == pytest.approx([1.0, 1.0], abs=1e-6)
    assert surrogate.stats["held_out"] == 60


def test_hidden_states_stop_below_the_upper_layer(tiny_llama):
    """Fitting layers (1, 4) reads the output of layer 3 and never runs layer 4 or the head."""

    class Unreachable(torch.nn.Module):
        def forward(self, *args):
            raise AssertionError("ran a layer above the ones needed")

    model = elo.load_model(tiny_llama[0])
    model.model.layers["3"] = Unreachable()
    model.lm_head.forward = Unreachable().forward
    states = layer_states(model, random_batches(256, 1)[0], {"2", "0"})
    assert sorted(states) == ["0", "2"] and states["2"][1].shape == (4, 32, model.config.hidden_size)
    elo.fit_middle(model, [1, 4], random_batches(256, 2), tokens=100)


def test_streamed_fit_equals_one_shot_lstsq(tiny_llama):
    """Moments accumulated over 5 batches (elo.data.text.Batch, as a sampler gives them) solve to what torch.linalg.lstsq
    gets on all rows at once, with the ridge as extra rows sqrt(λ) I (bias unpenalised); R² on the held-out rows."""
    model = elo.load_model(tiny_llama[0])
    d, ridge, tokens, held_out = model.config.hidden_size, 0.05, 300, 50
    ids = random_batches(256, 5, (2, 40), seed=1)
    stream = (Batch(x, x, ["ko"] * len(x)) for x in itertools.cycle(ids))
    surrogate = elo.fit_middle(model, "1,3,4", stream, tokens=tokens, ridge=ridge, held_out=held_out)
    assert list(surrogate) == ["2"]  # layers 3 and 4 are adjacent: no map

    states = [layer_states(model, x, {"0", "1"}) for x in ids]
    x = torch.cat([s["0"][1].reshape(-1, d) for s in states]).double()
    y = torch.cat([s["1"][1].reshape(-1, d) for s in states]).double()
    xf, yf = x[:tokens], y[:tokens]
    lam = ridge * (xf - xf.mean(0)).pow(2).sum() / d
    design = torch.cat([torch.cat([xf, torch.ones(tokens, 1, dtype=torch.float64)], 1),
                        torch.cat([lam.sqrt() * torch.eye(d, dtype=torch.float64), torch.zeros(d, 1, dtype=torch.float64)], 1)])
    w = torch.linalg.lstsq(design, torch.cat([yf, torch.zeros(d, d, dtype=torch.float64)])).solution
    torch.testing.assert_close(surrogate["2"].weight, w[:d].T.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(surrogate["2"].bias, w[d].float(), rtol=1e-5, atol=1e-6)

    xh, yh = x[320:320 + held_out], y[320:320 + held_out]  # from the batch after the 4th, where fitting ends
    r2 = 1 - (yh - xh @ w[:d] - w[d]).pow(2).sum() / (yh - yh.mean(0)).pow(2).sum()
    assert surrogate.stats["r2"] == pytest.approx([r2.item()], abs=1e-9)
    assert 0 < r2 < 1  # layer 2 is not linear: the held-out fit is imperfect


def test_texts_and_batches_fit_alike(tiny_with_tokenizer):
    from elo.data.text import read_documents, text_windows

    model, tok = elo.load_model(tiny_with_tokenizer), elo.load_tokenizer(tiny_with_tokenizer)
    texts = [t[:400] for t in itertools.islice(read_documents(SAMPLE / "pretrain" / "ko_wikipedia.jsonl"), 3)]
    a = elo.fit_middle(model, [1, 4], texts, tokens=100, tokenizer=tok, seq_len=64)
    b = elo.fit_middle(model, [1, 4], text_windows(texts, tok, 64), tokens=100)
    assert torch.equal(a["3"].weight, b["3"].weight) and a.stats["r2"] == b.stats["r2"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(layers=[2]), "at least 2 layers"),
    (dict(layers=[2, 3]), "adjacent"),
    (dict(tokens=64), "tokens=64 is too few to fit a map on hidden size 64; expected at least 65"),
    (dict(ridge=-1.0), "ridge=-1.0"),
    (dict(held_out=0), "held_out=0"),
    (dict(layers=[1, 9]), "layer 9 is out of range"),
    (dict(data=["some text"]), "pass tokenizer="),
    (dict(data=[torch.zeros(2, 8)]), "expected token id batches"),
    (dict(tokens=1000), "the data ran out after 256 tokens; fitting needs tokens + held_out = 1100"),
])
def test_bad_input_is_a_one_line_error(tiny_llama, kwargs, message):
    args = dict(model=tiny_llama[0], layers=[1, 4], data=random_batches(256, 2), tokens=100) | kwargs
    with pytest.raises(ValueError) as e:
        elo.fit_middle(**args)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_fit_refuses_a_submodel(tiny_llama):
    with pytest.raises(ValueError, match="needs the full base model"):
        elo.fit_middle(elo.load_detached(tiny_llama[0], [1, 4]), [1, 4], random_batches(256, 2), tokens=100)


def test_attach_checks_layers_and_base(tiny_llama, tmp_path):
    from tests.conftest import build_hf_checkpoint

    surrogate = elo.fit_middle(tiny_llama[0], [1, 4], random_batches(256, 2), tokens=100)
    with pytest.raises(ValueError, match=r"fitted for layers \[1, 4\]; the submodel holds \[1, 3\]"):
        elo.attach_middle(elo.load_detached(tiny_llama[0], [1, 3]), surrogate)
    with pytest.raises(ValueError, match="no 'elo' record"):
        elo.attach_middle(elo.load_model(tiny_llama[0]), surrogate)
    build_hf_checkpoint("llama", tmp_path, seed=1)
    with pytest.raises(ValueError, match="another base model"):
        elo.attach_middle(elo.load_detached(tmp_path, [1, 4]), surrogate)


def test_surrogate_file_round_trip_and_transformers_ignores_it(tiny_llama, tmp_path):
    """save_middle / load_middle are bit-exact; a saved submodel keeps HF names and files only (transformers loads it
    and gets the plain submodel), and elo's load_model attaches the surrogate again."""
    import transformers

    directory, _ = tiny_llama
    surrogate = elo.fit_middle(directory, [1, 4], random_batches(256, 2), tokens=100)
    elo.save_middle(surrogate, tmp_path / "alone")
    loaded = elo.load_middle(tmp_path / "alone")
    assert loaded.stats == surrogate.stats and list(loaded) == list(surrogate)
    for key in surrogate:
        assert torch.equal(loaded[key].weight, surrogate[key].weight) and torch.equal(loaded[key].bias, surrogate[key].bias)

    sub = elo.load_detached(directory, [1, 4])
    plain = sub.state_dict()
    elo.attach_middle(sub, surrogate)
    assert sub.state_dict().keys() == plain.keys()  # the surrogate adds no HF weight names
    assert not any(p is surrogate["3"].weight for p in sub.parameters())
    elo.save_model(sub, tmp_path / "sub")
    assert (tmp_path / "sub" / MIDDLE_NAME).is_file()

    ids = random_batches(256, 1, (2, 16), seed=5)[0]
    with torch.no_grad():
        with_middle = sub(ids)
        sub.middle = None
        without = sub(ids)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sub").eval()(ids).logits
        again = elo.load_model(tmp_path / "sub")
        assert again.middle is not None and again.middle.stats == surrogate.stats
        assert torch.equal(again(ids), with_middle)
    torch.testing.assert_close(hf, without, rtol=1e-4, atol=1e-4)
    assert (with_middle - without).abs().max() > 0.1  # the surrogate is used, and transformers does not use it


def test_flops_count_the_surrogate(tiny_llama):
    from elo.train.flops import train_flops_per_token

    sub = elo.load_detached(tiny_llama[0], [1, 4])
    sub.requires_grad_(False)
    sub.model.layers.requires_grad_(True)
    before = train_flops_per_token(sub, 24)
    elo.attach_middle(sub, elo.fit_middle(tiny_llama[0], [1, 4], random_batches(256, 2), tokens=100))
    d = sub.config.hidden_size
    assert train_flops_per_token(sub, 24) - before == 4 * d * d  # forward + input gradient (layer 1 trains)


@pytest.mark.slow
def test_default_model_surrogate_is_closer_to_the_full_model(default_model_dir):
    """SmolLM2-135M, layers (1, 30), fitted on 2.5k tokens of Korean Wikipedia: on later Korean text the submodel with
    the surrogate has a lower KL(full || submodel) of the next-token distribution than the plain submodel."""
    from elo.data.text import read_documents, text_windows

    full, tok = elo.load_model(default_model_dir), elo.load_tokenizer(default_model_dir)
    docs = read_documents(SAMPLE / "pretrain" / "ko_wikipedia.jsonl")
    fit_texts = [t[:2000] for t in itertools.islice(docs, 6)]
    eval_ids = next(text_windows([t[:2000] for t in itertools.islice(docs, 2)], tok, 256))
    surrogate = elo.fit_middle(full, [1, 30], fit_texts, tokens=2500, tokenizer=tok, seq_len=256)
    sub = elo.detach(full, [1, 30])
    with torch.no_grad():
        p = full(eval_ids).log_softmax(-1)
        kl = lambda model: (p.exp() * (p - model(eval_ids).log_softmax(-1))).sum(-1).mean().item()
        plain = kl(sub)
        closer = kl(elo.attach_middle(sub, surrogate))
    print(f"KL(full || submodel) plain {plain:.4f}, with surrogate {closer:.4f}; held-out R² {surrogate.stats['r2']}")
    assert closer < plain


# ---- --middle distilled[:K]: decoder blocks distilled from the full model (elo.extensions.distill) ----

def distill(model, blocks: int = 1, steps: int = 3, seed: int = 0, layers=(1, 4), lr: float = 1e-3):
    """Trained on 3 batches of 4 x 32 random tokens, measured on the next one."""
    return elo.distill_middle(model, list(layers), random_batches(256, 6, seed=3), tokens=384, blocks=blocks,
                              steps=steps, lr=lr, held_out=128, seed=seed)


def block_tensors(stand_in) -> dict[str, torch.Tensor]:
    return {f"{key}.{name}": t for key, m in stand_in.items() for name, t in m.named_buffers()}


def test_distillation_is_deterministic(tiny_llama):
    """Same seed, same tensors, bit for bit; another seed visits the batches in another order."""
    base = elo.load_model(tiny_llama[0])
    a, b, c = (block_tensors(distill(base, seed=seed)) for seed in (0, 0, 2))
    assert a.keys() == b.keys() == c.keys() and len(a) == 9  # one block: 2 norms, 4 attention, 3 MLP weights
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_distillation_brings_the_submodel_closer_to_the_full_model(tiny_llama):
    """One block in place of layers 2-3: on the held-out batch, the relative MSE of the state entering layer 4 and the
    KL of the next-token distribution drop below those of the block as it started (a copy of layer 3)."""
    base = elo.load_model(tiny_llama[0])
    stand_in = distill(base, steps=12, lr=3e-3)
    stats = stand_in.stats
    assert stats["init_layers"] == [[3]] and stats["tokens"] == 384 and stats["held_out"] == 128
    assert stats["mse"][0] < 0.9 * stats["mse_init"][0] and stats["kl"] < 0.9 * stats["kl_init"]
    assert set(stats["fidelity"]) == set(stats["fidelity_plain"]) == {"1", "4"}
    assert all(-1 <= c <= 1 for c in stats["fidelity"].values())
    # the reported KL is the submodel's with the stand-in, against the full model's
    sub = elo.attach_middle(elo.detach(base, [1, 4]), stand_in)
    ids = random_batches(256, 6, seed=3)[3]
    with torch.no_grad():
        p, q = base(ids).log_softmax(-1), sub(ids).log_softmax(-1)
    assert (p.exp() * (p - q)).sum(-1).mean().item() == pytest.approx(stats["kl"], rel=1e-4)


def test_distilled_file_round_trip_attach_checks_and_transformers_ignores_it(tiny_llama, tmp_path):
    """save_middle / load_middle are bit-exact (HF decoder-layer names inside); attach checks layers and base as for
    the linear map; a saved submodel keeps its HF weights only and elo's load_model attaches the blocks again."""
    import transformers
    from safetensors import safe_open

    from tests.conftest import build_hf_checkpoint

    directory, _ = tiny_llama
    stand_in = distill(elo.load_model(directory), blocks=2, steps=2)
    elo.save_middle(stand_in, tmp_path / "alone")
    with safe_open(tmp_path / "alone" / MIDDLE_NAME, "pt") as f:
        assert "3.blocks.1.self_attn.q_proj.weight" in f.keys() and "3.blocks.0.mlp.down_proj.weight" in f.keys()
    loaded = elo.load_middle(tmp_path / "alone")
    assert loaded.stats == stand_in.stats and loaded.stats["init_layers"] == [[2, 3]]
    saved, again = block_tensors(stand_in), block_tensors(loaded)
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)

    with pytest.raises(ValueError, match=r"fitted for layers \[1, 4\]; the submodel holds \[1, 3\]"):
        elo.attach_middle(elo.load_detached(directory, [1, 3]), loaded)
    with pytest.raises(ValueError, match="no 'elo' record"):
        elo.attach_middle(elo.load_model(directory), loaded)
    build_hf_checkpoint("llama", tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="another base model"):
        elo.attach_middle(elo.load_detached(tmp_path / "other", [1, 4]), loaded)

    sub = elo.load_detached(directory, [1, 4])
    plain = sub.state_dict()
    elo.attach_middle(sub, loaded)
    assert sub.state_dict().keys() == plain.keys() and not any(p.requires_grad for p in loaded.parameters())
    elo.save_model(sub, tmp_path / "sub")
    ids = random_batches(256, 1, (2, 16), seed=5)[0]
    with torch.no_grad():
        with_blocks = sub(ids)
        with pytest.raises(ValueError, match="keep no KV cache"):
            sub(ids, cache=sub.new_cache(2, 16))
        again = elo.load_model(tmp_path / "sub")
        assert again.middle.stats == stand_in.stats and torch.equal(again(ids), with_blocks)
        sub.middle = None
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sub").eval()(ids).logits
    torch.testing.assert_close(hf, sub(ids).detach(), rtol=1e-4, atol=1e-4)


def test_the_whole_gap_undistilled_is_the_middle(tiny, tmp_path):
    """K = the layers skipped and no step: the blocks are layers 2 and 3 themselves (their windows too: Mistral's and
    Qwen2's upper layers slide), so the submodel computes the full model, before and after a file round trip."""
    _, directory, _ = tiny
    base = elo.load_model(directory)
    stand_in = distill(base, blocks=2, steps=0)
    assert stand_in.stats["mse"] == [0.0] and stand_in.stats["kl"] == pytest.approx(0, abs=1e-6)
    assert stand_in.stats["fidelity"] == pytest.approx({"1": 1.0, "4": 1.0}, abs=1e-6)
    elo.save_middle(stand_in, tmp_path)
    ids = random_batches(256, 1, (2, 24), seed=7)[0]
    with torch.no_grad():
        full = base(ids)
        for middle in (stand_in, elo.load_middle(tmp_path)):
            torch.testing.assert_close(elo.attach_middle(elo.detach(base, [1, 4]), middle)(ids), full, rtol=0,
                                       atol=1e-5)


def test_one_stand_in_per_gap(tiny_llama):
    """Layers 1, 3, 5, 6 of a 6-layer model: gaps 1-3 and 3-5 each get a block (a copy of layer 2, of layer 4), none
    between the adjacent 5 and 6; undistilled, the submodel is the full model."""
    model = six_layers(tiny_llama[0])
    stand_in = distill(model, steps=0, layers=(1, 3, 5, 6))
    assert list(stand_in) == ["2", "4"] and stand_in.stats["init_layers"] == [[2], [4]]
    ids = random_batches(256, 1, (2, 16), seed=8)[0]
    with torch.no_grad():
        sub = elo.attach_middle(elo.detach(model, [1, 3, 5, 6]), stand_in)
        torch.testing.assert_close(sub(ids), model(ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(blocks=0), "blocks=0; expected an integer from 1 to 2"),
    (dict(blocks=3), "blocks=3; expected an integer from 1 to 2"),
    (dict(steps=-1), "steps=-1"),
    (dict(lr=float("nan")), "lr=nan"),
    (dict(layers=[2, 3]), "adjacent"),
    (dict(tokens=10_000), "the data ran out after 256 tokens"),
])
def test_distill_bad_input_is_a_one_line_error(tiny_llama, kwargs, message):
    args = dict(model=tiny_llama[0], layers=[1, 4], data=random_batches(256, 2), tokens=100) | kwargs
    with pytest.raises(ValueError) as e:
        elo.distill_middle(**args)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_flops_count_the_distilled_blocks(tiny_llama):
    """Each block is a frozen decoder layer above the trained layer 1: 4 FLOPs per weight (forward and input gradient)
    plus its attention core (QKᵀ and AV over the causal average of (T + 1) / 2 keys, forward and backward)."""
    from elo.train.flops import train_flops_per_token

    base = elo.load_model(tiny_llama[0])
    sub = elo.detach(base, [1, 4])
    sub.requires_grad_(False)
    sub.model.layers.requires_grad_(True)
    before = train_flops_per_token(sub, 24)
    elo.attach_middle(sub, distill(base, blocks=2, steps=0))
    d, kv, ff = 64, 2 * 16, 128  # hidden, key/value width (2 heads of 16), MLP width
    weights = d * d + 2 * d * kv + d * d + 3 * d * ff  # q, k and v, o, gate, up and down
    core = 3 * 2 * 2 * (24 + 1) / 2 * 4 * 16  # 4 heads of 16
    assert train_flops_per_token(sub, 24) - before == 2 * (4 * weights + core)


def test_train_distilled_end_to_end_and_resume_reuses_the_fit(run_env, tmp_path):
    """train.py --middle distilled:2 distils once (rank 0, before training), keeps the blocks in the run directory and
    ships them with the submodel; a run killed after step 1 and resumed reads them back instead of distilling again."""
    import json
    import subprocess
    import sys

    from tests.test_train import DIE_AT, REPO, args, losses, run

    _, _, env = run_env
    full, killed = tmp_path / "full", tmp_path / "killed"
    extra = ("--batch-size", "2", "--save-every", "1", "--max-steps", "2", "--layers", "1,4", "--middle", "distilled:2",
             "--middle-tokens", "128", "--middle-steps", "2")
    result = run([sys.executable, "train.py", *args(run_env, full, *extra)], env)
    assert "middle surrogate (distilled:2) attached" in result.stdout and "middle distill: step 2/2" in result.stderr
    fitted, shipped = elo.load_middle(full / "checkpoints"), elo.load_middle(full / "model")
    assert fitted.stats["blocks"] == 2 and fitted.stats["steps"] == 2
    a, b = block_tensors(fitted), block_tensors(shipped)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    step0 = json.loads((full / "metrics.jsonl").read_text().splitlines()[0])
    assert step0["middle_kl"] == fitted.stats["kl"] and "middle_cosine/4" in step0
    assert elo.load_model(full / "model").middle.stats == fitted.stats

    died = subprocess.run([sys.executable, "-c", DIE_AT, "log", "1", *args(run_env, killed, *extra)], env=env,
                          cwd=REPO, capture_output=True, timeout=600)
    assert died.returncode == -9
    written = (killed / "checkpoints" / MIDDLE_NAME).read_bytes()
    resumed = run([sys.executable, "train.py", *args(run_env, killed, *extra), "--resume"], env)
    assert "middle distill" not in resumed.stderr and "middle surrogate (distilled:2) attached" in resumed.stdout
    assert (killed / "checkpoints" / MIDDLE_NAME).read_bytes() == written
    c = block_tensors(elo.load_middle(killed / "model"))  # the same fit as the uninterrupted run's, bit for bit
    assert c.keys() == a.keys() and all(torch.equal(a[k], c[k]) for k in a)
    la, lb = losses(full), losses(killed)
    assert sorted(la) == sorted(lb) == [1, 2] and all(abs(la[s] - lb[s]) <= 1e-5 for s in la)


@pytest.mark.parametrize("extra, message", [
    (("distilled:0",), "--middle 'distilled:0': expected 'linear' or 'distilled', or distilled:K"),
    (("distilled:x",), "--middle 'distilled:x'"),
    (("cubic",), "--middle 'cubic'"),
    (("linear:2",), "--middle 'linear:2'"),
    (("distilled:3",), "--middle 'distilled:3': 3 blocks per gap, but a gap between layers [1, 4] skips only 2"),
    (("distilled", "--middle-steps", "-1"), "--middle-steps -1"),
    (("distilled", "--middle-lr", "0"), "--middle-lr 0.0"),
])
def test_train_middle_bad_values(run_env, tmp_path, monkeypatch, capsys, extra, message):
    from elo.pretrain import main
    from elo.tools.cli import run_main
    from tests.test_train import args

    monkeypatch.setenv("ELO_CACHE", run_env[2]["ELO_CACHE"])
    with pytest.raises(SystemExit):
        run_main(main, args(run_env, tmp_path / "bad", "--layers", "1,4", "--middle", *extra))
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()
