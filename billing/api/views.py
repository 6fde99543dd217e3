"""Management API of teams and credits (seed 000)."""

import uuid
from typing import Any

from rest_framework.request import Request
from rest_framework.response import Response

from accounts.api.views import valid
from billing import selectors, services
from billing.api import serializers as io
from billing.models import LedgerEntryType
from gateway_project.errors import NotFound
from gateway_project.money import MICROS, credits_json, to_micros
from routing.models import ModelGroup
from tenants.api.auth import TeamAwareManagementApi, TenantApi, team_get_or_404
from tenants.api.serializers import model_fields
from tenants.api.views import organization_get_or_404
from tenants.models import Status, Team
from tenants.services import team_delete, team_update


def model_groups_or_404(names: list[str]) -> list[ModelGroup]:
    groups = list(ModelGroup.objects.filter(group_name__in=names))
    missing = sorted(set(names) - {group.group_name for group in groups})
    if missing:
        raise NotFound(f"Model group '{missing[0]}' not found", param="model_groups")
    return groups


def _team_body(team: Team) -> dict[str, Any]:
    return io.team_output(team, selectors.credit_account_for(team=team))


class TeamCreateApi(TeamAwareManagementApi):
    def post(self, request: Request) -> Response:
        data = model_fields(valid(io.TeamCreateInput, request.data))
        organization = organization_get_or_404(data.pop("organization_id"))
        groups = model_groups_or_404(data.pop("model_groups", []))
        credits = data.pop("credits_allocated")
        team, key, plaintext = services.team_open(
            organization=organization,
            model_groups=groups,
            credits_allocated_micros=credits * MICROS,
            **data,
            **self.audit_context(),
        )
        return Response(
            {**_team_body(team), "virtual_key": plaintext, "key_id": key.public_id}
        )


class TeamListApi(TeamAwareManagementApi):
    def get(self, request: Request) -> Response:
        teams = (
            Team.objects.exclude(status=Status.DELETED)
            .select_related("organization", "credit_account")
            .prefetch_related("model_groups")
            .order_by("team_id")
        )
        return Response([_team_body(team) for team in teams])


class TeamDetailApi(TeamAwareManagementApi):
    def get(self, request: Request, team_id: str) -> Response:
        return Response(_team_body(team_get_or_404(team_id)))

    def patch(self, request: Request, team_id: str) -> Response:
        team = team_get_or_404(team_id)
        changes = model_fields(valid(io.TeamUpdateInput, request.data))
        names = changes.pop("model_groups", None)
        groups = None if names is None else model_groups_or_404(names)
        team_update(
            team=team, changes=changes, model_groups=groups, **self.audit_context()
        )
        return Response(_team_body(team))

    def delete(self, request: Request, team_id: str) -> Response:
        team_delete(team=team_get_or_404(team_id), **self.audit_context())
        return Response({"message": f"Team '{team_id}' deleted"})


class TeamStatusApi(TeamAwareManagementApi):
    """POST /api/teams/{team_id}/suspend and /resume."""

    status = Status.ACTIVE

    def post(self, request: Request, team_id: str) -> Response:
        team = team_get_or_404(team_id)
        team_update(team=team, changes={"status": self.status}, **self.audit_context())
        return Response(_team_body(team))


class CreditBalanceApi(TenantApi):
    def get(self, request: Request, team_id: str) -> Response:
        team = self.team(team_id)
        return Response(
            io.balance_output(team, selectors.credit_account_for(team=team))
        )


class CreditAddApi(TeamAwareManagementApi):
    def post(self, request: Request, team_id: str) -> Response:
        team = team_get_or_404(team_id)
        data = valid(io.CreditsAddInput, request.data)
        idempotency_key = (
            data.get("idempotency_key")
            or request.headers.get("Idempotency-Key")
            # Without a caller's key every call is a new top-up (seed 000's
            # scripts send none and expect each one to count).
            or f"once:{uuid.uuid4().hex}"
        )
        entry = services.credits_allocate(
            team=team,
            amount_micros=data["credits"] * MICROS,
            idempotency_key=f"team:{team.pk}:add:{idempotency_key}",
            reason=data["reason"],
            entry_type=LedgerEntryType.TOP_UP,
            **self.audit_context(),
        )
        account = selectors.credit_account_for(team=team)
        return Response(
            {
                "team_id": team.team_id,
                "credits_added": credits_json(entry.amount_micros),
                "credits_remaining": credits_json(account.balance_micros),
                "transaction": io.transaction_output(entry),
            }
        )


class CreditTransactionsApi(TenantApi):
    def get(self, request: Request, team_id: str) -> Response:
        team = self.team(team_id)
        query = valid(io.TransactionsQuery, request.query_params)
        entries = selectors.ledger_entries(team=team, limit=query["limit"])
        return Response(
            {
                "team_id": team.team_id,
                "transactions": [io.transaction_output(entry) for entry in entries],
            }
        )


class CreditCheckApi(TenantApi):
    read_only = True  # a POST in seed 000, but it only reads

    def post(self, request: Request, team_id: str) -> Response:
        team = self.team(team_id)
        query = valid(io.CreditsCheckQuery, request.query_params)
        needed = to_micros(query["credits_needed"])
        account = selectors.credit_account_for(team=team)
        available = account.balance_micros + account.overdraft_limit_micros
        return Response(
            {
                "team_id": team.team_id,
                "credits_needed": credits_json(needed),
                "credits_remaining": credits_json(account.balance_micros),
                "sufficient": available >= needed,
            }
        )


class BudgetModeApi(TeamAwareManagementApi):
    def put(self, request: Request, team_id: str) -> Response:
        team = team_get_or_404(team_id)
        changes = valid(io.BudgetModeInput, request.data)
        team_update(team=team, changes=changes, **self.audit_context())
        return Response(
            io.balance_output(team, selectors.credit_account_for(team=team))
        )


class AutoRefillApi(TeamAwareManagementApi):
    def put(self, request: Request, team_id: str) -> Response:
        team = team_get_or_404(team_id)
        data = valid(io.AutoRefillInput, request.data)
        changes: dict[str, Any] = {
            "auto_refill_amount_micros": None
            if data["amount"] is None
            else data["amount"] * MICROS,
            "auto_refill_period": data["period"] if data["amount"] is not None else "",
        }
        if "overdraft_limit" in data:
            changes["overdraft_limit_micros"] = data["overdraft_limit"] * MICROS
        account = services.credit_account_update(
            team=team, changes=changes, **self.audit_context()
        )
        return Response(io.balance_output(team, account))
