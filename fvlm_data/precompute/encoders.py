"""The frozen encoders: DINOv2 patch tokens and SD-VAE latents for batches of RGB frames.

Defaults are the real models (`DEFAULT_DINO`, `DEFAULT_VAE` below: DINOv2-small, SD's VAE). The
`tiny` preset builds small random-initialised models of the same output shapes from configs,
with no network access; a store made with it says so in its attributes.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any

import torch
from torch import nn

from fvlm_data.errors import EncoderLoadError
from fvlm_data.store.format import block_array

DEFAULT_DINO = "facebook/dinov2-small"
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
TINY = "tiny"
PRESETS = {"default": (DEFAULT_DINO, DEFAULT_VAE), "tiny": (TINY, TINY)}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TINY_SEED = 1234  # fixed, so the tiny preset writes the same arrays on every run
# SD chose its VAE's 0.18215 so that latents have unit variance; the tiny random VAE's raw latents
# have std ~0.30, so its own factor is 1 / that std (`raw_latent_std` over 8 videos of each synthetic
# task, 8 frames at 112 px, seed 0; tests/test_encoders.py re-derives it). With SD's factor the tiny
# latents had std 0.05 and the next-frame loss was numerically absent from joint training.
TINY_VAE_SCALING_FACTOR = 3.36


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def is_tiny(name: str) -> bool:
    """The tiny random-initialised encoders: `tiny`, and `tiny:K` (a DINO of K blocks); no hub, no files."""
    return name == TINY or name.startswith(TINY + ":")


def load_dino(name: str) -> tuple[nn.Module, str]:
    """DINO by its id (a store's `dino` attribute): the model and how to call it, 'transformers' or 'timm'.
    `tiny` is DINOv2-small's widths with 2 random blocks; `tiny:K` the same with K blocks (deeper query
    experiments); both are the same weights on every call."""
    if is_tiny(name):
        from transformers import Dinov2Config, Dinov2Model

        blocks = name.removeprefix(TINY).removeprefix(":") or "2"
        if not blocks.isdigit() or int(blocks) < 1:
            raise EncoderLoadError(f"DINO {name!r}: the tiny DINO is 'tiny' or 'tiny:K' with K blocks, K >= 1")
        # DINOv2-small's widths (384, patch 14): same [1 + 18*18, 384] output.
        cfg = Dinov2Config(hidden_size=384, num_hidden_layers=int(blocks), num_attention_heads=6,
                           intermediate_size=768, patch_size=14, image_size=256)
        with _seeded(TINY_SEED):
            return Dinov2Model(cfg), "transformers"
    if name.startswith("timm:"):
        import timm

        try:
            return timm.create_model(name[5:], pretrained=True, num_classes=0, dynamic_img_size=True), "timm"
        except Exception as e:
            raise EncoderLoadError(f"cannot load timm model {name[5:]!r}: {_one_line(e)}") from None
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(name), "transformers"
    except Exception as e:
        raise EncoderLoadError(f"cannot load DINO model {name!r}: {_one_line(e)}") from None


def dino_blocks(model: nn.Module, kind: str) -> nn.ModuleList:
    """DINO's transformer blocks, in order (transformers' `encoder.layer`, timm's `blocks`)."""
    return model.blocks if kind == "timm" else model.encoder.layer


def dino_final_norm(model: nn.Module, kind: str) -> nn.Module:
    """The layer norm after DINO's last block (its final tokens are this norm's output)."""
    return model.norm if kind == "timm" else model.layernorm


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of a model's weights (every tensor of its state_dict: name, dtype, shape, bytes). A store with
    DINO's block states records it, and the deep query refuses other weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def _load_vae(name: str) -> nn.Module:
    from diffusers import AutoencoderKL

    if name == TINY:
        # Four blocks = three 2x downsamplings, 4 latent channels: 256 px -> [4, 32, 32] like SD's VAE.
        with _seeded(TINY_SEED + 1):
            return AutoencoderKL(
                block_out_channels=(8, 8, 16, 16),
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=1,
                latent_channels=4,
                norm_num_groups=4,
                sample_size=256,
                scaling_factor=TINY_VAE_SCALING_FACTOR,
            )
    try:
        return AutoencoderKL.from_pretrained(name)
    except Exception as e:
        raise EncoderLoadError(f"cannot load VAE {name!r}: {_one_line(e)}") from None


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


