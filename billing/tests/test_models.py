import threading
from datetime import UTC, datetime

import pytest
from django.db import IntegrityError, connection, connections, transaction
from django.db.models import ProtectedError, Sum
from django.utils import timezone

from billing.models import (
    AppendOnlyError,
    CreditAccount,
    Job,
    LedgerEntry,
    LedgerEntryType,
    ModelPrice,
    UsageRecord,
    UsageStatus,
)
from billing.services import credits_allocate
from gateway_project.money import MICROS, from_micros, to_micros
from tenants.services import virtual_key_issue

pytestmark = pytest.mark.django_db


def _usage(team, **fields):
    values = {
        "request_id": "req_1",
        "organization": team.organization,
        "team": team,
        "endpoint": "chat/completions",
        "requested_model": "chat",
        "status": UsageStatus.SUCCESS,
        "created_at": timezone.now(),
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
    }
    values.update(fields)
    return UsageRecord.objects.create(**values)


def test_allocation_is_idempotent_by_key(team):
    again = credits_allocate(
        team=team, amount_micros=100 * MICROS, idempotency_key="t:alloc"
    )

    account = CreditAccount.objects.get(team=team)
    assert account.balance_micros == 100 * MICROS
    assert LedgerEntry.objects.filter(account=account).count() == 1
    assert again.idempotency_key == "t:alloc"


def test_balance_equals_the_sum_of_the_ledger(team):
    credits_allocate(
        team=team,
        amount_micros=5 * MICROS,
        idempotency_key="t:top",
        entry_type=LedgerEntryType.TOP_UP,
    )

    account = CreditAccount.objects.get(team=team)
    total = LedgerEntry.objects.filter(account=account).aggregate(
        s=Sum("amount_micros")
    )["s"]
    assert account.balance_micros == total == 105 * MICROS
    last = LedgerEntry.objects.filter(account=account).order_by("-id").first()
    assert (last.balance_before_micros, last.balance_after_micros) == (
        100 * MICROS,
        105 * MICROS,
    )


def test_idempotency_key_is_unique_in_the_database(team):
    account = CreditAccount.objects.get(team=team)

    with pytest.raises(IntegrityError), transaction.atomic():
        LedgerEntry.objects.create(
            account=account,
            entry_type=LedgerEntryType.ADJUSTMENT,
            amount_micros=1,
            balance_before_micros=0,
            balance_after_micros=1,
            idempotency_key="t:alloc",
        )


def test_ledger_arithmetic_is_a_constraint(team):
    account = CreditAccount.objects.get(team=team)

    with pytest.raises(IntegrityError), transaction.atomic():
        LedgerEntry.objects.create(
            account=account,
            entry_type=LedgerEntryType.ADJUSTMENT,
            amount_micros=10,
            balance_before_micros=0,
            balance_after_micros=11,
            idempotency_key="bad",
        )
    assert not LedgerEntry.objects.filter(idempotency_key="bad").exists()


def test_ledger_refuses_updates_and_deletes_through_the_orm(team):
    entry = LedgerEntry.objects.get(idempotency_key="t:alloc")

    with pytest.raises(AppendOnlyError):
        entry.reason = "rewritten"
        entry.save()
    with pytest.raises(AppendOnlyError):
        entry.delete()


def test_ledger_refuses_updates_and_deletes_in_the_database(team):
    with pytest.raises(IntegrityError, match="append-only"), transaction.atomic():
        LedgerEntry.objects.filter(idempotency_key="t:alloc").update(reason="rewritten")
    with (
        pytest.raises(IntegrityError, match="append-only"),
        transaction.atomic(),
        connection.cursor() as cursor,
    ):
        cursor.execute("DELETE FROM billing_ledgerentry")

    assert LedgerEntry.objects.get(idempotency_key="t:alloc").reason == ""


def test_balance_cannot_go_below_the_overdraft_limit(team):
    account = CreditAccount.objects.get(team=team)

    with pytest.raises(IntegrityError), transaction.atomic():
        CreditAccount.objects.filter(pk=account.pk).update(balance_micros=-1)
    CreditAccount.objects.filter(pk=account.pk).update(overdraft_limit_micros=10)
    CreditAccount.objects.filter(pk=account.pk).update(balance_micros=-10)
    with pytest.raises(IntegrityError), transaction.atomic():
        CreditAccount.objects.filter(pk=account.pk).update(balance_micros=-11)

    account.refresh_from_db()
    assert account.balance_micros == -10


