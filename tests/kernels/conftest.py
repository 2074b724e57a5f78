"""Kernel tests run Triton kernels on CPU through the interpreter; set it before triton is imported."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
