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


# --- a model folder that holds its experts ------------------------------------------------------------

EXPERTS_FILE = "experts.json"


def read_experts_spec(folder) -> list[dict] | None:
    """The experts of a model folder (experts.json), checked; None for a folder with one denoiser.

        {"experts": [{"name": "high", "unet": "unet",      "start": 0.0, "end": 0.5},
                     {"name": "low",  "unet": "unet_low",  "start": 0.5, "end": 1.0}]}

    Each expert names either `unet` (a UNet folder inside this one, sharing its VAE, conditioner and
    schedule) or `folder` (a whole pipeline folder inside this one: its own architecture and conditioner
    over the same latent space). `start`/`end` are fractions of the sampling schedule (0 = pure noise).
    """
    from pathlib import Path

    from chorus.models.io import read_json
    path = Path(folder) / EXPERTS_FILE
    if not path.is_file():
        return None
    data = read_json(path)
    entries = data.get("experts") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ChorusError(f"{path} must hold {{\"experts\": [...]}} with at least one expert.")
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or ("unet" in e) == ("folder" in e):
            raise ChorusError(f"{path}: expert {i} must be an object naming exactly one of \"unet\" (a UNet folder) "
                              "or \"folder\" (a pipeline folder).")
        where = Path(folder) / (e.get("unet") or e.get("folder"))
        if not where.is_dir():
            raise ChorusError(f"{path}: expert {i} ({e.get('name', i)}) points to {where}, which does not exist.")
        try:
            start, end = float(e["start"]), float(e["end"])
        except (KeyError, TypeError, ValueError):
            raise ChorusError(f"{path}: expert {i} needs numeric \"start\" and \"end\" (fractions of the "
                              "schedule, 0 = pure noise).") from None
        out.append({"name": str(e.get("name", f"e{i}")), "unet": e.get("unet"), "folder": e.get("folder"),
                    "start": start, "end": end})
    ExpertEnsemble([Expert(e["name"], None, e["start"], e["end"]) for e in out])   # covers [0, 1] in order
    return out


def split_edges(splits) -> list[float]:
    """[0, s_1, …, s_k, 1] from the hand-over points s_i (fractions of the sampling schedule, 0 = pure
    noise), checked to be strictly increasing inside (0, 1)."""
    cuts = [float(s) for s in splits]
    if any(not 0.0 < s < 1.0 for s in cuts) or any(a >= b for a, b in zip(cuts, cuts[1:])):
        raise ChorusError(f"Expert splits must be increasing fractions strictly between 0 and 1 (where one expert "
                          f"hands over to the next; 0 = pure noise), got {list(splits)}.")
    return [0.0, *cuts, 1.0]


def training_interval(start: float, end: float) -> tuple[float, float]:
    """The training timesteps of the expert that owns [start, end) of the sampling schedule, as fractions of
    [0, T) with t = 0 clean (the trainer's timestep_interval): sampling runs from t = T down to 0."""
    return (round(1.0 - end, 6), round(1.0 - start, 6))


def expert_names(n: int) -> list[str]:
    return {1: ["all"], 2: ["high", "low"], 3: ["high", "middle", "low"]}.get(n, [f"e{i}" for i in range(n)])


def truncate(experts: Sequence[Expert], at: float) -> list[Expert]:
    """The experts of [0, at): those that start before `at`, the last one cut there (a refiner takes over)."""
    kept = [e for e in experts if e.start < at]
    return [*kept[:-1], Expert(kept[-1].name, kept[-1].model, kept[-1].start, at)]
