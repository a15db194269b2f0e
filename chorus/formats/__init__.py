"""Checkpoint formats other than diffusers folders.

`single_file`: the one-file `.safetensors` / `.ckpt` checkpoints of A1111 and ComfyUI (SD 1.x,
SD 2.x, SDXL base and refiner, ControlNet) in the original CompVis/Stability layout: detection from
tensor names and shapes, LDM ↔ diffusers key maps (`keymap`), configs rebuilt from shapes, loading
into a Chorus `Pipeline`, and export in both directions (`chorus export`). See docs/formats.md.
"""
from chorus.formats.single_file import (Checkpoint, Detection, convert_checkpoint, detect, detect_file,
                                        export_diffusers, export_single_file, load_controlnet, read_checkpoint,
                                        read_header)

__all__ = ["Checkpoint", "Detection", "convert_checkpoint", "detect", "detect_file", "export_diffusers",
           "export_single_file", "load_controlnet", "read_checkpoint", "read_header"]
