"""What ``--device auto|cpu|cuda`` means for the quantizer's commands: the GPU when asked for or present."""

from __future__ import annotations

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU. Raises ``ValueError`` for CUDA without a GPU or an unknown name."""
    if device not in DEVICE_CHOICES:
        raise ValueError(f"unknown device {device!r}: use one of {', '.join(DEVICE_CHOICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available (use --device cpu)")
    return torch.device(device)
