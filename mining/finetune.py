"""Train the watermark CNN (torch) and export it to ONNX with the project's own graph writer.

Why a CNN: the text-evidence detector stops near 0.81 held-out AUROC, because PP-OCRv4 sees
nothing in faint corner text and logos, and reads real scene text as a mark. A network
fine-tuned on the watermarks themselves is what the original system had. Here it is
EfficientNet-Lite0 (the embedder's pretrained weights) cut after its stride-16 stage, with a
small head that scores every 16-px cell. Each training image gets a fresh synthetic mark, and
the loss sees the exact mask the synthesiser drew, so a corner mark a few pixels tall is not
averaged away by a global pool. The image logit is the highest cell's.

Training needs torch (the ``finetune`` extra; a GPU is used when present). The export does
not: the trained layers are written as an ONNX graph by :class:`mining.effnet.OnnxGraph`,
with the original system's interface (square RGB, /255, mean/std 0.5, one logit; 448 px by
default, where the original used 512: it ranks within noise of 512 here and runs faster;
docs/watermark.md), so the runtime is
onnxruntime alone (:class:`mining.watermark.CnnDetector`). The threshold is calibrated on
photos the network never trained on.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mining.effnet import INPUT, BlockLayers, ConvLayer, OnnxGraph, folded_body, read_checkpoint
from mining.settings import Settings
from mining.watermark import DEFAULT_MAX_FPR, DEFAULT_TARGET_FPR, FPR_CONFIDENCE, SYNTH_VERSION

log = logging.getLogger(__name__)

CNN_VERSION = "lite0-b11-cells16-v1"  # architecture + input contract; part of every model's version
CUT = 11  # Lite0 blocks kept (0..10): 112 channels at stride 16
FROZEN = 3  # stem + blocks 0..2 (the costly high-resolution ones) keep their pretrained weights
HEAD_CH = 96
CELL = 16
LOGIT = "logit"
CELLS = "cells"


@dataclass(frozen=True)
class FinetuneConfig:
    """Knobs of one fine-tuning run; the defaults are the measured recipe (docs/watermark.md)."""

    steps: int = 900
    batch: int = 12
    lr: float = 6e-4  # head; the trainable body gets a third of it
    size: int = 448  # the original interface used 512; 448 ranks within noise of it, faster
    warmup: int = 30
    cover_full: float = 0.05  # a cell whose area is this much ink counts as fully watermarked
    pos_weight: float = 4.0  # ink cells are rare
    seed: int = 0
    holdout: float = 0.0  # photos kept out of training and calibration, for `evaluate`
    calibration: float = 0.2  # share of the remaining photos kept out of training to set the threshold
    target_fpr: float = DEFAULT_TARGET_FPR  # aim for the calibration photos' own false-positive rate
    max_fpr: float = DEFAULT_MAX_FPR  # the promise: ... and no more than this on photos like them,
    fpr_confidence: float = FPR_CONFIDENCE  # in this share of photo resamples (watermark.bounded_threshold)
    decode_long_side: int = 1600  # training photos are held in memory at this size
    scene_text: float = 0.3  # share of examples (either label) given a sign, page or label that is part of the scene
    frozen: int = FROZEN  # blocks kept at their pretrained weights (the stem always is)
    pool_top: int = 1  # the image's logit is the mean of its this many highest cells (1: the maximum)
    photo_aug: float = 0.5  # share of examples whose photo is first cropped and recoloured (vary_photo)
    rank_weight: float = 0.0  # weight of the pairwise ranking loss on image logits (rank_loss)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1:
            raise ValueError("steps and batch must be positive")
        if self.size % 32:
            raise ValueError(f"size must be a multiple of 32, got {self.size}")
        if not 0 <= self.frozen <= CUT:
            raise ValueError(f"frozen is a number of blocks in [0, {CUT}], got {self.frozen}")
        if not 1 <= self.pool_top <= (self.size // CELL) ** 2:
            raise ValueError(f"pool_top is a number of cells in [1, {(self.size // CELL) ** 2}], got {self.pool_top}")
        if not 0 <= self.scene_text <= 1:
            raise ValueError(f"scene_text is a share in [0, 1], got {self.scene_text}")
        if not 0 <= self.photo_aug <= 1:
            raise ValueError(f"photo_aug is a share in [0, 1], got {self.photo_aug}")
        if not 0 <= self.rank_weight:
            raise ValueError(f"rank_weight must be >= 0, got {self.rank_weight}")
        if not 0 <= self.target_fpr <= self.max_fpr < 1 or not 0 < self.fpr_confidence < 1:
            raise ValueError("need 0 <= target_fpr <= max_fpr < 1 and fpr_confidence in (0, 1)")
        if not 0 <= self.holdout < 1 or not 0 < self.calibration < 1:
            raise ValueError("holdout must be in [0, 1) and calibration in (0, 1)")


@dataclass
class FinetuneReport:
    version: str
    path: str
    train_photos: int
    calibration_photos: int
    held_out_photos: list[str]
    steps: int
    threshold: float
    calibration_auroc: float
    calibration_fpr: float
    calibration_recall: float
    device: str
    seconds: float
    losses: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------ data
def cell_cover(marked: Image.Image, base: Image.Image, grid: tuple[int, int]) -> np.ndarray:
    """Share of each cell's pixels the watermark changed, from the clean and marked originals."""
    diff = np.abs(np.asarray(marked, np.int16) - np.asarray(base, np.int16)).sum(axis=2)
    mask = Image.fromarray(((diff > 6) * 255).astype(np.uint8))
    return np.asarray(mask.resize(grid, Image.BOX), dtype=np.float32) / 255


