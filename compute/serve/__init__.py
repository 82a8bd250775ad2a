"""The OpenAI-compatible HTTP server (``spillover serve``): a client of ``compute.scheduler`` over HTTP.

* ``main``: the ``spillover serve`` command: loader, engine, scheduler, uvicorn, signals and exit status;
* ``app``: the Starlette app: endpoints, API key, streaming as server-sent events (sse-starlette);
* ``schemas``: the request bodies, checked, and the response objects, in OpenAI's shapes;
* ``text``: a reply's ids to text: incremental detokenization, stop strings, the reasoning split;
* ``bridge``: the scheduler's events into the event loop, cancellation, the loader watch, shutdown;
* ``errors``: OpenAI's error JSON and the status that goes with each kind of error.

This package knows nothing of kernels, KV caches or the loader's protocol: it submits token ids and sampling
parameters to the scheduler and turns the events that come back into HTTP responses.
"""
