"""`evaluate()`: perplexity of a model folder on held-out text and, given a reference, how far it is from it.

Reads 16-bit folders and quantkit's int4 releases alike: int4 linears (AutoAWQ GEMM `.qweight/.qzeros/.scales`)
are dequantized in torch into plain float weights, so no GPU kernel and no autoawq are needed and the numbers
measure the quantized weights themselves, not a kernel. MiniCPM-V folders are evaluated on their `llm`
text path.

Metrics, on the same token blocks for model and reference:
- perplexity: exp(mean next-token NLL) over non-overlapping `seq_len` blocks, each evaluated without context
  from the previous block;
- mean KL(reference || model) over every position and the full vocabulary, in float32 (nats per token);
- top-1 agreement: fraction of positions where both models' argmax tokens match;
- per decoder layer: ||h_model - h_ref|| / ||h_ref|| of that layer's output hidden states, summed over all
  blocks. Taken with forward hooks on the decoder layers, because transformers' `output_hidden_states`
  replaces the last entry with the final-norm output.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantkit.archs import ArchSpec, spec_for_config
from quantkit.awq.quant import dequantize_gemm
from quantkit.calib import BUILTIN_PYDOC, pydoc_topics, read_samples
from quantkit.errors import InputError
from quantkit.io.chores import write_text_atomically
from quantkit.io.manifest import record_files
from quantkit.io.model_loading import build_and_load, load_tokenizer
from quantkit.io.portable import portable
from quantkit.io.release import QUANT_SUFFIXES
from quantkit.io.shards import read_config
from quantkit.verify.report import EVAL_REPORT

DEFAULT_BLOCKS = 4
"""Blocks evaluated when no count is given (fewer when the text is shorter): a quick check, under a minute on
2 busy CPU cores for the tiny stand-in, whose 151k-token output head costs ~40 GFLOP per 512-token block and model
(~7 s a block there, for model and reference). Pass n_samples for a finer number (docs/benchmarks.md: 40)."""
TOKENIZER_PROBE = "Quantization keeps 4 bits per weight: déjà vu, 3.14159, <tag>, naïve café 東京 🙂"


@dataclass
class EvalReport:
    """What `quantkit eval` measured. Reference metrics are None without a reference."""

    model: str
    text_source: str
    seq_len: int
    n_blocks: int
    perplexity: float
    int4: bool = False
    """The model folder is an AWQ GEMM int4 release (evaluated through its dequantized weights)."""
    reference: str | None = None
    reference_perplexity: float | None = None
    kl_mean: float | None = None
    """Mean KL(reference || model) per position, nats."""
    top1_agreement: float | None = None
    layer_errors: list[float] = field(default_factory=list)
    """Relative L2 error of each decoder layer's output vs the reference's, in layer order."""
    device: str = "cpu"
    dtype: str = "float32"
    seconds: float = 0.0

    @property
    def tokens(self) -> int:
        return self.n_blocks * self.seq_len

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens": self.tokens}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def save(self, folder: str | Path) -> Path:
        """Write EVAL_REPORT into `folder` (temporary name, then renamed): `verify` and the model card read it."""
        path = Path(folder) / EVAL_REPORT
        # published with a release: local folders and files by their names only
        data = portable(self.as_dict(), [folder, self.model, self.reference, self.text_source])
        data |= {key: Path(getattr(self, key)).resolve().name for key in ("model", "reference") if getattr(self, key)}
        write_text_atomically(path, json.dumps(data, indent=2) + "\n")
        record_files(Path(folder), [EVAL_REPORT])
        return path


@dataclass
class _LoadedModel:
    folder: Path
    spec: ArchSpec
    lm: nn.Module
    """The causal LM that takes input_ids (MiniCPM-V: its `llm`)."""
    layers: nn.ModuleList
    tokenizer: Any
    quantized: bool


def _is_awq_gemm(config: dict[str, Any], folder: Path) -> bool:
    quant = config.get("quantization_config")
    if quant is None:
        return False
    if quant.get("quant_method") != "awq" or str(quant.get("version", "gemm")).lower() != "gemm":
        raise InputError(
            f"{folder}/config.json: quantization_config {quant.get('quant_method')}/{quant.get('version')} is not "
            "readable here; quantkit eval reads 16-bit folders and AWQ GEMM int4 folders (quant_method awq, "
            "version gemm)."
        )
    return True


def load_weights(folder: Path, dtype: torch.dtype, dequantize: bool) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files in `dtype`; each GEMM int4 triple becomes `.weight`."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InputError(f"{folder} has no *.safetensors weights (quantkit eval does not read .bin checkpoints).")
    raw: dict[str, torch.Tensor] = {}
    for file in files:
        raw.update(load_file(str(file)))
    state: dict[str, torch.Tensor] = {}
    for name, tensor in raw.items():
        if dequantize and name.rpartition(".")[2] in QUANT_SUFFIXES:
            if not name.endswith(".qweight"):
                continue
            prefix = name.removesuffix(".qweight")
            try:
                packed = {key: raw[f"{prefix}.{key}"] for key in QUANT_SUFFIXES}
            except KeyError as err:
                raise InputError(f"{folder}: {prefix} has a qweight but no {err.args[0]}; the release is broken.") from err
            state[f"{prefix}.weight"] = dequantize_gemm(**packed).to(dtype)
        else:
            state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state


def load_for_eval(folder: Path, dtype: torch.dtype, device: torch.device) -> _LoadedModel:
    """Build the float model from config.json and load its weights (dequantized when int4) in `dtype`, without
    running any code of the checkpoint (the spec's own module tree, or transformers' native class)."""
    raw_config = read_config(folder)
    spec = spec_for_config(raw_config, source=str(folder / "config.json"))
    quantized = _is_awq_gemm(raw_config, folder)
    state = load_weights(folder, dtype, dequantize=quantized)
    if spec.build_model is not None:
        model = build_and_load(spec.build_model, raw_config, state.items(), dtype, str(folder))
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights below are already plain float tensors
        model, info = spec.native_class()._model_mapping[type(config)].from_pretrained(
            None, config=config, state_dict=state, dtype=dtype, output_loading_info=True
        )
        missing = sorted(info["missing_keys"])
        if missing:
            raise InputError(
                f"{folder}: {len(missing)} weights are missing from its safetensors files (first: {missing[0]}); "
                "the folder is incomplete."
            )
    del state
    model = model.to(device).eval()
    lm = model.get_submodule(spec.language_model) if spec.language_model else model
    layers_path = spec.decoder_layers.removeprefix(f"{spec.language_model}.") if spec.language_model else (
        spec.decoder_layers)
    return _LoadedModel(folder=folder, spec=spec, lm=lm, layers=lm.get_submodule(layers_path),
                        tokenizer=load_tokenizer(folder, spec), quantized=quantized)


def check_same_tokenizer(model: _LoadedModel, reference: _LoadedModel) -> None:
    """KL and agreement compare distributions position by position: both sides must map text to the same ids."""
    a, b = model.tokenizer, reference.tokenizer
    if len(a) != len(b) or a(TOKENIZER_PROBE)["input_ids"] != b(TOKENIZER_PROBE)["input_ids"] or (
        a.get_vocab() != b.get_vocab()
    ):
        raise InputError(
            f"model {model.folder} and reference {reference.folder} have different tokenizers "
            f"({len(a)} vs {len(b)} tokens, or a probe text tokenizes differently): KL and top-1 agreement need "
            "the same token ids. Compare a quantized model with its own 16-bit source."
        )


def read_eval_texts(text: str, dataset: str | None, split: str, text_field: str) -> tuple[list[str], str]:
    """The documents to evaluate on and a label for the report.

    `builtin:pydoc` is the evaluation half of CPython's pydoc topics (calibration uses the other half), so a
    model calibrated on `builtin:pydoc` is never evaluated on its calibration text.
    """
    if dataset is not None:
        return [s.text for s in read_samples(dataset, split=split, text_field=text_field)], f"{dataset}:{split}"
    if text == BUILTIN_PYDOC:
        return pydoc_topics("eval"), f"{BUILTIN_PYDOC} (eval split)"
    path = Path(text)
    if not path.is_file():
        raise InputError(f"text file {text} does not exist; give a UTF-8 text file, {BUILTIN_PYDOC} or --dataset.")
    return [path.read_text(encoding="utf-8")], str(path)


def token_blocks(documents: list[str], tokenizer: Any, seq_len: int, n_samples: int | None,
                 source: str) -> torch.Tensor:
    """[n, seq_len] non-overlapping blocks of the documents' tokens (joined by blank lines), from the start:
    `n_samples` of them, or up to DEFAULT_BLOCKS when None."""
    if seq_len < 2:
        raise InputError(f"seq_len={seq_len}: need at least 2 tokens per block to score a prediction.")
    ids = tokenizer("\n\n".join(documents), add_special_tokens=False, verbose=False)["input_ids"]
    available = len(ids) // seq_len
    if available == 0:
        raise InputError(
            f"text {source} has {len(ids)} tokens, shorter than one sequence of {seq_len}; give more text or a "
            "smaller --seq-len."
        )
    if n_samples is not None and not 0 < n_samples <= available:
        raise InputError(
            f"--n-samples {n_samples}: text {source} holds {available} blocks of {seq_len} tokens; ask for 1 to "
            f"{available}."
        )
    n = n_samples or min(DEFAULT_BLOCKS, available)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)


def _forward(loaded: _LoadedModel, block: torch.Tensor, keep_layers: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """float32 logits [L, vocab] of one block and, if asked, each decoder layer's output [L, hidden]."""
    outputs: list[torch.Tensor] = []

    def keep(module: nn.Module, args: tuple, output: Any) -> None:
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        outputs.append(hidden[0].float())

    handles = [layer.register_forward_hook(keep) for layer in loaded.layers] if keep_layers else []
    try:
        logits = loaded.lm(input_ids=block.unsqueeze(0), use_cache=False).logits[0].float()
    finally:
        for handle in handles:
            handle.remove()
    return logits, outputs


