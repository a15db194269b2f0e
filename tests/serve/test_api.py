"""`chorus serve`'s HTTP API (starlette.testclient, no browser): the job API, the A1111 and OpenAI
subsets, PNG metadata, the bounded queue, interrupts, bad input and auth.

One engine serves the module: the shipped default model (64×64) first and the tiny `sd_folder`
model (32×32) second, with 2-step jobs to stay fast.
"""
import base64
import io
import json
import socket
import threading
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from PIL.PngImagePlugin import PngInfo  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from chorus.serve.app import create_app  # noqa: E402
from chorus.serve.engine import Engine, unique_models  # noqa: E402

KEY = "sekrit-key"


@pytest.fixture(scope="module")
def engine(sd_folder):
    return Engine(unique_models(["default", str(sd_folder)]), queue_size=2)


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine)) as c:
        yield c


def png_of(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def wait_until(cond, timeout=30.0, what="condition"):
    t = time.time()
    while not cond():
        if time.time() - t > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def sse_events(client, job_id):
    events = []
    with client.stream("GET", f"/api/jobs/{job_id}/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                events.append((event, json.loads(line[5:])))
    return events


# --- generation and metadata -------------------------------------------------------------------
def test_txt2img_returns_a_png_with_chorus_and_a1111_metadata(client, engine, tmp_path):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "negative_prompt": "blurry", "steps": 2,
                                               "seed": 0, "sampler_name": "DPM++ 2M", "cfg_scale": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"images", "parameters", "info"} and len(body["images"]) == 1
    assert body["parameters"]["prompt"] == "a red circle"
    info = json.loads(body["info"])
    assert info["all_seeds"] == [0] and info["width"] == info["height"] == 64 and info["sampler_name"] == "DPM++ 2M"
    im = png_of(body["images"][0])
    assert im.format == "PNG" and im.size == (64, 64)
    expected = ("a red circle\nNegative prompt: blurry\n"
                "Steps: 2, Sampler: DPM++ 2M, CFG scale: 5, Seed: 0, Size: 64x64, Model: default")
    assert im.text["parameters"] == expected == info["infotexts"][0]
    chorus = json.loads(im.text["chorus"])
    assert chorus["prompt"] == "a red circle" and chorus["seed"] == 0 and chorus["size"] == "64x64"
    assert chorus["model"] == "default" and chorus["sampler"] == "dpmpp_2m"
    assert im.text["steps"] == "2" and im.text["negative"] == "blurry"     # chorus generate's per-setting chunks
    # `chorus generate --from-png` reads it, and the image is the pipeline's for that seed
    from chorus.generate_cli import read_png_settings
    path = tmp_path / "x.png"
    path.write_bytes(base64.b64decode(body["images"][0]))
    assert read_png_settings(str(path))["seed"] == 0
    import numpy as np
    import torch
    ref = engine._pipe("a red circle", negative_prompt="blurry", num_inference_steps=2, guidance_scale=5.0,
                       generator=torch.Generator("cpu").manual_seed(0), progress=False).images[0]
    assert np.array_equal(np.asarray(ref), np.asarray(im.convert("RGB")))


def test_batches_use_seed_plus_i_and_land_in_the_gallery(client):
    before = client.get("/api/gallery").json()["total"]
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "two squares", "steps": 2, "seed": 7, "batch_size": 2,
                                               "n_iter": 1, "sampler_name": "Euler a"})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["all_seeds"] == [7, 8] and len(r.json()["images"]) == 2
    assert "Sampler: Euler a" in info["infotexts"][1] and "Seed: 8" in info["infotexts"][1]
    g = client.get("/api/gallery").json()
    assert g["total"] == before + 2
    last = g["images"][-1]
    img = client.get(last["url"])
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(img.content)).text["parameters"] == last["infotext"]


