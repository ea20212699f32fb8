"""
The sites: what listens.  The API (inference paths handed to the pipeline,
plus history, models, keys, billing and operations routes) and the operator
UI.  Thin: they authenticate, parse and hand each request on.
"""
