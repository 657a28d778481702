"""Parity metrics between a 16-bit reference and its int4 variant: pure functions over plain data.

Inputs come from vLLM runs (quantkit.verify.vllm_runner) but nothing here imports vLLM, so every formula is
unit-tested on constructed data. Distributions arrive as top-k logprobs per position (token id -> natural-log
probability), because vLLM returns only the top-k of each position, never the full vocabulary.

Tokens outside one side's top-k: that side's probability of such a token is unknown but bounded: it is at most
the smallest probability the side did list (the token ranked below all of them) and the side's unlisted mass
(1 - sum of listed probabilities) is shared by all of them. So, over the union U of both sides' listed ids, a
missing token gets min(smallest listed probability, unlisted mass / number of missing tokens), and whatever
unlisted mass is left goes to one extra "rest of the vocabulary" bucket; each side is then renormalised over
U + rest, with a floor of `PROBABILITY_FLOOR` so no log is taken of 0. KL is computed over those |U| + 1
outcomes. When both sides list the same ids this is the exact KL of the coarse-grained distributions (a lower
bound of the full-vocabulary KL); identical inputs give exactly 0.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from quantkit.errors import InputError

PROBABILITY_FLOOR = 1e-10
"""Smallest probability any outcome gets, so KL stays finite when one side puts (numerically) 0 on a token."""

TopLogprobs = Mapping[int, float]
"""One position's distribution as vLLM returns it: token id -> log probability (top-k, maybe + the actual token)."""


@dataclass(frozen=True)
class ParityThresholds:
    """When an int4 variant counts as faithful to its 16-bit reference, per prompt.

    Defaults suit a real model (published AWQ int4 releases of 7B models sit around 0.01-0.05 nats of per-token
    KL with >= 90% top-1 agreement). Text thresholds are off (None) by default: two greedy decodes part ways at
    the first near-tie and never meet again, so free-running text measures luck more than fidelity.
    """

    max_mean_kl: float = 0.1
    """Mean KL(16-bit || int4) per continuation token, in nats."""
    min_top1_agreement: float = 0.85
    """Fraction of decisive continuation positions where both variants' most likely next token is the same."""
    top1_min_margin: float = 0.05
    """A position is decisive when the reference's top-1 probability exceeds its runner-up's by at least this
    (absolute, 0..1). Flips at near-ties say nothing about the quantization (any rounding flips them);
    random-weight models spread ~1e-5 over every token, so on them no position is decisive, top-1 agreement is
    vacuous and KL carries the verdict."""
    min_text_similarity: float | None = None
    """difflib ratio of the two greedy texts, 0..1; None: reported, not judged."""
    min_divergence_position: int | None = None
    """The greedy token sequences must agree on at least this many tokens; None: reported, not judged."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.top1_min_margin <= 1.0:
            raise InputError(f"top1_min_margin={self.top1_min_margin}: a probability margin must lie in [0, 1].")
        if self.max_mean_kl < 0:
            raise InputError(f"max_mean_kl={self.max_mean_kl}: a KL bound must be >= 0 (nats).")
        for name in ("min_top1_agreement", "min_text_similarity"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise InputError(f"{name}={value}: must lie in [0, 1].")
        if self.min_divergence_position is not None and self.min_divergence_position < 0:
            raise InputError(f"min_divergence_position={self.min_divergence_position}: must be >= 0.")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PromptParity:
    """The metrics and verdict of one prompt. `failures` names each threshold that was missed."""

    prompt_id: str
    positions: int
    """Continuation tokens compared (the reference's greedy continuation, teacher-forced into both)."""
    mean_kl: float
    max_kl: float
    top1_agreement: float
    decisive_positions: int
    """Positions counted by top1_agreement (the reference's top-1 leads by >= top1_min_margin)."""
    reference_consistency: float
    """Fraction of positions where the reference's teacher-forced top-1 is its own greedy token: ~1.0 proves the
    scored positions line up with the continuation (below 1 only at near-ties, prefill vs decode numerics)."""
    first_divergence: int | None
    """Index of the first differing token of the two greedy decodes; None when they are identical."""
    text_similarity: float
    passed: bool
    failures: tuple[str, ...]

    def as_dict(self) -> dict:
        return asdict(self)


def _side_distribution(listed: TopLogprobs, union: Sequence[int]) -> list[float]:
    """Probabilities over `union` + one rest bucket (last), filled in and renormalised as the module says."""
    known = {token: math.exp(logprob) for token, logprob in listed.items()}
    unlisted_mass = max(0.0, 1.0 - sum(known.values()))
    missing = [token for token in union if token not in known]
    estimate = 0.0
    if missing:
        smallest_listed = min(known.values()) if known else 1.0
        estimate = min(smallest_listed, unlisted_mass / len(missing))
    probs = [known.get(token, estimate) for token in union]
    probs.append(unlisted_mass - estimate * len(missing))
    probs = [max(p, PROBABILITY_FLOOR) for p in probs]
    total = sum(probs)
    return [p / total for p in probs]


def kl_divergence(reference: TopLogprobs, candidate: TopLogprobs) -> float:
    """KL(reference || candidate) in nats for one position, from both sides' top-k logprobs."""
    if not reference or not candidate:
        raise ValueError("kl_divergence needs at least one listed token on each side")
    union = sorted(set(reference) | set(candidate))
    p = _side_distribution(reference, union)
    q = _side_distribution(candidate, union)
    return max(0.0, sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True)))


