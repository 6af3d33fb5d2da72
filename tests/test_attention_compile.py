"""The compiled (GPU) form of the Triton attention kernels builds for an H100 with no
register spills, no GPU needed.

The interpreter runs the kernels with ``while`` loops (see kernels/attention.py), so
the ``for``-loop form that a GPU runs is checked here by compiling it for sm_90 in a
subprocess (the test process has TRITON_INTERPRET=1, which swaps the kernels out).

Every tile-table entry (kernels/attention.py ``SM90_TABLE``: head dims 32, 64, 128,
256; fp16, bf16, fp32; dense, index, packed layouts) is compiled exactly as the launch
compiles it: ``sample_launches`` builds the arguments ``attention_forward`` /
``attention_backward`` pass for a ViT-S-like step (q, k, v and their gradients as views
of one qkv projection buffer; H = 6, N = 197; packed views of 197 and 37 tokens) and
``compile_launch`` specializes them with Triton's own JIT binder (pointers and ints
divisible by 16 get tt.divisibility=16, ints equal to 1 become constants). Resources
come from ``ptxas -v`` on the produced PTX (``ptxas_usage``), never from ``.local``
lines of the PTX, which cannot see spills. Any spill fails the test, as does dynamic
shared memory beyond the 227 KiB an sm_90 block can have.

``ptxas -v`` with Triton 3.6 (registers, spill stores/loads in bytes; smem: Triton's
dynamic shared memory, bytes; ptxas reports 0 bytes static smem for all):

    d    dtype  layout  fwd               dkdv             dq               pre
    64   16-bit dense   (128,64,4,3) 233  (32,128,8,3) 157 (128,32,4,3) 178  32
                        0/0 smem 65536    0/0 smem 58880   0/0 smem 57344
    64   16-bit index   (128,64,4,3) 233  (32,128,8,3) 171 (128,32,4,3) 203  32
                        0/0 smem 50176    0/0 smem 50688   0/0 smem 49408
    64   16-bit packed  (64,64,4,3)  134  (32,64,4,3)  168 (64,32,4,3)   93  34-36
                        0/0 smem 57344    0/0 smem 41984   0/0 smem 40960
    64   fp32   dense   (64,32,8,2)   90  (32,64,8,2)  115 (64,32,8,2)  106  38
    64   fp32   index   (64,32,8,2)   80  (32,64,8,2)  158 (64,32,8,2)  108  38
    64   fp32   packed  (64,32,8,2)   88  (32,64,8,2)  156 (64,32,8,2)  104  38
                        0/0 smem 41216    0/0 smem 57600   0/0 smem 57344
    128  16-bit dense   (128,32,8,2) 162  (32,64,8,2)  177 (64,32,4,2)  143  40
    128  16-bit index   (128,32,8,2) 167  (32,64,8,2)  186 (64,32,4,2)  176  40
    128  16-bit packed  (128,32,8,2) 140  (32,64,8,2)  181 (64,32,4,2)  142  36
                        0/0 smem 65536    0/0 smem 66304   0/0 smem 65536
    128  fp32   dense   (32,32,8,3)   76  (16,32,8,2)   95 (32,32,8,2)   98  48
    128  fp32   index   (32,32,8,3)   80  (16,32,8,2)  100 (32,32,8,2)  117  48
    128  fp32   packed  (32,32,8,3)   80  (16,32,8,2)  102 (32,32,8,2)  107  48
                        0/0 smem 53760-86016 0/0 smem 51328 0/0 smem 69632

(bf16 and fp16 compile to the same resources; the preprocess uses 256 B of smem.)
The descriptor (TMA, off by default) dense forward, 16-bit: d=64 200 registers, d=128
118, no spills, 65592 / 65568 B smem.
Before this table the 16-bit d=64 dK/dV kernel spilled 20 B dense / 84 B with an index
(255 registers), the d=128 one 20 B with an index, and every fp32 kernel spilled (up
to 15-18 KB in the d=128 forward and dQ).
"""

from __future__ import annotations

import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from smsd import _kernels

    K = _kernels.load("attention")
    DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    SMEM_LIMIT = 227 * 1024
    lines, bad = [], []
    for head_dim in (32, 64, 128, 256):
        for dname, dtype in DTYPES.items():
            for layout in K.LAYOUTS:
                cfg = K._blocks(head_dim, dtype, layout)
                for name, kernel, grid, args, kwargs in K.sample_launches(head_dim, dtype,
                                                                          layout):
                    if name in K.PASSES:  # the launch uses the table's entry
                        tiles = (kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["num_warps"],
                                 kwargs["num_stages"])
                        assert tiles == cfg[name], (name, tiles, cfg[name])
                    use = K.ptxas_usage(K.compile_launch(kernel, args, kwargs))
                    line = (f"d={head_dim} {dname} {layout} {name} {cfg.get(name, '')}: "
                            f"{use['registers']} registers, spills "
                            f"{use['spill_stores']}/{use['spill_loads']} B, "
                            f"smem {use['smem']} + {use['shared']} B")
                    lines.append(line)
                    if use["spill_stores"] or use["spill_loads"] or use["shared"] > SMEM_LIMIT:
                        bad.append(line)
    for head_dim in (64, 128):  # the descriptor (TMA) forward, off by default, 16-bit
        for dname, dtype in list(DTYPES.items())[:2]:
            launch = K.sample_launches(head_dim, dtype, "dense", tma=True)[0]
            name, kernel, grid, args, kwargs = launch
            assert kwargs["USE_TMA"]
            compiled = K.compile_launch(kernel, args, kwargs)
            assert "cp.async.bulk.tensor" in compiled.asm["ptx"]
            use = K.ptxas_usage(compiled)
            line = (f"d={head_dim} {dname} dense fwd+TMA: {use['registers']} registers, "
                    f"spills {use['spill_stores']}/{use['spill_loads']} B, "
                    f"smem {use['smem']} + {use['shared']} B")
            lines.append(line)
            if use["spill_stores"] or use["spill_loads"] or use["shared"] > SMEM_LIMIT:
                bad.append(line)
    print("\\n".join(lines))
    if bad:
        sys.exit("register spills or too much shared memory:\\n" + "\\n".join(bad))
""")


@pytest.mark.slow
def test_gpu_kernels_compile_for_sm90_without_spills():
    # imported here: the child process runs this file and must not import conftest,
    # which turns the Triton interpreter on
    from conftest import run_without_interpreter

    pytest.importorskip("triton")
    run_without_interpreter("-c", SCRIPT, timeout=1200)
