#!/usr/bin/env python3
"""Expose an intermediate hidden state of the `en` sentence encoder as a second graph output.

Usage: split_graph.py MODEL_ONNX OUT_ONNX [--output=layer_norm_10]

Fine-tuning at import time (`[inference] fine_tune`, src/engine/finetune) keeps the lower
transformer layers of all-MiniLM-L6-v2 frozen, run by ONNX Runtime from the shipped int8 model,
and trains the top one (layer 5) in Rust from the fp32 weights. The engine therefore needs the hidden
states between the two parts: this script copies MODEL_ONNX and adds the tensor named by
--output (default `layer_norm_10`: the output of layer 4; the export names the embeddings'
LayerNorm `layer_norm` and layer L's two `layer_norm_{2L+1}` and `layer_norm_{2L+2}`) to the
graph outputs, as float32 [batch, sequence, hidden]. Nothing else changes: `last_hidden_state`
stays the first output, and a session that asks for it alone computes exactly what the original
model computes (ONNX Runtime prunes whatever is not needed for the outputs a run asks for).
Needs: onnx.
"""

import sys

import onnx
from onnx import TensorProto, helper


def main(argv):
    args = [a for a in argv if not a.startswith("--output")]
    output = "layer_norm_10"
    for a in argv:
        if a.startswith("--output="):
            output = a.split("=", 1)[1]
    if len(args) != 2:
        sys.exit(__doc__.split("\n")[2])
    model = onnx.load(args[0])
    produced = {name for node in model.graph.node for name in node.output}
    if output not in produced:
        sys.exit(f"{args[0]}: no node produces a tensor named {output}")
    if any(o.name == output for o in model.graph.output):
        sys.exit(f"{args[0]}: {output} is already a graph output")
    model.graph.output.append(
        helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", "sequence", "hidden"])
    )
    onnx.checker.check_model(model)
    onnx.save(model, args[1])


if __name__ == "__main__":
    main(sys.argv[1:])
