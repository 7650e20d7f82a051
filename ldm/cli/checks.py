"""Flag checks shared by the ``ldm`` subcommands: each fails with one line naming the flag (a UsageError).

Number checks are argparse ``type=`` converters, so a bad value stops the command while it parses, before
anything is loaded; path checks run first thing in a command's ``run``. Nothing here does work of its own:
where the library already knows what a valid input is (a shard folder, say) the check calls it and only
turns its exception into one that names the flag.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable
from pathlib import Path

from ldm.errors import UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = f"int>={minimum}"
    return parse


def float_in(low: float = -math.inf, high: float = math.inf, high_open: bool = False) -> Callable[[str], float]:
    """argparse type: a finite float in ``[low, high]`` (``[low, high)`` with ``high_open``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or value > high or (high_open and value == high):
            bounds = f"[{low:g}, {high:g}{')' if high_open else ']'}" if math.isfinite(high) else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"must be a finite number {'in ' if math.isfinite(high) else ''}"
                                             f"{bounds}, got {text}")
        return value
    parse.__name__ = "float"
    return parse


def comma_list(item: Callable[[str], object]) -> Callable[[str], list]:
    """argparse type: a comma-separated list of ``item`` values (at least one)."""
    def parse(text: str) -> list:
        values = [item(v) for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        return values
    parse.__name__ = "list"
    return parse


def one_of(flag: str, values: Iterable[str], allowed: Iterable[str]) -> None:
    """Every value is among ``allowed``."""
    allowed = list(allowed)
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise UsageError(f"{flag}: unknown {', '.join(map(repr, unknown))}; choose from {allowed}")


def existing_file(flag: str, path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{flag} {path}: {'is a folder, not a file' if path.is_dir() else 'no such file'}")
    return path


def existing_dir(flag: str, path: str | Path, what: str = "folder") -> Path:
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"{flag} {path}: {'is a file, not a ' + what if path.exists() else 'no such ' + what}")
    return path


def output_dir(flag: str, path: str | Path) -> Path:
    """A folder to write into: absent (it will be made) or a folder, never an existing file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file; give a folder to write into")
    return path


def output_file(flag: str, path: str | Path, suffixes: tuple[str, ...] | None = None) -> Path:
    """A file to write: not a folder, with one of ``suffixes`` (lower-case, with the dot) when given."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name")
    if suffixes and path.suffix.lower() not in suffixes:
        raise UsageError(f"{flag} {path}: the file name must end in one of {', '.join(suffixes)}")
    return path


def torch_device(flag: str, name: str | None) -> str:
    """``name`` (default: cuda if available, else cpu), checked to be a device torch has here."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"{flag} {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{flag} {name}: CUDA is not available on this machine; use --device cpu")
    return name


def shard_dataset(flag: str, data_dir: str | Path, splits: Iterable[str]) -> None:
    """``data_dir`` holds shards of every split (checked by the loader's own ``list_shards``)."""
    from ldm.data.shards import list_shards

    for split in splits:
        try:
            list_shards(data_dir, split)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"{flag}: {e}") from e


def lora_adapters(flag: str, values: Iterable[str] | None) -> list[tuple[str, float]]:
    """``PATH[:SCALE]`` values of a LoRA flag as (path, scale); each PATH an adapter folder or .safetensors file."""
    from ldm.lora import WEIGHTS_NAME, parse_lora_argument

    out = []
    for text in values or []:
        try:
            path, scale = parse_lora_argument(text)
        except UsageError as e:
            raise UsageError(f"{flag} {text!r}: give PATH or PATH:SCALE with a number as SCALE") from e
        p = Path(path)
        if not (p.is_file() or (p / WEIGHTS_NAME).is_file()):
            what = f"has no {WEIGHTS_NAME}" if p.is_dir() else "no such adapter folder or file"
            raise UsageError(f"{flag} {path}: {what} (an adapter written by `ldm export` of a lora run)")
        out.append((path, scale))
    return out
