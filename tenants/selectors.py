"""Reads of the tenants app."""

from django.db.models import QuerySet

from tenants.models import Organization


def organization_list() -> QuerySet[Organization]:
    return Organization.objects.order_by("organization_id")
