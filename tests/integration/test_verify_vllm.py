"""`quantkit verify INT4 --reference FP16` for real through vLLM on the TINY stand-in and its AWQ release.

One CLI run is shared by the assertions (three engine starts: both variants and the tiny per-step floor, ~3-6 min
on 2 shared CPU cores), and the independent speed cross-check times its report (two more); the load-failure
test starts no engine (vLLM refuses the corrupted config while building its own config, ~30 s).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from quantkit.verify import vllm_cpu_plugin
from quantkit.verify.report import REPORT_JSON, REPORT_MD

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@dataclass(frozen=True)
class Verified:
    folder: Path
    returncode: int
    output: str
    report: dict


def run_cli(*args: str | Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantkit", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def verified(vllm_importable: None, published_dir: Path, published_awq_release: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Verified:
    """The native-AWQ int4 stand-in verified against its 16-bit stand-in (a copy: verify writes into it), both
    carrying the real snapshot's published code files, which vLLM runs (configuration and processor)."""
    folder = shutil.copytree(published_awq_release, tmp_path_factory.mktemp("verify") / "int4")
    proc = run_cli("verify", folder, "--reference", published_dir, "--max-tokens", "12", "--gpu-memory-gb", "24")
    output = proc.stdout + proc.stderr
    assert (folder / REPORT_JSON).is_file(), f"no report written; CLI output:\n{output[-4000:]}"
    return Verified(folder, proc.returncode, output, json.loads((folder / REPORT_JSON).read_text()))


def test_both_variants_load_and_report_engine_facts(verified: Verified) -> None:
    variants = verified.report["variants"]
    assert set(variants) == {"reference", "int4"}
    for label, variant in variants.items():
        assert variant["ok"], f"{label}: {variant['error']}\n{variant['log_tail']}"
        assert variant["engine_start_s"] > 0 and variant["kv_cache_tokens"] > 0 and variant["weights_bytes"] > 0
        assert [row["batch"] for row in variant["speed"]] == [1, 8]
        assert all(row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0 for row in variant["speed"])
    int4 = variants["int4"]
    assert int4["quantization"] and int4["kernel_warning"] is None
    assert int4["kernel"] == ("CPUWNA16LinearKernel" if not vllm_cpu_plugin.torch_has_cuda() else int4["kernel"])
    assert variants["reference"]["quantization"] is None
    environment = verified.report["environment"]
    assert environment["cpu_fix_plugin_applied"] is (not vllm_cpu_plugin.torch_has_cuda())
    assert environment["vllm"] and environment["torch"] and environment["transformers"]
    assert environment["checkpoint_code_run_by_vllm"] == (
        "configuration_minicpm.py, image_processing_minicpmv.py, processing_minicpmv.py, tokenization_minicpmv_fast.py")
    fit = verified.report["memory_fit"]
    assert fit["int4"]["gpu_memory_gib"] == 24 and fit["int4"]["max_batch"] > 0


def test_every_prompt_kind_runs_through_both(verified: Verified, standin_dir: Path) -> None:
    prompts = verified.report["prompts"]
    assert {p["kind"] for p in prompts} == {"text", "image", "multi_image", "video"}
    tokens = {}
    for prompt in prompts:
        metrics = prompt["metrics"]
        assert metrics["positions"] == prompt["reference"]["tokens"] > 0
        assert prompt["int4"]["tokens"] > 0
        # The teacher-forced positions line up with the reference's own greedy tokens (prefill vs decode
        # numerics may flip a near-tie on random weights, hence not exactly 1).
        assert metrics["reference_consistency"] >= 0.75, prompt["id"]
        tokens[prompt["id"]] = prompt["reference"]["prompt_tokens"]
    # vLLM expanded every placeholder into query_num slots per slice: a 640x480 image is 1 + 2 slices, the
    # two-image prompt 2 x 3, each of the 4 video frames (320x240) a single slice.
    slots = json.loads((standin_dir / "config.json").read_text())["query_num"]
    assert tokens["text-capital"] < slots
    assert 3 * slots < tokens["image-shapes"] < 4 * slots
    assert 6 * slots < tokens["multi-image-compare"] < 7 * slots
    assert 4 * slots < tokens["video-ball"] < 5 * slots


def test_verdict_follows_the_metrics_and_sets_the_exit_code(verified: Verified) -> None:
    report = verified.report
    metrics = [p["metrics"] for p in report["prompts"]]
    assert report["passed"] is all(m["passed"] for m in metrics)
    assert verified.returncode == (0 if report["passed"] else 1), verified.output[-3000:]
    # A faithful release passes: KL ~1e-6 on the stand-in and no flip at a decisive position.
    assert report["passed"], report["reasons"]
    failing = {m["prompt_id"] for m in metrics if not m["passed"]}
    assert {r.split(":")[0].removeprefix("prompt ") for r in report["reasons"]} == failing
    limits = report["thresholds"]
    for m in metrics:
        assert m["passed"] is (m["mean_kl"] <= limits["max_mean_kl"]
                               and m["top1_agreement"] >= limits["min_top1_agreement"])
        # int4 keeps the distributions close (random weights: near-flat logits, tiny KL).
        assert 0 <= m["mean_kl"] < 0.1 and 0 <= m["top1_agreement"] <= 1
    assert f"verdict: {report['verdict']}" in verified.output


