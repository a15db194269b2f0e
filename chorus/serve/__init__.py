"""`chorus serve`: a local web studio and A1111 / OpenAI-compatible API on one bounded job queue.

`chorus.serve.engine` (no web dependencies) holds the worker thread, the queue and the jobs;
`chorus.serve.app` is the Starlette app; `chorus.serve.metadata` writes and reads PNG metadata
(Chorus's chunks and A1111's `parameters` infotext); `static/` is the page. Starlette and uvicorn
come with the `serve` extra: pip install 'chorus-diffusion[serve]'.
"""
