"""The studio's engine: one worker thread owns the pipeline; jobs wait in a bounded FIFO queue.

Everything that generates (the page, `/api/jobs`, A1111's `/sdapi/v1/*`, OpenAI's `/v1/images/*`)
goes through `Engine.submit`, so one model and one generation run at a time by construction.

A job is `queued` → `running` → `done` | `error` | `interrupted`. While it runs, the pipeline's
callback (called after every sampler step with the step index `i` and the current estimate of the
clean latent `denoised`, x̂0) updates `step`, decodes a JPEG preview every few steps, and checks
the job's interrupt event; a set event raises `_Interrupted`, which unwinds the sampler. Images a
job finished are kept (in the job and in the server's gallery) whatever happens afterwards.

This module needs no web framework: `chorus.serve.app` puts HTTP in front of it.
"""
from __future__ import annotations

import io
import math
import random
import re
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from chorus.errors import ChorusError
from chorus.models.io import read_json

MAX_PROMPT = 10_000      # characters, prompt and negative prompt each
MAX_STEPS = 150
MAX_SIDE = 2048          # pixels
MAX_IMAGES = 16          # images per job
MAX_SEED = 2 ** 63 - 1 - MAX_IMAGES
PREVIEW_SIDE = 256       # previews are JPEGs at most this big


