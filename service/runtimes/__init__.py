"""Inference runtimes: a small protocol and its torch and ONNX Runtime implementations."""
