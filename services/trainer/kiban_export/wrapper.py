"""The project's standard input interface as a torch module around any embedding model.

Putting uint8 NHWC input, the cast, /255, mean/std and the NHWC→NCHW transpose inside the
graph means the encoder only decodes, resizes and crops (measured: ~1.2 ms of numpy work
per image saved), and the normalisation constants cannot drift from the model's.
"""

from __future__ import annotations

import torch


class StandardInterface(torch.nn.Module):
    """uint8 [N, S, S, 3] RGB → float → /255 → (x - mean) / std → NCHW → model → [N, D]."""

    def __init__(self, model: torch.nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 1, 1, 3))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 1, 1, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32) / 255.0
        x = (x - self.mean) / self.std
        x = x.permute(0, 3, 1, 2)
        out = self.model(x)
        return out.reshape(out.shape[0], -1).to(torch.float32)
