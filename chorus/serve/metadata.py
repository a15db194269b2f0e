"""PNG metadata for the studio: Chorus's own chunks plus A1111's `parameters` infotext.

Every PNG the server makes carries
- the chunks `chorus generate` writes: one text chunk per setting and a `chorus` JSON chunk
  (so `chorus generate --from-png` reads it), and
- A1111's `parameters` chunk, the infotext every other tool reads::

      a red circle
      Negative prompt: blurry
      Steps: 20, Sampler: DPM++ 2M, CFG scale: 5, Seed: 0, Size: 64x64, Model: default

`chorus generate` writes the same chunks (its `_save_png` calls `infotext`; `Clip skip: N` is added
when the settings carry clip_skip > 1), and `chorus generate --from-png` reads `parameters` with
`parse_infotext` / `settings_from_a1111` when a PNG has no `chorus` chunk.

Note the sizes: Chorus's `size` setting is HxW (as `chorus generate --size`), A1111's `Size` is WxH.
Reading accepts `chorus` first, then `parameters`, then InvokeAI's `invokeai_metadata` (best effort).
"""
from __future__ import annotations

import io
import json
import re

from chorus.generate_cli import SETTINGS

# A1111 display name -> Chorus sampler name (A1111's `k_*` aliases are accepted too)
A1111_SAMPLERS = {
    "DPM++ 2M": "dpmpp_2m",
    "DPM++ 2M SDE": "dpmpp_2m_sde",
    "Euler a": "euler_a",
    "Euler": "euler",
    "Heun": "heun",
    "DDIM": "ddim",
    "DDPM": "ddpm",
}
CHORUS_TO_A1111 = {v: k for k, v in A1111_SAMPLERS.items()}
K_ALIASES = {"dpmpp_2m": ["k_dpmpp_2m"], "dpmpp_2m_sde": ["k_dpmpp_2m_sde"], "euler_a": ["k_euler_a", "k_euler_ancestral"],
             "euler": ["k_euler"], "heun": ["k_heun"], "ddim": [], "ddpm": []}
# A1111 >= 1.9 "Schedule type" -> Chorus's karras switch (None: the model's scheduler config decides)
SCHEDULES = {"automatic": None, "karras": True}


def sampler_label(name: str) -> str:
    return CHORUS_TO_A1111.get(name, name)


def resolve_sampler(name) -> tuple[str | None, bool | None]:
    """A sampler name as a client sends it -> (Chorus sampler or None if unknown, karras or None).

    Accepts Chorus names (`dpmpp_2m`), A1111 names in any case (`DPM++ 2M`), `k_*` aliases and
    A1111's pre-1.9 combined names (`DPM++ 2M Karras`)."""
    from chorus.samplers import SAMPLERS
    text = str(name).strip()
    karras = None
    if text.lower().endswith(" karras"):
        text, karras = text[: -len(" karras")].strip(), True
    low = text.lower()
    if low in SAMPLERS:
        return low, karras
    for label, chorus_name in A1111_SAMPLERS.items():
        if low == label.lower() or low in K_ALIASES.get(chorus_name, ()):
            return chorus_name, karras
    return None, None


