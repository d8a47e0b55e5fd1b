"""`scratchllm generate`: continue prompts with a model directory or GPT-2, text to stdout, a summary
to stderr."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from ..config import setting
from ..device import pick_device
from ..errors import ScratchLLMError
from .config import SAMPLING_FLAGS, GenerationConfig, RuntimeSettings, resolve_dtype
from .engine import Engine


@dataclass
class GenerateSettings:
    """Continue one prompt (or several, as a batch) with a model directory or GPT-2. Greedy by default;
    --temperature > 0 samples. The text goes to stdout, a summary to stderr."""

    model: str = setting(
        "gpt2",
        "a model directory, or gpt2, gpt2-medium, gpt2-large, gpt2-xl (downloaded and converted on first "
        "use)",
        "model",
    )
    prompt: list[str] = setting(
        [],
        "the text to continue; `-` reads stdin; repeat for a batch",
        "generation",
        repeat=True,
        required=True,
        metavar="TEXT",
    )
    sampling: GenerationConfig = setting(
        GenerationConfig(max_new_tokens=100),
        "how tokens are chosen",
        only=(*SAMPLING_FLAGS, "stop", "ignore_eos"),
    )
    no_cache: bool = setting(False, "no KV cache (slower; for comparison)", "generation")
    stream: bool = setting(False, "print text as it is generated", "output")
    echo: bool = setting(False, "print the prompt before the generated text", "output")
    quiet: bool = setting(False, "no summary line on stderr", "output")
    runtime: RuntimeSettings = setting(RuntimeSettings(), "where and how the model runs")


def generate_command(settings: GenerateSettings) -> None:
    """Print the continuations of the prompts (streamed, for one), then a one-line summary on stderr."""
    cfg = settings.sampling.replace(use_cache=not settings.no_cache)
    prompts = [sys.stdin.read() if p == "-" else p for p in settings.prompt]
    if not prompts:  # a TOML file can leave it empty, which the flag cannot
        raise ScratchLLMError("give a prompt: --prompt TEXT (repeat for a batch; `-` reads stdin)")
    if settings.stream and len(prompts) > 1:
        raise ScratchLLMError("--stream takes one --prompt; leave it out to run several prompts as a batch")
    runtime = settings.runtime
    device = pick_device(runtime.device)
    engine = Engine.load(
        settings.model,
        device=str(device),
        dtype=resolve_dtype(runtime.dtype, device),
        compile=runtime.compile,
        quantize=runtime.quantize,
        draft_model=runtime.draft_model,
        draft_tokens=runtime.draft_tokens,
        draft_confidence=runtime.draft_confidence,
        draft_schedule=runtime.draft_schedule,
    )
    engine.warm_up()  # the summary's tokens/s then counts decoding, not a first build of the kernels
    start = time.perf_counter()
    if settings.stream:
        stream = engine.stream(prompts[0], cfg)
        if settings.echo:
            print(prompts[0], end="", flush=True)
        for piece in stream:
            print(piece, end="", flush=True)
        print()
        completions = [stream.completion] if stream.completion else []
    else:
        completions = engine.generate(prompts, cfg)
        for i, (prompt, c) in enumerate(zip(prompts, completions)):
            if len(prompts) > 1:
                print(f"{'' if i == 0 else chr(10)}--- {i + 1}/{len(prompts)}")
            print((prompt if settings.echo else "") + c.text)
    if not settings.quiet:
        seconds = time.perf_counter() - start
        n = sum(c.completion_tokens for c in completions)
        reasons = ", ".join(sorted({c.finish_reason for c in completions}))
        weights = runtime.quantize or str(next(engine.model.parameters()).dtype).removeprefix("torch.")
        draft = f"; {engine.last_speculation.describe()}" if engine.last_speculation else ""
        print(
            f"[{n} tokens in {seconds:.2f} s, {n / max(seconds, 1e-9):.1f} tokens/s, finish: {reasons}; "
            f"{device.type}, {weights}{draft}]",
            file=sys.stderr,
        )
