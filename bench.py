"""
bench.py: nanollm's throughput against the physical floor of the same work (a benchmark, not a test).

  python bench.py                      # nano-vllm's workload: 256 sequences, random Qwen3-0.6B shape (bf16)
  python bench.py --single-stream      # one sequence, 1,024 new tokens
  python bench.py --gpu-memory-gb 8    # the whole engine capped at 8 GB
  python bench.py --shape qwen3-8b     # another checkpoint's shape (see SHAPES: Qwen3, Qwen3-MoE, Llama 3.2, Qwen2.5)
  python bench.py --shape qwen3-30b-a3b --num-layers 24   # the MoE, half its layers (the full one is 61 GB)
  python bench.py --moe-kernels        # the fused MoE kernels alone at Qwen3-30B-A3B's shape, decode batch sizes
  python bench.py --engine hf --num-seqs 64   # HF transformers' continuous batching, same workload
  python bench.py --top-k 20 --top-p 0.95     # with Qwen3's recommended filters (temperature 0.6 as before)

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

from nanollm import LLM, SamplingParams, build_random_checkpoint, fused_moe

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
    "qwen3-30b-a3b": ("Qwen3MoeForCausalLM", dict(
        hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        moe_intermediate_size=768, intermediate_size=6144, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936, tie_word_embeddings=False,
        max_position_embeddings=40960, rope_theta=1000000, rms_norm_eps=1e-6)),
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
        build_layer_by_layer(tmp, architecture, config)
        tmp.rename(path)
    return str(path)


def build_layer_by_layer(path, architecture, config):
    # HF builds a whole model in fp32 before saving it (Qwen3-30B-A3B: 120 GB of RAM). Instead HF builds a template
    # (config, tokenizer, key names and shapes): one layer, or for a MoE a sparse layer 0 and a dense layer 1; then
    # each layer's weights are drawn and written on their own, one safetensors file a layer, so memory holds one
    # layer. Random like HF's init: normal(0, 0.02), norms 1.
    from safetensors.torch import load_file, save_file
    layers, moe = config["num_hidden_layers"], config.get("num_experts", 0) > 0
    template = dict(num_hidden_layers=1)
    if moe:  # a sparse layer 0 and a dense layer 1
        template = dict(num_hidden_layers=2, mlp_only_layers=[1], decoder_sparse_step=1)
    build_random_checkpoint(str(path), dtype=torch.bfloat16, architecture=architecture, **config | template)
    one_layer = {}
    for f in Path(path).glob("*.safetensors"):
        one_layer |= load_file(f)
        f.unlink()
    weight_map, generator = {}, torch.Generator().manual_seed(0)
    for i in range(-1, layers):  # -1: the tensors outside the layers (embeddings, final norm, LM head)
        sparse = (moe and i not in config.get("mlp_only_layers", [])
                  and (i + 1) % config.get("decoder_sparse_step", 1) == 0)
        prefix = f"model.layers.{0 if sparse or not moe else 1}."  # the template layer of its kind
        tensors = {}
        for name, t in one_layer.items():
            in_this_layer = name.startswith(prefix) if i >= 0 else not name.startswith("model.layers.")
            if not in_this_layer:
                continue
            name = name.replace(prefix, f"model.layers.{i}.")
            tensors[name] = (torch.ones(t.shape) if name.endswith("norm.weight")
                             else torch.randn(t.shape, generator=generator) * 0.02).to(torch.bfloat16)
        file = f"model-{i + 1:05d}-of-{layers + 1:05d}.safetensors"
        save_file(tensors, str(Path(path) / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, file)
    (Path(path) / "model.safetensors.index.json").write_text(json.dumps(dict(metadata={}, weight_map=weight_map)))
    cfg = json.loads((Path(path) / "config.json").read_text())
    if moe:  # the template's layout back to the shape's
        cfg |= dict(mlp_only_layers=config.get("mlp_only_layers", []),
                    decoder_sparse_step=config.get("decoder_sparse_step", 1))
    cfg.pop("layer_types", None)  # the template's, one per template layer: transformers rebuilds it for all layers
    (Path(path) / "config.json").write_text(json.dumps(cfg | dict(num_hidden_layers=layers), indent=2))


def count_params(model_dir):  # -> (all parameters, those of MoE experts); reads the safetensors headers only
    total = experts = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, meta in header.items():
            if name != "__metadata__":
                total += math.prod(meta["shape"])
                experts += math.prod(meta["shape"]) if ".mlp.experts." in name else 0
    return total, experts


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
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)  # never timed on zeros (METHOD.md)
    dst = torch.empty_like(src)
    copy_bw = 2 * nbytes / median_seconds(lambda: dst.copy_(src), device)
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    matmul_flops = 2 * n**3 / median_seconds(lambda: torch.matmul(a, b), device)
    del src, dst, a, b
    if device == "cuda":
        torch.cuda.empty_cache()
    return copy_bw, matmul_flops


def num_experts_of(cfg):  # config.json's: transformers 4 writes num_experts, 5 num_local_experts; 0 for a dense model
    return cfg.get("num_experts") or cfg.get("num_local_experts") or 0


def expert_bytes_read(cfg, expert_params, batch, itemsize):
    # MoE: a decode step reads only the experts its tokens were routed to. Approximation: each token picks its top-k
    # of E experts uniformly and independently (random weights route close to that; trained ones less evenly, so they
    # touch fewer experts), so a layer touches E * (1 - (1 - k/E)^batch) distinct experts on average.
    experts = num_experts_of(cfg)
    if not experts:
        return 0
    touched = experts * (1 - (1 - cfg["num_experts_per_tok"] / experts) ** batch)
    return expert_params * itemsize * touched / experts


def physical_floor(cfg, params, expert_params, prompt_lens, output_lens, itemsize, copy_bw, matmul_flops):
    # output_lens: the tokens each sequence generated; itemsize: bytes per weight and per cached K or V element
    layers, heads, hidden = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // heads
    kv_bytes_per_token = 2 * layers * cfg["num_key_value_heads"] * head_dim * itemsize  # K and V
    # (a) decode is memory-bound: every step reads the weights once (of a MoE's experts, those its tokens use; of the
    # embedding table only a row a token, so an untied one is left out), plus each running sequence's KV cache. A
    # sequence's first token comes from its prefill and its last is never fed back, so a sequence of m tokens runs
    # m - 1 decode steps; its j-th reads p + j tokens of KV (j = 1 .. m - 1): (m - 1) * p + m * (m - 1) / 2 in all.
    # Simple schedule: all sequences decode together, so step t runs the sequences with m - 1 > t.
    embed = cfg["vocab_size"] * hidden
    tied = cfg.get("tie_word_embeddings", False)
    kv_tokens_read = sum((m - 1) * p + m * (m - 1) // 2 for p, m in zip(prompt_lens, output_lens))
    batch_at_step = [sum(m - 1 > t for m in output_lens) for t in range(max(output_lens) - 1)]
    dense_bytes = (params - expert_params - (0 if tied else embed)) * itemsize
    weights_read = sum(dense_bytes + expert_bytes_read(cfg, expert_params, b, itemsize) for b in batch_at_step)
    decode_bytes = weights_read + kv_tokens_read * kv_bytes_per_token
    # (b) prefill is compute-bound: 2 FLOPs per weight per prompt token (the embedding is a lookup, so it is
    # left out, and the LM head runs on the last prompt token only), plus causal attention QK^T and PV.
    body_params = params - embed * (1 if tied else 2)
    if num_experts_of(cfg):  # a prompt token runs top-k of the experts
        body_params -= expert_params * (1 - cfg["num_experts_per_tok"] / num_experts_of(cfg))
    prefill_flops = (2 * body_params * sum(prompt_lens) + 2 * embed * len(prompt_lens)
                     + 2 * 2 * layers * heads * head_dim * sum(p * p for p in prompt_lens) / 2)
    return dict(decode_bytes=decode_bytes, prefill_flops=prefill_flops, weights_bytes=params * itemsize,
                kv_bytes_per_token=kv_bytes_per_token, decode_floor_s=decode_bytes / copy_bw,
                prefill_floor_s=prefill_flops / matmul_flops)


def bench_moe_kernels(device, json_out=None):
    # The fused MoE (pairs sorted by expert, gate|up + SwiGLU, down + routing weights, sum per token) at
    # Qwen3-30B-A3B's shape, one layer, in bf16, as a decode step runs it: replayed from a CUDA graph. Reported: the
    # expert bytes read (each touched expert's gate|up and down once) over the median time, against the copy bandwidth.
    if device != "cuda":
        raise SystemExit("--moe-kernels needs a GPU")
    num_experts, top_k, hidden, intermediate = 128, 8, 2048, 768
    copy_bw, _ = measure_hardware(device)
    gate_up = torch.randn(num_experts, 2 * intermediate, hidden, device=device, dtype=torch.bfloat16) * 0.02
    down = torch.randn(num_experts, hidden, intermediate, device=device, dtype=torch.bfloat16) * 0.02
    bytes_per_expert = (gate_up[0].numel() + down[0].numel()) * 2
    rows = []
    for batch in (1, 8, 32, 64, 128, 256):
        x = torch.randn(batch, hidden, device=device, dtype=torch.bfloat16)
        weights, ids = torch.randn(batch, num_experts, device=device).softmax(-1).topk(top_k, -1)
        weights = weights.to(torch.bfloat16)
        fused_moe(x, gate_up, down, weights, ids)  # compiles the kernels
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fused_moe(x, gate_up, down, weights, ids)
        seconds = median_seconds(graph.replay, device, reps=50)
        touched = ids.unique().numel()
        bandwidth = touched * bytes_per_expert / seconds
        rows.append(dict(batch=batch, experts_touched=touched, microseconds=seconds * 1e6,
                         bytes_per_s=bandwidth, fraction_of_copy_bw=bandwidth / copy_bw))
        print(f"batch {batch:4d}: {touched:3d} experts, {seconds * 1e6:8.1f} us, {bandwidth / 1e9:6,.0f} GB/s "
              f"({bandwidth / copy_bw:.0%} of the {copy_bw / 1e9:,.0f} GB/s copy bandwidth)")
    result = dict(mode="moe-kernels", device=torch.cuda.get_device_name(), copy_bw_bytes_per_s=copy_bw, rows=rows)
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


def run_nanollm(args, model_dir, prompts, max_tokens, temperature, device):
    kwargs = dict(enforce_eager=args.enforce_eager, tensor_parallel_size=args.tensor_parallel_size)
    if args.gpu_memory_gb and device == "cuda":
        kwargs["gpu_memory_utilization"] = args.gpu_memory_gb * 2**30 / torch.cuda.get_device_properties(0).total_memory
    if device == "cpu":
        kwargs["device"] = "cpu"
    llm = LLM(model_dir, **kwargs)
    llm.generate(["Benchmark: "], SamplingParams(), use_tqdm=False)  # warm-up, not timed

    params = [SamplingParams(temperature=temperature, top_k=args.top_k, top_p=args.top_p, ignore_eos=True, max_tokens=m)
              for m in max_tokens]
    preemptions_before = llm.stats["preemptions"]
    sync(device)
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    sync(device)
    seconds = time.perf_counter() - t0

    extra = dict(kv_cache_bytes=llm.runner.kv_cache.nbytes, num_kvcache_blocks=llm.num_kvcache_blocks,
                 preemptions=llm.stats["preemptions"] - preemptions_before)
    itemsize = llm.config.torch_dtype.itemsize  # the checkpoint's dtype on a GPU, fp32 on a CPU
    llm.exit()
    return seconds, [len(o["token_ids"]) for o in outputs], itemsize, extra


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
    return seconds, [len(done[f"seq{i}"].generated_tokens) for i in range(len(prompts))], model.dtype.itemsize, {}


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
    parser.add_argument("--moe-kernels", action="store_true", help="time the fused MoE kernels alone (GPU)")
    parser.add_argument("--temperature", type=float, default=None, help="default: 0.6, or 0 for --single-stream")
    parser.add_argument("--top-k", type=int, default=-1, help="sampling filter, as in SamplingParams (-1: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="sampling filter, as in SamplingParams (1: off)")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    if args.engine == "hf" and (args.top_k, args.top_p) != (-1, 1.0):
        parser.error("--top-k and --top-p are for nanollm only")
    if args.engine == "hf" and args.tensor_parallel_size > 1:
        parser.error("--tensor-parallel-size is for nanollm only (HF's continuous batching runs on one device)")
    if args.model and (args.shape != parser.get_default("shape") or args.num_layers):
        parser.error("--shape and --num-layers build a random checkpoint: not with --model")
    if min(args.num_seqs, args.max_input_len, args.max_output_len) < 1:
        parser.error("--num-seqs, --max-input-len and --max-output-len must be >= 1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.gpu_memory_gb and device == "cpu":
        parser.error("--gpu-memory-gb needs a GPU")
    if args.moe_kernels:
        return bench_moe_kernels(device, args.json_out)
    model_dir = args.model or default_model_dir(args.shape, args.num_layers)
    cfg = json.loads((Path(model_dir) / "config.json").read_text())

    # Workload (same random stream as nano-vllm's bench.py). Token ids are 0-10,000, folded into a smaller vocabulary
    # (a tiny test checkpoint's): every real model's ids are as drawn.
    seed(0)
    if args.single_stream:
        prompts, max_tokens, temperature = [[randint(0, 10000) % cfg["vocab_size"] for _ in range(16)]], [1024], 0.0
    else:
        min_in, min_out = min(100, args.max_input_len), min(100, args.max_output_len)
        prompts = [[randint(0, 10000) % cfg["vocab_size"] for _ in range(randint(min_in, args.max_input_len))]
                   for _ in range(args.num_seqs)]
        max_tokens = [randint(min_out, args.max_output_len) for _ in range(args.num_seqs)]
        temperature = 0.6
    temperature = temperature if args.temperature is None else args.temperature

    copy_bw, matmul_flops = measure_hardware(device)
    # With tensor parallelism the work is split across GPUs: assume each adds the same bandwidth and FLOPs.
    copy_bw, matmul_flops = copy_bw * args.tensor_parallel_size, matmul_flops * args.tensor_parallel_size
    if device == "cuda":
        if args.gpu_memory_gb:
            total_bytes = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_memory_gb * 2**30 / total_bytes))
        torch.cuda.reset_peak_memory_stats()

    run = run_nanollm if args.engine == "nanollm" else run_hf
    seconds, output_lens, itemsize, extra = run(args, model_dir, prompts, max_tokens, temperature, device)
    tokens = sum(output_lens)  # generated: a sequence may stop short of max_tokens at max_model_len

    # the floor of the work done: the tokens generated, in the dtype the engine ran
    floor = physical_floor(cfg, *count_params(model_dir), [len(p) for p in prompts], output_lens, itemsize, copy_bw,
                           matmul_flops)
    floor_s = floor["decode_floor_s"] + floor["prefill_floor_s"]  # single stream: ~all decode (weights read)
    result = dict(engine=args.engine, device=device, mode="single-stream" if args.single_stream else "batch",
                  temperature=temperature, top_k=args.top_k, top_p=args.top_p,
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