def test_img2img(client):
    init = client.post("/sdapi/v1/txt2img", json={"prompt": "a circle", "steps": 2, "seed": 1}).json()["images"][0]
    r = client.post("/sdapi/v1/img2img", json={"prompt": "a blue circle", "init_images": [init], "steps": 4,
                                               "denoising_strength": 0.5, "seed": 3})
    assert r.status_code == 200, r.text
    im = png_of(r.json()["images"][0])
    assert "Denoising strength: 0.5" in im.text["parameters"]
    assert json.loads(im.text["chorus"])["strength"] == 0.5
    assert r.json()["parameters"]["init_images"] is None      # not echoed back (A1111 does the same)


def test_png_info_round_trip(client):
    png = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle, big", "negative_prompt": "text",
                                                 "steps": 3, "seed": 42, "cfg_scale": 4.5,
                                                 "sampler_name": "Euler"}).json()["images"][0]
    r = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + png})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["source"] == "chorus"
    assert d["info"].startswith('a red circle, big\nNegative prompt: text\nSteps: 3, Sampler: Euler, CFG scale: 4.5')
    assert d["parameters"]["Prompt"] == "a red circle, big" and d["parameters"]["Seed"] == "42"
    assert d["parameters"]["Size-1"] == "64" and "chorus" in d["items"] and "parameters" not in d["items"]
    assert d["settings"] == {"prompt": "a red circle, big", "negative": "text", "seed": 42, "steps": 3,
                             "sampler": "euler", "guidance": 4.5, "model": "default", "width": 64, "height": 64}


def test_png_info_reads_an_a1111_png(client):
    info = PngInfo()
    info.add_text("parameters", 'a cat, "quoted"\nwith two lines\nNegative prompt: dog\nSteps: 30, Sampler: Euler a, '
                                'Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 32x48, Model hash: abc, '
                                'Model: v1-5, Clip skip: 2')
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG", pnginfo=info)
    d = client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(buf.getvalue()).decode()}).json()
    assert d["source"] == "parameters"
    s = d["settings"]
    assert s["prompt"] == 'a cat, "quoted"\nwith two lines' and s["negative"] == "dog"
    assert (s["steps"], s["sampler"], s["karras"], s["guidance"], s["seed"]) == (30, "euler_a", True, 7.0, 1234)
    assert (s["width"], s["height"], s["model"]) == (32, 48, "v1-5")
    assert "Clip skip" in d["unmapped"]


def test_job_api_and_sse_progress_with_previews(client):
    r = client.post("/api/jobs", json={"prompt": "a blue square", "steps": 6, "seed": 5, "n": 1})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] in ("queued", "running") and len(job["id"]) >= 8
    events = sse_events(client, job["id"])
    kinds = [e for e, _ in events]
    assert kinds[-1] == "done" and "progress" in kinds
    previews = [d["preview_data"] for e, d in events if d.get("preview_data")]
    assert previews and previews[0].startswith("data:image/jpeg;base64,")
    done = events[-1][1]
    assert done["state"] == "done" and done["step"] == done["steps"] == 6 and done["progress"] == 1.0
    assert done["images_data"][0].startswith("data:image/png;base64,")
    got = client.get(f"/api/jobs/{job['id']}").json()
    assert got["state"] == "done" and got["results"][0]["seed"] == 5
    assert client.get(f"/api/jobs/{job['id']}/images/1").status_code == 404


