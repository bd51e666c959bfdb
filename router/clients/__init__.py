"""The command line's clients: of a running daemon (dlq's redrive, tail) and of the archives
on disk (search, dlq's list and show).
"""
