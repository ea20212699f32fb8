"""
The running daemon: configuration, service wiring (makeService), listeners,
TLS, the upstream HTTP client, drain, metrics, logs and the audit stream.
The only place that knows Twisted's private names.
"""
