"""Fast training paths: a fused LoRA linear, chunked LM cross-entropy, fused decoder-block ops (Llama-like and Gemma families).

Every function here has a reference twin built from plain autograd ops; the fast one computes the
same function (tests/test_kernels.py). On CUDA the memory-bound pieces run as Triton kernels; on
CPU the same autograd functions run PyTorch ops.
"""

from .cuda_graph import GraphedTrainStep, graph_pool_bytes, peak_memory_bytes
from .cross_entropy import causal_lm_loss, chunked_cross_entropy, cross_entropy_reference, labels_forward
from .fused_ops import (
    GATED_ACTIVATIONS,
    gated_activation,
    gated_activation_reference,
    rms_norm,
    rms_norm_reference,
    rotary_embedding,
    rotary_embedding_reference,
    swiglu,
    swiglu_reference,
)
from .lora_linear import LoraParams, lora_linear, lora_linear_reference
from .lora_mlp import lora_fast_params, lora_mlp, lora_mlp_reference
from .patch import (
    block_graph_speedups,
    has_fused_path,
    is_patched,
    patch_model_for_training,
    patched_modules,
    release_block_graphs,
    unpatch_model,
)

__all__ = [
    "LoraParams",
    "has_fused_path",
    "patched_modules",
    "lora_linear",
    "lora_linear_reference",
    "lora_mlp",
    "lora_mlp_reference",
    "lora_fast_params",
    "chunked_cross_entropy",
    "cross_entropy_reference",
    "causal_lm_loss",
    "labels_forward",
    "patch_model_for_training",
    "unpatch_model",
    "release_block_graphs",
    "block_graph_speedups",
    "is_patched",
    "GraphedTrainStep",
    "graph_pool_bytes",
    "peak_memory_bytes",
    "rms_norm",
    "rms_norm_reference",
    "swiglu",
    "swiglu_reference",
    "GATED_ACTIVATIONS",
    "gated_activation",
    "gated_activation_reference",
    "rotary_embedding",
    "rotary_embedding_reference",
]
