"""
Storage: the ledger and its writer, the row schema, SQLite transactions,
spill files and the bounded JSON file reader.  Imports nothing above it.
"""
