"""The studio's HTTP side: a Starlette app in front of one `Engine`.

Routes (every one under /api, /sdapi and /v1 answers JSON, errors as {"error": "..."}):

  page         GET  /                       the studio (static HTML/JS/CSS from chorus/serve/static/)
  Chorus       GET  /api/info               models, samplers, defaults, limits
               POST /api/jobs               queue a job → 202 {id, state, position, …}
               GET  /api/jobs               recent jobs
               GET  /api/jobs/{id}          a job's state, step/steps, results
               GET  /api/jobs/{id}/events   SSE: progress (with a preview data URL), done | error | interrupted
               POST /api/jobs/{id}/interrupt
               GET  /api/jobs/{id}/preview  the latest preview (JPEG)
               GET  /api/jobs/{id}/images/{i}  a result (PNG with Chorus and A1111 metadata)
               GET  /api/gallery            every image made since the server started
  A1111        POST /sdapi/v1/txt2img, /sdapi/v1/img2img (synchronous; a client that goes away frees its job)
               GET  /sdapi/v1/progress, POST /sdapi/v1/interrupt, GET /sdapi/v1/sd-models, /samplers,
               /schedulers, /upscalers, /latent-upscale-modes, /sd-vae, /loras, GET/POST /sdapi/v1/options,
               POST /sdapi/v1/png-info
  OpenAI       POST /v1/images/generations, GET /v1/models

With an API key every /api, /sdapi and /v1 request needs `Authorization: Bearer KEY` (HTTP Basic
with the key as the password is accepted too, for A1111 clients); the page itself is public and asks
for the key.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from chorus.serve.engine import MAX_IMAGES, MAX_PROMPT, MAX_SIDE, MAX_STEPS, ApiError, Engine, Job, _field, \
    build_request, decode_image
from chorus.serve.metadata import A1111_SAMPLERS, K_ALIASES, read_png_info, sampler_label

STATIC = Path(__file__).parent / "static"
MAX_BODY = 64 * 1024 * 1024
PROTECTED = ("/api", "/sdapi/", "/v1/")
CSP = ("default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; style-src 'self'; script-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{_b64(data)}"


async def read_json(request: Request, empty_ok: bool = False) -> dict:
    """The request body as a JSON object: 400 if malformed, 413 if too big."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > MAX_BODY:
        raise ApiError(413, f"The request body is {int(length):,} bytes; the limit is {MAX_BODY:,}.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise ApiError(413, f"The request body is over the limit of {MAX_BODY:,} bytes.")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        if empty_ok:
            return {}
        raise ApiError(400, "The request body is empty; send a JSON object.")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"The request body is not valid JSON ({e}).") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"The request body must be a JSON object, got a JSON {type(data).__name__}.")
    return data


