"""The operator UI's templates and static files, shipped as package data (cllama_tx.web)."""
