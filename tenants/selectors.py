"""Reads of the tenants app."""

from django.db.models import QuerySet

from tenants.models import Organization, Status


def organization_list() -> QuerySet[Organization]:
    """Organizations that are not deleted, by id."""
    return Organization.objects.exclude(status=Status.DELETED).order_by(
        "organization_id"
    )
