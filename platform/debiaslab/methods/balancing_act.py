"""Balancing Act: distribution-guided debiasing in h-space (Parihar et al., CVPR 2024).

Stages (recipe ``balancing_act``): data -> train (the backbone) -> hvectors (DDIM inversion of
every training image over the method's grid, recording the UNet bottleneck h_t at each step: a
Ray Data map job writing an N-D side table [steps, C, H, W]) -> h_classifier (one attribute head
per grid timestep on h_t, Ray Train) -> sample (the registered ``balancing_act`` guidance:
sample or distribution guidance editing h_t in the forward pass) -> evaluate (the usual metrics
plus each guided attribute's proportions against p_ref). The image-space baseline ("universal
guidance") is the registered ``image_attribute`` guidance with a classifier of clean images.

The method's math, each function one equation of the paper or its released code
(docs/algorithms.md §3 restates them):

- :func:`ba_grid`: the 50-step DDIM grid tau_k = floor(k (T - 1) / (n - 1)) (§3.2), which is not
  our respacing rule;
- :func:`attribute_probs`: softmax(logits / T) with the released temperature T = 8 (§3.3);
- :func:`sample_guidance_loss`: L_s = -sum_i p_i[c_i] (§3.4);
- :func:`distribution_loss`: L = chi-square(p_hat, p_ref) or KL(p_hat || p_ref), p_hat the batch
  mean of the predicted attribute distributions (§3.5);
- :func:`guidance_step`: the released step size 1.5 beta_t^0.05 (§3.5);
- :func:`guided_h`: h <- sg(h) - step * s * grad_h (loss_scale * L), the gradient taken w.r.t. h
  only, through the attribute head (§3.5).

"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from debiaslab.errors import CheckpointError, ConfigError, DataError
from debiaslab.methods.api import (
    GUIDANCE,
    NETS,
    SPACINGS,
    AuxModelKind,
    ClassifierConfig,
    ExperimentConfig,
    ModelConfig,
    TrainConfig,
    register_section,
    to_dict,
)

TEMPERATURE = 8.0  # released: logits / 8 before the softmax
LOSS_SCALE = 300.0  # released: g = s * grad_h (300 L)
STEP_COEF = 1.5  # released: h <- sg(h) - 1.5 beta_t^0.05 g
STEP_POWER = 0.05
PROB_TOLERANCE = 1e-6  # p_ref must sum to 1 within this
DistributionLoss = Literal["chi2", "kl"]


def ba_grid(n_steps: int = 50, num_timesteps: int = 1000) -> list[int]:
    """The method's DDIM grid (Parihar et al. 2024, released diffusion_latent.py): tau_k =
    floor(k (T - 1) / (n - 1)) for k = 0..n-1, e.g. [0, 20, 40, 61, ..., 978, 999] for n = 50,
    T = 1000. Integer arithmetic, so no float rounding moves a step."""
    if n_steps < 2 or n_steps > num_timesteps:
        raise ConfigError(f"ba.n_steps: must be in [2, {num_timesteps}] (the model's timesteps), "
                          f"got {n_steps}")
    return [k * (num_timesteps - 1) // (n_steps - 1) for k in range(n_steps)]


def check_p_ref(p_ref: Sequence[float], loss: DistributionLoss, where: str = "ba.p_ref"
                ) -> Tensor:
    """p_ref as a float64 tensor: a probability vector (entries >= 0, summing to 1), with no zero
    entry under chi-square (it divides by p_ref). One-line errors naming the value."""
    values = [float(v) for v in p_ref]
    if len(values) < 2:
        raise ConfigError(f"{where}: needs one share per attribute class (at least 2), got "
                          f"{values}")
    if any(not (v == v) or v < 0 for v in values):
        raise ConfigError(f"{where}: shares must be >= 0, got {values}")
    if abs(sum(values) - 1.0) > PROB_TOLERANCE:
        raise ConfigError(f"{where}: shares must sum to 1, got {values} (sum {sum(values):g})")
    if loss == "chi2" and min(values) == 0.0:
        raise ConfigError(f"{where}: chi-square divides by each share; {values} has a zero "
                          f"entry: give it a small positive share or use ba.loss=kl")
    return torch.tensor(values, dtype=torch.float64)


def attribute_probs(logits: Tensor, temperature: float = TEMPERATURE) -> Tensor:
    """Predicted attribute distribution of each sample, softmax(logits / T) (§3.3), [B, K]."""
    return torch.softmax(logits / temperature, dim=-1)


def sample_guidance_loss(probs: Tensor, target: Tensor) -> Tensor:
    """Sample guidance (§3.4): L_s = -sum_i p_i[c_i], each image pulled toward its own target
    class c_i. ``probs`` [B, K], ``target`` [B] class indices. A scalar."""
    return -probs.gather(1, target.long().view(-1, 1)).sum()


def distribution_loss(probs: Tensor, p_ref: Tensor, kind: DistributionLoss = "chi2") -> Tensor:
    """Distribution guidance (§3.5): p_hat = mean_i p_i over the batch, then
    chi2 = sum_k (p_hat_k - p_ref_k)^2 / p_ref_k (Pearson, the released form), or
    KL(p_hat || p_ref) = sum_k p_hat_k log(p_hat_k / p_ref_k). Zero, with zero gradient, at
    p_hat = p_ref. A scalar."""
    p_hat = probs.mean(dim=0)
    ref = p_ref.to(p_hat.device, p_hat.dtype)
    if kind == "chi2":
        return ((p_hat - ref) ** 2 / ref).sum()
    if kind == "kl":
        return torch.special.xlogy(p_hat, p_hat).sum() - (p_hat * torch.log(ref)).sum()
    raise ConfigError(f"ba.loss: chi2 or kl, got {kind!r}")


def guidance_step(beta_t: Tensor | float, coef: float = STEP_COEF, power: float = STEP_POWER
                  ) -> Tensor:
    """The released step size eta_t = 1.5 beta_t^0.05 (§3.5). On the linear schedule
    1e-4..0.02, beta_t^0.05 lies in [0.63, 0.82], so eta_t in [0.95, 1.23]: a mild decay
    toward t = 0."""
    return coef * torch.as_tensor(beta_t, dtype=torch.float64) ** power


def guided_h(h: Tensor, loss_fn: Callable[[Tensor], Tensor], *, scale: float, step: Tensor | float,
             loss_scale: float = LOSS_SCALE) -> Tensor:
    """One guidance update of the bottleneck (§3.5): h <- sg(h) - step * scale *
    grad_h (loss_scale * L(h)). ``loss_fn`` maps h [B, ...] to a scalar through the attribute
    head only, so no gradient flows through the UNet. Scale 0 returns h unchanged (the same
    tensor values, bit for bit)."""
    if scale == 0:
        return h.detach()
    with torch.enable_grad():
        h_req = h.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_scale * loss_fn(h_req), h_req)
    step_t = torch.as_tensor(step, dtype=h.dtype, device=h.device)
    return h.detach() - step_t * scale * grad


# ------------------------------------------------------------------------------------- grid

@SPACINGS.register("floor")
def floor_spacing(num_timesteps: int, num_steps: int) -> list[int]:
    """The Balancing Act / Asyrp grid as a sampler spacing (``sample.options: {ddim: {spacing:
    floor}}``): :func:`ba_grid`, floor(k (T - 1) / (N - 1)); N = 1 gives [T - 1]."""
    return [num_timesteps - 1] if num_steps == 1 else ba_grid(num_steps, num_timesteps)


def recorded_steps(n_steps: int, num_timesteps: int) -> list[int]:
    """The timesteps inversion records h at: the grid without its last (noisiest) point, whose
    state is the inversion's end (§3.2: 49 of 50 for the official grid; t = 999 has no head)."""
    return ba_grid(n_steps, num_timesteps)[:-1]


