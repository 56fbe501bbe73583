"""Capture: what the middleware sees of each request and upload, on the request path.

* :mod:`.middleware` — ``UsageMiddleware``: hooks, lifespan, rows built after the response.
* :mod:`.exchange` — one request's wrapped ``receive``/``send``: bytes, status, timing.
* :mod:`.multipart` — streaming multipart and raw-body upload capture (python-multipart).
* :mod:`.sniff` — a file's type from its leading bytes.
* :mod:`.annotate` — ``annotate()``, the endpoint's word on provider, key and status.
"""