def test_report_files_and_manifest(verified: Verified) -> None:
    markdown = (verified.folder / REPORT_MD).read_text()
    assert markdown.startswith(f"# quantkit verify: {verified.report['verdict']}")
    for needle in ("## Static checks", "## Parity", "| decode tok/s, batch 8 |", "| linear kernel |",
                   "### video-ball (video; images: frame0.png, frame1.png, frame2.png, frame3.png)"):
        assert needle in markdown
    manifest = json.loads((verified.folder / "quantkit-manifest.json").read_text())
    assert manifest["verify"]["verdict"] == verified.report["verdict"]
    assert {REPORT_JSON, REPORT_MD} <= {entry["path"] for entry in manifest["files"]}
    assert verified.report["static"]["ok"]
    static = run_cli("verify", verified.folder, "--static", timeout=300)
    assert static.returncode == 0, static.stdout[-3000:]  # the updated manifest still matches every file


def test_setup_trial_on_the_cpu_skips_the_cuda_only_runs_and_measures_the_floor(verified: Verified) -> None:
    """On the CPU build vLLM has one int4 kernel and no CUDA graphs: those trials are listed as skipped and cost
    no engine start; the tiny stand-in's step time is measured as the per-step floor; the recommendation is
    vLLM's defaults, with a serve command and no bandwidth floor (no bandwidth known for a CPU)."""
    if vllm_cpu_plugin.torch_has_cuda():
        pytest.skip("the CPU trial's expectations")
    trials = verified.report["speed_trials"]
    assert [(t["variant"], t["setup"]["name"], t["ok"], t["skipped"]) for t in trials] == [
        ("reference", "vLLM defaults", True, False),
        ("int4", "vLLM defaults", True, False),
        ("int4", "VLLM_DISABLED_KERNELS=CPUWNA16LinearKernel", False, True),
        ("floor", "vLLM defaults", True, False),
        ("int4", "cudagraph_mode FULL_DECODE_ONLY", False, True),  # on the fastest kernel run: the default
        ("reference", "cudagraph_mode FULL_DECODE_ONLY", False, True),
    ]
    assert {t["error"] for t in trials if t["skipped"]} == {"CUDA only (not run on this device)"}
    assert trials[1]["speed"] == verified.report["variants"]["int4"]["speed"]
    rows = verified.report["speed_recommendation"]["rows"]
    assert [row["batch"] for row in rows] == [1, 8]
    for row in rows:
        assert row["int4"]["setup"]["name"] == "vLLM defaults" and row["floor_ms_per_step"] > 0
        assert row["int4_vs_16bit"] == row["int4"]["decode_tok_s"] / row["reference"]["decode_tok_s"]
        assert row["int4"]["bandwidth_floor_ms"] is None
    markdown = (verified.folder / REPORT_MD).read_text()
    dtype = verified.report["variants"]["int4"]["dtype"]  # the release's: float16
    assert f"```bash\nvllm serve {verified.folder.name} --trust-remote-code --dtype {dtype} --max-model-len 4096\n```" \
        in markdown
    assert "Bandwidth floor: none: no memory bandwidth is known for device cpu" in markdown
    assert "skipped: CUDA only (not run on this device)" in markdown
    assert "x the 16-bit model, vLLM's defaults are the fastest measured):" in markdown


def test_independent_timing_prints_both_figures_for_the_recommended_setups(verified: Verified, published_dir: Path,
                                                                          tmp_path: Path) -> None:
    """scripts/speed_crosscheck.py times the report's recommended setups in its own engines (a shorter plan on
    the CPU) and prints verify's figure beside its own; agreement is judged on the GPU, not in a CPU test."""
    proc = subprocess.run([sys.executable, "scripts/speed_crosscheck.py", str(verified.folder / REPORT_JSON),
                           "--reference", str(published_dir), "--prompt-len", "128", "--decode-tokens", "64", "--repeats", "1", "--json",
                           str(tmp_path / "x.json"), "--log-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((tmp_path / "x.json").read_text())
    assert [(r["variant"], r["setup"]) for r in results] == [("reference", "vLLM defaults"), ("int4", "vLLM defaults")]
    table = proc.stdout[proc.stdout.index("| variant | setup | batch |"):].splitlines()
    assert len(table) == 2 + 4  # header, rule, 16-bit and int4 at batch 1 and 8
    for result in results:
        assert set(result["measured"]) == {"1", "8"} and all(r["decode_tok_s"] > 0 for r in result["measured"].values())
    int4_batch1 = next(line for line in table if line.startswith("| int4 | vLLM defaults | 1 |")).split("|")
    verify_figure, independent = (float(cell.replace(",", "")) for cell in int4_batch1[4:6])
    # the cells are rounded (figures to 0.1, the ratio to 0.001): the ratio column is verify / independent
    assert float(int4_batch1[6]) == pytest.approx(verify_figure / independent, abs=5e-3)


def test_a_variant_that_cannot_load_gives_a_failed_report(vllm_importable: None, standin_dir: Path,
                                                          rtn_release: Path, tmp_path: Path) -> None:
    reference = shutil.copytree(standin_dir, tmp_path / "fp16-broken")
    (reference / "config.json").write_text((standin_dir / "config.json").read_text()[:200])
    folder = shutil.copytree(rtn_release, tmp_path / "int4")
    proc = run_cli("verify", folder, "--reference", reference, "--max-tokens", "4", timeout=600)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr
    report = json.loads((folder / REPORT_JSON).read_text())
    assert report["verdict"] == "FAIL" and set(report["variants"]) == {"reference"}
    # the report is published with the release: the folder by its name, not its local path
    assert report["reasons"][0].startswith("reference variant (fp16-broken) failed to run in vLLM: ")
    assert str(tmp_path) not in (folder / REPORT_JSON).read_text() + (folder / REPORT_MD).read_text()
    assert "not a valid JSON" in report["reasons"][0]
    assert "not a valid JSON" in report["variants"]["reference"]["log_tail"]
    assert "## reference failed to run in vLLM" in (folder / REPORT_MD).read_text()
