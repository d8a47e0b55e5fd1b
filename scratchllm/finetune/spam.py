"""The SMS Spam Collection (UCI dataset 228), the book's chapter 6 classification data.

`spam_file()` finds the file: the cache under scratchllm's home (`$SCRATCHLLM_HOME/data/`), else a
download of the UCI zip (a backup URL when the first fails), whose `SMSSpamCollection` member is
checked against its known SHA-256 before it is cached. Offline, pass a local copy as `--data PATH`.

The file is `label<TAB>text` per line with no header; some texts hold unbalanced `"` characters, so
it is read line by line with quotes kept as text: all 5,574 messages (4,827 ham, 747 spam) survive,
where a CSV reader that honours quotes (pandas' default, as in the book) merges a few into 5,572.

`book_splits` builds the book's data: all 747 spam plus 747 ham drawn at random, shuffled and cut
70/10/20 into train/validation/test (1,045 / 149 / 300), with the book's seed 123.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from ..errors import ScratchLLMError
from ..fileio import atomic_write_bytes
from ..hub import home_dir
from .data import Example, balance_classes, split_by_fractions

URLS = (
    "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
    # the book's mirror of the same zip, for when UCI is down
    "https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip",
)
MEMBER = "SMSSpamCollection"
SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
N_MESSAGES = 5574
BOOK_SEED = 123
BOOK_FRACTIONS = (0.7, 0.1, 0.2)


def cache_path() -> Path:
    return home_dir() / "data" / "sms_spam" / MEMBER


def is_spam_file(path: str | os.PathLike) -> bool:
    """A local copy of the collection: by its name (`SMSSpamCollection`, `.tsv` or not) or its bytes."""
    path = Path(path)
    if path.name.startswith(MEMBER):
        return True
    try:
        return path.is_file() and path.stat().st_size < 10_000_000 and _sha256(path.read_bytes()) == SHA256
    except OSError:
        return False


def spam_file(download: bool = True, timeout: float = 60.0) -> Path:
    """The cached collection, downloading it first if needed (and allowed)."""
    path = cache_path()
    if path.is_file() and _sha256(path.read_bytes()) == SHA256:
        return path
    if not download:
        raise ScratchLLMError(
            f"the SMS Spam Collection is not in the cache ({path}); pass --data PATH to a local copy"
        )
    errors = []
    for url in URLS:
        try:
            data = _extract(_fetch(url, timeout), url)
        except ScratchLLMError as e:
            errors.append(str(e))
            continue
        atomic_write_bytes(path, data)
        return path
    raise ScratchLLMError(
        "could not download the SMS Spam Collection (" + "; ".join(errors) + "); without a network, "
        "download sms+spam+collection.zip elsewhere and pass --data PATH/SMSSpamCollection"
    )


def _fetch(url: str, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # TimeoutError is an OSError
        raise ScratchLLMError(f"{url}: {getattr(e, 'reason', e)}") from e


def _extract(zipped: bytes, url: str) -> bytes:
    try:
        with zipfile.ZipFile(io.BytesIO(zipped)) as z:
            data = z.read(MEMBER)
    except (zipfile.BadZipFile, KeyError) as e:
        raise ScratchLLMError(f"{url}: not the expected zip ({e})") from e
    digest = _sha256(data)
    if digest != SHA256:
        raise ScratchLLMError(f"{url}: {MEMBER} has SHA-256 {digest[:16]}..., expected {SHA256[:16]}...")
    return data


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


LABELS = ("ham", "spam")
OTHER_DATA = (
    "for data of your own, use a .csv/.tsv/.jsonl file not named SMSSpamCollection (text and label columns)"
)


def read_spam(path: str | os.PathLike) -> list[Example]:
    """Every message of the collection, in file order (labels `ham` / `spam`). A line that is not
    `ham<TAB>text` or `spam<TAB>text`, or a file without both classes, is an error naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8").removeprefix("\ufeff")  # a byte-order mark is not a label
    except FileNotFoundError:
        raise ScratchLLMError(f"data file {path} does not exist") from None
    except IsADirectoryError:
        raise ScratchLLMError(f"data file {path} is a directory; give the SMSSpamCollection file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ScratchLLMError(f"cannot read {path} as UTF-8 text: {e}") from e
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        label, tab, message = line.partition("\t")
        label = label.strip()
        if not tab or not message.strip():
            raise ScratchLLMError(f"{path}:{n}: expected `label<TAB>text`; is this the SMS Spam Collection?")
        if label not in LABELS:
            found = f"label {label!r}" if label else "no label before the tab"
            raise ScratchLLMError(
                f"{path}:{n}: {found}; the SMS Spam Collection labels each message ham or spam: fix the line "
                f"({OTHER_DATA})"
            )
        out.append(Example(message, label, f"{path}:{n}"))
    missing = [name for name in LABELS if not any(e.label == name for e in out)]
    if missing:
        has = f"only {LABELS[1 - LABELS.index(missing[0])]} messages" if out else "no messages"
        raise ScratchLLMError(
            f"{path} has {has}; the SMS Spam Collection has ham and spam messages, one `label<TAB>text` per "
            "line: pass the whole file, or --data spam to download it"
        )
    return out


def book_splits(
    examples: list[Example],
    seed: int = BOOK_SEED,
    fractions: tuple[float, float, float] = BOOK_FRACTIONS,
    balance: bool = True,
) -> tuple[list[Example], list[Example], list[Example]]:
    """The book's procedure: balance the classes (all spam, as many random ham), shuffle, cut 70/10/20.

    Both random steps draw from a fresh `RandomState(seed)`, as pandas' `sample(random_state=123)`
    does in the book's code."""
    data = balance_classes(examples, seed) if balance else list(examples)
    return split_by_fractions(data, fractions, seed)
