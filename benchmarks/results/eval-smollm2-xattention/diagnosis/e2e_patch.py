import sys, time, torch, json
torch.set_num_threads(2)
import sparsekv.attention.xattention as X
orig = X.select_blocks
mode = sys.argv[1]
def patched(scores, taus, first_block):
    sel = orig(scores, taus, first_block)
    h, nqb, nkb = sel.shape
    causal = torch.arange(nkb).view(1, -1) <= (first_block + torch.arange(nqb)).view(-1, 1)
    causal = causal.expand(h, -1, -1)
    if mode == "lastdense":
        sel = sel.clone(); sel[:, -1] = causal[:, -1]
    elif mode == "fullsel_kernel":
        sel = causal.clone()
    elif mode == "onlylastsparse":
        sel = torch.where(torch.arange(nqb).view(1, -1, 1) == nqb - 1, sel, causal)
    return sel
X.select_blocks = patched
if mode.startswith("oracle"):
    from sparsekv.eval.blocks import block_mass
    def oracle_scores(q, k, geom, stride, norm, antidiagonal=True, chunk_elems=0):
        n = geom.context_len
        assert geom.first_block == 0
        return block_mass(q[:, :n], k[:, :n], geom.block_size)
    X.block_scores = oracle_scores
if mode == "fullsel_kernel":
    X.causal_blocks = lambda geom, hq: torch.zeros(1)
from sparsekv import LLM
from sparsekv.config import SparsityConfig
from sparsekv.engine.sampling_params import SamplingParams
from sparsekv.eval.tasks import generate
llm = LLM("/work/models/smollm2-hf", dtype="float32", max_model_len=2200, enable_prefix_caching=False, max_num_seqs=1)
tok = llm.tokenizer
count = lambda t: len(tok.encode(t))
samples = [generate("passkey", 2048, i, count, depths=[0.0, 0.25, 0.5, 0.75, 1.0]) for i in json.loads(sys.argv[2])]
sp = SparsityConfig.model_validate(json.loads(sys.argv[3]) if len(sys.argv) > 3 else {"prefill": {"method": "xattention"}})
outs = llm.generate([s.prompt for s in samples], SamplingParams(temperature=0, max_tokens=10), sparsity=sp, use_tqdm=False)
print(mode, outs[0].sparsity.as_dict().get('prefill_attended_fraction'), [(s.depth, s.references[0] in o.outputs[0].text, o.outputs[0].text[:22]) for s, o in zip(samples, outs)], flush=True)
