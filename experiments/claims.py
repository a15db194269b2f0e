"""docs/claims.md: every claim of the seminar, its number where it has one, Chorus's miniature number and the
verdict — built from the studies' JSON records in docs/records/, never typed by hand.

    python experiments/claims.py            # after the studies (each names its own command)

A claim whose record is missing is listed as not run, with the command that would run it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "docs/records"


def load(name: str):
    path = RECORDS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def controlnet(r):
    ev, fit = r["evaluation"]["results"], r["convergence"]["fit_mean_iou"]
    base, one = ev["no ControlNet"], ev["scale 1"]
    empty = ev["empty prompt, scale 1"]
    return (f"placed {base['success']:.3f} → {one['success']:.3f}, FID-world {base['fid_world']:.3f} → "
            f"{one['fid_world']:.3f}; with the empty prompt {empty['success']:.3f}; onset s* ≈ {fit['s_star']:.0f} steps, "
            f"rise width / s* = {fit['width_over_s_star']:.1f}",
            f"mixed: control works and never degrades the base's FID; the convergence is {fit['verdict']}, not sudden "
            "(the paper's Δ/s* < 0.3)")


def pnp(r):
    p, sd = r["results"]["pnp tau_f=0.8 tau_A=0.5"]["all"], r["results"]["sdedit strength=0.4"]["all"]
    sd_hi = r["results"]["sdedit strength=1.0"]["all"]
    return (f"structure kept (box IoU) {p['iou']:.2f} at edit success {p['success']:.2f}; SDEdit {sd['iou']:.2f} at "
            f"{sd['success']:.2f} (strength 0.4) → {sd_hi['iou']:.2f} at {sd_hi['success']:.2f} (1.0)",
            "reproduced: at equal edit success Plug-and-Play keeps more of the guidance image's structure than SDEdit "
            "(self-attention injection adds nothing measurable here)")


def pww(r):
    res = r["results"]
    ws = sorted(res, key=float)
    a, b = res[ws[0]], res[ws[-1]]
    pa, pb = a["pass_per_tag"].get("position", float("nan")), b["pass_per_tag"].get("position", float("nan"))
    return (f"position pass {pa:.2f} → {pb:.2f} (w′ {ws[0]} → {ws[-1]}), placement {a['placement']:.2f} → "
            f"{b['placement']:.2f}, FID-world {a['fid_world']:.2f} → {b['fid_world']:.2f}",
            "mixed: the regions move objects where they are painted, at a cost in image quality")


def with_verdict(key: str, number):
    def read(r):
        return number(r), r.get("verdict", r.get("summary", {}).get("verdict", "–"))
    return read


def switch_number(r):
    curve = r["summary"]["arms"]["switch"]["all"]["curve"]
    at = lambda s: min(curve, key=lambda c: abs(c["s"] - s))  # noqa: E731
    s50 = {a: r["summary"]["arms"]["switch"][a]["s50"] for a in ("layout", "count", "shape", "colour")}
    return (f"{r['pairs_per_attribute'] * 4} pairs × {r['seeds']} seeds: share of B left after A for the first 40 %: "
            f"{at(0.4)['d']:.2f} ± {at(0.4)['d_std']:.2f}; for the first 90 %: {at(0.9)['d']:.2f} ± "
            f"{at(0.9)['d_std']:.2f}; s₅₀ "
            + ", ".join(f"{a} {v:.2f}" if v is not None else f"{a} –" for a, v in s50.items()))


def experts_number(r):
    out = []
    for name, per in r["results"].items():
        if "2" in per:
            out.append(f"{name.split(' (')[0]} {per['2']['overall']:.3f} / {per['2']['fid_world']:.2f}")
    return "overall / FID-world at guidance 2: " + "; ".join(out)


def encoders_number(r):
    res = r["results"]
    se = r.get("bootstrap_se_overall", {})
    return "; ".join(f"{a}: {x['overall']:.3f} ± {se.get(a, float('nan')):.3f} (held-out words "
                     f"{x['splits'].get('heldout_words', {}).get('overall', float('nan')):.3f})" for a, x in res.items())


def size_number(r):
    res = r["results"]
    return (f"{r['prompts']} prompts × {r['seeds']} seeds, sharpness by original_size: "
            + ", ".join(f"{s}: {x['sample_sharpness']:.4f} ± {x['sample_sharpness_std']:.4f}" for s, x in res.items())
            + " (renders: " + ", ".join(f"{x['render_sharpness']:.4f}" for x in res.values()) + ")")


def size_arms_number(r):
    res = r["results"]
    seeds = r.get("seeds", [r.get("seed", 0)])
    return (f"{len(seeds)} training seeds, FID-world / IS drop, nocond, cond: "
            + ", ".join(f"{res[a]['fid_world']:.3f} ± {res[a].get('fid_world_std', float('nan')):.3f} / {res[a]['is']:.2f}"
                        for a in ("drop", "nocond", "cond")))


def crop_number(r):
    res = r["results"]
    keys = ["shipped model, crop (0, 0)", "shipped model, crop (32, 32)", "stage 2 (no micro-conditioning)",
            "training data, cropped (detector rule)"]
    def cell(k):
        x = res[k]
        sd = x.get("images_with_a_cut_object_per_seed")
        return f"{k} {x['images_with_a_cut_object']:.3f}" + (f" ± {np.std(sd):.3f}" if sd else "")
    return f"{r['prompts']} prompts × {r['seeds']} seeds, images with a cut object: " + ", ".join(
        cell(k) for k in keys if k in res)


def refiner_number(r):
    res = r["results"]
    return "; ".join(f"{k}: FID-world {x['fid_world']:.3f}, sharpness {x['sharpness']:.4f}, overall {x['overall']:.3f}"
                     for k, x in res.items() if k != "renders")


CLAIMS = [
    ("ControlNet: a trained copy with zero convolutions adds a condition without harming the base; training "
     "converges suddenly; 50 % prompt dropout gives prompt-free control", "sudden convergence at ~6,133 steps "
     "(< 10 k)", "controlnet_study", controlnet, "python experiments/controlnet_study.py"),
    ("Plug-and-Play: the guidance image's structure is kept while the prompt changes the rest (DDIM inversion, "
     "injected features and self-attention)", "–", "pnp_study", pnp, "python experiments/pnp_study.py"),
    ("eDiff-I paint-with-words: cross-attention biased inside a region places the word there", "–", "pww_study",
     pww, "python experiments/pww_study.py"),
    ("eDiff-I: text matters at high noise — a prompt switched in the late steps does not change the image; the "
     "first ~40 % decide", "last ~7 %: no change; first ~40 %: decides", "prompt_switch",
     with_verdict("prompt_switch", switch_number), "python experiments/prompt_switch.py"),
    ("eDiff-I: an ensemble of expert denoisers, each trained on its noise interval, beats one model at equal "
     "training samples and inference cost (along the whole guidance curve)", "FID-30K 7.35 → 7.26 → 7.11 → 6.95 "
     "(Config A–D)", "expert_ensemble", with_verdict("expert_ensemble", experts_number),
     "python experiments/expert_ensemble.py"),
    ("eDiff-I / SDXL: an ensemble of text encoders — each encoder alone loses something", "–", "encoder_ensemble",
     with_verdict("encoder_ensemble", encoders_number), "python experiments/encoder_ensemble.py"),
    ("SDXL size conditioning (training): conditioning on the original size beats dropping small images or "
     "upscaling them unconditioned", "FID-5k 43.84 / 39.76 / 36.53, IS 110.64 / 211.50 / 215.34", "size_arms",
     with_verdict("size_arms", size_arms_number), "python experiments/size_arms.py"),
    ("SDXL size conditioning (inference): a larger original_size gives a sharper image", "(figure)",
     "size_conditioning", with_verdict("size_conditioning", size_number), "python experiments/size_conditioning.py"),
    ("SDXL crop conditioning: at crop (0, 0) objects are centred and uncut", "(figure)", "crop_conditioning",
     with_verdict("crop_conditioning", crop_number), "python experiments/crop_conditioning.py"),
    ("SDXL refiner: an expert of the lowest 200 noise steps improves the base's latent", "user preference 48.4 % vs "
     "36.9 % (with vs without)", "refiner", with_verdict("refiner", refiner_number), "python experiments/refiner.py"),
]


NOTES = [
    ("Prompt switch", "The direction holds, the 40 % does not: on this model (20 DPM++ 2M steps on trailing "
     "timesteps with zero terminal SNR) the image keeps following B until A has had about half of the steps "
     "(layout and count are decided first, colour next, shape identity last), and a switch in the last 10 % "
     "still moves pixels (d ≈ 0.15) though hardly any verdict. The fraction of steps is schedule-dependent: the "
     "first 40 % of these steps end at ᾱ ≈ 0.09, still mostly noise. Dropping the text instead (A → empty) costs "
     "verdicts even late — the text is not ignored near the end here. [prompt_switch.md](records/prompt_switch.md), "
     "![](images/prompt_switch.png)"),
    ("Experts", "Equal training samples (600 × 64 in all) and equal inference cost (one UNet call per step); the "
     "continuation is eDiff-I's control. The hand-over restarts DPM++ 2M's history (as SDXL's two pipelines do); "
     "the refiner study measures what the hand-over alone costs. [expert_ensemble.md](records/expert_ensemble.md)"),
    ("Text encoders", "By dropout-inference on the shipped model (each encoder was dropped 20 % of the time in "
     "training), not by separately trained models: the ensemble beats either encoder alone overall, MiniLM alone "
     "loses the colours, CLIP alone loses counting and two objects — but the pretrained MiniLM does *not* help the "
     "held-out words, against the claim. [encoder_ensemble.md](records/encoder_ensemble.md)"),
    ("Size (inference)", "Asking for a larger original size gives sharper samples, as renders drawn larger are "
     "sharper, but the samples at 64 px are still far blurrier than renders (the 4× VAE and a small UNet). "
     "[size_conditioning.md](records/size_conditioning.md)"),
    ("Crop", "The shipped model does not use its crop time id: asking for (0, 0) or (32, 32) draws the same share "
     "of cut objects, about as often as its cropped training data. The study's rule says *mixed* only because the "
     "unconditioned stage-2 model (another, weaker model) cuts more. [crop_conditioning.md](records/crop_conditioning.md)"),
    ("ControlNet, Plug-and-Play, paint-with-words", "The studies of the controls: [controlnet_study.md]"
     "(records/controlnet_study.md), [pnp_study.md](records/pnp_study.md), [pww_study.md](records/pww_study.md)."),
]


def main() -> int:
    lines = ["# The seminar's claims, reproduced in miniature", "",
             "Each row is one claim of the seminar (`../shared/seed/DIGEST.md`), the seminar's number where it has "
             "one, what Chorus measured on the Shapes world with the command that measured it, and the verdict "
             "the study printed. Built by `python experiments/claims.py` from the records in `docs/records/`; the "
             "protocols are in each script's docstring (after claims_protocols.md).", "",
             "| claim | the seminar | Chorus (miniature) | verdict | command, record |", "|---|---|---|---|---|"]
    for claim, theirs, record, read, command in CLAIMS:
        r = load(record) if read else None
        if r is None:
            ours, verdict = "–", "not run" if read is None else "not run yet"
            cmd = command
        else:
            ours, verdict = read(r)
            cmd = f"`{r.get('command', command)}` — [{record}.json](records/{record}.json)"
        lines.append(f"| {claim} | {theirs} | {ours} | {verdict} | {cmd} |")
    lines += ["", "## Reading the table", ""]
    lines += [f"- **{k}.** {v}" for k, v in NOTES]
    lines.append("")
    (ROOT / "docs/claims.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
