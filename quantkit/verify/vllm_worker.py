"""One vLLM engine for one model variant, in its own process: `python -m quantkit.verify.vllm_worker REQ OUT`.

Started by quantkit.verify.vllm_runner so that the memory of one variant is freed before the next loads and a
crash (bad checkpoint, kernel error, out of memory) becomes a failed run in the report instead of killing verify.
Reads the request (JSON, written by the runner), writes the result (JSON) to OUT; any exception is written there
as `error` + `traceback` before exiting non-zero. vLLM's own logs go to this process's stdout/stderr, which the
runner keeps and parses (kernel choice, weight memory).

All prompts are passed as token ids (the model's chat template, tokenized once here), so the free-running
decode and the teacher-forced pass see exactly the same prompt tokens, and the continuation fed back is the
reference's token ids, not a re-tokenization of its text.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from quantkit.io.chores import write_text_atomically
from quantkit.verify.speed import speed_row


def _position(logprobs: Any) -> dict[int, float]:
    """vLLM's logprobs of one position ({id: Logprob}) as plain {id: float}."""
    return {int(token): float(entry.logprob) for token, entry in logprobs.items()}


def _chat_token_ids(tokenizer: Any, content: str, placeholders: list[str]) -> list[int]:
    """The chat-templated user turn as token ids, each image or video placeholder (the arch's) encoded on its own.

    Encoding the whole text would merge a placeholder's ")" with the following newline (Qwen2 has a ")\n"
    token); vLLM then misses the placeholder among the ids, decodes the whole prompt and re-encodes it, which
    would also re-tokenize a teacher-forced continuation. Separate segments are what vLLM itself ends up with.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise RuntimeError("the model's tokenizer has no chat_template (tokenizer_config.json); verify renders "
                           "each prompt with it, as vLLM's chat endpoint would")
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    if not placeholders:
        return tokenizer.encode(text, add_special_tokens=False)
    ids: list[int] = []
    for segment in re.split("(" + "|".join(map(re.escape, placeholders)) + ")", text):
        ids.extend(tokenizer.encode(segment, add_special_tokens=False))
    return ids


def _stop_token_ids(tokenizer: Any, stop_tokens: list[str]) -> list[int]:
    vocab = tokenizer.get_vocab()
    return [vocab[token] for token in stop_tokens if token in vocab]


def _load_images(paths: list[str]) -> list[Any]:
    from PIL import Image

    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


VIDEO_FPS = 2.0
"""The frame rate a prompt's frames are declared at when they go to vLLM as one video."""


def _multi_modal_data(prompt: dict[str, Any]) -> dict[str, Any]:
    """vLLM's multi_modal_data for a prompt: its images, or its frames as one video ([frames, H, W, 3] uint8
    with the metadata vLLM's video processors read: every frame kept, VIDEO_FPS apart)."""
    images = _load_images(prompt["images"])
    if not prompt.get("as_video"):
        return {"image": images}
    import numpy as np

    sizes = {image.size for image in images}
    if len(sizes) > 1:
        raise ValueError(f"prompt {prompt['id']!r}: its video frames have {len(sizes)} sizes "
                         f"({', '.join(f'{w}x{h}' for w, h in sorted(sizes))}); a video's frames must share one "
                         f"size: resize them in the prompt suite")
    frames = np.stack([np.asarray(image) for image in images])
    metadata = {"fps": VIDEO_FPS, "total_num_frames": len(images), "frames_indices": list(range(len(images))),
                "duration": len(images) / VIDEO_FPS, "video_backend": "opencv"}
    return {"video": (frames, metadata)}


def _engine(request: dict[str, Any]) -> Any:
    """vLLM detects AWQ from quantization_config itself: passing quantization= would force a slower kernel.
    `compilation_config` (e.g. a CUDA-graph mode) is passed only when the request sets one: None keeps vLLM's."""
    from vllm import LLM

    options = {"compilation_config": request["compilation_config"]} if request.get("compilation_config") else {}
    if request.get("tensor_parallel_size", 1) > 1:  # 1 is vLLM's default: left unset, as before
        options["tensor_parallel_size"] = request["tensor_parallel_size"]
    return LLM(
        model=request["model"],
        trust_remote_code=request.get("trust_remote_code", True),
        max_model_len=request["max_model_len"],
        limit_mm_per_prompt={"image": max(1, request["max_images"]),
                             **({"video": request["max_videos"]} if request.get("max_videos") else {})},
        dtype=request["dtype"],
        seed=0,
        max_logprobs=request["top_k"],
        gpu_memory_utilization=request["gpu_memory_utilization"],
        enforce_eager=request["enforce_eager"],
        **options,
    )


