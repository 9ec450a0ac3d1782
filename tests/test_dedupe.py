"""Perceptual dedupe: hashes, the gallery index (search, increments, persistence), batch verdicts."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from mining import dedupe
from mining.dedupe import GalleryIndex, dedupe_batch, hamming, hash_bytes, hash_file, image_hashes
from mining.settings import Settings

THRESHOLD = Settings().phash_max_distance
SIZE = Settings().phash_size


def natural_image(seed: int, size: tuple[int, int] = (480, 320)) -> Image.Image:
    """Smooth random colour field plus soft shapes and grain: photo-like frequency content."""
    rng = np.random.default_rng(seed)
    w, h = size
    coarse = rng.uniform(0, 255, (5, 7, 3)).astype(np.uint8)
    img = Image.fromarray(coarse, "RGB").resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(8):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(0.05, 0.3) * w, rng.uniform(0.05, 0.3) * h
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=colour)
        else:
            draw.polygon([(x + rx * np.cos(a), y + ry * np.sin(a)) for a in rng.uniform(0, 6.3, 4)], fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(3))
    grain = rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + grain, 0, 255).astype(np.uint8))


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def sha(n: int | str) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


REPOSTS = {
    "resize 50%": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS),
    "JPEG q50": lambda im: Image.open(io.BytesIO(jpeg(im, 50))),
    "mirror": ImageOps.mirror,
    "crop 2%": lambda im: im.crop((im.width // 100, im.height // 100, im.width - im.width // 100,
                                   im.height - im.height // 100)),
    "brightness +20%": lambda im: ImageEnhance.Brightness(im).enhance(1.2),
    "mirror+resize+q60": lambda im: Image.open(io.BytesIO(jpeg(ImageOps.mirror(im).resize((240, 160)), 60))),
}


@pytest.fixture(scope="module")
def scenes() -> list[Image.Image]:
    return [natural_image(seed) for seed in range(12)]


@pytest.fixture(scope="module")
def scene_index(scenes: list[Image.Image]) -> GalleryIndex:
    index = GalleryIndex(SIZE)
    for i, img in enumerate(scenes):
        index.add(sha(i), *image_hashes(img, SIZE))
    return index


# ---- hashing -----------------------------------------------------------------------------
@pytest.mark.parametrize("size", [8, 12, 16])
def test_hashes_are_hex_strings_of_the_requested_size(scenes: list[Image.Image], size: int) -> None:
    ph, mi = image_hashes(scenes[0], size)
    assert len(ph) == len(mi) == size * size // 4
    assert ph != mi
    if size == 8:  # same bits as imagehash's own text for whole-byte sizes
        small = ImageOps.exif_transpose(scenes[0]).convert("L")
        assert hamming(ph, str(imagehash.phash(small, hash_size=8))) <= 2


def test_mirror_hash_is_the_hash_of_the_mirrored_image(scenes: list[Image.Image]) -> None:
    for img in scenes[:4]:
        ph, mi = image_hashes(img, SIZE)
        mph, mmi = image_hashes(ImageOps.mirror(img), SIZE)
        assert hamming(mph, mi) <= 2 and hamming(mmi, ph) <= 2


def test_hash_file_and_hash_bytes_agree_and_decode_jpeg_cheaply(tmp_path: Path, scenes: list[Image.Image]) -> None:
    big = scenes[1].resize((2400, 1600), Image.Resampling.BICUBIC)
    data = jpeg(big, 92)
    path = tmp_path / "big.jpg"
    path.write_bytes(data)
    assert hash_file(path, SIZE) == hash_bytes(data, SIZE)
    # draft-mode decoding changes almost nothing compared with a full decode
    full = image_hashes(Image.open(io.BytesIO(data)).convert("RGB"), SIZE)
    assert hamming(hash_file(path, SIZE)[0], full[0]) <= 2


def test_exif_orientation_is_applied_before_hashing(tmp_path: Path, scenes: list[Image.Image]) -> None:
    img = scenes[2]
    rotated = img.rotate(90, expand=True)  # pixels stored sideways...
    exif = Image.Exif()
    exif[0x0112] = 6  # ...and EXIF says "rotate 90 CW to display": upright again
    buf = io.BytesIO()
    rotated.save(buf, "JPEG", quality=95, exif=exif)
    assert hamming(hash_bytes(buf.getvalue(), SIZE)[0], hash_bytes(jpeg(img, 95), SIZE)[0]) <= 4


def test_hash_size_below_four_is_refused(scenes: list[Image.Image]) -> None:
    with pytest.raises(ValueError):
        image_hashes(scenes[0], 2)


# ---- near-duplicates hit, distinct images do not -----------------------------------------------
@pytest.mark.parametrize("name", list(REPOSTS))
def test_reposted_copies_match_their_original(name: str, scenes: list[Image.Image],
                                             scene_index: GalleryIndex) -> None:
    for i, img in enumerate(scenes[:6]):
        repost = REPOSTS[name](img)
        ph, _ = hash_bytes(jpeg(repost, 85), SIZE)
        match = scene_index.nearest(ph)
        assert match is not None
        assert match[0] == sha(i), f"{name}: scene {i} matched {match}"
        assert match[1] <= THRESHOLD, f"{name}: scene {i} at {match[1]} bits > {THRESHOLD}"


def test_distinct_images_do_not_match(scenes: list[Image.Image], scene_index: GalleryIndex) -> None:
    others = [natural_image(1000 + seed) for seed in range(12)]
    for img in others:
        _, dist = scene_index.query(image_hashes(img, SIZE)[0])
        assert dist[0] > THRESHOLD
    for i, img in enumerate(scenes):
        best, dist = scene_index.query(image_hashes(img, SIZE)[0], exclude_shas=[sha(i)])
        assert dist[0] > THRESHOLD, f"scene {i} within {dist[0]} bits of scene {best[0]}"


# ---- the index ---------------------------------------------------------------------------------
def random_hashes(rng: np.random.Generator, n: int, size: int) -> list[str]:
    return [rng.integers(0, 256, size * size // 8, dtype=np.uint8).tobytes().hex() for _ in range(n)]


@pytest.mark.parametrize("size", [8, 12, 16])
def test_query_equals_brute_force(size: int) -> None:
    rng = np.random.default_rng(size)
    phs, mis = random_hashes(rng, 300, size), random_hashes(rng, 300, size)
    index = GalleryIndex(size)
    for start in range(0, 300, 37):  # several increments, crossing capacity growth
        index.add_many([sha(i) for i in range(start, min(300, start + 37))], phs[start:start + 37],
                       mis[start:start + 37])
    queries = [*random_hashes(rng, 15, size), mis[42]]
    best, dist = index.query(queries)
    for k, q in enumerate(queries):
        ref = [min(hamming(q, a), hamming(q, b)) for a, b in zip(phs, mis, strict=True)]
        assert dist[k] == min(ref)
        assert best[k] == ref.index(min(ref))  # ties go to the first added
    assert (best[-1], dist[-1]) == (42, 0)  # a query equal to an entry's mirror hash


def test_incremental_add_then_query() -> None:
    rng = np.random.default_rng(7)
    index = GalleryIndex(8)
    assert len(index) == 0
    assert index.nearest("0" * 16) is None
    best, dist = index.query(["0" * 16])
    assert best[0] == -1 and dist[0] == 65
    phs, mis = random_hashes(rng, 3, 8), random_hashes(rng, 3, 8)
    for i, ph in enumerate(phs):
        assert index.add(sha(i), ph, mis[i], origin=f"p{i}:0")
        assert index.nearest(ph) == (sha(i), 0)
        assert index.nearest(mis[i]) == (sha(i), 0)
    assert not index.add(sha(0), phs[2], phs[2])  # same sha256: a no-op
    assert len(index) == 3 and index.phash_of(sha(0)) == (phs[0], mis[0])
    assert index.sha256s() == {sha(0), sha(1), sha(2)}
    assert index.sha256s(excluding_origins={"p1:0"}) == {sha(0), sha(2)}
    assert index.nearest(phs[0], exclude_sha=sha(0))[0] != sha(0)


def test_bad_inputs_are_refused() -> None:
    index = GalleryIndex(8)
    with pytest.raises(ValueError, match="sha256"):
        index.add("A" * 64, "0" * 16, "0" * 16)
    with pytest.raises(ValueError, match="sha256"):
        index.add("not-a-sha", "0" * 16, "0" * 16)
    with pytest.raises(ValueError, match="8x8"):
        index.add(sha(1), "0" * 64, "0" * 64)  # a 256-bit hash in a 64-bit index
    assert len(index) == 0
    with pytest.raises(ValueError):
        index.query(["abc"])


def test_persistence_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    index = GalleryIndex(16)
    phs, mis = random_hashes(rng, 50, 16), random_hashes(rng, 50, 16)
    origins = [None if i % 3 == 0 else f"post{i}:{i % 4}-ünï" for i in range(50)]
    index.add_many([sha(i) for i in range(50)], phs, mis, origins)
    path = index.save(tmp_path / "state" / "gallery-index.npz")
    assert [p.name for p in path.parent.iterdir()] == ["gallery-index.npz"]  # no temp files left

    loaded = GalleryIndex.load(path)
    assert loaded.hash_size == 16 and len(loaded) == 50
    assert loaded.shas == index.shas
    assert [loaded.origin(sha(i)) for i in range(50)] == origins
    assert all(loaded.phash_of(sha(i)) == (phs[i], mis[i]) for i in range(50))
    queries = random_hashes(rng, 5, 16)
    assert all(np.array_equal(a, b) for a, b in zip(loaded.query(queries), index.query(queries), strict=True))
    loaded.add(sha(99), phs[0], mis[0])  # a loaded index keeps growing
    assert loaded.nearest(phs[0], exclude_sha=sha(0)) == (sha(99), 0)


def test_empty_index_round_trip(tmp_path: Path) -> None:
    path = GalleryIndex(8).save(tmp_path / "empty.npz")
    assert len(GalleryIndex.load(path)) == 0


def test_failed_save_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "index.npz"
    first = GalleryIndex(8)
    first.add(sha(1), "00" * 8, "ff" * 8)
    first.save(path)
    first.add(sha(2), "0f" * 8, "f0" * 8)

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        first.save(path)
    assert GalleryIndex.load(path).shas == [sha(1)]
    assert [p.name for p in tmp_path.iterdir()] == ["index.npz"]


def test_load_or_empty_uses_settings(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, phash_size=8)
    assert len(GalleryIndex.load_or_empty(settings)) == 0
    index = GalleryIndex(8)
    index.add(sha(1), "00" * 8, "ff" * 8)
    index.save(GalleryIndex.path_for(settings))
    assert GalleryIndex.load_or_empty(settings).shas == [sha(1)]
    with pytest.raises(ValueError, match="MINING_PHASH_SIZE"):
        GalleryIndex.load_or_empty(Settings(home=tmp_path, phash_size=16))


def test_images_without_hashes_still_match_exactly(tmp_path: Path) -> None:
    """The warehouse may hold gallery rows whose pHash is NULL (undecodable): exact matches only."""
    rows = [(sha(1), None, None, "old:0"), (sha(2), "00" * 8, "ff" * 8, None)]
    index = GalleryIndex.from_rows(rows, 8)
    assert len(index) == 1 and sha(1) in index and index.sha256s() == {sha(1), sha(2)}
    assert index.sha256s(excluding_origins={"old:0"}) == {sha(2)}
    loaded = GalleryIndex.load(index.save(tmp_path / "i.npz"))
    assert sha(1) in loaded and loaded.origin(sha(1)) == "old:0" and len(loaded) == 1
    results = dedupe_batch([(sha(1), "00" * 8, "00" * 8)], loaded, THRESHOLD)
    assert (results[0].kind, results[0].duplicate_of) == ("exact", sha(1))
    assert loaded.add(sha(1), "0f" * 8, "f0" * 8) and loaded.nearest("0f" * 8) == (sha(1), 0)


def test_from_rows_accepts_tuples_and_dicts() -> None:
    rows = [(sha(1), "00" * 8, "ff" * 8), (sha(2), "0f" * 8, "f0" * 8, "abc:0"),
            {"sha256": sha(3), "phash": "11" * 8, "phash_mirror": "22" * 8, "candidate_id": "def:1"}]
    index = GalleryIndex.from_rows(rows, 8)
    assert index.shas == [sha(1), sha(2), sha(3)]
    assert [index.origin(sha(i)) for i in (1, 2, 3)] == [None, "abc:0", "def:1"]


def test_query_over_a_large_gallery() -> None:
    rng = np.random.default_rng(11)
    n = 100_000
    raw = rng.integers(0, 2**63, size=(n, 1), dtype=np.uint64).view(np.uint8).reshape(n, 8)
    hexes = [r.tobytes().hex() for r in raw]
    index = GalleryIndex(8)
    index.add_many([f"{i:064x}" for i in range(n)], hexes, hexes[::-1])  # entry i's mirror: hexes[n-1-i]
    # both entry 65_432 (pHash) and entry n-1-65_432 (mirror) are at 0 bits: the first added wins
    assert index.nearest(hexes[65_432]) == (f"{n - 1 - 65_432:064x}", 0)
    assert index.nearest(hexes[5]) == (f"{5:064x}", 0)
    assert index.nearest(hexes[5], exclude_sha=f"{5:064x}") == (f"{n - 1 - 5:064x}", 0)


# ---- batch verdicts ---------------------------------------------------------------------------
def test_dedupe_batch_exact_then_perceptual_then_within_batch(scenes: list[Image.Image]) -> None:
    gallery = GalleryIndex(SIZE)
    gallery.add(sha("g0"), *image_hashes(scenes[0], SIZE), origin="old:0")
    h = {i: image_hashes(img, SIZE) for i, img in enumerate(scenes[:4])}
    repost0 = hash_bytes(jpeg(REPOSTS["mirror+resize+q60"](scenes[0])), SIZE)
    repost1 = hash_bytes(jpeg(REPOSTS["resize 50%"](scenes[1])), SIZE)
    items = [
        (sha("g0"), h[0]),           # 0: exact copy of a gallery image
        (sha("a"), repost0),         # 1: near copy (mirrored) of the gallery image
        (sha("b"), h[1]),            # 2: new
        (sha("c"), repost1),         # 3: near copy of item 2
        (sha("b"), h[1]),            # 4: exact copy of item 2
        (sha("d"), h[2][0], h[2][1]),  # 5: new, 3-tuple form
    ]
    results = dedupe_batch(items, gallery, THRESHOLD)
    assert [r.sha256 for r in results] == [it[0] for it in items]
    r0, r1, r2, r3, r4, r5 = results
    assert (r0.duplicate_of, r0.kind, r0.in_gallery, r0.distance) == (sha("g0"), "exact", True, 0)
    assert (r1.duplicate_of, r1.kind, r1.in_gallery) == (sha("g0"), "perceptual", True)
    assert 0 <= r1.distance <= THRESHOLD
    assert not r2.is_duplicate and r2.duplicate_of is None
    assert (r3.duplicate_of, r3.kind, r3.in_gallery, r3.batch_index) == (sha("b"), "perceptual", False, 2)
    assert (r4.duplicate_of, r4.kind, r4.batch_index, r4.distance) == (sha("b"), "exact", 2, 0)
    assert not r5.is_duplicate
    assert len(gallery) == 1  # dedupe never modifies the gallery


def test_dedupe_batch_first_in_order_wins(scenes: list[Image.Image]) -> None:
    original = image_hashes(scenes[3], SIZE)
    copy = hash_bytes(jpeg(REPOSTS["JPEG q50"](scenes[3])), SIZE)
    empty = GalleryIndex(SIZE)
    forward = dedupe_batch([(sha("x"), original), (sha("y"), copy)], empty, THRESHOLD)
    backward = dedupe_batch([(sha("y"), copy), (sha("x"), original)], empty, THRESHOLD)
    assert forward[0].duplicate_of is None and forward[1].duplicate_of == sha("x")
    assert backward[0].duplicate_of is None and backward[1].duplicate_of == sha("y")


def test_dedupe_batch_ignores_the_gallery_copies_of_its_own_candidates(scenes: list[Image.Image]) -> None:
    """Rescoring an hour whose images were published must not call them duplicates of themselves."""
    h = image_hashes(scenes[4], SIZE)
    gallery = GalleryIndex(SIZE)
    gallery.add(sha("p"), *h, origin="abc:0")
    assert dedupe_batch([(sha("p"), h)], gallery, THRESHOLD)[0].kind == "exact"
    rerun = dedupe_batch([(sha("p"), h)], gallery, THRESHOLD, excluding_origins={"abc:0"})
    assert not rerun[0].is_duplicate
    other = dedupe_batch([(sha("q"), h)], gallery, THRESHOLD, excluding_origins={"abc:0"})
    assert not other[0].is_duplicate


def test_dedupe_batch_compares_with_kept_items_only() -> None:
    """A chain a~b~c where a and c are far apart: b drops as a's copy, c stays (nothing kept is near)."""
    a = "0000000000000000"
    b = f"{(1 << THRESHOLD) - 1:016x}"  # THRESHOLD bits from a
    c = f"{(1 << (2 * THRESHOLD)) - 1:016x}"  # THRESHOLD bits from b, 2*THRESHOLD from a
    far = "f" * 16
    results = dedupe_batch([(sha(1), a, far), (sha(2), b, far), (sha(3), c, far)], GalleryIndex(8), THRESHOLD)
    assert [r.duplicate_of for r in results] == [None, sha(1), None]


