"""Webdataset shards in the img2dataset layout: writing them deterministically, finding and reading them.

A dataset folder holds ``train/*.tar``, ``val/*.tar`` and ``info.json``. Each tar holds samples as
consecutive members ``KEY.png`` (or ``.jpg``/``.webp``) + ``KEY.txt`` (caption) + ``KEY.json`` (metadata);
the key is the member name up to its first dot, as in webdataset and img2dataset.

Writers here produce byte-identical shards for the same content (fixed mtime/owner/mode, sorted
members), and every shard is written atomically (temp file + rename), so an interrupted build never
leaves a half shard that later reads as data.
"""

from __future__ import annotations

import glob
import io
import json
import mmap
import multiprocessing
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from ldm.io import atomic_write_bytes, write_json

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
SHARD_PATTERN = "*.tar"
Sample = tuple[str, dict[str, bytes]]  # (key, {extension: bytes})


def shard_name(split: str, index: int) -> str:
    """File name of shard ``index`` of ``split`` (``train-00007.tar``)."""
    return f"{split}-{index:05d}.tar"


def plan_shards(count: int, shard_size: int) -> list[tuple[int, int]]:
    """Split ``range(count)`` into consecutive ``[start, end)`` ranges of at most ``shard_size`` samples."""
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    return [(start, min(start + shard_size, count)) for start in range(0, count, shard_size)]


def _ustar_header(name: bytes, size: int) -> bytes:
    """A POSIX ustar header for a regular file: mode 644, owner 0:0, mtime 0 (so builds are byte-identical)."""
    header = bytearray(512)
    header[0:len(name)] = name
    header[100:108] = b"0000644\0"
    header[108:116] = b"0000000\0"
    header[116:124] = b"0000000\0"
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"00000000000\0"
    header[156:157] = b"0"
    header[257:265] = b"ustar\x0000"
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def tar_bytes(samples: Iterable[Sample]) -> bytes:
    """A tar archive (as bytes) of the samples, members in (key, extension) order, fully deterministic.

    Plain ustar headers (what ``tarfile`` writes for short ASCII names, several times faster); names over
    100 bytes or non-ASCII go through ``tarfile`` (PAX headers).
    """
    samples = list(samples)
    members = []
    for key, files in samples:
        if "." in Path(key).name:
            raise ValueError(f"sample key {key!r} contains a dot; the key is the name up to the first dot")
        members += [(f"{key}.{ext}", files[ext]) for ext in sorted(files)]
    if not all(len(name) <= 100 and name.isascii() for name, _ in members):
        return _tarfile_bytes(members)
    chunks = []
    for name, data in members:
        chunks += [_ustar_header(name.encode("ascii"), len(data)), data, bytes(-len(data) % 512)]
    chunks.append(bytes(1024))  # end-of-archive: two zero blocks
    archive = b"".join(chunks)
    return archive + bytes(-len(archive) % tarfile.RECORDSIZE)


def _tarfile_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_shard(path: str | os.PathLike, samples: Iterable[Sample]) -> int:
    """Write ``samples`` to the tar ``path`` atomically; returns the number of samples written."""
    samples = list(samples)
    atomic_write_bytes(path, tar_bytes(samples))
    return len(samples)


def encode_sample(image_png: bytes, caption: str, meta: dict[str, Any]) -> dict[str, bytes]:
    """The three files of one sample: ``png`` + ``txt`` (UTF-8) + ``json`` (sorted keys, compact)."""
    return {"png": image_png, "txt": caption.encode("utf-8"),
            "json": json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")}


def clear_split(out_dir: str | os.PathLike, split: str) -> Path:
    """Create ``out_dir/split`` and delete shards a previous build left there (``split-NNNNN.tar``)."""
    folder = Path(out_dir) / split
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"{split}-*.tar"):
        if re.fullmatch(rf"{re.escape(split)}-\d{{5}}\.tar", old.name):
            old.unlink()
    return folder


def run_parallel(fn: Callable[[Any], Any], tasks: Sequence[Any], processes: int | None = None) -> list[Any]:
    """``[fn(t) for t in tasks]`` over a process pool (results in task order); ``processes=1`` runs inline."""
    processes = processes or os.cpu_count() or 1
    processes = max(1, min(processes, len(tasks)))
    if processes == 1:
        return [fn(t) for t in tasks]
    with multiprocessing.get_context("fork" if os.name == "posix" else "spawn").Pool(processes) as pool:
        return list(pool.imap(fn, tasks, chunksize=1))


def write_info(out_dir: str | os.PathLike, info: dict[str, Any]) -> Path:
    """Write ``info.json`` (counts, resolution, source, license, generator) into the dataset folder."""
    path = Path(out_dir) / "info.json"
    write_json(path, info)
    return path


def read_info(data_dir: str | os.PathLike) -> dict[str, Any]:
    """``info.json`` of a dataset folder, or ``{}`` when it has none (a plain img2dataset download)."""
    path = Path(data_dir) / "info.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


_GLOB_CHARS = re.compile(r"[*?\[{]")


