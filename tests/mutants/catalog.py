"""Planted bugs the suite must kill: one per invariant the project relies on.

Each :class:`Mutant` replaces one exact snippet of one file (it must occur once: a
catalog entry that no longer applies is an error, not a pass) and names the tests that
must then fail. ``fast`` mutants run in CI (``make mutants-fast``); ``make mutants`` runs
all. C++ kernels (``csrc/``) are not mutated here: each would cost a rebuild of ``smsd._C``;
their invariants are covered through the same tests by the ``cpp`` backend.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MUTANTS", "Mutant"]


@dataclass(frozen=True)
class Mutant:
    name: str
    invariant: str
    path: str
    find: str
    replace: str
    tests: tuple[str, ...]
    fast: bool = False


RESUME_TESTS = ("tests/test_crash_resume.py", "-k",
                "steps_left or checkpoint_holds or continues_the_history or falls_back")

MUTANTS: tuple[Mutant, ...] = (
    # ------------------------------------------------------------ resume
    Mutant("resume-loads-nothing", "a resume restores the whole run, not a fresh one",
           "smsd/protocol/run_state.py",
           "    _check_compatible(path, state, model_config, train_config, n_images, shards)\n",
           "    _check_compatible(path, state, model_config, train_config, n_images, shards)\n"
           "    return Position(), []\n", RESUME_TESTS, fast=True),
    Mutant("resume-skips-weights", "a resume restores student, teacher and center",
           "smsd/protocol/run_state.py",
           "            module.load_state_dict(_with_prefix(tensors, prefix))",
           "            pass", RESUME_TESTS),
    Mutant("resume-skips-optimizer", "a resume restores AdamW's moments",
           "smsd/protocol/run_state.py",
           '        load_optimizer(run.optimizer, tensors, state["optimizer"])',
           "        pass", RESUME_TESTS, fast=True),
    Mutant("resume-skips-rng", "a resume restores the run's generator (views, order)",
           "smsd/protocol/run_state.py",
           '        run.gen.set_state(tensors["rng/generator"])',
           "        pass", RESUME_TESTS),
    Mutant("resume-restarts-position", "a resume continues at the stored data position",
           "smsd/protocol/run_state.py",
           "    return position, history\n",
           "    return Position(), history\n", RESUME_TESTS),
    Mutant("resume-ignores-shard-digests", "a resume refuses other shards of the same size",
           "smsd/protocol/run_state.py",
           '    _check_shards(path, state.get("shards"), shards)\n', "",
           ("tests/test_cli_trust.py", "-k", "other_data"), fast=True),
    Mutant("checkpoint-checksum-unchecked", "a corrupt checkpoint that still parses is skipped",
           "smsd/protocol/checkpoint.py",
           '    if meta.get("sha256") != _digest(tensors):', "    if False:",
           ("tests/test_crash_resume.py", "-k", "falls_back")),
    # ----------------------------------------------------------- training
    Mutant("ema-skipped", "the teacher is the EMA of the student",
           "smsd/protocol/distill.py",
           "            torch._foreach_lerp_(self._teacher_params, self._student_params,\n"
           "                                 1.0 - schedule.momentum)",
           "            pass", ("tests/test_distill_step.py", "-k", "ema"), fast=True),
    Mutant("center-momentum-off", "DINO's center moves with momentum m, not m + 0.01",
           "smsd/ops/dino_loss.py",
           "    center.mul_(momentum).add_(batch_center, alpha=1.0 - momentum)",
           "    center.mul_(momentum + 0.01).add_(batch_center, alpha=0.99 - momentum)",
           ("tests/test_dino_center.py",), fast=True),
    Mutant("reference-center-momentum-off", "the oracle's center matches DINO's formula",
           "smsd/ops/reference.py",
           "    center.copy_(center * momentum + batch_center * (1 - momentum))",
           "    center.copy_(center * (momentum + 0.01) + batch_center * (0.99 - momentum))",
           ("tests/test_dino_center.py",)),
    Mutant("bf16-loss-off-0.1pct", "a 16-bit loss is as exact as its fp32 accumulation",
           "smsd/ops/dino_loss.py",
           "        return row_loss.sum() * scale, colsum",
           "        return row_loss.sum() * scale * (1 + 1e-3 * (student.dtype == "
           "torch.bfloat16)), colsum", ("tests/test_dino_loss.py", "-k", "bfloat16"), fast=True),
    Mutant("bf16-grad-off-2pct", "a 16-bit loss gradient is the fp32 one, rounded once",
           "smsd/ops/dino_loss.py",
           "        return (scale_saved_grad(ctx.grad, grad_loss), *none[1:])",
           "        return (scale_saved_grad(ctx.grad, grad_loss) * (1.02 if ctx.grad.dtype == "
           "torch.bfloat16 else 1.0), *none[1:])",
           ("tests/test_dino_loss.py", "-k", "bfloat16")),
    Mutant("center-dropped", "the teacher softmax is centered", "smsd/ops/dino_loss.py",
           "_rows_contiguous(teacher.detach()), center.contiguous(),",
           "_rows_contiguous(teacher.detach()), torch.zeros_like(center),",
           ("tests/test_dino_loss.py", "-k", "4096")),
    # --------------------------------------------------- Triton kernels
    Mutant("triton-dino-no-rescale", "the chunk partials are rescaled to the row's max (K > 512)",
           "kernels/dino_loss.py",
           "        lift = tl.where(ok, sm - s_max, 0.0)",
           "        lift = tl.where(ok, 0.0 * sm, 0.0)",
           ("tests/test_dino_loss.py", "-k", "triton and (4097 or 8193)"), fast=True),
    Mutant("triton-dino-column-mask", "the forward reads the teacher's last column",
           "kernels/dino_loss.py",
           '        y = tl.where(t_mask, (t - center[None, :]) * inv_tt, float("-inf"))',
           '        y = tl.where(t_mask & (cols < K - 1)[None, :], (t - center[None, :]) * inv_tt,'
           ' float("-inf"))',
           ("tests/test_dino_loss.py", "-k", "triton")),
    Mutant("triton-dino-head-no-rescale",
           "the fused head's online log-sum-exp rescales across blocks",
           "kernels/dino_loss.py",
           "        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)",
           "        d = d + tl.sum(tl.exp(x - m_new), axis=0)",
           ("tests/test_fused_linear_dino_loss.py", "-k", "triton")),
    Mutant("triton-gather-column-mask", "masked_sample copies every column",
           "kernels/masked_sample.py",
           "    mask = row_ok[:, None] & (cols < D)[None, :]",
           "    mask = row_ok[:, None] & (cols < D - 1)[None, :]",
           ("tests/test_masked_sample.py", "-k", "triton"), fast=True),
    Mutant("triton-attention-forward-row-mask", "the attention forward writes every query row",
           "kernels/attention.py",
           "             m_i + tl.math.log2(l_i), mask=m_ok)",
           "             m_i + tl.math.log2(l_i), mask=m_ok & (rows > 0))",
           ("tests/test_attention.py", "-k", "triton")),
    # ------------------------------------------------------------ models
    Mutant("vit-tanh-gelu", "the body's MLP is timm's exact GELU", "smsd/models/vit.py",
           "        self.act = nn.GELU()", '        self.act = nn.GELU(approximate="tanh")',
           ("tests/test_timm_reference.py", "-k", "torch")),
    Mutant("vit-norm-eps", "the blocks' LayerNorm eps is timm's 1e-6", "smsd/models/vit.py",
           "        self.norm1 = nn.LayerNorm(dim, eps=1e-6)",
           "        self.norm1 = nn.LayerNorm(dim)",
           ("tests/test_timm_reference.py", "-k", "torch"), fast=True),
    # ------------------------------------------------------- files, keys
    Mutant("shard-grid-unchecked", "a shard of another grid is refused",
           "smsd/protocol/shard.py",
           "    if grid is not None and g != grid:", "    if False:",
           ("tests/test_protocol.py", "-k", "another_model"), fast=True),
    Mutant("safetensors-dtype-unchecked", "a file's tensor dtypes are the allowed ones",
           "smsd/safe_files.py",
           "    if not isinstance(dtype, str) or dtype not in dtypes:",
           "    if not isinstance(dtype, str) or dtype not in _DTYPES:",
           ("tests/test_fuzz_loaders.py", "-k", "exhaustive")),
    Mutant("dali-images-unchecked", "DALI never parses a file that can crash it",
           "smsd/data/dali.py",
           "            check_encoded_images(source.files[i] for i in self.shard)\n",
           "", ("tests/test_dali_bad_images.py", "-k", "every_time")),
    Mutant("key-byte-logged", "the key's secret never appears in a repr or log",
           "smsd/crypto.py",
           '        return f"PermutationKey(fingerprint={self.fingerprint})"',
           '        return f"PermutationKey(fingerprint={self.fingerprint}, '
           '{self._secret[:1].hex()})"',
           ("tests/test_key_secrecy.py", "-k", "repr"), fast=True),
    Mutant("dp-clip-skipped", "DP-SGD clips each image's gradient",
           "smsd/protocol/private_step.py",
           "                scale = (cfg.clip / (norm + 1e-12)).clamp(max=1.0)",
           "                scale = torch.ones_like(norm)",
           ("tests/test_private_pretrain.py",)),
)
