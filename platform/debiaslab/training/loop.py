"""The training loop shared by the single-process path and Ray Train workers.

AdamW with linear warm-up, gradient clipping, EMA, mixed precision on GPU, atomic checkpoints and
exact resume: batches, timesteps and noise come from generators seeded by (seed, step), and the
global torch RNG (dropout) is checkpointed, so a resumed run reproduces the same losses.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from debiaslab.config import ExperimentConfig, to_dict
from debiaslab.diffusion.losses import DiffusionLoss, build_loss
from debiaslab.errors import CheckpointError, ConfigError, TrainingDiverged, describe_error
from debiaslab.training.checkpoint import (
    TRAINER_KEYS, checkpoint_name, latest_checkpoint, load_checkpoint, prune_checkpoints,
    save_checkpoint,
)

MetricsFn = Callable[[int, dict[str, float]], None]
CheckpointFn = Callable[[int, Path], None]
ReportFn = Callable[[int, dict[str, float], "Path | None"], None]

_STREAM_BATCH, _STREAM_NOISE, _STREAM_LOSS = 1, 2, 3  # independent per-step random streams
_SEED_STRIDE = 1_000_003


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device: unknown device {name!r}; allowed: auto, cpu, cuda, "
                          f"cuda:N, mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={name}: torch sees no CUDA GPU on this machine; "
                              f"use train.device=auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"train.device={name}: only {torch.cuda.device_count()} GPU(s) "
                              f"visible; use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device={name}: MPS is not available here; use auto or cpu")
    return device


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision on GPU (bf16 by default); full precision on CPU unless asked otherwise."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """A CPU generator for one (seed, step, stream): the same draws however the run was split."""
    return torch.Generator().manual_seed((seed * _SEED_STRIDE + step) * 8 + stream)


class EMA:
    """Exponential moving average of parameters (and a copy of buffers), with the usual warm-up
    decay min(decay, (1 + n)/(10 + n)) so early averages are not dominated by the init."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.num_updates = 0
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)
        self._shadow_params = list(self.shadow.parameters())
        self._shadow_buffers = list(self.shadow.buffers())
        self._tracked: nn.Module | None = None

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        if self._tracked is not model:  # cache the parameter lists: this runs every step
            self._tracked, self._params = model, list(model.parameters())
            self._buffers = list(model.buffers())
        torch._foreach_lerp_(self._shadow_params, self._params, 1.0 - d)
        for e, b in zip(self._shadow_buffers, self._buffers):
            e.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": self.shadow.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shadow.load_state_dict(state["shadow"])
        self.num_updates = int(state["num_updates"])


