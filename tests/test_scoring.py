"""Log-likelihood scoring and rolling perplexity against transformers and lm-evaluation-harness.

Tolerances: fp32 on CPU. Per-request log-likelihoods agree with transformers to 1e-4 absolute (sums of a few dozen
log-probs whose logits agree to ~1e-5); perplexity to 0.1% relative (the issue's bound; the observed error is ~1e-6).
"""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

import elo
from elo.evaluation import scoring
from elo.evaluation.scoring import encode_pair, loglikelihoods, perplexity, rolling_windows
from tests.conftest import DATA

LL_TOL = 1e-4
PPL_RTOL = 1e-3


class ByteTokenizer:
    """Bytes as token ids (the tiny models have a 256-token vocabulary): tokenization is not under test here.
    Like elo's tokenizers, `add_bos=True` adds BOS only if the tokenizer's config does (`adds_bos`)."""

    bos_id, eos_id = 1, 2

    def __init__(self, adds_bos: bool = False):
        self.adds_bos = adds_bos

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return ([self.bos_id] if add_bos and self.adds_bos else []) + list(text.encode("utf-8"))


def hf_logprob(hf, ctx: list[int], cont: list[int]) -> float:
    """Reference: one unbatched transformers forward over ctx + cont[:-1]."""
    ids = torch.tensor([ctx + cont[:-1]])
    with torch.no_grad():
        logp = hf(ids).logits[0, -len(cont):].float().log_softmax(-1)
    return logp.gather(1, torch.tensor(cont)[:, None]).sum().item()


def random_requests(n: int, seed: int, vocab: int = 256, max_len: int = 30) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        ctx = [rng.randrange(vocab) for _ in range(rng.randint(1, max_len))]
        reqs.append((ctx, [rng.randrange(vocab) for _ in range(rng.randint(1, 6))]))
    # shared inputs: same context, continuations differing only in their last token (MMLU's A/B/C/D shape)
    ctx, cont = reqs[0]
    reqs += [(ctx, cont[:-1] + [t]) for t in (3, 4, 5)]
    return reqs


def test_rolling_windows_match_lm_eval():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    for seq_len in (1, 2, 5, 16):
        for n in range(0, 60):
            tokens = list(range(100, 100 + n))
            ref = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 7, seq_len, context_len=1)]
            ours = rolling_windows(tokens, 7, seq_len)
            assert [(list(a), list(b)) for a, b in ref] == ours, (seq_len, n)
            # every token predicted exactly once, in order, and no input longer than seq_len
            assert [t for _, cont in ours for t in cont] == tokens
            assert all(len(ctx) + len(cont) - 1 <= seq_len for ctx, cont in ours)


def test_loglikelihoods_match_transformers(tiny):
    arch, directory, hf = tiny
    model = elo.load_model(directory)
    reqs = random_requests(25, seed=0)
    ours = loglikelihoods(model, reqs, batch_tokens=128)
    ref = [hf_logprob(hf, ctx, cont) for ctx, cont in reqs]
    assert max(abs(a - b) for a, b in zip(ours, ref)) <= LL_TOL


def multiple_choice_requests(seed: int) -> list[tuple[list[int], list[int]]]:
    """Questions of 2-5 choices with 20-50 token contexts and 1-7 token continuations (some sharing a first token)."""
    rng = random.Random(seed)
    reqs = []
    for _ in range(6):
        ctx = [rng.randrange(256) for _ in range(rng.randint(20, 50))]
        reqs += [(ctx, [rng.randrange(256) for _ in range(rng.randint(1, 7))]) for _ in range(rng.randint(2, 5))]
    return reqs


@pytest.mark.parametrize("share", [True, False])
def test_shared_prefix_path_matches_transformers(tiny, share, monkeypatch):
    """Choices of one question scored through one shared, KV-cached context (sliding windows included) or whole."""
    arch, directory, hf = tiny
    monkeypatch.setattr(scoring, "SHARE_MIN_TOKENS", 0 if share else 10**9)
    model = elo.load_model(directory)
    reqs = multiple_choice_requests(seed=3)
    ours = loglikelihoods(model, reqs, batch_tokens=100)
    ref = [hf_logprob(hf, ctx, cont) for ctx, cont in reqs]
    assert max(abs(a - b) for a, b in zip(ours, ref)) <= LL_TOL


def test_batched_equals_unbatched(tiny_llama):
    directory, _ = tiny_llama
    model = elo.load_model(directory)
    reqs = random_requests(40, seed=1)
    one_by_one = loglikelihoods(model, reqs, batch_tokens=1)
    batched = loglikelihoods(model, reqs, batch_tokens=4096)
    assert max(abs(a - b) for a, b in zip(one_by_one, batched)) <= 1e-5
    # the test can fail: a request scored against another's continuation differs by far more
    assert abs(batched[-1] - batched[-2]) > 1e-3


def test_left_truncation_like_lm_eval(tiny_llama):
    directory, hf = tiny_llama
    model = elo.load_model(directory)
    ctx, cont = list(range(10, 50)), [7, 8, 9]
    (ours,) = loglikelihoods(model, [(ctx, cont)], max_length=16)
    full = ctx + cont
    assert abs(ours - hf_logprob(hf, full[-17:-3], cont)) <= LL_TOL  # the input is the last 16 tokens


