"""Celery tasks of tenants: call a service, nothing else."""

from typing import Any

from celery import shared_task
from django.utils import timezone

from tenants.key_cache import virtual_keys_sync


@shared_task(name="tenants.virtual_keys_sync", time_limit=60, soft_time_limit=50)
def virtual_keys_sync_task() -> dict[str, Any]:
    """Mark expired keys, invalidate the key cache on changes, flush last_used."""
    return virtual_keys_sync(now=timezone.now())
