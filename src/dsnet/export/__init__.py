"""ONNX export and the onnxruntime parity check."""
