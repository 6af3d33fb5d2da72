"""Self-check of smsd.crypto: permutations are valid, keyed and reproducible."""

from __future__ import annotations

import torch

from ..crypto import PermutationKey, invert
from . import Result

BACKENDS = ("torch",)


def checks(backend: str, device: torch.device) -> list[Result]:
    key, other = PermutationKey.generate(), PermutationKey.generate()
    ids = [0, 1, 2, "scan-17"]
    perms = key.permutations(ids, 197, device=device)
    problems = []
    expected = torch.arange(197, device=device)
    if not all(torch.equal(p.sort().values, expected) for p in perms):
        problems.append("not a permutation")
    if not torch.equal(perms, key.permutations(ids, 197, device=device)):
        problems.append("not reproducible")
    if torch.equal(perms, other.permutations(ids, 197, device=device)):
        problems.append("independent of the key")
    if len({tuple(p.tolist()) for p in perms}) != len(ids):
        problems.append("two ids share a permutation")
    inv = invert(perms)
    if not torch.equal(torch.gather(perms, 1, inv), expected.expand_as(perms)):
        problems.append("invert is wrong")
    return [Result("crypto", backend, device.type, "int64", "N=197 4 ids", not problems,
                   "; ".join(problems) or "valid, keyed, reproducible, invertible")]
