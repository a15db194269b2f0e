"""Text-to-image: the denoising loop of latent diffusion, visible in one place.

    prompt ──conditioner──► context / pooled / time ids ─┐
    seed ──► noise x_T ──sampler(denoiser = UNet + guidance [+ controls])──► z_0 ──VAE.decode──► image

`Pipeline.from_pretrained(folder)` reads a diffusers-format Stable Diffusion 1.x/2.x or SDXL
folder (or a Chorus model folder, which has the same layout). An SDXL refiner joins as the second
expert of an `ExpertEnsemble` (`refiner=` folder, `switch_at=0.8`).

Seeds: the initial noise (and any per-step noise of stochastic samplers) is drawn on the CPU from
a `torch.Generator` seeded with `seed` (or `seed + i` for the i-th image when `seeds_per_image` is
set), in the same order and shapes as diffusers, so a seed gives the same image on every run and
on any device, and the same image diffusers makes from the same folder, scheduler and steps.
"""
from __future__ import annotations

import contextlib
import functools

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from chorus import samplers as S
from chorus.controls import ControlNetControl, ControlRun, merge_residuals
from chorus.conditioning import (Conditioner, Conditioning, NumberEmbedder, TextEmbedder, build_embedders,
                                 check_widths, read_conditioner_spec)
from chorus.errors import ChorusError
from chorus.experts import Expert, ExpertEnsemble, read_experts_spec, truncate
from chorus.formats.lora import prompt_lora_tags
from chorus.models.io import read_json
from chorus.prompting import batch_prompt_schedule, prompt_settings
from chorus.schedule import NoiseSchedule


@dataclass
class Stage:
    """One expert's parts: a UNet, the conditioner that feeds it, and its schedule."""

    unet: Any
    conditioner: Conditioner
    schedule: NoiseSchedule
    prediction_type: str = "epsilon"
    controls: list = field(default_factory=list)   # ControlNet models adding residuals to this UNet's skips


def micro_inputs(n: int, size: tuple[int, int], original_size=None, crop_top_left=(0, 0), target_size=None,
                 aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5) -> dict[str, list]:
    """The micro-conditioning inputs of n prompts (SDXL's sizes and crop, the refiner's aesthetic scores);
    original and target size default to the output size."""
    return {"original_size": [tuple(original_size or size)] * n, "crop_top_left": [tuple(crop_top_left)] * n,
            "target_size": [tuple(target_size or size)] * n, "aesthetic_score": [aesthetic_score] * n,
            "negative_aesthetic_score": [negative_aesthetic_score] * n}


@dataclass
class PipelineOutput:
    images: list                         # PIL images, prompt-major (all images of prompt 0 first)
    latents: torch.Tensor | None = None  # the final latents (before the VAE)
    notes: list[str] = field(default_factory=list)   # e.g. what a long prompt lost


def _text_encoder_class(name: str):
    import transformers
    cls = getattr(transformers, name, None)
    if cls is None:
        raise ChorusError(f"Unknown text encoder class {name!r} in model_index.json.")
    return cls


