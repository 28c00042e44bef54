"""Attention/FFN disaggregated ("Transformerless") serving over local worker processes.

See docs/transformerless.md: a front (``front.AFDEngine``) with ``LLMEngine``'s interface,
data-parallel attention workers and tensor-parallel FFN workers joined by a torch.distributed
data plane and a ZeroMQ control plane.
"""
