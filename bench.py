"""
bench.py: nanollm's throughput against the physical floor of the same work (a benchmark, not a test).

  python bench.py                      # nano-vllm's workload: 256 sequences, random Qwen3-0.6B shape (bf16)
  python bench.py --single-stream      # one sequence, 1,024 new tokens
  python bench.py --gpu-memory-gb 8    # the whole engine capped at 8 GB
  python bench.py --shape qwen3-8b     # another checkpoint's shape (see SHAPES: Qwen3, Llama 3.2, Qwen2.5)
  python bench.py --engine hf --num-seqs 64   # HF transformers' continuous batching, same workload

Warm-up is kept out of the timed region; the last line printed is JSON.
"""
import argparse
import json
import math
import os
import statistics
import struct
import time
from pathlib import Path
from random import randint, seed

import torch

from nanollm import LLM, SamplingParams, build_random_checkpoint

# --shape NAME: the architecture and config.json fields of a public checkpoint, built with random weights
SHAPES = {
    "qwen3-0.6b": ("Qwen3ForCausalLM", dict(
        hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=40960,
        rope_theta=1000000, rms_norm_eps=1e-6)),
    "qwen3-8b": ("Qwen3ForCausalLM", dict(
        hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        intermediate_size=12288, vocab_size=151936, tie_word_embeddings=False, max_position_embeddings=40960,
        rope_theta=1000000, rms_norm_eps=1e-6)),
    "llama-3.2-1b": ("LlamaForCausalLM", dict(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072,
        rope_theta=500000, rms_norm_eps=1e-5,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192))),
    "qwen2.5-0.5b": ("Qwen2ForCausalLM", dict(  # its config.json has no head_dim: hidden / heads = 64
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
        intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
        rope_theta=1000000, rms_norm_eps=1e-6)),
}


def default_model_dir(shape, num_layers=None):
    architecture, config = SHAPES[shape]
    if num_layers:  # fewer layers: a model too large for the disk, at the same speed per layer
        config, shape = config | dict(num_hidden_layers=num_layers), f"{shape}-{num_layers}-layers"
    root = os.environ.get("NANOLLM_CACHE", os.path.expanduser("~/.cache/nanollm"))
    path = Path(root) / f"{shape}-random"
    if not (path / "config.json").exists():  # built aside, then renamed: never a half-written cache
        print(f"building a random-weight {shape} checkpoint in {path} (once) ...", flush=True)
        tmp = path.with_name(path.name + ".tmp")
        build_random_checkpoint(str(tmp), dtype=torch.bfloat16, architecture=architecture, **config)
        tmp.rename(path)
    return str(path)


def count_params(model_dir):  # read the safetensors headers: no weights are loaded
    total = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, meta in header.items():
            if name != "__metadata__":
                total += math.prod(meta["shape"])
    return total


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device, reps=10):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(); fn(); end.record(); end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_hardware(device):
    # Copy bandwidth: bytes read + bytes written by one large copy. Matmul rate: one big bf16 GEMM.
    # On CPU (smoke tests only) the sizes are small and the GEMM is fp32: the numbers mean little there.
    nbytes, n, dtype = (2 << 30, 8192, torch.bfloat16) if device == "cuda" else (64 << 20, 1024, torch.float32)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_bw = 2 * nbytes / median_seconds(lambda: dst.copy_(src), device)
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    matmul_flops = 2 * n**3 / median_seconds(lambda: torch.matmul(a, b), device)
    del src, dst, a, b
    if device == "cuda":
        torch.cuda.empty_cache()
    return copy_bw, matmul_flops


