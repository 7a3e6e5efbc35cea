import sys, time, torch, json
torch.set_num_threads(2)
from sparsekv import LLM
from sparsekv.engine.sampling_params import SamplingParams
from sparsekv.eval.tasks import generate
from sparsekv.eval.capture import capture
from sparsekv.eval.blocks import block_mass, xattention_selection, recall
from sparsekv.attention.xattention_select import select_blocks
llm = LLM("/work/models/smollm2-hf", dtype="float32", max_model_len=2200, enable_prefix_caching=False)
tok = llm.tokenizer
count = lambda t: len(tok.encode(t))
model = llm.engine.runner.model
for i in (2, 3, 6, 7):
    s = generate("passkey", 2048, i, count, depths=[0.0, 0.25, 0.5, 0.75, 1.0])
    ids = tok.encode(s.prompt); n = len(ids)
    nb = len(tok.encode(s.prompt[:s.prompt.index(s.references[0])])) // 128
    with capture(model, tuple(range(30))) as cap:
        llm.generate([s.prompt], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
        cap.tag(0, n)
    tot = {"xa": [], "oracle_blockavg": [], "xa_needle": [], "or_needle": [], "n_ret": 0}
    for l in range(2, 30):
        q, k = cap.qk(l, model)
        m = block_mass(q, k, 128)
        last = block_mass(q, k, 128, rows=slice(n - 1, n))[:, 0]  # [H, nkb]
        sel, _ = xattention_selection({}, l, q, k)
        orc = select_blocks(m, torch.full((9,), 0.9), 0)
        tot["xa"].append(float((last * sel[:, -1]).sum(-1).mean()))
        tot["oracle_blockavg"].append(float((last * orc[:, -1]).sum(-1).mean()))
        ret = last[:, nb] > 0.2
        tot["n_ret"] += int(ret.sum())
        tot["xa_needle"] += sel[:, -1, nb][ret].tolist()
        tot["or_needle"] += orc[:, -1, nb][ret].tolist()
    print(f"depth {s.depth} needle block {nb}: last-row mass kept xa {sum(tot['xa'])/28:.3f} oracle(block-avg mass, tau .9) {sum(tot['oracle_blockavg'])/28:.3f}; "
          f"retrieval heads (last row >0.2 on needle block) {tot['n_ret']}: needle kept xa {sum(tot['xa_needle'])}/{tot['n_ret']} oracle {sum(tot['or_needle'])}/{tot['n_ret']}", flush=True)
