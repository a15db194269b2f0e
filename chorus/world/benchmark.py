"""The Shapes-world benchmark: 553 prompts over GenEval's six tasks, in GenEval's proportions.

Drawn deterministically from `captions.sample_spec` with BENCHMARK_SEED; about 12% of the prompts
come from the held-out splits (held-out colour–shape pairs, held-out words), marked in each spec's
`split` field. Regenerate the shipped file with ``python -m chorus.world.benchmark``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from chorus.errors import ChorusError

BENCHMARK_SEED = 20230801
BENCHMARK_PATH = Path(__file__).resolve().parent / "data" / "benchmark.jsonl"
IMAGES_PER_PROMPT = 4

# tag -> {split: number of prompts}; GenEval's 80/99/80/94/100/100 prompts per task.
PLAN: dict[str, dict[str, int]] = {
    "single_object": {"train": 70, "heldout_words": 10},
    "two_object": {"train": 87, "heldout_words": 12},
    "counting": {"train": 70, "heldout_pairs": 5, "heldout_words": 5},
    "colors": {"train": 82, "heldout_pairs": 6, "heldout_words": 6},
    "position": {"train": 88, "heldout_pairs": 6, "heldout_words": 6},
    "color_attr": {"train": 88, "heldout_pairs": 6, "heldout_words": 6},
}


def build_benchmark(seed: int = BENCHMARK_SEED, plan: dict[str, dict[str, int]] | None = None) -> list[dict]:
    """Draw the benchmark specs: per tag and split, distinct prompts from sample_spec."""
    from chorus.world.captions import sample_spec
    plan = plan or PLAN
    specs, seen = [], set()
    for t, tag in enumerate(plan):
        for s, (split, n) in enumerate(plan[tag].items()):
            rng = np.random.default_rng([seed, t, s])
            drawn, tries = 0, 0
            while drawn < n:
                tries += 1
                if tries > 100 * n:
                    raise ChorusError(f"Could not draw {n} distinct {tag}/{split} prompts.")
                spec = sample_spec(rng, tag, split)
                if spec["prompt"] in seen:
                    continue
                seen.add(spec["prompt"])
                specs.append(spec)
                drawn += 1
    return specs


def write_specs(specs: list[dict], path: str | Path) -> None:
    """One spec per line (JSON Lines)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(s) + "\n" for s in specs))


def load_specs(path: str | Path | None = None) -> list[dict]:
    """Read a spec file (JSON Lines; default the shipped benchmark); a bad line raises ChorusError."""
    from chorus.world.captions import validate_spec
    path = Path(path) if path is not None else BENCHMARK_PATH
    if not path.is_file():
        raise ChorusError(f"Spec file {path} does not exist.")
    specs = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise ChorusError(f"{path} line {n} is not valid JSON ({e.msg} at column {e.colno}); "
                              "each line must hold one spec object.") from None
        if isinstance(raw, dict) and "spec" in raw and "include" not in raw:
            raw = raw["spec"]  # a metadata line: {"file_name": ..., "spec": {...}}
        specs.append(validate_spec(raw, f"{path.name} line {n}"))
    if not specs:
        raise ChorusError(f"Spec file {path} holds no specs.")
    return specs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Regenerate the Shapes-world benchmark prompt set.")
    p.add_argument("--out", default=str(BENCHMARK_PATH), help="where to write the JSON Lines file")
    p.add_argument("--seed", type=int, default=BENCHMARK_SEED)
    args = p.parse_args(argv)
    specs = build_benchmark(args.seed)
    write_specs(specs, args.out)
    counts: dict[str, int] = {}
    for s in specs:
        counts[s["split"]] = counts.get(s["split"], 0) + 1
    print(f"wrote {len(specs)} specs to {args.out} ({', '.join(f'{k}: {v}' for k, v in counts.items())})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