def test_openai_images_and_models(client):
    r = client.post("/v1/images/generations", json={"prompt": "a green triangle", "n": 2, "size": "64x64",
                                                    "response_format": "b64_json", "model": "dall-e-3"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 2
    im = png_of(body["data"][0]["b64_json"])
    assert im.size == (64, 64) and "parameters" in im.text
    url = client.post("/v1/images/generations", json={"prompt": "x", "size": "64x64", "response_format": "url",
                                                      "steps": 2}).json()["data"][0]["url"]
    assert client.get(url).headers["content-type"] == "image/png"
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["default", "model"]


def test_a1111_listing_routes(client):
    samplers = client.get("/sdapi/v1/samplers").json()
    by_name = {s["name"]: s["aliases"][0] for s in samplers}
    assert by_name["DPM++ 2M"] == "dpmpp_2m" and by_name["Euler a"] == "euler_a" and by_name["DDIM"] == "ddim"
    assert by_name["DPM++ 2M SDE"] == "dpmpp_2m_sde" and by_name["Heun"] == "heun" and by_name["Euler"] == "euler"
    from chorus.samplers import SAMPLERS
    assert set(by_name.values()) == set(SAMPLERS)
    models = client.get("/sdapi/v1/sd-models").json()
    assert [m["title"] for m in models] == ["default", "model"] and models[0]["model_name"] == "default"
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "default"
    p = client.get("/sdapi/v1/progress").json()
    assert set(p) >= {"progress", "eta_relative", "state", "current_image"} and "job_count" in p["state"]
    for route in ("upscalers", "sd-vae", "loras", "latent-upscale-modes", "schedulers"):
        assert client.get(f"/sdapi/v1/{route}").status_code == 200


def test_options_switch_the_model(client):
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "model"})
    assert r.status_code == 200 and r.json()["applied"] == ["sd_model_checkpoint"]
    try:
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "model"
        body = client.post("/sdapi/v1/txt2img", json={"prompt": "abc", "steps": 2, "seed": 0}).json()
        im = png_of(body["images"][0])
        assert im.size == (32, 32) and im.text["parameters"].endswith("Model: model")
        # an A1111 title with a hash suffix, per request
        body = client.post("/sdapi/v1/txt2img", json={"prompt": "abc", "steps": 2, "seed": 0, "override_settings":
                                                      {"sd_model_checkpoint": "default [0123abcd]"}}).json()
        assert png_of(body["images"][0]).size == (64, 64)
        bad = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope.safetensors"})
        assert bad.status_code == 422 and "nope.safetensors" in bad.json()["error"]
    finally:
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "default"})


# --- the queue and interrupts ------------------------------------------------------------------
def idle(engine):
    wait_until(lambda: engine.running is None and engine.pending_count() == 0, what="an idle engine")


def test_a_full_queue_answers_429_and_loses_nothing(client, engine):
    idle(engine)
    engine.pause()
    try:
        ids = [client.post("/api/jobs", json={"prompt": f"p{i}", "steps": 2, "seed": i}).json()["id"]
               for i in range(engine.queue_size)]
        assert [client.get(f"/api/jobs/{i}").json()["position"] for i in ids] == [1, 2]
        r = client.post("/api/jobs", json={"prompt": "one too many", "steps": 2})
        assert r.status_code == 429 and "queue is full" in r.json()["error"] and r.headers["retry-after"]
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "one too many", "steps": 2})
        assert r.status_code == 429 and "error" in r.json()
        assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 2
    finally:
        engine.resume()
    for i in ids:
        wait_until(lambda i=i: engine.jobs[i].finished, what=f"job {i}")
        assert client.get(f"/api/jobs/{i}").json()["state"] == "done"


def test_interrupt_a_queued_and_a_running_job(client, engine):
    idle(engine)
    engine.pause()
    try:
        queued = client.post("/api/jobs", json={"prompt": "never", "steps": 2}).json()["id"]
        r = client.post(f"/api/jobs/{queued}/interrupt")
        assert r.status_code == 200 and r.json()["state"] == "interrupted" and r.json()["position"] is None
    finally:
        engine.resume()
    job = client.post("/api/jobs", json={"prompt": "long", "steps": 150, "seed": 0}).json()["id"]
    wait_until(lambda: engine.jobs[job].step >= 1, what="the job's first step")
    assert client.post(f"/api/jobs/{job}/interrupt").status_code == 200
    events = sse_events(client, job)
    assert events[-1][0] == "interrupted"
    final = client.get(f"/api/jobs/{job}").json()
    assert final["state"] == "interrupted" and final["step"] < 150 and final["results"] == []


