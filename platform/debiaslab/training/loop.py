"""The training loop shared by the single-process path and Ray Train workers.

AdamW with linear warm-up, gradient clipping, EMA, mixed precision on GPU, atomic checkpoints and
exact resume: batches, timesteps and noise come from generators seeded by (seed, step), and the
global torch RNG (dropout) is checkpointed, so a resumed run reproduces the same losses. What is
trained is a `TrainTask`: the score model (`ScoreTask`) or a classifier (training.classifier).
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

from debiaslab.checkpoints import (
    TRAINER_KEYS,
    checkpoint_name,
    latest_checkpoint,
    latest_intact_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from debiaslab.config import ExperimentConfig, to_dict
from debiaslab.diffusion.losses import DiffusionLoss, build_loss
from debiaslab.errors import CheckpointError, ConfigError, TrainingDiverged, describe_error

MetricsFn = Callable[[int, dict[str, float]], None]
CheckpointFn = Callable[[int, Path], None]
ReportFn = Callable[[int, dict[str, float], "Path | None"], None]

STREAM_BATCH, STREAM_NOISE, STREAM_LOSS = 1, 2, 3  # independent per-step random streams
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
    decay min(decay, (1 + n)/(10 + n)) so early averages are not dominated by the init.

    ``decay`` 0 means no average: the shadow is the model itself (no copy, no update), so the
    checkpoint's "ema" entry holds the model's own weights (stored once: the tensors are shared).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.num_updates = 0
        self.enabled = decay > 0
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False) if self.enabled else model
        self._shadow_params = list(self.shadow.parameters())
        self._shadow_buffers = list(self.shadow.buffers())
        self._tracked: nn.Module | None = None

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        if not self.enabled:
            return
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
        if self.enabled:  # disabled: the shadow is the model, loaded from state["model"]
            self.shadow.load_state_dict(state["shadow"])
        self.num_updates = int(state["num_updates"])


def warmup_lambda(warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up from 1/warmup to 1 over ``warmup_steps`` optimizer steps, then constant."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def build_score_net(cfg: ExperimentConfig, shape: tuple[int, int, int], num_classes: int
                    ) -> nn.Module:
    """The raw score network from ``cfg.model`` for images of ``shape`` = (C, H, W), with the
    augmentation vector of ``cfg.data.augment`` (nets.build_net does the building)."""
    from debiaslab.data.augment import AUGMENTS
    from debiaslab.nets import build_net as build_any_net

    return build_any_net(cfg.model, shape=shape, num_classes=num_classes,
                         aug_dim=AUGMENTS.get(cfg.data.augment).aug_dim)


build_net = build_score_net  # the old name (sampling and the benchmarks import it from here)


@dataclass
class TrainResult:
    """What a finished (or resumed-and-finished) run produced."""

    step: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> mean loss of that step
    checkpoint: Path | None = None
    seconds: float = 0.0


# -------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class StepBatch:
    """One rank's share of one step: the global batch is ``size`` rows, rank ``rank`` of
    ``world_size`` trains on the contiguous ``indices`` slice. Draw random values for the whole
    global batch from ``generator(stream)`` and keep ``mine(values)``, so any split of the batch
    over ranks sees the same draws as one process."""

    step: int
    seed: int
    size: int
    rank: int
    world_size: int
    indices: Tensor

    def generator(self, stream: int) -> torch.Generator:
        return step_generator(self.seed, self.step, stream)

    def mine(self, values: Tensor) -> Tensor:
        """This rank's rows of a global-batch tensor [size, ...]."""
        return values.view(self.world_size, -1, *values.shape[1:])[self.rank]


class TrainTask:
    """What a `Trainer` trains. The Trainer owns optimisation (AdamW, warm-up, clipping, EMA,
    mixed precision), the global-batch split over ranks, checkpoints and exact resume; a task owns
    the rows, the model, one rank's batch and the per-sample loss."""

    kind = "task"  # recorded as state["task"]; a checkpoint of another kind is refused

    def num_rows(self) -> int:
        """Rows the epoch-wise shuffles run over."""
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        """The trained module; called once, right after ``torch.manual_seed(train.seed)``."""
        raise NotImplementedError

    def frozen_modules(self) -> dict[str, nn.Module]:
        """Modules the loss evaluates but never trains (see DiffusionLoss.frozen_modules)."""
        return {}

    def make_batch(self, plan: StepBatch) -> dict[str, Tensor]:
        """This rank's batch (CPU tensors) for ``plan``; every random draw from its generators."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Per-sample losses [B] of ``model`` (the DDP-wrapped one on Ray Train)."""
        raise NotImplementedError

    def content_hash(self) -> str:
        """The data's content hash, compared on resume (training.resume.check_resume)."""
        raise NotImplementedError

    def data_state(self) -> dict[str, Any]:
        """The checkpoint's "data" entry: at least shape, num_classes and content_hash."""
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        """More top-level checkpoint entries (e.g. what sampling needs to rebuild the model)."""
        return {}

    def check_state(self, state: dict[str, Any], source: Path, resume: bool = True) -> None:
        """CheckpointError if ``state`` (to resume, or with ``resume`` False to initialise
        from: train.init_from) does not fit this task's data."""
        saved = state.get("data", {})
        ours = self.data_state()
        for key in ("shape", "num_classes"):
            if key in saved and saved[key] != ours[key]:
                raise CheckpointError(f"{source}: trained on data with {key}={saved[key]}, this "
                                      f"dataset has {ours[key]}")