def test_request_errors(tiny_llama):
    model = elo.load_model(tiny_llama[0])
    with pytest.raises(ValueError, match="empty context"):
        loglikelihoods(model, [([], [1])])
    with pytest.raises(ValueError, match="exceeds max_length=4"):
        loglikelihoods(model, [([1], [1, 2, 3, 4, 5])], max_length=4)


def test_encode_pair_moves_trailing_space():
    assert encode_pair(ByteTokenizer(), "ab  ", "c") == ([97, 98], [32, 32, 99])
    assert encode_pair(ByteTokenizer(adds_bos=True), "ab ", "c") == ([1, 97, 98], [32, 99])  # BOS on the context
    assert encode_pair(ByteTokenizer(), "", "xy") == ([1], [120, 121])  # empty context: after the prefix token


def test_evaluate_tasks_assigns_scores_to_their_documents(tiny_llama):
    """All tasks scored in one pass give what scoring each document's choices on its own gives."""
    from elo.evaluation import tasks

    if not (DATA / "eval").is_dir():
        pytest.skip(f"shared data not found under {DATA}")
    model, tok = elo.load_model(tiny_llama[0]), ByteTokenizer()
    got = scoring.evaluate_tasks(model, tok, ["kobest_sentineg", "mmlu"], DATA / "eval", limit=3)
    assert set(got) == {"kobest_sentineg", "mmlu", *tasks.GROUPS["mmlu"]}
    for name in ["kobest_sentineg", *tasks.GROUPS["mmlu"]]:
        insts = tasks.build_instances(tasks.TASKS[name], DATA / "eval", limit=3)
        lls = [loglikelihoods(model, [encode_pair(tok, i.context, c) for c in i.continuations]) for i in insts]
        assert got[name] == tasks.compute_metrics(tasks.TASKS[name], insts, lls)
    assert got["mmlu"] == tasks.aggregate([got[t] for t in tasks.GROUPS["mmlu"]])


def reference_perplexity(hf, tok, texts: list[str], seq_len: int, prefix: int) -> float:
    """Total NLL by lm-eval's own window functions and one transformers forward per window."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    nll = 0.0
    for text in texts:
        for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(tok(text), prefix, seq_len, 1)):
            nll -= hf_logprob(hf, list(ctx), list(cont))
    return nll


@pytest.mark.parametrize("share", [True, False])
def test_perplexity_matches_transformers(tiny, share, monkeypatch):
    """With sharing forced, the first windows of all documents share the prefix token's forward."""
    arch, directory, hf = tiny
    monkeypatch.setattr(scoring, "SHARE_MIN_TOKENS", 0 if share else 10**9)
    model = elo.load_model(directory)
    tok = ByteTokenizer()
    rng = random.Random(2)
    texts = ["".join(chr(rng.randrange(32, 127)) for _ in range(n)) for n in (0, 1, 15, 16, 17, 40, 100)]
    texts.append("한국어 문장과 日本語の文")  # multi-byte characters: bytes != characters
    out = perplexity(model, tok, texts, seq_len=16, batch_tokens=64)
    nll = reference_perplexity(hf, tok.encode, texts, 16, tok.bos_id)
    n_bytes = sum(len(t.encode()) for t in texts)
    assert out["bytes"] == n_bytes and out["docs"] == len(texts) and out["tokens"] == n_bytes
    assert abs(out["nll_per_token"] * out["tokens"] - nll) <= PPL_RTOL * nll
    assert math.isclose(out["bits_per_byte"], nll / math.log(2) / n_bytes, rel_tol=PPL_RTOL)
    assert math.isclose(out["perplexity"], math.exp(nll / out["tokens"]), rel_tol=PPL_RTOL)


# ---- the default model (SmolLM2-135M-Instruct) on real text ----

def real_docs(n_per_lang: int = 1, chars: int = 800) -> list[str]:
    files = {lang: DATA / "pretrain" / f"{lang}.jsonl" for lang in ("ko_wikipedia", "en_wikipedia", "ja_aozora")}
    if not all(f.is_file() for f in files.values()):
        pytest.skip(f"shared data not found under {DATA}")
    docs = []
    for f in files.values():
        with open(f, encoding="utf-8") as fh:
            docs += [json.loads(next(fh))["text"][:chars] for _ in range(n_per_lang)]
    return docs


@pytest.mark.slow
def test_default_model_perplexity_matches_lm_eval(default_model_dir):
    """Our perplexity equals lm-eval's HFLM.loglikelihood_rolling (transformers backend) on ko/en/ja documents."""
    import transformers
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    docs = real_docs()
    directory = default_model_dir
    model, tok = elo.load_model(directory), elo.load_tokenizer(directory)
    seq_len = 128
    ours = perplexity(model, tok, docs, seq_len=seq_len, batch_tokens=1024)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    lm = HFLM(pretrained=hf, tokenizer=transformers.AutoTokenizer.from_pretrained(directory), max_length=seq_len,
              batch_size=4, device="cpu")
    reqs = [Instance("loglikelihood_rolling", {}, (d,), 0) for d in docs]
    nll = -sum(lm.loglikelihood_rolling(reqs, disable_tqdm=True))
    assert ours["tokens"] > 3 * seq_len  # the documents span several windows
    assert abs(ours["nll_per_token"] * ours["tokens"] - nll) <= PPL_RTOL * nll
