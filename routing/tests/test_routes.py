"""The request path keeps routes (group, deployments, prices) in memory: a
write through the services applies to the next call, and a write behind
their back within GATEWAY_ROUTE_CACHE_SECONDS."""

import pytest

from routing.services import deployment_update
from routing.tests.calls import chat_call
from tenants.services import virtual_key_issue

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_service_write_applies_to_the_next_call(client, team, deployment):
    _, plaintext = virtual_key_issue(team=team)
    assert chat_call(client, plaintext).status_code == 200

    deployment_update(deployment=deployment, changes={"status": "disabled"})
    refused = chat_call(client, plaintext)

    assert (refused.status_code, refused.json()["error"]["code"]) == (
        503,
        "no_deployment_available",
    )


def test_a_write_behind_the_services_back_waits_for_the_reload(
    client, team, deployment, settings
):
    _, plaintext = virtual_key_issue(team=team)
    assert chat_call(client, plaintext).status_code == 200
    type(deployment).objects.filter(pk=deployment.pk).update(status="disabled")

    still_cached = chat_call(client, plaintext)
    settings.GATEWAY_ROUTE_CACHE_SECONDS = 0  # as if the period had passed
    reloaded = chat_call(client, plaintext)

    assert still_cached.status_code == 200
    assert reloaded.status_code == 503
