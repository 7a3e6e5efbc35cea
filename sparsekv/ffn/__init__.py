"""FFN backends behind the same routed seam as attention (dense today; activation sparsity plugs in here)."""
