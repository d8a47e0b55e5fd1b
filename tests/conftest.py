"""Shared fixtures. Real data lives in ../shared/data beside the checkout (or $SCRATCHLLM_SHARED_DATA);
tests that need it skip with a reason when it is absent, as on a user's fresh clone."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from scratchllm.device import CPU_BF16_ENV

# every `auto` precision takes the fp32 paths, whatever this CPU has (subprocesses inherit it);
# tests of the bf16 paths force them with the `auto_picks_bf16` fixture
os.environ[CPU_BF16_ENV] = "0"

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SCRATCHLLM_SHARED_DATA", REPO.parent / "shared" / "data"))


def require_transformers():
    """The `transformers` module, or skip: not installed, or too new for this torch (transformers 5
    imports without its models below torch 2.6)."""
    transformers = pytest.importorskip("transformers")
    from transformers.utils import is_torch_available

    if not is_torch_available():
        pytest.skip(
            f"transformers {transformers.__version__} does not run with torch {torch.__version__}; "
            "install an older transformers (e.g. 4.57) or a newer torch",
            allow_module_level=True,
        )
    return transformers


def has_fully_shard() -> bool:
    """Whether this torch has FSDP2's public `fully_shard` (torch 2.6 and newer), which --fsdp uses."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def shared_file(name: str) -> Path:
    """Path of a file in shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(
            f"{name} not found in {SHARED_DATA} (real data beside the checkout; set SCRATCHLLM_SHARED_DATA)"
        )
    return path


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (set SCRATCHLLM_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
    yield


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Tiny models gain nothing from a second thread, and on a busy machine OpenMP threads waiting for a
    core make them several times slower (see benchmarks/RESULTS.md, Serving)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """`single_thread` for a whole test module: `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    with single_thread():
        yield


@pytest.fixture(params=[False, True], ids=["auto-fp32", "auto-bf16"])
def auto_picks_bf16(request, monkeypatch) -> bool:
    """Runs a test down both paths of the `auto` precision choices (the CPU's bf16 detection), whatever
    this machine's CPU would pick."""
    monkeypatch.setenv(CPU_BF16_ENV, "1" if request.param else "0")
    return request.param


def exit_code(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """The exit code of a command line that is refused: argparse's (it exits) or ours (returned)."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)
