"""Agreement of the world evaluator with an independent classical check on a model's own samples.

    chorus eval --model default --save-images runs/eval-default      # writes the images + metadata.jsonl
    python experiments/classical_agreement.py runs/eval-default [--json docs/classical_agreement.json]

On the samples of the colour and counting prompts, the evaluator's colour/count verdict (shapes and
positions ignored) is compared with `chorus.world.trust.classical_verdict` (nearest colour anchor,
connected components; no learning). Prints the agreement rate per task and writes the records.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    from chorus.world.eval_cli import read_image_folder
    from chorus.world.trust import agreement_records
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", help="a folder written by `chorus eval --save-images`")
    p.add_argument("--tags", nargs="+", default=["colors", "counting"])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    images, specs, names = read_image_folder(args.images)
    keep = [i for i, s in enumerate(specs) if s.get("tag") in args.tags]
    records = agreement_records([images[i] for i in keep], [specs[i] for i in keep])
    out = {"images": args.images, "n": len(records), "tags": {}}
    for tag in args.tags:
        rs = [r for r in records if r["tag"] == tag]
        if rs:
            out["tags"][tag] = {"n": len(rs), "agreement": round(sum(r["evaluator"] == r["classical"] for r in rs)
                                                                 / len(rs), 4),
                                "evaluator_pass": round(sum(r["evaluator"] for r in rs) / len(rs), 4),
                                "classical_pass": round(sum(r["classical"] for r in rs) / len(rs), 4)}
    out["agreement"] = round(sum(r["evaluator"] == r["classical"] for r in records) / max(len(records), 1), 4)
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({**out, "records": records}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
