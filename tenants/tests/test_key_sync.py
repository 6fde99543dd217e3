"""Key sync: the Redis key cache, its invalidation across processes, expiry
marking and the last_used flush — by the services, by hand, by a real worker
and on beat's schedule."""

import io
import logging
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from django.conf import settings
from django.core.cache import cache
from django.core.management import CommandError, call_command
from django.utils import timezone
from django_redis import get_redis_connection

from conftest import _test_database_url
from tenants.key_cache import (
    LAST_USED_HASH,
    _raw_name,
    key_cache_invalidate,
    key_last_used_flush,
    key_lookup,
    virtual_keys_sync,
)
from tenants.models import KeyStatus, Team, VirtualKey
from tenants.services import team_update, virtual_key_issue, virtual_key_revoke
from tenants.tasks import virtual_keys_sync_task

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


def _wait(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not done in time"
        time.sleep(0.05)


def _chat(url: str, plaintext: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        json=CHAT,
        headers={"Authorization": f"Bearer {plaintext}"},
        timeout=30,
    )


def _expired_key(team, alias: str = "") -> VirtualKey:
    """A key whose expiry passed while nothing marked it."""
    key, _ = virtual_key_issue(
        team=team, alias=alias, expires_at=timezone.now() + timedelta(days=1)
    )
    VirtualKey.objects.filter(pk=key.pk).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    return key


@pytest.mark.django_db
def test_a_cached_key_is_served_without_the_database(team, django_assert_num_queries):
    key, _ = virtual_key_issue(team=team)
    key_lookup(key.public_id)  # fills the cache

    with django_assert_num_queries(0):
        cached = key_lookup(key.public_id)

    assert cached is not None
    assert (cached.pk, cached.team.team_id, cached.team.organization_id) == (
        key.pk,
        "team_alice",
        team.organization_id,
    )
    assert cached.__dict__["allowed_group_ids"] == frozenset(
        team.model_groups.values_list("pk", flat=True)
    )


@pytest.mark.django_db
def test_unknown_public_ids_are_not_cached(team):
    assert key_lookup("zzzzzzzzzzzz") is None
    assert cache.get("keys:entry:zzzzzzzzzzzz") is None


@pytest.mark.django_db(transaction=True)
def test_service_changes_invalidate_the_cached_entry(team):
    key, _ = virtual_key_issue(team=team)
    assert key_lookup(key.public_id).team.status == "active"

    team_update(team=team, changes={"status": "suspended"})
    suspended = key_lookup(key.public_id)
    virtual_key_revoke(key=key)
    revoked = key_lookup(key.public_id)

    assert suspended.team.status == "suspended"
    assert revoked.status == KeyStatus.REVOKED


@pytest.mark.django_db(transaction=True)
def test_a_change_behind_the_services_back_is_picked_up_by_key_sync(team):
    key, _ = virtual_key_issue(team=team)
    virtual_keys_sync(now=timezone.now())
    key_lookup(key.public_id)
    VirtualKey.objects.filter(pk=key.pk).update(
        status=KeyStatus.REVOKED, updated_at=timezone.now() + timedelta(seconds=1)
    )
    assert key_lookup(key.public_id).status == KeyStatus.ACTIVE  # still cached

    first = virtual_keys_sync(now=timezone.now())
    second = virtual_keys_sync(now=timezone.now())

    assert key_lookup(key.public_id).status == KeyStatus.REVOKED
    assert first == {
        "expired": 0,
        "invalidated": True,
        "last_used_flushed": 0,
        "last_used_failed": 0,
    }
    assert second == {
        "expired": 0,
        "invalidated": False,
        "last_used_flushed": 0,
        "last_used_failed": 0,
    }


@pytest.mark.django_db(transaction=True)
def test_key_sync_marks_expired_keys_once(team):
    expired = _expired_key(team, alias="old")
    virtual_key_issue(
        team=team, alias="new", expires_at=timezone.now() + timedelta(days=1)
    )
    key_lookup(expired.public_id)

    first = virtual_keys_sync(now=timezone.now())
    second = virtual_keys_sync(now=timezone.now())

    assert (first["expired"], second["expired"]) == (1, 0)
    assert dict(VirtualKey.objects.values_list("alias", "status")) == {
        "old": KeyStatus.EXPIRED,
        "new": KeyStatus.ACTIVE,
    }
    assert key_lookup(expired.public_id).status == KeyStatus.EXPIRED


@pytest.mark.django_db(transaction=True)
def test_last_used_is_stamped_in_redis_and_flushed_once(client, team):
    key, plaintext = virtual_key_issue(team=team)

    response = client.post(
        "/v1/chat/completions",
        CHAT,
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {plaintext}",
    )
    stamped = get_redis_connection("default").hgetall(_raw_name(LAST_USED_HASH))
    before = VirtualKey.objects.get(pk=key.pk).last_used_at
    flushed = key_last_used_flush()
    after = VirtualKey.objects.get(pk=key.pk).last_used_at
    again = key_last_used_flush()

    assert response.status_code == 200, response.content
    assert list(stamped) == [str(key.pk).encode()]
    assert before is None
    assert (flushed, again) == (
        {"flushed": 1, "failed": 0},
        {"flushed": 0, "failed": 0},
    )
    assert abs((timezone.now() - after).total_seconds()) < 10
    assert VirtualKey.objects.get(pk=key.pk).last_used_at == after


@pytest.mark.django_db(transaction=True)
def test_a_refused_request_stamps_nothing(client, team):
    _, plaintext = virtual_key_issue(team=team)

    response = client.post(
        "/v1/chat/completions",
        {**CHAT, "model": "nope"},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {plaintext}",
    )

    assert response.status_code == 404
    assert get_redis_connection("default").hgetall(_raw_name(LAST_USED_HASH)) == {}


def test_revocation_is_seen_by_another_process_within_a_second(two_servers, team):
    first, second = two_servers
    key, plaintext = virtual_key_issue(team=team)
    assert _chat(first.url, plaintext).status_code == 200
    assert _chat(second.url, plaintext).status_code == 200  # both have it cached

    revoked = httpx.post(
        f"{first.url}/api/keys/{key.public_id}/revoke",
        headers={"X-Admin-Key": first.admin_key},
        timeout=30,
    )
    started = time.monotonic()
    _wait(lambda: _chat(second.url, plaintext).status_code == 401, timeout=1.0)

    assert revoked.status_code == 200, revoked.text
    assert time.monotonic() - started < 1.0


def test_key_sync_runs_on_a_real_worker_twice_with_one_effect(
    celery_worker_process, team
):
    expired = _expired_key(team)

    virtual_keys_sync_task.delay()
    virtual_keys_sync_task.delay()
    _wait(lambda: celery_worker_process.read_text().count("succeeded") >= 2)

    assert VirtualKey.objects.get(pk=expired.pk).status == KeyStatus.EXPIRED
    log = celery_worker_process.read_text()
    assert "'expired': 1" in log
    assert "'expired': 0" in log


def test_beat_schedules_key_sync(celery_worker_process, team, tmp_path: Path):
    """Beat, with a one-second key-sync interval, marks a key that expires
    while it runs."""
    key, _ = virtual_key_issue(
        team=team, expires_at=timezone.now() + timedelta(seconds=2)
    )
    env = {
        **os.environ,
        "DATABASE_URL": _test_database_url(),
        "SECRET_KEY": settings.SECRET_KEY,
        "CELERY_TASK_ALWAYS_EAGER": "false",
        "GATEWAY_KEY_SYNC_INTERVAL_SECONDS": "1",
    }
    log = tmp_path / "beat.log"
    with log.open("w") as output:
        beat = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("celery")),
                "-A",
                "gateway_project",
                "beat",
                "--loglevel=INFO",
                "-s",
                str(tmp_path / "beat-schedule"),
            ],
            cwd=settings.BASE_DIR,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait(
            lambda: VirtualKey.objects.get(pk=key.pk).status == KeyStatus.EXPIRED,
            timeout=45,
        )
    finally:
        beat.terminate()
        beat.wait(timeout=15)

    assert "Sending due task sync-keys (tenants.virtual_keys_sync)" in log.read_text()