def vary_photo(base: Image.Image, rng: np.random.Generator, min_area: float = 0.3) -> Image.Image:
    """Another view of a clean photo: a random crop (``min_area``..100% of it) with its colour shifted.

    Why: a hundred-odd training photos, seen whole every time, let the network learn their
    textures at one scale. A crop shows grass, leaves and grain at up to 1.8x the scale, and
    shifted brightness, contrast and saturation, before the mark is drawn over it (so a corner
    mark still sits in the crop's corner).
    """
    from PIL import ImageEnhance

    W, H = base.size
    area = rng.uniform(min_area, 1.0) * W * H
    aspect = W / H * math.exp(rng.uniform(-0.25, 0.25))
    w = min(W, max(16, round(math.sqrt(area * aspect))))
    h = min(H, max(16, round(math.sqrt(area / aspect))))
    x, y = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
    img = base.crop((x, y, x + w, y + h))
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(float(rng.uniform(0.7, 1.3)))
    return img


def training_example(base: Image.Image, rng: np.random.Generator, size: int, scene_text: float = 0.0,
                     photo_aug: float = 0.0) -> tuple[np.ndarray, np.ndarray, int]:
    """A fresh served-like example (half watermarked), squashed to ``size``: (HWC uint8, cell cover, label).

    With probability ``photo_aug`` the photo is first cropped and recoloured (:func:`vary_photo`).
    With probability ``scene_text`` it then gets text that belongs to the scene (a clean
    feature, so the cell target stays the mark's alone): text by itself is then no cue.
    """
    from mining.synth import add_scene_text, add_watermark, augment_like_reddit

    grid = size // CELL
    if photo_aug and rng.random() < photo_aug:
        base = vary_photo(base, rng)
    if scene_text and rng.random() < scene_text:
        base, _ = add_scene_text(base, rng)
    positive = bool(rng.random() < 0.5)
    if positive:
        img, _ = add_watermark(base, rng)
        cover = cell_cover(img, base, (grid, grid))
    else:
        img, cover = base, np.zeros((grid, grid), np.float32)
    img, _ = augment_like_reddit(img, rng)
    x = np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)
    if rng.random() < 0.5:  # marks sit in either corner; a mirrored photo is still a photo
        x, cover = x[:, ::-1], cover[:, ::-1]
    return np.ascontiguousarray(x), np.ascontiguousarray(cover), int(positive)


