"""`chorus eval` (score a model or a folder of images on the benchmark) and `chorus world train-evaluator`.

Also ``python -m chorus.world.eval_cli honesty``: the evaluator's honesty checks (docs/evaluator.md).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from chorus.errors import ChorusError

IMAGE_NAME = re.compile(r"^(\d+)(?:_(\d+))?\.(png|jpg|jpeg|webp|bmp)$", re.IGNORECASE)


# --------------------------------------------------------------------------------------------
# argument wiring
# --------------------------------------------------------------------------------------------

def register(subparsers) -> None:
    """Add the top-level `eval` command."""
    p = subparsers.add_parser(
        "eval", help="score a model (or a folder of images) on the Shapes-world benchmark",
        description="Generate images for each spec with a text-to-image model (--model) or read existing "
                    "ones (--images), find their objects with the Shapes-world evaluator and score them "
                    "with GenEval's rules. Prints a per-task table (held-out splits separately).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a Chorus/diffusers pipeline folder to generate with")
    src.add_argument("--images", help="a folder of images named {index:05d}.png or {index:05d}_{k}.png")
    p.add_argument("--specs", help="JSON Lines spec file (default: the built-in benchmark, or the "
                                   "folder's metadata.jsonl with --images)")
    p.add_argument("--images-per-prompt", type=int, default=4, help="images per prompt with --model (default 4)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N specs (with --images: the first N images)")
    p.add_argument("--json", help="write the summary (and per-image records) to this JSON file")
    p.add_argument("--steps", type=int, default=None, help="sampling steps with --model (default: the model's "
                   "recommended steps from its sampling_defaults.json, else 20)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance (default: the model's recommended scale, else 5)")
    p.add_argument("--seed", type=int, default=0, help="generation seed with --model (default 0)")
    p.add_argument("--batch-prompts", type=int, default=8, help="prompts per pipeline call (default 8)")
    p.add_argument("--save-images", help="with --model: also save the images here ({index:05d}_{k}.png)")
    p.add_argument("--grid", help="also save a PNG grid: the first image of a few prompts of each task, "
                                  "captioned with the evaluator's verdict (OK / NO)")
    p.add_argument("--grid-per-task", type=int, default=3, help="prompts per task in --grid (default 3)")
    p.add_argument("--fid", action="store_true",
                   help="also FID/KID against renders of the same specs, with the real-vs-real floor")
    p.add_argument("--evaluator", help="evaluator weights folder (default: the shipped weights)")
    p.add_argument("--device", default=None, help="with --model: generate on cpu (default), cuda, cuda:N or mps")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                   help="with --model: the models' precision (fp32 default)")
    p.set_defaults(func=eval_command)


def register_world(world_subparsers) -> None:
    """Add `chorus world train-evaluator`."""
    from chorus.world.evaluator import DEFAULT_WEIGHTS, TrainConfig
    d = TrainConfig()
    p = world_subparsers.add_parser(
        "train-evaluator", help="train the Shapes-world evaluator on renderer ground truth",
        description="Train the evaluator (a small CenterNet-style detector) on random renderer scenes and "
                    "save config.json + fp16 model.safetensors. The defaults reproduce the shipped weights.")
    p.add_argument("--out", default=str(DEFAULT_WEIGHTS), help=f"output folder (default {DEFAULT_WEIGHTS})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"training steps (default {d.steps})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed (default {d.seed})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"batch size (default {d.batch_size})")
    p.add_argument("--threads", type=int, default=d.threads, help=f"CPU threads (default {d.threads})")
    p.set_defaults(func=train_evaluator_command)


# --------------------------------------------------------------------------------------------
# train-evaluator
# --------------------------------------------------------------------------------------------

def train_evaluator_command(args) -> int:
    from chorus.world.evaluator import TrainConfig, train_evaluator
    if args.steps < 1 or args.batch_size < 1:
        raise ChorusError("--steps and --batch-size must be at least 1.")
    cfg = TrainConfig(steps=args.steps, seed=args.seed, batch_size=args.batch_size, threads=args.threads)
    _, info = train_evaluator(args.out, cfg)
    print(f"trained the evaluator for {cfg.steps} steps in {info['wall_s']:.0f} s; saved to {args.out}")
    return 0


# --------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------

def read_image_folder(folder: str | Path, specs: list[dict] | None = None):
    """Images named {index:05d}.png / {index:05d}_{k}.png and their specs → (images, specs, names).

    Specs come from `specs` (line i ↔ index i) or from the folder's metadata.jsonl: by its
    `file_name` field when it has one, else line i ↔ index i.
    """
    from PIL import Image
    from chorus.world.benchmark import load_specs
    folder = Path(folder)
    if not folder.is_dir():
        raise ChorusError(f"Image folder {folder} does not exist.")
    files = sorted((p for p in folder.iterdir() if IMAGE_NAME.match(p.name)),
                   key=lambda p: (int(IMAGE_NAME.match(p.name)[1]), int(IMAGE_NAME.match(p.name)[2] or 0)))
    if not files:
        raise ChorusError(f"No images in {folder}: expected files named like 00000.png or 00000_0.png "
                          "(as `chorus world render` writes them).")
    by_name: dict[str, dict] = {}
    if specs is None:
        meta = folder / "metadata.jsonl"
        if not meta.is_file():
            raise ChorusError(f"{folder} has no metadata.jsonl; pass the prompts' specs with --specs FILE.")
        specs = load_specs(meta)
        by_name = _specs_by_file_name(meta, specs)
    images, picked, names = [], [], []
    for p in files:
        index = int(IMAGE_NAME.match(p.name)[1])
        spec = by_name.get(p.name)
        if spec is None:
            if index >= len(specs):
                raise ChorusError(f"{p.name} has index {index} but there are only {len(specs)} specs; "
                                  "file names must map to spec lines ({index:05d}.png ↔ line index+1).")
            spec = specs[index]
        try:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        except OSError as e:
            raise ChorusError(f"Cannot read image {p}: {e}.") from None
        picked.append(spec)
        names.append(p.name)
    return images, picked, names


def _specs_by_file_name(meta: Path, specs: list[dict]) -> dict[str, dict]:
    """metadata.jsonl lines with a file_name field → {file_name: spec}."""
    out = {}
    lines = [ln for ln in meta.read_text().splitlines() if ln.strip()]
    for line, spec in zip(lines, specs):
        name = json.loads(line).get("file_name")
        if isinstance(name, str):
            out[Path(name).name] = spec
    return out


def generate_images(model: str, specs: list[dict], k: int, steps: int | None, guidance: float | None, seed: int,
                    batch_prompts: int = 8, device=None, dtype=None, progress: bool = True, **sampling):
    """Images from a text-to-image pipeline (a folder, or a Pipeline already loaded), prompt-major: k per spec
    (on `device`, in `dtype`); `sampling` goes to the pipeline's call (sampler, karras, …)."""
    from tqdm import tqdm
    try:
        from chorus.pipeline import Pipeline
    except ImportError as e:
        raise ChorusError(f"`chorus eval --model` needs chorus.pipeline, which is not available ({e}).") from None
    if device is not None:
        from chorus.devices import resolve_device
        resolve_device(device)   # an absent GPU: one clear error before the model loads
    pipe = model if isinstance(model, Pipeline) else Pipeline.from_pretrained(model)
    if device is not None or dtype is not None:
        pipe = pipe.to(device=device, dtype=dtype)
    recommended = "guidance_scale" in getattr(pipe, "sampling_defaults", {})
    guidance = getattr(pipe, "default_guidance", 5.0) if guidance is None else guidance
    steps = getattr(pipe, "default_steps", 20) if steps is None else steps
    print(f"generate: guidance {guidance:g}{' (the model’s recommended scale)' if recommended else ''}, {steps} steps",
          file=sys.stderr)
    images = []
    for i in tqdm(range(0, len(specs), batch_prompts), desc="generate", disable=not progress):
        prompts = [s.get("prompt", "") for s in specs[i:i + batch_prompts]]
        out = pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, seed=seed + i,
                   num_images_per_prompt=k, progress=False, **sampling)
        if len(out.images) != len(prompts) * k:
            raise ChorusError(f"The pipeline returned {len(out.images)} images for {len(prompts)} prompts × {k}.")
        images += list(out.images)
    return images


