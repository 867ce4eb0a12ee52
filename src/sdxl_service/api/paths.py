"""The paths of the HTTP process that are not the /v1 API's own routes, named once.

BentoML answers its probes, /metrics, its schema and its index page itself, outside the
/v1 app; the API-key check, the error envelope and the metric labels all need to know them.
"""

from __future__ import annotations

API_PREFIX = "/v1"
PROBE_PATHS = ("/livez", "/readyz", "/healthz")
METRICS_PATH = "/metrics"
# The playground's page and its script and style sheet: static, no data in them; the
# page asks for the API key itself, so with keys they load without one.
PLAYGROUND_PAGE = "/"
PLAYGROUND_ASSETS = "/playground"
# Answered by BentoML in its own format: probes and Prometheus read them, not OpenAI clients.
BENTOML_PATHS = (*PROBE_PATHS, METRICS_PATH)
# BentoML's schema and index page (with SDXL_PLAYGROUND=false, the index is its own).
BENTOML_PAGES = ("/", "/schema.json", "/docs.json")
# Its index page's assets: `/assets/` for the new index, `/static_content/` for the old one.
BENTOML_ASSET_PREFIXES = ("/static_content/", "/assets/")
