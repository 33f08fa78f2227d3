"""The Semantic Motion Predictor: intermediate CLIP image embeddings between two keyframes.

Input: the start and end embeddings K_s, K_e. The L tokens K_i = lerp(K_s, K_e, τ_i), τ_i =
(i−1)/(L−1), plus a sinusoidal τ embedding, go with two anchor tokens (K_s, K_e) through a stack
of pre-LN transformer blocks. Output: P_i = K_i + 4τ_i(1−τ_i)·σ·Δ_i, with Δ from a zero-initialised
head. So an untrained predictor is exactly the linear baseline and the endpoints are always
exact; σ (the data's RMS embedding norm) sets the output scale.

Inputs are centred and scaled by statistics of the training data (`input_center`,
`input_scale`: buffers saved with the weights; zeros and σ until training sets them). CLIP
embeddings share a large common direction (for the random `tiny` tower cos ≈ 0.98 between any
two images), so dividing by σ alone would leave what tells frames and clips apart at a few
percent of unit scale, and the network learns slowly or not at all.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from storycli.atomic import atomic_write_bytes, atomic_write_text
from storycli.errors import InvalidInput

WEIGHTS_NAME = "predictor.safetensors"


class PredictorError(InvalidInput):
    """A predictor checkpoint that cannot be used (missing, corrupt, wrong encoder width)."""


@dataclass(frozen=True)
class PredictorConfig:
    dim: int  # embedding width (the encoder's projection_dim)
    width: int = 1024  # transformer width
    layers: int = 8
    heads: int = 16
    mlp_ratio: int = 4
    dropout: float = 0.1
    frames: int = 16  # L the predictor was trained for (any L works at inference)
    scale: float = 1.0  # σ: RMS norm of the training embeddings
    encoder: str = ""  # encoder name/id the embeddings came from
    preprocess_id: str = ""

    @classmethod
    def tiny(cls, dim: int = 32, **overrides: Any) -> PredictorConfig:
        return cls(**{"dim": dim, "width": 64, "layers": 2, "heads": 4, **overrides})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PredictorConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown or "dim" not in data:
            raise PredictorError(f"predictor config: unknown keys {unknown} or no 'dim'")
        return cls(**data)


def taus(frames: int, device: torch.device | None = None) -> torch.Tensor:
    """τ_i = (i−1)/(L−1) for i = 1..L."""
    if frames < 2:
        raise ValueError("a transition needs at least 2 frames")
    return torch.linspace(0.0, 1.0, frames, device=device)


def lerp_embeddings(start: torch.Tensor, end: torch.Tensor, frames: int) -> torch.Tensor:
    """The linear baseline: (B, D), (B, D) -> (B, L, D); exact at both ends."""
    t = taus(frames, start.device).to(start.dtype)[None, :, None]
    return torch.lerp(start[:, None], end[:, None], t)


def slerp_embeddings(start: torch.Tensor, end: torch.Tensor, frames: int) -> torch.Tensor:
    """Spherical interpolation of directions with linearly interpolated norms (B, L, D)."""
    t = taus(frames, start.device).to(start.dtype)[None, :, None]
    n0, n1 = start.norm(dim=-1, keepdim=True), end.norm(dim=-1, keepdim=True)
    u0, u1 = start / n0.clamp_min(1e-12), end / n1.clamp_min(1e-12)
    cos = (u0 * u1).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.acos(cos)[:, None]
    sin = torch.sin(omega)
    near = sin.abs() < 1e-4  # (almost) parallel: lerp the directions instead
    safe = torch.where(near, torch.ones_like(sin), sin)
    w0 = torch.where(near, 1 - t, torch.sin((1 - t) * omega) / safe)
    w1 = torch.where(near, t, torch.sin(t * omega) / safe)
    direction = w0 * u0[:, None] + w1 * u1[:, None]
    return direction * torch.lerp(n0[:, None], n1[:, None], t)


def _sinusoid(t: torch.Tensor, width: int) -> torch.Tensor:
    half = width // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device) / half)
    angles = t[..., None] * freqs * math.pi
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class MotionPredictor(torch.nn.Module):
    def __init__(self, config: PredictorConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embed_in = torch.nn.Linear(c.dim, c.width)
        self.tau_mlp = torch.nn.Sequential(
            torch.nn.Linear(c.width, c.width), torch.nn.GELU(), torch.nn.Linear(c.width, c.width)
        )
        self.anchors = torch.nn.Parameter(torch.zeros(2, c.width))
        torch.nn.init.normal_(self.anchors, std=0.02)
        layer = torch.nn.TransformerEncoderLayer(
            c.width,
            c.heads,
            c.mlp_ratio * c.width,
            c.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = torch.nn.TransformerEncoder(layer, c.layers, enable_nested_tensor=False)
        self.norm_out = torch.nn.LayerNorm(c.width)
        self.head = torch.nn.Linear(c.width, c.dim)
        # Zero-initialised head: an untrained predictor is exactly the linear baseline.
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)
        self.register_buffer("input_center", torch.zeros(c.dim))
        self.register_buffer("input_scale", torch.tensor(float(c.scale)))

    @torch.no_grad()
    def set_input_normalization(self, center: torch.Tensor, scale: float) -> None:
        """Centre and scale of the network's inputs: the training data's mean embedding and
        the RMS norm of the centred embeddings."""
        self.input_center.copy_(center)
        self.input_scale.fill_(scale)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.input_center) / self.input_scale

    def forward(self, start: torch.Tensor, end: torch.Tensor, frames: int) -> torch.Tensor:
        """(B, D), (B, D) -> P of shape (B, L, D), P[:, 0] = start and P[:, -1] = end."""
        scale = self.config.scale
        base = lerp_embeddings(start, end, frames)
        t = taus(frames, start.device).to(start.dtype)
        tau = self.tau_mlp(_sinusoid(t, self.config.width))
        tokens = self.embed_in(self._normalize(base)) + tau
        anchors = self.embed_in(self._normalize(torch.stack([start, end], dim=1))) + self.anchors
        hidden = self.blocks(torch.cat([anchors, tokens], dim=1))[:, 2:]
        delta = self.head(self.norm_out(hidden))
        bump = (4 * t * (1 - t))[None, :, None]
        return base + bump * scale * delta


def weights_path(path: Path) -> Path:
    """The weights file of a checkpoint given as the file or its folder."""
    return path / WEIGHTS_NAME if path.suffix != ".safetensors" else path


def save_predictor(model: MotionPredictor, path: Path) -> Path:
    """Write weights (`.safetensors`) and config (`.json` beside them) atomically."""
    weights = weights_path(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_text(weights.with_suffix(".json"), model.config.to_json())
    atomic_write_bytes(weights, save(state))
    return weights


def load_predictor(path: Path, expect_dim: int | None = None) -> MotionPredictor:
    """Load a checkpoint (a `.safetensors` file or a folder holding `predictor.safetensors`)."""
    weights = weights_path(Path(path))
    config_path = weights.with_suffix(".json")
    if not weights.is_file() or not config_path.is_file():
        raise PredictorError(
            f"{path}: no predictor checkpoint here (need {weights.name} and {config_path.name}); "
            "train one with `storydiff train-predictor`"
        )
    try:
        config = PredictorConfig.from_dict(json.loads(config_path.read_text()))
        model = MotionPredictor(config)
        model.load_state_dict(load_file(weights))
    except (OSError, ValueError, RuntimeError, TypeError, SafetensorError) as exc:
        raise PredictorError(f"{weights}: not a readable predictor checkpoint ({exc})") from exc
    if expect_dim is not None and config.dim != expect_dim:
        raise PredictorError(
            f"{weights}: the predictor works on {config.dim}-d embeddings but the encoder gives "
            f"{expect_dim}-d ones; use the encoder it was trained with ({config.encoder or '?'})"
        )
    return model.eval()