class ScoreTask(TrainTask):
    """The score model: ``diffusion.loss`` (or ``loss``) around the ``model`` network on an
    in-memory ImageDataset, with augmentation and label dropout for classifier-free guidance."""

    kind = "score"

    def __init__(self, cfg: ExperimentConfig, dataset: Any,
                 loss: DiffusionLoss | None = None) -> None:
        self.cfg = cfg
        self.dataset = dataset
        self.num_classes = int(dataset.num_classes)
        self._loss = loss

    def num_rows(self) -> int:
        return len(self.dataset.images)

    def build_model(self) -> nn.Module:
        from debiaslab.data.augment import build_augment

        self.loss_fn: DiffusionLoss = self._loss if self._loss is not None else build_loss(self.cfg)
        self.augment = build_augment(self.cfg.data.augment)
        self.net = build_score_net(self.cfg, tuple(self.dataset.shape), self.num_classes)
        model = self.loss_fn.wrap(self.net)
        self.conditional = getattr(self.net, "num_classes", None) is not None
        self.loss_fn.setup(torch.tensor(self.dataset.class_counts(), dtype=torch.long),
                           self.num_classes if self.conditional else None)
        return model

    def frozen_modules(self) -> dict[str, nn.Module]:
        return self.loss_fn.frozen_modules()

    def make_batch(self, plan: StepBatch) -> dict[str, Tensor]:
        """x0, noise level, noise and (dropped-out) labels for this rank."""
        cfg = self.cfg.train
        idx = plan.indices
        x0 = self.dataset.to_float(self.dataset.images[idx])
        g = plan.generator(STREAM_NOISE)
        level = plan.mine(self.loss_fn.sample_noise_level(plan.size, g))
        noise = plan.mine(torch.randn((plan.size,) + tuple(x0.shape[1:]), generator=g))
        g_aug = plan.generator(STREAM_BATCH)
        x0, aug = self.augment(x0, g_aug, rank=plan.rank, world_size=plan.world_size)
        batch = {"x0": x0, "level": level, "noise": noise}
        if aug is not None:
            batch["aug"] = aug
        if self.conditional:
            y = self.dataset.labels[idx].clone()
            if cfg.label_dropout_mode == "batch":  # one coin per step for the whole batch
                if float(torch.rand(1, generator=g_aug)) < cfg.label_dropout:
                    y[:] = self.num_classes
            else:
                drop = torch.rand(plan.size, generator=g_aug) < cfg.label_dropout
                y[plan.mine(drop)] = self.num_classes  # null label
            batch["y"] = y
        g_loss = plan.generator(STREAM_LOSS)
        for key, value in self.loss_fn.draw_inputs(plan.size, g_loss).items():
            batch[key] = plan.mine(value)
        return batch

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        cond = {k: v for k, v in batch.items() if k not in ("x0", "level", "noise")}
        return self.loss_fn(model, batch["x0"], batch["level"], batch["noise"], **cond)

    def content_hash(self) -> str:
        return str(self.dataset.content_hash)

    def data_state(self) -> dict[str, Any]:
        return {
            "shape": list(self.dataset.shape),
            "num_classes": self.num_classes,
            "class_names": list(self.dataset.class_names),
            "content_hash": self.content_hash(),
        }


# -------------------------------------------------------------------------------- trainer