class ApiError(Exception):
    """A request the server refuses: an HTTP status and a one-line message naming what was wrong."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class QueueFull(ApiError):
    def __init__(self, size: int):
        super().__init__(429, f"The queue is full ({size} jobs waiting); try again when a job has finished.")


class _Interrupted(Exception):
    """Raised inside the pipeline callback to stop the sampler."""


# --- models ------------------------------------------------------------------------------------
@dataclass
class ModelEntry:
    """A model the server offers: a diffusers-format folder, under a short name."""

    name: str
    spec: str            # what Pipeline.from_pretrained gets: "default" or the folder's absolute path
    path: Path
    size_multiple: int   # image sides must be multiples of this
    default_size: int
    steps: int           # the model's recommended sampling settings (chorus.pipeline.recommended_settings)
    guidance: float

    def to_json(self) -> dict:
        return {"name": self.name, "path": str(self.path), "default_size": self.default_size,
                "size_multiple": self.size_multiple, "steps": self.steps, "guidance": self.guidance}


def model_entry(spec: str, name: str | None = None) -> ModelEntry:
    """Check a model folder (or 'default') and read its geometry from the configs, loading no weights."""
    if str(spec) == "default":
        from chorus.pipeline import default_model_path
        path, spec, name = default_model_path(), "default", name or "default"
    else:
        path = Path(spec).expanduser().resolve()
        spec = str(path)
        if not (path / "model_index.json").is_file():
            raise ChorusError(f"{path} is not a diffusers-format pipeline folder (it has no model_index.json); "
                              "pass --model default or a folder made by `chorus train` or diffusers' save_pretrained.")
        name = name or path.name
    try:
        unet, vae = read_json(path / "unet" / "config.json"), read_json(path / "vae" / "config.json")
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        multiple = factor * 2 ** (len(unet["block_out_channels"]) - 1)
        sample = unet.get("sample_size", 64)
        sample = sample[0] if isinstance(sample, (list, tuple)) else int(sample)
    except (ChorusError, OSError, KeyError, TypeError, ValueError) as e:
        raise ChorusError(f"Cannot read the UNet and VAE configs of {path} ({e}).") from None
    from chorus.pipeline import read_sampling_defaults, recommended_settings
    return ModelEntry(name, spec, path, multiple, sample * factor, *recommended_settings(read_sampling_defaults(path)))


def unique_models(specs: list[str]) -> list[ModelEntry]:
    entries: list[ModelEntry] = []
    for spec in specs:
        e = model_entry(spec)
        if any(x.spec == e.spec for x in entries):
            continue
        base, k = e.name, 2
        while any(x.name == e.name for x in entries):
            e.name, k = f"{base}-{k}", k + 1
        entries.append(e)
    return entries


# --- requests ----------------------------------------------------------------------------------
@dataclass
class GenRequest:
    """One validated generation request: what the worker runs."""

    prompt: str
    model: str
    negative: str | None = None
    sampler: str = "dpmpp_2m"
    karras: bool | None = None
    steps: int = 20
    guidance: float = 5.0
    seed: int = 0
    width: int = 64
    height: int = 64
    n: int = 1
    init_image: object = None        # a PIL image for img2img (dropped when the job ends)
    strength: float | None = None    # img2img only
    kind: str = "txt2img"            # or "img2img"
    edit_method: str = "sdedit"      # img2img: sdedit (noise to strength) or pnp (Plug-and-Play, chorus.controls)
    tau_f: float = 0.8               # pnp: share of steps with feature injection
    tau_attn: float = 0.5            # pnp: share of steps with self-attention injection
    inversion_steps: int = 200       # pnp: DDIM inversion steps
    controlnet: str | None = None    # a ControlNet folder / file or default-<condition> (a control of this job)
    control_image: object = None     # its condition image (PIL)
    control_scale: float = 1.0

    @property
    def run_steps(self) -> int:
        """Sampler steps per image: img2img runs only the last int(steps·strength) steps (Plug-and-Play all)."""
        if self.kind != "img2img" or self.edit_method == "pnp" or self.strength is None or self.strength >= 1.0:
            return self.steps
        return min(int(self.steps * self.strength), self.steps)


def _field(name, value, kind, default=None):
    if value is None or (isinstance(value, str) and value.strip() == "" and kind is not str):
        return default
    if kind is int:
        if isinstance(value, bool):
            raise ApiError(422, f"{name} must be a whole number, got {value!r}.")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            return int(value)
        raise ApiError(422, f"{name} must be a whole number, got {value!r}.")
    if kind is float:
        if isinstance(value, bool):
            raise ApiError(422, f"{name} must be a number, got {value!r}.")
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise ApiError(422, f"{name} must be a number, got {value!r}.") from None
        if not math.isfinite(x):
            raise ApiError(422, f"{name} must be a finite number, got {value!r}.")
        return x
    if kind is str:
        if not isinstance(value, str):
            raise ApiError(422, f"{name} must be a string, got {type(value).__name__}.")
        return value
    raise AssertionError(kind)


def build_request(engine: "Engine", *, prompt, negative=None, model=None, sampler=None, scheduler=None, steps=None,
                  guidance=None, seed=None, width=None, height=None, n=None, init_image=None, strength=None,
                  edit_method=None, tau_f=None, tau_attn=None, inversion_steps=None, controlnet=None,
                  control_image=None, control_scale=None, names: dict | None = None) -> GenRequest:
    """Validate raw client values into a GenRequest; ApiError(422) naming the bad field otherwise.

    `names` maps our field names to the client's (e.g. guidance -> cfg_scale) for the messages."""
    from chorus.serve.metadata import SCHEDULES, resolve_sampler
    nm = {"prompt": "prompt", "negative": "negative", "model": "model", "sampler": "sampler", "steps": "steps",
          "guidance": "guidance", "seed": "seed", "width": "width", "height": "height", "n": "n",
          "strength": "strength", "scheduler": "scheduler", "init_image": "init_image", **(names or {})}
    if prompt is None:
        raise ApiError(422, f"{nm['prompt']} is missing: give a text prompt.")
    prompt = _field(nm["prompt"], prompt, str)
    negative = _field(nm["negative"], negative, str) or None
    for key, text in (("prompt", prompt), ("negative", negative or "")):
        if len(text) > MAX_PROMPT:
            raise ApiError(422, f"{nm[key]} is {len(text):,} characters long; the limit is {MAX_PROMPT:,}.")
    model_name = engine.resolve_model(_field(nm["model"], model, str))
    entry = engine.models[model_name]
    karras = None
    if sampler is None or (isinstance(sampler, str) and not sampler.strip()):
        sampler_name = "dpmpp_2m"
    else:
        sampler_name, karras = resolve_sampler(_field(nm["sampler"], sampler, str))
        if sampler_name is None:
            from chorus.serve.metadata import A1111_SAMPLERS
            raise ApiError(422, f"Unknown {nm['sampler']} {sampler!r}; the samplers are: "
                                f"{', '.join(A1111_SAMPLERS)} (or Chorus's names: {', '.join(A1111_SAMPLERS.values())}).")
    if scheduler is not None and str(scheduler).strip():
        key = _field(nm["scheduler"], scheduler, str).strip().lower()
        if key not in SCHEDULES:
            raise ApiError(422, f"Unknown {nm['scheduler']} {scheduler!r}; Chorus offers: Automatic, Karras.")
        karras = SCHEDULES[key] if SCHEDULES[key] is not None else karras
    steps = _field(nm["steps"], steps, int, entry.steps)     # not given: the model's recommendation
    if not 1 <= steps <= MAX_STEPS:
        raise ApiError(422, f"{nm['steps']} must be between 1 and {MAX_STEPS}, got {steps}.")
    guidance = _field(nm["guidance"], guidance, float, entry.guidance)
    if not 0.0 <= guidance <= 100.0:
        raise ApiError(422, f"{nm['guidance']} must be between 0 and 100, got {guidance:g}.")
    seed = _field(nm["seed"], seed, int, -1)
    if seed < -1 or seed > MAX_SEED:
        raise ApiError(422, f"{nm['seed']} must be -1 (random) or between 0 and {MAX_SEED}, got {seed}.")
    if seed == -1:
        seed = random.randrange(2 ** 32)
    m = entry.size_multiple
    sides = {}
    for key, value in (("width", width), ("height", height)):
        v = _field(nm[key], value, int, entry.default_size)
        if v <= 0 or v > MAX_SIDE or v % m:
            ok = min(MAX_SIDE, max(m, round(v / m) * m))
            raise ApiError(422, f"{nm[key]} {v} is not usable: sides must be positive multiples of {m} for model "
                                f"{model_name!r}, at most {MAX_SIDE} (try {ok}).")
        sides[key] = v
    n = _field(nm["n"], n, int, 1)
    if not 1 <= n <= MAX_IMAGES:
        raise ApiError(422, f"{nm['n']} (images per request) must be between 1 and {MAX_IMAGES}, got {n}.")
    if init_image is not None:
        strength = _field(nm["strength"], strength, float, 0.75)
        if not 0.0 < strength <= 1.0:
            raise ApiError(422, f"{nm['strength']} must be in (0, 1], got {strength:g}.")
        if min(int(steps * strength), steps) < 1:
            raise ApiError(422, f"{nm['strength']} {strength:g} × {steps} steps leaves no step to run; raise "
                                f"{nm['steps']} or {nm['strength']}.")
        init_image = init_image.convert("RGB")
        if init_image.size != (sides["width"], sides["height"]):
            from PIL import Image
            init_image = init_image.resize((sides["width"], sides["height"]), Image.LANCZOS)
    else:
        strength = None
    edit = {"edit_method": _field("edit_method", edit_method, str, "sdedit")}
    if edit["edit_method"] not in ("sdedit", "pnp"):
        raise ApiError(422, f"edit_method must be sdedit or pnp (Plug-and-Play), got {edit['edit_method']!r}.")
    for key, value, default in (("tau_f", tau_f, 0.8), ("tau_attn", tau_attn, 0.5)):
        edit[key] = _field(key, value, float, default)
        if not 0.0 <= edit[key] <= 1.0:
            raise ApiError(422, f"{key} is a fraction of the steps and must be in [0, 1], got {edit[key]:g}.")
    edit["inversion_steps"] = _field("inversion_steps", inversion_steps, int, 200)
    if not 1 <= edit["inversion_steps"] <= MAX_STEPS * 10:
        raise ApiError(422, f"inversion_steps must be between 1 and {MAX_STEPS * 10}, got {edit['inversion_steps']}.")
    if edit["edit_method"] == "pnp" and init_image is None:
        raise ApiError(422, "edit_method pnp edits an image: give init_image.")
    controlnet = _field("controlnet", controlnet, str) or None
    if controlnet is not None:
        from chorus.paths import resolve_controlnet
        if not Path(resolve_controlnet(controlnet)).exists():
            raise ApiError(422, f"controlnet {controlnet!r} is neither a folder or file nor a shipped name "
                                "(default-layout).")
        if control_image is None:
            raise ApiError(422, "controlnet needs control_image (the condition image: edges, a layout, …).")
        edit["controlnet"], edit["control_image"] = controlnet, control_image.convert("RGB")
        edit["control_scale"] = _field("control_scale", control_scale, float, 1.0)
        if not 0.0 <= edit["control_scale"] <= 10.0:
            raise ApiError(422, f"control_scale must be between 0 and 10, got {edit['control_scale']:g}.")
    elif control_image is not None:
        raise ApiError(422, "control_image was given without a controlnet.")
    return GenRequest(prompt=prompt, model=model_name, negative=negative, sampler=sampler_name, karras=karras,
                      steps=steps, guidance=guidance, seed=seed, width=sides["width"], height=sides["height"], n=n,
                      init_image=init_image, strength=strength,
                      kind="img2img" if init_image is not None else "txt2img", **edit)