@pytest.mark.django_db(transaction=True)
def test_sync_keys_command(team):
    _expired_key(team)
    key_cache_invalidate()
    output = io.StringIO()

    call_command("sync_keys", "--invalidate", stdout=output)

    assert output.getvalue().strip() == (
        "1 key(s) marked expired; cache invalidated; last_used flushed for 0 key(s)"
    )
    assert Team.objects.get(pk=team.pk).keys.get().status == KeyStatus.EXPIRED


@pytest.mark.django_db(transaction=True)
def test_a_malformed_last_used_stamp_is_logged_and_the_others_flushed(team, caplog):
    # Given stamps collected in Redis: a good one, one whose field is not a
    # key id and one whose value is not a time.
    good, _ = virtual_key_issue(team=team, alias="good")
    other, _ = virtual_key_issue(team=team, alias="other")
    stamped = int(time.time())
    get_redis_connection("default").hset(
        _raw_name(LAST_USED_HASH),
        mapping={str(good.pk): stamped, "not-a-key": stamped, str(other.pk): "soon"},
    )

    with caplog.at_level(logging.ERROR, logger="tenants.key_cache"):
        first = virtual_keys_sync(now=timezone.now())
        second = virtual_keys_sync(now=timezone.now())

    # Then the good stamp is written, the bad ones logged, counted and dropped.
    assert (first["last_used_flushed"], first["last_used_failed"]) == (1, 2)
    assert (second["last_used_flushed"], second["last_used_failed"]) == (0, 0)
    assert sorted(
        r.getMessage() for r in caplog.records if r.name == "tenants.key_cache"
    ) == [
        f"last_used stamp of key {str(other.pk).encode()!r} could not be written",
        "last_used stamp of key b'not-a-key' could not be written",
    ]
    assert VirtualKey.objects.get(pk=good.pk).last_used_at == datetime.fromtimestamp(
        stamped, tz=UTC
    )
    assert VirtualKey.objects.get(pk=other.pk).last_used_at is None
    assert not get_redis_connection("default").exists(
        _raw_name(LAST_USED_HASH + ":flushing")
    )


@pytest.mark.django_db(transaction=True)
def test_sync_keys_command_fails_after_flushing_when_a_stamp_failed(team):
    key, _ = virtual_key_issue(team=team)
    get_redis_connection("default").hset(
        _raw_name(LAST_USED_HASH), mapping={str(key.pk): 1_700_000_000, "x": 1}
    )
    output = io.StringIO()

    with pytest.raises(CommandError) as failure:
        call_command("sync_keys", stdout=output)

    assert str(failure.value) == "1 last_used stamp(s) failed (see the log)"
    assert output.getvalue().endswith("last_used flushed for 1 key(s)\n")
    assert VirtualKey.objects.get(pk=key.pk).last_used_at == datetime.fromtimestamp(
        1_700_000_000, tz=UTC
    )