def load_text_embedder(folder: Path, encoder_dir: str, tokenizer_dir: str, class_name: str, **kwargs) -> TextEmbedder:
    """A tokenizer + text encoder from a diffusers folder, through transformers, safetensors only."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # our own output stays one clean paragraph on errors
    hf_logging.set_verbosity_error()
    for d in (encoder_dir, tokenizer_dir):
        if not (folder / d).is_dir():
            raise ChorusError(f"{folder} has no {d}/ folder, which model_index.json lists.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder / tokenizer_dir))
        encoder = _text_encoder_class(class_name).from_pretrained(str(folder / encoder_dir), use_safetensors=True)
    except (OSError, ValueError) as e:
        raise ChorusError(f"Could not load the text encoder in {folder / encoder_dir} ({str(e).splitlines()[0]}). "
                          "Chorus reads text encoders from safetensors only.") from None
    return TextEmbedder(tokenizer, encoder.float().eval(), name=encoder_dir, **kwargs)


def load_stage(folder: Path, torch_dtype=None) -> tuple[Stage, Any]:
    """Read a diffusers-format pipeline folder into a Stage and its VAE."""
    from chorus.models import VAE, UNet
    folder = Path(folder)
    if not folder.is_dir():
        raise ChorusError(f"Model folder {folder} does not exist.")
    index = read_json(folder / "model_index.json")
    for part in ("unet", "vae", "scheduler"):
        if part not in index or not (folder / part).is_dir():
            raise ChorusError(f"{folder} has no {part}/ component; a pipeline folder needs unet/, vae/, scheduler/ "
                              "and at least one text_encoder/ with its tokenizer/.")
    unet = UNet.from_pretrained(folder / "unet", torch_dtype=torch_dtype)
    vae = VAE.from_pretrained(folder / "vae", torch_dtype=torch_dtype)
    sched_cfg = read_json(folder / "scheduler" / "scheduler_config.json")
    schedule = NoiseSchedule.from_config(sched_cfg)
    spec = read_conditioner_spec(folder)
    if spec is not None:  # a conditioner diffusers cannot express: the folder lists its embedders
        embedders = build_embedders(folder, spec, load_text_embedder)
        check_widths(spec, folder, unet.config)
        stage = Stage(unet, Conditioner(embedders), schedule, sched_cfg.get("prediction_type", "epsilon"))
        stage.scheduler_config = sched_cfg
        return stage, vae
    embedders: list = []
    has1, has2 = "text_encoder" in index and index["text_encoder"][0], "text_encoder_2" in index and index["text_encoder_2"][0]
    sdxl = unet.config.addition_embed_type == "text_time"
    if not (has1 or has2):
        raise ChorusError(f"{folder}/model_index.json lists no text encoder.")
    if has1:
        embedders.append(load_text_embedder(folder, "text_encoder", "tokenizer", index["text_encoder"][1],
                                            layer="penultimate" if sdxl else "last",
                                            zero_for_empty=sdxl and index.get("force_zeros_for_empty_prompt", True)))
    if has2:
        embedders.append(load_text_embedder(folder, "text_encoder_2", "tokenizer_2", index["text_encoder_2"][1],
                                            layer="penultimate", pooled=True,
                                            zero_for_empty=index.get("force_zeros_for_empty_prompt", True)))
    if sdxl:
        embedders.append(NumberEmbedder("original_size", 2))
        embedders.append(NumberEmbedder("crop_top_left", 2))
        if index.get("requires_aesthetics_score", False):
            embedders.append(NumberEmbedder("aesthetic_score", 1))
        else:
            embedders.append(NumberEmbedder("target_size", 2))
    stage = Stage(unet, Conditioner(embedders), schedule, sched_cfg.get("prediction_type", "epsilon"))
    stage.scheduler_config = sched_cfg
    return stage, vae


def load_experts(folder: Path, base: Stage, vae, torch_dtype=None) -> list[Expert]:
    """The experts of a model folder (chorus.experts.read_experts_spec): `base` (the folder's own stage) for the
    expert whose UNet is unet/, the other UNets beside it with the same conditioner and schedule, or whole
    pipeline folders of their own over the same latent space. A folder without experts.json: one expert."""
    from chorus.models import UNet
    spec = read_experts_spec(folder)
    if spec is None:
        return [Expert("base", base)]
    if spec[0]["unet"] != "unet":
        raise ChorusError(f"{folder}/experts.json: the first expert (the highest noise) must be the folder's own "
                          "unet/, the model that diffusers loads from this folder.")
    experts = []
    for e in spec:
        if e["unet"] == "unet":
            stage = base
        elif e["unet"] is not None:
            unet = UNet.from_pretrained(folder / e["unet"], torch_dtype=torch_dtype)
            stage = Stage(unet, base.conditioner, base.schedule, base.prediction_type)
            stage.scheduler_config = base.scheduler_config
        else:
            stage, _ = load_stage(folder / e["folder"], torch_dtype)
        if stage.unet.config.in_channels != vae.config.latent_channels:
            raise ChorusError(f"{folder}/experts.json: expert {e['name']} takes {stage.unet.config.in_channels} "
                              f"latent channels, the VAE gives {vae.config.latent_channels}: experts must share "
                              "the latent space.")
        experts.append(Expert(e["name"], stage, e["start"], e["end"]))
    return experts


def _to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] (B, 3, H, W) -> PIL, rounding as diffusers does."""
    arr = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    return [Image.fromarray((a * 255).round().astype("uint8")) for a in arr]


class Pipeline:
    """Latent diffusion text-to-image with classifier-free guidance, experts and controls."""

    def __init__(self, vae, experts: ExpertEnsemble, scheduler_config: dict, name: str = ""):
        self.vae, self.experts, self.scheduler_config, self.name = vae, experts, dict(scheduler_config), name
        self.lora_dirs: list = []   # where <lora:NAME:W> prompt tags look first (then beside the model)
        self._loras = None

    # --- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder, refiner=None, switch_at: float = 0.8, controlnet=None,
                        torch_dtype=None) -> "Pipeline":
        """A diffusers-format folder; `refiner=` a second folder that takes over at `switch_at`;
        `controlnet=` one ControlNet folder or a list of them (controls of the base UNet).
        Any of them may be a single-file checkpoint (`.safetensors`, `.ckpt`): see from_single_file."""
        from chorus.formats.single_file import is_single_file, load_controlnet, load_stage_from
        from chorus.paths import resolve_shipped
        folder, refiner = resolve_shipped(folder), (resolve_shipped(refiner) if refiner is not None else None)
        if is_single_file(folder):
            return cls.from_single_file(folder, refiner=refiner, switch_at=switch_at, controlnet=controlnet,
                                        torch_dtype=torch_dtype)
        folder = Path(folder)
        if torch_dtype is None:
            torch_dtype = torch.float32  # on the CPU fp16 weights run far slower than fp32: upcast on load
        base, vae = load_stage(folder, torch_dtype)
        if controlnet is not None:
            paths = controlnet if isinstance(controlnet, (list, tuple)) else [controlnet]
            from chorus.paths import resolve_controlnet
            base.controls = [load_controlnet(resolve_controlnet(p), torch_dtype=torch_dtype) for p in paths]
        experts = load_experts(folder, base, vae, torch_dtype)
        if refiner is not None:   # the refiner is one more expert: it takes the schedule over at switch_at
            ref, _ = load_stage_from(refiner, torch_dtype)
            experts = truncate(experts, switch_at) + [Expert("refiner", ref, switch_at, 1.0)]
        pipe = cls(vae, ExpertEnsemble(experts), base.scheduler_config, name=str(folder))
        pipe.sampling_defaults = read_sampling_defaults(folder)
        return pipe

    @classmethod
    def from_single_file(cls, path, prediction_type: str | None = None, tokenizer=None, refiner=None,
                         switch_at: float = 0.8, controlnet=None, torch_dtype=None, config=None) -> "Pipeline":
        """An A1111/ComfyUI single-file checkpoint (SD 1.x/2.x, SDXL base/refiner; original layout).

        The family and every config come from the tensor names and shapes (chorus.formats).
        `prediction_type`: SD 2.x ε or v, which the weights cannot tell (default: the file's metadata,
        else diffusers' rule, v). `tokenizer`: a CLIP tokenizer folder or a pipeline folder with
        tokenizer/ (single files carry none). `config`: a local diffusers folder whose configs (and tokenizers)
        fill in what the shapes cannot tell. `.ckpt` files are read with weights_only=True or refused."""
        from chorus.formats.single_file import pipeline_from_single_file
        return pipeline_from_single_file(cls, path, prediction_type=prediction_type, tokenizer=tokenizer,
                                         refiner=refiner, switch_at=switch_at, controlnet=controlnet,
                                         torch_dtype=torch_dtype, config=config)

    # --- LoRA (chorus.formats.lora) ----------------------------------------------------------------
    @property
    def loras(self):
        """The LoRAs merged into the base expert's UNet and text encoders (a LoRAStack)."""
        if getattr(self, "_loras", None) is None:
            from chorus.formats.lora import LoRAStack
            self._loras = LoRAStack(self.base, model=f"the model {self.name}" if self.name else "this model")
        return self._loras

    def load_lora(self, path, scale: float = 1.0, text_scale: float | None = None, name: str | None = None) -> str:
        """Merge a kohya or diffusers/peft LoRA (.safetensors) into the weights at `scale` (UNet) and
        `text_scale` (text encoders; default `scale`); several add up. Returns its name."""
        return self.loras.load(path, scale, text_scale, name=name)

    def fuse_lora(self, lora_scale: float = 1.0) -> None:
        """Merge every loaded LoRA again, all scaled by lora_scale (from the kept original weights)."""
        self.loras.fuse(lora_scale)

    def unfuse_lora(self) -> None:
        """Restore the original weights exactly; the LoRAs stay loaded (fuse_lora applies them again)."""
        self.loras.unfuse()

    def unload_lora(self, name: str | None = None) -> None:
        """Forget one LoRA (or all) and restore the weights."""
        self.loras.unload(name)

    @property
    def base(self) -> Stage:
        return self.experts.experts[0].model

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's factor times the UNet's downsampling."""
        return self.vae_scale_factor * 2 ** (len(self.base.unet.config.block_out_channels) - 1)

    sampling_defaults: dict = {}

    @property
    def default_guidance(self) -> float:
        """The model's recommended guidance scale (its folder's sampling_defaults.json), else 5."""
        return recommended_settings(self.sampling_defaults)[1]

    @property
    def default_steps(self) -> int:
        """The model's recommended number of sampling steps (sampling_defaults.json, chosen by a steps-to-quality
        study such as experiments/steps_to_quality.py), else 20."""
        return recommended_settings(self.sampling_defaults)[0]

    @property
    def default_size(self) -> int:
        return self.base.unet.config.sample_size * self.vae_scale_factor

    # --- the loop ------------------------------------------------------------------------------
    def _check(self, steps, guidance_scale, height, width, strength):
        if not isinstance(steps, int) or steps < 1:
            raise ChorusError(f"The number of steps must be a whole number ≥ 1, got {steps!r}.")
        if not math.isfinite(float(guidance_scale)):
            raise ChorusError(f"The guidance scale must be a finite number, got {guidance_scale!r}.")
        m = self.size_multiple
        if height % m or width % m or height <= 0 or width <= 0:
            raise ChorusError(f"The size {height}x{width} is not a multiple of {m} (this model's VAE factor "
                              f"{self.vae_scale_factor} × the UNet's downsampling); try "
                              f"{max(m, round(height / m) * m)}x{max(m, round(width / m) * m)}.")
        if not 0.0 < strength <= 1.0:
            raise ChorusError(f"strength must be in (0, 1], got {strength}.")

    def encode_prompt(self, stage: Stage, prompts: list[str], negative: list[str] | None, micro: dict,
                      guidance: bool, n_per_prompt: int, prompt_embeds=None, negative_prompt_embeds=None,
                      pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, clip_skip: int | None = None,
                      prompt_syntax: str = "a1111") -> tuple[Conditioning, Conditioning | None]:
        """Conditional and unconditional conditioning, each repeated n_per_prompt times (prompt-major).

        prompt_syntax="a1111" (A1111's emphasis, long prompts in windows, BREAK; chorus.prompting) or
        "plain" (the prompt read literally and truncated, as diffusers does); clip_skip: A1111's numbering."""
        dtype, device = stage.unet.dtype, stage.unet.device
        inputs = {"prompt": prompts, **micro}
        texts = (list(prompts) if prompt_embeds is None else []) + (list(negative) if negative is not None else [""])
        given = [t.shape[1] for t in (prompt_embeds, negative_prompt_embeds) if t is not None]
        with torch.no_grad(), prompt_settings(stage.conditioner, texts, prompt_syntax, clip_skip,
                                              max(given) if given else None):
            if prompt_embeds is not None:
                cond = stage.conditioner(inputs, dtype=dtype, device=device, text=False)
                cond.context, cond.pooled = prompt_embeds.to(device, dtype), _opt(pooled_prompt_embeds, device, dtype)
            else:
                cond = stage.conditioner(inputs, dtype=dtype, device=device)
            uncond = None
            if guidance:
                if negative_prompt_embeds is not None:
                    uncond = stage.conditioner.unconditional(inputs, negative, dtype=dtype, device=device, text=False)
                    uncond.context = negative_prompt_embeds.to(device, dtype)
                    uncond.pooled = _opt(negative_pooled_prompt_embeds, device, dtype)
                elif prompt_embeds is not None and negative is None:
                    # as diffusers: the empty prompt encoded (SD 1.x/2.x), zeros where the model says so (SDXL's
                    # force_zeros_for_empty_prompt) — the embedders' own unconditional branch
                    uncond = stage.conditioner.unconditional(inputs, None, dtype=dtype, device=device)
                else:
                    uncond = stage.conditioner.unconditional(inputs, negative, dtype=dtype, device=device)
        if uncond is not None and cond.context is not None and uncond.context is not None \
                and cond.context.shape[1] != uncond.context.shape[1]:
            raise ChorusError(f"The prompt's context is {cond.context.shape[1]} tokens long but the negative's is "
                              f"{uncond.context.shape[1]}; give prompt_embeds and negative_prompt_embeds of the same "
                              "length (or a negative prompt as text, which is padded to the prompt's windows).")
        rep = lambda t: t.repeat_interleave(n_per_prompt, 0)  # noqa: E731
        return cond.map(rep), (uncond.map(rep) if uncond is not None else None)

    def make_denoiser(self, stage: Stage, cond: Conditioning, uncond: Conditioning | None,
                      guidance_scale: float, guidance_rescale: float, controls: Sequence = (),
                      sigmas: torch.Tensor | None = None, timesteps: torch.Tensor | None = None,
                      edits: Sequence | None = None) -> Callable:
        """D(x, σ): the UNet (+ controls), classifier-free guidance on its raw output, as a denoiser.

        `edits`: [(last_step, cond, uncond), …] of a prompt edited during sampling (A1111's [from:to:when],
        chorus.prompting.prompt_schedule); each call finds its step from its timestep in `timesteps`."""
        unet = stage.unet
        segments = [(last, (Conditioning.cat([u, c]) if u is not None else c).unet_kwargs())
                    for last, c, u in (edits or [(None, cond, uncond)])]

        def kwargs_at(t: torch.Tensor) -> dict:
            if len(segments) == 1:
                return segments[0][1]
            step = int((timesteps.to(t.device, torch.float32) - t.flatten()[0].float()).abs().argmin())
            return next(kw for last, kw in segments if step <= last)

        def net(x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            kwargs = kwargs_at(t)
            x_in = torch.cat([x_vp, x_vp]) if uncond is not None else x_vp   # [uncond, cond] in one batch
            t_in = t.repeat(x_in.shape[0] // t.shape[0]).to(x_in.device)
            x_in = x_in.to(unet.dtype)
            extra: dict = {}
            for control in controls:
                extra = merge_residuals(extra, control.unet_call(x_in, t_in, kwargs))
            out = unet(x_in, t_in, **kwargs, **extra).float()
            if uncond is None:
                return out
            out_uncond, out_cond = out.chunk(2)
            return S.cfg_combine(out_uncond, out_cond, guidance_scale, guidance_rescale)

        return S.Denoiser(net, stage.schedule, stage.prediction_type, sigmas=sigmas, timesteps=timesteps)

    @prompt_lora_tags
    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str] | None = None, negative_prompt=None, num_inference_steps: int = 20,
                 guidance_scale: float = 5.0, guidance_rescale: float = 0.0, height: int | None = None,
                 width: int | None = None, num_images_per_prompt: int = 1, seed: int | None = None,
                 generator: torch.Generator | list | None = None, latents: torch.Tensor | None = None,
                 prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, sampler: str = "dpmpp_2m", timestep_spacing: str | None = None,
                 karras: bool | None = None, eta: float = 0.0, image=None, strength: float = 1.0,
                 denoising_start: float | None = None, denoising_end: float | None = None,
                 original_size=None, crop_top_left=None, target_size=None, crops_coords_top_left=None,
                 aesthetic_score: float = 6.0,
                 negative_aesthetic_score: float = 2.5, control_image=None, controlnet_conditioning_scale: float = 1.0,
                 guess_mode: bool = False, controls: Sequence = (), clip_skip: int | None = None, prompt_syntax: str = "a1111",
                 output_type: str = "pil", callback: Callable | None = None, progress: bool = True) -> PipelineOutput:
        """Generate images; argument names follow diffusers' StableDiffusion(XL)Pipeline. A1111's
        `<lora:NAME:W>` tags in the prompt apply that LoRA for this call only (see chorus.formats.lora).

        Prompts are read as A1111 reads them (chorus.prompting): `(word:1.2)`, `(word)`, `[word]`, prompts
        longer than the encoder's window in several windows, `BREAK`; prompt_syntax="plain" reads them
        literally and truncates, as diffusers does (a prompt without any of it gives the same embedding
        either way). clip_skip uses A1111's numbering (1 = the last layer, 2 = the one below it), which is
        diffusers' clip_skip + 1."""
        height = height or self.default_size
        width = width or self.default_size
        self._check(num_inference_steps, guidance_scale, height, width, strength)
        sample_fn = S.get_sampler(sampler)
        if prompt_embeds is None:
            if prompt is None:
                raise ChorusError("Give a prompt (or prompt_embeds).")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        else:
            prompts = [""] * prompt_embeds.shape[0]
        negative = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
        batch = len(prompts) * num_images_per_prompt
        guidance = guidance_scale > 1.0
        size = (height, width)
        if crop_top_left is not None and crops_coords_top_left is not None and \
                tuple(crop_top_left) != tuple(crops_coords_top_left):
            raise ChorusError("Give crops_coords_top_left (diffusers' name) or crop_top_left, not two different values.")
        crop_top_left = crop_top_left if crop_top_left is not None else (crops_coords_top_left or (0, 0))
        micro = micro_inputs(len(prompts), size, original_size, crop_top_left, target_size, aesthetic_score,
                             negative_aesthetic_score)

        # the sampling schedule, from the base expert's scheduler config
        cfg = self.scheduler_config
        spacing = timestep_spacing or cfg.get("timestep_spacing", "leading")
        use_karras = cfg.get("use_karras_sigmas", False) if karras is None else karras
        schedule = self.base.schedule
        sigmas, timesteps = S.get_schedule(schedule, num_inference_steps, sampler=sampler, spacing=spacing,
                                           steps_offset=cfg.get("steps_offset", 0), karras=use_karras,
                                           set_alpha_to_one=cfg.get("set_alpha_to_one", True))
        if image is not None and strength < 1.0:
            sigmas, timesteps = S.img2img_schedule(sigmas, timesteps, strength)
        if denoising_start is not None or denoising_end is not None:
            sigmas, timesteps = S.split_schedule(sigmas, timesteps, denoising_start, denoising_end,
                                                 schedule.num_train_timesteps)

        # the initial latent: seeded noise on the CPU (diffusers' order), or an encoded image noised to σ_0
        gens = self._generators(seed, generator, batch)
        shape = (batch, self.base.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        device = self.base.unet.device
        z0 = self.encode_image(image, batch, gens) if image is not None else None  # diffusers draws this first
        if latents is None:
            noise = _randn(shape, gens)
        else:
            noise = latents.float().cpu()
            if noise.shape != shape:
                raise ChorusError(f"latents have shape {tuple(noise.shape)}, expected {shape}.")
        if z0 is not None:
            x = S.noise_to_sigma(z0, noise, sigmas[0]) if denoising_start is None else z0
        else:
            x = S.initial_latents(noise, sigmas, sampler=sampler, spacing=spacing)
        x = x.to(device)

        notes: list[str] = []
        # A1111's prompt editing ([from:to:when]): the prompts (and negatives) of each stretch of steps
        edits = None
        if prompt_embeds is None and prompt_syntax == "a1111":
            texts = prompts + (list(negative) if negative is not None else [])
            edits = [(last, t[:len(prompts)], t[len(prompts):] if negative is not None else None)
                     for last, t in batch_prompt_schedule(texts, len(timesteps))]
        conds, edited = {}, {}
        for expert in self.experts:
            stage: Stage = expert.model
            encode = functools.partial(self.encode_prompt, stage, micro=micro, guidance=guidance,
                                       n_per_prompt=num_images_per_prompt, clip_skip=clip_skip,
                                       prompt_syntax=prompt_syntax)
            if edits is None:
                conds[expert.name] = encode(prompts=prompts, negative=negative, prompt_embeds=prompt_embeds,
                                            negative_prompt_embeds=negative_prompt_embeds,
                                            pooled_prompt_embeds=pooled_prompt_embeds,
                                            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds)
            else:
                edited[expert.name] = [(last, *encode(prompts=p, negative=n)) for last, p, n in edits]
                conds[expert.name] = edited[expert.name][0][1:]
            notes += conds[expert.name][0].notes

        control_stack = contextlib.ExitStack()   # every control is entered for this run and left after it

        def make_denoiser(expert: Expert):
            cond, uncond = conds[expert.name]
            stage: Stage = expert.model
            run_controls = []
            if stage.controls:
                if control_image is None:
                    raise ChorusError("This pipeline has a ControlNet: pass control_image (an edge map, layout, …).")
                images = control_image if isinstance(control_image, (list, tuple)) else [control_image]
                scales = controlnet_conditioning_scale if isinstance(controlnet_conditioning_scale, (list, tuple)) \
                    else [controlnet_conditioning_scale] * len(stage.controls)
                if len(images) != len(stage.controls):
                    raise ChorusError(f"Got {len(images)} control images for {len(stage.controls)} ControlNets.")
                run_controls = [ControlNetControl(cn, im, s, guess_mode=guess_mode)
                                for cn, im, s in zip(stage.controls, images, scales)]
            if expert is self.experts.experts[0]:
                run_controls += list(controls)   # the caller's controls steer the base expert
            run = ControlRun(stage.unet, stage, height, width, batch, uncond is not None,
                             [p for p in prompts for _ in range(num_images_per_prompt)], timesteps, sigmas)
            for control in run_controls:
                control_stack.enter_context(control.entered(run))
            return self.make_denoiser(stage, cond, uncond, guidance_scale, guidance_rescale, run_controls,
                                      sigmas, timesteps, edits=edited.get(expert.name))

        knobs, per_step = {}, {}
        if sampler == "ddim":
            knobs["eta"] = eta
            # diffusers' DDIM steps to t − T//n, which is not always the next timestep of the schedule
            per_step["landing_sigmas"] = S.ddim_landing_sigmas(schedule, timesteps, num_inference_steps,
                                                               final_sigma_zero=bool(sigmas[-1] == 0))
        elif sampler.startswith("dpmpp_2m") and len(self.experts) == 1:
            knobs["lower_order_final"] = num_inference_steps < 15 and bool(sigmas[-1] > 0)
        with control_stack:
            x = self.experts.sample(sample_fn, make_denoiser, x, sigmas, timesteps, schedule.num_train_timesteps,
                                    per_step=per_step, generator=gens, callback=callback, disable=not progress,
                                    **knobs)
        z = S.final_latents(x, sigmas, sampler)
        if output_type == "latent":
            return PipelineOutput(images=[], latents=z, notes=notes)
        images = self.decode(z, notes)
        return PipelineOutput(images=_to_pil(images) if output_type == "pil" else images, latents=z, notes=notes)

    def edit(self, image, prompt, method: str = "pnp", **kwargs) -> PipelineOutput:
        """Edit `image` towards `prompt`: Plug-and-Play (method="pnp": DDIM inversion, then its features and
        self-attention injected; tau_f, tau_attn, inversion_steps) or SDEdit ("sdedit": img2img at `strength`).
        See chorus.controls.plug_and_play.edit."""
        from chorus.controls.plug_and_play import edit
        return edit(self, image, prompt, method=method, **kwargs)

    # --- devices and precision ---------------------------------------------------------------------
    def to(self, device=None, dtype=None) -> "Pipeline":
        """Move (and/or cast) every expert's UNet, its conditioner's encoders and its ControlNets, and the
        VAE; device 'cpu' | 'cuda[:N]' | 'mps' (refused when absent), dtype fp32 | fp16 | bf16 (names or
        torch dtypes). Returns the pipeline. Seeded noise is still drawn on the CPU, so a seed means the
        same noise everywhere; an fp16 VAE decodes in fp32 when its config says force_upcast (diffusers)."""
        from chorus.devices import resolve_device, resolve_dtype
        kw = {}
        if device is not None:
            kw["device"] = resolve_device(device)
        if dtype is not None:
            kw["dtype"] = resolve_dtype(dtype)
        if not kw:
            return self
        for expert in self.experts:
            stage: Stage = expert.model
            stage.unet.to(**kw)
            stage.conditioner.to(**kw)
            for control in stage.controls:
                control.to(**kw)
        self.vae.to(**kw)
        return self

    def compile(self, **options) -> "Pipeline":
        """torch.compile every expert's UNet in place (`nn.Module.compile`; options go to torch.compile, e.g.
        mode="max-autotune"). The first call of each input shape compiles (on a CPU, a minute or two with a
        C++ compiler present), later calls run the fused kernels: on the 2-core CPU the default UNet's
        forward took 0.81× its eager time in fp32 and 0.77× in bf16, outputs equal within 1e-5 in fp32
        (docs/pipeline.md, benchmarks/generate.py --compile). It pays for a server or many batches, not
        for one image."""
        import shutil
        if self.device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
            raise ChorusError("Compiling on the CPU needs a C++ compiler (torch inductor builds its kernels with "
                              "it); install g++ (Debian: apt install g++) or run without --compile.")
        for expert in self.experts:
            expert.model.unet.compile(**options)
        return self

    @property
    def device(self) -> torch.device:
        return self.base.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.unet.dtype

    # --- VAE -------------------------------------------------------------------------------------
    def _vae_needs_upcast(self) -> bool:
        return self.vae.dtype == torch.float16 and bool(getattr(self.vae.config, "force_upcast", False))

    def _vae_in(self, dtype):
        """Run the VAE in `dtype` for one call (diffusers' upcast_vae: to fp32 and back; fp16 → fp32 → fp16
        is exact, so the weights come back unchanged)."""
        return _cast_for_call(self.vae, dtype)

    def decode(self, z: torch.Tensor, notes: list | None = None) -> torch.Tensor:
        """Latents → images in [-1, 1]. An fp16 VAE with force_upcast decodes in fp32 (diffusers); a half-precision
        decode that still gives NaN or inf is done again in fp32 (A1111's automatic --no-half-vae)."""
        cfg = self.vae.config
        dtype = torch.float32 if self._vae_needs_upcast() else self.vae.dtype
        shift = getattr(cfg, "shift_factor", None) or 0.0
        with self._vae_in(dtype):
            images = self.vae.decode(z.to(self.vae.device, dtype) / cfg.scaling_factor + shift).float()
        if dtype != torch.float32 and not bool(torch.isfinite(images).all()):
            with self._vae_in(torch.float32):
                images = self.vae.decode(z.to(self.vae.device, torch.float32) / cfg.scaling_factor + shift).float()
            if notes is not None:
                notes.append(f"the {str(dtype).replace('torch.', '')} VAE decode gave NaN/inf; decoded again in "
                             "float32 (set force_upcast in the VAE's config.json to do so at once)")
        return images

    def encode_image(self, image, batch: int, gens, mean: bool = False) -> torch.Tensor:
        """z_0 = s·(z − shift), z drawn from q(z | x) with the generator (img2img), or its mean (`mean=True`:
        the latent Plug-and-Play inverts)."""
        if isinstance(image, Image.Image) or (isinstance(image, (list, tuple)) and image
                                              and all(isinstance(im, Image.Image) for im in image)):
            images = [image] if isinstance(image, Image.Image) else list(image)   # one per prompt, as diffusers
            if len({im.size for im in images}) != 1:
                raise ChorusError(f"The init images have different sizes: {sorted({im.size for im in images})}.")
            arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 127.5 - 1.0
            image = torch.from_numpy(arr).permute(0, 3, 1, 2)
        dtype = torch.float32 if self._vae_needs_upcast() else self.vae.dtype
        image = image.to(self.vae.device, dtype)
        if image.shape[0] == 1 and batch > 1:
            image = image.expand(batch, -1, -1, -1)
        elif image.shape[0] != batch:
            if batch % image.shape[0]:
                raise ChorusError(f"Got {image.shape[0]} init images for a batch of {batch} images.")
            image = image.repeat_interleave(batch // image.shape[0], 0)   # num_images_per_prompt of each
        with self._vae_in(dtype):
            posterior = self.vae.encode(image)
            g = gens[0] if isinstance(gens, list) else gens
            z = posterior.mode() if mean else posterior.sample(generator=g)
        cfg = self.vae.config
        return ((z - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor).float().cpu()

    @staticmethod
    def _generators(seed, generator, batch):
        if generator is not None:
            if isinstance(generator, list) and len(generator) != batch:
                raise ChorusError(f"Got {len(generator)} generators for a batch of {batch} images.")
            return generator
        g = torch.Generator("cpu")
        if seed is None:
            g.seed()
        else:
            g.manual_seed(int(seed))
        return g


def read_sampling_defaults(folder) -> dict:
    """A model folder's recommended sampling settings (sampling_defaults.json, written by whoever chose
    them on validation prompts; e.g. {"guidance_scale": 3.0, "num_inference_steps": 15}); {} when it has none."""
    path = Path(folder) / "sampling_defaults.json"
    if not path.is_file():
        return {}
    data = read_json(path)
    g = data.get("guidance_scale")
    if g is not None and (not isinstance(g, (int, float)) or not 0 <= g <= 100):
        raise ChorusError(f"{path}: guidance_scale must be a number in [0, 100], got {g!r}.")
    n = data.get("num_inference_steps")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1000):
        raise ChorusError(f"{path}: num_inference_steps must be a whole number in [1, 1000], got {n!r}.")
    return data


def recommended_settings(defaults: dict) -> tuple[int, float]:
    """(steps, guidance scale) from a model's sampling defaults (read_sampling_defaults), else (20, 5)."""
    return int(defaults.get("num_inference_steps", 20)), float(defaults.get("guidance_scale", 5.0))


def default_model_path() -> Path:
    """The model that ships with Chorus (`--model default`)."""
    from chorus.paths import shipped_weights
    folder = shipped_weights("default")
    if (folder / "model_index.json").is_file():
        return folder
    raise ChorusError("The default model is not installed (weights/default is missing); pass --model PATH "
                      "to a diffusers-format folder, or train one with `chorus train --preset default`.")


@contextmanager
def _cast_for_call(module, dtype):
    old = module.dtype
    if old == dtype:
        yield
        return
    module.to(dtype=dtype)
    try:
        yield
    finally:
        module.to(dtype=old)


def _opt(t, device, dtype):
    return None if t is None else t.to(device, dtype)


def _randn(shape, gens) -> torch.Tensor:
    """Noise drawn on the CPU: one draw for the batch, or one per image with a list of generators."""
    if isinstance(gens, list):
        return torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in gens])
    return torch.randn(shape, generator=gens)

