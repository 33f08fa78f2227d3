"""The `Backbone` interface: what the story loop (`keyframes/loop.py`) asks of a diffusion model.

The loop owns what is the same for every backbone: which frames share a forward, the scheduler's
steps over one batch of latents, CSA's per-call draws and banks, checkpoints and callbacks. A
backbone owns what depends on its network: how prompts become the network's conditioning, how
one forward (both CFG halves) becomes a noise prediction, the latents' shape, the VAE, and where
CSA goes in (its layers, the hooks that drive `CSAState`, windowed forwards, regional compiling).
The scheduler's side that differs between a UNet's noise schedule and flow matching is the
backbone's too: setting the timesteps (FLUX.1 shifts them by the image's token count), the first
latents from the noise, and noising pictures' rows to a step's level. Methods mirror what the
loop needs of SDXL and FLUX.1, nothing more.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from PIL import Image

    from storycli.consistency.csa_state import CSAState, LayerInfo
    from storycli.consistency.ip_adapter import Photos
    from storycli.keyframes.plan import Plan, PlannedFrame
    from storycli.keyframes.schedule import RenderSize


class Conditioning(Protocol):
    """One forward's conditioning in the backbone's own form: the loop only keeps it per chunk
    and hands it back to `predict_noise`."""

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the initial noise is drawn in (the text embeddings')."""
        ...


