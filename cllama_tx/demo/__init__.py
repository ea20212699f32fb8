"""
The offline demo: a built-in deterministic model (L{model}) served by an
in-process provider that speaks the providers' exact wire formats.
"""
