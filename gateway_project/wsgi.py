"""WSGI entry point, for servers without ASGI."""

import os

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway_project.settings")

from django.core.wsgi import get_wsgi_application

application = get_wsgi_application()
