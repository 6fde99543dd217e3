"""The inference path's database work is pinned: a change that adds a round
trip to every call must change this number on purpose."""

import pytest
from redis.connection import AbstractConnection

from billing import statements
from billing.models import UsageRecord
from routing.tests.calls import chat_call
from tenants.services import virtual_key_issue

pytestmark = pytest.mark.django_db(transaction=True)

# The key comes from the key cache and the group, its deployments and prices
# from the process's routes (both checked against Redis). On PostgreSQL the
# hold is one statement (the account update feeding its ledger row) and so is
# the settlement (the account update feeding the capture row and the usage
# record; the team is job_based, so the capture takes the whole hold and there
# is no release): billing/statements.py. (This team's 100 credits are under
# GATEWAY_DEFERRED_HOLD_MARGIN times its 1-credit calls; a team far above it
# holds with the settlement, in 1 statement: billing/tests/test_deferred_hold.py.)
QUERIES_PER_CALL = 2
# The services' ORM path, which SQLite runs and PostgreSQL falls back to: the
# hold in one transaction (BEGIN, lock the account, idempotency read, ledger
# row, balance update, COMMIT: 6) and the settlement in one (BEGIN, lock, the
# record's idempotency read, the ledger rows of the request, capture, balance
# update, usage record, COMMIT: 8).
QUERIES_PER_CALL_ORM = 14
# Redis round trips of a call under rate limits, once the process has read the
# key and the route: the limit script, which also proves both current and
# reads the deployments' cooldowns, and the pipeline that corrects the tokens
# and frees the slot (routing/inference/prepare._prepare_known).
REDIS_ROUND_TRIPS_PER_CALL = 2


@pytest.mark.parametrize(
    "one_statement, queries", [(True, QUERIES_PER_CALL), (False, QUERIES_PER_CALL_ORM)]
)
def test_a_chat_call_makes_a_pinned_number_of_queries(
    client, team, django_assert_num_queries, monkeypatch, one_statement, queries
):
    monkeypatch.setattr(statements, "available", lambda: one_statement)
    _, plaintext = virtual_key_issue(team=team)

    assert chat_call(client, plaintext).status_code == 200  # warms the key cache
    with django_assert_num_queries(queries):
        response = chat_call(client, plaintext)

    assert response.status_code == 200
    assert UsageRecord.objects.count() == 2


def test_a_chat_call_makes_a_pinned_number_of_redis_round_trips(
    client, team, monkeypatch
):
    team.rpm_limit = 1_000
    team.save(update_fields=["rpm_limit"])
    _, plaintext = virtual_key_issue(team=team)

    assert (
        chat_call(client, plaintext).status_code == 200
    )  # warms the key cache, loads the script
    sent = []
    send = AbstractConnection.send_packed_command

    def counted(self, command, *args, **kwargs):
        sent.append(command)  # a pipeline sends its commands at once
        return send(self, command, *args, **kwargs)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counted)
    response = chat_call(client, plaintext)

    assert response.status_code == 200
    assert response["x-ratelimit-limit-requests"] == "1000"
    assert len(sent) == REDIS_ROUND_TRIPS_PER_CALL