# ----------------------------------------------------------------------------------- config

H_DTYPES = ("float16", "float32")


@dataclass
class BalancingActConfig:
    """``ba:`` settings of the h-vector extraction (docs/algorithms.md §3.2); the guidance's
    settings are fields of its ``sample.guidance`` entry (:class:`BAGuidanceSpec`)."""

    n_steps: int = 50  # grid size: tau_k = floor(k (T - 1) / (n - 1)), k = 0..n-1
    # grid timesteps whose h the side table keeps (empty: all n - 1 recorded ones)
    keep_steps: tuple[int, ...] = ()
    h_dtype: Literal["float16", "float32"] = "float16"
    # images per inversion forward; 1 makes every h independent of how Ray batches images
    # (byte-identical at any concurrency)
    images_per_forward: int = 1
    # weight each attribute class equally in the heads' cross-entropy (the training set is
    # the biased one: unweighted heads would learn its prior, and p_hat would inherit it)
    balance_classes: bool = True

    def check(self, cfg: ExperimentConfig) -> None:
        T = cfg.diffusion.num_timesteps
        ba_grid(self.n_steps, T)
        if self.images_per_forward < 1:
            raise ConfigError(f"ba.images_per_forward: must be >= 1, got "
                              f"{self.images_per_forward}")
        kept_timesteps(self, T)


register_section("ba", BalancingActConfig)


def kept_timesteps(ba: BalancingActConfig, num_timesteps: int) -> list[int]:
    """The timesteps the side table keeps, ascending (one-line error naming a value that the
    inversion does not record)."""
    recorded = recorded_steps(ba.n_steps, num_timesteps)
    if not ba.keep_steps:
        return recorded
    for t in ba.keep_steps:
        if t not in recorded:
            raise ConfigError(f"ba.keep_steps: {t} is not a recorded timestep; the inversion "
                              f"records h at the grid's first {len(recorded)} points "
                              f"({recorded[0]}, {recorded[1]}, ..., {recorded[-1]})")
    if len(set(ba.keep_steps)) != len(ba.keep_steps):
        raise ConfigError(f"ba.keep_steps: {list(ba.keep_steps)} names a timestep twice")
    return sorted(ba.keep_steps)


def h_table(cfg: ExperimentConfig) -> str:
    """The run's h-vector side table (named after the experiment: runs never share one)."""
    return f"{cfg.name}.hvec"


def h_storage_bytes(shape: Sequence[int], dtype: str) -> int:
    """Bytes of one image's h tensor [steps, C, H, W]: 3,211,264 (3.06 MiB) for the official
    CelebA-HQ [49, 512, 8, 8] in float16."""
    return math.prod(int(d) for d in shape) * np.dtype(dtype).itemsize


# ------------------------------------------------------------------------ h-vector extraction

def extract_h(denoiser: Any, x0: Tensor, n_steps: int, *, cond: dict[str, Tensor] | None = None
              ) -> Tensor:
    """§3.2: deterministic DDIM inversion (eta = 0) of ``x0`` over the method's grid, recording
    the bottleneck h at each inversion step, at the (state, timestep) pairs the sampler meets:
    h(x_t, t) for t = tau_0 .. tau_{n-2}. Returns float32 [B, n - 1, C, H, W] on the CPU."""
    from debiaslab.diffusion.inversion import HRecorder, ddim_invert

    with HRecorder(denoiser.net) as recorder:
        inversion = ddim_invert(denoiser, x0, steps=n_steps, spacing="floor", eps_at="current",
                                cond=cond, callback=recorder)
    return torch.stack(inversion.records, 1).float()


class HVectorMapper:
    """h-vectors of decoded dataset rows (``id``, ``pixels`` uint8 [N, C, H, W], ``label``):
    the frozen backbone is loaded once per actor."""

    def __init__(self, checkpoint: str, settings: dict[str, Any], device: str = "auto") -> None:
        from debiaslab.sampling import load_trained

        self.trained = load_trained(checkpoint, use_ema=True, device=device)
        self.settings = settings
        self.device = next(self.trained.model.parameters()).device
        grid = recorded_steps(settings["n_steps"], self.trained.denoiser.schedule.num_timesteps)
        self.keep = [grid.index(t) for t in settings["timesteps"]]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from debiaslab.data.pixels import map_batch

        s = self.settings
        ids, x0, labels = map_batch(batch)
        conditional = self.trained.num_classes > 0 and self.trained.cfg.model.class_conditional
        out: list[np.ndarray] = []
        step = int(s["images_per_forward"])
        for start in range(0, len(ids), step):
            part = slice(start, start + step)
            cond = {"y": labels[part].clamp(min=0).to(self.device)} if conditional else None
            h = extract_h(self.trained.denoiser, x0[part].to(self.device), s["n_steps"],
                          cond=cond)
            out.append(h[:, self.keep].numpy().astype(s["dtype"]))
        return {"id": np.asarray(ids, dtype=object), "h": np.concatenate(out)}


def h_settings(cfg: ExperimentConfig) -> dict[str, Any]:
    """What the mapper needs (plain values: shipped to Ray actors, written to the table)."""
    ba = cfg.ba
    return {"n_steps": ba.n_steps, "timesteps": kept_timesteps(ba, cfg.diffusion.num_timesteps),
            "dtype": ba.h_dtype, "images_per_forward": ba.images_per_forward,
            "inversion": "ddim eta=0, eps at the step's start (Asyrp), grid floor"}


def _h_shape(ctx: Any) -> tuple[int, ...]:
    return _h_shape_of(str(ctx.inputs["score_model"].path))


@functools.lru_cache(maxsize=4)
def _h_shape_of(checkpoint: str) -> tuple[int, ...]:
    """The backbone's h shape, loaded once per checkpoint (the schema and the log both ask)."""
    from debiaslab.sampling import load_trained

    net = load_trained(checkpoint, device="cpu").model
    if not callable(getattr(net, "h_shape", None)):
        raise ConfigError(f"recipe balancing_act: the backbone {type(net).__name__} has no "
                          f"h-space (model.net: unet)")
    return tuple(net.h_shape())


def _h_schema(cfg: ExperimentConfig, ctx: Any) -> Any:
    import pyarrow as pa

    from debiaslab.data.schema import tensor_field

    steps = len(kept_timesteps(cfg.ba, cfg.diffusion.num_timesteps))
    return pa.schema([("id", pa.string()),
                      tensor_field("h", (steps, *_h_shape(ctx)), cfg.ba.h_dtype)])


def _h_kwargs(cfg: ExperimentConfig, ctx: Any) -> dict[str, Any]:
    return {"checkpoint": ctx.inputs["score_model"].path, "settings": h_settings(cfg),
            "device": cfg.train.device}


