"""Block quantization of the fp32 graph onnxruntime-genai's ModelBuilder writes, in place.

The builder's own int4 (MatMulNBits with integer zero points from a round-to-nearest of the
weights) loses much of a model whose weights came from a GGUF file: their Q4_1 blocks are
``w = d*q + m`` with a float offset ``m`` that an integer zero point cannot hold. Float zero
points hold it but leave onnxruntime's fast CPU kernel. This module keeps the fast kernel and
adds the rest back exactly. Per block of ``block_size`` weights along K, with
``s = (max - min) / 15``, ``q = round((w - min) / s)`` and the integer zero point
``z = round(-min / s)`` (clamped to 0..15):

    w = s*(q - z) + r,   r = min + s*z   (one float per block, |r| <= s/2 unless clamped)

so ``x @ W = MatMulNBits(x; q, s, z) + BlockSum(x) @ R``, where ``BlockSum(x)`` sums each
block of ``x``'s last axis (``[..., K/bs]``) and ``R`` is ``[K/bs, N]``: a small MatMul beside
the big one. On Q4_1 weights min and max are ``m`` and ``m + 15d``, so the grid is reproduced to
float rounding; on any other weights it is min-max asymmetric round-to-nearest whose zero-point
rounding costs nothing. Without ``exact_offsets`` it is the builder's integer-zero-point RTN.

8 bits: symmetric blocks, ``s = max|w| / 127``, the kernel's implicit zero point 128: exactly
GGUF's Q8_0. The LM head (the MatMul that gives the graph output ``logits``) takes its own
width; a tied embedding (``Gather(Transpose(lm_head weight), input_ids)``) becomes a
``GatherBlockQuantized`` over the LM head's bytes, so the table is stored once; an untied one is
quantized the same way on its own.

The graph's inputs and outputs keep their names, so ``genai_config.json`` stays valid. Each
weight is read from the external data file and quantized in slices of output rows; the new
data file is written as it goes, beside the old, and both files are renamed over the old ones
at the end. Runs in the builder image (or here with the local engine): numpy and onnx.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MODEL = "model.onnx"
DATA = "model.onnx.data"
BITS = (4, 8)
BLOCK_SIZES = (16, 32, 64, 128)
LM_HEAD_BITS = (4, 8, None)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
LOGITS = "logits"
INPUT_IDS = "input_ids"
MS_DOMAIN = "com.microsoft"
INLINE_BYTES = 1024  # smaller tensors stay in model.onnx (as the builder's own save does)
ALIGN_BYTES = 4096  # large tensors start on a page, so onnxruntime can map them
ALIGN_FROM = 65536
SLICE_ELEMENTS = 1 << 24  # weights are quantized in slices of output rows of about this many values
COPY_BYTES = 1 << 26
_MAX_WALK = 8  # nodes between the LM head MatMul and `logits` (bias Add, soft-capping, Cast)


@dataclass(frozen=True)
class Settings:
    """How the weights are quantized (``Settings.from_json`` of the plan's ``quantize``)."""

    bits: int  # 4 or 8: the linear layers
    block_size: int = 32  # weights per block along K: 16, 32, 64 or 128
    # 8, 4 or None (the LM head and the embedding stay fp32). A tied embedding shares the LM
    # head's bytes (GatherBlockQuantized); an untied one is quantized the same way on its own.
    lm_head_bits: int | None = 8
    accuracy_level: int = 4  # MatMulNBits accuracy_level; 4: int8 activations, the fast CPU path
    # 4 bits only (8 bits is symmetric): integer zero points plus the block-sum correction.
    exact_offsets: bool = True

    def __post_init__(self) -> None:
        _check_choice("bits", self.bits, BITS)
        _check_choice("block_size", self.block_size, BLOCK_SIZES)
        _check_choice("lm_head_bits", self.lm_head_bits, LM_HEAD_BITS)
        _check_choice("accuracy_level", self.accuracy_level, ACCURACY_LEVELS)
        if not isinstance(self.exact_offsets, bool):
            raise ValueError(f"`exact_offsets` must be true or false, not {self.exact_offsets!r}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Settings:
        if not isinstance(data, dict):
            raise ValueError(f"quantization settings must be a mapping, not {type(data).__name__}")
        names = [f for f in cls.__dataclass_fields__]
        for key in data:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f" Perhaps you meant `{close[0]}`?" if close else f" Known: {', '.join(names)}."
                raise ValueError(f"unknown quantization setting `{key}`.{hint}")
        if "bits" not in data:
            raise ValueError("quantization settings need `bits` (4 or 8)")
        return cls(**data)


def _check_choice(name: str, value: object, allowed: tuple[int | None, ...]) -> None:
    # bool is an int to Python (`bits: true` is a mistake, not 1), and 4.0 is not a bit width.
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)) or value not in allowed:
        shown = ", ".join("null" if a is None else str(a) for a in allowed)
        raise ValueError(f"`{name}` must be one of {shown}, not {value!r}")


