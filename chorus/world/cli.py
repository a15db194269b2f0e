"""`chorus world make|show|render`: the Shapes world from the command line (a thin layer over the API)."""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from chorus.errors import ChorusError

if TYPE_CHECKING:
    from PIL import Image


def _positive(name: str, value: int, minimum: int = 1) -> int:
    if value < minimum:
        raise ChorusError(f"--{name} must be at least {minimum}, got {value}.")
    return value


def _split_arg(split: str) -> str:
    from chorus.world.captions import SPLITS
    if split not in SPLITS:
        raise ChorusError(f"Unknown --split {split!r}; the splits are: {', '.join(SPLITS)}.")
    return split


# ---- make -----------------------------------------------------------------------------------
def cmd_make(args) -> int:
    """Render N samples of the training world into an image folder or WebDataset shards."""
    from tqdm import tqdm

    from chorus.world.formats import write_samples
    from chorus.world.render import make_sample
    n, size = _positive("n", args.n), _positive("size", args.size, 16)
    split = _split_arg(args.split)

    def samples():
        for i in tqdm(range(n), desc=f"world make ({args.format})", unit="img", disable=args.quiet):
            yield f"{i:08d}", make_sample(args.seed, i, size=size, crop=not args.no_crop, split=split,
                                          with_instances=args.conditions)

    out = write_samples(samples(), args.out, fmt=args.format, conditions=args.conditions,
                        samples_per_shard=_positive("shard-size", args.shard_size), overwrite=args.overwrite)
    print(f"wrote {n} samples ({args.format}, {size}×{size}, split {split}) to {out}")
    return 0