class FrozenEncoders:
    """DINOv2 + SD-VAE, frozen, run in half precision on GPU (fp32 on CPU) under inference_mode.

    On CUDA the VAE runs channels-last with cuDNN autotuning (its convolutions at 256 px are ~95%
    of the encoding FLOPs: ~270 GFLOP per frame against DINOv2-small's ~16). Only the VAE's
    encoder and quant_conv run (`vae.encode`), never its decoder. ``compile=True`` wraps both
    models in ``torch.compile`` (one compilation per batch shape; fuses GroupNorm + SiLU).
    """

    def __init__(self, dino: str = DEFAULT_DINO, vae: str = DEFAULT_VAE, device: str = "cpu",
                 compile: bool = False, vae_scaling_factor: float | None = None, dino_layers: int = 0) -> None:
        """`vae_scaling_factor` overrides the VAE's own: a run adding rows to an existing store passes the
        factor that store recorded, so that every row of one store has the same scale. `dino_layers` N > 0
        also returns the hidden states entering each of DINO's last N blocks (`dino_block<k>`)."""
        dino_model, dino_kind = load_dino(dino)
        self._setup(dino_model, dino_kind, _load_vae(vae), dino, vae, device, compile, dino_layers)
        if vae_scaling_factor is not None:
            self.vae_scaling_factor = float(vae_scaling_factor)

    @classmethod
    def from_modules(cls, dino: nn.Module, vae: nn.Module, device: str = "cpu", *, dino_id: str = "custom",
                     vae_id: str = "custom", dino_kind: str = "transformers", compile: bool = False,
                     dino_layers: int = 0) -> FrozenEncoders:
        """Wrap already-built models (e.g. random-initialised real-size ones for benchmarks). ``vae``
        needs diffusers' interface: ``encode(x).latent_dist.mean`` and ``config.scaling_factor``."""
        self = cls.__new__(cls)
        self._setup(dino, dino_kind, vae, dino_id, vae_id, device, compile, dino_layers)
        return self

    def _setup(self, dino_model: nn.Module, dino_kind: str, vae_model: nn.Module, dino_id: str, vae_id: str,
               device: str, compile: bool, dino_layers: int = 0) -> None:
        self.dino_id, self.vae_id, self.dino_kind = dino_id, vae_id, dino_kind
        depth = len(dino_blocks(dino_model, dino_kind))
        if not 0 <= dino_layers <= depth:
            raise EncoderLoadError(f"--dino-layers {dino_layers}: DINO {dino_id!r} has {depth} blocks "
                                   f"(give 0 to {depth})")
        # The blocks whose input states are stored, and the weights that made them (before any dtype change).
        self.dino_blocks = tuple(range(depth - dino_layers, depth))
        self.dino_fingerprint = weights_fingerprint(dino_model) if dino_layers else None
        self.device = torch.device(device)
        # bf16 where supported: the models were trained in mixed precision and it halves memory.
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.dino = dino_model.eval().requires_grad_(False).to(self.device)
        self.vae = vae_model.eval().requires_grad_(False).to(self.device)
        if self.dtype != torch.float32:
            self.dino, self.vae = self.dino.to(self.dtype), self.vae.to(self.dtype)
        self.channels_last = self.device.type == "cuda"
        if self.channels_last:
            self.vae = self.vae.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True  # fixed batch shapes: pick the fastest conv algorithms once
        self.vae_scaling_factor = float(self.vae.config.scaling_factor)
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        self._mean, self._std = mean, std
        self.compiled = compile
        self._dino_fn, self._vae_fn = self._dino_tokens, self._vae_mean
        if compile:
            self._dino_fn = torch.compile(self._dino_tokens, dynamic=False)
            self._vae_fn = torch.compile(self._vae_mean, dynamic=False)

    def _dino_tokens(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """`dino`: the final tokens [B, N, D]; with --dino-layers, `dino_block<k>`: the states entering block k."""
        if not self.dino_blocks:
            if self.dino_kind == "timm":
                return {"dino": self.dino.forward_features(x)}
            return {"dino": self.dino(pixel_values=x).last_hidden_state}
        if self.dino_kind == "timm":  # the input of each block, caught on its way in
            states: dict[str, torch.Tensor] = {}
            blocks = dino_blocks(self.dino, "timm")
            hooks = [blocks[k].register_forward_pre_hook(
                lambda _m, args, k=k: states.__setitem__(block_array(k), args[0])) for k in self.dino_blocks]
            try:
                return {"dino": self.dino.forward_features(x), **states}
            finally:
                for h in hooks:
                    h.remove()
        out = self.dino(pixel_values=x, output_hidden_states=True)  # hidden_states[k] enters block k
        return {"dino": out.last_hidden_state, **{block_array(k): out.hidden_states[k] for k in self.dino_blocks}}

    def _vae_mean(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(x).latent_dist.mean

    def describe(self) -> dict[str, Any]:
        """What the store's attributes record about the encoders."""
        return {
            "dino": self.dino_id,
            "dino_loader": "tiny-random-init" if is_tiny(self.dino_id) else self.dino_kind,
            "vae": self.vae_id,
            "vae_loader": "tiny-random-init" if self.vae_id == TINY else "diffusers",
            "vae_scaling_factor": self.vae_scaling_factor,
            "dino_normalisation": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD},
            "vae_input_range": [-1.0, 1.0],
        }

    @torch.inference_mode()
    def encode(self, frames: torch.Tensor, *, float32: bool = True, _eager: bool = False) -> dict[str, torch.Tensor]:
        """frames: uint8 [B, H, W, 3] (any device). Returns one tensor per feature of the store's table
        (`fvlm_data.store.format.FRAME_TABLE`), by name: `dino` [B, N, D] DINO tokens, `latents`
        [B, C, h, w] scaled VAE latents and, with `dino_layers`, `dino_block<k>` [B, N, D], on the device:
        fp32, or with `float32=False` in the compute dtype (bf16 on CUDA: no fp32 copy is made for features
        that are stored as fp16 or int8 anyway)."""
        x = frames.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        dino_in = ((x - self._mean) / self._std).to(self.dtype)
        tokens = (self._dino_tokens if _eager else self._dino_fn)(dino_in)
        vae_in = (x * 2.0 - 1.0).to(self.dtype)
        if self.channels_last:
            vae_in = vae_in.contiguous(memory_format=torch.channels_last)
        latents = (self._vae_mean if _eager else self._vae_fn)(vae_in) * self.vae_scaling_factor
        out = {"dino": tokens["dino"], "latents": latents, **{k: t for k, t in tokens.items() if k != "dino"}}
        return {name: t.float() for name, t in out.items()} if float32 else out

    @torch.inference_mode()
    def raw_latent_std(self, frames: torch.Tensor) -> float:
        """Std of the VAE's unscaled latents (`latent_dist.mean`) of uint8 frames [B, H, W, 3]."""
        return float((self.encode(frames, _eager=True)["latents"] / self.vae_scaling_factor).std())

    def output_shapes(self, image_size: int) -> dict[str, tuple[int, ...]]:
        """Each output's per-frame shape ((N, D), (C, h, w), ...) for frames of image_size, found by
        encoding one blank frame."""
        # Eager: a one-frame batch must not cost a compilation.
        out = self.encode(torch.zeros(1, image_size, image_size, 3, dtype=torch.uint8), _eager=True)
        return {name: tuple(t.shape[1:]) for name, t in out.items()}