def physical_floor(cfg, params, prompt_lens, max_tokens, copy_bw, matmul_flops):
    layers, heads, hidden = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // heads
    kv_bytes_per_token = 2 * layers * cfg["num_key_value_heads"] * head_dim * 2  # K and V, bf16
    # (a) decode is memory-bound: every step reads all weights once, plus each running sequence's KV cache.
    # Simple schedule: all sequences decode together; sequence i runs max_tokens[i] steps, at step t it reads
    # (prompt_len + t) tokens of KV, so over its life it reads m*p + m*(m-1)/2 tokens of KV.
    decode_steps = max(max_tokens)
    kv_tokens_read = sum(m * p + m * (m - 1) // 2 for p, m in zip(prompt_lens, max_tokens))
    decode_bytes = decode_steps * params * 2 + kv_tokens_read * kv_bytes_per_token
    # (b) prefill is compute-bound: 2 FLOPs per weight per prompt token (the embedding is a lookup, so it is
    # left out, and the LM head runs on the last prompt token only), plus causal attention QK^T and PV.
    embed = cfg["vocab_size"] * hidden
    body_params = params - embed * (1 if cfg.get("tie_word_embeddings", False) else 2)
    prefill_flops = (2 * body_params * sum(prompt_lens) + 2 * embed * len(prompt_lens)
                     + 2 * 2 * layers * heads * head_dim * sum(p * p for p in prompt_lens) / 2)
    return dict(decode_bytes=decode_bytes, prefill_flops=prefill_flops, weights_bytes=params * 2,
                kv_bytes_per_token=kv_bytes_per_token, decode_floor_s=decode_bytes / copy_bw,
                prefill_floor_s=prefill_flops / matmul_flops)


def run_nanollm(args, model_dir, prompts, max_tokens, temperature, device):
    kwargs = dict(enforce_eager=args.enforce_eager, tensor_parallel_size=args.tensor_parallel_size)
    if args.gpu_memory_gb and device == "cuda":
        kwargs["gpu_memory_utilization"] = args.gpu_memory_gb * 2**30 / torch.cuda.get_device_properties(0).total_memory
    if device == "cpu":
        kwargs["device"] = "cpu"
    llm = LLM(model_dir, **kwargs)
    llm.generate(["Benchmark: "], SamplingParams(), use_tqdm=False)  # warm-up, not timed

    params = [SamplingParams(temperature=temperature, ignore_eos=True, max_tokens=m) for m in max_tokens]
    preemptions_before = llm.stats["preemptions"]
    sync(device)
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    sync(device)
    seconds = time.perf_counter() - t0

    extra = dict(generated_tokens=sum(len(o["token_ids"]) for o in outputs),
                 kv_cache_bytes=llm.runner.kv_cache.nbytes, num_kvcache_blocks=llm.num_kvcache_blocks,
                 preemptions=llm.stats["preemptions"] - preemptions_before)
    llm.exit()
    return seconds, sum(max_tokens), extra


def run_hf(args, model_dir, prompts, max_tokens, temperature, device):
    # HF continuous batching. generate_batch() takes one max_new_tokens for all requests and times its own
    # manager setup + CUDA-graph capture, so we drive the same manager it uses ourselves: per-request
    # max_new_tokens (identical work to nanollm) and the warm-up outside the timed region.
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.generation import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints
    # "paged|sdpa" is the paged SDPA kernel's name in 5.17 (5.23 still accepts it, with a deprecation warning).
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="paged|sdpa")
    model = model.to(device).eval()
    cb_kwargs = dict(use_cuda_graph=False) if args.enforce_eager else {}
    if args.gpu_memory_gb and device == "cuda":  # HF sizes its cache from a share of the memory still free
        free, total = torch.cuda.mem_get_info()
        cb_kwargs["max_memory_percent"] = max(0.01, (args.gpu_memory_gb * 2**30 - (total - free)) / free)
    config = GenerationConfig(max_new_tokens=max(max_tokens), do_sample=temperature > 0,
                              temperature=temperature if temperature > 0 else None, eos_token_id=-1)  # -1: no EOS
    hints = WorkloadHints(max_prompt_length=max(map(len, prompts)), max_generated_length=max(max_tokens),
                          num_requests=len(prompts))

    def run(manager, requests):
        for rid, (ids, m) in requests.items():
            manager.add_request(ids, request_id=rid, max_new_tokens=m)
        done = {}
        while len(done) < len(requests):
            result = manager.get_result(timeout=1)
            if result is not None and result.error is not None:
                raise RuntimeError(f"HF request {result.request_id} failed: {result.error}")
            if result is not None and result.is_finished():
                done[result.request_id] = result
            elif result is None and not manager.is_running():
                raise RuntimeError("HF continuous batching loop died")
        return done

    cb_config = ContinuousBatchingConfig(**cb_kwargs)
    with model.continuous_batching_context_manager(generation_config=config, continuous_batching_config=cb_config,
                                                   workload_hints=hints) as manager:
        run(manager, {"warmup": (prompts[0][:16], 8)})  # warm-up, not timed
        sync(device)
        t0 = time.perf_counter()
        done = run(manager, {f"seq{i}": (p, m) for i, (p, m) in enumerate(zip(prompts, max_tokens))})
        sync(device)
        seconds = time.perf_counter() - t0
    generated = sum(len(r.generated_tokens) for r in done.values())
    return seconds, generated, dict(generated_tokens=generated)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--max-input-len", type=int, default=1024)
    parser.add_argument("--max-output-len", type=int, default=1024)
    parser.add_argument("--model", default=None, help="checkpoint dir (default: a random --shape, built once)")
    parser.add_argument("--shape", choices=SHAPES, default="qwen3-0.6b", help="the random checkpoint's shape")
    parser.add_argument("--num-layers", type=int, default=None, help="the random checkpoint's layers (default: all)")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--gpu-memory-gb", type=float, default=None)
    parser.add_argument("--single-stream", action="store_true", help="1 sequence, 16-token prompt, 1024 greedy tokens")
    parser.add_argument("--engine", choices=["nanollm", "hf"], default="nanollm")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_dir = args.model or default_model_dir(args.shape, args.num_layers)

    # Workload (same random stream as nano-vllm's bench.py).
    seed(0)
    if args.single_stream:
        prompts, max_tokens, temperature = [[randint(0, 10000) for _ in range(16)]], [1024], 0.0
    else:
        min_in, min_out = min(100, args.max_input_len), min(100, args.max_output_len)
        prompts = [[randint(0, 10000) for _ in range(randint(min_in, args.max_input_len))]
                   for _ in range(args.num_seqs)]
        max_tokens = [randint(min_out, args.max_output_len) for _ in range(args.num_seqs)]
        temperature = 0.6

    copy_bw, matmul_flops = measure_hardware(device)
    # With tensor parallelism the work is split across GPUs: assume each adds the same bandwidth and FLOPs.
    copy_bw, matmul_flops = copy_bw * args.tensor_parallel_size, matmul_flops * args.tensor_parallel_size
    if device == "cuda":
        if args.gpu_memory_gb:
            total_bytes = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_memory_gb * 2**30 / total_bytes))
        torch.cuda.reset_peak_memory_stats()

    run = run_nanollm if args.engine == "nanollm" else run_hf
    seconds, tokens, extra = run(args, model_dir, prompts, max_tokens, temperature, device)

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    floor = physical_floor(cfg, count_params(model_dir), [len(p) for p in prompts], max_tokens, copy_bw, matmul_flops)
    floor_s = floor["decode_floor_s"] + floor["prefill_floor_s"]  # single stream: ~all decode (weights read)
    result = dict(engine=args.engine, device=device, mode="single-stream" if args.single_stream else "batch",
                  num_seqs=len(prompts), prompt_tokens=sum(map(len, prompts)), output_tokens=tokens,
                  seconds=seconds, tokens_per_s=tokens / seconds,
                  peak_gpu_mem_bytes=torch.cuda.max_memory_allocated() if device == "cuda" else None,
                  gpu_memory_gb=args.gpu_memory_gb, copy_bw_bytes_per_s=copy_bw, matmul_flops_per_s=matmul_flops,
                  **floor, floor_s=floor_s, fraction_of_floor=floor_s / seconds, **extra)

    print(f"{args.engine} on {device}: {tokens} tokens in {seconds:.2f}s = {tokens / seconds:,.0f} tok/s")
    if result["peak_gpu_mem_bytes"] is not None:
        print(f"peak GPU memory allocated: {result['peak_gpu_mem_bytes'] / 2**30:.2f} GiB")
    for key in ("kv_cache_bytes", "num_kvcache_blocks", "preemptions"):
        if result.get(key) is not None:
            print(f"{key}: {result[key]:,}")
    print(f"copy bandwidth {copy_bw / 1e9:,.0f} GB/s, matmul {matmul_flops / 1e12:,.1f} TFLOP/s")
    print(f"floor: decode {floor['decode_floor_s']:.3f}s ({floor['decode_bytes'] / 1e9:,.1f} GB read)"
          f" + prefill {floor['prefill_floor_s']:.3f}s ({floor['prefill_flops'] / 1e12:,.1f} TFLOP)"
          f" = {floor_s:.3f}s;"
          f" reached {result['fraction_of_floor']:.1%} of the floor")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