def decode_image(data, field_name: str):
    """A base64 (or data-URL) PNG / JPEG / WebP from a JSON field -> a PIL image; ApiError(422) otherwise."""
    import base64
    import binascii
    from PIL import Image
    if not isinstance(data, str) or not data.strip():
        raise ApiError(422, f"{field_name} must be a base64-encoded PNG (a string), got {type(data).__name__}.")
    text = data.strip()
    if text.startswith("data:"):
        text = text.split(",", 1)[1] if "," in text else ""
    try:
        raw = base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{field_name} is not valid base64.") from None
    if not raw:
        raise ApiError(422, f"{field_name} is not valid base64 (it decodes to nothing).")
    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.format not in ("PNG", "JPEG", "WEBP"):
                raise ApiError(422, f"{field_name} is a {im.format} image; send a PNG (or JPEG / WebP).")
            w, h = im.size
            if w * h > MAX_SIDE * MAX_SIDE * 4:
                raise ApiError(422, f"{field_name} is {w}x{h} pixels, too big (the limit is {4 * MAX_SIDE ** 2:,}).")
            im.load()
            return im.copy() if im.format != "PNG" else _png_copy(im)
    except ApiError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise ApiError(422, f"{field_name} is not a PNG image (base64 of PNG bytes expected).") from None


