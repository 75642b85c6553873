"""The example project's Django URLs (the admin); streams are served by runserver_stream."""

from django.contrib import admin
from django.urls import path

urlpatterns = [path("admin/", admin.site.urls)]
