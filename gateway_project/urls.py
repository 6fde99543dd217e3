from django.contrib import admin
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import include, path
from django.views import defaults
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from accounts.api.views import UserListCreateApi
from gateway_project import ops
from gateway_project.errors import error_body
from routing.api.views import ModelGroupListApi
from tenants.api.views import OrganizationListApi

admin.site.site_header = "LLM Gateway"
admin.site.site_title = "LLM Gateway admin"
admin.site.index_title = "Operations"

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
    # Seed 000's paths have no trailing slash.
    path("api/admin-users", UserListCreateApi.as_view()),
    path("api/admin-users/", include("accounts.api.urls")),
    path("api/organizations", OrganizationListApi.as_view()),
    path("api/model-groups", ModelGroupListApi.as_view()),
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
