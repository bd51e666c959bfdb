"""What the router shows its operators: counters (metrics.py), their Prometheus form
(prometheus.py), the log format (logformat.py) and systemd's readiness protocol (sdnotify.py).
"""
