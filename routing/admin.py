from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db import transaction
from django.db.models import Count, Prefetch, QuerySet
from django.http import HttpRequest, HttpResponse

from accounts.admin_base import AuditedAdmin, ObjectAction, operator
from gateway_project.middleware import client_ip
from routing.models import Deployment, ModelGroup, ModelGroupMember, ProviderCredential
from routing.services import deployment_test


class ProviderCredentialForm(forms.ModelForm):
    api_base = forms.URLField(
        required=False,
        max_length=500,
        assume_scheme="https",
        help_text="Leave blank for the provider's default endpoint.",
    )
    # Write-only: the stored key is never rendered back into the page.
    api_key = forms.CharField(
        required=False,
        widget=forms.PasswordInput(render_value=False),
        help_text="Stored encrypted. Leave blank to keep the current key.",
    )

    class Meta:
        model = ProviderCredential
        fields = ("name", "provider", "api_base", "extra")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.api_key_hint:
            self.fields["api_key"].help_text = (
                f"The current key ends {self.instance.api_key_hint} and is stored "
                "encrypted. Leave blank to keep it."
            )

    def save(self, commit: bool = True) -> ProviderCredential:
        credential = super().save(commit=False)
        if self.cleaned_data.get("api_key"):
            credential.set_api_key(self.cleaned_data["api_key"])
        if commit:
            credential.save()
        return credential


@admin.register(ProviderCredential)
class ProviderCredentialAdmin(AuditedAdmin):
    changes_routing = True
    audit_resource_type = "provider_credential"
    form = ProviderCredentialForm
    list_display = (
        "name",
        "provider",
        "api_base",
        "masked_key",
        "deployment_count",
        "updated_at",
    )
    list_filter = ("provider",)
    search_fields = ("name", "provider", "api_base")
    readonly_fields = ("masked_key", "created_at", "updated_at")
    fields = (
        "name",
        "provider",
        "api_base",
        "api_key",
        "masked_key",
        "extra",
        "created_at",
        "updated_at",
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[ProviderCredential]:
        return (
            super()
            .get_queryset(request)
            .annotate(deployment_count=Count("deployments"))
        )

    @admin.display(description="API key")
    def masked_key(self, obj: ProviderCredential) -> str:
        return obj.api_key_hint or "—"

    @admin.display(ordering="deployment_count", description="deployments")
    def deployment_count(self, obj: Any) -> int:
        return obj.deployment_count


@admin.register(Deployment)
class DeploymentAdmin(AuditedAdmin):
    changes_routing = True
    audit_resource_type = "deployment"
    list_display = (
        "name",
        "model",
        "credential",
        "status",
        "timeout_ms",
        "rpm_limit",
        "tpm_limit",
    )
    list_filter = ("status", "credential__provider")
    search_fields = ("name", "model")
    list_select_related = ("credential",)
    readonly_fields = ("created_at", "updated_at")
    actions = ["test_deployments"]

    def get_object_actions(self, request: HttpRequest, obj: Any) -> list[ObjectAction]:
        return [ObjectAction("Test", action="test_deployments")]

    @admin.action(
        description="Test selected deployments (one tiny call each)",
        permissions=["change"],
    )
    def test_deployments(
        self, request: HttpRequest, queryset: QuerySet[Deployment]
    ) -> HttpResponse | None:
        for deployment in queryset.select_related("credential").order_by("name"):
            result = deployment_test(
                deployment=deployment,
                actor=operator(request),
                ip_address=client_ip(request),
            )
            self.message_user(
                request,
                f"Deployment {deployment.name} {result.summary} in "
                f"{result.latency_ms} ms.",
                messages.SUCCESS if result.succeeded else messages.ERROR,
            )
        return self.action_done(request)


class ModelGroupMemberInline(admin.TabularInline):
    """Members and their priorities, edited in place on the group's page."""

    model = ModelGroupMember
    fields = ("deployment", "priority", "weight")
    autocomplete_fields = ("deployment",)
    extra = 1
    ordering = ("priority", "id")


def _members(group: ModelGroup) -> list[dict[str, Any]]:
    return [
        {"deployment": m.deployment.name, "priority": m.priority, "weight": m.weight}
        for m in group.members.select_related("deployment").order_by("priority", "id")
    ]


@admin.register(ModelGroup)
class ModelGroupAdmin(AuditedAdmin):
    changes_routing = True
    audit_resource_type = "model_group"
    list_display = (
        "group_name",
        "display_name",
        "status",
        "member_count",
        "member_order",
        "updated_at",
    )
    list_filter = ("status",)
    search_fields = ("group_name", "display_name", "description")
    inlines = [ModelGroupMemberInline]
    fields = ("group_name", "display_name", "description", "status")

    def get_queryset(self, request: HttpRequest) -> QuerySet[ModelGroup]:
        members = ModelGroupMember.objects.select_related("deployment").order_by(
            "priority", "id"
        )
        return (
            super()
            .get_queryset(request)
            .annotate(member_count=Count("members"))
            .prefetch_related(Prefetch("members", queryset=members))
        )

    @admin.display(ordering="member_count", description="deployments")
    def member_count(self, obj: Any) -> int:
        return obj.member_count

    @admin.display(description="priority order")
    def member_order(self, obj: ModelGroup) -> str:
        return ", ".join(
            f"{m.deployment.name} ({m.priority})" for m in obj.members.all()
        )

    def save_related(
        self, request: HttpRequest, form: Any, formsets: Any, change: bool
    ) -> None:
        # Members edited inline are audited as one before/after, like
        # model_group_replace_models does for the API.
        with transaction.atomic():
            before = _members(form.instance) if change else []
            super().save_related(request, form, formsets, change)
            after = _members(form.instance)
            if before != after:
                self._audit(
                    request,
                    "members",
                    form.instance,
                    {"before": before, "after": after},
                )