# -- quantizing one matrix -------------------------------------------------------------------


@dataclass
class Blocks:
    """One slice of rows (output channels) quantized in blocks along its columns (K)."""

    data: np.ndarray  # uint8 [rows, blocks, block_size * bits / 8]
    scales: np.ndarray  # float [rows, blocks]
    zero_points: np.ndarray | None  # uint8 [rows, blocks], unpacked; None: the kernel's default
    residual: np.ndarray | None  # float [rows, blocks]: r in w = s*(q - z) + r
    max_error: float  # max |w - dequantized w| over the slice


def quantize_rows(rows: np.ndarray, bits: int, block_size: int, exact_offsets: bool) -> Blocks:
    """Quantize ``rows`` ([n, K], float) in blocks of ``block_size`` along K. K that is not a
    multiple of the block is padded with each row's last value (which moves no min or max)."""
    n, k = rows.shape
    blocks = -(-k // block_size)
    w = rows.astype(np.float32, copy=False)
    if blocks * block_size != k:
        w = np.pad(w, ((0, 0), (0, blocks * block_size - k)), mode="edge")
    b = w.reshape(n, blocks, block_size)
    residual: np.ndarray | None = None
    zero: np.ndarray | None = None
    if bits == 8:
        amax = np.abs(b).max(-1)
        s = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
        q = np.clip(np.rint(b / s[..., None]), -127, 127)
        deq = s[..., None] * q
        data = (q + 128).astype(np.uint8)
    else:
        lo, hi = b.min(-1), b.max(-1)
        if exact_offsets:
            span = hi - lo
            flat = span == 0
            # A constant block: q = z = 0 and r holds the value (any nonzero scale will do).
            s = np.where(flat, np.maximum(np.abs(lo), np.float32(1e-30)), span / np.float32(15)).astype(np.float32)
            q = np.clip(np.rint((b - lo[..., None]) / s[..., None]), 0, 15)
            zf = np.where(flat, 0, np.clip(np.rint(-lo / s), 0, 15)).astype(np.float32)
            residual = (lo + s * zf).astype(np.float32)
            deq = s[..., None] * (q - zf[..., None]) + residual[..., None]
        else:
            # The range includes 0 so that the integer zero point exists (the builder's RTN).
            lo0, hi0 = np.minimum(lo, 0), np.maximum(hi, 0)
            span = hi0 - lo0
            s = np.where(span > 0, span / np.float32(15), np.float32(1)).astype(np.float32)
            zf = np.clip(np.rint(-lo0 / s), 0, 15).astype(np.float32)
            q = np.clip(np.rint(b / s[..., None]) + zf[..., None], 0, 15)
            deq = s[..., None] * (q - zf[..., None])
        zero = zf.astype(np.uint8)
        qb = q.astype(np.uint8)
        data = (qb[..., 0::2] | (qb[..., 1::2] << 4)).astype(np.uint8)
    err = np.abs(deq.reshape(n, -1)[:, :k] - w[:, :k]).max() if n and k else 0.0
    return Blocks(data, s, zero, residual, float(err))


def pack_zero_points(zero: np.ndarray) -> np.ndarray:
    """4-bit zero points [rows, blocks] as MatMulNBits and GatherBlockQuantized take them: two
    per byte, each row padded to a whole byte."""
    n, blocks = zero.shape
    if blocks % 2:
        zero = np.concatenate([zero, np.zeros((n, 1), np.uint8)], axis=1)
    packed: np.ndarray = (zero[:, 0::2] | (zero[:, 1::2] << 4)).astype(np.uint8)
    return packed


# -- reading and writing tensors -------------------------------------------------------------


class Source:
    """The original model's initializers, read lazily (a memory map of each external file)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._maps: dict[str, np.ndarray] = {}

    def _map(self, location: str) -> np.ndarray:
        if location not in self._maps:
            path = (self.folder / location).resolve()
            if not path.is_relative_to(self.folder.resolve()):
                raise ValueError(f"external data `{location}` lies outside the model folder")
            self._maps[location] = np.memmap(path, dtype=np.uint8, mode="r")
        return self._maps[location]

    def raw(self, t: TensorProto) -> np.ndarray:
        """The tensor's bytes (uint8, a view into the map where external)."""
        if t.data_location == TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            offset = int(info.get("offset", 0))
            whole = self._map(info["location"])
            length = int(info["length"]) if "length" in info else len(whole) - offset
            return whole[offset : offset + length]
        return np.frombuffer(numpy_helper.to_array(t).tobytes(), dtype=np.uint8)

    def array(self, t: TensorProto) -> np.ndarray:
        if t.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(t)
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        return self.raw(t).view(dtype).reshape(tuple(t.dims))

    def locations(self) -> set[str]:
        return set(self._maps)

    def close(self) -> None:
        self._maps.clear()


class Writer:
    """Appends tensors to the new external data file; each returns its TensorProto."""

    def __init__(self, stream: BinaryIO, location: str) -> None:
        self.stream = stream
        self.location = location
        self.offset = 0

    def _start(self, nbytes: int) -> int:
        align = ALIGN_BYTES if nbytes >= ALIGN_FROM else 16
        pad = -self.offset % align
        if pad:
            self.stream.write(b"\0" * pad)
            self.offset += pad
        return self.offset

    def _proto(self, name: str, data_type: int, dims: tuple[int, ...], start: int) -> TensorProto:
        t = TensorProto()
        t.name = name
        t.data_type = data_type
        t.dims.extend(dims)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(start)), ("length", str(self.offset - start))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        return t

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array)
        if array.nbytes < INLINE_BYTES:
            return numpy_helper.from_array(array, name)
        start = self._start(array.nbytes)
        self.stream.write(array.tobytes())
        self.offset += array.nbytes
        return self._proto(name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape, start)

    def copy(self, t: TensorProto, raw: np.ndarray) -> TensorProto:
        """An unchanged tensor, its bytes copied in pieces."""
        start = self._start(len(raw))
        for at in range(0, len(raw), COPY_BYTES):
            self.stream.write(raw[at : at + COPY_BYTES].tobytes())
        self.offset += len(raw)
        out = self._proto(t.name, t.data_type, tuple(t.dims), start)
        out.doc_string = t.doc_string
        return out

    def pieces(self, name: str, data_type: int, dims: tuple[int, ...], parts: Iterator[np.ndarray]) -> TensorProto:
        """A tensor written as it is made, slice by slice along its first axis."""
        start = self._start(int(np.prod(dims)))
        for part in parts:
            self.stream.write(np.ascontiguousarray(part).tobytes())
            self.offset += part.nbytes
        return self._proto(name, data_type, dims, start)


