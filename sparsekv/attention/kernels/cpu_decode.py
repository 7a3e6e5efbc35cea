"""TEMP placeholder until the compiled kernel lands (not committed)."""
def available() -> bool:
    return False
def paged_decode_cpu(*a, **k):
    raise NotImplementedError
