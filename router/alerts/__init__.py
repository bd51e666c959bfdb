"""Alerts on accepted events: presence (a threshold of matches within a window) or absence
(no match for a window), on a query or a saved view. `state` is the pure state machine of
one alert; `watch` runs them all against ingest and time, keeps them durable beside the
journal (router/journal/alertstate.py) and announces each trigger and resolve as an event
of the router itself, journaled for the alert's targets.
"""
