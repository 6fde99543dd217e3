from django.contrib.admin.apps import AdminConfig


class GatewayAdminConfig(AdminConfig):
    """Django's admin app, with the gateway's site (and its dashboard) as
    ``admin.site``."""

    default_site = "gateway_project.admin_site.GatewayAdminSite"
