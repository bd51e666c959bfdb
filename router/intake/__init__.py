"""The way in: events offered by producers become accepted events in the journal.

http.py reads a POST /v1/events body within its limits, inflates and decodes it, and answers
per event; validation.py checks each event against the event schema and the service
catalogues; limits.py bounds an event's shape and keeps its numbers exact; redaction.py masks
or hashes sensitive values before the journal sees them.
"""
