"""Test images for the torchvision parity tests: textured enough to give real detections."""
import torch
from torch import Tensor


def rectangles_on(base: Tensor, gen: torch.Generator) -> Tensor:
    """``base`` (3, H, W) with 12 flat coloured rectangles and pixel noise, integer 0-255."""
    img = base.clone()
    _, h_img, w_img = img.shape
    for _ in range(12):
        colour = torch.rand(3, generator=gen) * 255
        x0 = int(torch.randint(0, w_img - 40, (1,), generator=gen))
        y0 = int(torch.randint(0, h_img - 40, (1,), generator=gen))
        w = int(torch.randint(20, 200, (1,), generator=gen))
        h = int(torch.randint(20, 160, (1,), generator=gen))
        img[:, y0:y0 + h, x0:x0 + w] = colour[:, None, None]
    return (img + torch.randn(img.shape, generator=gen) * 10).clamp(0, 255).round()
