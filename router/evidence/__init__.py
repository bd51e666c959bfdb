"""Evidence: hash-chained archives, signed checkpoints, and what `event-router verify` checks.

Each chained target (the file target) writes every line with a `_chain` member that links it to
the line before (canonical.py: the bytes hashed, defined once); dead letters written for the
target take their places in the same chain, in its dead-letter file. Every N links or T
seconds, and when the target stops, a checkpoint of the chain head, signed with Ed25519 when
`evidence.signing_key_file` is set (checkpoint.py), is written into the archive and kept in the
journal. verify.py reads the files back and names the first place where they disagree;
bucket.py does the same over a bucket's objects or a Kafka topic's messages (whose place in the
chain travels in headers: canonical.py).

The hashing happens in the target's write, on the delivery worker, never at ingest.

The package's modules, bottom up: canonical.py (the bytes hashed, defined once), chain.py (a
target's head, recovered from its files), checkpoint.py and keys.py (Ed25519), registry.py (the
daemon's Evidence), verify.py (`event-router verify`), receipt.py (receipts and their lookup).
This module imports nothing, so a target module can use chain.py while config.py imports it.
"""
