"""The durable hand-off between intake and delivery: one backlog (cursor) per target.

sqlite.py is the journal on local disk (SQLite in WAL mode, a CRC per record); salvage.py
reads back what survives of a damaged database file.
"""
