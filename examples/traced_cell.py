"""A DEQ cell written as a plain PyTorch module, for docs/TRACE.md: ``fpidsl trace examples/traced_cell.py:ConvCell``
writes it as a .fpi spec, and ``fpidsl.fixed_point(ConvCell(), x0, z)`` solves it with the compiled map."""
import torch
from torch import nn


class ConvCell(nn.Module):
    """x -> GroupNorm(x + relu(conv2(GroupNorm(relu(conv1(x))))) + z): the convolutional cell of the DEQ papers."""

    def __init__(self, channels: int = 8, groups: int = 2, scale: float = 0.5):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, channels)
        self.norm2 = nn.GroupNorm(groups, channels)
        with torch.no_grad():  # a contraction at the start
            for conv in (self.conv1, self.conv2):
                conv.weight.mul_(scale)

    def forward(self, x, z):
        h = self.norm1(torch.relu(self.conv1(x)))
        return self.norm2(torch.relu(z + self.conv2(h)) + x * 0.1)
