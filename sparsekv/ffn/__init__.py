"""FFN backends behind the same routed seam as attention: dense, and the activation-sparse
TEAL, WINA and CHESS (registered here)."""
from sparsekv.ffn.backend import FFN_BACKENDS
from sparsekv.ffn.chess import CHESS
from sparsekv.ffn.teal import TEAL
from sparsekv.ffn.wina import WINA

for _backend in (TEAL(), WINA(), CHESS()):
    FFN_BACKENDS[_backend.name] = _backend
