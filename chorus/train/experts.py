"""Expert denoisers by branching (seminar: eDiff-I's ensemble of experts; SDXL's refiner is one more expert).

    chorus train --part experts --base default --splits 0.5 --steps 600 --out runs/experts-2
    chorus train --part experts --base default --splits 0.2,0.8 --steps 600 --out runs/experts-3
    chorus train --part experts --base default --splits none --steps 600 --out runs/continued

eDiff-I trains one shared model on all noise levels, then *branches* it: each expert starts as a copy of the
shared model and is fine-tuned on its own noise interval only. Here every expert is a UNetTrainer run (the
trainer core: the same loss, data, seeded draws, checkpoints and exact --resume) with one change, the
core's `timestep_interval`:

    expert i owns [s_i, s_{i+1}) of the sampling schedule  ⇒  it trains on t ∈ [T(1 − s_{i+1}), T(1 − s_i))

The splits s are fractions of the sampling schedule in diffusers' denoising_end terms (0 = pure noise,
1 = clean), the numbers `ExpertEnsemble` samples with: `--splits 0.5` gives E_high on t ∈ [500, 1000) and
E_low on t ∈ [0, 500). `--steps` is the *total* budget, split evenly, so the ensemble sees as many training
samples as the shared model continued on the whole schedule for `--steps` — eDiff-I's control, which is
`--splits none` (one expert owning everything, the same code path).

Output: OUT/<name>/ is each expert's run (checkpoints, logs); OUT/model is one model folder — the first
(highest-noise) expert's pipeline folder, each other expert's UNet in unet_<name>/, and experts.json with
the experts in order and their intervals. `chorus generate --model OUT/model` samples each interval with
its own expert; diffusers loads the folder as its first expert alone.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from chorus.errors import ChorusError
from chorus.experts import EXPERTS_FILE, expert_names, split_edges, training_interval
from chorus.train import checkpoint as ckpt
from chorus.train import distributed as D
from chorus.train.config import UNetTrainConfig, load_config, save_config, to_dict
from chorus.train.parts import adopt_base


@dataclass
class BranchTrainConfig(UNetTrainConfig):
    """A UNet branched from a shared `base` onto part of its schedule (an expert, the refiner). The data and
    objective defaults are the shipped model's last stage (preset default-grow), so a branch and the
    continuation see the data the shared model saw; the optimiser follows claims_protocols.md §6.2 (lr 1e-4
    constant, 50 warm-up)."""

    init_from_base: bool = True
    lr: float = 1e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 50
    descriptive_captions: float = 0.5
    epoch_size: int | None = 30_000
    text_cache_mb: int = 8192
    mixed_precision: str = "no"
    ema_decay: float = 0.995
    save_every: int = 100
    keep_last: int = 2
    sample_prompts: tuple = ()
    export_dtype: str = "float16"

    no_base = "A branch starts from a shared model: --base FOLDER (or --base default)."

    def __post_init__(self):
        super().__post_init__()
        if not self.base:
            raise ChorusError(self.no_base)


@dataclass
class ExpertsTrainConfig(BranchTrainConfig):
    """BranchTrainConfig plus where the experts hand over."""

    splits: tuple = (0.5,)              # hand-over points, fractions of the sampling schedule (0 = pure noise)
    steps: int = 600                    # the total over all experts (each trains steps / N)

    no_base = "Experts are branched from a shared model: --base FOLDER (or --base default)."

    def __post_init__(self):
        super().__post_init__()
        if not self.init_from_base or self.unet:
            raise ChorusError("Each expert starts as a copy of the shared model: init_from_base must stay true and "
                              "`unet` empty.")
        self.splits = tuple(float(s) for s in self.splits)
        split_edges(self.splits)
        if tuple(self.timestep_interval) != (0.0, 1.0):
            raise ChorusError("The experts' intervals come from `splits`; leave timestep_interval at [0, 1].")
        if self.steps < self.n_experts:
            raise ChorusError(f"{self.steps} steps cannot be shared among {self.n_experts} experts.")
        adopt_base(self)

    @property
    def n_experts(self) -> int:
        return len(self.splits) + 1

    def experts(self) -> list[dict]:
        """[{name, start, end, timestep_interval, steps}] from the highest noise to the lowest."""
        edges = split_edges(self.splits)
        names = expert_names(self.n_experts)
        steps = [self.steps // self.n_experts + (1 if i < self.steps % self.n_experts else 0)
                 for i in range(self.n_experts)]
        return [{"name": names[i], "start": edges[i], "end": edges[i + 1],
                 "timestep_interval": training_interval(edges[i], edges[i + 1]), "steps": steps[i]}
                for i in range(self.n_experts)]

    def expert_config(self, expert: dict) -> UNetTrainConfig:
        fields = {k: v for k, v in to_dict(self).items() if k != "splits"}
        fields.update(timestep_interval=list(expert["timestep_interval"]), steps=expert["steps"])
        return load_config(UNetTrainConfig, fields, f"expert {expert['name']}")


@dataclass
class RefinerTrainConfig(BranchTrainConfig):
    """SDXL's refiner as one expert: the shared model fine-tuned on the lowest-noise part of the schedule
    (sampling [switch_at, 1) = t < T(1 − switch_at): 200 of 1000 at 0.8), on unframed scenes (world_crop off:
    no crop, the native size's sharpness kept), with SDXL's refiner conditioning added: the aesthetic-score
    time id, here the world's quality score of the native size (chorus.train.data.quality_score). The new
    time id enters the UNet's added embedding through new, zero-initialised weights, so step 0 is exactly
    the base. `chorus generate --refiner OUT/model` hands over to it at `switch_at`."""

    switch_at: float = 0.8
    steps: int = 300
    world_crop: bool = False

    no_base = "A refiner is branched from the base it refines: --base FOLDER (or --base default)."

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < float(self.switch_at) < 1.0:
            raise ChorusError(f"switch_at is where the refiner takes over, a fraction in (0, 1); got {self.switch_at}.")
        if tuple(self.timestep_interval) != (0.0, 1.0):   # a saved config (a checkpoint's) keeps its interval
            self.switch_at = round(1.0 - self.timestep_interval[1], 6)
        self.timestep_interval = training_interval(float(self.switch_at), 1.0)
        adopt_base(self)
        if self.embedders is None:
            raise ChorusError(f"{self.base} lists no conditioner.json; the refiner adds the aesthetic-score time id "
                              "to the base's embedders, so give `embedders` in the config.")
        names = [e["name"] for e in self.embedders]
        if "aesthetic_score" not in names:
            from chorus.conditioning import embedder_entry
            self.embedders = [*self.embedders, embedder_entry({"name": "aesthetic_score", "dropout": self.micro_dropout})]
        if not self.unet:   # the base's UNet with the added embedding widened for the new time id (grown)
            config = json.loads((Path(self.base) / "unet" / "config.json").read_text())
            added = ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim")
            self.unet = {k: v for k, v in config.items() if not k.startswith("_")
                         and k != added[2] and not (k in added and v is None)}


def train_refiner(cfg: RefinerTrainConfig | dict | str | Path, out_dir, progress: bool = True,
                  resume: bool | str = False) -> Path:
    """Train a refiner (see RefinerTrainConfig); returns OUT/model, a pipeline folder for `--refiner`."""
    from chorus.train.unet import train_unet
    if not isinstance(cfg, RefinerTrainConfig):
        cfg = load_config(RefinerTrainConfig, cfg, "refiner training")
    fields = {k: v for k, v in to_dict(cfg).items() if k != "switch_at"}
    final = train_unet(load_config(UNetTrainConfig, fields, "refiner training"), out_dir, progress=progress,
                       resume=resume)
    if D.setup().is_main:
        ckpt.write_json({"switch_at": cfg.switch_at, "trained_timesteps": list(cfg.timestep_interval),
                         "base": cfg.base, "steps": cfg.steps}, Path(final) / "refiner.json")
    return final


def train_experts(cfg: ExpertsTrainConfig | dict | str | Path, out_dir, progress: bool = True,
                  resume: bool | str = False, log=print) -> Path:
    """Branch the experts of `cfg` from its base, one run each, and write OUT/model (see the module)."""
    from chorus.train.unet import train_unet
    if not isinstance(cfg, ExpertsTrainConfig):
        cfg = load_config(ExpertsTrainConfig, cfg, "experts training")
    out = Path(out_dir)
    saved = out / "experts_config.json"
    d = D.setup()
    if resume and saved.is_file():
        earlier = json.loads(saved.read_text())
        for key in ("base", "splits", "steps", "seed", "lr", "batch_size", "timestep_interval"):
            if json.dumps(earlier.get(key)) != json.dumps(to_dict(cfg).get(key)):
                raise ChorusError(f"--resume: this run was started with {key} = {earlier.get(key)!r}; it cannot "
                                  f"continue with {to_dict(cfg).get(key)!r}.")
    elif not resume and (out / "model").exists():
        raise ChorusError(f"{out} already holds a trained ensemble (model/); give another --out.")
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, saved)
    D.barrier(d)
    experts = cfg.experts()
    folders = []
    for i, e in enumerate(experts):
        run = out / e["name"]
        done = (run / "model" / "model_index.json").is_file()
        if not done:
            if progress and d.is_main:
                log(f"expert {i + 1}/{len(experts)} '{e['name']}': sampling [{e['start']:g}, {e['end']:g}) = "
                    f"t ∈ [{e['timestep_interval'][0]:g}T, {e['timestep_interval'][1]:g}T), {e['steps']} steps")
            again = bool(resume) and bool(ckpt.checkpoints(run))
            train_unet(cfg.expert_config(e), run, progress=progress, resume=again)
        folders.append(run / "model")
    final = out / "model"
    if d.is_main:
        assemble(folders, experts, final)
    D.barrier(d)
    return final


def assemble(folders: list[Path], experts: list[dict], final: Path) -> Path:
    """One model folder from the experts' folders: the first whole, the others' unet/ as unet_<name>/, and
    experts.json (atomically: the folder appears complete or not at all)."""
    if len(folders) == 1:
        tmp = final.parent / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        ckpt.link_or_copy_tree(folders[0], tmp)
        ckpt.replace_folder(tmp, final)
        return final
    tmp = final.parent / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    ckpt.link_or_copy_tree(folders[0], tmp)
    entries = []
    for i, (folder, e) in enumerate(zip(folders, experts)):
        unet = "unet" if i == 0 else f"unet_{e['name']}"
        if i:
            ckpt.link_or_copy_tree(folder / "unet", tmp / unet)
        entries.append({"name": e["name"], "unet": unet, "start": e["start"], "end": e["end"],
                        "trained_timesteps": list(e["timestep_interval"]), "steps": e["steps"]})
    ckpt.write_json({"experts": entries}, tmp / EXPERTS_FILE)
    ckpt.replace_folder(tmp, final)
    return final


# --- `chorus train --part experts` ----------------------------------------------------------------------

def parse_splits(text: str | None):
    """--splits 0.5 | 0.2,0.8 | none → a tuple of hand-over points (none: one expert, the continuation)."""
    if text is None:
        return None
    if text.strip().lower() in ("none", ""):
        return ()
    try:
        return tuple(float(s) for s in text.split(","))
    except ValueError:
        raise ChorusError(f"--splits takes fractions of the sampling schedule separated by commas (e.g. 0.5 or "
                          f"0.2,0.8; 0 = pure noise), or none; got {text!r}.") from None


def config_from_args(args) -> tuple[ExpertsTrainConfig, Path]:
    from chorus.train.cli import adapter_config_from_args
    if args.preset:
        raise ChorusError("--part experts branches a --base model; a --preset is a whole recipe. Give --base "
                          "FOLDER (or --base default) and --splits.")
    out = Path(args.out) if args.out else None
    if args.resume and out is not None and (out / "experts_config.json").is_file():
        cfg = load_config(ExpertsTrainConfig, json.loads((out / "experts_config.json").read_text()), "experts run")
        return cfg, out
    return adapter_config_from_args(
        args, ExpertsTrainConfig, "experts training", {"splits": parse_splits(getattr(args, "splits", None)),
                                                        "data": args.data},
        lambda cfg: f"runs/experts-{cfg.n_experts}")


def run_from_args(args) -> int:
    from chorus.train.cli import run_adapter
    return run_adapter(args, config_from_args, train_experts)


def refiner_config_from_args(args) -> tuple[RefinerTrainConfig, Path]:
    from chorus.train.cli import adapter_config_from_args
    if args.preset:
        raise ChorusError("--part refiner refines a --base model; a --preset is a whole recipe. Give --base FOLDER "
                          "(or --base default).")
    return adapter_config_from_args(args, RefinerTrainConfig, "refiner training", {"data": args.data},
                                    lambda cfg: "runs/refiner")


def run_refiner_from_args(args) -> int:
    from chorus.train.cli import run_adapter
    return run_adapter(args, refiner_config_from_args, train_refiner)


__all__ = ["BranchTrainConfig", "ExpertsTrainConfig", "RefinerTrainConfig", "train_experts", "train_refiner", "run_refiner_from_args", "assemble", "parse_splits", "config_from_args", "run_from_args"]
