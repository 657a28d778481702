"""The model card: Hub metadata (base model, relation, license copied from the source's card), vLLM usage with
the kernel verify saw, the parity and speed tables from the report; regenerating it gives the same text."""

from __future__ import annotations

import json
from pathlib import Path

from quantkit.card import front_matter, render_card, write_card
from quantkit.io.manifest import read_manifest, write_manifest

COMMIT = "3f7a8da1b7a8b928b5ee229fae33cf43fd64cf31"


def release_folder(tmp_path: Path) -> tuple[Path, Path]:
    source, release = tmp_path / "source", tmp_path / "release"
    source.mkdir()
    release.mkdir()
    (source / "README.md").write_text("---\nlicense: other\nlicense_name: minicpm-model-license\n"
                                      "license_link: LICENSE\n---\n# MiniCPM-V 2.6\n")
    (release / "config.json").write_text('{"model_type": "minicpmv", "version": 2.6}\n')
    metrics = {"positions": 16, "mean_kl": 0.012, "max_kl": 0.05, "top1_agreement": 0.94,
               "first_divergence": None, "text_similarity": 1.0, "passed": True, "failures": []}
    report = {"verdict": "PASS", "settings": {"parity": "vLLM parity run"}, "environment": {"device": "cuda"},
              "thresholds": {"max_mean_kl": 0.1, "min_top1_agreement": 0.85},
              "static": {"summary": {"passed": 12, "failed": 0, "skipped": 0}},
              "prompts": [{"id": "chart", "kind": "image", "metrics": metrics}],
              "variants": {"reference": {"ok": True, "kernel": "UnquantizedLinearMethod", "weights_bytes": 16 * 2**30},
                           "int4": {"ok": True, "kernel": "AWQMarlinLinearMethod", "weights_bytes": 6 * 2**30,
                                    "speed": [{"batch": 1, "prefill_tok_s": 9000.0, "decode_tok_s": 120.0}]}},
              "reasons": []}
    (release / "verify-report.json").write_text(json.dumps(report))
    write_manifest(release, {"source": {"repo_id": "openbmb/MiniCPM-V-2_6", "commit": COMMIT},
                             "quantization": {"backend": "native", "settings": {"bits": 4, "group_size": 128},
                                              "quantization_config": {"modules_to_not_convert": ["vpm", "resampler"]},
                                              "quantized_layers": list(range(28)), "num_layers": 28},
                             "calibration": {"source": "mit-han-lab/pile-val-backup", "text_blocks": 128,
                                             "seq_len": 512}})
    return source, release


def test_card_metadata_usage_and_tables(tmp_path: Path):
    source, release = release_folder(tmp_path)
    card = render_card(release, source, repo_id="org/MiniCPM-V-2_6-AWQ")
    (release / "README.md").write_text(card)
    metadata = front_matter(release / "README.md")
    assert metadata == {"base_model": "openbmb/MiniCPM-V-2_6", "base_model_relation": "quantized",
                        "library_name": "transformers", "pipeline_tag": "image-text-to-text", "license": "other",
                        "license_name": "minicpm-model-license", "license_link": "LICENSE",
                        "tags": ["awq", "int4", "4-bit", "quantkit", "vllm"]}
    assert f"at commit `{COMMIT}`" in card
    assert 'LLM(model="org/MiniCPM-V-2_6-AWQ", trust_remote_code=True' in card
    assert "vLLM served the int4 linears with `AWQMarlinLinearMethod` (a fast kernel)" in card
    assert "| chart | image | 16 | 0.012 | 0.94 | – | pass |" in card
    assert "| linear kernel | UnquantizedLinearMethod | AWQMarlinLinearMethod |" in card
    assert "| kept 16-bit | vpm, resampler |" in card and "| quantized decoder layers | 28 of 28 |" in card


def test_license_survives_regeneration_without_the_source(tmp_path: Path):
    """write_release copies the base model's README.md into the release; the card replaces it but keeps its
    license, so `quantkit upload` (which has no source folder) writes the same card again."""
    source, release = release_folder(tmp_path)
    path, changed = write_card(release, source)
    assert changed and front_matter(path)["license"] == "other"
    assert "README.md" in {entry["path"] for entry in read_manifest(release)["files"]}
    _, changed_again = write_card(release)
    assert not changed_again


def test_card_names_the_rounding_method(tmp_path: Path):
    source, release = release_folder(tmp_path)
    assert "| method | AWQ (activation-aware weight quantization), native engine |" in render_card(release, source)
    manifest = read_manifest(release)
    manifest["quantization"]["settings"]["method"] = "awq-gptq"
    write_manifest(release, {k: manifest[k] for k in ("source", "quantization", "calibration")})
    card = render_card(release, source)
    assert ("| method | AWQ (activation-aware weight quantization), then GPTQ error-compensated rounding on the same "
            "groups, native engine |") in card and "| method | awq-gptq |" in card