def test_sdapi_interrupt_stops_a_synchronous_call(client, engine):
    out = {}

    def call():
        out["r"] = client.post("/sdapi/v1/txt2img", json={"prompt": "long", "steps": 150, "seed": 0})

    idle(engine)
    t = threading.Thread(target=call)
    t.start()
    wait_until(lambda: engine.running is not None and engine.running.step >= 1, what="the sdapi job to run")
    p = client.get("/sdapi/v1/progress").json()
    assert 0 < p["progress"] < 1 and p["state"]["sampling_steps"] == 150 and p["state"]["job_count"] == 1
    assert client.post("/sdapi/v1/interrupt").json()["interrupted"]
    t.join(30)
    r = out["r"]
    assert r.status_code == 200 and r.json()["images"] == [] and json.loads(r.json()["info"])["interrupted"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_client_that_goes_away_frees_its_job(engine, client):
    """Through a real server: a synchronous call whose socket closes leaves its job interrupted."""
    import uvicorn
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, manage_engine=False), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, what="uvicorn")
    engine.pause()
    try:
        known = set(engine.jobs)
        body = json.dumps({"prompt": "abandoned", "steps": 2}).encode()
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_until(lambda: set(engine.jobs) - known, what="the job to be queued")
        (jid,) = set(engine.jobs) - known
        wait_until(lambda: engine.jobs[jid].finished, what="the abandoned job to be freed")
        assert engine.jobs[jid].state == "interrupted" and engine.jobs[jid].interrupt_reason == "client disconnected"
        assert engine.pending_count() == 0
    finally:
        engine.resume()
        server.should_exit = True
        thread.join(10)


# --- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("route,body,status,words", [
    ("/sdapi/v1/txt2img", {"prompt": "x", "width": -64}, 422, "width -64"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "width": 70}, 422, "multiples of 16"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "height": 4096}, 422, "height 4096"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "steps": 151}, 422, "steps"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "steps": 0}, 422, "steps"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "steps": "many"}, 422, "steps"),
    ("/sdapi/v1/txt2img", {"prompt": "x" * 10_001}, 422, "prompt is 10,001 characters"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "UniPC"}, 422, "UniPC"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "cfg_scale": "NaN"}, 422, "cfg_scale"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "seed": -5}, 422, "seed"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "batch_size": 17}, 422, "batch_size"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "override_settings": {"sd_model_checkpoint": "ghost"}}, 422, "ghost"),
    ("/sdapi/v1/txt2img", {"prompt": 5}, 422, "prompt must be a string"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": ["bm90IGEgcG5n"]}, 422, "init_images[0] is not a PNG"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": "abc"}, 422, "init_images"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": [None]}, 422, "init_images[0]"),
    ("/sdapi/v1/png-info", {"image": "%%% not base64 %%%"}, 422, "image"),
    ("/sdapi/v1/png-info", {}, 422, "image"),
    ("/api/jobs", {"negative": "no prompt"}, 422, "prompt is missing"),
    ("/api/jobs", {"prompt": "x", "model": "ghost"}, 422, "Unknown model 'ghost'"),
    ("/api/jobs", {"prompt": "x", "init_image": base64.b64encode(b"GIF89a....").decode()}, 422, "init_image"),
    ("/api/jobs", {"prompt": "x", "init_image": "", "strength": 2, "steps": 1}, 202, None),   # no init image: txt2img
    ("/v1/images/generations", {"prompt": "x", "size": "big"}, 422, "size"),
    ("/v1/images/generations", {"prompt": "x", "n": 11}, 422, "n must be"),
    ("/v1/images/generations", {"prompt": "x", "size": "63x64"}, 422, "size (width) 63"),
])
def test_bad_input_is_a_4xx_with_a_json_error(client, route, body, status, words):
    r = client.post(route, json=body)
    assert r.status_code == status, r.text
    if words:
        assert words in r.json()["error"]


def test_img2img_strength_that_leaves_no_step(client):
    init = client.post("/sdapi/v1/txt2img", json={"prompt": "a circle", "steps": 2}).json()["images"][0]
    r = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [init], "steps": 2,
                                               "denoising_strength": 0.2})
    assert r.status_code == 422 and "leaves no step" in r.json()["error"]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", b"\xff\xfe"])
