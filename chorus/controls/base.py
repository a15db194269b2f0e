"""A control: something that hooks into one UNet call, entered for one sampling run (DESIGN.md, "Controls").

    with control.entered(run):        # bind(run): install hooks on run.unet, set up per-run state
        ... sampler ... unet_call(x, t, kwargs) -> extra UNet kwargs, before every UNet call
                                      # release(): every hook removed, the state dropped (also on errors)

`run` (ControlRun) is what a control may know of the run: the UNet and its stage (conditioner,
schedule), the output size, the batch layout of guidance ([unconditional, conditional] halves), the
prompts, and the sampling schedule, so a control can tell which step a UNet call belongs to
(`run.step_of(t)`) and how far through the run that is. ControlNet residuals, Plug-and-Play's
injected features and paint-with-words' biased cross-attention are the three controls of
chorus.controls; several compose in one run (their hooks chain, their residuals add).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ControlRun:
    """One sampling run, as the controls entered for it see it."""

    unet: Any
    stage: Any
    height: int
    width: int
    batch: int                      # images generated (per half of the guidance batch)
    guidance: bool                  # UNet calls see [unconditional, conditional] batches of 2·batch
    prompts: list[str]              # one per image
    timesteps: torch.Tensor         # the sampling schedule's model timesteps, first (noisiest) first
    sigmas: torch.Tensor | None = None
    state: dict = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def step_of(self, t) -> int:
        """The index (0 = first, noisiest) of the sampling step a UNet call at timestep t belongs to: the
        schedule's nearest timestep at or above t (a second-order sampler's midpoint counts to its step)."""
        t = float(torch.as_tensor(t).flatten()[0])
        ts = self.timesteps.float()
        above = torch.nonzero(ts >= t - 1e-3).flatten()
        return int(above[-1]) if len(above) else 0

    def fraction_done(self, t) -> float:
        """step_of(t) / number of steps: 0 at the first step."""
        return self.step_of(t) / max(1, self.num_steps)


class Control:
    """Base class: a control does nothing unless it overrides bind / unet_call / release."""

    def bind(self, run: ControlRun, stack: contextlib.ExitStack) -> None:
        """Set up for `run`; hooks entered on `stack` (e.g. stack.enter_context(run.unet.hooks(fn))) are
        removed when the run ends."""

    def unet_call(self, x: torch.Tensor, t: torch.Tensor, unet_kwargs: dict[str, Any]) -> dict[str, Any]:
        """Extra keyword arguments for the UNet call about to be made (ControlNet's residuals), or {}."""
        return {}

    def release(self) -> None:
        """Drop per-run state (called after the hooks are removed)."""

    @contextlib.contextmanager
    def entered(self, run: ControlRun):
        stack = contextlib.ExitStack()
        try:
            with stack:
                self.bind(run, stack)
                yield self
        finally:
            self.release()


def merge_residuals(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Extra UNet kwargs of several controls: ControlNet residuals add (diffusers' MultiControlNet)."""
    if not a:
        return b
    if not b:
        return a
    return {"down_block_additional_residuals": tuple(x + y for x, y in zip(a["down_block_additional_residuals"],
                                                                              b["down_block_additional_residuals"])),
            "mid_block_additional_residual": a["mid_block_additional_residual"] + b["mid_block_additional_residual"]}
