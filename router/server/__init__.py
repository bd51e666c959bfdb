"""The HTTP surface of a running daemon: the listener (listener.py, servertls.py), who may
call what (auth.py), the management API (api.py) and the live tail (tail.py). The ingest
endpoint itself is router/intake/http.py.
"""
