"""Parity metrics on constructed distributions: exact values, the top-k fill-in rule, verdicts."""

from __future__ import annotations

import math

import pytest

from quantkit.errors import InputError
from quantkit.verify.parity import (
    ParityThresholds,
    first_divergence,
    kl_divergence,
    overall_verdict,
    prompt_parity,
    text_similarity,
    top1,
    top1_agreement,
)


def logs(probs: dict[int, float]) -> dict[int, float]:
    return {token: math.log(p) for token, p in probs.items()}


P = logs({0: 0.5, 1: 0.3, 2: 0.2})
Q = logs({0: 0.4, 1: 0.4, 2: 0.2})


def test_identical_distributions_have_zero_kl_and_full_agreement() -> None:
    partial = logs({7: 0.6, 3: 0.1})  # unlisted mass 0.3
    assert kl_divergence(P, P) == 0.0
    assert kl_divergence(partial, partial) == 0.0
    assert top1_agreement([P, partial], [P, partial]) == 1.0
    result = prompt_parity("same", [P, partial], [P, partial], [0, 7], [0, 7], "ab", "ab", ParityThresholds())
    assert (result.mean_kl, result.top1_agreement, result.first_divergence, result.text_similarity) == (
        0.0, 1.0, None, 1.0)
    assert result.passed and result.failures == ()


def test_full_support_kl_matches_the_formula() -> None:
    expected = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4)
    assert kl_divergence(P, Q) == pytest.approx(expected, abs=1e-6)
    reverse = 0.4 * math.log(0.4 / 0.5) + 0.4 * math.log(0.4 / 0.3)
    assert kl_divergence(Q, P) == pytest.approx(reverse, abs=1e-6)


def test_tokens_outside_the_other_top_k_get_the_bounded_estimate() -> None:
    # Each side lists 2 tokens and leaves 0.1 unlisted; the other's token is estimated at min(0.3, 0.1) = 0.1,
    # which uses up the unlisted mass, so p = (.6, .3, .1) and q = (.6, .1, .3) over ids (0, 1, 2).
    reference = logs({0: 0.6, 1: 0.3})
    candidate = logs({0: 0.6, 2: 0.3})
    assert kl_divergence(reference, candidate) == pytest.approx(0.2 * math.log(3), abs=1e-6)


def test_estimate_never_exceeds_the_smallest_listed_probability() -> None:
    # Unlisted mass 0.5 but the smallest listed is 0.1: the missing token gets 0.1, the rest bucket 0.4.
    reference = logs({0: 0.4, 1: 0.1})
    candidate = logs({0: 0.4, 1: 0.1, 5: 0.1})
    p = [0.4, 0.1, 0.1, 0.4]
    q = [0.4, 0.1, 0.1, 0.4]
    expected = sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))
    assert kl_divergence(reference, candidate) == pytest.approx(expected, abs=1e-6)


def test_kl_is_finite_when_one_side_has_no_mass_left() -> None:
    full = logs({0: 0.9, 1: 0.1})
    other = logs({2: 0.9, 3: 0.05})
    value = kl_divergence(full, other)
    assert math.isfinite(value) and value > 1.0


def test_top1_and_agreement() -> None:
    assert top1(P) == 0
    assert top1({4: -1.0, 2: -1.0}) == 2  # exact tie: lowest id
    other = logs({1: 0.6, 0: 0.4})
    assert top1_agreement([P, other, P], [P, P, Q]) == pytest.approx(2 / 3)  # Q's top-1 is the tie 0/1 -> 0
    assert top1_agreement([], []) == 1.0
    with pytest.raises(ValueError, match="positions differ"):
        top1_agreement([P], [])


@pytest.mark.parametrize(("a", "b", "position"), [
    ([1, 2, 3], [1, 2, 3], None),
    ([1, 2, 3], [1, 2, 4], 2),
    ([5, 2], [1, 2], 0),
    ([1, 2], [1, 2, 3], 2),
    ([], [], None),
])
def test_first_divergence(a: list[int], b: list[int], position: int | None) -> None:
    assert first_divergence(a, b) == position