def test_held_credits_cannot_be_negative(team):
    with pytest.raises(IntegrityError), transaction.atomic():
        CreditAccount.objects.filter(team=team).update(held_micros=-1)


def test_account_with_entries_and_team_with_account_are_protected(team):
    account = CreditAccount.objects.get(team=team)

    with pytest.raises(ProtectedError):
        account.delete()
    with pytest.raises(ProtectedError):
        team.delete()


def test_usage_record_is_unique_per_request_id(team):
    _usage(team)

    with pytest.raises(IntegrityError), transaction.atomic():
        _usage(team)
    assert UsageRecord.objects.count() == 1


def test_usage_total_must_be_the_sum_of_its_parts(team):
    with pytest.raises(IntegrityError), transaction.atomic():
        _usage(team, total_tokens=99)


def test_usage_charges_cannot_be_negative(team):
    with pytest.raises(IntegrityError), transaction.atomic():
        _usage(team, cost_micros=-1)


def test_usage_protects_what_it_points_at(team, deployment, model_group):
    key, _ = virtual_key_issue(team=team)
    job = Job.objects.create(team=team, job_type="resume")
    _usage(
        team, virtual_key=key, deployment=deployment, model_group=model_group, job=job
    )
    model_group.members.all().delete()

    for target in (deployment, model_group, key, job):
        with pytest.raises(ProtectedError):
            target.delete()


def test_price_is_unique_per_model_and_start(db):
    start = datetime(2026, 1, 1, tzinfo=UTC)
    ModelPrice.objects.create(
        model="openai/gpt-4o",
        input_price_per_million_micros=2_500_000,
        output_price_per_million_micros=10_000_000,
        effective_from=start,
    )

    with pytest.raises(IntegrityError), transaction.atomic():
        ModelPrice.objects.create(
            model="openai/gpt-4o",
            input_price_per_million_micros=1,
            output_price_per_million_micros=1,
            effective_from=start,
        )
    with pytest.raises(IntegrityError), transaction.atomic():
        ModelPrice.objects.create(
            model="openai/gpt-4o",
            input_price_per_million_micros=-1,
            output_price_per_million_micros=1,
            effective_from=timezone.now(),
        )


def test_money_conversions_never_take_floats():
    assert to_micros("0.0000015") == 2  # half up
    assert to_micros("1.25") == 1_250_000
    assert str(from_micros(1_250_000)) == "1.250000"
    with pytest.raises(TypeError):
        to_micros(0.1)  # type: ignore[arg-type]


@pytest.mark.django_db(transaction=True)
def test_concurrent_retries_of_one_allocation_write_one_entry(team):
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def allocate() -> None:
        try:
            barrier.wait()
            credits_allocate(
                team=team, amount_micros=7 * MICROS, idempotency_key="t:retry"
            )
        except BaseException as error:
            errors.append(error)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=allocate) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert LedgerEntry.objects.filter(idempotency_key="t:retry").count() == 1
    assert CreditAccount.objects.get(team=team).balance_micros == 107 * MICROS


def test_the_price_in_force_is_the_latest_not_after_the_moment(db):
    from billing.selectors import model_price_at

    for start, price in [
        (datetime(2026, 1, 1, tzinfo=UTC), 1),
        (datetime(2026, 6, 1, tzinfo=UTC), 2),
        (datetime(2027, 1, 1, tzinfo=UTC), 3),
    ]:
        ModelPrice.objects.create(
            model="m",
            input_price_per_million_micros=price,
            output_price_per_million_micros=price,
            effective_from=start,
        )

    assert model_price_at(model="m", at=datetime(2025, 12, 31, tzinfo=UTC)) is None
    assert (
        model_price_at(
            model="m", at=datetime(2026, 5, 31, tzinfo=UTC)
        ).input_price_per_million_micros
        == 1
    )
    assert (
        model_price_at(
            model="m", at=datetime(2026, 6, 1, tzinfo=UTC)
        ).input_price_per_million_micros
        == 2
    )
    assert (
        model_price_at(
            model="m", at=datetime(2026, 12, 31, tzinfo=UTC)
        ).input_price_per_million_micros
        == 2
    )