# --- writing -----------------------------------------------------------------------------------
def _quote(value) -> str:
    """A1111's infotext quoting: values with , : or a newline become JSON strings."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _num(x) -> str:
    return f"{float(x):g}"


def infotext(settings: dict, model_name: str | None = None) -> str:
    """A1111's generation-info text for one image's Chorus settings."""
    h, w = (int(v) for v in str(settings["size"]).lower().split("x"))
    lines = [str(settings.get("prompt") or "")]
    if settings.get("negative"):
        lines.append(f"Negative prompt: {settings['negative']}")
    params = [("Steps", settings["steps"]), ("Sampler", sampler_label(settings["sampler"]))]
    if settings.get("karras"):
        params.append(("Schedule type", "Karras"))
    params += [("CFG scale", _num(settings["guidance"])), ("Seed", settings["seed"]), ("Size", f"{w}x{h}"),
               ("Model", model_name or settings.get("model_name") or settings.get("model") or "")]
    if int(settings.get("clip_skip") or 1) > 1:   # A1111 writes it only when it is not 1
        params.append(("Clip skip", int(settings["clip_skip"])))
    if settings.get("strength") is not None:
        params.append(("Denoising strength", _num(settings["strength"])))
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in params))
    return "\n".join(lines)


def make_png(image, settings: dict, info: str) -> bytes:
    """PNG bytes with Chorus's chunks (as `chorus generate` writes them) and A1111's `parameters`."""
    from PIL.PngImagePlugin import PngInfo
    png = PngInfo()
    for k in SETTINGS:
        png.add_text(k, "" if settings.get(k) is None else str(settings[k]))
    png.add_text("chorus", json.dumps(settings, sort_keys=True))
    png.add_itxt("parameters", info)  # iTXt: UTF-8, as A1111 writes non-Latin-1 prompts
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png)
    return buf.getvalue()


# --- reading -----------------------------------------------------------------------------------
_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_RE_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_infotext(text: str) -> dict:
    """A1111's `parse_generation_parameters`: {"Prompt", "Negative prompt", "Steps", ..., "Size-1", "Size-2"}."""
    res: dict = {}
    prompt, negative, in_negative = "", "", False
    *lines, last = text.strip().split("\n")
    if len(_RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        if in_negative:
            negative += ("\n" if negative else "") + line
        else:
            prompt += ("\n" if prompt else "") + line
    res["Prompt"], res["Negative prompt"] = prompt, negative
    for k, v in _RE_PARAM.findall(last):
        v = v.strip()
        if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
            try:
                v = json.loads(v)
            except ValueError:
                pass
        m = _RE_SIZE.match(v)
        if m:
            res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
        else:
            res[k] = v
    return res


def _int(v):
    try:
        return int(str(v).strip())
    except (TypeError, ValueError):
        return None


def _float(v):
    try:
        return float(str(v).strip())
    except (TypeError, ValueError):
        return None


def _str(v):
    return v if isinstance(v, str) else None


def settings_from_chorus(s: dict) -> dict:
    """Chorus chunk -> the studio's form fields."""
    out = {"prompt": _str(s.get("prompt")) or "", "negative": _str(s.get("negative")) or "",
           "seed": _int(s.get("seed")), "steps": _int(s.get("steps")), "sampler": _str(s.get("sampler")),
           "guidance": _float(s.get("guidance")), "model": _str(s.get("model_name")) or _str(s.get("model")),
           "karras": s.get("karras") if isinstance(s.get("karras"), bool) else None}
    if s.get("size"):
        parts = str(s["size"]).lower().split("x")
        if len(parts) == 2:
            out["height"], out["width"] = _int(parts[0]), _int(parts[1])
    if s.get("strength") is not None:
        out["strength"] = _float(s["strength"])
    return out


def settings_from_a1111(p: dict) -> tuple[dict, list[str]]:
    """Parsed A1111 parameters -> the studio's form fields, and the names of fields that did not map."""
    out = {"prompt": p.get("Prompt", ""), "negative": p.get("Negative prompt", ""), "seed": _int(p.get("Seed")),
           "steps": _int(p.get("Steps")), "guidance": _float(p.get("CFG scale")), "model": p.get("Model"),
           "width": _int(p.get("Size-1")), "height": _int(p.get("Size-2"))}
    unmapped = []
    if "Sampler" in p:
        name, karras = resolve_sampler(p["Sampler"])
        out["sampler"], out["karras"] = name, karras
        if name is None:
            unmapped.append(f"Sampler: {p['Sampler']}")
    sched = p.get("Schedule type")
    if sched is not None:
        if sched.lower() in SCHEDULES:
            out["karras"] = SCHEDULES[sched.lower()]
        else:
            unmapped.append(f"Schedule type: {sched}")
    if "Denoising strength" in p:
        out["strength"] = _float(p["Denoising strength"])
    known = {"Prompt", "Negative prompt", "Seed", "Steps", "CFG scale", "Model", "Size-1", "Size-2", "Sampler",
             "Schedule type", "Denoising strength", "Model hash", "Version"}
    unmapped += [k for k in p if k not in known]
    return out, unmapped


def settings_from_invokeai(m: dict) -> dict:
    model = m.get("model")
    return {"prompt": _str(m.get("positive_prompt")) or "", "negative": _str(m.get("negative_prompt")) or "",
            "seed": _int(m.get("seed")), "steps": _int(m.get("steps")), "guidance": _float(m.get("cfg_scale")),
            "width": _int(m.get("width")), "height": _int(m.get("height")),
            "model": _str(model.get("name")) if isinstance(model, dict) else _str(model),
            "strength": _float(m.get("strength")) if m.get("strength") is not None else None}


def read_png_info(image) -> dict:
    """What a PNG says about how it was made: A1111's png-info answer plus the studio's form fields.

    {"info": infotext, "items": {other text chunks}, "parameters": parsed infotext,
     "settings": form fields, "source": "chorus" | "parameters" | "invokeai" | None, "unmapped": [...]}"""
    chunks = {k: v for k, v in (getattr(image, "text", None) or image.info or {}).items() if isinstance(v, str)}
    info = chunks.pop("parameters", None)
    source, settings, unmapped = None, {}, []
    if "chorus" in chunks:
        try:
            chorus = json.loads(chunks["chorus"])
        except ValueError:
            chorus = None
        if isinstance(chorus, dict):
            source, settings = "chorus", settings_from_chorus(chorus)
            if info is None and chorus.get("size") and chorus.get("steps") is not None:
                try:
                    info = infotext(chorus)
                except (KeyError, ValueError, TypeError):
                    pass
    parameters = parse_infotext(info) if info else {}
    if source is None and info:
        source = "parameters"
        settings, unmapped = settings_from_a1111(parameters)
    if source is None and "invokeai_metadata" in chunks:
        try:
            meta = json.loads(chunks["invokeai_metadata"])
            if isinstance(meta, dict):
                source, settings = "invokeai", settings_from_invokeai(meta)
        except ValueError:
            pass
    if source is None and ("prompt" in chunks and "workflow" in chunks):
        unmapped.append("ComfyUI workflow (prompt/workflow chunks): not read")
    settings = {k: v for k, v in settings.items() if v is not None}
    return {"info": info or "", "items": chunks, "parameters": parameters, "settings": settings, "source": source,
            "unmapped": unmapped}