def batches(bases: Sequence[Image.Image], config: FinetuneConfig) -> Iterator[tuple[np.ndarray, np.ndarray,
                                                                                     np.ndarray]]:
    """Endless training batches, synthesised on a worker thread while the caller trains."""
    out: queue.Queue = queue.Queue(maxsize=3)
    stop = threading.Event()

    def produce() -> None:
        rng = np.random.default_rng([config.seed, 1])
        try:
            while not stop.is_set():
                items = [training_example(bases[int(rng.integers(len(bases)))], rng, config.size, config.scene_text,
                                          config.photo_aug) for _ in range(config.batch)]
                xs, covers, ys = zip(*items, strict=True)
                out.put((np.stack(xs), np.stack(covers), np.asarray(ys, np.float32)))
        except Exception as exc:  # surfaced to the trainer, which re-raises it
            out.put(exc)

    worker = threading.Thread(target=produce, name="wm-synth", daemon=True)
    worker.start()
    try:
        while True:
            item = out.get()
            if isinstance(item, Exception):
                raise RuntimeError(f"synthesising training batches failed: {item}") from item
            yield item
    finally:
        stop.set()
        while not out.empty():  # unblock a producer waiting on a full queue
            out.get_nowait()


# ------------------------------------------------------------------------------- the network
def head_layers(rng: np.random.Generator, in_ch: int = 112) -> tuple[ConvLayer, ConvLayer]:
    """A freshly initialised per-cell head: 3x3 conv + ReLU, then 1x1 to one logit per cell."""
    w1 = rng.normal(0, math.sqrt(2 / (in_ch * 9)), (HEAD_CH, in_ch, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.01, (1, HEAD_CH, 1, 1)).astype(np.float32)
    return (ConvLayer("cellhead.0", w1, np.zeros(HEAD_CH, np.float32), 1, 1, "relu"),
            ConvLayer("cellhead.1", w2, np.full(1, -2.0, np.float32), 1, 1, None))


def export_onnx(stem: ConvLayer, blocks: list[BlockLayers], head: Sequence[ConvLayer],
                metadata: dict[str, str] | None = None, pool_top: int = 1) -> bytes:
    """The cell network as ONNX: input [N,3,H,W] -> logit [N,1], cells [N,1,H/16,W/16].

    The logit is the mean of the ``pool_top`` highest cells (their maximum when 1): the same
    pooling the network was trained with.
    """
    from onnx import TensorProto, helper, numpy_helper

    g = OnnxGraph()
    x = g.body(INPUT, stem, blocks)
    for layer in head:
        x = g.conv(x, layer)
    g.node("Identity", [x], CELLS)
    if pool_top == 1:
        g.node("ReduceMax", [CELLS], LOGIT, axes=[2, 3], keepdims=0)
    else:
        g.inits.append(numpy_helper.from_array(np.array([pool_top], np.int64), "pool_top"))
        g.node("Flatten", [CELLS], "cells_flat", axis=1)
        g.nodes.append(helper.make_node("TopK", ["cells_flat", "pool_top"], ["top_cells", "top_index"],
                                        name="top_cells", axis=1))
        g.node("ReduceMean", ["top_cells"], LOGIT, axes=[1], keepdims=1)
    outputs = [helper.make_tensor_value_info(LOGIT, TensorProto.FLOAT, ["batch", 1]),
               helper.make_tensor_value_info(CELLS, TensorProto.FLOAT, ["batch", 1, "rows", "cols"])]
    return g.model("watermark_cells", outputs, metadata).SerializeToString()


def warm_layers(model: bytes, stem: ConvLayer, blocks: list[BlockLayers], head: Sequence[ConvLayer],
                ) -> tuple[ConvLayer, list[BlockLayers], list[ConvLayer]]:
    """The same layers carrying the weights a previous fine-tune exported, to train on from there.

    Why: a grown gallery or more photos need not cost a fresh hour; and two runs add up to a
    longer schedule than one session of CPU allows. Refuses a model of another architecture.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(model)
    version = {p.key: p.value for p in graph.metadata_props}.get("cnn_version")
    if version != CNN_VERSION:
        raise ValueError(f"the initial model is a {version or 'foreign'} network, not {CNN_VERSION}")
    inits = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}

    def take(layer: ConvLayer) -> ConvLayer:
        w, b = inits.get(f"{layer.prefix}.w"), inits.get(f"{layer.prefix}.b")
        if w is None or b is None or w.shape != layer.w.shape or b.shape != layer.b.shape:
            raise ValueError(f"the initial model has no {layer.prefix} weights of shape {layer.w.shape}")
        return replace(layer, w=w.astype(np.float32), b=b.astype(np.float32))

    return (take(stem), [replace(blk, convs=tuple(take(c) for c in blk.convs)) for blk in blocks],
            [take(layer) for layer in head])


def pretrained_body(settings: Settings) -> tuple[ConvLayer, list[BlockLayers]]:
    """Lite0's stem and first CUT blocks, batch-norm folded, from the embedder's registry checkpoint."""
    from mining.models import load_spec, source_member

    return folded_body(read_checkpoint(source_member(settings, load_spec(settings, "efficientnet-lite0"))), CUT)


class TorchMissing(RuntimeError):
    """Fine-tuning was asked for where torch is not installed."""


def _require_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise TorchMissing("fine-tuning the watermark CNN needs torch: pip install -e '.[finetune]' "
                           "(the trained model then runs on onnxruntime alone)") from exc
    return torch


def pool_cells(cells: Any, top: int) -> Any:
    """Torch [N,H,W] cell logits -> [N] image logits: the mean of the ``top`` highest (max when 1).

    Why more than one: under the maximum a single cell decides, and a lone cell of texture or
    grain fires as readily as a mark, which covers several; the mean of a few asks for more.
    """
    flat = cells.flatten(1)
    return flat.amax(dim=1) if top == 1 else flat.topk(top, dim=1).values.mean(dim=1)


def rank_loss(logits: Any, y: Any) -> Any:
    """Mean logistic loss over the batch's (watermarked, clean) pairs: softplus(clean - marked).

    Why: AUROC is the share of such pairs in order, and what it misses is pairs across photos
    (a faint mark on one photo under fine grass on another). The per-image loss pushes each
    score to its side alone; this one spends its gradient on the pairs still out of order.
    A batch with one class alone gives 0 (with a graph, so backward still works).
    """
    torch = _require_torch()
    pos, neg = logits[y > 0.5], logits[y <= 0.5]
    if not len(pos) or not len(neg):
        return logits.sum() * 0.0
    return torch.nn.functional.softplus(neg[None, :] - pos[:, None]).mean()


def torch_model(stem: ConvLayer, blocks: list[BlockLayers], head: Sequence[ConvLayer], pool_top: int = 1) -> Any:
    """The same layers as trainable torch modules, with TF "SAME" padding like the ONNX graph."""
    torch = _require_torch()
    fn = torch.nn.functional

    def module(layer: ConvLayer) -> Any:
        out_ch, in_per_group, k, _ = layer.w.shape
        conv = torch.nn.Conv2d(in_per_group * layer.group, out_ch, k, stride=layer.stride, groups=layer.group)
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(layer.w))
            conv.bias.copy_(torch.from_numpy(layer.b))
        return conv

    class Cells(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = [stem, *(c for blk in blocks for c in blk.convs), *head]
            self.convs = torch.nn.ModuleList(module(layer) for layer in self.layers)
            self.blocks = blocks
            self.n_head = len(head)
            self.pool_top = pool_top

        def run(self, layer: ConvLayer, conv: Any, x: Any) -> Any:
            k, s = layer.w.shape[2], layer.stride
            h, w = x.shape[-2:]
            ph, pw = max((math.ceil(h / s) - 1) * s + k - h, 0), max((math.ceil(w / s) - 1) * s + k - w, 0)
            x = conv(fn.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)) if ph or pw else x)
            return fn.relu6(x) if layer.act == "relu6" else fn.relu(x) if layer.act == "relu" else x

        def blocks_range(self, x: Any, start: int, stop: int | None = None) -> Any:
            """Blocks [start, stop) on ``x``; block 0's input is the stem's output."""
            i = 1 + sum(len(b.convs) for b in self.blocks[:start])
            for blk in self.blocks[start:stop]:
                h = x
                for _ in blk.convs:
                    h = self.run(self.layers[i], self.convs[i], h)
                    i += 1
                x = h + x if blk.skip else h
            return x

        def stem(self, x: Any) -> Any:
            return self.run(self.layers[0], self.convs[0], x)

        def head_cells(self, x: Any) -> Any:
            for layer, conv in zip(self.layers[-self.n_head:], self.convs[-self.n_head:], strict=True):
                x = self.run(layer, conv, x)
            return x[:, 0]

        def forward(self, x: Any) -> Any:
            """One logit per image, pooled from its cells as the ONNX export computes it."""
            return pool_cells(self.head_cells(self.blocks_range(self.stem(x), 0)), self.pool_top)

        def trained_layers(self) -> tuple[ConvLayer, list[BlockLayers], list[ConvLayer]]:
            def array(t: Any) -> np.ndarray:  # C order whatever the tensor's memory format
                return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32)

            done = [ConvLayer(layer.prefix, array(conv.weight), array(conv.bias), layer.stride, layer.group,
                              layer.act) for layer, conv in zip(self.layers, self.convs, strict=True)]
            out_blocks, i = [], 1
            for blk in self.blocks:
                out_blocks.append(BlockLayers(blk.index, tuple(done[i:i + len(blk.convs)]), blk.skip))
                i += len(blk.convs)
            return done[0], out_blocks, done[i:]

    return Cells()


def to_input(x: np.ndarray) -> np.ndarray:
    """HWC uint8 batch -> NCHW float32 with the original interface's /255, mean/std 0.5."""
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32) / 127.5 - 1.0