def top1(listed: TopLogprobs) -> int:
    """The most likely listed token (lowest id on an exact tie, so the choice is deterministic)."""
    return min(listed, key=lambda token: (-listed[token], token))


def top1_margin(listed: TopLogprobs) -> float:
    """The top-1 probability minus the runner-up's (the top-1 probability when only one token is listed)."""
    ranked = sorted((math.exp(lp) for lp in listed.values()), reverse=True)
    return ranked[0] - (ranked[1] if len(ranked) > 1 else 0.0)


def decisive(reference: Sequence[TopLogprobs], min_margin: float) -> list[bool]:
    """Per position: does the reference's top-1 lead its runner-up by at least `min_margin` probability?"""
    return [top1_margin(r) >= min_margin for r in reference]


def top1_agreement(reference: Sequence[TopLogprobs], candidate: Sequence[TopLogprobs],
                   min_margin: float = 0.0) -> float:
    """Fraction of decisive positions whose most likely token is the same on both sides (1.0 for none)."""
    _check_aligned(reference, candidate)
    pairs = [(r, c) for r, c, keep in zip(reference, candidate, decisive(reference, min_margin), strict=True)
             if keep]
    if not pairs:
        return 1.0
    return sum(top1(r) == top1(c) for r, c in pairs) / len(pairs)


def first_divergence(reference_ids: Sequence[int], candidate_ids: Sequence[int]) -> int | None:
    """Index of the first token where two decodes differ (a prefix ends at its length); None if identical."""
    for index, (a, b) in enumerate(zip(reference_ids, candidate_ids)):
        if a != b:
            return index
    if len(reference_ids) != len(candidate_ids):
        return min(len(reference_ids), len(candidate_ids))
    return None


def text_similarity(reference_text: str, candidate_text: str) -> float:
    """difflib's ratio, 2 * matches / total characters: 1.0 for equal texts, 0.0 for nothing in common."""
    if not reference_text and not candidate_text:
        return 1.0
    return difflib.SequenceMatcher(None, reference_text, candidate_text, autojunk=False).ratio()


def _check_aligned(reference: Sequence[TopLogprobs], candidate: Sequence[TopLogprobs]) -> None:
    if len(reference) != len(candidate):
        raise ValueError(
            f"teacher-forced positions differ: reference {len(reference)}, candidate {len(candidate)}; "
            "both must score the same continuation"
        )


def prompt_parity(
    prompt_id: str,
    reference_forced: Sequence[TopLogprobs],
    candidate_forced: Sequence[TopLogprobs],
    reference_ids: Sequence[int],
    candidate_ids: Sequence[int],
    reference_text: str,
    candidate_text: str,
    thresholds: ParityThresholds,
) -> PromptParity:
    """All metrics of one prompt and its verdict.

    `*_forced` are per-position top-k logprobs of the same continuation (the reference's greedy output) scored
    by each variant; `*_ids` / `*_text` are each variant's own free-running greedy output.
    """
    _check_aligned(reference_forced, candidate_forced)
    kls = [kl_divergence(r, c) for r, c in zip(reference_forced, candidate_forced, strict=True)]
    mean_kl = sum(kls) / len(kls) if kls else 0.0
    agreement = top1_agreement(reference_forced, candidate_forced, thresholds.top1_min_margin)
    decisive_positions = sum(decisive(reference_forced, thresholds.top1_min_margin))
    consistency = (sum(top1(p) == t for p, t in zip(reference_forced, reference_ids, strict=False))
                   / len(reference_forced)) if reference_forced else 1.0
    divergence = first_divergence(reference_ids, candidate_ids)
    similarity = text_similarity(reference_text, candidate_text)

    failures = []
    if mean_kl > thresholds.max_mean_kl:
        failures.append(f"mean KL {mean_kl:.4g} > {thresholds.max_mean_kl:g}")
    if agreement < thresholds.min_top1_agreement:
        failures.append(f"top-1 agreement {agreement:.3f} < {thresholds.min_top1_agreement:g}")
    if thresholds.min_text_similarity is not None and similarity < thresholds.min_text_similarity:
        failures.append(f"text similarity {similarity:.3f} < {thresholds.min_text_similarity:g}")
    if (thresholds.min_divergence_position is not None and divergence is not None
            and divergence < thresholds.min_divergence_position):
        failures.append(f"greedy texts diverge at token {divergence} < {thresholds.min_divergence_position}")
    return PromptParity(
        prompt_id=prompt_id,
        positions=len(kls),
        mean_kl=mean_kl,
        max_kl=max(kls, default=0.0),
        top1_agreement=agreement,
        decisive_positions=decisive_positions,
        reference_consistency=consistency,
        first_divergence=divergence,
        text_similarity=similarity,
        passed=not failures,
        failures=tuple(failures),
    )


def overall_verdict(prompts: Sequence[PromptParity]) -> bool:
    """The release passes when every prompt passes (and there is at least one)."""
    return bool(prompts) and all(p.passed for p in prompts)