def _h_producer(cfg: ExperimentConfig, ctx: Any) -> dict[str, Any]:
    return {"method": "balancing_act", "checkpoint": ctx.inputs["score_model"].path,
            "checkpoint_hash": ctx.inputs["score_model"].hash, **h_settings(cfg)}


def _h_prepare(cfg: ExperimentConfig, ctx: Any) -> None:
    from debiaslab.methods.api import log

    settings = h_settings(cfg)
    shape = (len(settings["timesteps"]), *_h_shape(ctx))
    log(f"h-vectors: DDIM inversion over {cfg.ba.n_steps} grid steps, keeping "
        f"{shape[0]} timesteps, h {list(shape)} {cfg.ba.h_dtype} = "
        f"{h_storage_bytes(shape, cfg.ba.h_dtype):,} bytes per image")


def _h_summary(cfg: ExperimentConfig, folder: Path) -> dict[str, float]:
    from debiaslab.data.side_tables import read_side_manifest

    manifest = read_side_manifest(folder)
    spec = next(c for c in manifest["columns"] if c["name"] == "h")
    return {"ba/h_bytes_per_image": float(h_storage_bytes(spec["shape"], spec["dtype"])),
            "ba/h_images": float(manifest["num_rows"])}


# -------------------------------------------------------------------------- the h-classifier