# ------------------------------------------------------------------------------- training
def fit(model: Any, bases: Sequence[Image.Image], config: FinetuneConfig, device: str = "cpu",
        progress: Callable[[int, int, float], None] | None = None) -> list[float]:
    """Train ``model`` in place for ``config.steps`` batches; returns the loss every 20 steps."""
    torch = _require_torch()
    fn = torch.nn.functional
    torch.manual_seed(config.seed)
    # NHWC activations take oneDNN's faster CPU kernels: about 1.25x per step on 2 cores.
    model.to(device, memory_format=torch.channels_last)
    frozen_convs = 1 + sum(len(b.convs) for b in model.blocks[:config.frozen])
    for conv in model.convs[:frozen_convs]:
        conv.requires_grad_(False)
    head = [p for c in model.convs[-model.n_head:] for p in c.parameters()]
    body = [p for c in model.convs[frozen_convs:-model.n_head] for p in c.parameters()]
    opt = torch.optim.AdamW([{"params": head, "lr": config.lr}, {"params": body, "lr": config.lr / 3}],
                            weight_decay=1e-4)
    pos_weight = torch.tensor(config.pos_weight, device=device)
    model.train()
    losses, recent = [], []
    for step, (x, cover, y) in enumerate(batches(bases, config)):
        if step >= config.steps:
            break
        scale = 0.5 * (1 + math.cos(math.pi * step / config.steps)) * min(1.0, (step + 1) / config.warmup)
        for group, base_lr in zip(opt.param_groups, (config.lr, config.lr / 3), strict=True):
            group["lr"] = base_lr * max(scale, 0.02)
        xb = torch.from_numpy(to_input(x)).to(device, memory_format=torch.channels_last)
        with torch.no_grad():  # the frozen layers need no graph
            h = model.blocks_range(model.stem(xb), 0, config.frozen)
        cells = model.head_cells(model.blocks_range(h, config.frozen))
        target = torch.from_numpy(np.clip(cover / config.cover_full, 0, 1)).to(device)
        image, label = pool_cells(cells, config.pool_top), torch.from_numpy(y).to(device)
        loss = (fn.binary_cross_entropy_with_logits(cells, target, pos_weight=pos_weight)
                + fn.binary_cross_entropy_with_logits(image, label))
        if config.rank_weight:
            loss = loss + config.rank_weight * rank_loss(image, label)
        opt.zero_grad()
        loss.backward()
        opt.step()
        recent.append(float(loss.detach()))
        if (step + 1) % 20 == 0 or step + 1 == config.steps:
            losses.append(round(float(np.mean(recent)), 4))
            recent = []
            if progress:
                progress(step + 1, config.steps, losses[-1])
    model.eval()
    model.to("cpu")
    return losses


