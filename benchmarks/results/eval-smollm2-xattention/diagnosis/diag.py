import sys, time, torch, json
torch.set_num_threads(2)
from sparsekv import LLM
from sparsekv.engine.sampling_params import SamplingParams
from sparsekv.eval.tasks import generate
from sparsekv.eval.capture import capture
from sparsekv.eval.blocks import block_mass, xattention_selection, recall
depth = float(sys.argv[1]) if len(sys.argv) > 1 else 0.5
llm = LLM("/work/models/smollm2-hf", dtype="float32", max_model_len=2200)
tok = llm.tokenizer
count = lambda t: len(tok.encode(t))
s = generate("passkey", 2048, 2, count, depths=[depth])
ids = tok.encode(s.prompt)
key = s.references[0]
# needle token position: find the first token index whose decoded prefix contains key
needle_char = s.prompt.index(key)
pos = next(i for i in range(len(ids)) if len(tok.decode(ids[:i+1])) > needle_char)
print("len", len(ids), "needle pos", pos, "block", pos // 128, "key", key)
L = list(range(30))
t0 = time.time()
with capture(llm.engine.runner.model, tuple(L)) as cap:
    out = llm.generate([s.prompt], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    cap.tag(0, len(ids))
print("prefill", time.time() - t0, repr(out[0].outputs[0].text))
model = llm.engine.runner.model
nb = pos // 128
res = []
for l in L:
    q, k = cap.qk(l, model)
    m = block_mass(q, k, 128)
    last = block_mass(q, k, 128, rows=slice(len(ids) - 1, len(ids)))[:, 0]
    for stride in (8,):
        sel, _ = xattention_selection({"stride": stride}, l, q, k)
        r = recall(m, sel)
        print(f"L{l:2d} S{stride} massrec {r['mass_recall']:.3f} topk {r['topk_recall']:.3f} dens {r['density']:.3f} | "
              f"last-qblock needle sel {sel[:, -1, nb].int().tolist()} | lastrow needle mass {[round(x,2) for x in last[:, nb].tolist()]} "
              f"| lastqblock needle mass {[round(x,3) for x in m[:, -1, nb].tolist()]}")
    torch.save({"q": q, "k": k}, f"/tmp/xa/qk_L{l}.pt") if l in (10, 15, 20) else None
