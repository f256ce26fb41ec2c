"""Intervals and paired tests (speech_redundancy.stats) against plain resampling loops written here."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from sacrebleu.metrics import BLEU

from speech_redundancy import metrics
from speech_redundancy import stats as S

EDITS = [0, 1, 3, 0, 2, 5, 0, 1, 0, 4, 1, 0]
WORDS = [5, 6, 9, 4, 7, 8, 3, 6, 10, 12, 5, 7]


def plain_bootstrap(values, statistic, resamples, seed, level=0.95):
    """Resample the utterances with replacement, percentile interval: no numpy, no scipy."""
    rnd = random.Random(seed)
    n = len(values)
    got = sorted(statistic([values[rnd.randrange(n)] for _ in range(n)]) for _ in range(resamples))
    alpha = (1 - level) / 2

    def q(f):  # linear interpolation, as numpy's default percentile
        pos = f * (len(got) - 1)
        lo = int(math.floor(pos))
        return got[lo] + (got[min(lo + 1, len(got) - 1)] - got[lo]) * (pos - lo)

    return q(alpha), q(1 - alpha)


def ratio_of_sums(pairs):
    return sum(e for e, _ in pairs) / sum(n for _, n in pairs)


def mean_of_ratios(pairs):
    return sum(e / n for e, n in pairs) / len(pairs)


def test_wer_interval_matches_a_plain_loop():
    boot = S.Bootstrap(resamples=4000, seed=3)
    lo, hi = S.rate_interval(EDITS, WORDS, boot)
    ref_lo, ref_hi = plain_bootstrap(list(zip(EDITS, WORDS)), ratio_of_sums, 4000, seed=11)
    assert lo <= sum(EDITS) / sum(WORDS) <= hi
    assert lo == pytest.approx(ref_lo, abs=0.012) and hi == pytest.approx(ref_hi, abs=0.012)


def test_corpus_wer_is_resampled_as_summed_edits_over_summed_words():
    # five one-word utterances all wrong, five long ones all right: corpus WER 5/255, mean of ratios 0.5
    edits, words = [1] * 5 + [0] * 5, [1] * 5 + [50] * 5
    lo, hi = S.rate_interval(edits, words, S.Bootstrap(resamples=3000, seed=1))
    pairs = list(zip(edits, words))
    sums = plain_bootstrap(pairs, ratio_of_sums, 3000, seed=2)
    means = plain_bootstrap(pairs, mean_of_ratios, 3000, seed=2)
    assert hi == pytest.approx(sums[1], abs=0.01)
    assert hi < 0.1 < means[0]  # the per-utterance mean would sit far higher


def test_share_interval_matches_a_plain_loop():
    loops = [1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    lo, hi = S.rate_interval(loops, None, S.Bootstrap(resamples=4000, seed=5))
    ref = plain_bootstrap(loops, lambda v: sum(v) / len(v), 4000, seed=6)
    assert lo == pytest.approx(ref[0], abs=0.02) and hi == pytest.approx(ref[1], abs=0.02)


def test_intervals_are_reproducible_and_seeded():
    a = S.rate_interval(EDITS, WORDS, S.Bootstrap(resamples=500, seed=7))
    assert a == S.rate_interval(EDITS, WORDS, S.Bootstrap(resamples=500, seed=7))
    assert a != S.rate_interval(EDITS, WORDS, S.Bootstrap(resamples=500, seed=8))


def test_degenerate_cases():
    boot = S.Bootstrap(resamples=200)
    assert all(math.isnan(x) for x in S.rate_interval([], [], boot))
    assert S.rate_interval([2], [8], boot) == (0.25, 0.25)  # one utterance: every resample is itself
    assert S.rate_interval([0, 0, 0], [3, 4, 5], boot) == (0.0, 0.0)  # all correct
    assert all(math.isnan(x) for x in S.rate_interval([0, 0], [0, 0], boot))  # no reference unit
    c = S.paired_rate([], [], [], boot)
    assert math.isnan(c.diff) and c.n == 0
    c = S.paired_rate([1, 2], [1, 2], [5, 5], boot)
    assert (c.diff, c.low, c.high, c.p) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError):
        S.Bootstrap(resamples=0)
    with pytest.raises(ValueError):
        S.rate_interval([1, 2], [3], boot)


def test_paired_difference_against_a_plain_loop_and_exact_randomisation():
    a = [0, 2, 3, 1, 2, 5, 0, 2]
    b = [0, 1, 1, 0, 2, 3, 0, 1]
    n = [5, 6, 9, 4, 7, 8, 3, 6]
    boot = S.Bootstrap(resamples=4000, seed=0)
    c = S.paired_rate(a, b, n, boot)
    assert c.diff == pytest.approx((sum(a) - sum(b)) / sum(n)) and c.n == 8
    ref = plain_bootstrap(list(zip(a, b, n)), lambda v: (sum(x for x, _, _ in v) - sum(y for _, y, _ in v))
                          / sum(z for _, _, z in v), 4000, seed=9)
    assert c.low == pytest.approx(ref[0], abs=0.015) and c.high == pytest.approx(ref[1], abs=0.015)
    # every one of the 2^8 swaps of the pairs: two-sided p of the summed difference
    observed = abs(sum(a) - sum(b))
    extreme = sum(abs(sum((x - y) * s for x, y, s in zip(a, b, signs))) >= observed - 1e-12
                  for signs in itertools.product((1, -1), repeat=len(a)))
    assert c.p == pytest.approx(extreme / 2 ** len(a))


def test_bleu_interval_against_sacrebleu_on_resampled_texts():
    refs = ["the cat sat on the mat", "a dog ran very fast today", "hello world once again", "one two three four",
            "it was a bright cold day in april", "the clocks were striking thirteen"]
    hyps = ["the cat sat on mat", "a dog ran fast today", "hello world", "one two three four",
            "it was a bright day in april", "the clock was striking thirteen"]
    lo, hi = S.bleu_interval(refs, hyps, "13a", S.Bootstrap(resamples=1500, seed=4))
    bleu = BLEU(tokenize="13a")
    ref = plain_bootstrap(list(zip(refs, hyps)), lambda v: bleu.corpus_score([h for _, h in v], [[r for r, _ in v]]).score,
                          1500, seed=5)
    assert lo == pytest.approx(ref[0], abs=4.0) and hi == pytest.approx(ref[1], abs=4.0)
    assert lo <= bleu.corpus_score(hyps, [refs]).score <= hi
    one = S.bleu_interval(refs[:1], hyps[:1], "13a")
    assert one[0] == one[1] == pytest.approx(bleu.corpus_score(hyps[:1], [refs[:1]]).score)


def test_paired_bleu_exact_randomisation_for_few_sentences():
    refs = ["the cat sat on the mat", "a dog ran fast", "hello world again", "one two three four"]
    a = ["the cat sat on mat", "a dog ran fast", "hello world", "one two three four"]
    b = ["cat on the mat", "dog ran", "hello", "one two three"]
    c = S.paired_bleu(refs, a, b, "13a", S.Bootstrap(resamples=1000, seed=0))
    bleu = BLEU(tokenize="13a")
    assert c.diff == pytest.approx(bleu.corpus_score(a, [refs]).score - bleu.corpus_score(b, [refs]).score)
    # 16 swaps; the observed difference and its mirror are the two most extreme: p = 2/16 (sacrebleu's paired-ar
    # would say 1/1001)
    assert c.p == pytest.approx(2 / 16)
    assert S.paired_bleu(refs, a, a, "13a").p == 1.0


def test_holm_by_hand():
    adj = S.holm([0.01, 0.04, 0.03, float("nan")])
    assert adj[:3] == pytest.approx([0.03, 0.06, 0.06]) and math.isnan(adj[3])
    assert S.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert S.holm([]) == []


def rows_of(pairs):
    return [{"id": f"u{i}", "task": "asr", "language": "en", "reference": r, "hypothesis": h}
            for i, (r, h) in enumerate(pairs)]


def test_score_carries_intervals_and_its_settings():
    rows = rows_of([("the cat sat", "the cat sat"), ("a dog ran", "a dog"), ("one two three four", "one two tree for"),
                    ("hello there", "hello there"), ("good morning all", "good evening all")])
    got = metrics.score(rows, bootstrap=S.Bootstrap(resamples=300, seed=2))
    assert got["bootstrap"]["resamples"] == 300 and got["bootstrap"]["seed"] == 2
    assert got["wer_ci"][0] <= got["wer"] <= got["wer_ci"][1]
    assert got["cwer_ci"][0] <= got["cwer"] <= got["cwer_ci"][1]
    assert got["loop_rate_ci"] == [0.0, 0.0]
    assert got["wer_ci"] == metrics.score(rows, bootstrap=S.Bootstrap(resamples=300, seed=2))["wer_ci"]
    edits = [metrics.utterance_edits(r["reference"], r["hypothesis"]) for r in rows]
    assert got["wer_ci"] == list(S.rate_interval([e for e, _ in edits], [n for _, n in edits],
                                                 S.Bootstrap(resamples=300, seed=2)))
    one = metrics.score(rows[1:2])
    assert one["wer_ci"] == [one["wer"], one["wer"]]
    assert "wer_ci" not in metrics.score([])


def test_score_bleu_interval():
    rows = [{"id": str(i), "task": "st_zh2en", "language": "zh", "reference": r, "hypothesis": h}
            for i, (r, h) in enumerate([("the cat sat on the mat", "the cat sat on mat"),
                                        ("a dog ran fast", "a dog ran fast"), ("hello world again", "hello world")])]
    got = metrics.score(rows)
    assert got["bleu_ci"][0] <= got["bleu"] <= got["bleu_ci"][1]


def test_bootstrap_from_config():
    assert S.Bootstrap.from_config(None) == S.Bootstrap()
    assert S.Bootstrap.from_config({"resamples": 200, "seed": 3}) == S.Bootstrap(200, 3, 0.95)


def test_resamples_without_a_reference_unit_are_left_out():
    # harness protocols count empty references: a resample of only the empty one has no rate and is skipped
    lo, hi = S.rate_interval([2, 0, 1], [0, 5, 4], S.Bootstrap(resamples=2000, seed=0))
    assert not math.isnan(lo) and 0.0 <= lo <= 3 / 9 <= hi