def _parity_runs(llm: Any, request: dict[str, Any]) -> list[dict[str, Any]]:
    """Greedy decode of every prompt, then each prompt + continuation scored with prompt_logprobs.

    The continuation is the teacher's (the reference's greedy token ids) when the request has one for the
    prompt, else this variant's own greedy output: that is how the reference scores its own continuation in
    the same prefill code path as the candidate.
    """
    from vllm import SamplingParams

    tokenizer = llm.get_tokenizer()
    top_k = request["top_k"]
    prompts = request["prompts"]
    inputs = []
    for prompt in prompts:
        ids = _chat_token_ids(tokenizer, prompt["content"], request["placeholders"])
        item: dict[str, Any] = {"prompt_token_ids": ids}
        if prompt["images"]:
            item["multi_modal_data"] = _multi_modal_data(prompt)
        inputs.append(item)

    greedy = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], logprobs=top_k,
                            stop_token_ids=_stop_token_ids(tokenizer, request["stop_tokens"]))
    decoded = llm.generate(inputs, greedy, use_tqdm=False)

    teacher = request.get("teacher") or {}
    continuations = [teacher.get(p["id"], list(out.outputs[0].token_ids)) for p, out in zip(prompts, decoded)]
    scored_inputs = [{**item, "prompt_token_ids": item["prompt_token_ids"] + cont}
                     for item, cont in zip(inputs, continuations)]
    scoring = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=top_k)
    scored = llm.generate(scored_inputs, scoring, use_tqdm=False)

    runs = []
    for prompt, out, cont, forced in zip(prompts, decoded, continuations, scored):
        completion = out.outputs[0]
        n = len(cont)
        expanded = list(forced.prompt_token_ids)
        if n and expanded[-n:] != cont:
            raise RuntimeError(f"prompt {prompt['id']}: vLLM changed the teacher-forced continuation tokens")
        runs.append({
            "id": prompt["id"],
            "prompt_tokens": len(out.prompt_token_ids),
            "token_ids": list(completion.token_ids),
            "text": completion.text,
            "finish_reason": completion.finish_reason,
            "logprobs": [_position(p) for p in completion.logprobs or []],
            "forced_token_ids": cont,
            "forced_logprobs": [_position(p) for p in forced.prompt_logprobs[len(expanded) - n:]] if n else [],
        })
    return runs


def _speed(llm: Any, plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Prefill and decode throughput on random token prompts, per batch size (method: quantkit.verify.speed).

    Wall clock of `LLM.generate` over the whole batch, so it is what a user of the engine sees, scheduling
    included. `ignore_eos` alone fixes the length: min_tokens would add a logits processor to every step.
    """
    from vllm import SamplingParams

    rng = random.Random(0)
    prompt_len, decode_tokens, repeats = plan["prompt_len"], plan["decode_tokens"], plan["repeats"]
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    many = SamplingParams(temperature=0.0, max_tokens=decode_tokens + 1, ignore_eos=True)

    def fresh(batch: int) -> list[dict[str, list[int]]]:
        """Random prompts never seen before, so no prefix-cache hit shortens a timed prefill."""
        return [{"prompt_token_ids": [rng.randrange(1000, 30000) for _ in range(prompt_len)]}
                for _ in range(batch)]

    def timed(batch: int, params: Any) -> float:
        started = time.perf_counter()
        llm.generate(fresh(batch), params, use_tqdm=False)
        return time.perf_counter() - started

    rows = []
    for batch in plan["batches"]:
        timed(batch, one)  # warm-up of exactly the timed shapes; the long run's time is kept for the report
        warmup_s = timed(batch, many)
        prefill_s, total_s = [], []
        for _ in range(repeats):
            prefill_s.append(timed(batch, one))
            total_s.append(timed(batch, many))
        rows.append(speed_row(batch, prompt_len, decode_tokens, prefill_s, total_s, warmup_s))
    return rows


def run(request: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers
    import vllm
    from vllm.platforms import current_platform

    from quantkit import __version__
    from quantkit.verify import vllm_cpu_plugin

    started = time.perf_counter()
    llm = _engine(request)
    engine_start_s = time.perf_counter() - started
    cache_config = llm.llm_engine.vllm_config.cache_config
    model_config = llm.llm_engine.vllm_config.model_config
    result: dict[str, Any] = {
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "quantkit": __version__},
        "device": current_platform.device_name if current_platform.device_name != "cpu"
        else f"cpu ({os.cpu_count()} cores visible)",
        "gpu_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_fix_applied": vllm_cpu_plugin.is_applied(),
        "engine_start_s": engine_start_s,
        "kv_cache_tokens": cache_config.kv_cache_size_tokens,
        "max_model_len": model_config.max_model_len,
        "dtype": str(model_config.dtype).removeprefix("torch."),
        "quantization": model_config.quantization,
    }
    result["prompts"] = _parity_runs(llm, request) if request["prompts"] else []
    result["speed"] = _speed(llm, request["speed"]) if request.get("speed") else []
    return result


def main(argv: list[str]) -> int:
    request_path, result_path = Path(argv[0]), Path(argv[1])
    try:
        result = run(json.loads(request_path.read_text()))
        code = 0
    except Exception as err:  # noqa: BLE001 - any failure is the runner's to report, with its traceback
        result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        code = 1
    write_text_atomically(result_path, json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
