"""The AutoAWQ adapter's model definition is the arch spec, and a missing AutoAWQ is a clear DependencyError."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from quantkit.archs import MINICPMV26, QWEN2
from quantkit.errors import DependencyError


def test_missing_autoawq_says_how_to_install(monkeypatch: pytest.MonkeyPatch):
    from quantkit.awq.autoawq_backend import import_autoawq

    monkeypatch.setitem(sys.modules, "awq", None)  # makes `import awq` raise ImportError
    with pytest.raises(DependencyError, match=r"pip install 'quantkit\[autoawq\]'"):
        import_autoawq()


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_generated_definition_equals_autoawq_qwen2(kv_heads: int):
    """The definition built from the QWEN2 spec hands AutoAWQ exactly what its own Qwen2 class hands it
    (with GQA the v -> o group is dropped; without it, kept)."""
    pytest.importorskip("awq", reason="AutoAWQ 0.2.9 is not installed: pip install 'quantkit[autoawq]'")
    from quantkit.awq.autoawq_backend import import_autoawq, model_definition

    own = import_autoawq().auto.AWQ_CAUSAL_LM_MODEL_MAP["qwen2"]
    generated = model_definition(QWEN2)
    config = Qwen2Config(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=kv_heads)
    model = Qwen2ForCausalLM(config)
    layer = model.model.layers[0]
    feats = {name: torch.randn(2, 256) for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    kwargs = {"position_ids": torch.arange(4)}
    ours, theirs = (d.get_layers_for_scaling(layer, feats, kwargs) for d in (generated, own))
    assert len(ours) == len(theirs) == (3 if kv_heads == 2 else 4)
    for a, b in zip(ours, theirs):
        assert a["prev_op"] is b["prev_op"]
        assert all(x is y for x, y in zip(a["layers"], b["layers"], strict=True))
        assert a["inp"] is b["inp"]
        assert a.get("module2inspect") is b.get("module2inspect")
        assert a.get("kwargs") is b.get("kwargs")
    assert generated.get_model_layers(model) is own.get_model_layers(model)


def test_minicpmv_is_registered_with_autoawq():
    pytest.importorskip("awq", reason="AutoAWQ 0.2.9 is not installed: pip install 'quantkit[autoawq]'")
    from quantkit.awq.autoawq_backend import import_autoawq, register

    definition = register(MINICPMV26)
    awq = import_autoawq()
    assert awq.auto.AWQ_CAUSAL_LM_MODEL_MAP["minicpmv"] is definition
    assert awq.base.TRANSFORMERS_AUTO_MAPPING_DICT["minicpmv"] == "AutoModel"
    assert definition.modules_to_not_convert == ["vpm", "resampler"]
