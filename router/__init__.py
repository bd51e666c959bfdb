"""event-router: validates, routes and delivers IBM Cloud Activity Tracker audit events."""

__version__ = "0.1.0"
