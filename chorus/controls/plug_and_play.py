"""Plug-and-Play (Tumanyan et al., CVPR 2023): edit an image by injecting its own features into a new generation.

    1. z_0 = E(guidance image) (posterior mean); DDIM inversion with the empty prompt over
       `inversion_steps` steps (the paper: 1000) gives the trajectory z_t of the image for every t
       of the sampling schedule, and z_T.
    2. Sampling from z_T with the target prompt (DDIM, guidance as usual). At each step t, before the
       UNet call, the *guidance pass* runs the UNet on the image's own z_t with the empty prompt and
       records, for the layers named below, the decoder's residual-branch features and the
       self-attention queries and keys; the generation's UNet call then uses them in place of its own:
         - features of decoder layer 4 (SD: up_blocks[1].resnets[1]) for the first τ_f of the steps,
         - self-attention Q and K of decoder layers 4–11 for the first τ_A of the steps.
       (Decoder layer ℓ = up block ℓ // k, position ℓ % k, k = resnets per up block: SD's numbering.)

The paper's defaults are τ_f = 0.8, τ_A = 0.5 (40 and 25 of 50 steps), 0.5/0.5 for primitive guidance
images (masks, layouts). The injection goes to both halves of the guidance batch, as the reference code
does. Works on any UNet of Chorus (world model, SD 1.x/2.x, SDXL): the layers are found by name.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from chorus import samplers as S
from chorus.controls.base import Control, ControlRun
from chorus.errors import ChorusError


def decoder_layers(unet) -> list[dict]:
    """The UNet's decoder layers in SD's numbering: [{"index", "resnet", "self_attention" or None}, …]."""
    layers = []
    per_block = max(len(b.resnets) for b in unet.up_blocks)
    for i, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            attn = None
            if attentions is not None and j < len(attentions):
                attn = f"up_blocks.{i}.attentions.{j}"
            layers.append({"index": i * per_block + j, "resnet": f"up_blocks.{i}.resnets.{j}",
                           "self_attention": attn})
    return layers


def check_fraction(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ChorusError(f"{name} is a fraction of the sampling steps and must be in [0, 1], got {value}.")
    return value


@dataclass
class Inversion:
    """The DDIM inversion of an image: its latent z_t (VP form) at each model timestep t, and z_T."""

    trajectory: dict[int, torch.Tensor]
    z0: torch.Tensor
    steps: int

    @property
    def final(self) -> torch.Tensor:
        return self.trajectory[max(self.trajectory)]

    def at(self, t: int) -> torch.Tensor:
        """z_t at the trajectory's timestep nearest to t (exact when the sampling grid is a subset)."""
        keys = np.array(sorted(self.trajectory))
        return self.trajectory[int(keys[np.abs(keys - t).argmin()])]


def check_edit_size(pipe, width: int, height: int) -> None:
    """An edited image's sides must be multiples of the VAE factor."""
    f = pipe.vae_scale_factor
    if width % f or height % f:
        raise ChorusError(f"The image is {width}×{height} pixels; an edit needs both sides to be multiples of the "
                          f"VAE factor {f} (resize or crop it first).")


def image_size(image) -> tuple[int, int]:
    """(width, height) of a PIL image or a (B, 3, H, W) tensor."""
    return (image.width, image.height) if hasattr(image, "width") else (image.shape[-1], image.shape[-2])


@torch.no_grad()
def encode_mean(pipe, image) -> torch.Tensor:
    """z_0 = s·(mean of q(z | x) − shift) of a PIL image or a (B, 3, H, W) tensor in [−1, 1]."""
    check_edit_size(pipe, *image_size(image))
    batch = 1 if hasattr(image, "width") else image.shape[0]
    return pipe.encode_image(image, batch, None, mean=True)


