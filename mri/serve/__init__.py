"""Serve: a local web app over a scan — feature browser and pages, steering playground, attribution graph
viewer, audit report — as a JSON API (OpenAPI at /openapi.json) plus a static front end with no build step.

    from mri.serve import create_app, serve
"""

from mri.serve.app import create_app, serve

__all__ = ["create_app", "serve"]