@NETS.register("h_heads")
class HHeads(nn.Module):
    """Parihar et al. 2024, §3.3 (the "ADP"): one attribute classifier per grid timestep on the
    bottleneck h_t, logits_k(h) = W_k vec(h) + b_k (``hidden`` 0: linear, as released) or a
    one-hidden-layer MLP of width ``hidden`` (the paper's "small MLP"). ``groups``: classes per
    attribute, their logits concatenated (sum = num_outputs). forward(h, t) uses, per row, the
    head of the grid timestep nearest t (exact on the grid the heads were trained on)."""

    CONFIG_PARAMS = ("in_shape", "num_outputs", "dropout")
    time_conditional = True

    def __init__(self, in_shape: Sequence[int], num_outputs: int, *, grid: Sequence[int] = (),
                 groups: Sequence[int] = (), hidden: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        grid = [int(t) for t in grid]
        if not grid or any(b <= a for a, b in zip(grid, grid[1:])):
            raise ConfigError(f"h_heads: grid must be a non-empty ascending list of timesteps, "
                              f"got {grid}")
        groups = [int(g) for g in groups] or [int(num_outputs)]
        if min(groups) < 2 or sum(groups) != num_outputs:
            raise ConfigError(f"h_heads: groups {groups} (classes per attribute, each >= 2) "
                              f"must sum to num_outputs={num_outputs}")
        if hidden < 0:
            raise ConfigError(f"h_heads: hidden must be >= 0 (0: linear heads), got {hidden}")
        self.in_shape = tuple(int(d) for d in in_shape)
        self.num_outputs, self.groups, self.hidden = int(num_outputs), groups, int(hidden)
        self.register_buffer("grid", torch.tensor(grid, dtype=torch.float64), persistent=False)
        width, heads = math.prod(self.in_shape), len(grid)
        layers = [(width, hidden), (hidden, num_outputs)] if hidden else [(width, num_outputs)]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in layers:  # nn.Linear's initialisation, per head
            bound = 1.0 / math.sqrt(fan_in)
            self.weights.append(nn.Parameter(torch.empty(heads, fan_in, fan_out)
                                             .uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(heads, fan_out).uniform_(-bound, bound)))
        self.dropout = nn.Dropout(dropout)

    @classmethod
    def from_config(cls, model: Any, *, shape: Sequence[int], num_classes: int,
                    num_outputs: int | None = None, aug_dim: int = 0) -> "HHeads":
        if num_outputs is None:
            raise ConfigError("h_heads: needs num_outputs (the number of labels)")
        if aug_dim or (model.class_conditional and num_classes > 1):
            raise ConfigError("h_heads: takes no class or augmentation conditioning; set "
                              "class_conditional: false")
        return cls(in_shape=tuple(shape), num_outputs=num_outputs, dropout=model.dropout,
                   **model.options)

    def head_index(self, t: Tensor | float) -> Tensor:
        """Per row, the index of the grid timestep nearest t (int64 [B])."""
        t = torch.as_tensor(t, dtype=torch.float64, device=self.grid.device).reshape(-1, 1)
        return (t - self.grid).abs().argmin(1)

    def forward(self, h: Tensor, t: Tensor | float) -> Tensor:
        """Logits [B, num_outputs] of h [B, *in_shape] at timesteps t [B] (or a scalar)."""
        if tuple(h.shape[1:]) != self.in_shape:
            raise ValueError(f"h of shape {tuple(h.shape[1:])}, expected {self.in_shape}")
        x = h.flatten(1)
        index = self.head_index(t).to(h.device).expand(len(x))
        out = x.new_empty(len(x), self.num_outputs)
        for k in index.unique().tolist():  # rows grouped by head: no [B, D, K] gather
            rows = torch.nonzero(index == k).reshape(-1)
            y = x[rows]
            for i, (w, b) in enumerate(zip(self.weights, self.biases)):
                y = y @ w[k] + b[k]
                if i + 1 < len(self.weights):
                    y = self.dropout(torch.nn.functional.silu(y))
            out[rows] = y
        return out

    def split(self, logits: Tensor) -> list[Tensor]:
        """The logits of each attribute ([B, K_a] each)."""
        return list(logits.split(self.groups, dim=1))


def label_parts(label: str) -> list[str]:
    """The attribute columns of an h-classifier label: parts joined by "+" (e.g.
    ``attr:bold+attr:even``), each a label of the classifier stage (class, attr:<name>,
    side:<table>.<column>)."""
    parts = [p.strip() for p in label.split("+")]
    if not all(parts) or len(set(parts)) != len(parts):
        raise ConfigError(f"h_classifier.label: {label!r}: name each attribute once, joined by "
                          f"+ (e.g. attr:bold+attr:even)")
    return parts


def _heads_model() -> ModelConfig:
    return ModelConfig(net="h_heads", model_channels=0, channel_mult=(1,), num_res_blocks=0,
                       attention_resolutions=(), class_conditional=False)


def _heads_train() -> TrainConfig:
    return TrainConfig(steps=1500, batch_size=256, lr=1e-3, weight_decay=0.0, warmup_steps=0,
                       ema_decay=0.0, label_dropout=0.0, checkpoint_every=500)


@dataclass
class HClassifierConfig(ClassifierConfig):
    """``h_classifier:``: the per-timestep attribute heads on the h side table (§3.3). ``label``
    names the attributes (joined by +, one set of heads each); ``model.options.hidden`` > 0
    gives MLP heads; input and features are bound by the recipe."""

    label: str = "attr:bold"
    input: Literal["noisy_images", "features"] = "features"
    model: ModelConfig = field(default_factory=_heads_model)
    train: TrainConfig = field(default_factory=_heads_train)

    def check(self, cfg: Any) -> None:
        if self.input != "features" or self.model.net != "h_heads":
            raise ConfigError("h_classifier.input and .model.net are fixed: the heads are "
                              "h_heads on the h side table (input: features)")
        for key in ("grid", "groups"):
            if key in self.model.options:
                raise ConfigError(f"h_classifier.model.options.{key}: set from the h table and "
                                  f"the labels; remove it")
        label_parts(self.label)


register_section("h_classifier", HClassifierConfig)


@dataclass
class HRows:
    """What the heads train on: h of N images at S grid timesteps (float16 or float32
    [N, S, C, H, W]), labels [N, A] per attribute, the attributes' class names; a training row is
    one (image, timestep) pair, row r = image r // S at step r % S."""

    h: Tensor
    grid: list[int]
    labels: Tensor
    attributes: list[str]
    class_names: list[list[str]]
    source_hash: str
    images: Tensor  # dataset row of each image

    @property
    def groups(self) -> list[int]:
        return [len(names) for names in self.class_names]

    def joint(self) -> np.ndarray:
        """One integer per image over all attributes (the stratification key)."""
        out = np.zeros(len(self.labels), np.int64)
        for a, size in enumerate(self.groups):
            out = out * size + self.labels[:, a].numpy()
        return out

    def subset(self, images: Tensor) -> "HRows":
        return dataclasses.replace(self, h=self.h[images], labels=self.labels[images],
                                   images=self.images[images])

    def rows_hash(self) -> str:
        digest = hashlib.sha256(f"{self.source_hash}|{self.grid}|{self.attributes}|"
                                f"{self.class_names}".encode())
        for part in (self.images, self.labels):
            digest.update(part.contiguous().numpy().tobytes())
        return digest.hexdigest()


def h_rows(cfg: ExperimentConfig) -> HRows:
    """The heads' rows from the experiment's training set and its h side table (what Ray
    workers call): images with every attribute labelled. The table's timesteps must be the
    ones ``ba`` keeps (a head per kept timestep)."""
    from debiaslab.data.locate import load_training_data
    from debiaslab.data.side_tables import join, read_side_table
    from debiaslab.training.classifier_data import dataset_labels

    dataset = load_training_data(cfg)
    name, _, column = cfg.classifier.features.rpartition(".")
    if not name:
        raise ConfigError("h_classifier.features: the h side table column is bound by the "
                          "recipe balancing_act (<experiment>.hvec.h)")
    table = read_side_table(dataset.manifest.path, name, [column])
    grid = [int(t) for t in table.manifest.get("producer", {}).get("timesteps", [])]
    expected = kept_timesteps(cfg.ba, cfg.diffusion.num_timesteps)
    h = join(dataset.ids, table, column)
    if grid != expected or h.shape[1] != len(expected):
        raise DataError(f"{table.path}: holds h at {len(grid)} timesteps ({h.shape[1]} per "
                        f"image) but ba keeps {len(expected)}; one head per timestep needs "
                        f"them equal: rerun the hvectors stage (--stage hvectors)")
    parts = label_parts(cfg.classifier.label)
    columns, names = zip(*(dataset_labels(dataset, part) for part in parts))
    labels = np.stack(columns, 1)
    keep = np.flatnonzero((labels >= 0).all(1))
    if not len(keep):
        raise DataError(f"{dataset.manifest.path}: no image has every label of "
                        f"{cfg.classifier.label!r}")
    digest = hashlib.sha256(f"{dataset.content_hash}|{table.manifest['content_hash']}".encode())
    return HRows(h=torch.from_numpy(np.ascontiguousarray(h[keep])), grid=expected,
                 labels=torch.from_numpy(labels[keep]), attributes=parts,
                 class_names=[list(n) for n in names], source_hash=digest.hexdigest(),
                 images=torch.from_numpy(keep))


def split_rows(cfg: ExperimentConfig, rows: HRows) -> tuple[HRows, HRows]:
    """(training, validation) images, stratified by the joint label, classifier.val_fraction
    held out, seeded by train.seed: every timestep of a validation image is held out."""
    from debiaslab.training.classifier_data import stratified_split

    train, val = stratified_split(rows.joint(), cfg.classifier.val_fraction, cfg.train.seed)
    return rows.subset(train), rows.subset(val)


def class_weights(rows: HRows, balance: bool) -> list[Tensor]:
    """Per attribute, the cross-entropy weight of each class: N / (K n_c) when ``balance``
    (every class weighs as much as in a balanced set), else 1."""
    out = []
    for a, size in enumerate(rows.groups):
        counts = torch.bincount(rows.labels[:, a], minlength=size).double()
        if balance:
            out.append((len(rows.labels) / (size * counts.clamp(min=1))).float())
        else:
            out.append(torch.ones(size))
    return out


def heads_loss(net: Any, h: Tensor, t: Tensor, labels: Tensor, groups: Sequence[int],
               weights: Sequence[Tensor] | None = None) -> Tensor:
    """Per-row loss [B]: the sum over attributes of (weighted) cross-entropy of each
    attribute's logits."""
    logits = net(h, t).float()
    total = logits.new_zeros(len(h))
    for a, part in enumerate(logits.split(list(groups), dim=1)):
        w = None if weights is None else weights[a].to(part.device)
        ce = torch.nn.functional.cross_entropy(part, labels[:, a].to(part.device),
                                               reduction="none")
        total = total + (ce * w[labels[:, a].to(part.device)] if w is not None else ce)
    return total


def _heads_task_class() -> Any:
    """The task class, built on first use (training imports torch-heavy modules)."""
    from debiaslab.training.loop import TrainTask

    class HHeadsTask(TrainTask):
        """Cross-entropy of the per-timestep heads on (image, timestep) rows of the h table;
        the rows of a step are the Trainer's epoch shuffle over N x S rows."""

        kind = "h_classifier"

        def __init__(self, cfg: ExperimentConfig, rows: HRows) -> None:
            if len(rows.labels) == 0:
                raise DataError("h_classifier: no training images")
            self.cfg, self.rows = cfg, rows
            self.steps = len(rows.grid)
            self.grid_t = torch.tensor(rows.grid, dtype=torch.float32)
            self.weights = class_weights(rows, cfg.ba.balance_classes)
            options = {**cfg.model.options, "grid": rows.grid, "groups": rows.groups}
            self.model_cfg = dataclasses.replace(cfg.model, options=options)
            self.rows_hash = rows.rows_hash()

        def num_rows(self) -> int:
            return len(self.rows.labels) * self.steps

        def build_model(self) -> nn.Module:
            from debiaslab.nets import build_net

            return build_net(self.model_cfg, shape=self.rows.h.shape[2:], num_classes=0,
                             num_outputs=sum(self.rows.groups), where="h_classifier.model")

        def make_batch(self, plan: Any) -> dict[str, Tensor]:
            image, step = plan.indices // self.steps, plan.indices % self.steps
            return {"h": self.rows.h[image, step].float(), "t": self.grid_t[step],
                    "labels": self.rows.labels[image]}

        def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
            return heads_loss(model, batch["h"], batch["t"], batch["labels"], self.rows.groups,
                              self.weights)

        def content_hash(self) -> str:
            return self.rows.source_hash

        def data_state(self) -> dict[str, Any]:
            return {"shape": [int(d) for d in self.rows.h.shape[2:]],
                    "num_classes": sum(self.rows.groups), "content_hash": self.content_hash()}

        def extra_state(self) -> dict[str, Any]:
            """What load_classifier and the guidance need, without the training data."""
            c, r = self.cfg.classifier, self.rows
            names = [f"{a}={n}" for a, group in zip(r.attributes, r.class_names) for n in group]
            return {"classifier": {
                "net": self.model_cfg.net, "model": to_dict(self.model_cfg),
                "shape": [int(d) for d in r.h.shape[2:]], "num_outputs": sum(r.groups),
                "class_names": names, "num_cond_classes": 0,
                "schedule": self.cfg.diffusion.schedule,
                "num_timesteps": self.cfg.diffusion.num_timesteps,
                "input": "features", "time_input": True, "label": c.label,
                "features": c.features, "timestep_range": [r.grid[0], r.grid[-1]],
                "ema": self.cfg.train.ema_decay > 0, "rows_hash": self.rows_hash,
                "h_heads": {"grid": r.grid, "attributes": r.attributes,
                            "class_names": r.class_names, "groups": r.groups,
                            "balance_classes": self.cfg.ba.balance_classes}}}

        def check_state(self, state: dict[str, Any], source: Path, resume: bool = True) -> None:
            super().check_state(state, source, resume)
            saved = state.get("classifier", {})
            if resume and saved.get("rows_hash") != self.rows_hash:
                raise CheckpointError(f"{source}: the heads' rows, labels or grid differ from "
                                      f"the checkpoint's; use a new name or output_dir")

    return HHeadsTask


@torch.no_grad()
def evaluate_heads(model: nn.Module, rows: HRows, *, batch_size: int = 512) -> dict[str, Any]:
    """Validation of every head on held-out images, per grid timestep: class-balanced accuracy
    (the mean recall over each attribute's classes, so answering the majority class scores
    1/K) and cross-entropy, averaged over attributes; ``accuracy_by``: per attribute. In the
    evaluation format of the classifier stage (one bucket per timestep, t_lo = t_hi = t)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    n, steps = len(rows.labels), len(rows.grid)
    by = {a: [] for a in rows.attributes}
    losses = []
    for k, t in enumerate(rows.grid):
        logits = torch.cat([model(rows.h[i:i + batch_size, k].float().to(device),
                                  torch.full((min(batch_size, n - i),), float(t), device=device)
                                  ).float().cpu() for i in range(0, n, batch_size)]) if n else (
            torch.zeros(0, sum(rows.groups)))
        step_loss = []
        for a, part in enumerate(logits.split(rows.groups, dim=1)):
            labels = rows.labels[:, a]
            recalls = [float((part[labels == c].argmax(1) == c).double().mean())
                       for c in range(rows.groups[a]) if (labels == c).any()]
            by[rows.attributes[a]].append(float(np.mean(recalls)) if recalls else float("nan"))
            step_loss.append(float(torch.nn.functional.cross_entropy(part, labels))
                             if n else float("nan"))
        losses.append(float(np.mean(step_loss)))
    model.train(was_training)
    accuracy = np.mean([by[a] for a in rows.attributes], axis=0).tolist()
    return {"t_lo": list(rows.grid), "t_hi": list(rows.grid), "accuracy": accuracy,
            "loss": losses, "count": [n] * steps, "accuracy_by": by,
            "accuracy_mean": float(np.nanmean(accuracy)) if steps else float("nan"),
            "loss_mean": float(np.nanmean(losses)) if steps else float("nan"),
            "extra_metrics": {f"accuracy_{a.replace(':', '_')}": float(np.nanmean(v))
                              for a, v in by.items()}}


def heads_trainer(cfg: ExperimentConfig, **kwargs: Any) -> Any:
    """One Ray Train worker's heads Trainer, from the run config alone."""
    from debiaslab.training.loop import Trainer

    train_rows, _ = split_rows(cfg, h_rows(cfg))
    return Trainer(cfg, _heads_task_class()(cfg, train_rows), kwargs.pop("run_dir"), **kwargs)


def _heads_here(cfg: ExperimentConfig, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    from debiaslab.training.loop import Trainer

    train_rows, val_rows = split_rows(cfg, h_rows(cfg))
    trainer = Trainer(cfg, _heads_task_class()(cfg, train_rows), cfg.run_dir, **kwargs)
    result = trainer.fit()
    return result.checkpoint, evaluate_heads(trainer.ema.shadow, val_rows)


def _validate_heads(cfg: ExperimentConfig, checkpoint: Any, device: Any
                    ) -> tuple[Any, dict[str, Any]]:
    from debiaslab.training.classifier import load_classifier

    model, _ = load_classifier(checkpoint, device)
    return checkpoint, evaluate_heads(model, split_rows(cfg, h_rows(cfg))[1])


H_HEADS = AuxModelKind(_heads_here, heads_trainer, _validate_heads)


def heads_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The classifier stage's view of the heads: the h table's column as features."""
    from debiaslab.methods.api import with_section

    section = dataclasses.replace(cfg.h_classifier, features=f"{h_table(cfg)}.h")
    return with_section(cfg, "h_classifier", section)


# ---------------------------------------------------------------------------------- guidance

from debiaslab.diffusion.guidance import (  # noqa: E402  (the guidance base of the foundation)
    BALANCED_TARGET,
    GuidanceContext,
    Guided,
)

GuidanceMode = Literal["distribution", "sample"]


@dataclass
class AttributeTermsSpec:
    """What attribute guidance steers toward, shared by the h-space and image-space forms."""

    checkpoint: str = ""  # the classifier (file or run folder); "" = the recipe's ``artifact``
    artifact: str = "h_classifier"
    mode: GuidanceMode = "distribution"
    scale: float = 1.0
    # distribution mode: per attribute of the classifier, its target shares (empty: uniform)
    p_ref: tuple[tuple[float, ...], ...] = ()
    # sample mode: per attribute a target class, -1 = balanced over seeds (empty: all -1)
    target: tuple[int, ...] = ()
    loss: Literal["chi2", "kl"] = "chi2"
    temperature: float = TEMPERATURE
    loss_scale: float = LOSS_SCALE
    # timesteps [lo, hi] (inclusive) in which guidance acts; empty: every step it can
    window: tuple[int, ...] = ()
    # batch: the released scale (its effect per sample falls as 1/B under distribution
    # guidance); per_sample: the distribution loss's gradient multiplied by the guided batch's
    # size, so one scale means the same at every batch size
    scale_mode: Literal["batch", "per_sample"] = "batch"


@dataclass
class BAGuidanceSpec(AttributeTermsSpec):
    """``{type: balancing_act, ...}``: the released constants as fields (step 1.5 beta_t^0.05)."""

    step_coef: float = STEP_COEF
    step_power: float = STEP_POWER


@dataclass
class ImageGuidanceSpec(AttributeTermsSpec):
    """``{type: image_attribute, ...}``: a classifier of clean images on x0_hat(x_t)."""

    artifact: str = "image_classifier"
    loss_scale: float = 1.0


class AttributeTerms:
    """The attribute losses of one guidance entry: per attribute of the classifier (its logits
    split into ``groups``), a distribution term chi2/KL(p_hat, p_ref) or a sample term
    -sum_i p_i[c_i]; the terms are summed (§3.5, multi-attribute: one term per attribute)."""

    def __init__(self, spec: AttributeTermsSpec, groups: Sequence[int], names: Sequence[str],
                 where: str) -> None:
        self.spec, self.groups, self.names = spec, [int(g) for g in groups], list(names)
        if spec.mode not in ("distribution", "sample"):
            raise ConfigError(f"{where}.mode: distribution or sample, got {spec.mode!r}")
        if not (spec.scale == spec.scale and spec.scale >= 0):
            raise ConfigError(f"{where}.scale: must be >= 0, got {spec.scale}")
        if spec.temperature <= 0:
            raise ConfigError(f"{where}.temperature: must be > 0, got {spec.temperature}")
        shares = spec.p_ref or tuple((1.0 / g,) * g for g in self.groups)
        if len(shares) != len(self.groups):
            raise ConfigError(f"{where}.p_ref: one share list per attribute of the classifier "
                              f"({', '.join(self.names)}), got {len(shares)}")
        self.p_ref = []
        for a, (p, g) in enumerate(zip(shares, self.groups)):
            if len(p) != g:
                raise ConfigError(f"{where}.p_ref[{a}]: {self.names[a]} has {g} classes, got "
                                  f"{list(p)}")
            self.p_ref.append(check_p_ref(p, spec.loss, f"{where}.p_ref[{a}]"))
        targets = spec.target or (BALANCED_TARGET,) * len(self.groups)
        if len(targets) != len(self.groups):
            raise ConfigError(f"{where}.target: one class per attribute ({', '.join(self.names)})"
                              f", got {list(targets)}")
        for a, (c, g) in enumerate(zip(targets, self.groups)):
            if c != BALANCED_TARGET and not 0 <= c < g:
                raise ConfigError(f"{where}.target[{a}]: {c} is not a class of {self.names[a]} "
                                  f"(0..{g - 1}, or -1 balanced over seeds)")
        self.targets = list(targets)

    def sample_targets(self, seeds: Sequence[int]) -> Tensor:
        """[B, A] target classes: fixed ones, or for -1 the seed's digit in a mixed radix over
        the balanced attributes (seed mod K_1, then (seed // K_1) mod K_2, ...), so any run of
        consecutive seeds covers the joint classes evenly."""
        out = torch.empty(len(seeds), len(self.groups), dtype=torch.long)
        seeds_t = torch.tensor(list(seeds), dtype=torch.long)
        radix = 1
        for a, (c, g) in enumerate(zip(self.targets, self.groups)):
            if c == BALANCED_TARGET:
                out[:, a] = (seeds_t // radix) % g
                radix *= g
            else:
                out[:, a] = c
        return out

    def loss(self, logits: Tensor, targets: Tensor | None) -> Tensor:
        """The summed terms of logits [n, sum K] (targets [n, A] in sample mode)."""
        total = logits.new_zeros((), dtype=torch.float64)
        for a, part in enumerate(logits.split(self.groups, dim=1)):
            probs = attribute_probs(part.double(), self.spec.temperature)
            if self.spec.mode == "distribution":
                total = total + distribution_loss(probs, self.p_ref[a], self.spec.loss)
            else:
                if targets is None:
                    raise ConfigError("sample guidance needs per-sample targets (ba_target)")
                total = total + sample_guidance_loss(probs, targets[:, a].to(probs.device))
        return total

    def effective_scale(self, rows: int) -> float:
        """The scale, times the guided batch's size under per_sample distribution guidance."""
        per_sample = self.spec.scale_mode == "per_sample" and self.spec.mode == "distribution"
        return self.spec.scale * (rows if per_sample else 1)


def _window(spec: AttributeTermsSpec, allowed: Sequence[int], where: str, what: str
            ) -> tuple[float, float]:
    """The inclusive [lo, hi] of spec.window; each end must be one of ``allowed``."""
    if not spec.window:
        return (-math.inf, math.inf)
    if len(spec.window) != 2 or spec.window[0] > spec.window[1]:
        raise ConfigError(f"{where}.window: [lo, hi] timesteps with lo <= hi, got "
                          f"{list(spec.window)}")
    outside = [t for t in spec.window if t not in allowed]
    if outside:
        shown = (f"{allowed[0]}, {allowed[1]}, ..., {allowed[-1]}" if len(allowed) > 3
                 else ", ".join(map(str, allowed)))
        raise ConfigError(f"{where}.window: {outside[0]} is not {what} ({shown}); pick both "
                          f"ends from it")
    return float(spec.window[0]), float(spec.window[1])


def _conditional_rows(rows: int, batch: int, y: Tensor | None, null_label: int | None
                      ) -> Tensor:
    """Which of ``rows`` h rows belong to the conditional prediction: under CFG (a doubled
    forward, [cond; uncond], or labels equal to the null label) only the conditional ones, so
    the batch statistics never mix the two halves."""
    mask = torch.ones(rows, dtype=torch.bool)
    if y is not None and null_label is not None and len(y) == rows:
        mask = (y != null_label).cpu()
    elif rows == 2 * batch:  # a CFG wrapper inside this one doubled the batch
        mask[batch:] = False
    return mask


def _load_attribute_classifier(spec: AttributeTermsSpec, ctx: GuidanceContext, where: str
                               ) -> tuple[Any, dict[str, Any]]:
    if ctx.load_classifier is None:
        raise ConfigError(f"{where}: no classifier loader in this context")
    if not spec.checkpoint:
        raise ConfigError(f"{where}.checkpoint: names no classifier (the recipe binds its "
                          f"{spec.artifact!r} artifact; elsewhere give the checkpoint)")
    return ctx.load_classifier(spec.checkpoint, ctx.device)


class AttributeGuided(Guided):
    """Base of the attribute guidances: per-sample targets in sample mode (``ba_target``)."""

    cond_keys = ("ba_target",)
    terms: AttributeTerms
    spec: AttributeTermsSpec

    def sample_cond(self, seeds: Sequence[int]) -> dict[str, Tensor]:
        out = super().sample_cond(seeds)
        if self.spec.mode == "sample":
            out["ba_target"] = self.terms.sample_targets(seeds)
        return out


@GUIDANCE.register("balancing_act")
class HSpaceAttributeGuidance(AttributeGuided):
    """Parihar et al. 2024, §3.4-3.5: at each guided step, the bottleneck h_t of the forward
    pass is replaced by h_t - eta_t s grad_h (loss_scale L(h_t)), eta_t = step_coef
    beta_t^step_power, L the attribute terms of the per-timestep heads on h_t (sample or
    distribution guidance); the decoder then runs on the edited h_t with the original skips.
    The gradient flows through the heads only, never through the UNet. Steps outside the
    window, or at a timestep farther from every head than the grid's spacing (t = 999 of the
    official grid), are unguided."""

    Spec = BAGuidanceSpec

    def __init__(self, inner: Any, heads: Any, terms: AttributeTerms, *,
                 window: tuple[float, float], null_label: int | None = None) -> None:
        super().__init__(inner)
        if not callable(getattr(self.net, "h_edit", None)):
            raise ConfigError(f"sample.guidance balancing_act: the backbone "
                              f"{type(self.net).__name__} has no h-space (model.net: unet)")
        self.heads, self.terms, self.window, self.null_label = heads, terms, window, null_label
        self.spec = terms.spec
        grid = heads.grid.double().cpu()
        self.reach = float((grid[1:] - grid[:-1]).max()) if len(grid) > 1 else 0.5
        self.betas = self.schedule.betas

    @classmethod
    def build(cls, inner: Any, spec: BAGuidanceSpec, ctx: GuidanceContext
              ) -> "HSpaceAttributeGuidance":
        where = "sample.guidance balancing_act"
        heads, info = _load_attribute_classifier(spec, ctx, where)
        meta = info.get("h_heads")
        if not isinstance(heads, HHeads) or not isinstance(meta, dict):
            raise ConfigError(f"{where}.checkpoint: {info.get('checkpoint')} is not a "
                              f"Balancing Act h-classifier (net h_heads)")
        if len(meta["grid"]) != len(heads.grid):
            raise ConfigError(f"{where}.checkpoint: {len(heads.grid)} heads for a grid of "
                              f"{len(meta['grid'])} timesteps; retrain the h_classifier")
        terms = AttributeTerms(spec, meta["groups"], meta["attributes"], where)
        window = _window(spec, [int(t) for t in meta["grid"]], where,
                         "a timestep with a head")
        return cls(inner, heads, terms, window=window, null_label=ctx.null_label)


    def active(self, t: Tensor) -> Tensor:
        """Rows whose timestep is in the window and within reach of a head."""
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).cpu()
        grid = self.heads.grid.double().cpu()
        near = (t.view(-1, 1) - grid).abs().min(1).values < self.reach
        return near & (t >= self.window[0]) & (t <= self.window[1])

    def edit(self, h: Tensor, t: Tensor, targets: Tensor | None, y: Tensor | None,
             batch: int) -> Tensor:
        """The guided h of one forward (the h_edit function)."""
        rows = len(h)
        t_rows = torch.as_tensor(t).reshape(-1).expand(rows)
        use = self.active(t_rows) & _conditional_rows(rows, batch, y, self.null_label)
        if not use.any():
            return h
        idx = torch.nonzero(use).reshape(-1).to(h.device)
        dtype = next(self.heads.parameters()).dtype
        picked = None if targets is None else targets.to(h.device)[idx]

        def loss_fn(hh: Tensor) -> Tensor:
            logits = self.heads(hh[idx].to(dtype), t_rows.to(h.device)[idx])
            return self.terms.loss(logits, picked)

        t_int = int(round(float(t_rows[idx[0]])))
        step = guidance_step(self.betas[t_int], self.spec.step_coef, self.spec.step_power)
        return guided_h(h, loss_fn, scale=self.terms.effective_scale(len(idx)),
                        step=step, loss_scale=self.spec.loss_scale)

    def __call__(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        mine, rest = self.own(cond)
        if self.spec.scale == 0:
            return self.inner(x_t, t, **rest)
        targets = mine.get("ba_target")

        def fn(h: Tensor, tt: Tensor) -> Tensor:
            return self.edit(h, tt, targets, rest.get("y"), len(x_t))

        with self.net.h_edit(fn):
            return self.inner(x_t, t, **rest)


@GUIDANCE.register("image_attribute")
class ImageSpaceAttributeGuidance(AttributeGuided):
    """The image-space baseline of Parihar et al. 2024 (§3.6, "universal guidance"): the
    attribute terms on a classifier of clean images applied to x0_hat(x_t), and
    eps' = eps + sqrt(1 - abar_t) s grad_{x_t} (loss_scale L): the classifier-guidance direction
    toward the targets. Unlike h-space guidance the gradient runs back through the UNet (x0_hat
    depends on eps(x_t))."""

    Spec = ImageGuidanceSpec

    def __init__(self, inner: Any, classifier: Any, terms: AttributeTerms, *,
                 window: tuple[float, float], time_input: bool,
                 null_label: int | None = None) -> None:
        super().__init__(inner)
        self.classifier, self.terms, self.window = classifier, terms, window
        self.time_input, self.null_label, self.spec = time_input, null_label, terms.spec

    @classmethod
    def build(cls, inner: Any, spec: ImageGuidanceSpec, ctx: GuidanceContext
              ) -> "ImageSpaceAttributeGuidance":
        from debiaslab.training.classifier_data import INPUT_IMAGES

        where = "sample.guidance image_attribute"
        model, info = _load_attribute_classifier(spec, ctx, where)
        if info.get("input") != INPUT_IMAGES:
            raise ConfigError(f"{where}.checkpoint: {info.get('checkpoint')} is not a "
                              f"classifier of images")
        parts = label_parts(str(info.get("label", "class")))
        if len(parts) != 1:
            raise ConfigError(f"{where}.checkpoint: predicts {info.get('label')}; one label")
        terms = AttributeTerms(spec, [int(info["num_outputs"])], parts, where)
        T = inner.schedule.num_timesteps
        window = _window(spec, range(T), where, f"a timestep of the model (0..{T - 1})")
        return cls(inner, model, terms, window=window, time_input=bool(info["time_input"]),
                   null_label=ctx.null_label)


    def __call__(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        mine, rest = self.own(cond)
        t_rows = torch.as_tensor(t).reshape(-1).expand(len(x_t))
        inside = (t_rows.double() >= self.window[0]) & (t_rows.double() <= self.window[1])
        if self.spec.scale == 0 or not bool(inside.all()):
            return self.inner(x_t, t, **rest)
        use = _conditional_rows(len(x_t), len(x_t), rest.get("y"), self.null_label)
        idx = torch.nonzero(use).reshape(-1).to(x_t.device)
        targets = mine.get("ba_target")
        dtype = next(self.classifier.parameters()).dtype
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            eps = self.inner(x, t, **rest)
            a, s = self.schedule.alpha_sigma(t_rows, x)
            x0_hat = ((x - s * eps) / a)[idx].to(dtype)
            zeros = torch.zeros(len(idx), device=x.device)
            logits = (self.classifier(x0_hat, zeros) if self.time_input
                      else self.classifier(x0_hat))
            picked = None if targets is None else targets.to(x.device)[idx]
            loss = (self.spec.loss_scale * self.terms.effective_scale(len(idx))
                    * self.terms.loss(logits, picked))
            (grad,) = torch.autograd.grad(loss.to(x.dtype), x)
        return eps.detach() + s * grad


# -------------------------------------------------------------------------------- evaluation

ATTRIBUTE_GUIDANCE = ("balancing_act", "image_attribute")


def _entry_attributes(cfg: ExperimentConfig, entry: dict[str, Any]) -> list[str]:
    """The attributes a guidance entry's classifier predicts, in its p_ref order."""
    if entry.get("type") == "balancing_act" or not entry.get("checkpoint"):
        return label_parts(cfg.h_classifier.label)
    from debiaslab.training.classifier import load_classifier

    return label_parts(str(load_classifier(entry["checkpoint"])[1].get("label", "class")))


def guided_targets(cfg: ExperimentConfig, sizes: dict[str, int]) -> dict[str, np.ndarray]:
    """{attribute: target shares} of every attribute in ``sizes`` (its class count): what the
    first attribute-guidance entry steers it toward (p_ref in distribution mode; the fixed
    target class, or uniform for -1, in sample mode), uniform for the others and without
    guidance."""
    out = {a: np.full(k, 1.0 / k) for a, k in sizes.items()}
    entry = next((e for e in cfg.sample.guidance if e.get("type") in ATTRIBUTE_GUIDANCE), None)
    if entry is None:
        return out
    for a, name in enumerate(_entry_attributes(cfg, entry)):
        if name not in out:
            continue
        if entry.get("mode", "distribution") == "distribution":
            if entry.get("p_ref"):
                out[name] = np.asarray(entry["p_ref"][a], dtype=np.float64)
        else:
            target = (entry.get("target") or [BALANCED_TARGET] * (a + 1))[a]
            if target != BALANCED_TARGET:
                out[name] = np.eye(sizes[name])[target]
    return out


def _predicted(cfg: ExperimentConfig, part: str, k: int, samples: Any, extractor: Any,
               cache: dict[str, Any]) -> np.ndarray:
    """The samples' classes of ``part``: metrics.subgroup_classifier's (one attribute), or the
    evaluation extractor's heads."""
    if cfg.metrics.subgroup_classifier:
        from debiaslab.methods.tiw_dsm import classify_subgroups

        return classify_subgroups(cfg.metrics.subgroup_classifier, samples.images, part, k)[0]
    if "ext" not in cache:
        cache["ext"] = extractor.extract(samples.images, batch_size=cfg.metrics.batch_size)
    ext = cache["ext"]
    if part == "class":
        return np.asarray(ext.classes)
    name = part.split(":", 1)[1]
    return np.asarray(ext.attributes[:, list(extractor.attr_names).index(name)], np.int64)


def attribute_evaluation(cfg: ExperimentConfig, samples: Any, extractor: Any,
                         inputs: dict[str, str]) -> tuple[dict[str, float], dict[str, Any]]:
    """Recipe.evaluation (§3.8): each attribute's predicted proportions in the samples (the
    evaluation extractor's attribute heads) against the guidance's target and the training
    set (metrics.subgroup_classifier predicts a single attribute where the extractor cannot).
    Metrics ``ba/fd_target_<attr>`` = ||p_gen - p_target||_2 (Choi et al.'s FD with
    the target in place of uniform; the usual ``eval/fd_<attr>`` measures against uniform),
    ``ba/fd_target_joint`` over the joint classes against the product of the targets, and every
    share. Figure ``attributes``: the proportions beside p_ref."""
    from debiaslab.data.locate import load_training_data
    from debiaslab.report import shares_figure
    from debiaslab.tracking import metric_key
    from debiaslab.training.classifier_data import dataset_labels

    parts = label_parts(cfg.h_classifier.label)
    check_attribute_predictor(cfg, parts)
    train = load_training_data(cfg)
    truth = {p: dataset_labels(train, p) for p in parts}
    sizes = {p: len(names) for p, (_, names) in truth.items()}
    target = guided_targets(cfg, sizes)
    cache: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    names, series = [], {"training set": [], "target (p_ref)": [], "samples": []}
    joint_gen, joint_target = np.zeros(len(samples.images), np.int64), np.ones(1)
    for p in parts:
        k, short = sizes[p], p.split(":", 1)[-1]
        pred = _predicted(cfg, p, k, samples, extractor, cache)
        p_gen = np.bincount(pred, minlength=k) / max(len(pred), 1)
        labels = truth[p][0]
        p_train = np.bincount(labels[labels >= 0], minlength=k) / max((labels >= 0).sum(), 1)
        metrics[metric_key(f"ba/fd_target_{short}")] = float(np.linalg.norm(p_gen - target[p]))
        for c in range(k):
            metrics[metric_key(f"ba/share_{short}={c}")] = float(p_gen[c])
            names.append(f"{short}={c}")
        for key, value in (("training set", p_train), ("target (p_ref)", target[p]),
                           ("samples", p_gen)):
            series[key].extend(float(v) for v in value)
        joint_gen = joint_gen * k + pred
        joint_target = np.outer(joint_target, target[p]).reshape(-1)
    if len(parts) > 1:
        p_joint = np.bincount(joint_gen, minlength=len(joint_target)) / max(len(joint_gen), 1)
        metrics["ba/fd_target_joint"] = float(np.linalg.norm(p_joint - joint_target))
    label = Path(samples.source).name
    figure = shares_figure(series, names, title=f"{cfg.name} / {label}: attribute shares",
                           xlabel="attribute = class")
    meta = {"attribute_shares": {"attributes": parts, "names": names,
                                 **{k: v for k, v in series.items()},
                                 "guidance_batch_size": cfg.sample.batch_size},
            "figures": {"attributes": figure}}
    return metrics, meta


def check_attribute_predictor(cfg: ExperimentConfig, parts: Sequence[str]) -> None:
    """The evaluation extractor must predict every guided attribute, or
    metrics.subgroup_classifier the single one (checked before training)."""
    from debiaslab.metrics.features import PREDICTIONS, register_builtin_extractors

    if cfg.metrics.subgroup_classifier:
        if len(parts) > 1:
            raise ConfigError(f"metrics.subgroup_classifier: predicts one label; "
                              f"h_classifier.label {'+'.join(parts)} has {len(parts)}: use an "
                              f"extractor that predicts each")
        return
    register_builtin_extractors()
    missing = [p for p in parts if p not in PREDICTIONS.get(cfg.metrics.extractor, ())]
    if missing:
        raise ConfigError(f"metrics.extractor={cfg.metrics.extractor}: does not predict "
                          f"{', '.join(missing)} (h_classifier.label); use an extractor with "
                          f"attribute heads for it (e.g. digits), or set "
                          f"metrics.subgroup_classifier")


# ----------------------------------------------------------------------------------- recipe

H_KEYS = ("ba.n_steps", "ba.keep_steps", "ba.h_dtype", "ba.images_per_forward")


def check_recipe(cfg: ExperimentConfig) -> None:
    """The recipe's rules: a UNet backbone (h-space), attribute labels the evaluation can
    predict, and only attribute-guidance entries of known shape."""
    from debiaslab.diffusion.guidance import guidance_spec

    if cfg.model.net != "unet":
        raise ConfigError(f"recipe balancing_act: model.net must be unet (the h-space "
                          f"backbone), got {cfg.model.net!r}")
    check_attribute_predictor(cfg, label_parts(cfg.h_classifier.label))
    for i, entry in enumerate(cfg.sample.guidance):
        guidance_spec(entry, f"sample.guidance[{i}]")


def _stages() -> tuple[Any, ...]:
    from debiaslab.methods.api import aux_model_stage, diffusion_stages, side_table_stage

    hvectors = side_table_stage(
        "hvectors", output="hvectors", table=h_table, mapper=HVectorMapper,
        mapper_kwargs=_h_kwargs, schema=_h_schema, inputs={"score_model": "checkpoint"},
        keys=H_KEYS, producer=_h_producer, prepare=_h_prepare, summary=_h_summary,
        description="h-vectors of every training image by DDIM inversion (Ray Data)")
    heads = aux_model_stage("h_classifier", kind=H_HEADS, inputs={"hvectors": "side_table"},
                            keys=("ba.balance_classes",) + H_KEYS, configure=heads_config,
                            description="per-timestep attribute heads on h_t (Ray Train)")
    return diffusion_stages(sample_inputs={"h_classifier": "checkpoint"},
                            extra=(hvectors, heads), evaluate_keys=("h_classifier.label",))


def _register() -> None:
    from debiaslab.methods.api import Recipe, register_recipe

    register_recipe(Recipe(
        "balancing_act", _stages(), check=check_recipe, evaluation=attribute_evaluation,
        description="Balancing Act (Parihar et al. 2024): h-vectors by DDIM inversion (Ray "
                    "Data), per-timestep h-classifiers (Ray Train), sample or distribution "
                    "guidance in h-space"))


_register()
