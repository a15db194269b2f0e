"""The web server's overhead: the A1111 API of `chorus serve` against calling the pipeline directly.

    python benchmarks/serve.py [--model default] [--requests 8] [--steps 20] [--threads 2]

A real uvicorn server on 127.0.0.1 with one model; N requests `POST /sdapi/v1/txt2img` (one 64×64
image each, seeds 0…N−1, DPM++ 2M, CFG 5) made one after another, and the same N images made by
`Pipeline.__call__` directly, alternating, so load from other processes hits both alike. Previews are
measured off (`--preview-every 0`, the API's own cost) and at the server's default (about 5 JPEG
previews per image). Prints per-image latency medians, requests/s, the overhead ratio and whether the
PNGs' pixels equal the direct call's. A second pass sends the N requests at once from N client threads
(the queue serialises them): requests/s under load.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, preview_every):
    import uvicorn

    from chorus.serve.app import create_app
    from chorus.serve.engine import Engine, unique_models
    engine = Engine(unique_models([model]), queue_size=64, preview_every=preview_every)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


def main(argv=None) -> int:
    import httpx
    import numpy as np
    import torch
    from PIL import Image

    from chorus.pipeline import Pipeline
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    prompt = "a red circle to the left of a blue square"
    pipe = Pipeline.from_pretrained(args.model)
    results = {}
    for label, preview in (("previews off", 0), ("previews on (default)", None)):
        server, thread, url = start_server(args.model, preview)
        with httpx.Client(timeout=600) as client:
            body = lambda seed: {"prompt": prompt, "steps": args.steps, "cfg_scale": 5.0, "seed": seed,  # noqa: E731
                                 "sampler_name": "DPM++ 2M", "width": 64, "height": 64}
            client.post(f"{url}/sdapi/v1/txt2img", json=body(0)).raise_for_status()      # warm-up: loads the model
            pipe(prompt, num_inference_steps=args.steps, guidance_scale=5.0, seed=0, progress=False)
            api_t, direct_t, same = [], [], True
            for seed in range(args.requests):
                t = time.perf_counter()
                r = client.post(f"{url}/sdapi/v1/txt2img", json=body(seed))
                r.raise_for_status()
                api_t.append(time.perf_counter() - t)
                t = time.perf_counter()
                direct = pipe(prompt, num_inference_steps=args.steps, guidance_scale=5.0, sampler="dpmpp_2m",
                              generator=torch.Generator("cpu").manual_seed(seed), progress=False).images[0]
                direct_t.append(time.perf_counter() - t)
                served = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
                same &= bool(np.array_equal(np.asarray(served), np.asarray(direct)))
            # load: all requests at once from N threads
            done = []
            t = time.perf_counter()
            workers = [threading.Thread(target=lambda s=s: done.append(
                client.post(f"{url}/sdapi/v1/txt2img", json=body(s)).status_code)) for s in range(args.requests)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            load_s = time.perf_counter() - t
        server.should_exit = True
        thread.join(timeout=30)
        a, d = statistics.median(api_t), statistics.median(direct_t)
        results[label] = {"api_s": round(a, 4), "direct_s": round(d, 4), "overhead": round(a / d, 3),
                          "api_requests_per_s": round(1 / a, 2), "identical_pixels": same,
                          "concurrent_requests_per_s": round(len(done) / load_s, 2),
                          "concurrent_ok": sum(c == 200 for c in done)}
        print(f"{label}: API {a:.3f} s/image vs direct {d:.3f} s ({a / d:.2f}×), {1 / a:.2f} requests/s; "
              f"{args.requests} at once: {len(done) / load_s:.2f} requests/s ({results[label]['concurrent_ok']} OK); "
              f"pixels {'identical' if same else 'DIFFER'}")
    print(json.dumps({"model": args.model, "steps": args.steps, "requests": args.requests, "threads": args.threads,
                      **results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