def fid_against_renders(evaluator, images, specs: list[dict], seed: int = 5_000_000,
                        blur_sigma: float = 1.0) -> dict:
    """FID/KID of `images` against renders of the same specs, beside two yardsticks: the real-vs-real
    floor (a second render set) and a reference degradation (that second set blurred at σ = blur_sigma
    px), so the number has a scale."""
    from chorus.world.evaluator import frechet_distance, gaussian_blur, inception_score, kernel_distance, to_batch
    size = evaluator.config.image_size
    real_a = render_specs(specs, seed, size)
    real_b = render_specs(specs, seed + len(specs), size)
    fa, fb, fg = evaluator.features(real_a), evaluator.features(real_b), evaluator.features(images)
    f_blur = evaluator.features(gaussian_blur(to_batch(real_b, size)[0], blur_sigma))
    return {"fid": frechet_distance(fg, fa), "kid": kernel_distance(fg, fa),
            "fid_floor": frechet_distance(fb, fa), "kid_floor": kernel_distance(fb, fa),
            "fid_blur": frechet_distance(f_blur, fa), "blur_sigma": blur_sigma,
            "is": inception_score(evaluator.shape_probs(images)),
            "is_real": inception_score(evaluator.shape_probs(real_a)), "n": len(images)}


def render_specs(specs: list[dict], seed: int, size: int = 64):
    """One render per spec (seed + i) as (H,W,3) uint8 arrays."""
    from chorus.world.render import render_spec
    return [render_spec(s, seed=seed + i, size=size).image for i, s in enumerate(specs)]