def finetune(settings: Settings, clean_dir: Path, out: Path | None = None, config: FinetuneConfig | None = None,
             progress: Callable[[int, int, float], None] | None = None,
             extra_clean: Sequence[Path] = (), init: Path | None = None) -> FinetuneReport:
    """Fine-tune, export and calibrate the watermark CNN on synthetic marks over ``clean_dir``'s photos.

    Photos are split (per folder, by name hash): ``holdout`` never used (for ``evaluate``),
    ``calibration`` of the rest only for the threshold, the remainder for training.
    ``extra_clean`` folders add photos that are never held out: more variety for training and
    calibration without changing which of ``clean_dir``'s photos ``evaluate`` measures. ``init``
    (a fine-tuned model's folder) starts from its weights instead of the pretrained body; the
    photos it had seen stay listed as seen. The new model replaces ``<models_dir>/watermark-cnn``
    atomically.
    """
    from mining.lake import sha256_file
    from mining.watermark import CnnDetector, cnn_dir, list_images, open_for_detection, split_files

    config = config or FinetuneConfig()
    torch = _require_torch()
    t0 = time.perf_counter()
    files = list_images(clean_dir)
    if not files:
        raise ValueError(f"no images found under {clean_dir}")
    usable, held = split_files(files, config.holdout, config.seed) if config.holdout > 0 else (files, [])
    digest = functools.cache(sha256_file)  # each photo hashed once
    init_model: bytes | None = None
    init_seen: set[str] = set()
    trained_before: set[str] = set()  # photos the initial weights were fitted on: never calibration
    if init is not None:
        init_meta = json.loads((init / "meta.json").read_text())
        init_model, init_seen = (init / CnnDetector.model_file).read_bytes(), set(init_meta["train_photos_sha256"])
        held = [f for f in held if digest(f) not in init_seen]  # seen before: no longer unseen
        if "calibration_photos_sha256" in init_meta:
            trained_before = init_seen - set(init_meta["calibration_photos_sha256"])
        else:
            log.warning("%s does not list its calibration photos; the threshold may be set on photos "
                        "it trained on", init)
    for folder in extra_clean:
        extra = list_images(folder)
        if not extra:
            raise ValueError(f"no images found under {folder}")
        usable = sorted({*usable, *extra} - set(held))
    train_files, calib_files = split_files(usable, config.calibration, config.seed + 1)
    moved = [f for f in calib_files if digest(f) in trained_before]
    if moved:
        train_files, calib_files = sorted([*train_files, *moved]), [f for f in calib_files if f not in moved]
    if not train_files or not calib_files:
        raise ValueError(f"{len(usable)} photos under {clean_dir}: need at least 2 (training and calibration)")
    bases = [open_for_detection(f, config.decode_long_side) for f in train_files]
    if settings.intra_op_threads > 0:
        torch.set_num_threads(settings.intra_op_threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stem, blocks = pretrained_body(settings)
    layers = (stem, blocks, head_layers(np.random.default_rng(config.seed)))
    model = torch_model(*(warm_layers(init_model, *layers) if init_model else layers), pool_top=config.pool_top)
    losses = fit(model, bases, config, device, progress)
    data = export_onnx(*model.trained_layers(), metadata={"cnn_version": CNN_VERSION}, pool_top=config.pool_top)
    version = model_version(data)

    threshold, metrics, calibration = calibrate(settings, data, config, calib_files)
    seen = sorted({digest(f) for f in [*train_files, *calib_files]} | init_seen)
    meta = {"name": CnnDetector.name, "version": version, "cnn_version": CNN_VERSION, "synth_version": SYNTH_VERSION,
            "input_size": config.size,
            "threshold": threshold, "target_fpr": config.target_fpr, "created_at": time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config": asdict(config), "device": device,
            "training": {"clean_dir": str(clean_dir), "extra_clean": [str(d) for d in extra_clean],
                         "init": str(init) if init else None,
                         "photos": len(train_files),
                         "calibration_photos": len(calib_files), "losses": losses},
            "metrics": metrics, "train_photos_sha256": seen,
            "calibration": calibration,  # to audit or re-derive the threshold
            "calibration_photos_sha256": sorted(digest(f) for f in calib_files)}
    target = out or cnn_dir(settings)
    CnnDetector.save(target, data, meta)
    return FinetuneReport(version=version, path=str(target), train_photos=len(train_files),
                          calibration_photos=len(calib_files), held_out_photos=[str(f) for f in held],
                          steps=config.steps, threshold=threshold, device=device,
                          seconds=round(time.perf_counter() - t0, 1), losses=losses, **metrics)


def model_version(data: bytes) -> str:
    """A fine-tuned CNN's version: its ONNX bytes' hash, so the same weights always name alike."""
    return "wmcnn-" + hashlib.sha256(data).hexdigest()[:12]


def calibrate(settings: Settings, data: bytes, config: FinetuneConfig,
              calib_files: Sequence[Path]) -> tuple[float, dict[str, float], dict[str, list[Any]]]:
    """Threshold, metrics and raw scores of the ONNX model ``data`` on photos it never trained on.

    Scored through the runtime path itself (:class:`CnnDetector`), so the threshold is the one
    that holds where it is used.
    """
    from mining.watermark import CnnDetector, auroc, predict_examples, threshold_for

    with tempfile.TemporaryDirectory(prefix="wmcnn-") as tmp:
        (Path(tmp) / CnnDetector.model_file).write_bytes(data)
        probe = CnnDetector(Path(tmp) / CnnDetector.model_file,
                            {"version": "calibrating", "threshold": 0.5, "input_size": config.size},
                            threads=settings.intra_op_threads)
        p, metas = predict_examples(probe, list(calib_files), 8, 8, config.seed + 2)
    y = np.asarray([m["label"] for m in metas])
    photo = np.asarray([m["photo_sha256"] for m in metas])
    threshold = threshold_for(p[y == 0], photo[y == 0], config.target_fpr, config.max_fpr, config.fpr_confidence,
                              seed=config.seed)
    metrics = {"calibration_auroc": auroc(y, p), "calibration_fpr": float((p[y == 0] >= threshold).mean()),
               "calibration_recall": float((p[y == 1] >= threshold).mean())}
    scores = {"scores": [round(float(v), 6) for v in p], "labels": y.tolist(), "photos_sha256": photo.tolist()}
    return threshold, metrics, scores


# ------------------------------------------------------------------------------------ soup
@dataclass
class SoupReport:
    version: str
    path: str
    ingredients: list[str]  # versions averaged
    calibration_photos: int
    threshold: float
    calibration_auroc: float
    calibration_fpr: float
    calibration_recall: float
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def soup_weights(models: Sequence[bytes]) -> bytes:
    """The uniform average of fine-tuned models' float weights, in the first model's graph.

    Runs fine-tuned from one start stay in one basin of the loss, so their average is a single
    model of the same cost that usually ranks better than each (a "model soup"). Anything but
    the float weights (the graph, integer constants) must be identical, or this refuses.
    """
    import onnx
    from onnx import numpy_helper

    if len(models) < 2:
        raise ValueError("a soup needs at least two models")
    protos = [onnx.load_from_string(m) for m in models]
    base = protos[0]

    def shape(p: Any) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
        return [(n.op_type, tuple(n.input), tuple(n.output)) for n in p.graph.node]

    weights = [{i.name: numpy_helper.to_array(i) for i in p.graph.initializer} for p in protos]
    for k, (p, w) in enumerate(zip(protos[1:], weights[1:], strict=True), start=2):
        if shape(p) != shape(base) or w.keys() != weights[0].keys():
            raise ValueError(f"model {k} has another graph than model 1: only runs of one architecture average")
        for name, value in w.items():
            ref = weights[0][name]
            if value.shape != ref.shape or value.dtype != ref.dtype:
                raise ValueError(f"model {k}'s {name} is {value.dtype}{value.shape}, model 1's {ref.dtype}{ref.shape}")
            if value.dtype != np.float32 and not np.array_equal(value, ref):
                raise ValueError(f"model {k}'s constant {name} differs from model 1's")
    for init in base.graph.initializer:
        if weights[0][init.name].dtype == np.float32:  # the same rule as the check above
            mean = np.mean([w[init.name] for w in weights], axis=0, dtype=np.float64).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(mean, init.name))
    return base.SerializeToString()


