import sys, time, torch, json
torch.set_num_threads(2)
from sparsekv import LLM
from sparsekv.config import SparsityConfig
from sparsekv.engine.sampling_params import SamplingParams
from sparsekv.eval.tasks import generate
llm = LLM("/work/models/smollm2-hf", dtype="float32", max_model_len=2200, enable_prefix_caching=False)
tok = llm.tokenizer
count = lambda t: len(tok.encode(t))
samples = [generate("passkey", 2048, i, count, depths=[0.0, 0.25, 0.5, 0.75, 1.0]) for i in json.loads(sys.argv[1])]
variants = json.loads(sys.argv[2])
for name, cfg in variants.items():
    sp = SparsityConfig.model_validate(cfg)
    t0 = time.time()
    outs = llm.generate([s.prompt for s in samples], SamplingParams(temperature=0, max_tokens=10), sparsity=sp, use_tqdm=False)
    hits = [s.references[0] in o.outputs[0].text for s, o in zip(samples, outs)]
    print(f"{name:28s} {sum(hits)}/{len(hits)} att={outs[0].sparsity.as_dict().get('prefill_attended_fraction')} {time.time()-t0:.0f}s",
          [(s.depth, o.outputs[0].text[:22]) for s, o in zip(samples, outs)], flush=True)
