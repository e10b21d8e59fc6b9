"""Stepwise's benchmark: full-size architectures with random weights, our engine side by side with
PyTorch and OpenVINO, FLOPs counted from the ONNX graph, the tuning of our own ONNX Runtime path.

Export-time stack only (torch, diffusers, onnx; OpenVINO and matplotlib from the optional ``bench`` extra).
"""