def _expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` / ``{a,b}.tar`` brace expansion (webdataset's URL syntax)."""
    from webdataset.shardlists import expand_urls

    return list(expand_urls(pattern))


def list_shards(source: str | os.PathLike, split: str | None = None) -> list[str]:
    """Sorted shard paths for ``split`` of ``source``; a clear error when nothing matches.

    ``source`` is a dataset folder (shards in ``source/split/*.tar``; a folder of shards without split
    sub-folders, as img2dataset writes, is used for the ``train`` split), a single ``.tar`` file, or a
    glob / brace pattern (``data/{00000..00009}.tar``, ``data/*.tar``). ``pipe:`` and URLs pass through.
    """
    source = str(source)
    if source.startswith("pipe:") or "://" in source:
        return _expand_braces(source)
    if _GLOB_CHARS.search(source):
        paths = sorted({p for pattern in _expand_braces(source) for p in glob.glob(pattern)})
        if not paths:
            raise FileNotFoundError(f"no shard matches the pattern {source!r}; check --data.data_dir")
        return paths
    path = Path(source)
    if path.is_file():
        return [str(path)]
    if not path.is_dir():
        raise FileNotFoundError(f"dataset folder {path} does not exist; build one with "
                                f"`ldm data shapes --out {path}` (or `make data`) or fix --data.data_dir")
    folder = path / split if split else path
    if split and not folder.is_dir():
        flat = sorted(str(p) for p in path.glob(SHARD_PATTERN))
        if split == "train" and flat:
            return flat
        raise FileNotFoundError(f"{path} has no {split}/ folder (expected {folder}/*.tar next to info.json)")
    shards = sorted(str(p) for p in folder.glob(SHARD_PATTERN))
    if not shards:
        raise FileNotFoundError(f"no shards in {folder}: expected {folder}/*.tar "
                                f"(build with `ldm data shapes --out {path}`)")
    return shards


def _open(url: str):
    if url.startswith("pipe:") or "://" in url:
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    return open(url, "rb")


def split_key(name: str) -> tuple[str, str]:
    """``dir/000123.seg.png`` -> (``dir/000123``, ``seg.png``): key up to the first dot of the file name."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _pax_path(payload: bytes) -> str | None:
    for record in payload.split(b"\n"):
        _, _, kv = record.partition(b" ")
        key, _, value = kv.partition(b"=")
        if key == b"path":
            return value.decode("utf-8")
    return None


def tar_members(data) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files in an in-memory/mmapped plain tar, in order.

    A minimal ustar/GNU/pax reader (several times faster than ``tarfile`` for many small members).
    Header checksums are verified; a bad checksum or a member cut short raises ``tarfile.ReadError``.
    """
    pos, end, long_name = 0, len(data), None
    while pos + 512 <= end:
        header = bytes(data[pos:pos + 512])
        if header == _ZERO_BLOCK:
            return
        stored = _octal(header[148:156])
        if stored != sum(header) - sum(header[148:156]) + 8 * 32:
            raise tarfile.ReadError(f"bad tar header checksum at byte {pos}")
        size, kind = _octal(header[124:136]), header[156:157]
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", errors="replace")
        prefix = header[345:500].split(b"\0", 1)[0]
        if header[257:262] == b"ustar" and prefix:
            name = prefix.decode("utf-8", errors="replace") + "/" + name
        pos += 512
        if pos + size > end:
            raise tarfile.ReadError(f"unexpected end of data: member {name!r} needs {size} bytes at byte {pos}, "
                                    f"the file has {end - pos}")
        payload = data[pos:pos + size]
        pos += (size + 511) // 512 * 512
        if kind == b"L":
            long_name = bytes(payload).split(b"\0", 1)[0].decode("utf-8", errors="replace")
        elif kind == b"x":
            long_name = _pax_path(bytes(payload)) or long_name
        elif kind in (b"0", b"\0", b"7"):
            yield (long_name or name), bytes(payload)
            long_name = None
        else:
            long_name = None  # directories, links, global pax headers: nothing to read
    if pos < end and any(data[pos:end]):
        raise tarfile.ReadError(f"unexpected end of data: {end - pos} stray bytes at byte {pos}")


_ZERO_BLOCK = bytes(512)


def _members(url: str) -> Iterator[tuple[str, bytes]]:
    if url.endswith(".tar") and not (url.startswith("pipe:") or "://" in url):
        with open(url, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise tarfile.ReadError(f"{url} is empty")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                yield from tar_members(data)
        return
    with _open(url) as f, tarfile.open(fileobj=f, mode="r|*") as tar:  # .tar.gz, pipes, URLs
        for member in tar:
            if member.isfile():
                yield member.name, tar.extractfile(member).read()


def read_shard(url: str) -> Iterator[Sample]:
    """Yield ``(key, {ext: bytes})`` for each complete sample of one tar shard, in file order.

    Local ``.tar`` files are memory-mapped and parsed directly; ``.tar.gz``, ``pipe:`` and URLs stream
    through ``tarfile``. A corrupt or truncated archive raises ``tarfile.ReadError``/``OSError`` after
    the samples read before the damage; the caller decides whether to skip (see ``ldm.data.webdata``).
    """
    key, files = None, {}
    for name, data in _members(url):
        name_key, ext = split_key(name)
        if name_key.rpartition("/")[2].startswith("__"):
            continue  # webdataset metadata members (__index__ and the like)
        if name_key != key:
            if key is not None:
                yield key, files
            key, files = name_key, {}
        files[ext] = data
    if key is not None:
        yield key, files


def iter_samples(urls: Iterable[str]) -> Iterator[Sample]:
    """All samples of several shards in order (no error handling: for builders and tests)."""
    for url in urls:
        yield from read_shard(url)
