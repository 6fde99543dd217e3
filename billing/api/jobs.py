"""The jobs API of seed 000, for a team's key. The calls themselves
(llm-call, llm-call-stream) are async views in routing/views.py."""

import uuid
from typing import Any

from rest_framework import serializers
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.api.serializers import StrictSerializer
from accounts.api.views import valid
from billing import services
from billing.models import Job, JobStatus
from gateway_project.errors import GatewayError, NotFound
from gateway_project.inputs import MetadataField
from gateway_project.money import credits_json
from tenants.api.auth import TeamKeyAuthentication, TeamKeyPrincipal


class IsTeamKey(BasePermission):
    message = "Jobs are used with a team's key"

    def has_permission(self, request: Request, view: APIView) -> bool:
        from rest_framework.exceptions import NotAuthenticated

        if request.user is None:
            raise NotAuthenticated(
                "Missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key'"
            )
        return isinstance(request.user, TeamKeyPrincipal)


class JobApi(APIView):
    authentication_classes = [TeamKeyAuthentication]
    permission_classes = [IsTeamKey]

    @property
    def principal(self) -> TeamKeyPrincipal:
        assert isinstance(self.request.user, TeamKeyPrincipal)
        return self.request.user

    def job(self, job_id: str) -> Job:
        try:
            job = Job.objects.filter(job_id=uuid.UUID(job_id)).first()
        except ValueError:
            job = None
        if job is None:
            raise NotFound(f"Job '{job_id}' not found", param="job_id")
        if job.team_id != self.principal.key.team_id:
            raise GatewayError(
                "This job belongs to another team",
                code="permission_denied",
                http_status=403,
            )
        return job


class JobCreateInput(StrictSerializer):
    team_id = serializers.CharField(max_length=128)
    job_type = serializers.CharField(max_length=100)
    user_id = serializers.CharField(
        max_length=200, required=False, default="", allow_blank=True
    )
    metadata = MetadataField(required=False, default=dict)


class JobCompleteInput(StrictSerializer):
    status = serializers.ChoiceField(choices=[JobStatus.COMPLETED, JobStatus.FAILED])
    metadata = MetadataField(required=False, default=dict)
    error_message = serializers.CharField(required=False, default="", allow_blank=True)


def job_output(job: Job) -> dict[str, Any]:
    return {
        "job_id": str(job.job_id),
        "team_id": job.team.team_id,
        "job_type": job.job_type,
        "status": job.status,
        "user_id": job.user_id or None,
        "metadata": job.metadata,
        "error_message": job.error_message or None,
        "created_at": job.created_at.isoformat(),
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "completed_at": job.completed_at.isoformat() if job.completed_at else None,
    }


def costs_output(job: Job) -> dict[str, Any]:
    calls = job.usage_records.select_related("model_group", "deployment").order_by(
        "created_at"
    )
    return {
        "job_id": str(job.job_id),
        "status": job.status,
        "total_calls": job.total_calls,
        "successful_calls": job.successful_calls,
        "failed_calls": job.failed_calls,
        "total_tokens": job.total_tokens,
        "total_cost_usd": credits_json(job.total_cost_micros),
        "credits_charged": credits_json(job.credits_charged_micros),
        "calls": [
            {
                "call_id": record.request_id,
                "model": record.requested_model,
                "deployment": record.deployment.name if record.deployment else None,
                "status": record.status,
                "tokens": record.total_tokens,
                "cost_usd": credits_json(record.cost_micros),
                "latency_ms": record.latency_ms,
                "purpose": record.metadata.get("purpose"),
                "created_at": record.created_at.isoformat(),
            }
            for record in calls
        ],
    }


class JobCreateApi(JobApi):
    def post(self, request: Request) -> Response:
        data = valid(JobCreateInput, request.data)
        if data["team_id"] != self.principal.key.team.team_id:
            raise GatewayError(
                "This key belongs to another team",
                code="permission_denied",
                http_status=403,
                param="team_id",
            )
        job = services.job_create(
            team=self.principal.key.team,
            key=self.principal.key,
            job_type=data["job_type"],
            user_id=data["user_id"],
            metadata=data["metadata"],
        )
        return Response(
            {
                "job_id": str(job.job_id),
                "status": job.status,
                "created_at": job.created_at.isoformat(),
            }
        )


class JobDetailApi(JobApi):
    def get(self, request: Request, job_id: str) -> Response:
        return Response(job_output(self.job(job_id)))


class JobCostsApi(JobApi):
    def get(self, request: Request, job_id: str) -> Response:
        return Response(costs_output(self.job(job_id)))


class JobCompleteApi(JobApi):
    def post(self, request: Request, job_id: str) -> Response:
        job = self.job(job_id)
        data = valid(JobCompleteInput, request.data)
        job = services.job_complete(job=job, **data)
        return Response({**job_output(job), "costs": costs_output(job)})
