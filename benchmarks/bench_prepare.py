"""`scratchllm prepare` throughput (MB/s of UTF-8 text) with 1 and 2 worker processes.

    python benchmarks/bench_prepare.py              # GPT-2 tokenizer (from ../shared/data) and the
                                                    # built-in corpus
    python benchmarks/bench_prepare.py --repeats 3

Corpora: the built-in one (Python's docs, one document per topic) and ../shared/data/tinyshakespeare.txt
copied into 64 files (one document each, 72 MB in all), so there is enough work to split between workers.
The time is the whole `prepare` call: reading, tokenizing in worker processes, writing the memmap and
meta.json. The workers=1 and workers=2 runs alternate, best of `--repeats`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SCRATCHLLM_SHARED_DATA", REPO.parent / "shared" / "data"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--copies", type=int, default=64, help="copies of Tiny Shakespeare in the file corpus")
    args = p.parse_args()

    from scratchllm.text.gpt2 import load_gpt2_files
    from scratchllm.text.prepare import prepare

    tok = load_gpt2_files(DATA / "gpt2.tiktoken")
    print(
        f"machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d')}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        files = Path(tmp) / "files"
        files.mkdir()
        text = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")
        for i in range(args.copies):
            (files / f"part{i:03d}.txt").write_text(text, encoding="utf-8")
        corpora = {
            "builtin (Python docs)": ["builtin"],
            f"tinyshakespeare x {args.copies} files": [str(files)],
        }
        for name, corpus in corpora.items():
            best: dict[int, tuple[float, dict]] = {}
            for _ in range(args.repeats):
                for workers in (1, 2):
                    out = Path(tmp) / f"out{workers}"
                    t0 = time.perf_counter()
                    meta = prepare(corpus, tok, out, workers=workers, progress=False)
                    seconds = time.perf_counter() - t0
                    if workers not in best or seconds < best[workers][0]:
                        best[workers] = (seconds, meta)
                    shutil.rmtree(out)
            seconds1, meta = best[1]
            mb = sum(src["bytes"] for src in meta["sources"])
            tokens = meta["train_tokens"] + meta["val_tokens"]
            print(f"{name}: {mb / 1e6:.1f} MB, {tokens:,} tokens")
            for workers, (seconds, _) in sorted(best.items()):
                print(
                    f"  workers={workers}: {seconds:6.2f} s  {mb / 1e6 / seconds:6.2f} MB/s"
                    f"  ({seconds1 / seconds:.2f}x workers=1)"
                )


if __name__ == "__main__":
    main()