# -- the graph --------------------------------------------------------------------------------


@dataclass
class Quantized:
    """A weight matrix quantized and written: the names of its tensors in the new graph."""

    rows: int  # N (or V for an embedding table)
    k: int
    blocks: int
    bits: int
    data: str  # [rows, blocks, bytes per block]
    scales: str  # [rows * blocks]
    zero_points: str | None  # packed, [rows * ceil(blocks / 2)]
    residual: str | None  # [blocks, rows] (a MatMul weight) or [rows, blocks] (an embedding table)
    max_error: float


@dataclass
class _Rewrite:
    model: onnx.ModelProto
    source: Source
    writer: Writer
    settings: Settings
    inits: dict[str, TensorProto] = field(default_factory=dict)
    new_inits: list[TensorProto] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    embedding: str = "none"

    def name(self, base: str) -> str:
        """A tensor name not yet in the graph."""
        taken = self.inits.keys() | {t.name for t in self.new_inits}
        out, i = base, 1
        while out in taken:
            out, i = f"{base}_{i}", i + 1
        return out

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.name(base)
        self.new_inits.append(self.writer.tensor(name, array))
        return name

    def record(self, kind: str, max_error: float) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.errors[kind] = max(self.errors.get(kind, 0.0), max_error)

    def quantize(self, base: str, weight: np.ndarray, bits: int, *, transpose: bool, residual_rows_first: bool) -> Quantized:
        """Quantize ``weight`` ([K, N] with ``transpose``, else [rows, K]) slice by slice of rows."""
        settings = self.settings
        exact = settings.exact_offsets and bits == 4
        rows, k = (weight.shape[1], weight.shape[0]) if transpose else weight.shape
        blocks = -(-k // settings.block_size)
        step = max(1, SLICE_ELEMENTS // max(k, 1))
        scales: list[np.ndarray] = []
        zeros: list[np.ndarray] = []
        residuals: list[np.ndarray] = []
        worst = [0.0]

        def parts() -> Iterator[np.ndarray]:
            for at in range(0, rows, step):
                piece = weight[:, at : at + step].T if transpose else weight[at : at + step]
                got = quantize_rows(np.asarray(piece, dtype=np.float32), bits, settings.block_size, exact)
                scales.append(got.scales)
                if got.zero_points is not None:
                    zeros.append(got.zero_points)
                if got.residual is not None:
                    residuals.append(got.residual)
                worst[0] = max(worst[0], got.max_error)
                yield got.data

        blob = settings.block_size * bits // 8
        data = self.name(f"{base}_Q{bits}G{settings.block_size}")
        self.new_inits.append(self.writer.pieces(data, TensorProto.UINT8, (rows, blocks, blob), parts()))
        scale = self.const(f"{base}_scales", np.concatenate(scales).reshape(-1))
        zero = None
        if bits == 4:
            zero = self.const(f"{base}_zero_points", pack_zero_points(np.concatenate(zeros)).reshape(-1))
        residual = None
        if exact:
            r = np.concatenate(residuals)
            residual = self.const(f"{base}_residual", r if residual_rows_first else np.ascontiguousarray(r.T))
        return Quantized(rows, k, blocks, bits, data, scale, zero, residual, worst[0])


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def _used_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node reads, in subgraphs too."""
    used: set[str] = set()
    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                used |= _used_names(sub)
    used.update(o.name for o in graph.output)
    return used


def _float_matrix(t: TensorProto | None) -> bool:
    return t is not None and t.data_type == TensorProto.FLOAT and len(t.dims) == 2


def find_lm_head(graph: onnx.GraphProto, inits: dict[str, TensorProto]) -> onnx.NodeProto | None:
    """The MatMul whose result becomes ``logits``: its producer, or a few nodes up (a bias Add,
    soft-capping, a Cast), following the input that is not a weight."""
    producers = _producers(graph)
    name = LOGITS if any(o.name == LOGITS for o in graph.output) else None
    for _ in range(_MAX_WALK):
        node = producers.get(name) if name else None
        if node is None:
            return None
        if node.op_type == "MatMul" and _float_matrix(inits.get(node.input[1])):
            return node
        flowing = [i for i in node.input if i and i not in inits and i in producers]
        name = flowing[0] if flowing else None
    return None


def find_embedding(graph: onnx.GraphProto, inits: dict[str, TensorProto]) -> tuple[onnx.NodeProto, str, onnx.NodeProto | None] | None:
    """The Gather of ``input_ids`` from a float table: (the Gather, the table's initializer, the
    Transpose between them for a table tied to the LM head, else None)."""
    producers = _producers(graph)
    for node in graph.node:
        if node.op_type != "Gather" or len(node.input) < 2 or node.input[1] != INPUT_IDS:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if axis != 0:
            continue
        if _float_matrix(inits.get(node.input[0])):
            return node, node.input[0], None
        up = producers.get(node.input[0])
        perm = next((list(a.ints) for a in up.attribute if a.name == "perm"), [1, 0]) if up else None
        if up is not None and up.op_type == "Transpose" and perm == [1, 0] and _float_matrix(inits.get(up.input[0])):
            return node, up.input[0], up
    return None


def _ids_rank(graph: onnx.GraphProto) -> int:
    for i in graph.input:
        if i.name == INPUT_IDS and i.type.tensor_type.HasField("shape"):
            return len(i.type.tensor_type.shape.dim)
    return 2  # [batch, sequence]: what every ModelBuilder decoder takes


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _ranks(graph: onnx.GraphProto) -> dict[str, int]:
    """The rank of each tensor whose shape the graph declares (ModelBuilder declares them all)."""
    return {v.name: len(v.type.tensor_type.shape.dim)
            for v in [*graph.value_info, *graph.input, *graph.output] if v.type.tensor_type.HasField("shape")}


class _BlockSums:
    """``BlockSum(x)`` for each activation that feeds a corrected MatMul, made once per input.
    Every node costs a few microseconds per token on a CPU, as much as the arithmetic here: with
    the input's rank known (as ModelBuilder declares it) it is one Reshape and one ReduceSum."""

    def __init__(self, rw: _Rewrite) -> None:
        self.rw = rw
        self.made: dict[tuple[str, int, int], str] = {}
        self.ranks = _ranks(rw.model.graph)

    def get(self, x: str, k: int, blocks: int, out: list[onnx.NodeProto]) -> str:
        key = (x, k, blocks)
        if key in self.made:
            return self.made[key]
        rw, bs = self.rw, self.rw.settings.block_size
        tag = rw.name(f"{x}/BlockSum{bs}")
        src = x
        if blocks * bs != k:  # the last block is short: zeros make it whole (Pad with axes: opset 18)
            pads = rw.const(f"{tag}/pads", np.array([0, blocks * bs - k], np.int64))
            axes = rw.const(f"{tag}/axes", np.array([-1], np.int64))
            src = f"{tag}/Pad/output_0"
            out.append(helper.make_node("Pad", [x, pads, "", axes], [src], name=f"{tag}/Pad"))
        rank = self.ranks.get(x)
        if rank is not None:  # 0 keeps a dimension as it is
            shape = rw.const(f"{tag}/shape", np.array([0] * (rank - 1) + [blocks, bs], np.int64))
        else:
            lead = f"{tag}/Shape/output_0"
            out.append(helper.make_node("Shape", [x], [lead], name=f"{tag}/Shape", end=-1))
            tail = rw.const(f"{tag}/blocks", np.array([blocks, bs], np.int64))
            shape = f"{tag}/Concat/output_0"
            out.append(helper.make_node("Concat", [lead, tail], [shape], name=f"{tag}/Concat", axis=0))
        grouped = f"{tag}/Reshape/output_0"
        out.append(helper.make_node("Reshape", [src, shape], [grouped], name=f"{tag}/Reshape"))
        last = rw.const(f"{tag}/last", np.array([-1], np.int64))
        sums = f"{tag}/ReduceSum/output_0"
        out.append(helper.make_node("ReduceSum", [grouped, last], [sums], name=f"{tag}/ReduceSum", keepdims=0))
        self.made[key] = sums
        return sums


def _matmul_nbits(rw: _Rewrite, node: onnx.NodeProto, q: Quantized, sums: _BlockSums, out: list[onnx.NodeProto]) -> None:
    """MatMulNBits in place of ``node`` (and the residual correction after it)."""
    ins = [node.input[0], q.data, q.scales] + ([q.zero_points] if q.zero_points else [])
    result = node.output[0]
    if q.residual is not None:
        result = f"{node.output[0]}/MatMulNBits"
    out.append(helper.make_node(
        "MatMulNBits", ins, [result], name=f"{node.name}_Q{q.bits}", domain=MS_DOMAIN,
        K=q.k, N=q.rows, bits=q.bits, block_size=rw.settings.block_size, accuracy_level=rw.settings.accuracy_level))
    if q.residual is not None:
        block_sums = sums.get(node.input[0], q.k, q.blocks, out)
        fix = f"{node.name}/Residual/output_0"
        out.append(helper.make_node("MatMul", [block_sums, q.residual], [fix], name=f"{node.name}/Residual"))
        out.append(helper.make_node("Add", [result, fix], [node.output[0]], name=f"{node.name}/AddResidual"))


def _gather_quantized(rw: _Rewrite, gather: onnx.NodeProto, q: Quantized, h: int, *, shared: bool,
                      out: list[onnx.NodeProto]) -> None:
    """GatherBlockQuantized in place of the embedding ``gather``; ``shared``: ``q`` is the LM
    head's (its residual [blocks, V]), else the table's own (residual [V, blocks])."""
    tag = gather.name or "/model/embed_tokens"
    bs = rw.settings.block_size
    width = q.blocks * bs * q.bits // 8
    data_shape = rw.const(f"{tag}/data_shape", np.array([q.rows, width], np.int64))
    table = f"{tag}/DataReshape/output_0"
    out.append(helper.make_node("Reshape", [q.data, data_shape], [table], name=f"{tag}/DataReshape"))
    rows_shape = rw.const(f"{tag}/scales_shape", np.array([q.rows, -1], np.int64))
    scales = f"{tag}/ScalesReshape/output_0"
    out.append(helper.make_node("Reshape", [q.scales, rows_shape], [scales], name=f"{tag}/ScalesReshape"))
    ins = [table, gather.input[1], scales]
    if q.zero_points:
        zero = f"{tag}/ZeroPointsReshape/output_0"
        out.append(helper.make_node("Reshape", [q.zero_points, rows_shape], [zero], name=f"{tag}/ZeroPointsReshape"))
        ins.append(zero)
    padded = q.blocks * bs != h
    result = gather.output[0]
    if q.residual is not None or padded:
        result = f"{tag}/GatherBlockQuantized/output_0"
    out.append(helper.make_node("GatherBlockQuantized", ins, [result], name=f"{tag}/GatherBlockQuantized",
                                domain=MS_DOMAIN, bits=q.bits, block_size=bs, gather_axis=0, quantize_axis=1))
    if q.residual is not None:
        # r per (token, block), spread over the block's columns: [*ids, blocks] -> [*ids, blocks * bs]
        per_token = f"{tag}/ResidualGather/output_0"
        if shared:
            picked = f"{tag}/ResidualGather/picked"
            out.append(helper.make_node("Gather", [q.residual, gather.input[1]], [picked], name=f"{tag}/ResidualGather", axis=1))
            rank = _ids_rank(rw.model.graph)
            out.append(helper.make_node("Transpose", [picked], [per_token], name=f"{tag}/ResidualTranspose",
                                        perm=[*range(1, rank + 1), 0]))
        else:
            out.append(helper.make_node("Gather", [q.residual, gather.input[1]], [per_token], name=f"{tag}/ResidualGather", axis=0))
        minus_one = rw.const(f"{tag}/minus_one", np.array([-1], np.int64))
        column = f"{tag}/ResidualUnsqueeze/output_0"
        out.append(helper.make_node("Unsqueeze", [per_token, minus_one], [column], name=f"{tag}/ResidualUnsqueeze"))
        ones = rw.const(f"{tag}/ones", np.ones(bs, np.float32))
        spread = f"{tag}/ResidualSpread/output_0"
        out.append(helper.make_node("Mul", [column, ones], [spread], name=f"{tag}/ResidualSpread"))
        like = f"{tag}/ResidualShape/output_0"
        out.append(helper.make_node("Shape", [result], [like], name=f"{tag}/ResidualShape"))
        flat = f"{tag}/ResidualReshape/output_0"
        out.append(helper.make_node("Reshape", [spread, like], [flat], name=f"{tag}/ResidualReshape"))
        total = gather.output[0] if not padded else f"{tag}/AddResidual/output_0"
        out.append(helper.make_node("Add", [result, flat], [total], name=f"{tag}/AddResidual"))
        result = total
    if padded:  # the padded columns of the last block are not the model's
        starts = rw.const(f"{tag}/slice_starts", np.array([0], np.int64))
        ends = rw.const(f"{tag}/slice_ends", np.array([h], np.int64))
        axes = rw.const(f"{tag}/slice_axes", np.array([-1], np.int64))
        out.append(helper.make_node("Slice", [result, starts, ends, axes], [gather.output[0]], name=f"{tag}/Slice"))


def _rewrite(rw: _Rewrite) -> None:
    graph, settings = rw.model.graph, rw.settings
    rw.inits = {t.name: t for t in graph.initializer}
    lm = find_lm_head(graph, rw.inits)
    emb = find_embedding(graph, rw.inits)
    done: dict[str, Quantized] = {}  # MatMul weight name -> its quantized tensors
    sums = _BlockSums(rw)
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        weight = rw.inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or not _float_matrix(weight):
            nodes.append(node)
            continue
        is_head = lm is not None and node is lm
        bits = settings.lm_head_bits if is_head else settings.bits
        if bits is None:
            nodes.append(node)
            continue
        q = done.get(weight.name)
        if q is None:
            q = rw.quantize(weight.name, rw.source.array(weight), bits, transpose=True, residual_rows_first=False)
            done[weight.name] = q
            rw.record("lm_head" if is_head else "linear", q.max_error)
        _matmul_nbits(rw, node, q, sums, nodes)
    if emb is not None and settings.lm_head_bits is not None:
        gather, table, transpose = emb
        at = next(i for i, n in enumerate(nodes) if n is gather)
        made: list[onnx.NodeProto] = []
        t = rw.inits[table]
        if transpose is not None:
            q = done.get(table)
            if q is not None and q.bits == settings.lm_head_bits:
                _gather_quantized(rw, gather, q, q.k, shared=True, out=made)
                rw.embedding = "shared with the LM head"
                rw.record("embedding", q.max_error)
            else:
                rw.embedding = "fp32 (tied to an LM head that was not quantized)"
        elif (head := _tied_head(rw, lm, t, done)) is not None:
            # A tied model whose converter wrote the table twice (Olive's ModelBuilder pass does):
            # the same numbers, so the same bytes serve both.
            _gather_quantized(rw, gather, head, head.k, shared=True, out=made)
            rw.embedding = "shared with the LM head (an equal copy dropped)"
            rw.record("embedding", head.max_error)
        else:
            q = rw.quantize(table, rw.source.array(t), settings.lm_head_bits, transpose=False, residual_rows_first=True)
            _gather_quantized(rw, gather, q, q.k, shared=False, out=made)
            rw.embedding = "own"
            rw.record("embedding", q.max_error)
        if made:
            nodes[at : at + 1] = made
    if any(n.op_type == "Pad" for n in nodes) and _opset(rw.model) < 18:
        raise ValueError("K not a multiple of the block size needs opset 18 or later (Pad with axes)")
    del graph.node[:]
    graph.node.extend(_without_dead(nodes, graph))


def _tied_head(rw: _Rewrite, lm: onnx.NodeProto | None, table: TensorProto,
               done: dict[str, Quantized]) -> Quantized | None:
    """The LM head's quantized weight when the embedding table equals its transpose exactly (a
    tied model saved with two copies), else None. Compared a slice of rows at a time."""
    if lm is None:
        return None
    q = done.get(lm.input[1])
    head = rw.inits.get(lm.input[1])
    if q is None or head is None or q.bits != rw.settings.lm_head_bits:
        return None
    emb, w = rw.source.array(table), rw.source.array(head)  # [V, H] and [H, V]
    if emb.ndim != 2 or w.ndim != 2 or emb.shape != (w.shape[1], w.shape[0]):
        return None
    step = 4096
    for start in range(0, emb.shape[0], step):
        if not np.array_equal(emb[start:start + step], w[:, start:start + step].T):
            return None
    return q


def _without_dead(nodes: list[onnx.NodeProto], graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Drop the Transposes a shared embedding no longer reads (and anything else left unread
    that this rewrite orphaned: only Transpose nodes, the one kind it can orphan)."""
    while True:
        read = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
        keep = [n for n in nodes if n.op_type != "Transpose" or any(o in read for o in n.output)]
        if len(keep) == len(nodes):
            return keep
        nodes = keep


def _folder_bytes(folder: Path, names: set[str]) -> int:
    return sum((folder / n).stat().st_size for n in names if (folder / n).is_file())


def quantize_folder(folder: Path, settings: Settings) -> dict[str, Any]:
    """Rewrite ``folder/model.onnx`` (and ``model.onnx.data``) in place: the linear layers as
    MatMulNBits, the LM head and embedding as ``settings`` say. The new files are written
    beside the old and renamed over them; a failure leaves the old model as it was. Returns a
    summary: counts per kind (``linear``, ``lm_head``, ``embedding``), bytes before and after,
    the largest reconstruction error per kind (0 up to float rounding on weights already on the
    quantization grid, e.g. a GGUF's Q4_1 / Q8_0), and what became of the embedding."""
    folder = Path(folder)
    path = folder / MODEL
    if not path.is_file():
        raise ValueError(f"no {MODEL} in {folder}")
    model = onnx.load(str(path), load_external_data=False)
    source = Source(folder)
    old_locations = {e.value for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL
                     for e in t.external_data if e.key == "location"}
    before = _folder_bytes(folder, {MODEL} | old_locations)
    tmp_data = folder / f".{DATA}.quantizing"
    tmp_model = folder / f".{MODEL}.quantizing"
    try:
        with open(tmp_data, "wb") as stream:
            rw = _Rewrite(model, source, Writer(stream, DATA), settings)
            _rewrite(rw)
            if not rw.counts:
                raise ValueError(f"{MODEL} has no MatMul with a 2-D float32 weight to quantize")
            graph = model.graph
            used = _used_names(graph)
            kept: list[TensorProto] = []
            for t in graph.initializer:
                if t.name not in used:
                    continue
                kept.append(rw.writer.copy(t, source.raw(t)) if t.data_location == TensorProto.EXTERNAL else t)
            del graph.initializer[:]
            graph.initializer.extend(kept + rw.new_inits)
            produced = {o for n in graph.node for o in n.output}
            infos = [v for v in graph.value_info if v.name in produced]
            del graph.value_info[:]
            graph.value_info.extend(infos)
            stream.flush()
            os.fsync(stream.fileno())
        source.close()
        with open(tmp_model, "wb") as f:
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        # model.onnx goes first: between the renames there is no model rather than a model
        # whose data file does not match it.
        path.unlink()
        os.replace(tmp_data, folder / DATA)
        os.replace(tmp_model, path)
    except BaseException:
        source.close()
        for tmp in (tmp_data, tmp_model):
            tmp.unlink(missing_ok=True)
        raise
    for location in old_locations - {DATA}:
        (folder / location).unlink(missing_ok=True)
    return {
        "counts": dict(sorted(rw.counts.items())),
        "embedding": rw.embedding,
        "bytes_before": before,
        "bytes_after": _folder_bytes(folder, {MODEL, DATA}),
        "max_abs_error": {k: float(f"{v:.3g}") for k, v in sorted(rw.errors.items())},
    }
