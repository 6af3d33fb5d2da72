"""Reference levels: what an attacker with no access to the upload already gets.

A defence is "at chance" only when every attack is at or below these: the data set's mean
image (PSNR and SSIM of a guess that ignores the upload), the class-mean image (the
attacker knows each class's public mean and, generously, the image's class), and a
random order (each image's true patches, shuffled: pixels without positions).
"""

from __future__ import annotations

import torch

from .knowledge import Attempt, Knowledge, images_to_patches, patches_to_images

__all__ = ["class_mean_image", "mean_image", "random_order"]


def mean_image(n: int, knowledge: Knowledge) -> Attempt:
    """The public images' mean, for each of ``n`` attacked images."""
    mean = knowledge.public_images.float().mean(0, keepdim=True)
    return Attempt(images=mean.expand(n, -1, -1, -1).contiguous())


def class_mean_image(labels: torch.Tensor, knowledge: Knowledge) -> Attempt:
    """Each attacked image's class mean over the public images (``labels``: the attacked
    images' classes; a class without public images gets the overall mean)."""
    if knowledge.public_labels is None:
        raise ValueError("class_mean_image needs knowledge.public_labels")
    public = knowledge.public_images.float()
    out = public.mean(0, keepdim=True).expand(len(labels), -1, -1, -1).clone()
    for label in labels.unique().tolist():
        members = knowledge.public_labels == label
        if members.any():
            out[labels == label] = public[members].mean(0)
    return Attempt(images=out)


def random_order(originals: torch.Tensor, knowledge: Knowledge, seed: int = 0) -> Attempt:
    """The originals' own patches at uniformly random positions."""
    gen = torch.Generator().manual_seed(seed)
    patches = images_to_patches(originals, knowledge.config)
    n, n_pos, _ = patches.shape
    positions = torch.argsort(torch.rand(n, n_pos, generator=gen), dim=1)
    shuffled = torch.gather(patches, 1, positions[..., None].expand_as(patches))
    return Attempt(positions=positions,
                   images=patches_to_images(shuffled, knowledge.config).float())