def test_distances_matrix_helper() -> None:
    q = dedupe.pack(["00" * 8, "ff" * 8], 8)
    g = dedupe.pack(["0f" * 8, "00" * 8, "ff" * 8], 8)
    assert dedupe.distances(q, g).tolist() == [[32, 0, 64], [32, 64, 0]]


# ---- real photographs (shared tier) ----------------------------------------------------------
@pytest.mark.shared
def test_real_photo_reposts_match_and_distinct_photos_do_not(shared_photos: Path) -> None:
    photos = sorted((shared_photos / "scenery").glob("*.jpg"))[:8]
    assert len(photos) == 8
    index = GalleryIndex(SIZE)
    for p in photos:
        index.add(hashlib.sha256(p.read_bytes()).hexdigest(), *hash_file(p, SIZE))
    for p in photos:
        with Image.open(p) as im:
            img = im.convert("RGB")
        own = hashlib.sha256(p.read_bytes()).hexdigest()
        for name in ("mirror+resize+q60", "crop 2%", "brightness +20%"):
            match = index.nearest(hash_bytes(jpeg(REPOSTS[name](img), 80), SIZE)[0])
            assert match is not None and match[0] == own and match[1] <= THRESHOLD, (p.name, name, match)
        _, dist = index.query(index.phash_of(own)[0], exclude_shas=[own])
        assert dist[0] > THRESHOLD, p.name