@torch.no_grad()
def ddim_inversion(pipe, z0: torch.Tensor, steps: int, prompt: str = "", spacing: str | None = None,
                   progress: bool = True) -> Inversion:
    """Invert z_0 with DDIM over `steps` steps of the model's schedule, conditioned on `prompt` (the empty
    prompt, as Plug-and-Play does), no guidance; returns every z_t on the way."""
    if not isinstance(steps, int) or steps < 1:
        raise ChorusError(f"inversion steps must be a whole number of at least 1, got {steps!r}.")
    stage = pipe.base
    from chorus.pipeline import micro_inputs
    b = z0.shape[0]
    h, w = z0.shape[-2] * pipe.vae_scale_factor, z0.shape[-1] * pipe.vae_scale_factor
    cond, _ = pipe.encode_prompt(stage, [prompt] * b, None, micro_inputs(b, (h, w)), False, 1)
    cfg = pipe.scheduler_config
    sigmas, timesteps = S.get_schedule(stage.schedule, steps, sampler="ddim",
                                       spacing=spacing or cfg.get("timestep_spacing", "leading"),
                                       steps_offset=cfg.get("steps_offset", 0),
                                       set_alpha_to_one=cfg.get("set_alpha_to_one", True))
    denoiser = pipe.make_denoiser(stage, cond, None, 1.0, 0.0, (), sigmas, timesteps)
    ascending = torch.cat([sigmas.new_zeros(1), sigmas[:len(timesteps)].flip(0)])
    t_of = {float(s): int(t) for s, t in zip(sigmas[:len(timesteps)], timesteps)}
    trajectory: dict[int, torch.Tensor] = {}

    def record(info):
        s = float(info["sigma"])
        if s in t_of:
            trajectory[t_of[s]] = (info["x"] / (1 + s ** 2) ** 0.5).float().cpu()

    device = stage.unet.device
    x = S.ddim_invert(denoiser, z0.to(device), ascending.to(device), callback=record, disable=not progress)
    s_max = float(ascending[-1])
    trajectory[t_of[s_max]] = (x / (1 + s_max ** 2) ** 0.5).float().cpu()
    return Inversion(trajectory, z0, steps)


class PlugAndPlay(Control):
    """Inject the guidance image's decoder features and self-attention Q/K into a generation (see the module)."""

    def __init__(self, inversion: Inversion, tau_f: float = 0.8, tau_attn: float = 0.5, feature_layers=(4,),
                 attention_layers: tuple | None = None, source_prompt: str = ""):
        self.inversion = inversion
        self.tau_f, self.tau_attn = check_fraction("tau_f", tau_f), check_fraction("tau_attn", tau_attn)
        self.feature_layers = tuple(feature_layers)
        self.attention_layers = attention_layers   # None: decoder layers 4 and up (those with self-attention)
        self.source_prompt = source_prompt
        self.saved: dict[tuple[str, str], torch.Tensor] = {}
        self.mode = None

    def bind(self, run: ControlRun, stack: contextlib.ExitStack) -> None:
        layers = decoder_layers(run.unet)
        by_index = {layer["index"]: layer for layer in layers}
        missing = [i for i in self.feature_layers if i not in by_index]
        if missing:
            raise ChorusError(f"Plug-and-Play feature layer(s) {missing} do not exist: this UNet's decoder has layers "
                              f"0–{max(by_index)}.")
        attn = self.attention_layers if self.attention_layers is not None else [i for i in by_index if i >= 4]
        self.resnets = {by_index[i]["resnet"] for i in self.feature_layers}
        self.attn1 = {f"{by_index[i]['self_attention']}.transformer_blocks.{k}.attn1"
                      for i in attn if by_index.get(i, {}).get("self_attention")
                      for k in range(len(_module(run.unet, by_index[i]["self_attention"]).transformer_blocks))}
        self.run = run
        b = run.batch
        if self.inversion.z0.shape[0] not in (1, b):
            raise ChorusError(f"The inversion holds {self.inversion.z0.shape[0]} images for a batch of {b}.")
        from chorus.pipeline import micro_inputs
        inputs = {"prompt": [self.source_prompt] * b, **micro_inputs(b, (run.height, run.width))}
        src = run.stage.conditioner({k: v for k, v in inputs.items() if k in run.stage.conditioner.input_keys},
                                    dtype=run.unet.dtype, device=run.unet.device)
        self.source_kwargs = src.unet_kwargs()
        names = self.resnets | self.attn1
        stack.enter_context(run.unet.hooks(self.hook, names=lambda n: n in names))

    def release(self) -> None:
        self.saved, self.mode, self.run = {}, None, None

    def unet_call(self, x, t, unet_kwargs):
        run = self.run
        frac = run.step_of(t) / max(1, run.num_steps)
        self.inject_f, self.inject_a = frac < self.tau_f, frac < self.tau_attn
        self.mode = None
        if not (self.inject_f or self.inject_a):
            return {}
        t0 = int(torch.as_tensor(t).flatten()[0].round())
        z_t = self.inversion.at(t0).to(x.device, x.dtype)
        if z_t.shape[0] == 1 and run.batch > 1:
            z_t = z_t.expand(run.batch, -1, -1, -1)
        self.mode, self.saved = "record", {}
        run.unet(z_t, t[:run.batch], **self.source_kwargs)   # the guidance pass
        self.mode = "inject"
        return {}

    def hook(self, name: str, kind: str, tensor: torch.Tensor):
        if self.mode is None:
            return None
        wanted = (kind == "resnet_branch" and name in self.resnets and self.inject_f) or \
                 (kind in ("query", "key") and name in self.attn1 and self.inject_a)
        if not wanted:
            return None
        if self.mode == "record":
            self.saved[(name, kind)] = tensor
            return None
        src = self.saved.get((name, kind))
        if src is None:
            return None
        reps = tensor.shape[0] // src.shape[0]
        return src.repeat(reps, *([1] * (src.dim() - 1))).to(tensor.dtype)


