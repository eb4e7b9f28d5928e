"""Plumbing for the GPT-2 on Triton on OCI tutorial, split by concern.

The notebooks import the top-level ``helpers`` module, which re-exports the public names
from here. Nothing in this package does work at import time: TensorFlow, onnxruntime and the
OCI SDK are imported inside the functions that need them.
"""
