"""Helpers for tests that build PyTorch reference models."""

import torch


def perturb_vectors(model: torch.nn.Module) -> None:
    """Norm weights start at 1 and biases at 0 in PyTorch; randomise them so mix-ups show."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
