"""Chorus's networks, with diffusers' state-dict keys and config.json fields.

`UNet` (the denoiser), `ControlNet` (a trainable copy of its encoder that adds residuals to the
UNet's skips) and `VAE` (the latent autoencoder). `VAE` is imported lazily.
"""
from chorus.models.controlnet import ControlNet, ControlNetConfig
from chorus.models.unet import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig", "ControlNet", "ControlNetConfig", "VAE"]


def __getattr__(name: str):
    if name in ("VAE", "VAEConfig"):
        from chorus.models import vae

        return getattr(vae, name)
    raise AttributeError(f"module 'chorus.models' has no attribute {name!r}")