def _module(model, name: str):
    m = model
    for part in name.split("."):
        m = getattr(m, part) if not part.isdigit() else m[int(part)]
    return m


@torch.no_grad()
def edit(pipe, image, prompt, method: str = "pnp", strength: float = 0.75, tau_f: float = 0.8,
         tau_attn: float = 0.5, inversion_steps: int = 1000, num_inference_steps: int = 50,
         guidance_scale: float | None = None, negative_prompt=None, seed: int | None = 0, source_prompt: str = "",
         inversion: Inversion | None = None, progress: bool = True, **kwargs):
    """Edit `image` (PIL or (B, 3, H, W) in [−1, 1]) towards `prompt`: Plug-and-Play ("pnp") or SDEdit ("sdedit",
    img2img at `strength`). Returns the pipeline's output (with `.inversion` for pnp, reusable)."""
    guidance = pipe.default_guidance if guidance_scale is None else guidance_scale
    if method == "sdedit":
        if not 0.0 < strength <= 1.0:
            raise ChorusError(f"strength must be in (0, 1], got {strength}.")
        check_edit_size(pipe, *image_size(image))
        return pipe(prompt, image=image, strength=strength, num_inference_steps=num_inference_steps,
                    guidance_scale=guidance, negative_prompt=negative_prompt, seed=seed, sampler="ddim",
                    progress=progress, **kwargs)
    if method != "pnp":
        raise ChorusError(f"Unknown edit method {method!r}: choose pnp (Plug-and-Play) or sdedit.")
    check_fraction("tau_f", tau_f)
    check_fraction("tau_attn", tau_attn)
    if inversion is None:
        z0 = encode_mean(pipe, image)
        inversion = ddim_inversion(pipe, z0, inversion_steps, source_prompt, progress=progress)
    control = PlugAndPlay(inversion, tau_f, tau_attn, source_prompt=source_prompt)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    n = inversion.z0.shape[0]
    start = inversion.final if len(prompts) == n else inversion.final.expand(len(prompts), -1, -1, -1)
    h, w = inversion.z0.shape[-2] * pipe.vae_scale_factor, inversion.z0.shape[-1] * pipe.vae_scale_factor
    out = pipe(prompts, latents=start.clone(), height=h, width=w, sampler="ddim", num_inference_steps=num_inference_steps,
               guidance_scale=guidance, negative_prompt=negative_prompt, seed=seed, controls=[control],
               progress=progress, **kwargs)
    out.inversion = inversion
    return out


__all__ = ["PlugAndPlay", "Inversion", "ddim_inversion", "encode_mean", "check_edit_size", "edit", "decoder_layers"]
