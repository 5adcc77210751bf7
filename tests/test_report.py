"""The pipeline report's evaluation table: the best per column in bold, sample sizes and standard errors beside every
task score, and a reading computed from the numbers."""
from elo.pipeline.report import markdown


def report(copa: dict[str, float], n: int = 100) -> dict:
    ppl = {"base": 12.0, "align": 10.5, "sft": 11.0}
    return {"recipe": "r.toml", "out": "runs/r", "written": "now", "machine": {}, "nproc": 1, "stages": {},
            "evaluation_wall_s": 1.0, "figures": [],
            "evaluation": {m: {"heldout": {"ko": {"perplexity": ppl[m]}}, "command": "x",
                               "tasks": {"kobest_copa": {"acc": copa[m], "f1": copa[m], "n": n}}} for m in ppl}}


def test_best_is_bold_with_sample_sizes_and_standard_errors():
    text = markdown(report({"base": 0.40, "align": 0.45, "sft": 0.42}))
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "**10.500**" in rows["align"] and "**" not in rows["base"]
    assert "**45.0 ± 5.0 (n=100)**" in rows["align"] and "40.0 ± 4.9 (n=100)" in rows["base"]
    assert ("kobest_copa: best align (45.0%) but within 2 standard errors of base (40.0%, ±5.0%): no model differs "
            "from the base beyond noise") in text
    assert "lowest ko held-out ppl: align, 10.500 (base 12.000)" in text


def test_a_difference_beyond_the_noise_is_called_so():
    text = markdown(report({"base": 0.40, "align": 0.70, "sft": 0.42}, n=400))
    assert "kobest_copa: align beats base by 30.0%, more than 2 standard errors" in text


def test_reading_compares_elo_with_the_alignment_only_control():
    r = report({"base": 0.40, "align": 0.45, "sft": 0.42})
    r["evaluation"]["control"] = {"heldout": {"ko": {"perplexity": 10.8}}, "command": "x",
                                  "tasks": {"kobest_copa": {"acc": 0.44, "f1": 0.44, "n": 100}}}
    text = markdown(r)
    assert ("ELO + alignment vs alignment alone (control), ko held-out ppl: 10.500 vs 10.800, lower with ELO's layers "
            "(one run each: compare the gap with the spread between data orders)") in text
    r["evaluation"]["control"]["heldout"]["ko"]["perplexity"] = 10.2
    assert "10.500 vs 10.200, no lower with ELO's layers" in markdown(r)