@torch.no_grad()
def evaluate(
    model_dir: str | Path,
    reference: str | Path | None = None,
    *,
    text: str = BUILTIN_PYDOC,
    dataset: str | None = None,
    split: str = "test",
    text_field: str = "text",
    seq_len: int = 512,
    n_samples: int | None = None,
    device: str = "cpu",
    on_block_done: Callable[[int, int], None] | None = None,
) -> EvalReport:
    """Perplexity of `model_dir` on held-out text and, with `reference` (its 16-bit source), KL, top-1 agreement
    and per-layer output error on the same tokens.

    Text: `text` is `builtin:pydoc` (default) or a UTF-8 file; `dataset` (a `datasets` id, `org/name[:config]`,
    with `split` and `text_field`) takes precedence. `n_samples` blocks of `seq_len` tokens from the start of
    the text (default: up to DEFAULT_BLOCKS); the count evaluated is the report's `n_blocks`.
    Computes in float32 on the CPU and in the model's 16-bit dtype on a GPU (logits in float32 either way).
    `on_block_done(done, total)` is called after each block (progress bars).
    """
    from quantkit.quantize import compute_dtype, resolve_device

    started = time.perf_counter()
    model_dir = Path(model_dir)
    ref_dir = Path(reference) if reference is not None else None
    dev = resolve_device(device)
    dtype = compute_dtype(read_config(model_dir), dev)
    if ref_dir is not None:
        read_config(ref_dir)  # a missing reference fails before the model is loaded
    documents, source = read_eval_texts(text, dataset, split, text_field)

    model = load_for_eval(model_dir, dtype, dev)
    ref = load_for_eval(ref_dir, dtype, dev) if ref_dir is not None else None
    if ref is not None:
        check_same_tokenizer(model, ref)
    blocks = token_blocks(documents, model.tokenizer, seq_len, n_samples, source)

    nll = ref_nll = kl = 0.0
    agree = 0
    n_layers = len(model.layers)
    if ref is not None and len(ref.layers) != n_layers:
        raise InputError(f"model has {n_layers} decoder layers but reference {ref_dir} has {len(ref.layers)}.")
    err_sq = torch.zeros(n_layers, dtype=torch.float64)
    ref_sq = torch.zeros(n_layers, dtype=torch.float64)
    for index, block in enumerate(blocks):
        ids = block.to(dev)
        logits, hidden = _forward(model, ids, keep_layers=ref is not None)
        logp = torch.log_softmax(logits, dim=-1)
        nll -= logp[:-1].gather(-1, ids[1:, None]).sum().item()
        if ref is not None:
            ref_logits, ref_hidden = _forward(ref, ids, keep_layers=True)
            if ref_logits.shape != logits.shape:
                raise InputError(f"model logits {tuple(logits.shape)} and reference logits "
                                 f"{tuple(ref_logits.shape)} differ in vocabulary size.")
            ref_logp = torch.log_softmax(ref_logits, dim=-1)
            ref_nll -= ref_logp[:-1].gather(-1, ids[1:, None]).sum().item()
            kl += torch.nn.functional.kl_div(logp, ref_logp, log_target=True, reduction="sum").item()
            agree += (logits.argmax(-1) == ref_logits.argmax(-1)).sum().item()
            for i, (h, h_ref) in enumerate(zip(hidden, ref_hidden)):
                err_sq[i] += (h - h_ref).pow(2).sum().item()
                ref_sq[i] += h_ref.pow(2).sum().item()
        if on_block_done is not None:
            on_block_done(index + 1, len(blocks))

    predictions = blocks.shape[0] * (seq_len - 1)
    positions = blocks.numel()
    report = EvalReport(
        model=str(model_dir), text_source=source, seq_len=seq_len, n_blocks=blocks.shape[0],
        perplexity=math.exp(nll / predictions), int4=model.quantized, device=str(dev),
        dtype=str(dtype).removeprefix("torch."),
    )
    if ref is not None:
        report.reference = str(ref_dir)
        report.reference_perplexity = math.exp(ref_nll / predictions)
        report.kl_mean = kl / positions
        report.top1_agreement = agree / positions
        report.layer_errors = (err_sq / ref_sq.clamp(min=1e-30)).sqrt().tolist()
    report.seconds = time.perf_counter() - started
    return report