class AuthMiddleware:
    """Bearer-key check for the API paths (pure ASGI, so streaming and disconnects pass through untouched)."""

    def __init__(self, app, key: str | None):
        self.app, self.key = app, key

    def _ok(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer":
            return hmac.compare_digest(value.encode(), self.key.encode())
        if scheme.lower() == "basic":
            try:
                _, _, password = base64.b64decode(value).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                return False
            return hmac.compare_digest(password.encode(), self.key.encode())
        return False

    async def __call__(self, scope, receive, send):
        if self.key and scope["type"] == "http" and scope["path"].startswith(PROTECTED):
            header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), "")
            if not self._ok(header):
                response = JSONResponse({"error": "This server needs an API key: send `Authorization: Bearer KEY` "
                                                  "(the key given to `chorus serve --api-key`)."}, status_code=401,
                                        headers={"WWW-Authenticate": 'Bearer realm="chorus"'})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine: Engine, api_key: str | None = None, manage_engine: bool = True) -> Starlette:
    """The ASGI app. With manage_engine the app's lifespan starts the engine's worker (if not started)
    and stops it on shutdown."""

    # --- helpers ---
    def job_or_404(request: Request) -> Job:
        job = engine.jobs.get(request.path_params["id"])
        if job is None:
            raise ApiError(404, f"No job {request.path_params['id']!r} (job ids are shown by POST /api/jobs).")
        return job

    def job_json(job: Job) -> dict:
        data = job.to_json(engine.position(job))
        data["loading"] = engine.loading if not job.finished else None   # a model being loaded first
        return data

    async def wait_for(job: Job, request: Request):
        """Wait for a job; if the client goes away first, interrupt it (its finished images stay in the gallery)."""
        while not job.done.is_set():
            if await request.is_disconnected():
                engine.interrupt(job, "client disconnected")
                return
            await asyncio.sleep(0.05)

    def int_field(body: dict, key: str, default: int) -> int:
        return _field(key, body.get(key), int, default)

    # --- the page ---
    async def index(request: Request):
        return FileResponse(STATIC / "index.html", media_type="text/html",
                            headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})

    # --- Chorus API ---
    async def info(request: Request):
        return JSONResponse({
            "version": _version(), "current_model": engine.current,
            "models": [dict(m.to_json(), current=m.name == engine.current) for m in engine.models.values()],
            "samplers": [{"name": v, "label": k} for k, v in A1111_SAMPLERS.items()],
            "defaults": {"sampler": "dpmpp_2m", "steps": engine.models[engine.current].steps,
                         "guidance": engine.models[engine.current].guidance, "seed": -1, "n": 1, "strength": 0.75},
            "limits": {"steps": MAX_STEPS, "side": MAX_SIDE, "images": MAX_IMAGES, "prompt": MAX_PROMPT},
            "queue_size": engine.queue_size, "pending": engine.pending_count(), "auth": bool(api_key)})

    async def create_job(request: Request):
        body = await read_json(request)
        init = body.get("init_image")
        init = decode_image(init, "init_image") if init not in (None, "") else None
        cimg = body.get("control_image")
        cimg = decode_image(cimg, "control_image") if cimg not in (None, "") else None
        req = build_request(engine, prompt=body.get("prompt"), negative=body.get("negative"), model=body.get("model"),
                            sampler=body.get("sampler"), scheduler=body.get("scheduler"), steps=body.get("steps"),
                            guidance=body.get("guidance"), seed=body.get("seed"), width=body.get("width"),
                            height=body.get("height"), n=body.get("n", body.get("batch")), init_image=init,
                            strength=body.get("strength"), edit_method=body.get("edit_method"),
                            tau_f=body.get("tau_f"), tau_attn=body.get("tau_attn"),
                            inversion_steps=body.get("inversion_steps"), controlnet=body.get("controlnet"),
                            control_image=cimg, control_scale=body.get("control_scale"))
        job = engine.submit(req, "page" if body.get("source") == "page" else "api")
        return JSONResponse(job_json(job), status_code=202)

    async def list_jobs(request: Request):
        jobs = list(engine.jobs.values())[-100:]
        return JSONResponse({"jobs": [job_json(j) for j in jobs], "pending": engine.pending_count()})

    async def get_job(request: Request):
        return JSONResponse(job_json(job_or_404(request)))

    async def interrupt_job(request: Request):
        job = job_or_404(request)
        engine.interrupt(job, "interrupted by request")
        return JSONResponse(job_json(job))

    async def job_preview(request: Request):
        job = job_or_404(request)
        if job.preview is None:
            raise ApiError(404, f"Job {job.id} has no preview yet.")
        return Response(job.preview, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    async def job_image(request: Request):
        job = job_or_404(request)
        i = request.path_params["index"]
        if not 0 <= i < len(job.results):
            raise ApiError(404, f"Job {job.id} has {len(job.results)} image(s); there is no image {i}.")
        r = job.results[i]
        return Response(r.png, media_type="image/png",
                        headers={"Content-Disposition": f'inline; filename="{r.seed:06d}-{job.id}-{i}.png"'})

    async def job_events(request: Request):
        job = job_or_404(request)

        async def stream():
            seen_version, seen_preview, seen_position, last_sent = -1, None, -2, time.time()
            yield "retry: 2000\n\n"
            while True:
                position = engine.position(job)
                if job.version != seen_version or position != seen_position:
                    seen_version, seen_position = job.version, position
                    data = job_json(job)
                    if job.finished:
                        data["images_data"] = [_data_url(r.png, "image/png") for r in job.results]
                        event = {"done": "done", "error": "error", "interrupted": "interrupted"}[job.state]
                        yield f"event: {event}\ndata: {json.dumps(data)}\n\n"
                        return
                    if job.preview is not None and job.preview_step != seen_preview:
                        seen_preview = job.preview_step
                        data["preview_data"] = _data_url(job.preview, "image/jpeg")
                    yield f"event: progress\ndata: {json.dumps(data)}\n\n"
                    last_sent = time.time()
                elif time.time() - last_sent > 15:
                    yield ": keep-alive\n\n"
                    last_sent = time.time()
                await asyncio.sleep(0.1)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def gallery(request: Request):
        try:
            offset = max(0, int(request.query_params.get("offset", "0")))
        except ValueError:
            raise ApiError(422, "offset must be a whole number.") from None
        items = engine.gallery[offset:]
        return JSONResponse({"total": len(engine.gallery), "offset": offset, "images": [r.to_json() for r in items]})

    # --- A1111 ---
    async def sdapi_generate(request: Request, img2img: bool):
        body = await read_json(request)
        override = body.get("override_settings") or {}
        if not isinstance(override, dict):
            raise ApiError(422, "override_settings must be a JSON object.")
        batch_size, n_iter = int_field(body, "batch_size", 1), int_field(body, "n_iter", 1)
        if batch_size < 1 or n_iter < 1:
            raise ApiError(422, f"batch_size and n_iter must be at least 1, got {batch_size} and {n_iter}.")
        init = None
        if img2img:
            images = body.get("init_images")
            if not isinstance(images, list) or not images:
                raise ApiError(422, "init_images must be a list holding one base64-encoded PNG.")
            init = decode_image(images[0], "init_images[0]")
        req = build_request(
            engine, prompt=body.get("prompt", ""), negative=body.get("negative_prompt"),
            model=override.get("sd_model_checkpoint"), sampler=body.get("sampler_name") or body.get("sampler_index"),
            scheduler=body.get("scheduler"), steps=body.get("steps"), guidance=body.get("cfg_scale"),
            seed=body.get("seed"), width=body.get("width"), height=body.get("height"), n=batch_size * n_iter,
            init_image=init, strength=body.get("denoising_strength"),
            names={"negative": "negative_prompt", "sampler": "sampler_name", "guidance": "cfg_scale",
                   "n": "batch_size × n_iter", "strength": "denoising_strength",
                   "model": "override_settings.sd_model_checkpoint"})
        job = engine.submit(req, "sdapi")
        await wait_for(job, request)
        if job.state == "error":
            return JSONResponse({"error": job.error}, status_code=job.error_status)
        r = req
        params = dict(body)
        if img2img:
            params["init_images"], params["mask"] = None, None
        seeds = [x.seed for x in job.results] or [r.seed]
        info = {"prompt": r.prompt, "all_prompts": [r.prompt] * len(seeds), "negative_prompt": r.negative or "",
                "all_negative_prompts": [r.negative or ""] * len(seeds), "seed": r.seed, "all_seeds": seeds,
                "subseed": -1, "all_subseeds": [-1] * len(seeds), "subseed_strength": 0, "width": r.width,
                "height": r.height, "sampler_name": sampler_label(r.sampler), "cfg_scale": r.guidance,
                "steps": r.steps, "batch_size": batch_size, "restore_faces": False, "face_restoration_model": None,
                "sd_model_name": r.model, "sd_model_hash": None, "sd_vae_name": None, "sd_vae_hash": None,
                "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": r.strength,
                "extra_generation_params": {"Schedule type": "Karras"} if r.karras else {},
                "index_of_first_image": 0, "infotexts": [x.infotext for x in job.results], "styles": [],
                "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)), "clip_skip": 1,
                "is_using_inpainting_conditioning": False, "version": f"chorus {_version()}",
                "job_id": job.id, "interrupted": job.state == "interrupted"}
        return JSONResponse({"images": [_b64(x.png) for x in job.results], "parameters": params,
                             "info": json.dumps(info)})

    async def txt2img(request: Request):
        return await sdapi_generate(request, img2img=False)

    async def img2img(request: Request):
        return await sdapi_generate(request, img2img=True)

    async def sdapi_progress(request: Request):
        skip = request.query_params.get("skip_current_image", "false").lower() in ("1", "true", "yes")
        st = engine.status()
        job: Job | None = st["job"]
        count = st["pending"] + (1 if job is not None else 0)
        if job is None:
            return JSONResponse({"progress": 0.0, "eta_relative": 0.0,
                                 "state": {"skipped": False, "interrupted": False, "job": "", "job_count": count,
                                           "job_timestamp": "0", "job_no": 0, "sampling_step": 0,
                                           "sampling_steps": 0},
                                 "current_image": None,
                                 "textinfo": f"loading model {st['loading']}" if st["loading"] else None})
        return JSONResponse({
            "progress": round(job.progress, 4), "eta_relative": round(job.eta or 0.0, 2),
            "state": {"skipped": False, "interrupted": job.cancel.is_set(), "job": job.id, "job_count": count,
                      "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
                      "job_no": job.image_index, "sampling_step": job.step, "sampling_steps": job.steps},
            "current_image": None if skip or job.preview is None else _b64(job.preview),
            "textinfo": f"loading model {st['loading']}" if st["loading"] else None})

    async def sdapi_interrupt(request: Request):
        job = engine.interrupt_current("interrupted by /sdapi/v1/interrupt")
        return JSONResponse({"interrupted": job.id if job else None})

    async def sd_models(request: Request):
        return JSONResponse([{"title": m.name, "model_name": m.name, "hash": None, "sha256": None,
                              "filename": str(m.path), "config": None} for m in engine.models.values()])

    async def samplers(request: Request):
        return JSONResponse([{"name": label, "aliases": [name, *K_ALIASES.get(name, [])], "options": {}}
                             for label, name in A1111_SAMPLERS.items()])

    async def schedulers(request: Request):
        return JSONResponse([{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
                              "need_inner_model": False},
                             {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
                              "need_inner_model": False}])

    async def empty_list(request: Request):
        return JSONResponse([])

    def options_json() -> dict:
        return {"sd_model_checkpoint": engine.current, "sd_checkpoint_hash": None, "samples_format": "png",
                "CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic", "live_previews_enable": True,
                "show_progress_every_n_steps": engine.preview_every or -1}

    async def get_options(request: Request):
        return JSONResponse(options_json())

    async def set_options(request: Request):
        body = await read_json(request)
        applied, ignored = [], []
        for key, value in body.items():
            if key == "sd_model_checkpoint":
                engine.set_current_model(value)
                applied.append(key)
            elif key in options_json() and value == options_json()[key]:
                continue  # a client echoing the options back
            else:
                ignored.append(key)
        return JSONResponse({"applied": applied, "ignored": ignored, "options": options_json()})

    async def png_info(request: Request):
        body = await read_json(request)
        image = decode_image(body.get("image"), "image")
        return JSONResponse(read_png_info(image))

    # --- OpenAI ---
    async def openai_generations(request: Request):
        import re
        body = await read_json(request)
        n = int_field(body, "n", 1)
        if not 1 <= n <= 10:
            raise ApiError(422, f"n must be between 1 and 10, got {n}.")
        fmt = body.get("response_format") or "b64_json"
        if fmt not in ("b64_json", "url"):
            raise ApiError(422, f"response_format must be 'b64_json' or 'url', got {fmt!r}.")
        width = height = None
        size = body.get("size")
        if size not in (None, "", "auto"):
            m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(size))
            if not m:
                raise ApiError(422, f"size must look like WIDTHxHEIGHT, e.g. '64x64', got {size!r}.")
            width, height = int(m.group(1)), int(m.group(2))
        model = body.get("model")
        if model is not None:
            try:
                model = engine.resolve_model(model)
            except ApiError:
                model = None  # 'dall-e-3', 'gpt-image-1', …: the current model
        req = build_request(engine, prompt=body.get("prompt"), negative=body.get("negative_prompt"), model=model,
                            sampler=body.get("sampler"), steps=body.get("steps"),
                            guidance=body.get("guidance_scale", body.get("cfg_scale")), seed=body.get("seed"),
                            width=width, height=height, n=n, names={"width": "size (width)",
                                                                    "height": "size (height)"})
        job = engine.submit(req, "openai")
        await wait_for(job, request)
        if job.state == "error":
            return JSONResponse({"error": job.error}, status_code=job.error_status)
        if fmt == "url":
            base = str(request.base_url).rstrip("/")
            data = [{"url": base + x.to_json()["url"], "revised_prompt": req.prompt} for x in job.results]
        else:
            data = [{"b64_json": _b64(x.png), "revised_prompt": req.prompt} for x in job.results]
        return JSONResponse({"created": int(job.created), "output_format": "png", "data": data})

    async def openai_models(request: Request):
        return JSONResponse({"object": "list", "data": [{"id": m.name, "object": "model", "created": 0,
                                                         "owned_by": "chorus"} for m in engine.models.values()]})

    # --- errors ---
    async def api_error(request: Request, exc: ApiError):
        headers = {"Retry-After": "5"} if exc.status == 429 else None
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)

    async def http_error(request: Request, exc: HTTPException):
        text = {404: f"Not found: {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return JSONResponse({"error": text.get(exc.status_code, exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def server_error(request: Request, exc: Exception):
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        started_here = False
        if manage_engine and engine._thread is None:
            engine.start()
            started_here = True
        try:
            yield
        finally:
            if started_here:
                engine.stop(timeout=5)

    routes = [
        Route("/", index),
        Mount("/static", app=StaticFiles(directory=str(STATIC)), name="static"),
        Route("/api/info", info),
        Route("/api/jobs", create_job, methods=["POST"]),
        Route("/api/jobs", list_jobs, methods=["GET"]),
        Route("/api/jobs/{id}", get_job),
        Route("/api/jobs/{id}/events", job_events),
        Route("/api/jobs/{id}/interrupt", interrupt_job, methods=["POST"]),
        Route("/api/jobs/{id}/preview", job_preview),
        Route("/api/jobs/{id}/images/{index:int}", job_image),
        Route("/api/gallery", gallery),
        Route("/sdapi/v1/txt2img", txt2img, methods=["POST"]),
        Route("/sdapi/v1/img2img", img2img, methods=["POST"]),
        Route("/sdapi/v1/progress", sdapi_progress),
        Route("/sdapi/v1/interrupt", sdapi_interrupt, methods=["POST"]),
        Route("/sdapi/v1/sd-models", sd_models),
        Route("/sdapi/v1/samplers", samplers),
        Route("/sdapi/v1/schedulers", schedulers),
        Route("/sdapi/v1/upscalers", empty_list),
        Route("/sdapi/v1/latent-upscale-modes", empty_list),
        Route("/sdapi/v1/sd-vae", empty_list),
        Route("/sdapi/v1/loras", empty_list),
        Route("/sdapi/v1/options", get_options, methods=["GET"]),
        Route("/sdapi/v1/options", set_options, methods=["POST"]),
        Route("/sdapi/v1/png-info", png_info, methods=["POST"]),
        Route("/v1/images/generations", openai_generations, methods=["POST"]),
        Route("/v1/models", openai_models),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    middleware=[Middleware(AuthMiddleware, key=api_key)] if api_key else [],
                    exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error})
    app.state.engine = engine
    return app


def _version() -> str:
    from chorus import __version__
    return __version__
