"""leanserve inside vLLM. Each module binds one kernel to one vLLM interface:

* top_h.py — Top-H logits processors (loaded with vLLM's --logits-processors).
"""
