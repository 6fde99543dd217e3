import io

import pytest
from django.core.management import call_command
from django.db import connection

OUR_APPS = ("accounts", "tenants", "routing", "billing")


def _tables() -> set[str]:
    return set(connection.introspection.table_names())


def test_models_and_migrations_agree(db):
    out = io.StringIO()

    # --check exits non-zero when a model change has no migration.
    call_command("makemigrations", "--check", "--dry-run", stdout=out)

    assert "No changes detected" in out.getvalue()


@pytest.mark.django_db(transaction=True)
def test_migrations_apply_from_zero_and_back():
    # Unapplying these two unapplies everything that depends on them.
    call_command("migrate", "accounts", "zero", verbosity=0)
    call_command("migrate", "routing", "zero", verbosity=0)
    remaining = {t for t in _tables() if t.startswith(OUR_APPS)}
    assert remaining == set()

    call_command("migrate", verbosity=0)

    tables = _tables()
    for table in (
        "accounts_user",
        "tenants_team",
        "routing_modelgroup",
        "billing_ledgerentry",
        "billing_usagerecord",
    ):
        assert table in tables
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'billing_ledgerentry'::regclass "
            "AND NOT tgisinternal"
        )
        assert cursor.fetchall() == [("billing_ledger_append_only",)]