def soup(settings: Settings, ingredients: Sequence[Path], clean_dir: Path, out: Path | None = None,
         extra_clean: Sequence[Path] = ()) -> SoupReport:
    """Average fine-tuned models that share their start and calibration photos, then recalibrate.

    Needs no torch. The ingredients must come from ``finetune`` with the same seed (the same
    initial head), split and input size, so their calibration photos are the same and none of
    them trained on those; the soup's threshold is set on them afresh. ``clean_dir`` and
    ``extra_clean`` are where those photos are found again (by content hash).
    """
    from mining.lake import sha256_file
    from mining.watermark import CnnDetector, cnn_dir, list_images

    t0 = time.perf_counter()
    for d in ingredients:
        if not (d / "meta.json").is_file() or not (d / CnnDetector.model_file).is_file():
            raise ValueError(f"{d} is not a fine-tuned model folder (no meta.json and {CnnDetector.model_file})")
    metas = [json.loads((d / "meta.json").read_text()) for d in ingredients]
    first = metas[0]
    for d, meta in zip(ingredients, metas, strict=True):
        if "calibration_photos_sha256" not in meta or "config" not in meta:
            raise ValueError(f"{d} is not a fine-tuned model with recorded calibration photos")
        for key in ("cnn_version", "input_size", "calibration_photos_sha256"):
            if meta.get(key) != first.get(key):
                raise ValueError(f"{d} differs from {ingredients[0]} in {key}: only runs of one split and start mix")
        for key in ("seed", "pool_top", "calibration", "holdout"):
            if meta["config"].get(key) != first["config"].get(key):
                raise ValueError(f"{d} differs from {ingredients[0]} in config {key}: only runs of one split "
                                 "and start mix")
        if meta.get("training", {}).get("init") != first.get("training", {}).get("init"):
            raise ValueError(f"{d} started from other weights than {ingredients[0]}")
    data = soup_weights([(d / CnnDetector.model_file).read_bytes() for d in ingredients])
    fields = FinetuneConfig.__dataclass_fields__
    config = FinetuneConfig(**{k: v for k, v in first["config"].items() if k in fields})
    wanted = set(first["calibration_photos_sha256"])
    found: dict[str, Path] = {}
    for folder in (clean_dir, *extra_clean):
        for f in list_images(folder):
            if (digest := sha256_file(f)) in wanted:
                found.setdefault(digest, f)
    if len(found) < len(wanted):
        raise ValueError(f"{len(wanted) - len(found)} of the {len(wanted)} calibration photos are not under "
                         f"{', '.join(str(d) for d in (clean_dir, *extra_clean))}: pass the folders the "
                         "ingredients trained with (--clean, --extra-clean)")
    calib_files = sorted(found.values())
    threshold, metrics, calibration = calibrate(settings, data, config, calib_files)
    version = model_version(data)
    seen = sorted(set().union(*(m["train_photos_sha256"] for m in metas)))
    meta = {**first, "version": version, "threshold": threshold, "created_at": time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "metrics": metrics, "train_photos_sha256": seen,
            "calibration": calibration,
            "soup": [{"path": str(d), "version": m["version"], "config": m["config"],
                      "metrics": m.get("metrics")} for d, m in zip(ingredients, metas, strict=True)]}
    target = out or cnn_dir(settings)
    CnnDetector.save(target, data, meta)
    return SoupReport(version=version, path=str(target), ingredients=[m["version"] for m in metas],
                      calibration_photos=len(calib_files), threshold=threshold,
                      seconds=round(time.perf_counter() - t0, 1), **metrics)
