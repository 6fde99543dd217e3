import pytest
from django.db import IntegrityError, connection, transaction
from django.db.models import ProtectedError

from accounts.models import AuditLogEntry
from gateway_project.errors import AlreadyExists
from routing.models import Deployment, ModelGroup, ModelGroupMember
from routing.providers import target_for
from routing.services import (
    deployment_create,
    model_group_create,
    provider_credential_create,
)

pytestmark = pytest.mark.django_db

API_KEY = "sk-live-provider-secret-0123456789abcdef"


def test_provider_key_is_encrypted_at_rest():
    credential = provider_credential_create(
        name="openai-main", provider="openai", api_key=API_KEY
    )

    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM routing_providercredential")
        raw_row = cursor.fetchone()
    assert all(API_KEY not in str(column) for column in raw_row)
    assert credential.api_key_hint == "…cdef"
    assert (
        target_for(
            deployment_create(name="d", model="openai/x", credential=credential)
        ).api_key
        == API_KEY
    )


def test_duplicate_model_group_is_refused_and_writes_nothing(model_group, deployment):
    audit_rows = AuditLogEntry.objects.count()

    with pytest.raises(AlreadyExists, match="Model group 'chat' already exists"):
        model_group_create(group_name="chat", members=[(deployment, 0)])

    assert ModelGroup.objects.count() == 1
    assert ModelGroupMember.objects.count() == 1
    assert AuditLogEntry.objects.count() == audit_rows


def test_duplicate_deployment_name_is_refused(deployment):
    with pytest.raises(AlreadyExists, match="already exists"):
        deployment_create(name="mock-a", model="openai/other")

    assert Deployment.objects.get().model == "openai/mock-a"


def test_deployment_appears_once_per_group(model_group, deployment):
    with pytest.raises(IntegrityError), transaction.atomic():
        ModelGroupMember.objects.create(
            model_group=model_group, deployment=deployment, priority=3
        )


def test_member_weight_must_be_positive(model_group):
    with pytest.raises(IntegrityError), transaction.atomic():
        ModelGroupMember.objects.filter(model_group=model_group).update(weight=0)


def test_deployment_in_a_group_cannot_be_deleted(model_group, deployment):
    with pytest.raises(ProtectedError):
        deployment.delete()

    assert Deployment.objects.filter(pk=deployment.pk).exists()


def test_credential_used_by_a_deployment_cannot_be_deleted():
    credential = provider_credential_create(
        name="c", provider="openai", api_key=API_KEY
    )
    deployment_create(name="d", model="openai/gpt-4o", credential=credential)

    with pytest.raises(ProtectedError):
        credential.delete()


def test_deleting_a_group_removes_its_members_but_keeps_deployments(
    model_group, deployment
):
    model_group.delete()

    assert not ModelGroupMember.objects.exists()
    assert Deployment.objects.filter(pk=deployment.pk).exists()


def test_timeout_has_a_floor(deployment):
    with pytest.raises(IntegrityError), transaction.atomic():
        Deployment.objects.filter(pk=deployment.pk).update(timeout_ms=5)
