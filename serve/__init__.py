"""spade-serve: the always-on inspection service (HTTP API, archive, live gallery updates).

Install with the ``[serve]`` extra. The HTTP-independent core is :class:`InspectionService`;
:func:`create_app` wraps it in FastAPI. See docs/serve.md.
"""

from spade_edge.serve.app import create_app
from spade_edge.serve.config import ServeConfig
from spade_edge.serve.service import InspectionService

__all__ = ["InspectionService", "ServeConfig", "create_app"]