class Backbone(Protocol):
    """A diffusion model as the story loop drives it (see the module doc)."""

    @property
    def device(self) -> torch.device:
        """Where the denoising network runs (latents live there)."""
        ...

    @property
    def scheduler(self) -> Any:
        """The diffusers scheduler stepping every frame's latents as one batch."""
        ...

    def guided(self, guidance: float) -> bool:
        """Whether forwards run classifier-free guidance (an unconditional half) at `guidance`."""
        ...

    def conditioning(
        self,
        plan: Plan,
        calls: Sequence[Sequence[PlannedFrame]],
        size: RenderSize,
        cfg: bool,
    ) -> Conditioning:
        """The conditioning of one forward running these plan calls' frames, in row order. Each
        call's part is encoded alone, so a frame's conditioning does not depend on which calls
        share its forward."""
        ...

    def text_encoded(self) -> None:
        """Every forward's conditioning is made: text encoders the loop no longer needs may
        leave the GPU (FLUX's T5); the next story's `conditioning` brings them back."""
        ...

    def prepare_timesteps(self, steps: int, size: RenderSize) -> None:
        """The scheduler's timesteps for `steps` steps at this render size (flow matching
        shifts them by the image's token count), its begin index at the first."""
        ...

    def add_photos(
        self,
        conditioning: Conditioning,
        photos: Photos,
        shown: Sequence[Sequence[str]],
        cfg: bool,
        latent_size: tuple[int, int],
    ) -> None:
        """Add IP-Adapter photo conditioning for rows showing the characters `shown`."""
        ...

    def initial_noise(
        self, frames: Sequence[PlannedFrame], size: RenderSize, dtype: torch.dtype
    ) -> torch.Tensor:
        """Each frame's starting noise, unscaled, on the CPU (see `plan.noise_draws`)."""
        ...

    def initial_latents(self, noise: torch.Tensor) -> torch.Tensor:
        """The first step's latents on the device from the unscaled initial noise."""
        ...

    def encode_pictures(self, paths: list[str | None], size: RenderSize) -> list[torch.Tensor]:
        """Pictures (start images, characters' images) → their clean latents."""
        ...

    def noise_pictures(
        self, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Pictures' clean latents noised to timestep `t`'s level with their initial noise
        (the scheduler's forward process)."""
        ...

    def step_kwargs(self, generators: list[torch.Generator]) -> dict[str, Any]:
        """Extra `scheduler.step` arguments (the generators of schedulers that draw noise)."""
        ...

    def predict_noise(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        conditioning: Conditioning,
        cfg: bool,
        guidance: float,
    ) -> torch.Tensor:
        """One forward of the network on these rows' latents at timestep `t`: the noise
        prediction, guided (both halves run in the one forward) when `cfg`."""
        ...

    def decoding(self) -> AbstractContextManager[None]:
        """Around every `decode` of a story (e.g. the VAE decoder upcast once for all)."""
        ...

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Latents → images, as the backbone's pipeline decodes them."""
        ...

    def freeu(self, plan: Plan) -> AbstractContextManager[None]:
        """The story's `freeu:` settings on the network for the duration."""
        ...

    def release(self) -> None:
        """After the story: the pipeline's offload hooks re-armed for its next use."""
        ...

    # -- Consistent Self-Attention ------------------------------------------------------------

    def csa_layers(self, blocks: Sequence[str]) -> list[LayerInfo]:
        """The self-attention layers CSA replaces in these blocks, with their resolution level."""
        ...

    def installed_csa(self, state: CSAState) -> AbstractContextManager[Any]:
        """CSA's processors in `csa_layers`, and the forward hooks driving `state`, for the
        duration."""
        ...

    def windowed(
        self, state: CSAState, frames: int, window: int, stride: int
    ) -> AbstractContextManager[None]:
        """The network's forwards on `frames` frames run window by window (sliding-window CSA)."""
        ...

    def compiled(self, backend: str) -> AbstractContextManager[None]:
        """The network's repeated blocks `torch.compile`d for the duration."""
        ...


@contextmanager
def compiled_blocks(model: torch.nn.Module, backend: str = "inductor") -> Iterator[None]:
    """Regional compilation: `torch.compile` each repeated block of the network (diffusers'
    `compile_repeated_blocks`, where the model declares `_repeated_blocks`: SDXL's UNet its
    transformer blocks, FLUX.1's transformer its double- and single-stream blocks), not the
    whole network.

    Blocks of one kind share their compiled code, so compiling costs one block's graphs rather
    than the network's, and `dynamic=True` keeps the batch size symbolic: the story loop's
    forwards of different sizes (write, read chunks, the last short chunk) reuse one graph
    instead of recompiling each. CSA's processors run eagerly inside (`torch.compiler.disable`):
    the norms, projections and feed-forward around them are what gets fused. Undone on exit,
    so a pipeline reused for the next story runs eagerly unless that one compiles too."""
    names = tuple(getattr(model, "_repeated_blocks", None) or ("BasicTransformerBlock",))
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    for block in blocks:
        block.compile(backend=backend, dynamic=True)
    try:
        yield
    finally:
        for block in blocks:
            block._compiled_call_impl = None


def window_mean(
    inputs: torch.Tensor,
    frames: int,
    starts: Sequence[int],
    size: int,
    state: CSAState,
    forward_rows: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Sliding-window CSA's one network call (the paper's Algorithm 1): `inputs` holds every
    frame's row (times CFG groups); each window of `size` frames from `starts` runs as its own
    forward (`forward_rows(rows)`, after `state.begin_window`), and a frame's prediction is the
    mean over the windows that cover it. Activations exist for one window at a time."""
    groups = inputs.shape[0] // frames
    total = torch.zeros_like(inputs)
    covered = torch.zeros(frames, dtype=inputs.dtype, device=inputs.device)
    for start in starts:
        rows = torch.tensor(
            [g * frames + start + j for g in range(groups) for j in range(size)],
            device=inputs.device,
        )
        state.begin_window(size)
        total[rows] += forward_rows(rows)
        covered[start : start + size] += 1
    return total / covered.repeat(groups).view(-1, *([1] * (inputs.ndim - 1)))


@contextmanager
def forward_replaced(model: torch.nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    """`model.forward` replaced for the duration, then restored: an instance attribute already
    there (compiled, offload hooks) is put back, else the class's method shows through again."""
    original = model.forward
    patched = "forward" in vars(model)
    model.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        if patched:
            model.forward = original  # type: ignore[method-assign]
        else:
            del model.forward
