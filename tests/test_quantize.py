"""Block quantization of the builder's fp32 graph (builder.build.quantize).

Most tests build a small graph by hand shaped as ModelBuilder writes it (an embedding Gather
of ``input_ids``, tied through a Transpose of the LM head weight or untied, MatMuls with 2-D
weights, the LM head MatMul giving ``logits``) with weights placed on GGUF's grids: Q4_1 for the
linear layers, Q8_0 for the LM head and embedding. On those grids the quantized graph must give
the fp32 graph's numbers (to float rounding); onnxruntime runs both at accuracy_level 0.
One integration test runs the same on a tiny Qwen2 converted by ModelBuilder.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

np = pytest.importorskip("numpy")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from builder.build.quantize import Settings, quantize_folder, quantize_rows  # noqa: E402
from conftest import need  # noqa: E402

V, H, F = 96, 64, 80  # F = 80: the second layer's K is not a multiple of 32 (nor of 64)


def q4_1(k: int, n: int, rng: np.random.Generator, block: int = 32) -> np.ndarray:
    """A [K, N] weight on a Q4_1 grid along K (w = d*q + m per block, q 0..15, both ends used,
    d and m fp16 as GGUF stores them), dequantized to fp32 as the GGUF converter does."""
    w = np.empty((k, n), np.float32)
    for start in range(0, k, block):
        rows = min(block, k - start)
        q = rng.integers(0, 16, size=(rows, n))
        q[0], q[-1] = 0, 15
        d = rng.uniform(0.001, 0.02, size=n).astype(np.float16).astype(np.float32)
        m = (-d * rng.uniform(0, 15, size=n)).astype(np.float16).astype(np.float32)
        w[start : start + rows] = d * q + m
    return w


def q8_0(rows: int, k: int, rng: np.random.Generator, block: int = 32) -> np.ndarray:
    """A [rows, K] table on a Q8_0 grid along K (w = d*q, q -127..127, |q| = 127 in each block)."""
    w = np.empty((rows, k), np.float32)
    for start in range(0, k, block):
        cols = min(block, k - start)
        q = rng.integers(-127, 128, size=(rows, cols))
        q[:, 0] = 127 * rng.choice([-1, 1], size=rows)
        d = rng.uniform(0.0005, 0.005, size=(rows, 1)).astype(np.float16).astype(np.float32)
        w[:, start : start + cols] = d * q
    return w


def write_graph(folder: Path, *, tied: bool, linear_bits: int = 4, seed: int = 0, copied: bool = False) -> Path:
    """model.onnx + model.onnx.data as ModelBuilder lays them out, weights on GGUF grids: the
    linear layers Q4_1 (``linear_bits`` 4) or Q8_0 (8), the LM head and embedding Q8_0."""
    rng = np.random.default_rng(seed)

    def linear(k: int, n: int) -> np.ndarray:
        return q4_1(k, n, rng) if linear_bits == 4 else np.ascontiguousarray(q8_0(n, k, rng).T)

    lm = np.ascontiguousarray(q8_0(V, H, rng).T)  # [H, V]: the MatMul's layout
    inits = [
        numpy_helper.from_array(linear(H, F), "model.layers.0.up.MatMul.weight"),
        numpy_helper.from_array(linear(F, H), "model.layers.0.down.MatMul.weight"),
        numpy_helper.from_array(lm, "lm_head.MatMul.weight"),
        numpy_helper.from_array(np.full(F, 0.5, np.float32), "model.layers.0.up.bias"),
    ]
    nodes = []
    if tied:
        nodes.append(helper.make_node("Transpose", ["lm_head.MatMul.weight"], ["/model/embed_tokens/Transpose/output_0"],
                                      name="/model/embed_tokens/Transpose"))
        table = "/model/embed_tokens/Transpose/output_0"
    else:  # copied: a tied model saved with the table twice (as Olive's ModelBuilder pass writes it)
        own = np.ascontiguousarray(lm.T) if copied else q8_0(V, H, rng)
        inits.append(numpy_helper.from_array(own, "model.embed_tokens.weight"))
        table = "model.embed_tokens.weight"
    nodes += [
        helper.make_node("Gather", [table, "input_ids"], ["emb"], name="/model/embed_tokens/Gather"),
        helper.make_node("MatMul", ["emb", "model.layers.0.up.MatMul.weight"], ["up"], name="/model/layers.0/up/MatMul"),
        helper.make_node("Add", ["up", "model.layers.0.up.bias"], ["up_b"], name="/model/layers.0/up/Add"),
        helper.make_node("Relu", ["up_b"], ["act"], name="/model/layers.0/act"),
        helper.make_node("MatMul", ["act", "model.layers.0.down.MatMul.weight"], ["down"], name="/model/layers.0/down/MatMul"),
        # the down projection and the embedding both feed the head: the head's input is a sum
        helper.make_node("Add", ["down", "emb"], ["hidden"], name="/model/layers.0/residual"),
        helper.make_node("MatMul", ["hidden", "lm_head.MatMul.weight"], ["logits"], name="/lm_head/MatMul"),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", V])],
        inits,
        # one activation's shape declared, as ModelBuilder declares them all: its block sums take
        # the short path (Reshape by rank), the others the general one (Shape, Concat)
        value_info=[helper.make_tensor_value_info("act", TensorProto.FLOAT, ["batch", "sequence", F])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    (folder / "genai_config.json").write_text("{}")
    return folder


def logits(folder: Path, ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": ids})[0]


IDS = np.array([[3, 17, 95, 0, 42], [1, 2, 3, 4, 5]], dtype=np.int64)


def quantized_copy(tmp_path: Path, tied: bool, settings: Settings) -> tuple[Path, Path, dict]:  # type: ignore[type-arg]
    ref = write_graph(tmp_path / "fp32", tied=tied, linear_bits=settings.bits)
    out = tmp_path / "q"
    shutil.copytree(ref, out)
    return ref, out, quantize_folder(out, settings)


def test_q4_1_blocks_are_reproduced() -> None:
    rng = np.random.default_rng(1)
    w = q4_1(F, 40, rng).T  # rows = output channels; K = 80: a short last block
    got = quantize_rows(w, 4, 32, exact_offsets=True)
    assert got.data.shape == (40, 3, 16)
    assert got.max_error < 1e-6 * float(np.abs(w).max())
    plain = quantize_rows(w, 4, 32, exact_offsets=False)  # the builder's integer zero points lose it
    assert plain.max_error > 100 * got.max_error


def test_q8_0_blocks_are_reproduced() -> None:
    w = q8_0(40, H, np.random.default_rng(2))
    assert quantize_rows(w, 8, 32, exact_offsets=True).max_error == 0.0


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize(("bits", "lm_head_bits"), [(4, 8), (8, 8), (4, None)])
def test_quantized_graph_gives_the_fp32_graphs_logits(tmp_path: Path, tied: bool, bits: int, lm_head_bits: int | None) -> None:
    settings = Settings(bits=bits, lm_head_bits=lm_head_bits, accuracy_level=0)
    ref, out, summary = quantized_copy(tmp_path, tied, settings)
    expected, got = logits(ref, IDS), logits(out, IDS)
    assert np.abs(got - expected).max() < 1e-5 * np.abs(expected).max()
    assert summary["counts"]["linear"] == 2
    assert all(err < 1e-6 for err in summary["max_abs_error"].values()), summary
    assert summary["bytes_after"] < summary["bytes_before"]
    if lm_head_bits is None:
        assert "lm_head" not in summary["counts"] and summary["embedding"] == "none"
    else:
        assert summary["counts"]["lm_head"] == summary["counts"]["embedding"] == 1
        assert summary["embedding"] == ("shared with the LM head" if tied else "own")


def test_the_fast_path_stays_close(tmp_path: Path) -> None:
    """accuracy_level 4 quantizes the activations to int8: close, not exact."""
    ref, out, _ = quantized_copy(tmp_path, True, Settings(bits=4))
    expected, got = logits(ref, IDS), logits(out, IDS)
    assert np.abs(got - expected).max() < 0.02 * np.abs(expected).max()


def test_lm_head_at_4_bits_is_exact_on_its_grid(tmp_path: Path) -> None:
    """A 4-bit LM head: its residual corrects the MatMul and (gathered) the shared embedding."""
    rng = np.random.default_rng(3)
    ref = write_graph(tmp_path / "fp32", tied=True)
    model = onnx.load(str(ref / "model.onnx"))
    for t in model.graph.initializer:
        if t.name == "lm_head.MatMul.weight":
            t.CopyFrom(numpy_helper.from_array(q4_1(H, V, rng), t.name))
    onnx.save_model(model, str(ref / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    out = tmp_path / "q"
    shutil.copytree(ref, out)
    summary = quantize_folder(out, Settings(bits=4, lm_head_bits=4, accuracy_level=0))
    expected, got = logits(ref, IDS), logits(out, IDS)
    assert np.abs(got - expected).max() < 1e-5 * np.abs(expected).max()
    assert summary["max_abs_error"]["embedding"] < 1e-6


def _initializers(folder: Path) -> dict[str, TensorProto]:
    return {t.name: t for t in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.initializer}


def test_a_tied_embedding_shares_the_lm_heads_bytes(tmp_path: Path) -> None:
    _, out, _ = quantized_copy(tmp_path, True, Settings(bits=4))
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    nodes = {n.name: n for n in model.graph.node}
    inits = _initializers(out)
    assert "lm_head.MatMul.weight" not in inits
    assert not any(n.op_type in ("Transpose", "Gather") and n.input[1:2] == ["input_ids"] for n in model.graph.node)
    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and n.output[0] == "logits")
    gather = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    reshape = next(n for n in nodes.values() if n.output[0] == gather.input[0])
    assert reshape.input[0] == head.input[1]  # the very same bytes
    big = [t for t in inits.values() if t.data_type == TensorProto.UINT8 and t.dims[0] == V]
    assert len(big) == 1
    assert [o.name for o in model.graph.output] == ["logits"] and [i.name for i in model.graph.input] == ["input_ids"]


def test_an_untied_embedding_is_quantized_on_its_own(tmp_path: Path) -> None:
    _, out, _ = quantized_copy(tmp_path, False, Settings(bits=4))
    inits = _initializers(out)
    assert "model.embed_tokens.weight" not in inits and "lm_head.MatMul.weight" not in inits
    gather = next(n for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
                  if n.op_type == "GatherBlockQuantized")
    assert gather.input[1] == "input_ids"


def test_a_tied_table_saved_twice_is_stored_once(tmp_path: Path) -> None:
    ref = write_graph(tmp_path / "fp32", tied=False, copied=True)
    out = tmp_path / "q"
    shutil.copytree(ref, out)
    summary = quantize_folder(out, Settings(bits=4, accuracy_level=0))
    assert summary["embedding"] == "shared with the LM head (an equal copy dropped)"
    kinds = [n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node]
    assert kinds.count("GatherBlockQuantized") == 1
    # one quantized table: the copy is gone, and only the head's bytes are quantized
    inits = _initializers(out)
    assert "model.embed_tokens.weight" not in inits
    assert [name for name in inits if name.endswith("_Q8G32")] == ["lm_head.MatMul.weight_Q8G32"]
    expected, got = logits(ref, IDS), logits(out, IDS)
    assert np.abs(got - expected).max() < 1e-4 * np.abs(expected).max()
    # a table that differs in one number is not the head's
    other = write_graph(tmp_path / "other", tied=False)
    assert quantize_folder(other, Settings(bits=4))["embedding"] == "own"


def test_block_sizes_that_do_not_divide_k(tmp_path: Path) -> None:
    """Block 64: K = 80 pads (the block sums too); H = 64 is whole. Block 128: H = 64 pads, so
    the shared embedding slices its output back to H."""
    for block in (64, 128):
        ref, out, summary = quantized_copy(tmp_path / str(block), True, Settings(bits=4, block_size=block, accuracy_level=0))
        expected, got = logits(ref, IDS), logits(out, IDS)
        # Q4_1 blocks of 32 are not on a grid of 64 or 128: this is ordinary round-to-nearest
        assert np.abs(got - expected).max() < 0.1 * np.abs(expected).max(), block
        assert summary["embedding"] == "shared with the LM head"


def test_the_summary_is_json_and_the_folder_clean(tmp_path: Path) -> None:
    _, out, summary = quantized_copy(tmp_path, True, Settings(bits=8))
    json.dumps(summary)
    assert sorted(p.name for p in out.iterdir()) == ["genai_config.json", "model.onnx", "model.onnx.data"]


def test_a_failure_leaves_the_model_as_it_was(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["logits"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2])])
    onnx.save_model(helper.make_model(graph), str(folder / "model.onnx"))
    before = (folder / "model.onnx").read_bytes()
    with pytest.raises(ValueError, match="no MatMul"):
        quantize_folder(folder, Settings(bits=4))
    assert (folder / "model.onnx").read_bytes() == before
    assert [p.name for p in folder.iterdir()] == ["model.onnx"]


def test_settings_round_trip() -> None:
    s = Settings(bits=4, block_size=64, lm_head_bits=None, accuracy_level=0, exact_offsets=False)
    assert Settings.from_json(json.loads(json.dumps(s.to_json()))) == s
    assert Settings.from_json({"bits": 8}) == Settings(bits=8)


@pytest.mark.parametrize(("data", "message"), [
    ({"bits": 3}, "`bits` must be one of 4, 8"),
    ({"bits": True}, "`bits`"),
    ({"bits": 4, "block_size": 48}, "`block_size`"),
    ({"bits": 4, "lm_head_bits": 16}, "`lm_head_bits` must be one of 4, 8, null"),
    ({"bits": 4, "accuracy_level": 4.0}, "`accuracy_level`"),
    ({"bits": 4, "accuracy_level": 5}, "`accuracy_level`"),
    ({"bits": 4, "exact_offsets": "yes"}, "`exact_offsets`"),
    ({"bits": 4, "blocksize": 32}, "Perhaps you meant `block_size`"),
    ({"block_size": 32}, "need `bits`"),
    ([4], "must be a mapping"),
])
def test_bad_settings_are_refused(data: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Settings.from_json(data)


@pytest.mark.integration
def test_a_modelbuilder_graph(tmp_path: Path) -> None:
    """A tiny Qwen2 (tied embeddings) through ModelBuilder fp32, its weights moved onto GGUF's
    grids, quantized: the same logits as the fp32 graph at accuracy_level 0."""
    need(importlib.util.find_spec("torch") is not None and importlib.util.find_spec("onnxruntime_genai") is not None,
         "torch and onnxruntime-genai are not installed")
    from tinymodel import make_tiny_model

    hf = make_tiny_model(tmp_path / "hf", hidden_size=64, intermediate_size=96, vocab_size=300, tie_word_embeddings=True)
    ref = tmp_path / "fp32"
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(ref),
                    "-p", "fp32", "-e", "cpu", "-c", str(tmp_path / "cache")], check=True, capture_output=True)
    model = onnx.load(str(ref / "model.onnx"))
    rng = np.random.default_rng(4)
    for t in model.graph.initializer:
        if t.name.endswith("MatMul.weight") and len(t.dims) == 2:
            k, n = t.dims
            w = np.ascontiguousarray(q8_0(n, k, rng).T) if t.name.startswith("lm_head") else q4_1(k, n, rng)
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    onnx.save_model(model, str(ref / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    out = tmp_path / "q"
    shutil.copytree(ref, out)
    summary = quantize_folder(out, Settings(bits=4, accuracy_level=0))
    assert summary["counts"] == {"embedding": 1, "linear": 10, "lm_head": 1}
    assert summary["embedding"] == "shared with the LM head"

    def run(folder: Path) -> np.ndarray:
        session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        feeds = {}
        for i in session.get_inputs():
            if i.name == "input_ids":
                feeds[i.name] = IDS
            elif i.name == "attention_mask":
                feeds[i.name] = np.ones_like(IDS)
            else:  # empty past key/values: [batch, kv heads, 0, head size]
                feeds[i.name] = np.zeros((IDS.shape[0], i.shape[1], 0, i.shape[3]), np.float32)
        return session.run(["logits"], feeds)[0]

    expected, got = run(ref), run(out)
    assert np.abs(got - expected).max() < 1e-4 * np.abs(expected).max()
