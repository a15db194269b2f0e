"""`chorus export`: a diffusers folder → one original-layout .safetensors file, or back."""
from __future__ import annotations

from pathlib import Path

from chorus.errors import ChorusError


def register(sub) -> None:
    p = sub.add_parser(
        "export", help="convert between diffusers folders and single-file checkpoints (A1111/ComfyUI .safetensors)",
        description="`chorus export MODEL --single-file OUT.safetensors` writes a diffusers-format pipeline folder "
                    "(SD 1.x, SD 2.x, SDXL base or refiner) or a ControlNet folder as one file in the original "
                    "(LDM/sgm) layout. `chorus export FILE --diffusers DIR` writes a single file as a diffusers "
                    "folder. Single files carry no tokenizer: give --tokenizer DIR when converting to a folder.")
    p.add_argument("source", help="a diffusers folder (or 'default') with --single-file; a .safetensors/.ckpt "
                                  "file with --diffusers")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--single-file", metavar="OUT.safetensors", help="write one original-layout file")
    what.add_argument("--diffusers", metavar="DIR", help="write a diffusers-format folder")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="--single-file: cast floating tensors (default: as stored)")
    p.add_argument("--family", choices=["sd1", "sd2", "sdxl", "sdxl_refiner"], default=None,
                   help="--single-file: the layout to write (default: from the folder)")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None,
                   help="--diffusers: SD 2.x ε or v (the weights cannot tell; default: the file's metadata, "
                        "else diffusers' rule: v)")
    p.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="--diffusers: a CLIP tokenizer folder (vocab.json + merges.txt) or a pipeline folder with "
                        "tokenizer/ [tokenizer_2/]")
    p.add_argument("--config", metavar="DIR", default=None,
                   help="--diffusers: a local diffusers folder whose configs fill in what the tensor shapes cannot "
                        "tell (attention heads, norm groups, sample size, …; its tokenizers too)")
    p.set_defaults(func=run_export)


def run_export(args) -> int:
    from chorus.formats.single_file import FAMILY_NAMES, export_diffusers, export_single_file
    if args.single_file:
        if args.prediction_type or args.tokenizer or args.config:
            raise ChorusError("--prediction-type, --tokenizer and --config apply to --diffusers (a folder already "
                              "has them).")
        source = args.source
        if source == "default":
            from chorus.pipeline import default_model_path
            source = default_model_path()
        from chorus.experts import read_experts_spec
        experts = read_experts_spec(source) if Path(source).is_dir() else None
        if experts is not None and len(experts) > 1:
            raise ChorusError(f"{source} is an ensemble of {len(experts)} experts ({', '.join(e['name'] for e in experts)}); "
                              "a single-file checkpoint holds one UNet. Export one expert's own run folder "
                              "instead (e.g. OUT/<name>/model of `chorus train --part experts`).")
        family = export_single_file(source, args.single_file, dtype=args.dtype, family=args.family)
        print(f"{Path(args.single_file)}  ({FAMILY_NAMES[family]}, original layout)")
        return 0
    if args.dtype or args.family:
        raise ChorusError("--dtype and --family apply to --single-file.")
    det = export_diffusers(args.source, args.diffusers, prediction_type=args.prediction_type, tokenizer=args.tokenizer,
                           config=args.config)
    print(f"{Path(args.diffusers)}  ({det.name}, prediction type {det.prediction_type} from "
          f"{det.prediction_source})")
    return 0
