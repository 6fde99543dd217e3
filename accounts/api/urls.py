from django.urls import path

from accounts.api import views

urlpatterns = [
    path("setup/status", views.SetupStatusApi.as_view()),
    path("setup", views.SetupApi.as_view()),
    path("login", views.LoginApi.as_view()),
    path("logout", views.LogoutApi.as_view()),
    path("me", views.MeApi.as_view()),
    path("me/change-password", views.PasswordChangeApi.as_view()),
    path("audit-logs", views.AuditLogListApi.as_view()),
    path("<uuid:user_id>", views.UserDetailApi.as_view()),
]
