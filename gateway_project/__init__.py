"""The gateway's Django project: settings, URLs, ASGI/WSGI entry points, Celery app.

litellm fetches its model cost map from the network at import unless this is set;
it must be in the environment before anything can import litellm, so it is set
here, the first module Django loads from this project.
"""

import os

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

from .celery import app as celery_app

__all__ = ("celery_app",)
