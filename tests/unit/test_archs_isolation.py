"""Model knowledge lives in quantkit/archs/ (and the stand-ins): the rest of the package asks the spec.

A grep over the package's source outside those places for literals only a model would know: its model_type,
the names of its modules, its special tokens, its Hub task. Comments and docstrings count too, so a fact cannot
hide in prose that code relies on; a hit must be moved into a spec, or named in EXCEPTIONS with the reason.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from quantkit import archs
from quantkit.archs import MINICPMV26, PROMPT_KINDS
from quantkit.errors import InputError
from quantkit.verify.prompts import KINDS

PACKAGE = Path(__file__).resolve().parents[2] / "quantkit"

MODEL_KNOWLEDGE_HOMES = ("archs/", "standin.py", "standin_qwen2_5_vl.py", "standin_code/", "testing/")
"""Where architecture facts belong: the specs and their module trees, and the stand-in checkpoints."""

MODEL_LITERALS: dict[str, str] = {
    "model_type string": r"""["'](qwen2|qwen2_5_vl|minicpmv|llama|mistral)["']""",
    "decoder module name": r"\b(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|self_attn|input_layernorm"
                           r"|post_attention_layernorm|embed_tokens|lm_head|rotary_emb)\b|\bmlp\.",
    "vision module name": r"\b(resampler|vpm)\b",
    "LLM prefix": r"""["'`]llm\.|\bllm\.model\b""",
    "model sub-config key": r"""["'](text_config|vision_config)["']""",
    "special token": r"<\|(im_start|im_end|endoftext)\|>|</?image>",
    "Hub task": r"image-text-to-text",
}
"""What a literal is -> a pattern for it (case-sensitive: "Resampler2_5", vLLM's class, is prose, not a name)."""

EXCEPTIONS: dict[tuple[str, str], str] = {}
"""(file under quantkit/, literal kind) -> why it may stay there. Empty: none is needed. Looked at and left as
prose: verify/vllm_cpu_plugin.py names vLLM's MiniCPM-V class `Resampler2_5` (capitalised, so no hit) because
that is the vLLM code its torch patch unblocks; CLI help examples name folders like `models/minicpmv26`."""


def hits() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith(MODEL_KNOWLEDGE_HOMES):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            for kind, pattern in MODEL_LITERALS.items():
                if (relative, kind) not in EXCEPTIONS and re.search(pattern, line):
                    found.append(f"quantkit/{relative}:{number}: {kind}: {line.strip()}")
    return found


def test_no_model_knowledge_outside_the_specs():
    assert hits() == []


def test_the_patterns_find_what_they_are_for():
    """Each pattern matches the kind of line it guards against (a pattern that matches nothing proves nothing)."""
    samples = {
        "model_type string": 'if config["model_type"] in ("qwen2", "minicpmv"):',
        "decoder module name": 'shapes["q_proj"] = (hidden, hidden)',
        "vision module name": "the vision tower and resampler stay 16-bit",
        "LLM prefix": 'prefix = "llm.model.layers"',
        "model sub-config key": 'llm = config.get("text_config") or config',
        "special token": 'STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")',
        "Hub task": '"pipeline_tag": "image-text-to-text"',
    }
    assert samples.keys() == MODEL_LITERALS.keys()
    for kind, line in samples.items():
        assert re.search(MODEL_LITERALS[kind], line), kind
    assert not re.search(MODEL_LITERALS["LLM prefix"], "tokenizer = llm.get_tokenizer()")


def test_prompt_kinds_are_the_suite_kinds():
    """Specs list their prompt kinds from the names verify's suite validates."""
    assert set(PROMPT_KINDS) == set(KINDS)


def test_two_versions_of_one_model_type_coexist(monkeypatch: pytest.MonkeyPatch):
    """Specs of one model_type are told apart by config_requires; no match or two matches is an InputError."""
    older = replace(MINICPMV26, name="minicpmv25", config_requires=(("version", "2.5"),))
    monkeypatch.setattr(archs, "ARCHS", (MINICPMV26, older))
    assert archs.spec_for_config({"model_type": "minicpmv", "version": 2.6}) is MINICPMV26
    assert archs.spec_for_config({"model_type": "minicpmv", "version": 2.5}) is older
    with pytest.raises(InputError, match="version 2.0 is not supported; quantkit's minicpmv26 spec needs version 2.6; "
                                         "quantkit's minicpmv25 spec needs version 2.5"):
        archs.spec_for_config({"model_type": "minicpmv", "version": 2.0})
    monkeypatch.setattr(archs, "ARCHS", (MINICPMV26, replace(older, config_requires=())))
    with pytest.raises(InputError, match="matches several specs"):
        archs.spec_for_config({"model_type": "minicpmv", "version": 2.6})
