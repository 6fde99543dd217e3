from typing import Any

from django import forms
from django.contrib import admin
from django.db.models import Count, QuerySet
from django.http import HttpRequest

from accounts.admin_base import AuditedAdmin
from routing.models import Deployment, ModelGroup, ModelGroupMember, ProviderCredential


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

    def save(self, commit: bool = True) -> ProviderCredential:
        credential = super().save(commit=False)
        if self.cleaned_data.get("api_key"):
            credential.set_api_key(self.cleaned_data["api_key"])
        if commit:
            credential.save()
        return credential


@admin.register(ProviderCredential)
class ProviderCredentialAdmin(AuditedAdmin):
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


class ModelGroupMemberInline(admin.TabularInline):
    model = ModelGroupMember
    fields = ("deployment", "priority", "weight")
    autocomplete_fields = ("deployment",)
    extra = 1
    ordering = ("priority", "id")


@admin.register(ModelGroup)
class ModelGroupAdmin(AuditedAdmin):
    audit_resource_type = "model_group"
    list_display = (
        "group_name",
        "display_name",
        "status",
        "member_count",
        "updated_at",
    )
    list_filter = ("status",)
    search_fields = ("group_name", "display_name", "description")
    inlines = [ModelGroupMemberInline]
    fields = ("group_name", "display_name", "description", "status")

    def get_queryset(self, request: HttpRequest) -> QuerySet[ModelGroup]:
        return super().get_queryset(request).annotate(member_count=Count("members"))

    @admin.display(ordering="member_count", description="deployments")
    def member_count(self, obj: Any) -> int:
        return obj.member_count
