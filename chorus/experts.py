"""Ensembles of denoisers by noise interval (seminar: eDiff-I's expert denoisers, SDXL's refiner).

Each expert owns an interval of the sampling schedule, given as fractions of the way from pure
noise (0.0) to clean (1.0) in diffusers' `denoising_start` / `denoising_end` terms. The sampler
runs once per expert over the part of the sigma schedule that expert owns, carrying the latent
across the hand-off — the SDXL base → refiner split (base 0 → 0.8, refiner 0.8 → 1) is the
two-expert case; eDiff-I trains several experts of one architecture, each on its interval.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from chorus.errors import ChorusError


@dataclass
class Expert:
    """A denoiser with its own UNet and conditioner, owning [start, end) of the schedule."""

    name: str
    model: Any                 # what the caller needs to build this expert's denoiser (a Stage)
    start: float = 0.0         # fraction of the schedule where this expert takes over (0 = pure noise)
    end: float = 1.0           # fraction where it hands over (1 = clean)


class ExpertEnsemble:
    """Experts covering [0, 1] without gaps or overlaps, in order from high noise to low noise."""

    def __init__(self, experts: Sequence[Expert]):
        experts = list(experts)
        if not experts:
            raise ChorusError("An ensemble of denoisers needs at least one expert.")
        edges = [experts[0].start] + [e.end for e in experts]
        if experts[0].start != 0.0 or experts[-1].end != 1.0 or any(
            a.end != b.start for a, b in zip(experts, experts[1:])) or any(e.start >= e.end for e in experts):
            raise ChorusError("Experts must cover the schedule from 0 to 1 in order, each interval "
                              f"non-empty and meeting the next; got edges {edges}.")
        self.experts = experts

    def __len__(self) -> int:
        return len(self.experts)

    def __iter__(self):
        return iter(self.experts)

    def segments(self, sigmas: torch.Tensor, timesteps: torch.Tensor, num_train_timesteps: int):
        """Split a sigma schedule between the experts: [(expert, sigmas_of_its_steps)].

        A step belongs to the expert whose interval holds it by diffusers' rule: the cut between
        fractions is the timestep `round(T - f*T)`; steps with timestep >= cut come before it.
        Each segment ends on the sigma where the next begins, so the latent is handed over exactly.
        """
        n = len(timesteps)
        out, first = [], 0
        for e in self.experts:
            if e.end >= 1.0:
                last = n
            else:
                cut = int(round(num_train_timesteps - e.end * num_train_timesteps))
                last = int((timesteps >= cut).sum().item())
            if last > first:
                out.append((e, sigmas[first:last + 1]))
            first = max(first, last)
        return out

    def sample(self, sampler: Callable, make_denoiser: Callable[[Expert], Callable], x: torch.Tensor,
               sigmas: torch.Tensor, timesteps: torch.Tensor, num_train_timesteps: int,
               per_step: dict[str, torch.Tensor] | None = None, **kwargs) -> torch.Tensor:
        """Run `sampler` expert by expert over its own segment of the schedule.

        `per_step` holds sampler arguments with one entry per step (e.g. DDIM's landing sigmas);
        each expert gets the slice of its own steps.
        """
        first = 0
        for expert, seg in self.segments(sigmas, timesteps, num_train_timesteps):
            steps = len(seg) - 1
            sliced = {k: v[first:first + steps] for k, v in (per_step or {}).items()}
            x = sampler(make_denoiser(expert), x, seg, **kwargs, **sliced)
            first += steps
        return x
