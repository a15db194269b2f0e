"""Chorus: modern text-to-image latent diffusion, from DDPM to SDXL, trainable on a laptop CPU.

The seminar's map (see docs/): `schedule` (DDPM forward process and loss), `samplers`,
`models` (UNet, VAE, ControlNet), `conditioning` (the conditioner: ensembles of text encoders and
micro-conditioning), `experts` (ensembles of denoisers by noise interval: eDiff-I experts, the
SDXL refiner), `pipeline` (text-to-image), `world` (the built-in Shapes world and its evaluator).
"""
__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import chorus` stays cheap for the CLI
    if name == "Pipeline":
        from chorus.pipeline import Pipeline
        return Pipeline
    raise AttributeError(name)
