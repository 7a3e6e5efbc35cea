"""Registered over vLLM's MLA backends while the plugin is on: importing it is the start-up
error, since sparsekv's methods score per-head keys and an MLA model has latent ones."""
from sparsekv.vllm_plugin.config import MLA_REFUSED

raise RuntimeError(MLA_REFUSED)
