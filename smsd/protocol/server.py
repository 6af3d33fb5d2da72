"""The server: masked sampling distillation of the ViT body on uploaded token shards.

Per step, each image gives ``len(global_keep)`` global and ``len(local_keep)`` local
views (random token subsets, :func:`smsd.ops.sample_views`). The student (body +
DINO head) sees every view; the teacher (an EMA of the student) sees the global ones;
:class:`smsd.nn.DINOLoss` ties them. The tokens are already shuffled by each client,
and the body never sees positions, so the shuffle does not matter to training.

This module is the loop; the step is :mod:`.distill`, the state and its checkpoints
:mod:`.run_state`, the recipe :class:`PretrainConfig` and the run's operation
:class:`RunOptions` (:mod:`.pretrain_config`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..io import atomic_write_bytes
from ..models import PatchHead, ViTBody, ViTConfig, head_fingerprint
from ..ops import sample_views
from ..sealing.keys import RecipientPrivateKey, RecipientPublicKey
from .body_io import save_body
from .distill import DistillStep, StepSchedule, koleo_loss
from .distributed import Ranks, barrier, current_ranks, mean_across_ranks, rank_device
from .pretrain_config import PretrainConfig, RunOptions, teacher_temp
from .privacy import DPPlan
from .private_step import PrivateDistillStep
from .run_state import (
    METRICS_NAME,
    Position,
    PretrainError,
    RunState,
    ShardRecord,
    deterministic_mode,
    restore_run,
    run_files,
    save_run,
)
from .schedules import cosine_schedule
from .shard import inspect_shard, read_shard, shard_digest
from .training_watch import CollapseWatch, warmup_warning

__all__ = ["PretrainConfig", "PretrainError", "RunOptions", "Server", "koleo_loss"]

log = logging.getLogger("smsd")


class Server:
    """Trains the ViT body once on every client's shard.

    Args:
        model_config: the public model config the clients encoded with.
        train_config: :class:`PretrainConfig` (what the run computes).
        head_fingerprint: the fingerprint every shard must carry (default: that of the
            seeded head of ``model_config``).
        options: :class:`RunOptions` (device, checkpoints, determinism).
        unseal_key: the server's private key, to open shards sealed to it.
        seal_body_to: seal the returned body to these clients' public keys (each of
            them, and nobody else, can open it); empty: the body is written in the clear.
    """

    def __init__(self, model_config: ViTConfig, train_config: PretrainConfig | None = None,
                 head_fingerprint: str | None = None,
                 options: RunOptions | None = None, *,
                 unseal_key: RecipientPrivateKey | None = None,
                 seal_body_to: Sequence[RecipientPublicKey] = ()) -> None:
        self.config = model_config
        self.train_config = train_config or PretrainConfig()
        self.options = options or RunOptions()
        self.unseal_key = unseal_key
        self.seal_body_to = tuple(seal_body_to)
        self.head_fingerprint = head_fingerprint or _seeded_head_fingerprint(model_config)
        self.history: list[dict] = []
        self.privacy: DPPlan | None = None
        self._steps_per_epoch = 0
        self._shards: list[ShardRecord] = []

    # ------------------------------------------------------------------ data
    def load_shards(self, shard_paths: Sequence[str | os.PathLike]) -> torch.Tensor:
        """Validate every shard's header first (nothing is trained on a bad set), then
        load and concatenate their tokens (fp16 ``[n, N, D]``)."""
        if not shard_paths:
            raise PretrainError("no shards given")
        expect = dict(head_fingerprint=self.head_fingerprint, grid=self.config.grid,
                      embed_dim=self.config.embed_dim)
        for path in shard_paths:
            inspect_shard(path, **expect)
        # What a checkpoint records, so that a resume on other data is refused.
        self._shards = [ShardRecord(Path(p).name, shard_digest(p)) for p in shard_paths]
        return torch.cat([read_shard(path, **expect, key=self.unseal_key)
                          for path in shard_paths])

    # -------------------------------------------------------------- training
    def pretrain(self, shard_paths: Sequence[str | os.PathLike], *,
                 out: str | os.PathLike | None = None,
                 work_dir: str | os.PathLike | None = None, resume: bool = False,
                 overwrite: bool = False, stop_after: int | None = None,
                 progress: bool = True,
                 epoch_metrics: Callable[[torch.nn.Module], dict] | None = None) -> ViTBody:
        """Masked sampling distillation on the shards; returns the trained (teacher) body.

        Runs data-parallel when a ``torch.distributed`` process group is initialized (see
        :mod:`smsd.protocol.distributed`): every rank loads the shards and trains on its
        block of each global batch of ``batch_size`` images; rank 0 alone writes files.

        Args:
            out: where to save the body (safetensors), written atomically at the end.
            work_dir: folder for checkpoints (every ``checkpoint_every`` epochs, every
                ``checkpoint_every_steps`` iterations if set, and at the end) and
                ``metrics.jsonl`` (one line per epoch).
            resume: continue from ``work_dir``'s newest readable checkpoint (same configs
                and shards, by content), at the exact data position it was written at.
            overwrite: start afresh in a ``work_dir`` that holds a run (its checkpoints and
                metrics are deleted first). Without it or ``resume``, such a folder is
                refused: a rerun never silently replaces finished work.
            stop_after: stop after this many epochs (checkpointed), e.g. to time-slice a
                job; schedules still follow ``epochs``.
            progress: show a tqdm progress bar (rank 0).
            epoch_metrics: called after each epoch with the teacher's body (in eval mode,
                on its device); what it returns joins that epoch's line of the history and
                ``metrics.jsonl`` (e.g. a k-NN probe when labels are at hand: a simulation).
        """
        cfg = self.train_config
        ranks = current_ranks()
        work = Path(work_dir) if work_dir is not None else None
        if resume and work is None:
            raise PretrainError("resume asked for but no work_dir given")
        if resume and overwrite:
            raise PretrainError("resume and overwrite exclude each other (--resume continues "
                                "the run, --overwrite starts it over)")
        if work is not None and not resume:
            _start_afresh(work, overwrite=overwrite, is_main=ranks.is_main)
        if cfg.dp is not None and ranks.distributed:
            raise PretrainError("differentially private pre-training runs as one process "
                                "(its per-image clipping is not split across ranks)")
        tokens = self.load_shards(shard_paths)
        batch = min(cfg.batch_size, tokens.shape[0])
        try:
            rows = ranks.rows(batch)
        except ValueError as exc:
            raise PretrainError(str(exc)) from None
        if work is not None and ranks.is_main:
            work.mkdir(parents=True, exist_ok=True)
        threads = torch.get_num_threads()
        try:
            with deterministic_mode(self.options.deterministic):
                return self._train(tokens, batch, rows, ranks, out=out, work=work,
                                   resume=resume, stop_after=stop_after, progress=progress,
                                   epoch_metrics=epoch_metrics)
        finally:
            torch.set_num_threads(threads)  # a deterministic resume may have changed it

    def _step_fn(self, run: RunState, ranks: Ranks, device: torch.device,
                 plan: DPPlan | None, batch: int) -> DistillStep | PrivateDistillStep:
        cfg = self.train_config
        if plan is not None:
            return PrivateDistillStep(run.student, run.teacher, run.loss_fn, run.optimizer,
                                      plan=plan, expected_batch=batch, generator=run.gen)
        packed = cfg.packed if cfg.packed is not None else device.type == "cuda"
        model: torch.nn.Module = run.student
        if ranks.distributed:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(
                run.student, device_ids=[device.index] if device.type == "cuda" else None)
        # On GPU the fast path of benchmarks/train_step.py: all views gathered into one
        # packed batch, and the head's last layer fused with the loss (no [rows, K] logits).
        # On CPU the plain step, whose numerics the demo's recorded results come from.
        on_gpu = device.type == "cuda"
        return DistillStep(model, run.teacher, run.loss_fn, run.optimizer, packed=packed,
                           koleo_weight=cfg.koleo_weight, clip_grad=cfg.clip_grad,
                           fused_gather=packed and on_gpu, fused_head_loss=on_gpu)

    def _train(self, tokens: torch.Tensor, batch: int, rows: slice, ranks: Ranks, *,
               out: str | os.PathLike | None, work: Path | None, resume: bool,
               stop_after: int | None, progress: bool,
               epoch_metrics: Callable[[torch.nn.Module], dict] | None) -> ViTBody:
        from tqdm.auto import tqdm

        cfg, opts = self.train_config, self.options
        device = rank_device(opts.device, ranks)
        n = tokens.shape[0]
        steps = n // batch  # drop the ragged last batch, as DINO's loader does
        self._steps_per_epoch = steps
        run = RunState.build(self.config, cfg, device)
        position = Position()
        self.history = []  # this run's epochs (a resume restores the earlier ones)
        if resume:
            position, self.history = restore_run(
                work, run, model_config=self.config, train_config=cfg, device=device,
                n_images=n, shards=self._shards, steps=steps,
                deterministic=opts.deterministic)
            if ranks.is_main:  # later lines of metrics.jsonl belong to a lost future
                lines = "".join(json.dumps(record) + "\n" for record in self.history)
                atomic_write_bytes(work / METRICS_NAME, lines.encode())
        self.privacy = (DPPlan.make(cfg.dp, batch / n, cfg.epochs * steps)
                        if cfg.dp is not None else None)
        step_fn = self._step_fn(run, ranks, device, self.privacy, batch)
        lrs = cosine_schedule(cfg.lr, cfg.min_lr, cfg.epochs, steps, cfg.warmup_epochs)
        wds = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, steps)
        momenta = cosine_schedule(cfg.momentum_teacher, 1.0, cfg.epochs, steps)
        end_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
        done = position.epoch * steps + position.step
        warning = warmup_warning(cfg)
        if warning and ranks.is_main:
            log.warning("pretrain: %s", warning)
        watch = CollapseWatch(cfg.out_dim, patience=max(steps, 20),
                              after_step=cfg.warmup_epochs * steps)

        def save(iteration: int) -> None:
            # Rank 0 only: after DDP's averaged update every rank holds the same models,
            # optimizer state and center, and draws from the same generator.
            if ranks.is_main:
                save_run(work, iteration, run, position, history=self.history,
                         model_config=self.config, train_config=cfg, n_images=n,
                         shards=self._shards, world_size=ranks.world_size, device=device)

        bar = tqdm(total=max(end_epoch * steps - done, 0),
                   disable=not (progress and ranks.is_main), desc="pretrain", unit="step")
        while position.epoch < end_epoch:
            epoch, started = position.epoch, time.perf_counter()
            if position.order is None:
                position.order = torch.randperm(n, generator=run.gen)
            run.student.train()
            for step in range(position.step, steps):
                it = epoch * steps + step
                # The whole global batch is drawn on every rank (same generator, same
                # draws), then each rank keeps its rows: W ranks split the 1-rank run.
                if self.privacy is None:
                    images = position.order[step * batch:(step + 1) * batch]
                else:  # DP-SGD's Poisson sample: each image in with probability batch / n
                    images = (torch.rand(n, generator=run.gen) < batch / n).nonzero()[:, 0]
                views = sample_views(len(images), self.config.n_tokens, cfg.keep,
                                     generator=run.gen)
                mine = rows if self.privacy is None else slice(None)  # DP: one process
                x = tokens[images[mine]].to(device).float()
                index = [idx[mine].to(device) for idx in views]
                schedule = StepSchedule(epoch=epoch, lr=float(lrs[it]),
                                        weight_decay=float(wds[it]),
                                        momentum=float(momenta[it]),
                                        freeze_last_layer=epoch < cfg.freeze_last_layer)
                total = mean_across_ranks(step_fn(x, index, schedule))
                # The DINO term alone (KoLeo adds to a collapsed loss: ln K when uniform)
                # for the collapse watch, read in the same host sync as the loss.
                dino = getattr(step_fn, "dino_loss", None)
                loss, dino_loss = torch.stack(
                    [total, total if dino is None else dino.to(total)]).tolist()
                if not math.isfinite(loss):
                    raise PretrainError(f"loss became {loss} at epoch {epoch}, "
                                        f"step {step}; lower lr")
                position.losses.append(loss)
                position.step = step + 1
                alarm = watch.update(it, dino_loss)
                if alarm and ranks.is_main:
                    bar.write(f"pretrain: warning: {alarm}", file=sys.stderr)
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}")
                if (work is not None and opts.checkpoint_every_steps and step + 1 < steps
                        and (it + 1) % opts.checkpoint_every_steps == 0):
                    save(it + 1)
            last = epoch * steps + steps - 1
            record = {"epoch": epoch, "loss": sum(position.losses) / len(position.losses),
                      "lr": float(lrs[last]), "weight_decay": float(wds[last]),
                      "momentum": float(momenta[last]),
                      "teacher_temp": teacher_temp(cfg, epoch),
                      "seconds": time.perf_counter() - started}
            if self.privacy is not None:
                record["dp_epsilon"] = self.privacy.spent(last + 1)
            if epoch_metrics is not None:
                body = run.teacher.body
                was_training = body.training
                record |= epoch_metrics(body.eval())
                body.train(was_training)
            self.history.append(record)
            position = Position(epoch=epoch + 1)
            if work is None:
                continue
            if ranks.is_main:
                with open(work / METRICS_NAME, "a") as metrics:
                    metrics.write(json.dumps(record) + "\n")
            every_steps = opts.checkpoint_every_steps
            if ((epoch + 1) % opts.checkpoint_every == 0 or epoch + 1 == end_epoch
                    or (every_steps and (last + 1) % every_steps == 0)):
                save(last + 1)
        bar.close()
        body = run.teacher.body.cpu().eval()
        if out is not None and ranks.is_main:
            save_body(out, body, head_fingerprint=self.head_fingerprint,
                      seal_to=self.seal_body_to, privacy=self.privacy_record())
        barrier()  # every rank returns once the body file exists
        return body


    def privacy_record(self) -> dict | None:
        """The DP guarantee of the last run's body (None when it was not private): the
        plan and the ε actually spent (less than planned when stopped early)."""
        if self.privacy is None:
            return None
        done = sum(1 for _ in self.history) * self._steps_per_epoch
        return self.privacy.record() | {"epsilon_spent": self.privacy.spent(done)}


def _start_afresh(work: Path, *, overwrite: bool, is_main: bool) -> None:
    """Refuse a work folder that holds a run, or with ``overwrite`` delete that run's
    files (rank 0), so that ``metrics.jsonl`` never holds two histories."""
    found = run_files(work)
    if not found:
        return
    if not overwrite:
        names = ", ".join(p.name for p in found[:3]) + (", ..." if len(found) > 3 else "")
        raise PretrainError(f"the work folder {work} holds a run ({names}): continue it with "
                            "--resume, or start over with --overwrite (deletes it)")
    if is_main:
        for path in found:
            path.unlink(missing_ok=True)
        log.info("--overwrite: deleted the earlier run's %d file(s) in %s", len(found), work)


def _seeded_head_fingerprint(config: ViTConfig) -> str:
    return head_fingerprint(PatchHead(config))
