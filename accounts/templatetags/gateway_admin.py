"""Template helpers for the admin's chrome."""

from django import template
from django.conf import settings

register = template.Library()


@register.simple_tag
def gateway_mode() -> dict[str, str]:
    """Which deployment mode the operator is looking at."""
    if settings.EMBEDDED:
        return {
            "label": "embedded",
            "title": "SQLite and in-process cache: for trying out, not for production",
        }
    return {"label": "production", "title": "PostgreSQL and Redis"}
