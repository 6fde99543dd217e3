"""A call whose key and route this process has read before goes through
``routing.inference.prepare._prepare_known``: one Redis round trip proves both current, reads
the cooldowns and admits the call. Whatever that trip finds stale goes the
full way, so every change stays visible at once, and a refusal still writes
nothing."""

import pytest
from django_redis import get_redis_connection

from billing.models import LedgerEntry, UsageRecord
from gateway_project.cache import cache
from routing import limits
from routing.inference.route import cooldown_key as _cooldown_key
from routing.tests.calls import chat_call
from tenants.models import VirtualKey
from tenants.services import virtual_key_issue, virtual_key_revoke

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def known(client, team):
    """A limited key that has made one call, so that the next is 'known'."""
    team.rpm_limit = 1_000
    team.save(update_fields=["rpm_limit"])
    key, plaintext = virtual_key_issue(team=team)
    assert chat_call(client, plaintext).status_code == 200
    return key, plaintext


def _requests_counted() -> list[int]:
    redis = get_redis_connection("default")
    return sorted(int(redis.get(name)) for name in redis.scan_iter("rl:*:req:*"))


def test_a_known_call_is_admitted_through_the_one_round_trip(
    client, known, monkeypatch
):
    _, plaintext = known
    full_path = []
    monkeypatch.setattr(limits, "acquire", lambda *a, **k: full_path.append(1))

    response = chat_call(client, plaintext)

    assert response.status_code == 200
    assert response["x-ratelimit-remaining-requests"] == "998"
    assert full_path == []
    assert UsageRecord.objects.count() == 2


def test_a_known_call_over_its_limit_is_refused_with_nothing_written(
    client, team, monkeypatch
):
    # Given a team allowed 2 calls a minute that has made 1 (so the next ones
    # are known), then a second
    team.rpm_limit = 2
    team.save(update_fields=["rpm_limit"])
    _, plaintext = virtual_key_issue(team=team)
    assert chat_call(client, plaintext).status_code == 200
    full_path = []
    monkeypatch.setattr(limits, "acquire", lambda *a, **k: full_path.append(1))
    assert chat_call(client, plaintext).status_code == 200
    counted = _requests_counted()
    entries = LedgerEntry.objects.count()

    # When a third comes within the minute
    response = chat_call(client, plaintext)

    # Then the one round trip refuses it, and nothing is written
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert "Retry-After" in response
    assert full_path == []
    assert _requests_counted() == counted
    assert LedgerEntry.objects.count() == entries
    assert UsageRecord.objects.count() == 2


def test_a_revocation_is_seen_by_the_next_call(client, known):
    key, plaintext = known
    counted = _requests_counted()
    entries = LedgerEntry.objects.count()

    virtual_key_revoke(key=key)
    response = chat_call(client, plaintext)

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert _requests_counted() == counted
    assert LedgerEntry.objects.count() == entries
    assert UsageRecord.objects.count() == 1


def test_a_wrong_secret_for_a_known_key_counts_nothing(client, known):
    _, plaintext = known
    counted = _requests_counted()
    wrong = plaintext[:-4] + ("aaaa" if not plaintext.endswith("aaaa") else "bbbb")

    response = chat_call(client, wrong)

    assert response.status_code == 401
    assert _requests_counted() == counted
    assert UsageRecord.objects.count() == 1


def test_a_flushed_cache_sends_the_call_the_full_way(client, known):
    # Given a change made behind the services' back (no generation bump), then
    # the cache flushed: the key's entry is gone, so what this process
    # remembers cannot be proven current
    key, plaintext = known
    VirtualKey.objects.filter(pk=key.pk).update(rpm_limit=7)
    cache.clear()

    response = chat_call(client, plaintext)

    assert response.status_code == 200
    assert response["x-ratelimit-limit-requests"] == "7"


def test_a_cooldown_is_read_in_the_same_round_trip(client, known, deployment):
    _, plaintext = known
    cache.set(_cooldown_key(deployment.pk), 1, timeout=60)

    response = chat_call(client, plaintext)

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_deployment_available"
    record = UsageRecord.objects.order_by("-id").first()
    assert record.fallbacks_tried == [{"deployment": "mock-a", "skipped": "cooldown"}]


def test_a_script_redis_lost_is_loaded_again(client, known):
    _, plaintext = known
    get_redis_connection("default").script_flush()

    assert chat_call(client, plaintext).status_code == 200
    assert UsageRecord.objects.count() == 2