def eval_command(args) -> int:
    from chorus.world.benchmark import load_specs
    from chorus.world.evaluator import Evaluator, score_images
    from chorus.world.scoring import format_table, summarize
    if args.limit is not None and args.limit < 1:
        raise ChorusError("--limit must be at least 1.")
    if args.images_per_prompt < 1:
        raise ChorusError("--images-per-prompt must be at least 1.")
    if args.grid and Path(args.grid).suffix.lower() != ".png":
        raise ChorusError(f"--grid must name a .png file, got {args.grid}.")
    if getattr(args, "device", None) and args.model:
        from chorus.devices import resolve_device
        resolve_device(args.device)
    evaluator = Evaluator.load(args.evaluator)
    t0 = time.time()
    if args.images:
        specs = load_specs(args.specs) if args.specs else None
        images, specs, names = read_image_folder(args.images, specs)
        if args.limit:
            images, specs, names = images[:args.limit], specs[:args.limit], names[:args.limit]
    else:
        prompts = load_specs(args.specs)[:args.limit]
        images = generate_images(args.model, prompts, args.images_per_prompt, args.steps, args.guidance_scale,
                                 args.seed, args.batch_prompts, getattr(args, "device", None),
                                 getattr(args, "dtype", None))
        specs = [s for s in prompts for _ in range(args.images_per_prompt)]
        names = [f"{i:05d}_{k}.png" for i in range(len(prompts)) for k in range(args.images_per_prompt)]
        if args.save_images:
            _save_images(images, names, prompts, args.save_images)
    size = evaluator.config.image_size
    odd = {_hw(im) for im in images} - {(size, size)}
    if odd:
        print(f"note: images of size {sorted(odd)} are resized to {size}×{size} for the evaluator", file=sys.stderr)
    records = score_images(images, specs, evaluator, names)
    summary = summarize(records)
    if args.fid:
        summary.update(fid_against_renders(evaluator, images, specs))
    print(format_table(summary))
    if args.fid:
        print(f"FID {summary['fid']:.3f} (real-vs-real floor {summary['fid_floor']:.3f}, renders blurred at "
              f"σ={summary['blur_sigma']:g} px {summary['fid_blur']:.3f}), "
              f"KID {summary['kid']:.4f} (floor {summary['kid_floor']:.4f}), "
              f"IS {summary['is']:.2f} (renders {summary['is_real']:.2f}), n={summary['n']}")
    print(f"({len(images)} images, {time.time() - t0:.1f} s)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**summary, "records": records}, indent=1) + "\n")
    if args.grid:
        verdict_grid(images, specs, records, args.grid, args.grid_per_task)
        print(f"wrote the grid to {args.grid}")
    return 0


def verdict_grid(images, specs: list[dict], records: list[dict], path, per_task: int = 3, cols: int = 6) -> None:
    """A PNG of the first image of the first `per_task` prompts of each task, captioned 'OK'/'NO' + prompt."""
    import numpy as np
    from chorus.world.cli import _save_atomic, caption_grid
    picked, seen, shown = [], {}, set()
    for i, (spec, rec) in enumerate(zip(specs, records)):
        key = spec.get("prompt")
        if key in shown or seen.get(spec.get("tag"), 0) >= per_task:
            continue
        shown.add(key)
        seen[spec.get("tag")] = seen.get(spec.get("tag"), 0) + 1
        picked.append(i)
    arrays = [np.asarray(images[i].convert("RGB") if hasattr(images[i], "convert") else images[i]) for i in picked]
    captions = [f"{'OK' if records[i]['correct'] else 'NO'}  {specs[i].get('prompt', '')}" for i in picked]
    _save_atomic(caption_grid(arrays, captions, cols=min(cols, len(arrays))), Path(path))


def _hw(im) -> tuple[int, int]:
    return (im.size[1], im.size[0]) if hasattr(im, "size") and not hasattr(im, "shape") else tuple(im.shape[:2])


def _save_images(images, names, prompts, folder) -> None:
    from PIL import Image
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for im, name in zip(images, names):
        (im if hasattr(im, "save") else Image.fromarray(im)).save(folder / name)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(s) + "\n" for s in prompts))