def test_malformed_json_is_400_and_the_server_still_answers(client, raw):
    r = client.post("/sdapi/v1/txt2img", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    assert client.get("/sdapi/v1/progress").status_code == 200
    ok = client.post("/sdapi/v1/txt2img", json={"prompt": "still alive", "steps": 1, "seed": 0})
    assert ok.status_code == 200 and len(ok.json()["images"]) == 1


def test_unknown_routes_and_methods_answer_json(client):
    assert client.get("/api/jobs/doesnotexist").status_code == 404
    assert "doesnotexist" in client.get("/api/jobs/doesnotexist").json()["error"]
    assert client.get("/sdapi/v1/nothing").json()["error"].startswith("Not found")
    assert client.get("/sdapi/v1/txt2img").status_code == 405


# --- auth --------------------------------------------------------------------------------------
def test_api_key(engine):
    with TestClient(create_app(engine, api_key=KEY, manage_engine=False)) as c:
        for method, path in (("GET", "/sdapi/v1/options"), ("GET", "/v1/models"), ("GET", "/api/info"),
                             ("POST", "/sdapi/v1/txt2img"), ("POST", "/v1/images/generations"),
                             ("POST", "/api/jobs"), ("GET", "/api/gallery")):
            r = c.request(method, path, json={"prompt": "x", "steps": 1})
            assert r.status_code == 401, path
            assert "API key" in r.json()["error"] and r.headers["www-authenticate"].startswith("Bearer")
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = {"Authorization": f"Bearer {KEY}"}
        assert c.get("/v1/models", headers=ok).status_code == 200
        r = c.post("/sdapi/v1/txt2img", headers=ok, json={"prompt": "x", "steps": 1, "seed": 0})
        assert r.status_code == 200 and len(r.json()["images"]) == 1
        basic = "Basic " + base64.b64encode(f"user:{KEY}".encode()).decode()
        assert c.get("/sdapi/v1/options", headers={"Authorization": basic}).status_code == 200
        # the page and its files are public: the page asks for the key
        assert c.get("/").status_code == 200 and c.get("/static/app.js").status_code == 200


# --- the page and the CLI ----------------------------------------------------------------------
def test_the_page_is_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and "default-src 'self'" in r.headers["content-security-policy"]
    html = r.text
    for el in ("prompt", "negative", "model", "sampler", "steps", "guidance", "seed", "width", "height", "batch",
               "generate", "interrupt", "progress", "preview", "result", "gallery", "init-image", "strength", "drop"):
        assert f'id="{el}"' in html, el
    js = client.get("/static/app.js").text + client.get("/static/style.css").text
    for external in ("http://", "https://", "//cdn", "fonts.googleapis"):
        assert external not in html + js


def test_serve_cli_binds_loopback_by_default(monkeypatch, capsys):
    import uvicorn
    import chorus.serve.cli as serve_cli
    from chorus.cli import main
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    monkeypatch.setattr(serve_cli, "_check_port", lambda host, port: None)
    monkeypatch.delenv("CHORUS_API_KEY", raising=False)
    assert main(["serve"]) == 0
    assert calls[-1]["host"] == "127.0.0.1" and calls[-1]["port"] == 7860
    assert main(["serve", "--listen", "--port", "7861", "--queue-size", "3"]) == 0
    assert calls[-1]["host"] == "0.0.0.0" and calls[-1]["port"] == 7861
    assert "without --api-key" in capsys.readouterr().err
    assert main(["serve", "--model", "/no/such/folder"]) == 2
    assert "model_index.json" in capsys.readouterr().err
    assert main(["serve", "--queue-size", "0"]) == 2


def test_serve_without_starlette_says_what_to_install(monkeypatch, capsys):
    import sys
    from chorus.cli import main
    monkeypatch.setitem(sys.modules, "starlette", None)
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'chorus-diffusion[serve]'" in err.replace("\n", " ") and "Traceback" not in err


def test_plug_and_play_edit_job(client):
    """The studio's edit: edit_method pnp runs Plug-and-Play (chorus.controls) on the queue; its PNG says so."""
    init = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 2, "seed": 1}).json()["images"][0]
    r = client.post("/api/jobs", json={"prompt": "a blue circle", "init_image": init, "steps": 4, "seed": 2, "n": 2,
                                       "edit_method": "pnp", "tau_f": 0.8, "tau_attn": 0.5, "inversion_steps": 8})
    assert r.status_code == 202, r.text
    events = sse_events(client, r.json()["id"])
    done = events[-1][1]
    assert done["state"] == "done" and done["steps"] == 4, done
    im = png_of(done["images_data"][1].split(",", 1)[1])
    s = json.loads(im.text["chorus"])
    assert s["method"] == "pnp" and s["tau_f"] == 0.8 and s["inversion_steps"] == 8
    bad = client.post("/api/jobs", json={"prompt": "x", "init_image": init, "edit_method": "pnp", "tau_f": 2})
    assert bad.status_code == 422 and "tau_f" in bad.json()["error"]
    assert client.post("/api/jobs", json={"prompt": "x", "edit_method": "pnp"}).status_code == 422


