"""Run under vLLM's Python by tests/test_vllm_plugin.py: vLLM's offline LLM, greedy, on the
prompts given; prints one JSON line with the token ids. The caller's environment decides the
attention (SPARSEKV_SPARSITY_CONFIG set: the plugin; unset: vLLM's own)."""
import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams

    model, max_tokens, prompts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    llm = LLM(model=model, max_model_len=4096, enforce_eager=True, dtype="float32", max_num_seqs=4,
              block_size=32, enable_prefix_caching=False)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)


if __name__ == "__main__":  # vLLM's engine core is spawned: the module must not run on import
    main()
