"""2:4 semi-structured sparsity: packed format, Triton GEMM, torch reference, pruners (prune.py)."""
from .format import compress_24, compressed_nbytes, count_24_violations, decompress_24, is_24
from .ops import sparse24_linear
from .reference import sparse24_linear_reference

__all__ = ["compress_24", "decompress_24", "count_24_violations", "is_24", "compressed_nbytes",
           "sparse24_linear", "sparse24_linear_reference"]
