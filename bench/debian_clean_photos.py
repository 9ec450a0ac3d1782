"""Extra clean photos for training the watermark CNN: desktop wallpapers from Debian's archive.

Why: the CNN learns "mark versus picture" from the clean photos it is given, and with only the
50 training photos of ../shared it generalised to unseen photos far worse than to its own
(calibration AUROC 0.963 against 0.916 held out). These packages add about a hundred varied,
licence-clean pictures (nature photos and desktop art) from sources other than ../shared's, so
``evaluate`` on ../shared stays a test on photos of sources the network never saw.

    python bench/debian_clean_photos.py --out /tmp/debian-clean
    mining watermark finetune --clean ../shared/data/photos --holdout 0.5 --extra-clean /tmp/debian-clean

Pictures carrying a logo or text (sway's, MATE's branding set, Ubuntu Kylin's) are left out:
as clean examples they would teach the network that marks are clean. So are blank
transparent PNGs.

``--gcompris DIR`` adds about a hundred real photos (animals, monuments, underwater scenes,
concerts, a few paintings) from the educational suite's data package, gcompris-qt-data. They
sit inside Qt resource bundles (.rcc), stored uncompressed, so each WEBP or JPEG is cut out by
its own length header or end marker. Only the bundles of photographs are read: the cartoon
bundles (lang, babyshapes) would teach drawn art, and those with text (money, geography) marks.
Keep the two folders apart: ``finetune`` splits calibration photos per folder.

    python bench/debian_clean_photos.py --out /tmp/debian-clean --gcompris /tmp/gcompris-clean
    mining watermark finetune ... --extra-clean /tmp/debian-clean --extra-clean /tmp/gcompris-clean
"""
from __future__ import annotations

import argparse
import functools
import io
import struct
import subprocess
import tempfile
from pathlib import Path

from PIL import Image

PACKAGES = ("gnome-backgrounds", "lomiri-wallpapers", "lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04",
            "mate-backgrounds", "plasma-workspace-wallpapers", "ukui-wallpapers")
EXCLUDE = ("/mate/desktop/", "ubuntukylin", "Transparent", "/Silk.png", "/screenshot")
SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
GCOMPRIS_PACKAGE = "gcompris-qt-data"
GCOMPRIS_BUNDLES = ("clickgame", "details", "erase", "explore_farm_animals", "explore_monuments",
                    "explore_world_animals", "explore_world_music")


def unpack(packages: tuple[str, ...], tmp: Path) -> Path:
    """Download ``packages`` from the archive (no install) and unpack them under ``tmp``/root."""
    debs, root = tmp / "debs", tmp / "root"
    debs.mkdir()
    subprocess.run(["apt-get", "download", *packages], cwd=debs, check=True, capture_output=True)
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def fetch(out: Path, min_bytes: int = 100_000, max_side: int = 2048) -> list[Path]:
    """Download and unpack the packages (no install), then write each usable picture as JPEG."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(prefix="debian-clean-") as tmp:
        root = unpack(PACKAGES, Path(tmp))
        for src in sorted(root.rglob("*")):
            rel = "/" + str(src.relative_to(root))
            if (src.suffix.lower() not in SUFFIXES or src.stat().st_size < min_bytes
                    or any(x in rel for x in EXCLUDE)):
                continue
            if src.parent.parent.name == "contents" and src.name != largest(src.parent):
                continue  # Plasma ships each wallpaper at a dozen sizes: one picture, kept once
            img = Image.open(src).convert("RGB")
            img.thumbnail((max_side, max_side))
            name = rel.strip("/").replace("/", "_").rsplit(".", 1)[0] + ".jpg"
            img.save(out / name, "JPEG", quality=92)
            written.append(out / name)
    return written


def fetch_gcompris(out: Path, min_side: int = 400) -> list[Path]:
    """Cut the photos out of gcompris-qt-data's photo bundles; each written as ``<bundle>_<offset>.jpg``."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(prefix="gcompris-clean-") as tmp:
        root = unpack((GCOMPRIS_PACKAGE,), Path(tmp))
        for bundle in GCOMPRIS_BUNDLES:
            data = (root / "usr/share/gcompris-qt/rcc" / f"{bundle}.rcc").read_bytes()
            for tag, start, img in embedded_images(data):
                if min(img.size) >= min_side:
                    written.append(out / f"{bundle}_{tag}{start}.jpg")
                    img.convert("RGB").save(written[-1], "JPEG", quality=92)
    return written


def embedded_images(data: bytes) -> list[tuple[str, int, Image.Image]]:
    """Every decodable WEBP (tag "") and JPEG (tag "j") stored in ``data``, with its byte offset."""
    found = []
    at = data.find(b"RIFF")
    while at >= 0:
        length = struct.unpack("<I", data[at + 4:at + 8])[0] + 8
        if data[at + 8:at + 12] == b"WEBP" and length > 40_000:  # smaller ones are icons
            found.append(("", at, decoded(data[at:at + length])))
        at = data.find(b"RIFF", at + 4)
    at = data.find(b"\xff\xd8\xff")
    while at >= 0:
        found.append(("j", at, decoded(data[at:])))  # the decoder stops at the image's own end
        at = data.find(b"\xff\xd8\xff", at + 3)
    return [(tag, start, img) for tag, start, img in found if img is not None]


def decoded(blob: bytes) -> Image.Image | None:
    try:
        img = Image.open(io.BytesIO(blob))
        img.load()
        return img
    except (OSError, SyntaxError, ValueError):  # not an image after all, or cut short
        return None


@functools.cache
def largest(folder: Path) -> str:
    """Name of the folder's picture with the most pixels (read once per folder: headers only)."""
    def pixels(p: Path) -> int:
        with Image.open(p) as im:
            return im.width * im.height

    return max((p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES), key=pixels).name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the wallpapers")
    ap.add_argument("--gcompris", type=Path, metavar="DIR", help="also cut GCompris's photos into DIR")
    args = ap.parse_args()
    print(f"{len(fetch(args.out))} photos written to {args.out}")
    if args.gcompris:
        print(f"{len(fetch_gcompris(args.gcompris))} photos written to {args.gcompris}")


if __name__ == "__main__":
    main()