# --------------------------------------------------------------------------------------------
# honesty checks: python -m chorus.world.eval_cli honesty
# --------------------------------------------------------------------------------------------

HONESTY_SEED = 7_000_000  # render_spec seeds 7_000_000 + i: the evaluator trains on random_scene_sample draws only


def shuffled_within_tag(specs: list[dict], seed: int = 0) -> list[dict]:
    """Each spec replaced by another prompt of the same task (a derangement within each tag)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    out = list(specs)
    by_tag: dict[str, list[int]] = {}
    for i, s in enumerate(specs):
        by_tag.setdefault(s.get("tag", "?"), []).append(i)
    for idx in by_tag.values():
        if len(idx) < 2:
            continue
        shift = rng.permutation(len(idx))  # a cyclic shift of a random order never maps i to i
        order = [idx[j] for j in shift]
        for a, b in zip(order, order[1:] + order[:1]):
            out[a] = specs[b]
    return out


def blank_and_noise_images(n: int, size: int = 64, seed: int = 0):
    """n flat background images (the renderer's background tints) and n uniform-noise images."""
    import numpy as np
    from chorus.world.scene import BACKGROUNDS
    rng = np.random.default_rng(seed)
    tints = list(BACKGROUNDS.values())
    blank = [np.broadcast_to(np.array(tints[i % len(tints)], np.uint8), (size, size, 3)).copy() for i in range(n)]
    noise = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]
    return blank, noise


def honesty(specs: list[dict], evaluator=None, seed: int = HONESTY_SEED, blur_sigma: float = 1.5) -> dict:
    """Scores of renders against their own specs, shuffled specs, blank/noise images; FID of blur vs floor."""
    from chorus.world.evaluator import Evaluator, score_images
    from chorus.world.scoring import summarize
    evaluator = evaluator or Evaluator.load()
    size = evaluator.config.image_size
    renders = render_specs(specs, seed, size)
    others = render_specs(specs, seed + len(specs), size)
    own = summarize(score_images(renders, specs, evaluator))
    shuffled = summarize(score_images(renders, shuffled_within_tag(specs, seed), evaluator))
    blank, noise = blank_and_noise_images(len(specs), size, seed)
    blank_s = summarize(score_images(blank, specs, evaluator))
    noise_s = summarize(score_images(noise, specs, evaluator))
    return {"n_images": len(specs), "seed": seed, "own": own, "shuffled": shuffled, "blank": blank_s,
            "noise": noise_s, **blur_distances(renders, others, evaluator, blur_sigma)}


def blur_distances(renders, others, evaluator, blur_sigma: float = 1.5) -> dict:
    """FID/KID of `others` blurred vs `renders` beside the floor: `others` sharp vs `renders`."""
    from chorus.world.evaluator import frechet_distance, gaussian_blur, kernel_distance, to_batch
    x, _ = to_batch(others, evaluator.config.image_size)
    f_a, f_b = evaluator.features(renders), evaluator.features(others)
    f_blur = evaluator.features(gaussian_blur(x, blur_sigma))
    return {"fid_floor": frechet_distance(f_b, f_a), "fid_blur": frechet_distance(f_blur, f_a),
            "kid_floor": kernel_distance(f_b, f_a), "kid_blur": kernel_distance(f_blur, f_a),
            "blur_sigma": blur_sigma, "n_fid": len(renders)}


