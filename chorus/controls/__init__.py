"""Controls: things that hook into one UNet call (seminar: the "additional-model" methods).

    base.py              Control / ControlRun: entered for one sampling run, hooks removed on exit
    controlnet.py        ControlNet's residuals on the skips (Zhang et al. 2023)
    plug_and_play.py     features and self-attention injected from a guidance image's pass (Tumanyan et al. 2023)
    paint_with_words.py  cross-attention biased towards painted regions (eDiff-I, Balaji et al. 2022)

    pipe(prompt, controls=[ControlNetControl(cn, image), PaintWithWords({"circle": [0, 0, 32, 32]})])
"""
from chorus.controls.base import Control, ControlRun, merge_residuals
from chorus.controls.controlnet import ControlNetControl, check_controlnet_fits, control_image_tensor
from chorus.controls.paint_with_words import PaintWithWords, read_regions
from chorus.controls.plug_and_play import Inversion, PlugAndPlay, ddim_inversion, edit

__all__ = ["Control", "ControlRun", "merge_residuals", "ControlNetControl", "check_controlnet_fits",
           "control_image_tensor", "PaintWithWords", "read_regions", "PlugAndPlay", "Inversion", "ddim_inversion",
           "edit"]