# ---- show -----------------------------------------------------------------------------------
def caption_grid(images: list[np.ndarray], captions: list[str], cols: int = 4, scale: int = 3) -> "Image.Image":
    """One PNG-able grid: each image enlarged `scale`× (nearest) with its caption written under it."""
    from PIL import Image, ImageDraw, ImageFont
    try:
        font = ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    h, w = images[0].shape[:2]
    tw, th = w * scale, h * scale
    chars = max(8, tw // 7)
    wrapped = [textwrap.wrap(c, chars)[:4] or [""] for c in captions]
    line_h = 14
    text_h = line_h * max(len(x) for x in wrapped) + 6
    rows = (len(images) + cols - 1) // cols
    pad = 4
    grid = Image.new("RGB", (cols * (tw + pad) + pad, rows * (th + text_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for k, (img, lines) in enumerate(zip(images, wrapped)):
        r, c = divmod(k, cols)
        x, y = pad + c * (tw + pad), pad + r * (th + text_h + pad)
        grid.paste(Image.fromarray(img).resize((tw, th), Image.NEAREST), (x, y))
        for j, line in enumerate(lines):
            draw.text((x, y + th + 3 + j * line_h), line, fill=(0, 0, 0), font=font)
    return grid


def _save_atomic(img, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        img.save(tmp, format="PNG")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def cmd_show(args) -> int:
    """A grid of N samples with their captions, saved as one PNG."""
    from chorus.world.render import make_sample
    n, size = _positive("n", args.n), _positive("size", args.size, 16)
    split = _split_arg(args.split)
    samples = [make_sample(args.seed, i, size=size, crop=not args.no_crop, split=split) for i in range(n)]
    grid = caption_grid([s.image for s in samples], [s.caption for s in samples], cols=args.cols, scale=args.scale)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ChorusError(f"--out must name a .png file, got {out}.")
    _save_atomic(grid, out)
    print(f"wrote a grid of {n} samples to {out}")
    return 0


# ---- render ---------------------------------------------------------------------------------
def cmd_render(args) -> int:
    """Draw one image per spec line: DIR/{index:05d}.png + metadata.jsonl (with the spec)."""
    from tqdm import tqdm

    from chorus.world.formats import FolderWriter, load_specs
    from chorus.world.render import render_spec
    specs = load_specs(args.specs)
    size = _positive("size", args.size, 16)
    with FolderWriter(args.out, conditions=args.conditions, overwrite=args.overwrite) as writer:
        for index, spec in enumerate(tqdm(specs, desc="world render", unit="img", disable=args.quiet)):
            line = spec.pop("_line")
            try:
                sample = render_spec(spec, seed=args.seed + index, size=size, with_instances=args.conditions,
                                     native=args.native)
            except ChorusError as e:
                raise ChorusError(f"{Path(args.specs).name} line {line}: {e}") from None
            writer.write(f"{index:05d}", sample, index=index, line=line)
    print(f"rendered {len(specs)} specs to {args.out}")
    return 0


# ---- registration ---------------------------------------------------------------------------
def register(subparsers) -> None:
    """Add `world` (make, show, render; and the evaluator's subcommands when present)."""
    world = subparsers.add_parser("world", help="the built-in Shapes world: make data, show samples, render specs",
                                  description="The Shapes world: a procedural renderer of coloured shapes with "
                                              "compositional captions and GenEval-style specs.")
    sub = world.add_subparsers(dest="world_command", metavar="SUBCOMMAND")
    world.set_defaults(func=lambda a: (world.print_help(), 2)[1])

    mk = sub.add_parser("make", help="render N samples into an image folder or WebDataset shards")
    mk.add_argument("--n", type=int, required=True, help="number of samples")
    mk.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    mk.add_argument("--format", choices=("folder", "wds"), default="folder",
                    help="folder: PNGs + metadata.jsonl; wds: WebDataset tar shards")
    mk.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    mk.add_argument("--seed", type=int, default=0, help="data set seed; sample i is a function of (seed, i)")
    mk.add_argument("--split", default="train", help="train | heldout_pairs | heldout_words")
    mk.add_argument("--conditions", action="store_true", help="also store Canny, layout and instance maps")
    mk.add_argument("--no-crop", action="store_true", help="no random crops (square native images, crop (0, 0))")
    mk.add_argument("--shard-size", type=int, default=10_000, help="samples per tar shard (wds)")
    mk.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    mk.add_argument("--quiet", action="store_true", help="no progress bar")
    mk.set_defaults(func=cmd_make)

    sh = sub.add_parser("show", help="a PNG grid of samples with their captions")
    sh.add_argument("--n", type=int, default=16)
    sh.add_argument("--seed", type=int, default=0)
    sh.add_argument("--out", default="world_grid.png")
    sh.add_argument("--size", type=int, default=64)
    sh.add_argument("--split", default="train")
    sh.add_argument("--cols", type=int, default=4)
    sh.add_argument("--scale", type=int, default=3, help="enlargement of each image (nearest)")
    sh.add_argument("--no-crop", action="store_true")
    sh.set_defaults(func=cmd_show)

    rd = sub.add_parser("render", help="draw an image for each spec line of a JSONL file")
    rd.add_argument("--specs", required=True, help="JSONL file, one GenEval-style spec per line")
    rd.add_argument("--out", required=True, help="output folder: {index:05d}.png + metadata.jsonl")
    rd.add_argument("--size", type=int, default=64)
    rd.add_argument("--seed", type=int, default=0, help="spec i is drawn with seed + i")
    rd.add_argument("--native", type=int, default=None, help="draw at this size, then resize (default: --size)")
    rd.add_argument("--conditions", action="store_true")
    rd.add_argument("--overwrite", action="store_true")
    rd.add_argument("--quiet", action="store_true")
    rd.set_defaults(func=cmd_render)

    try:
        from chorus.world import eval_cli
    except ModuleNotFoundError as e:  # the evaluator's commands are optional in this build
        if e.name != "chorus.world.eval_cli":
            raise
        eval_cli = None
    if eval_cli is not None and hasattr(eval_cli, "register_world"):
        eval_cli.register_world(sub)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (`python -m chorus.world.cli make ...`), same behaviour as `chorus world`."""
    parser = argparse.ArgumentParser(prog="chorus")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["world", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except ChorusError as e:
        print(textwrap.fill(f"error: {e}", width=100), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
