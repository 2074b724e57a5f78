"""Top-H decoding: keep the largest set of most-probable tokens whose renormalised entropy
stays <= alpha * H(p). reference.py is the specification; ops.py dispatches."""
from .ops import top_h_filter, top_h_filter_, top_h_keep_mask_torch
from .reference import top_h_filter_reference, top_h_keep_mask

__all__ = ["top_h_filter", "top_h_filter_", "top_h_keep_mask_torch",
           "top_h_filter_reference", "top_h_keep_mask"]