def robustness(specs: list[dict], evaluator, seed: int = HONESTY_SEED) -> dict[str, dict]:
    """Own-spec scores of degraded renders: low native sizes (upsampled), blur, noise, a larger size."""
    import torch
    from chorus.world.evaluator import gaussian_blur, score_images, to_batch
    from chorus.world.render import render_spec
    from chorus.world.scoring import summarize
    size = evaluator.config.image_size
    x, _ = to_batch(render_specs(specs, seed, size), size)
    gen = torch.Generator().manual_seed(seed)
    variants = {f"native {n}": [render_spec(s, seed=seed + i, size=size, native=n).image for i, s in enumerate(specs)]
                for n in (32, 24, 16)}
    variants |= {f"blur {sg}": gaussian_blur(x, sg) for sg in (1.0, 1.5)}
    variants |= {f"noise {sd}": (x + sd * torch.randn(x.shape, generator=gen)).clamp(0, 1) for sd in (0.06, 0.1)}
    variants[f"size {2 * size}"] = [render_spec(s, seed=seed + i, size=2 * size).image for i, s in enumerate(specs)]
    return {name: summarize(score_images(ims, specs, evaluator)) for name, ims in variants.items()}


def honesty_main(argv: list[str] | None = None) -> int:
    from chorus.world.benchmark import load_specs
    from chorus.world.evaluator import Evaluator
    from chorus.world.scoring import format_table
    p = argparse.ArgumentParser(prog="python -m chorus.world.eval_cli honesty",
                                description="The evaluator's honesty checks on renders it never trained on.")
    p.add_argument("--specs", help="spec file (default: the built-in benchmark)")
    p.add_argument("--repeats", type=int, default=1, help="renders per spec (default 1)")
    p.add_argument("--seed", type=int, default=HONESTY_SEED)
    p.add_argument("--evaluator", help="evaluator weights folder (default: the shipped weights)")
    p.add_argument("--json", help="write the numbers here")
    p.add_argument("--robustness", action="store_true", help="also score degraded renders (blur, noise, low native size)")
    args = p.parse_args(argv)
    torch_threads()
    base = load_specs(args.specs)
    specs = [s for _ in range(args.repeats) for s in base]
    t0 = time.time()
    r = honesty(specs, Evaluator.load(args.evaluator), args.seed)
    for name in ("own", "shuffled", "blank", "noise"):
        print(f"== renders scored against {name} specs ==" if name in ("own", "shuffled")
              else f"== {name} images ==")
        print(format_table(r[name]))
    print(f"FID sharp vs sharp (floor) {r['fid_floor']:.3f}; blurred (σ={r['blur_sigma']}) vs sharp {r['fid_blur']:.3f}")
    print(f"KID floor {r['kid_floor']:.5f}; blurred {r['kid_blur']:.5f}")
    print(f"({r['n_images']} images per check, render seeds {args.seed}..{args.seed + 2 * len(specs) - 1}, "
          f"{time.time() - t0:.0f} s)")
    if args.robustness:
        r["robustness"] = robustness(specs, Evaluator.load(args.evaluator), args.seed)
        print("== renders degraded, scored against their own specs ==")
        tags = list(r["own"]["tasks"])
        print(f"{'variant':<12}{'overall':>9}" + "".join(f"{t[:12]:>14}" for t in tags))
        for name, sm in r["robustness"].items():
            print(f"{name:<12}{sm['overall']:>9.3f}" + "".join(f"{sm['tasks'].get(t, 0):>14.3f}" for t in tags))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1) + "\n")
    return 0


def torch_threads(n: int = 2) -> None:
    import torch
    torch.set_num_threads(n)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "honesty":
        raise SystemExit(honesty_main(sys.argv[2:]))
    print("usage: python -m chorus.world.eval_cli honesty [--specs FILE] [--repeats N] [--json FILE]", file=sys.stderr)
    raise SystemExit(2)
