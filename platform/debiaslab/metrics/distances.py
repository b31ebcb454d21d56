"""Image distances d(x0, x0_hat) per sample, by name (``DISTANCES``): squared L2, LPIPS with
local VGG16 weights (never downloaded), and Euclidean distance in a metric extractor's feature
space. Minority Guidance's minority score (docs/algorithms.md §1.2) is their first user.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from debiaslab.data.pixels import to_uint8
from debiaslab.errors import CheckpointError, ConfigError
from debiaslab.registry import Registry
from debiaslab.strict import check_options

DISTANCES: Registry[Any] = Registry("distance")


class Distance:
    """d(x0, x0_hat) per sample [B] for images in [-1, 1] ([B, C, H, W])."""

    options: tuple[str, ...] = ()

    @classmethod
    def check_options(cls, options: dict[str, Any], where: str = "distance_options") -> None:
        check_options(where, options, cls.options)

    @classmethod
    def check_ready(cls, options: dict[str, Any], where: str = "distance_options") -> None:
        """Settings needed before any work (files the distance loads), checked by the recipe."""

    def __call__(self, x0: Tensor, x0_hat: Tensor) -> Tensor:
        raise NotImplementedError


@DISTANCES.register("l2")
class L2Distance(Distance):
    """The paper's squared-L2 alternative (§1.2): mean over pixels of (x0 - x0_hat)^2. Without
    clipping this is ((1 - abar_t) / abar_t) * mean (eps_theta - eps)^2, the scaled eps error."""

    def __init__(self, device: Any = "cpu", where: str = "distance_options") -> None:
        pass

    def __call__(self, x0: Tensor, x0_hat: Tensor) -> Tensor:
        return (x0 - x0_hat).float().pow(2).flatten(1).mean(1)


@DISTANCES.register("lpips")
class LPIPSDistance(Distance):
    """LPIPS with VGG16 features (the official choice, §1.2): the lpips package's linear
    layers (shipped with it) on torchvision VGG16 features whose weights come from a local file
    (``vgg_weights``: a torchvision ``vgg16`` state_dict, read with weights_only=True; never
    downloaded). Inputs in [-1, 1]; 1-channel images are repeated to 3 channels."""

    options = ("vgg_weights",)

    @classmethod
    def check_ready(cls, options: dict[str, Any], where: str = "distance_options") -> None:
        path = str(options.get("vgg_weights", "") or "")
        if not path:
            raise ConfigError(f"{where}.vgg_weights: lpips needs the local torchvision VGG16 "
                              f"weights file (vgg16-397923af.pth); debiaslab never downloads it. "
                              f"Set the path, or use distance: l2 or feature")

    def __init__(self, vgg_weights: str = "", device: Any = "cpu",
                 where: str = "distance_options") -> None:
        self.check_ready({"vgg_weights": vgg_weights}, where)
        self.model = load_lpips_vgg(Path(vgg_weights), where).to(device).eval()
        self.model.requires_grad_(False)

    def __call__(self, x0: Tensor, x0_hat: Tensor) -> Tensor:
        if x0.shape[1] == 1:
            x0, x0_hat = x0.expand(-1, 3, -1, -1), x0_hat.expand(-1, 3, -1, -1)
        return self.model(x0.float(), x0_hat.float()).flatten()


def load_lpips_vgg(path: Path, where: str = "distance_options") -> torch.nn.Module:
    """lpips.LPIPS(net="vgg") with the VGG16 features read from ``path`` (torchvision keys
    ``features.<i>.weight/bias``, mapped onto lpips' slices). Missing or foreign files are
    one-line errors naming the path."""
    import warnings

    import lpips

    if not path.is_file():
        raise CheckpointError(f"LPIPS VGG16 weights not found at {path} "
                              f"({where}.vgg_weights); debiaslab never "
                              f"downloads them: fetch torchvision's vgg16-397923af.pth on a "
                              f"machine with internet and point vgg_weights at it")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt / non-tensor files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(f"{path}: not a readable VGG16 weights file ({first})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation of pretrained=False
        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    slices = {}  # torchvision feature index -> lpips key prefix
    for key in model.state_dict():
        parts = key.split(".")
        if parts[0] == "net" and parts[1].startswith("slice"):
            slices[parts[2]] = ".".join(parts[:3])
    mapped = {}
    for key, value in state.items():
        parts = str(key).split(".")
        if len(parts) == 3 and parts[0] == "features" and parts[1] in slices:
            mapped[f"{slices[parts[1]]}.{parts[2]}"] = value
    wanted = {k for k in model.state_dict() if k.startswith("net.")}
    if set(mapped) != wanted:
        raise CheckpointError(f"{path}: not torchvision VGG16 weights (found {len(mapped)} of "
                              f"{len(wanted)} feature tensors)")
    try:
        model.load_state_dict(mapped, strict=False)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise CheckpointError(f"{path}: VGG16 weights of the wrong shapes ({first})") from None
    return model


@DISTANCES.register("feature")
class FeatureDistance(Distance):
    """Euclidean distance ||phi(x0) - phi(x0_hat)|| in a registered metric extractor's feature
    space (``extractor``: digits, inception, ...; other options go to the extractor)."""

    options = ("extractor", "inception_weights")

    def __init__(self, extractor: str = "digits", device: Any = "cpu",
                 where: str = "distance_options", **options: Any) -> None:
        from debiaslab.metrics.features import build_extractor

        self.extractor = build_extractor(extractor, **options)

    def __call__(self, x0: Tensor, x0_hat: Tensor) -> Tensor:
        def features(x: Tensor) -> Tensor:
            u8 = to_uint8(x).cpu().numpy()
            return torch.from_numpy(self.extractor.extract(u8, batch_size=len(u8)).features)

        return (features(x0) - features(x0_hat)).double().norm(dim=1).float().to(x0.device)


def build_distance(name: str, options: dict[str, Any], device: Any = "cpu",
                   where: str = "distance_options") -> Distance:
    """Distance ``name`` with its ``options`` (checked first; ``where``: their config key)."""
    cls = DISTANCES.get(name)
    cls.check_options(options, where)
    cls.check_ready(options, where)
    return cls(device=device, where=where, **options)
