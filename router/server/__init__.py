"""The HTTP surface of a running daemon: the listener (listener.py, servertls.py), who may
call what (auth.py), the management API (api.py; its metadata in metadata.py, which files
it may have the daemon touch in fileguard.py) and the live tail (tail.py). The ingest
endpoint itself is router/intake/http.py.
"""

from typing import Final

# The hidden command line of a worker process of `server.workers` (router/server/workers.py
# starts it, router/cli/serve.py runs it); here so the command line need not import the server.
WORKER_COMMAND: Final = "_worker"
