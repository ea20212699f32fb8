"""
Real agent runners and SDKs, installed pinned from their registries, each
completing a tool-calling loop through the real daemon against a scripted
provider (see harness.py; docs/CLIENTS.md says what each needs).
"""
