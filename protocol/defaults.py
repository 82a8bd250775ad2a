"""Defaults both processes rely on: a value here is the one both sides assume when nobody names another.

The loader counts its budget with them and compute sizes its buffers with them; were the two to disagree, the
budget would count one thing and compute allocate another. Facts of a model (its head size, its KV cache) live
with the format, in ``quantizer.model_spec``; this module holds only process-wide choices.
"""

from __future__ import annotations

MiB = 1 << 20

DEFAULT_MAX_CONTEXT = 4096  # tokens of KV cache a run is sized for when none is asked for
DEFAULT_PREFILL_CHUNK = 512  # tokens per prefill forward pass; the planner may choose a longer one
# One process's CUDA context, cuBLAS workspace and loaded kernels, as the planner counts it (NVML measured
# 589 MiB for the loader and 519 MiB for compute on the H200).
CUDA_CONTEXT_BYTES = 640 * MiB
CUDA_PROCESSES = 2  # processes holding a CUDA context under one budget: the loader and compute
# Positions per page of compute's paged KV cache (``compute.kv_pages``): the planner counts the pool in whole pages.
KV_PAGE_TOKENS = 32

# The residency policies a loader can be asked for by name (on its command line and in SetPolicy); the loader's
# registry (``loader.policies.POLICIES``) implements exactly these.
POLICY_NAMES = ("resident", "stream", "hybrid")
DEFAULT_POLICY = "hybrid"
