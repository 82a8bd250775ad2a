"""What ``--device auto|cpu|cuda`` means for the quantizer's commands: the GPU when asked for or present."""

from __future__ import annotations

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> "torch.device":  # noqa: F821 (torch is imported on use)
    """``auto`` -> CUDA when available, else CPU. Raises ``ValueError`` for CUDA without a GPU or an unknown name."""
    import torch  # here, so that the CLI can offer DEVICE_CHOICES without importing torch

    if device not in DEVICE_CHOICES:
        raise ValueError(f"unknown device {device!r}: use one of {', '.join(DEVICE_CHOICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available (use --device cpu)")
    return torch.device(device)
