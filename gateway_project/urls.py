from django.contrib import admin
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import include, path
from django.views import defaults
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from accounts.api.views import UserListCreateApi
from billing.api import analytics as analytics_api
from billing.api import jobs as jobs_api
from billing.api import views as billing_api
from gateway_project import ops
from gateway_project.errors import error_body
from routing import views as routing_views
from routing.api import views as routing_api
from tenants.api import views as tenants_api

admin.site.site_header = "LLM Gateway"
admin.site.site_title = "LLM Gateway admin"
admin.site.index_title = "Operations"

# The management API of seed 000 and its extensions; paths have no trailing slash.
api_urls = [
    path("organizations/create", tenants_api.OrganizationCreateApi.as_view()),
    path("organizations", tenants_api.OrganizationListApi.as_view()),
    path(
        "organizations/<str:organization_id>",
        tenants_api.OrganizationDetailApi.as_view(),
    ),
    path("model-groups/create", routing_api.ModelGroupCreateApi.as_view()),
    path("model-groups", routing_api.ModelGroupListApi.as_view()),
    path("model-groups/<str:group_name>", routing_api.ModelGroupDetailApi.as_view()),
    path(
        "model-groups/<str:group_name>/models",
        routing_api.ModelGroupModelsApi.as_view(),
    ),
    path("teams/create", billing_api.TeamCreateApi.as_view()),
    path("teams", billing_api.TeamListApi.as_view()),
    path("teams/<str:team_id>", billing_api.TeamDetailApi.as_view()),
    path(
        "teams/<str:team_id>/suspend",
        billing_api.TeamStatusApi.as_view(status="suspended"),
    ),
    path(
        "teams/<str:team_id>/resume", billing_api.TeamStatusApi.as_view(status="active")
    ),
    path("teams/<str:team_id>/keys", tenants_api.TeamKeyListIssueApi.as_view()),
    path("keys/<str:key_id>", tenants_api.KeyDetailApi.as_view()),
    path("keys/<str:key_id>/rotate", tenants_api.KeyRotateApi.as_view()),
    path("keys/<str:key_id>/revoke", tenants_api.KeyRevokeApi.as_view()),
    path("credits/teams/<str:team_id>/balance", billing_api.CreditBalanceApi.as_view()),
    path("credits/teams/<str:team_id>/add", billing_api.CreditAddApi.as_view()),
    path(
        "credits/teams/<str:team_id>/transactions",
        billing_api.CreditTransactionsApi.as_view(),
    ),
    path("credits/teams/<str:team_id>/check", billing_api.CreditCheckApi.as_view()),
    path(
        "credits/teams/<str:team_id>/budget-mode", billing_api.BudgetModeApi.as_view()
    ),
    path(
        "credits/teams/<str:team_id>/auto-refill", billing_api.AutoRefillApi.as_view()
    ),
    path("stats/dashboard", routing_api.DashboardApi.as_view()),
    path("usage/summary", analytics_api.UsageSummaryApi.as_view()),
    path(
        "usage/by-model-group",
        analytics_api.UsageBreakdownApi.as_view(report="by-model-group"),
    ),
    path(
        "usage/by-deployment",
        analytics_api.UsageBreakdownApi.as_view(report="by-deployment"),
    ),
    path("usage/by-key", analytics_api.UsageBreakdownApi.as_view(report="by-key")),
    path("usage/series", analytics_api.UsageSeriesApi.as_view()),
    path("usage/export.csv", analytics_api.UsageExportApi.as_view()),
    path("jobs/create", jobs_api.JobCreateApi.as_view()),
    path("jobs/<str:job_id>", jobs_api.JobDetailApi.as_view()),
    path("jobs/<str:job_id>/costs", jobs_api.JobCostsApi.as_view()),
    path("jobs/<str:job_id>/complete", jobs_api.JobCompleteApi.as_view()),
    path("jobs/<str:job_id>/llm-call", routing_views.job_llm_call),
    path("jobs/<str:job_id>/llm-call-stream", routing_views.job_llm_call_stream),
]

urlpatterns = [
    path("health", ops.health, name="health"),
    path("healthz", ops.healthz, name="healthz"),
    path("readyz", ops.readyz, name="readyz"),
    path("metrics", ops.metrics, name="metrics"),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path(
        "api/docs/",
        SpectacularSwaggerView.as_view(url_name="api-schema"),
        name="api-docs",
    ),
    path("admin/", admin.site.urls),
    path("api/admin-users", UserListCreateApi.as_view()),
    path("api/admin-users/", include("accounts.api.urls")),
    path("api/", include(api_urls)),
    path("v1/chat/completions", routing_views.chat_completions),
    path("v1/completions", routing_views.completions),
    path("v1/embeddings", routing_views.embeddings),
    path("v1/models", routing_views.models),
    path("v1/generate", routing_views.generate),
]

_API_PREFIXES = ("/api/", "/v1/")


def handler404(request: HttpRequest, exception: Exception) -> HttpResponse:
    if request.path.startswith(_API_PREFIXES):
        body = error_body(
            f"No route for {request.method} {request.path}",
            code="not_found",
            status=404,
        )
        return JsonResponse(body, status=404)
    return defaults.page_not_found(request, exception)


def handler500(request: HttpRequest) -> HttpResponse:
    if request.path.startswith(_API_PREFIXES):
        body = error_body("Internal server error", code="internal_error", status=500)
        return JsonResponse(body, status=500)
    return defaults.server_error(request)
