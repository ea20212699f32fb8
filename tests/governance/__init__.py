"""Tests for cllama_tx.governance (pure logic, no reactor)."""
