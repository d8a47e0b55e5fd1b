"""Tokenizer benchmarks, one run, ratios included:

1. BPE training on tinyshakespeare.txt at vocab 8192: our pure-Python trainer against Hugging Face
   `tokenizers`' BpeTrainer (Rust, byte-level pre-tokenizer, same vocab size). Goal: <= 4x its time.
2. Encoding throughput (MB/s of UTF-8 text) with an own-trained vocabulary and with GPT-2's, through
   `BPETokenizer.encode`, against tiktoken's `gpt2` Encoding built from gpt2.tiktoken (offline) on the
   same text. Goal: >= 0.9x. Also `encode_batch`, and the pure-Python reference encoder for scale.

Usage: python benchmarks/bench_tokenizer.py [--data DIR] [--repeats N]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def best_times(fns: dict, repeats: int) -> dict[str, float]:
    """The best of `repeats` runs of each function, run in rotation (A B C A B C ...) so that a
    change in machine load during the run hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(ts) for name, ts in times.items()}


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, load average {load}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", default=str(REPO.parent / "shared" / "data"), help="folder with the data files"
    )
    parser.add_argument("--repeats", type=int, default=5, help="runs per measurement; the best is reported")
    args = parser.parse_args()
    data = Path(args.data)
    needed = ["tinyshakespeare.txt", "gpt2.tiktoken"]
    if not all((data / n).exists() for n in needed):
        sys.exit(f"need {', '.join(needed)} in {data} (pass --data DIR)")

    import tiktoken
    import tokenizers
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from scratchllm.text.bpe import train_bpe
    from scratchllm.text.gpt2 import load_gpt2_files

    text = (data / "tinyshakespeare.txt").read_text(encoding="utf-8")
    n_mb = len(text.encode("utf-8")) / 1e6
    vocab_size = 8192
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {machine()}")
    print(f"versions: tiktoken {tiktoken.__version__}, tokenizers {tokenizers.__version__}")
    print(f"text: tinyshakespeare.txt, {n_mb:.2f} MB; best of {args.repeats} runs\n")

    # -- 1. training ---------------------------------------------------------------------------
    def train_ours():
        return train_bpe([text], vocab_size, progress=False, name="shakespeare")

    def train_hf():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator([text], trainer=trainer)
        return tok

    ours = train_ours()
    hf = train_hf()
    assert ours.vocab_size == hf.get_vocab_size() == vocab_size
    t = best_times({"ours": train_ours, "hf": train_hf}, args.repeats)
    print(f"BPE training, vocab {vocab_size}")
    print(f"  scratchllm train_bpe (pure Python)   {t['ours']:6.2f} s")
    print(f"  HF tokenizers BpeTrainer (Rust)      {t['hf']:6.2f} s")
    print(f"  ratio ours / HF                      {t['ours'] / t['hf']:6.2f}x   (goal <= 4x)\n")

    # -- 2. encoding ---------------------------------------------------------------------------
    gpt2_ours = load_gpt2_files(data / "gpt2.tiktoken")
    gpt2_tiktoken = tiktoken.Encoding(
        "gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=load_tiktoken_bpe(str(data / "gpt2.tiktoken")),
        special_tokens={"<|endoftext|>": 50256},
    )
    assert gpt2_ours.encode(text) == gpt2_tiktoken.encode_ordinary(text)

    def report(title: str, fns: dict, unit: str) -> None:
        t = best_times(fns, args.repeats)
        base = n_mb / t[next(iter(fns))]
        print(title)
        for label, seconds in t.items():
            print(f"  {label:<44} {n_mb / seconds:7.2f}   {n_mb / seconds / base:5.2f}x {unit}")

    report(
        "Encoding the whole text in one call (MB/s)",
        {
            "tiktoken gpt2 Encoding.encode_ordinary": lambda: gpt2_tiktoken.encode_ordinary(text),
            "BPETokenizer.encode, GPT-2 vocabulary": lambda: gpt2_ours.encode(text),
            "BPETokenizer.encode, own vocab 8192": lambda: ours.encode(text),
        },
        "tiktoken",
    )
    # many documents: the text cut at blank lines (~7k speeches), as `prepare` would see a corpus
    docs = [d for d in text.split("\n\n") if d]
    report(
        f"\nEncoding {len(docs):,} documents (MB/s)",
        {
            "tiktoken gpt2 encode_ordinary_batch": lambda: gpt2_tiktoken.encode_ordinary_batch(docs),
            "tiktoken gpt2 encode_ordinary, doc by doc": lambda: [
                gpt2_tiktoken.encode_ordinary(d) for d in docs
            ],
            "BPETokenizer.encode_batch, GPT-2 vocabulary": lambda: gpt2_ours.encode_batch(docs),
            "BPETokenizer.encode_batch, own vocab 8192": lambda: ours.encode_batch(docs),
            "BPETokenizer.encode, doc by doc, GPT-2": lambda: [gpt2_ours.encode(d) for d in docs],
        },
        "tiktoken batch",
    )

    sample = text[:100_000]
    start = time.perf_counter()
    gpt2_ours.reference_encode(sample)
    ref = len(sample.encode("utf-8")) / 1e6 / (time.perf_counter() - start)
    print(f"\n  reference_encode (pure Python), GPT-2: {ref:.2f} MB/s")

    per_token = statistics.mean(len(d.encode("utf-8")) for d in docs) / statistics.mean(
        len(ids) for ids in gpt2_ours.encode_batch(docs)
    )
    print(f"  compression: GPT-2 {per_token:.2f} bytes/token per document average; own vocab ", end="")
    print(f"{len(text.encode('utf-8')) / len(ours.encode(text)):.2f} bytes/token on the whole text")


if __name__ == "__main__":
    main()