def test_controlnet_job(client, tmp_path):
    """A job with a ControlNet and its condition image; a zero-initialised one leaves the image as it was."""
    from chorus.models import ControlNet, UNet
    from chorus.pipeline import default_model_path
    unet = UNet.from_pretrained(default_model_path() / "unet")
    ControlNet.from_unet(unet, (16, 32, 96)).save_pretrained(tmp_path / "cn")
    cond = io.BytesIO()
    Image.new("RGB", (64, 64), (230, 25, 75)).save(cond, format="PNG")
    cond = base64.b64encode(cond.getvalue()).decode()
    body = {"prompt": "a red circle", "steps": 3, "seed": 4, "n": 1}
    plain = sse_events(client, client.post("/api/jobs", json=body).json()["id"])[-1][1]
    r = client.post("/api/jobs", json={**body, "controlnet": str(tmp_path / "cn"), "control_image": cond})
    assert r.status_code == 202, r.text
    done = sse_events(client, r.json()["id"])[-1][1]
    assert done["state"] == "done", done
    a, b = (png_of(d["images_data"][0].split(",", 1)[1]) for d in (plain, done))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert json.loads(b.text["chorus"])["controlnet"] == str(tmp_path / "cn")
    assert client.post("/api/jobs", json={**body, "controlnet": str(tmp_path / "cn")}).status_code == 422
    bad = client.post("/api/jobs", json={**body, "controlnet": "default-nothing", "control_image": cond})
    assert bad.status_code == 422 and "controlnet" in bad.json()["error"]


def test_a_request_without_steps_or_guidance_gets_the_models_recommendation(sd_folder, tmp_path):
    """Omitted steps / CFG scale: the model's sampling_defaults.json (as `chorus generate`), else 20 / 5; given
    values always win. /api/info shows the current model's recommendation (the page starts from it)."""
    import shutil

    from chorus.serve.engine import build_request
    model = tmp_path / "recommends"
    shutil.copytree(sd_folder, model)
    (model / "sampling_defaults.json").write_text(json.dumps({"num_inference_steps": 3, "guidance_scale": 2.5}))
    eng = Engine(unique_models([str(model), str(sd_folder)]), queue_size=2)
    r = build_request(eng, prompt="a red circle")
    assert (r.steps, r.guidance) == (3, 2.5)
    r = build_request(eng, prompt="a red circle", steps=4, guidance=6)
    assert (r.steps, r.guidance) == (4, 6.0)
    plain = next(n for n, m in eng.models.items() if m.path == sd_folder.resolve())
    r = build_request(eng, prompt="a red circle", model=plain)
    assert (r.steps, r.guidance) == (20, 5.0)
    with TestClient(create_app(eng)) as c:
        d = c.get("/api/info").json()
    assert (d["defaults"]["steps"], d["defaults"]["guidance"]) == (3, 2.5)
    assert {m["name"]: (m["steps"], m["guidance"]) for m in d["models"]}[plain] == (20, 5.0)
