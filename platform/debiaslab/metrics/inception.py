"""Standard FID features: Inception-v3 pool3 (2048-d) and 1008-way logits with the TF-ported FID
weights through torch-fidelity's FeatureExtractorInceptionV3, loaded from a LOCAL file only."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from debiaslab.data.schema import one_line
from debiaslab.errors import CheckpointError, DebiaslabError
from debiaslab.metrics.features import EXTRACTORS, FeatureExtractor, default_device

# torch-fidelity 0.4.0, feature_extractor_inceptionv3.URL_INCEPTION_V3: the file name that
# torch.hub.load_state_dict_from_url would store under <torch hub dir>/checkpoints/.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE
)
INCEPTION_NAME = "inception-v3-tfid-pool3"
WEIGHTS_OPTION = "metrics.inception_weights"
POOL3_FEATURE = "2048"  # torch-fidelity's name for the pool3 features (FID / KID / PR)
LOGITS_FEATURE = "logits_unbiased"  # 1008-way logits without the fc bias (torch-fidelity's IS)
POOL3_DIM = 2048
LOGITS_DIM = 1008
INPUT_CHANNELS = (1, 3)  # grayscale is repeated to RGB
RGB_CHANNELS = 3
HASH_CHUNK_BYTES = 1 << 20
HASH_PREFIX_CHARS = 12


def default_weights_path() -> Path:
    """Where torch-fidelity's own download would put the weights: <torch hub dir>/checkpoints/."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def resolve_inception_weights(weights_path: str | Path | None = None) -> Path:
    """The local weights file: `weights_path` when given, else the torch hub cache. Never
    downloads; a missing file is a one-line DebiaslabError naming the path looked at."""
    explicit = bool(weights_path) and str(weights_path).strip() != ""
    path = Path(str(weights_path)).expanduser() if explicit else default_weights_path()
    if path.is_file():
        return path
    where = (
        f"{WEIGHTS_OPTION} points to {path}, which is not a file"
        if explicit
        else f"not found at {path} (torch hub cache; {WEIGHTS_OPTION} is not set)"
    )
    raise DebiaslabError(one_line(
        f"Inception-v3 FID weights {where}; debiaslab never downloads them: fetch "
        f"{INCEPTION_WEIGHTS_URL} on a machine with internet and either place it at "
        f"{default_weights_path()} or set {WEIGHTS_OPTION} to its path"
    ))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(HASH_CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_module(path: Path) -> torch.nn.Module:
    """torch-fidelity's module with the weights at `path`, read with weights_only=True (the
    library itself would unpickle with weights_only=False, so it gets an in-memory copy)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt / non-tensor files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(one_line(
            f"{path}: not a readable Inception weights file ({first[:200]})")) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    try:
        return FeatureExtractorInceptionV3(
            INCEPTION_NAME, [POOL3_FEATURE, LOGITS_FEATURE], feature_extractor_weights_path=buffer
        )
    except (RuntimeError, ValueError) as exc:  # load_state_dict: missing/unexpected keys, shapes
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(one_line(
            f"{path}: not torch-fidelity Inception-v3 weights ({first[:200]})")) from None


@EXTRACTORS.register("inception")
class InceptionExtractor(FeatureExtractor):
    """Inception-v3 (TF FID port) pool3 features [N, 2048] and unbiased logits [N, 1008].

    Any image size: torch-fidelity resizes uint8 input to 299x299 internally (TF1-style bilinear)
    and scales to [-1, 1]; 1-channel images are repeated to 3 channels. No domain predictions.
    """

    def __init__(
        self,
        weights_path: str | Path | None = None,
        *,
        device: str | torch.device | None = None,
    ) -> None:
        self.weights_path = resolve_inception_weights(weights_path)
        self.weights_sha256 = file_sha256(self.weights_path)
        self.device = torch.device(device) if device is not None else default_device()
        self.model = _load_module(self.weights_path).to(self.device).eval()
        self.name = INCEPTION_NAME
        self.feature_dim = POOL3_DIM
        self.logits_dim = LOGITS_DIM
        self.class_names = []
        self.attr_names = []
        self.input_shape = None
        self.input_channels = INPUT_CHANNELS
        self.supports_inception_score = True

    def metadata(self) -> dict[str, Any]:
        import torch_fidelity

        return {
            **super().metadata(),
            "implementation": f"torch-fidelity {torch_fidelity.__version__}",
            "features": f"pool3 ({POOL3_FEATURE})",
            "logits": f"{LOGITS_FEATURE} ({LOGITS_DIM})",
            "weights_file": self.weights_path.name,
            "weights_sha256": self.weights_sha256[:HASH_PREFIX_CHARS],
        }

    def _forward(self, batch: Tensor) -> dict[str, Tensor]:
        if batch.shape[1] != RGB_CHANNELS:
            batch = batch.expand(-1, RGB_CHANNELS, -1, -1)
        features, logits = self.model(batch)
        return {"features": features, "logits": logits}