def test_text_similarity() -> None:
    assert text_similarity("abcd", "abcd") == 1.0
    assert text_similarity("", "") == 1.0
    assert text_similarity("abcd", "abxy") == pytest.approx(0.5)
    assert text_similarity("abc", "xyz") == 0.0


def test_thresholds_flip_the_verdict() -> None:
    args = ("p", [P, P], [Q, Q], [0, 0], [0, 1], "the cat", "the dog")
    kl = kl_divergence(P, Q)
    assert prompt_parity(*args, ParityThresholds(max_mean_kl=kl * 1.01)).passed
    strict = prompt_parity(*args, ParityThresholds(max_mean_kl=kl * 0.99))
    assert not strict.passed and strict.failures[0].startswith("mean KL")

    forced_agree = prompt_parity("p", [P, Q], [P, P], [0, 0], [0, 0], "", "", ParityThresholds())
    assert forced_agree.top1_agreement == 1.0  # Q's top-1 tie resolves to 0, as P's
    disagree = prompt_parity("p", [P, P], [P, logs({1: 0.9, 0: 0.05})], [0, 0], [0, 1], "", "",
                             ParityThresholds(max_mean_kl=10))
    assert disagree.top1_agreement == 0.5 and not disagree.passed
    assert prompt_parity("p", [P, P], [P, logs({1: 0.9, 0: 0.05})], [0, 0], [0, 1], "", "",
                         ParityThresholds(max_mean_kl=10, min_top1_agreement=0.5)).passed

    text = prompt_parity(*args, ParityThresholds(max_mean_kl=1, min_text_similarity=0.9))
    assert not text.passed and "text similarity" in text.failures[0]
    early = prompt_parity(*args, ParityThresholds(max_mean_kl=1, min_divergence_position=2))
    assert not early.passed and "diverge at token 1" in early.failures[0]


def test_reference_consistency_shows_misaligned_positions() -> None:
    aligned = prompt_parity("p", [P, Q], [P, Q], [0, 0], [0, 0], "", "", ParityThresholds())
    shifted = prompt_parity("p", [P, Q], [P, Q], [2, 2], [2, 2], "", "", ParityThresholds())
    assert aligned.reference_consistency == 1.0 and shifted.reference_consistency == 0.0


def test_overall_verdict_needs_every_prompt() -> None:
    good = prompt_parity("a", [P], [P], [0], [0], "", "", ParityThresholds())
    bad = prompt_parity("b", [P], [Q], [0], [0], "", "", ParityThresholds(max_mean_kl=0.0))
    assert overall_verdict([good]) and not overall_verdict([good, bad]) and not overall_verdict([])


@pytest.mark.parametrize("kwargs", [{"max_mean_kl": -1}, {"min_top1_agreement": 1.5},
                                    {"min_text_similarity": -0.1}, {"min_divergence_position": -2}])
def test_thresholds_are_validated(kwargs: dict) -> None:
    with pytest.raises(InputError):
        ParityThresholds(**kwargs)


def test_top1_agreement_ignores_near_ties_of_the_reference():
    from quantkit.verify.parity import decisive

    near_tie = {1: math.log(0.50), 2: math.log(0.49)}
    clear = {1: math.log(0.9), 2: math.log(0.05)}
    flipped_tie = {2: math.log(0.50), 1: math.log(0.49)}
    flipped_clear = {2: math.log(0.9), 1: math.log(0.05)}
    assert decisive([near_tie, clear], 0.05) == [False, True]
    assert top1_agreement([near_tie, clear], [flipped_tie, clear], min_margin=0.05) == 1.0
    assert top1_agreement([near_tie, clear], [flipped_tie, clear]) == 0.5
    assert top1_agreement([near_tie, clear], [near_tie, flipped_clear], min_margin=0.05) == 0.0
    assert top1_agreement([near_tie], [flipped_tie], min_margin=0.05) == 1.0  # no decisive position
