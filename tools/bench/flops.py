"""Model FLOPs utilisation (MFU): the model's training FLOPs per second over the GPU's peak.

FLOPs per trained token, for a decoder of N matrix-multiply parameters, L layers, width h and sequence T:
6 N (forward 2 N, backward 4 N) plus 12 L h T for the attention scores and their weighted sum (PaLM's count,
without halving for the causal mask). N leaves out the input embedding (a lookup, not a product) and counts
the LM head (with tied embeddings the head's product still happens). LoPT's small reconstruction decoders are
not counted: MFU credits only the model's own work, so lopt and e2e rows are scored on the same FLOPs.

Peaks are dense bf16 tensor-core figures from NVIDIA's datasheets (their "with sparsity" figures halved).
"""

from __future__ import annotations

import re

# (pattern on torch.cuda.get_device_name, dense bf16 TFLOP/s); the first match wins, so variants come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bGH200\b", 989.4),
    (r"\bH200\b.*\bNVL\b", 835.5),
    (r"\bH200\b", 989.4),  # H200 SXM
    (r"\bH100\b.*\bNVL\b", 835.5),
    (r"\bH100\b.*\bPCIe\b", 756.5),
    (r"\bH100\b", 989.4),  # H100 SXM5 ("NVIDIA H100 80GB HBM3")
    (r"\bH800\b", 989.4),
    (r"\bB200\b", 2250.0),
    (r"\bA100\b", 312.0),  # SXM4 and PCIe, 40 and 80 GB
    (r"\bA800\b", 312.0),
    (r"\bL40S\b", 362.1),
    (r"\bL40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
)


def peak_bf16_tflops(gpu_name: str) -> float | None:
    """Dense bf16 peak of a GPU from its name, or None for a GPU not in the table."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, gpu_name, flags=re.IGNORECASE):
            return tflops
    return None


def matmul_parameters(parameters: int, vocab_size: int, hidden_size: int, tied_embeddings: bool) -> int:
    """Parameters that take part in a matrix product per token: all but the input embedding's lookup."""
    return parameters if tied_embeddings else parameters - vocab_size * hidden_size


def training_flops_per_token(matmul_params: int, num_layers: int, hidden_size: int, seq_len: int) -> float:
    return 6.0 * matmul_params + 12.0 * num_layers * hidden_size * seq_len


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float, gpus: int = 1) -> float:
    """Fraction of `gpus` GPUs' peak that the model's FLOPs at `tokens_per_s` amount to."""
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12 * gpus)