def _png_copy(im):
    """A loaded copy that keeps the PNG's text chunks (Image.copy() drops `.text`)."""
    out = im.copy()
    out.info = dict(im.info)
    out.text = dict(getattr(im, "text", {}) or {})
    return out


# --- jobs --------------------------------------------------------------------------------------
@dataclass
class Result:
    job_id: str
    index: int
    png: bytes
    seed: int
    settings: dict
    infotext: str
    created: float = field(default_factory=time.time)

    def to_json(self) -> dict:
        return {"job": self.job_id, "index": self.index, "url": f"/api/jobs/{self.job_id}/images/{self.index}",
                "seed": self.seed, "settings": self.settings, "infotext": self.infotext, "created": self.created}


class Job:
    STATES = ("queued", "running", "done", "error", "interrupted")

    def __init__(self, request: GenRequest, source: str = "api"):
        self.id = uuid.uuid4().hex[:12]
        self.request, self.source = request, source
        self.state = "queued"
        self.created, self.started, self.finished_at = time.time(), None, None
        self.step, self.steps = 0, request.run_steps
        self.image_index, self.images = 0, request.n
        self.preview: bytes | None = None
        self.preview_step: int | None = None
        self.results: list[Result] = []
        self.error: str | None = None
        self.error_status = 500
        self.interrupt_reason: str | None = None
        self.cancel = threading.Event()
        self.done = threading.Event()
        self.version = 0          # bumped on every change, for pollers (SSE)

    def touch(self):
        self.version += 1

    @property
    def finished(self) -> bool:
        return self.done.is_set()

    @property
    def progress(self) -> float:
        if self.state == "done":
            return 1.0
        total = max(1, self.images * self.steps)
        return min(1.0, (self.image_index * self.steps + self.step) / total)

    @property
    def eta(self) -> float | None:
        if self.started is None or self.progress <= 0:
            return None
        elapsed = (self.finished_at or time.time()) - self.started
        return max(0.0, elapsed / self.progress - elapsed)

    def to_json(self, position: int | None = None) -> dict:
        r = self.request
        return {"id": self.id, "state": self.state, "kind": r.kind, "position": position,
                "step": self.step, "steps": self.steps, "image": self.image_index, "images": self.images,
                "progress": round(self.progress, 4), "eta": None if self.eta is None else round(self.eta, 2),
                "error": self.error, "interrupt_reason": self.interrupt_reason,
                "created": self.created, "started": self.started, "finished": self.finished_at,
                "preview": f"/api/jobs/{self.id}/preview" if self.preview else None,
                "request": {"prompt": r.prompt, "negative": r.negative or "", "model": r.model, "sampler": r.sampler,
                            "karras": r.karras, "steps": r.steps, "guidance": r.guidance, "seed": r.seed,
                            "width": r.width, "height": r.height, "n": r.n, "strength": r.strength},
                "results": [x.to_json() for x in self.results]}