class Trainer:
    """Trains a `TrainTask` (given an ImageDataset: the score model, `ScoreTask`) as rank
    ``rank`` of ``world_size``.

    ``train.batch_size`` is the GLOBAL batch: each step takes the next ``train.batch_size`` rows
    of the epoch-wise shuffles and rank r trains on its contiguous 1/world_size of them, with the
    timesteps and noise one process would draw for those rows. DDP averages the ranks' mean
    losses, so W workers equal one process at the same ``train.batch_size`` up to float
    summation order; ``train.batch_size`` must be divisible by ``world_size``.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        data: Any,
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
        if cfg.train.batch_size % world_size:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by "
                              f"distributed.num_workers={world_size}")
        self.cfg = cfg
        self.task: TrainTask = data if isinstance(data, TrainTask) else ScoreTask(cfg, data)
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
        self.model = self.task.build_model().to(self.device)
        self.frozen = self._freeze(self.task.frozen_modules())
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
        self._perm_cache: dict[int, Tensor] = {}

    # ---------------------------------------------------------------- the task's parts
    @property
    def dataset(self) -> Any:
        return getattr(self.task, "dataset", None)

    @property
    def net(self) -> nn.Module:
        return self.task.net  # type: ignore[attr-defined]

    @property
    def loss_fn(self) -> DiffusionLoss | None:
        return getattr(self.task, "loss_fn", None)

    @property
    def num_classes(self) -> int:
        return self.task.num_classes  # type: ignore[attr-defined]

    def _freeze(self, modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
        """Frozen modules on the device, without gradients, in eval mode; never trained."""
        trained = {id(p) for p in self.model.parameters()}
        for name, module in modules.items():
            module.to(self.device).requires_grad_(False).eval()
            if any(id(p) in trained for p in module.parameters()):
                raise ValueError(f"frozen module {name!r} shares parameters with the trained "
                                 f"model; a loss's frozen modules must be separate")
        return dict(modules)

    # ---------------------------------------------------------------- state
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
            "data": self.task.data_state(),
            "task": self.task.kind,
            # train.batch_size is the global batch (checkpoints without this entry predate that)
            "batch": {"global": self.cfg.train.batch_size, "world_size": self.world_size},
            **self.task.extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any], source: Path) -> None:
        """Resume from ``state``; refuses (CheckpointError) a config or dataset that would change
        what the run means (training.resume)."""
        from debiaslab.training.resume import check_resume

        kind = state.get("task", ScoreTask.kind)
        if kind != self.task.kind:
            raise CheckpointError(f"{source}: is a {kind} checkpoint, this run trains a "
                                  f"{self.task.kind}; use a new name or output_dir")
        self.resume_changes = check_resume(self.cfg, state, source, self.task.content_hash())
        self.task.check_state(state, source)
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

    def initialize_from(self, path: str | Path) -> Path:
        """Fine-tuning: start from the weights (EMA by default, ``train.init_weights``) of
        another run's checkpoint; optimizer, schedule, EMA and step start fresh."""
        from debiaslab.checkpoints import resolve_checkpoint

        source = resolve_checkpoint(path)
        state = load_checkpoint(source, map_location=self.device)
        self.task.check_state(state, source, resume=False)
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
        """Continue from the newest intact checkpoint in ``run_dir/checkpoints`` if there is one
        (a newer one whose bytes changed on disk is skipped, and said so)."""
        from debiaslab.progress import log

        latest = latest_intact_checkpoint(self.ckpt_dir, log=log)
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
            self._perm_cache = {epoch: torch.randperm(self.task.num_rows(), generator=g)}
        return self._perm_cache[epoch]

    def batch_indices(self, step: int) -> Tensor:
        """This rank's row indices for ``step``: its slice of the global batch of the epoch-wise
        shuffles (deterministic, the same however many ranks share the batch)."""
        n = self.task.num_rows()
        gb = self.cfg.train.batch_size
        pos = torch.arange(step * gb, (step + 1) * gb)
        epochs, offsets = pos // n, pos % n
        idx = torch.empty(gb, dtype=torch.long)
        for e in epochs.unique().tolist():
            mask = epochs == e
            idx[mask] = self._epoch_perm(int(e))[offsets[mask]]
        return idx.view(self.world_size, -1)[self.rank]

    def make_batch(self, step: int) -> dict[str, Tensor]:
        """This rank's batch at ``step`` (the task's inputs), on the device."""
        plan = StepBatch(step=step, seed=self.cfg.train.seed, size=self.cfg.train.batch_size,
                         rank=self.rank, world_size=self.world_size,
                         indices=self.batch_indices(step))
        batch = self.task.make_batch(plan)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # ---------------------------------------------------------------- loop
    def train_step(self, batch: dict[str, Tensor]) -> tuple[float, float]:
        self.train_model.train()
        with autocast(self.cfg.train.precision, self.device):
            per_sample = self.task.loss(self.train_model, batch)
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