def warmup_lambda(warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up from 1/warmup to 1 over ``warmup_steps`` optimizer steps, then constant."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def build_net(cfg: ExperimentConfig, shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The raw score network from ``cfg.model`` for images of ``shape`` = (C, H, W)."""
    from debiaslab.nets import NETS

    from debiaslab.data.augment import AUGMENTS

    m = cfg.model
    channels, height, _ = shape
    return NETS.build(
        m.net, in_channels=channels, out_channels=channels, model_channels=m.model_channels,
        channel_mult=tuple(m.channel_mult), num_res_blocks=m.num_res_blocks,
        attention_resolutions=tuple(m.attention_resolutions), image_size=height,
        dropout=m.dropout, head_channels=m.head_channels,
        num_classes=num_classes if m.class_conditional and num_classes > 1 else None,
        aug_dim=AUGMENTS.get(cfg.data.augment).aug_dim,
    )


@dataclass
class TrainResult:
    """What a finished (or resumed-and-finished) run produced."""

    step: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> mean loss of that step
    checkpoint: Path | None = None
    seconds: float = 0.0


class Trainer:
    """Trains one score model on an in-memory :class:`ImageDataset` (rank ``rank`` of
    ``world_size``; the global batch is ``train.batch_size * world_size``)."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        dataset: Any,
        run_dir: str | Path,
        *,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | None = None,
        prepare_model: Callable[[nn.Module], nn.Module] | None = None,
        on_metrics: MetricsFn | None = None,
        on_checkpoint: CheckpointFn | None = None,
        progress: bool = True,
        on_report: ReportFn | None = None,
    ) -> None:
        self.cfg = cfg
        self.dataset = dataset
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.rank, self.world_size = rank, world_size
        self.device = device or select_device(cfg.train.device)
        self.on_metrics = on_metrics
        self.on_checkpoint = on_checkpoint
        # every rank, at every checkpoint boundary: (step, latest metrics, checkpoint on rank 0
        # else None); Ray Train workers report here so all of them report equally often
        self.on_report = on_report
        self.progress = progress and rank == 0

        torch.manual_seed(cfg.train.seed)
        from debiaslab.data.augment import build_augment

        self.loss_fn: DiffusionLoss = build_loss(cfg)
        self.augment = build_augment(cfg.data.augment)
        self.num_classes = int(dataset.num_classes)
        self.net = build_net(cfg, tuple(dataset.shape), self.num_classes)
        self.model = self.loss_fn.wrap(self.net).to(self.device)
        self.ema = EMA(self.model, cfg.train.ema_decay)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_lambda(cfg.train.warmup_steps)
        )
        self.train_model = prepare_model(self.model) if prepare_model else self.model
        self._params = list(self.model.parameters())
        self.step = 0
        self.resume_changes: dict[str, tuple] = {}  # allowed config changes found on resume
        self.conditional = self.net_is_conditional()
        self.loss_fn.setup(torch.tensor(self.dataset.class_counts(), dtype=torch.long),
                           self.num_classes if self.conditional else None)
        self._perm_cache: dict[int, Tensor] = {}

    # ---------------------------------------------------------------- state
    def net_is_conditional(self) -> bool:
        return getattr(self.net, "num_classes", None) is not None

    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "config": to_dict(self.cfg),
            "rng": rng,
            "data": {
                "shape": list(self.dataset.shape),
                "num_classes": self.num_classes,
                "class_names": list(self.dataset.class_names),
                "content_hash": str(self.dataset.content_hash),
            },
        }

    def load_state_dict(self, state: dict[str, Any], source: Path) -> None:
        """Resume from ``state``; refuses (CheckpointError) a config or dataset that would change
        what the run means (training.resume)."""
        from debiaslab.training.resume import check_resume

        self.resume_changes = check_resume(self.cfg, state, source,
                                           str(self.dataset.content_hash))
        self._check_model_config(state, source)
        try:
            self.model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step = int(state["step"])
            torch.set_rng_state(state["rng"]["torch"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            reason = describe_error(exc, lines=2)
            raise CheckpointError(f"{source}: does not fit this model ({reason}); use a new "
                                  f"name or output_dir") from None
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if self.resume_changes:  # allowed changes (train.resume_allow) apply from here on
            self._apply_optimizer_config()

    def _apply_optimizer_config(self) -> None:
        """Set lr, warm-up and weight decay from the config on a restored optimizer/schedule."""
        t = self.cfg.train
        groups = self.optimizer.param_groups
        self.scheduler.base_lrs = [t.lr] * len(groups)
        self.scheduler.lr_lambdas = [warmup_lambda(t.warmup_steps)] * len(groups)
        for group, lam in zip(groups, self.scheduler.lr_lambdas):
            group["initial_lr"] = t.lr
            group["lr"] = t.lr * lam(self.scheduler.last_epoch)
            group["weight_decay"] = t.weight_decay

    def _check_model_config(self, state: dict[str, Any], source: Path) -> None:
        saved = state.get("data", {})
        ours = {"shape": list(self.dataset.shape), "num_classes": self.num_classes}
        for key, value in ours.items():
            if key in saved and saved[key] != value:
                raise CheckpointError(f"{source}: trained on data with {key}={saved[key]}, this "
                                      f"dataset has {value}")

    def initialize_from(self, path: str | Path) -> Path:
        """Fine-tuning: start from the weights (EMA by default, ``train.init_weights``) of
        another run's checkpoint; optimizer, schedule, EMA and step start fresh."""
        from debiaslab.training.checkpoint import resolve_checkpoint

        source = resolve_checkpoint(path)
        state = load_checkpoint(source, map_location=self.device)
        self._check_model_config(state, source)
        try:
            weights = (state["ema"]["shadow"] if self.cfg.train.init_weights == "ema"
                       else state["model"])
            self.model.load_state_dict(weights)
        except (KeyError, RuntimeError, TypeError) as exc:
            raise CheckpointError(f"{source}: weights do not fit this model.* / data.augment "
                                  f"config ({describe_error(exc, lines=2)})") from None
        self.ema.shadow.load_state_dict(weights)
        return source

    def resume(self) -> Path | None:
        """Continue from the newest checkpoint in ``run_dir/checkpoints`` if there is one."""
        latest = latest_checkpoint(self.ckpt_dir)
        if latest is not None:
            self.load_state_dict(load_checkpoint(latest, map_location=self.device,
                                                 required=TRAINER_KEYS), latest)
        return latest

    def save(self) -> Path:
        path = save_checkpoint(self.state_dict(), self.ckpt_dir / checkpoint_name(self.step))
        prune_checkpoints(self.ckpt_dir, self.cfg.train.keep_checkpoints)
        return path

    # ---------------------------------------------------------------- data
    def _epoch_perm(self, epoch: int) -> Tensor:
        if epoch not in self._perm_cache:
            g = torch.Generator().manual_seed(self.cfg.train.seed * _SEED_STRIDE + epoch)
            self._perm_cache = {epoch: torch.randperm(len(self.dataset.images), generator=g)}
        return self._perm_cache[epoch]

    def batch_indices(self, step: int) -> Tensor:
        """This rank's dataset indices for ``step``: epoch-wise shuffles, deterministic."""
        n = len(self.dataset.images)
        gb = self.cfg.train.batch_size * self.world_size
        pos = torch.arange(step * gb, (step + 1) * gb)
        epochs, offsets = pos // n, pos % n
        idx = torch.empty(gb, dtype=torch.long)
        for e in epochs.unique().tolist():
            mask = epochs == e
            idx[mask] = self._epoch_perm(int(e))[offsets[mask]]
        return idx.view(self.world_size, -1)[self.rank]

    def make_batch(self, step: int) -> dict[str, Tensor]:
        """x0, noise level, noise and (dropped-out) labels for this rank at ``step``."""
        cfg = self.cfg.train
        idx = self.batch_indices(step)
        x0 = self.dataset.to_float(self.dataset.images[idx])
        gb = cfg.batch_size * self.world_size
        g = step_generator(cfg.seed, step, _STREAM_NOISE)
        level = self.loss_fn.sample_noise_level(gb, g).view(self.world_size, -1)[self.rank]
        noise = torch.randn((gb,) + tuple(x0.shape[1:]), generator=g)
        noise = noise.view(self.world_size, -1, *x0.shape[1:])[self.rank]
        g_aug = step_generator(cfg.seed, step, _STREAM_BATCH)
        x0, aug = self.augment(x0, g_aug, rank=self.rank, world_size=self.world_size)
        batch = {"x0": x0, "level": level, "noise": noise}
        if aug is not None:
            batch["aug"] = aug
        if self.conditional:
            y = self.dataset.labels[idx].clone()
            if cfg.label_dropout_mode == "batch":  # one coin per step for the whole batch
                if float(torch.rand(1, generator=g_aug)) < cfg.label_dropout:
                    y[:] = self.num_classes
            else:
                drop = torch.rand(gb, generator=g_aug) < cfg.label_dropout
                y[drop.view(self.world_size, -1)[self.rank]] = self.num_classes  # null label
            batch["y"] = y
        g_loss = step_generator(cfg.seed, step, _STREAM_LOSS)
        for key, value in self.loss_fn.draw_inputs(gb, g_loss).items():
            batch[key] = value.view(self.world_size, -1, *value.shape[1:])[self.rank]
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # ---------------------------------------------------------------- loop
    def train_step(self, batch: dict[str, Tensor]) -> tuple[float, float]:
        self.train_model.train()
        cond = {k: v for k, v in batch.items() if k not in ("x0", "level", "noise")}
        with autocast(self.cfg.train.precision, self.device):
            per_sample = self.loss_fn(self.train_model, batch["x0"], batch["level"],
                                      batch["noise"], **cond)
        loss = per_sample.float().mean()
        if not torch.isfinite(loss):
            latest = latest_checkpoint(self.ckpt_dir)
            kept = f"last good checkpoint: {latest}" if latest else "no checkpoint was written yet"
            raise TrainingDiverged(
                f"loss is {loss.item()} at step {self.step + 1}; stopped ({kept})"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self._params, clip, foreach=True)
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.model)
        return loss.item(), float(grad_norm)

    def _steps(self) -> Iterator[int]:
        total = self.cfg.train.steps
        if not self.progress:
            yield from range(self.step, total)
            return
        from debiaslab.progress import progress

        with progress(total=total, initial=self.step, desc=f"train {self.cfg.name}",
                      unit="step", dynamic_ncols=True) as bar:
            for s in range(self.step, total):
                yield s
                bar.update(1)

    def fit(self) -> TrainResult:
        """Train to ``train.steps`` (resuming first), checkpointing atomically along the way."""
        cfg = self.cfg.train
        if self.resume() is None and self.cfg.init_checkpoint is not None:
            self.initialize_from(self.cfg.init_checkpoint)
        result = TrainResult(step=self.step)
        window: list[float] = []
        metrics: dict[str, float] = {}
        t_start = t_log = time.perf_counter()
        for s in self._steps():
            loss, grad_norm = self.train_step(self.make_batch(s))
            self.step = s + 1
            result.losses[self.step] = loss
            window.append(loss)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                now = time.perf_counter()
                metrics = {
                    "train/loss": sum(window) / len(window),
                    "train/grad_norm": grad_norm,
                    "train/lr": self.scheduler.get_last_lr()[0],
                    "train/steps_per_sec": len(window) / max(now - t_log, 1e-9),
                }
                window, t_log = [], now
                if self.on_metrics and self.rank == 0:
                    self.on_metrics(self.step, metrics)
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                saved = None
                if self.rank == 0:
                    saved = result.checkpoint = self.save()
                    if self.on_checkpoint:
                        self.on_checkpoint(self.step, saved)
                if self.on_report:
                    self.on_report(self.step, dict(metrics), saved)
        result.step = self.step
        result.seconds = time.perf_counter() - t_start
        if result.checkpoint is None:
            result.checkpoint = latest_checkpoint(self.ckpt_dir)
        return result