# --- the engine --------------------------------------------------------------------------------
class Engine:
    """The worker thread, its bounded queue, the jobs and the gallery."""

    def __init__(self, models: list[ModelEntry], queue_size: int = 16, preview_every: int | None = None,
                 loader=None, log=None, device=None, dtype=None, compile: bool = False):
        if not models:
            raise ChorusError("The server needs at least one model.")
        # where and how every model runs once loaded (Pipeline.to / Pipeline.compile); checked up front
        from chorus.devices import resolve_device, resolve_dtype
        self.device = resolve_device(device) if device is not None else None
        self.dtype = resolve_dtype(dtype) if dtype is not None else None
        self.compile = compile
        if queue_size < 1:
            raise ChorusError(f"--queue-size must be at least 1, got {queue_size}.")
        self.models = {m.name: m for m in models}
        self.current = models[0].name
        self.queue_size = queue_size
        self.preview_every = preview_every       # None: about 5 previews per image
        self._loader = loader
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.jobs: dict[str, Job] = {}
        self.gallery: list[Result] = []
        self.running: Job | None = None
        self.last_job: Job | None = None
        self.loading: str | None = None
        self.load_error: str | None = None
        self._pipe = None
        self._controlnets: dict = {}   # ControlNets of jobs, by name, loaded once
        self._pipe_name: str | None = None
        self._cv = threading.Condition()
        self._pending: deque[Job] = deque()
        self._paused = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._preload = False
        self._failed_load: str | None = None

    # --- models ---
    def resolve_model(self, name: str | None) -> str:
        """A model name as a client sends it (name, A1111 title 'name [hash]', path) -> our name; 422 if unknown."""
        if name is None or not str(name).strip():
            return self.current
        text = str(name).strip()
        if text in self.models:
            return text
        bare = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", text)
        for key in (bare, Path(bare).stem, Path(bare).name):
            if key in self.models:
                return key
        for m in self.models.values():
            if text in (m.spec, str(m.path)):
                return m.name
        raise ApiError(422, f"Unknown model {text!r}; the models are: {', '.join(self.models)}.")

    def set_current_model(self, name) -> str:
        name = self.resolve_model(name)
        with self._cv:
            self.current = name
            self._failed_load = None
            self._cv.notify_all()   # an idle worker loads it now
        return name

    def _get_pipe(self, name: str):
        if self._pipe_name == name and self._pipe is not None:
            return self._pipe
        entry = self.models[name]
        self._pipe, self._pipe_name = None, None    # at most one model in memory
        self.loading, self.load_error = name, None
        try:
            t0 = time.time()
            if self._loader is not None:
                pipe = self._loader(entry)
            else:
                from chorus.pipeline import Pipeline
                pipe = Pipeline.from_pretrained(entry.spec)
            if self.device is not None or self.dtype is not None:
                pipe.to(device=self.device, dtype=self.dtype)
            if self.compile:
                pipe.compile()
            self._log(f"chorus serve: loaded model {name!r} ({entry.path}) in {time.time() - t0:.1f} s")
        except Exception as e:
            self.load_error = f"{name}: {e}"
            raise
        finally:
            self.loading = None
        self._pipe, self._pipe_name = pipe, name
        return pipe

    # --- queue ---
    def submit(self, request: GenRequest, source: str = "api") -> Job:
        job = Job(request, source)
        with self._cv:
            if self._stopping:
                raise ApiError(503, "The server is shutting down.")
            if len(self._pending) >= self.queue_size:
                raise QueueFull(self.queue_size)
            self.jobs[job.id] = job
            self._pending.append(job)
            self.last_job = job
            self._cv.notify_all()
        return job

    def position(self, job: Job) -> int | None:
        """0 for the running job, 1… for queued ones, None when finished."""
        with self._cv:
            if job is self.running:
                return 0
            try:
                return self._pending.index(job) + 1
            except ValueError:
                return None

    def pending_count(self) -> int:
        with self._cv:
            return len(self._pending)

    def interrupt(self, job: Job, reason: str = "interrupted") -> bool:
        """Stop a job: a queued one leaves the queue at once; a running one stops at its next step."""
        with self._cv:
            if job.finished:
                return False
            job.interrupt_reason = reason
            if job in self._pending:
                self._pending.remove(job)
                self._finish(job, "interrupted")
                return True
            job.cancel.set()
            job.touch()
            return True

    def interrupt_current(self, reason: str = "interrupted") -> Job | None:
        job = self.running
        if job is not None:
            self.interrupt(job, reason)
        return job

    def pause(self):
        """Hold the worker before its next job (maintenance, tests); queued jobs wait."""
        with self._cv:
            self._paused = True

    def resume(self):
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    def _finish(self, job: Job, state: str):
        job.request.init_image = None      # the results keep what matters; the server keeps every job
        job.state = state
        job.finished_at = time.time()
        job.touch()
        job.done.set()

    # --- the worker ---
    def start(self, preload: bool = True) -> "Engine":
        self._preload = preload
        self._thread = threading.Thread(target=self._work, name="chorus-serve-worker", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0):
        with self._cv:
            self._stopping = True
            pending, self._pending = list(self._pending), deque()
            for job in pending:
                job.interrupt_reason = "server stopped"
                self._finish(job, "interrupted")
            if self.running is not None:
                self.running.interrupt_reason = "server stopped"
                self.running.cancel.set()
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _next_job(self) -> Job | None:
        while True:
            load = None
            with self._cv:
                if self._stopping:
                    return None
                if self._pending and not self._paused:
                    job = self._pending.popleft()
                    self.running = job
                    return job
                if not self._pending and self._preload and self._pipe_name != self.current \
                        and self._failed_load != self.current:
                    load = self.current        # idle: load the current model now
                else:
                    self._cv.wait(0.5)
            if load is not None:
                try:
                    self._get_pipe(load)
                except Exception as e:  # reported again by the next job that needs it
                    self._failed_load = load
                    self._log(f"chorus serve: could not load model {load!r}: {e}")

    def _work(self):
        while True:
            job = self._next_job()
            if job is None:
                return
            try:
                self._run(job)
            except Exception:  # never let the worker die
                self._log(traceback.format_exc())
            finally:
                with self._cv:
                    self.running = None

    def _run(self, job: Job):
        r = job.request
        job.state, job.started = "running", time.time()
        job.touch()
        try:
            if job.cancel.is_set():
                raise _Interrupted
            pipe = self._get_pipe(r.model)
            entry = self.models[r.model]
            every = self.preview_every if self.preview_every is not None else max(1, job.steps // 5)
            init = r.init_image

            def callback(d):
                if job.cancel.is_set():
                    raise _Interrupted
                i = int(d["i"])
                job.step = i + 1
                if every > 0 and i % every == 0 and job.step < job.steps:
                    preview = self._preview(pipe, d["denoised"])
                    if preview is not None:
                        job.preview, job.preview_step = preview, job.step
                job.touch()

            saved_controls = list(pipe.base.controls)
            if r.controlnet:
                pipe.base.controls = [self._controlnet(r.controlnet)]
            try:
                self._images(job, pipe, entry, init, callback)
            finally:
                pipe.base.controls = saved_controls
            self._finish(job, "done")
        except _Interrupted:
            job.interrupt_reason = job.interrupt_reason or "interrupted"
            self._finish(job, "interrupted")
        except ChorusError as e:
            job.error, job.error_status = str(e), 422
            self._finish(job, "error")
        except Exception as e:
            self._log(f"chorus serve: job {job.id} failed:\n{traceback.format_exc()}")
            job.error, job.error_status = f"internal error: {type(e).__name__}: {e}", 500
            self._finish(job, "error")

    def _controlnet(self, name: str):
        """A ControlNet by name, loaded once and kept (they are small beside their base)."""
        cache = self._controlnets
        if name not in cache:
            from chorus.formats.single_file import load_controlnet
            from chorus.paths import resolve_controlnet
            cache[name] = load_controlnet(resolve_controlnet(name))
        return cache[name]

    def _images(self, job, pipe, entry, init, callback):
        import torch
        from chorus.serve.metadata import infotext, make_png
        r = job.request
        for k in range(r.n):
            if job.cancel.is_set():
                raise _Interrupted
            job.image_index, job.step = k, 0
            job.touch()
            seed = r.seed + k
            extra = {}
            if r.controlnet:
                extra = {"control_image": r.control_image, "controlnet_conditioning_scale": r.control_scale}
            if r.kind == "img2img" and r.edit_method == "pnp":   # the inversion is shared by the n images
                inversion = getattr(job, "inversion", None)
                out = pipe.edit(init, r.prompt, method="pnp", tau_f=r.tau_f, tau_attn=r.tau_attn,
                                inversion_steps=r.inversion_steps, num_inference_steps=r.steps,
                                guidance_scale=r.guidance, negative_prompt=r.negative, seed=seed,
                                inversion=inversion, callback=callback, progress=False, **extra)
                job.inversion = out.inversion
            else:
                out = pipe(r.prompt, negative_prompt=r.negative, num_inference_steps=r.steps,
                           guidance_scale=r.guidance, height=r.height, width=r.width,
                           generator=torch.Generator("cpu").manual_seed(seed), sampler=r.sampler,
                           karras=r.karras, image=init, strength=r.strength if r.strength is not None else 1.0,
                           callback=callback, progress=False, **extra)
            settings = {"prompt": r.prompt, "negative": r.negative, "seed": seed, "steps": r.steps,
                        "sampler": r.sampler, "guidance": r.guidance, "size": f"{r.height}x{r.width}",
                        "model": entry.spec, "model_name": entry.name, "refiner": None, "controlnet": None,
                        "control_image": None, "control_scale": 1.0, "original_size": None, "crop": None}
            if r.karras is not None:
                settings["karras"] = r.karras
            if r.controlnet:
                settings["controlnet"], settings["control_scale"] = r.controlnet, r.control_scale
            if r.kind == "img2img":
                settings["mode"], settings["strength"] = "img2img", r.strength
                if r.edit_method == "pnp":
                    settings.update(mode="edit", method="pnp", tau_f=r.tau_f, tau_attn=r.tau_attn,
                                    inversion_steps=r.inversion_steps, sampler="ddim")
            info = infotext(settings, entry.name)
            result = Result(job.id, k, make_png(out.images[0], settings, info), seed, settings, info)
            with self._cv:
                job.results.append(result)
                self.gallery.append(result)
            job.step = job.steps
            job.touch()

    @staticmethod
    def _preview(pipe, denoised) -> bytes | None:
        """x̂0 of the first image decoded by the VAE, as a JPEG of at most PREVIEW_SIDE pixels a side."""
        try:
            from chorus.pipeline import _to_pil
            import torch
            with torch.no_grad():
                im = _to_pil(pipe.decode(denoised[:1]))[0]
            if max(im.size) > PREVIEW_SIDE:
                im.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
            return buf.getvalue()
        except Exception:
            return None

    # --- status for /sdapi/v1/progress ---
    def status(self) -> dict:
        with self._cv:
            job = self.running
            return {"job": job, "pending": len(self._pending), "loading": self.loading}
