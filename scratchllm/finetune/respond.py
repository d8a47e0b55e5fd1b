"""`scratchllm respond`: answer every instruction of a file with an assistant, the book's chapter 7 way.

Each record's prompt is its instruction (and input) in the model's own template; prompts run in batches of
similar length through the generation engine, and each answer, cut from the completion by the template,
is added to a copy of its record as `model_response`. The records go to a JSON list, or JSON Lines.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..config import setting
from ..device import pick_device
from ..errors import ScratchLLMError
from ..fileio import atomic_write_text, check_output_file
from ..generation import SAMPLING_FLAGS, Completion, Engine, GenerationConfig, RuntimeSettings, resolve_dtype
from ..hub import load_model
from ..text.templates import get_template, template_for_model, template_names
from .instruct import Entry, load_instruction_data

RESPONSE_KEY = "model_response"  # the field `respond` adds, as in the book


@dataclass
class RespondSettings:
    """Run each {instruction, input} record of --data (JSON list or JSONL) through the model, batched and
    greedy by default, and write the records with a `model_response` field to --out (JSON, or JSONL for
    a .jsonl name). The prompt template is the one stored with the model."""

    model: str = setting(
        "", "an assistant model directory (from `finetune instruct`)", "model", required=True
    )
    data: str = setting(
        "", "instruction records (.json list or .jsonl)", "data", required=True, metavar="FILE"
    )
    out: str = setting("", "where to write the records with responses", "data", required=True, metavar="FILE")
    template: str | None = setting(
        None,
        "prompt template (default: the model's own, else alpaca)",
        "generation",
        choices=tuple(template_names()),
    )
    sampling: GenerationConfig = setting(
        GenerationConfig(max_new_tokens=256),
        "how tokens are chosen",
        only=SAMPLING_FLAGS,
    )
    batch_size: int = setting(8, "prompts generated together", "generation")
    runtime: RuntimeSettings = setting(
        RuntimeSettings(), "where and how the model runs", only=("device", "dtype", "quantize")
    )
    quiet: bool = setting(False, "no progress bar or summary", "output")


def respond_command(settings: RespondSettings) -> None:
    """`scratchllm respond`: answer the records of --data into --out."""
    runtime = settings.runtime
    respond(
        settings.model,
        settings.data,
        settings.out,
        template=settings.template,
        config=settings.sampling,
        batch_size=settings.batch_size,
        device=runtime.device,
        dtype=runtime.dtype,
        progress=not settings.quiet,
        quantize=runtime.quantize,
    )


def respond(
    model: str,
    data: str | Path | Sequence[Mapping[str, Any]],
    out: str | Path | None = None,
    *,
    template: str | None = None,
    config: GenerationConfig | None = None,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = True,
    key: str = RESPONSE_KEY,
    quantize: str | None = None,
) -> list[Entry]:
    """Answer every instruction of `data` (a file or records) with `model` (a model directory, or an
    `Engine`-ready hub name), adding `key` ("model_response") to a copy of each record. Prompts use
    the model's own template (`extra["prompt_template"]`) unless `template` names one; they run in
    batches of similar length through the generation engine. `config`: how tokens are chosen (default:
    greedy, 256 tokens at most); the template's stop strings are added to its own. Written atomically
    to `out` (a JSON list, or JSONL when it ends in .jsonl) when given. `quantize` "int4": int4 weights
    (CPU only)."""
    if out is not None:
        check_output_file(out, inputs={"--data": data}, writable=True)
    records = (
        load_instruction_data(data, require_output=False) if isinstance(data, (str, Path)) else list(data)
    )
    if batch_size < 1:
        raise ScratchLLMError(f"--batch-size must be >= 1, got {batch_size}")
    gen = config if config is not None else GenerationConfig()
    if not isinstance(gen, GenerationConfig):
        raise ScratchLLMError(f"config must be a GenerationConfig, got {type(gen).__name__}")
    dev = pick_device(device)
    loaded = load_model(model, device=str(dev), dtype=resolve_dtype(dtype, dev), quantize=quantize)
    if loaded.tokenizer is None:
        raise ScratchLLMError(f"model {model!r} has no tokenizer files; save the model with its tokenizer")
    tokenizer = loaded.tokenizer
    chosen = (
        get_template(template, tokenizer)
        if template
        else template_for_model(loaded.extra, tokenizer=tokenizer)
    )
    prompts = [chosen.format_example(r)[0] for r in records]
    start = time.perf_counter()
    completions = _generate_in_batches(
        Engine(loaded.model, tokenizer, allowed_special=chosen.allowed_special),
        prompts,
        gen.replace(stop=tuple(dict.fromkeys((*gen.stop, *chosen.stop_strings)))),
        batch_size,
        progress,
    )
    generated = sum(c.completion_tokens for c in completions)
    results = [{**r, key: chosen.extract_response(c.text)} for r, c in zip(records, completions)]
    if out is not None:
        _write_records(Path(out), results)
    if progress:
        seconds = time.perf_counter() - start
        print(
            f"{len(results)} responses ({generated:,} tokens, {generated / max(seconds, 1e-9):,.1f} "
            f"tokens/s, template {chosen.name})" + (f" -> {out}" if out is not None else "")
        )
    return results


def _generate_in_batches(
    engine: Engine, prompts: list[str], gen: GenerationConfig, batch_size: int, progress: bool
) -> list[Completion]:
    """The completion of every prompt, in their order, generated `batch_size` prompts at a time."""
    lengths = [len(ids) for ids in engine.tokenizer.encode_batch(prompts)]
    # similar lengths together: less left padding per batch (the results do not depend on it)
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    completions: dict[int, Completion] = {}
    with tqdm(
        total=len(prompts), desc="respond", unit="entry", dynamic_ncols=True, disable=not progress
    ) as bar:
        for b in range(0, len(order), batch_size):
            rows = order[b : b + batch_size]
            for i, completion in zip(rows, engine.generate([prompts[i] for i in rows], gen)):
                completions[i] = completion
            bar.update(len(rows))
    return [completions[i] for i in range(len(prompts))]


def _write_records(path: Path, records: list[Entry]) -> None:
    if path.suffix.lower() == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    else:
        text = json.dumps(records, indent=4, ensure_ascii=False) + "\n"  # the book's layout
    atomic_write_text(path, text)
