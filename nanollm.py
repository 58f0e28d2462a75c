"""
nanollm: a single-file LLM inference engine for Qwen3 (dense and MoE), Qwen2.5 and Llama 3.x, read top to bottom.

What it does, in the order a request travels through this file:
  config.json -> one model for three families, of tensor-parallel linear layers -> a paged KV cache read by attention
  (Triton kernels on the GPU, each beside the plain-torch reference it is tested against) -> a block manager that
  shares cached prompt prefixes by hashing blocks -> a scheduler doing continuous batching, chunked prefill and
  preemption -> a model runner that replays CUDA graphs for decode -> the LLM API (generate, or the step-level
  add_request/step loop) -> main().

Left out on purpose: other architectures, sliding windows, RoPE scaling but llama3's, quantisation, LoRA, speculative
decoding, beam search, an HTTP server. It needs no flash-attn build and runs on a CPU for learning and tests.

Run it:
  python nanollm.py                                   # no weights? builds a tiny random demo model
  python nanollm.py --model DIR --prompt "Hello" --max-tokens 64
  python nanollm.py --model DIR --chat                # chat template applied
  python nanollm.py --model DIR --tensor-parallel-size 2          # 2 GPUs (or 2 CPU processes)
  torchrun --nproc-per-node 4 nanollm.py --model DIR --tensor-parallel-size 2   # TP=2 x DP=2
Use it:
  from nanollm import LLM, SamplingParams
  llm = LLM("Qwen3-0.6B")
  outs = llm.generate(["Hello"], SamplingParams(temperature=0.6, max_tokens=32))
  print(outs[0]["text"])
"""
import argparse
import functools
import itertools
import json
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
from array import array
from collections import OrderedDict, deque
from contextlib import AbstractContextManager, ExitStack, suppress
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from numbers import Integral, Real
from pathlib import Path
from types import SimpleNamespace

# On a CPU, torch's OpenMP and MKL threads busy-wait on each other (a tiny softmax takes ms); passive waiting fixes it
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


def cdiv(a, b):  # ceiling division; triton.cdiv gives the same but costs microseconds a call, too slow per sequence
    return -(-a // b)


def is_int(n, at_least=float("-inf")):  # numpy's ints count, bools do not (True == 1); int first: the ABC is slow
    return (type(n) is int or isinstance(n, Integral) and not isinstance(n, bool)) and n >= at_least


# -----------------------------------------------------------------------------
# Config: the checkpoint's config.json and the engine's knobs

def load_model_config(path):  # config.json as a namespace under HF's names, plus what the model code branches on
    if not Path(path, "config.json").is_file():
        raise FileNotFoundError(f"model directory not found, or without config.json: {path!r}")
    c = json.loads(Path(path, "config.json").read_text())
    arch = (c.get("architectures") or ["<none>"])[0]
    if arch not in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM"):
        raise ValueError(f"unsupported: architecture {arch!r} (nanollm runs Qwen3, Qwen3-MoE, Qwen2 and Llama)")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}  # transformers 5 moved rope_theta here
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    llama3_keys = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    if rope_type not in ("default", "llama3") or (rope_type == "llama3" and not llama3_keys <= rope.keys()):
        raise ValueError(f"unsupported: rope scaling {rope_type!r} with {sorted(rope)} (nanollm implements plain RoPE "
                         f"and 'llama3' with {sorted(llama3_keys)})")
    if c.get("use_sliding_window") or set(c.get("layer_types") or []) - {"full_attention"}:
        raise ValueError("unsupported: sliding-window attention (nanollm attends to the whole context)")
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported: activation {c['hidden_act']!r} (nanollm's MLP is SwiGLU)")
    # Qwen3-MoE: transformers 5 writes num_experts as num_local_experts; 0 experts is a dense model
    experts = c.setdefault("num_experts", c.get("num_local_experts", 0))
    top_k = c.setdefault("num_experts_per_tok", 8)
    # (decoder_sparse_step is read first, defaulting to 1, so that the message below can name it)
    if experts and not (c.setdefault("decoder_sparse_step", 1) > 0 and 0 < top_k <= experts):
        raise ValueError(f"unsupported: MoE config: {top_k} of {experts} experts per token, decoder_sparse_step "
                         f"{c['decoder_sparse_step']} (supported: 1 <= num_experts_per_tok <= num_experts, step >= 1)")
    generation = Path(path, "generation_config.json")  # its eos ids win (Llama 3 lists several there)
    eos = {**c, **(json.loads(generation.read_text()) if generation.is_file() else {})}.get("eos_token_id")
    defaults = dict(num_key_value_heads=c["num_attention_heads"], head_dim=c["hidden_size"] // c["num_attention_heads"],
                    rms_norm_eps=1e-6, max_position_embeddings=40960, tie_word_embeddings=False, attention_bias=False,
                    mlp_bias=False, norm_topk_prob=False, mlp_only_layers=[], moe_intermediate_size=768)
    return SimpleNamespace(**{**defaults, **{k: v for k, v in c.items() if v is not None},
                              # where the families differ: Qwen3 normalises each q and k head, Qwen2 biases q, k, v
                              "qk_norm": arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
                              "qkv_bias": arch == "Qwen2ForCausalLM" or bool(c.get("attention_bias")),
                              "rope_scaling": rope if rope_type == "llama3" else None,
                              "rope_theta": rope.get("rope_theta", c.get("rope_theta", 10000.0)),
                              "dtype": getattr(torch, c.get("dtype") or c.get("torch_dtype") or "bfloat16"),
                              "eos_token_ids": tuple(eos if isinstance(eos, list) else [] if eos is None else [eos])})


@dataclass
class Config:
    model: str
    tensor_parallel_size: int = 1
    dtype: str = "auto"                 # "auto": the checkpoint's dtype on GPU, float32 on CPU
    max_model_len: int = 4096           # prompt + generated tokens of one sequence
    max_num_seqs: int = 512             # sequences in one batch
    max_num_batched_tokens: int = 16384 # tokens in one forward pass (longer prompts are chunked)
    gpu_memory_utilization: float = 0.9
    kvcache_block_size: int = 256
    num_kvcache_blocks: int | None = None  # None: sized from free memory
    enable_prefix_caching: bool = True
    enforce_eager: bool = False         # True: no CUDA graphs
    device: str | None = None           # None: cuda if present, else cpu
    dist_timeout_s: float = 600.0       # tensor parallelism: the longest wait for a rank or a collective

    def __post_init__(self):  # types too: 1e4 tokens or 20.5 as a length must fail here, not mid-step
        for name, ok, rule in [
                ("tensor_parallel_size", lambda n: is_int(n, 1), "an int >= 1"),
                ("dtype", lambda d: d in ("auto", "float32", "float16", "bfloat16"), "auto/float32/float16/bfloat16"),
                ("max_model_len", lambda n: is_int(n, 2), "an int >= 2"),
                ("max_num_seqs", lambda n: is_int(n, 1), "an int >= 1"),
                ("max_num_batched_tokens", lambda n: is_int(n, 1), "an int >= 1"),
                ("gpu_memory_utilization", lambda u: isinstance(u, Real) and 0 < u <= 1, "in (0, 1]"),
                ("kvcache_block_size", lambda b: is_int(b, 16) and not b & (b - 1), "a power of two >= 16"),
                ("num_kvcache_blocks", lambda n: n is None or is_int(n, 1), "an int >= 1 or None"),
                ("enable_prefix_caching", lambda b: isinstance(b, bool), "True or False"),  # "no" would be true
                ("enforce_eager", lambda b: isinstance(b, bool), "True or False"),
                # another GPU: CUDA_VISIBLE_DEVICES (memory is measured on the current one)
                ("device", lambda d: d in (None, "cuda", "cpu"), "None, 'cuda' or 'cpu'"),
                ("dist_timeout_s", lambda t: isinstance(t, Real) and 0 < t <= 1e9, "a number of seconds in (0, 1e9]")]:
            if not ok(getattr(self, name)):
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.hf = hf = load_model_config(self.model)
        self.max_model_len = min(self.max_model_len, hf.max_position_embeddings)
        auto = hf.dtype if self.device != "cpu" else torch.float32
        self.torch_dtype = auto if self.dtype == "auto" else getattr(torch, self.dtype)
        tp = self.tensor_parallel_size
        if self.device == "cuda" and tp > torch.cuda.device_count():
            raise ValueError(f"device cuda with tensor_parallel_size {tp}: {torch.cuda.device_count()} GPUs present")
        sizes = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
        for size in sizes + ("moe_intermediate_size",) if hf.num_experts else sizes:
            if getattr(hf, size) % tp:  # every rank holds a slice of the heads and of every MLP (and expert)
                raise ValueError(f"tensor_parallel_size {tp} must divide {size} {getattr(hf, size)}")


@dataclass
class SamplingParams:
    temperature: float = 1.0            # 0: greedy
    top_p: float = 1.0
    top_k: int = -1                     # -1: all tokens
    max_tokens: int = 64
    ignore_eos: bool = False
    stop_token_ids: list | None = None
    seed: int | None = None

    def __post_init__(self):  # types too: a job's JSON may hold "7" or 2.5, which must fail here, not mid-step
        for name, ok, rule in [
                ("temperature", lambda t: isinstance(t, Real) and 0 <= t <= 1e38, "a number, 0 to 1e38"),
                ("top_p", lambda p: isinstance(p, Real) and 0 < p <= 1, "a number in (0, 1]"),
                ("top_k", lambda k: is_int(k, -1), "an int: -1 or 0 for all tokens (as in HF and vLLM)"),
                ("max_tokens", lambda n: is_int(n, 1), "an int >= 1"),
                ("seed", lambda s: s is None or is_int(s), "an int or None"),
                ("stop_token_ids", lambda ids: ids is None or (isinstance(ids, (list, tuple)) and all(
                    is_int(t, 0) for t in ids)), "a list of token ids or None"),
                ("ignore_eos", lambda b: isinstance(b, bool), "True or False")]:
            if not ok(getattr(self, name)):
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")
        self.stop_token_ids = list(self.stop_token_ids or [])


# -----------------------------------------------------------------------------
# Model: tensor-parallel linear layers (`weight_loader` cuts this rank's shard from a checkpoint tensor), then the
# decoder, one for every family, named after HF's module paths: Qwen3 (dense and MoE: per-head q/k norms), Qwen2
# (q/k/v biases) and Llama (biases, llama3 RoPE scaling) differ only where the config says

@dataclass
class Parallel:
    rank: int = 0           # this process's index in its tensor-parallel group
    size: int = 1
    group: object = None    # the torch.distributed group for the model's collectives (NCCL or gloo)
    control: object = None  # a gloo group on which rank 0 sends commands to the other ranks
    first: int = 0          # the global rank of the group's rank 0


class MergedColumnParallelLinear(nn.Module):  # W = [this rank's rows of q | of k | of v] (or gate | up): one matmul
    # out_features: one size per part. experts=(E,): one such W per expert, stacked (E, rows, in_features); the MoE
    # block computes with them (fused_moe), this module holds and loads them (each expert's as a W of its own)
    def __init__(self, in_features, out_features, tp, bias=False, experts=()):
        super().__init__()
        self.tp = tp
        self.rows = [n // tp.size for n in out_features]  # this rank's rows of each part
        self.weight = nn.Parameter(torch.empty(*experts, sum(self.rows), in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(sum(self.rows)), requires_grad=False) if bias else None  # same rows

    def weight_loader(self, param, loaded, part):  # the weight's rows, or the bias's: the same cut
        start, rows = sum(self.rows[:part]), self.rows[part]
        param.data[start:start + rows].copy_(loaded.narrow(0, self.tp.rank * rows, rows))

    def forward(self, x, norm=None, residual=None):  # a norm: -> (self(norm(x, residual)), x + residual)
        return linear(x, self.weight, norm, residual, bias=self.bias)


class RowParallelLinear(nn.Module):  # y = x @ W.T, W's input columns split: each rank's partial sum is all-reduced
    def __init__(self, in_features, out_features, tp, bias=False, experts=()):  # experts: as in the column one
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(*experts, out_features, in_features // tp.size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None  # whole, every rank

    def weight_loader(self, param, loaded):  # the weight: this rank's columns; the bias: all of it
        columns = param.shape[-1]
        param.data.copy_(loaded if param is self.bias else loaded.narrow(1, self.tp.rank * columns, columns))

    def forward(self, x, swiglu=False):  # swiglu: x = [gate | up], multiplied after SwiGLU
        y = linear(x, self.weight, swiglu=swiglu)
        if self.tp.size > 1:
            dist.all_reduce(y, group=self.tp.group)
        return y if self.bias is None else y + self.bias  # the bias: added once, to the sum of the ranks' products


class VocabParallelEmbedding(nn.Module):  # a contiguous slice of the vocabulary per rank (padded to a TP-size multiple)
    def __init__(self, vocab_size, hidden_size, tp):
        super().__init__()
        self.tp = tp
        self.vocab_size, self.rows = vocab_size, cdiv(vocab_size, tp.size)  # the vocabulary, and a rank's slice of it
        self.start = tp.rank * self.rows
        self.weight = nn.Parameter(torch.zeros(self.rows, hidden_size), requires_grad=False)

    def weight_loader(self, param, loaded):
        part = loaded[self.start:self.start + self.rows]
        param.data[:part.shape[0]].copy_(part)

    def forward(self, ids):
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start  # ids outside this rank's slice get zeros
        y = F.embedding(local.clamp(0, self.rows - 1), self.weight) * ((local >= 0) & (local < self.rows)).unsqueeze(-1)
        dist.all_reduce(y, group=self.tp.group)  # exactly one rank contributes each token's row
        return y


class ParallelLMHead(VocabParallelEmbedding):
    def forward(self, x, out=None):  # (B, hidden) -> (B, vocab) logits on the group's first rank, None elsewhere
        logits = torch.mm(x, self.weight.t(), out=out)  # out: (B, rows) to write them to, or None
        if self.tp.size > 1:
            parts = [torch.empty_like(logits) for _ in range(self.tp.size)] if self.tp.rank == 0 else None
            dist.gather(logits, parts, dst=self.tp.first, group=self.tp.group)
            logits = torch.cat(parts, -1) if self.tp.rank == 0 else None
        return logits[:, :self.vocab_size] if logits is not None else None


def compiled_on_gpu(fn):  # on CUDA torch.compile fuses fn's elementwise ops into 1-2 kernels (README); CPU: fn
    compiled = torch.compile(fn, dynamic=True)
    return functools.wraps(fn)(lambda x, *args: compiled(x, *args) if x.is_cuda else fn(x, *args))


def rms_norm(x, weight, eps):  # normalise in fp32 like the reference, scale in the model's dtype
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_table(head_dim, max_position, theta, scaling=None):  # -> cos_sin (max_position, head_dim) fp32: [cos | sin]
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)
    if scaling is not None:  # Llama 3.1's: wavelengths longer than the original context / low_freq_factor are
        # stretched by factor, those shorter than it / high_freq_factor kept, those between blended smoothly
        original, low, high = (scaling[k] for k in ("original_max_position_embeddings", "low_freq_factor",
                                                     "high_freq_factor"))
        smooth = ((original / (2 * torch.pi / inv_freq) - low) / (high - low)).clamp(0, 1)  # original / wavelength
        inv_freq = (1 - smooth) * inv_freq / scaling["factor"] + smooth * inv_freq
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], -1)


def apply_rope(x, positions, cos_sin):  # x: (N, heads, head_dim); cos_sin: (max_position, head_dim) fp32
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, -1)  # rotate-half RoPE
    x1, x2 = x.float().chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


@compiled_on_gpu
def add_rms_norm(x, residual, weight, eps):  # -> (rms_norm(x + residual), x + residual)
    x = x + residual
    return rms_norm(x, weight, eps), x


@compiled_on_gpu
def silu_and_mul(x):  # SwiGLU: x = [gate | up]
    gate, up = x.chunk(2, -1)
    return F.silu(gate) * up


@functools.cache
def gpu(device):  # its properties, asked per kernel launch in eager steps: looked up once
    return torch.cuda.get_device_properties(device)


def pdl(x):  # -> the launch arguments: the kernel's PDL flag and the launch mode always agree
    # Programmatic dependent launch (Hopper on) for the kernels of one row's decode step, each a few microseconds: a
    # kernel launched with it may start while the one before it ends, hiding launch latency (at batch 256 it measured
    # 2% slower). Such a kernel calls gdc_launch_dependents() to let the next one start, and gdc_wait() before it
    # reads or writes what earlier kernels write: only weights and per-step constants may be read before.
    on = x.is_cuda and x.shape[0] == 1 and gpu(x.device).major >= 9
    return dict(PDL=on, launch_pdl=on)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, residual_ptr, summed_ptr, norm_ptr, eps, N, K,
                 PROLOGUE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    # one row: out (N,) = f(x) @ W.T with W (N, K); a program computes BLOCK_N outputs and reads its rows of W once.
    # f is folded in, rounded to the model's dtype where its reference rounds: "none"; "swiglu", x = [gate | up] (2K
    # wide); "norm", RMSNorm of x + residual (one tile: BLOCK_K >= K), the sum stored to summed by program 0.
    # A bias (bias_ptr not None) is added in fp32 before the one rounding, as cuBLAS's epilogue adds it.
    pid = tl.program_id(0)
    dtype = w_ptr.dtype.element_ty
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    if PDL:
        gdc_launch_dependents()
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=(cols[:, None] < N) & (ks[None, :] < K), other=0.0)
        if PDL and k0 == 0:  # the first weights are on their way while the kernel before finishes
            gdc_wait()
        x = tl.load(x_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
        if PROLOGUE == "swiglu":
            up = tl.load(x_ptr + K + ks, mask=ks < K, other=0.0).to(tl.float32)
            x = ((x / (1 + tl.exp(-x))).to(dtype).to(tl.float32) * up).to(dtype).to(tl.float32)
        if PROLOGUE == "norm":
            x = (x + tl.load(residual_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
            if pid == 0:
                tl.store(summed_ptr + ks, x, mask=ks < K)  # exact: x holds a value of the model's dtype
            x = (x * tl.rsqrt(tl.sum(x * x, 0) / K + eps)).to(dtype).to(tl.float32)
            x = (tl.load(norm_ptr + ks, mask=ks < K, other=0.0).to(tl.float32) * x).to(dtype).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
    out = tl.sum(acc, 1)
    if bias_ptr is not None:
        out += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + cols, out.to(dtype), mask=cols < N)


def gemv(x, weight, norm=None, residual=None, swiglu=False, bias=None):  # x (1, K or 2K): see linear()
    (N, K), summed = weight.shape, None if norm is None else torch.empty_like(x)
    out = torch.empty(1, N, dtype=x.dtype, device=x.device)
    # 4 outputs per program; a warp per 1,024 columns of a tile (fastest at Qwen3-0.6B's four shapes on an H200,
    # although for sm_90 every such tile spills 184-448 bytes a thread to the stack: 2 outputs of 1,024 did not)
    block_k = triton.next_power_of_2(K) if norm is not None else min(4096, triton.next_power_of_2(K))
    _gemv_kernel[(cdiv(N, 4),)](
        x, weight, bias, out, residual, summed, None if norm is None else norm.weight,
        0.0 if norm is None else norm.eps, N, K, PROLOGUE="swiglu" if swiglu else "none" if norm is None else "norm",
        BLOCK_N=4, BLOCK_K=block_k, num_warps=min(8, max(1, block_k // 1024)), **pdl(x))
    return out if norm is None else (out, summed)


def linear(x, weight, norm=None, residual=None, swiglu=False, bias=None):
    # y = f(x) @ W.T (+ bias), f: RMSNorm of x + residual (-> (y, x + residual)), SwiGLU of x = [gate | up], or nothing.
    # One row on a GPU (one sequence decoding) is one Triton GEMV with f folded in: there launches cost more than bytes
    if x.is_cuda and x.shape[0] == 1:
        return gemv(x, weight, norm, residual, swiglu, bias)
    if norm is not None:
        x, residual = norm(x, residual)
        return F.linear(x, weight, bias), residual
    return F.linear(silu_and_mul(x) if swiglu else x, weight, bias)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x, residual):  # the residual stream: -> (normalised, x + residual)
        return add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg, tp):
        super().__init__()
        self.scale = cfg.head_dim ** -0.5
        q_size, kv_size = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        self.qkv_proj = MergedColumnParallelLinear(cfg.hidden_size, [q_size, kv_size, kv_size], tp, cfg.qkv_bias)
        self.o_proj = RowParallelLinear(q_size, cfg.hidden_size, tp, cfg.attention_bias)  # attention_bias: q, k, v, o
        # Qwen3's per-head q/k norms (not in Qwen2, Llama): paged_attention fuses them with RoPE and the cache write
        self.q_norm, self.k_norm = (RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None for _ in range(2))
        # self.k_cache and self.v_cache: this layer's slices of the engine's KV cache, bound by allocate_kv_cache()

    def forward(self, positions, x, residual, norm, cos_sin, meta):  # -> (output, x + residual)
        qkv, residual = self.qkv_proj(x, norm, residual)  # this rank's heads
        norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.q_norm else (None, None, 0.0)
        out = paged_attention(qkv, *norms, positions, cos_sin, self.k_cache, self.v_cache, meta, self.scale)
        return self.o_proj(out.flatten(1)), residual


class MLP(nn.Module):
    def __init__(self, cfg, tp):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, tp, cfg.mlp_bias)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, tp, cfg.mlp_bias)

    def forward(self, x, residual, norm):  # -> (output, x + residual)
        gate_up, residual = self.gate_up_proj(x, norm, residual)
        return self.down_proj(gate_up, swiglu=True), residual


# ---- Mixture of experts (Qwen3-MoE): a router sends each token to its top_k experts, each a SwiGLU MLP of its own
class SparseMoeBlock(nn.Module):
    def __init__(self, cfg, tp):
        super().__init__()
        self.tp = tp
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router: whole on every rank
        # every expert's gate|up and down, stacked; each rank holds its slice of every expert's intermediate dim
        size, experts = cfg.moe_intermediate_size, (cfg.num_experts,)
        self.experts = nn.ModuleDict(dict(
            gate_up_proj=MergedColumnParallelLinear(cfg.hidden_size, [size] * 2, tp, experts=experts),
            down_proj=RowParallelLinear(size, cfg.hidden_size, tp, experts=experts)))

    def forward(self, x, residual, norm):  # -> (output, x + residual)
        x, residual = norm(x, residual)
        weights, ids = self.gate(x).softmax(-1, dtype=torch.float).topk(self.top_k, -1)  # (N, top_k) each
        weights = weights / weights.sum(-1, keepdim=True) if self.norm_topk_prob else weights  # renormalised
        moe = fused_moe if x.is_cuda else fused_moe_reference  # Triton or plain torch
        y = moe(x, self.experts.gate_up_proj.weight, self.experts.down_proj.weight, weights.to(x.dtype), ids)
        if self.tp.size > 1:
            dist.all_reduce(y, group=self.tp.group)  # each rank summed its slice of the intermediate dim
        return y, residual


def fused_moe_reference(x, gate_up, down, weights, ids):
    # x (N, hidden); gate_up (E, 2 I, hidden); down (E, hidden, I); weights, ids (N, top_k). Plain torch, the
    # definition: each expert that got tokens runs on them, its outputs weighted and added to their tokens' rows
    out = torch.zeros_like(x)
    for e in ids.unique().tolist():
        token, slot = (ids == e).nonzero(as_tuple=True)
        y = F.linear(silu_and_mul(F.linear(x[token], gate_up[e])), down[e])
        out.index_add_(0, token, y * weights[token, slot, None])
    return out


@triton.jit
def _moe_gemm_kernel(a_ptr, w_ptr, out_ptr, pairs_ptr, tile_experts_ptr, weights_ptr, num_pairs, num_experts, N, K,
                     TOP_K: tl.constexpr, SWIGLU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    # grid: (tiles, cdiv(N, BLOCK_N)). A (token, expert) pair p = token * TOP_K + slot has one row in out (num_pairs,
    # N). Tile t holds BLOCK_M pairs of one expert, tile_experts[t], listed at pairs[t * BLOCK_M:] (num_pairs pads).
    # SWIGLU: a = x, W (E, 2N, K) = [gate | up], out[p] = silu(x[token] @ gate.T) * (x[token] @ up.T);
    # else: a = that output (num_pairs, K), W (E, N, K) = down, out[p] = weights[p] * (a[p] @ down.T)
    tile, col = tl.program_id(0), tl.program_id(1)
    expert = tl.load(tile_experts_ptr + tile)
    if expert >= num_experts:  # a tile past the last expert's group: the grid has the most tiles a batch can need
        return
    pairs = tl.load(pairs_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < num_pairs
    cols = col * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (pairs // TOP_K if SWIGLU else pairs).to(tl.int64)[:, None] * K + ks[None, :]  # token's or pair's
    w_ptrs = w_ptr + expert.to(tl.int64) * (2 * N if SWIGLU else N) * K + cols[None, :] * K + ks[:, None]  # W.T tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)  # SwiGLU's up
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs + k0, mask=valid[:, None] & (k0 + ks < K)[None, :], other=0.0)
        w = tl.load(w_ptrs + k0, mask=(cols[None, :] < N) & (k0 + ks < K)[:, None], other=0.0)
        a, w = (a.to(tl.float32), w.to(tl.float32)) if UPCAST else (a, w)
        acc = tl.dot(a, w, acc, input_precision="ieee")
        if SWIGLU:  # the up rows sit N rows below the gate rows
            up = tl.load(w_ptrs + N * K + k0, mask=(cols[None, :] < N) & (k0 + ks < K)[:, None], other=0.0)
            acc_up = tl.dot(a, up.to(tl.float32) if UPCAST else up, acc_up, input_precision="ieee")
    dtype = out_ptr.dtype.element_ty  # rounded where the reference rounds: each matmul, silu, each product
    acc = acc.to(dtype).to(tl.float32)
    if SWIGLU:
        acc = (acc / (1 + tl.exp(-acc))).to(dtype).to(tl.float32) * acc_up.to(dtype).to(tl.float32)
    else:
        acc = acc * tl.load(weights_ptr + pairs, mask=valid, other=0.0).to(tl.float32)[:, None]
    rows = pairs.to(tl.int64)[:, None]
    tl.store(out_ptr + rows * N + cols[None, :], acc.to(dtype), mask=valid[:, None] & (cols[None, :] < N))


def fused_moe(x, gate_up, down, weights, ids):  # Triton: fused_moe_reference's sums, computed expert by expert in tiles
    (num_tokens, top_k), (num_experts, _, hidden), device = ids.shape, gate_up.shape, x.device
    num_pairs = num_tokens * top_k
    # decode: a few tokens per expert, 16-row tiles; prefill: many, 64-row tiles
    block_m = 16 if num_pairs <= 16 * num_experts else 64
    # The pairs sorted by expert, each expert's group padded to whole tiles. Sizes come from shapes only (no host
    # sync, so decode steps can be CUDA graphs): the grid holds the most tiles this many pairs can need.
    flat = ids.flatten()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = cdiv(counts, block_m) * block_m
    expert, order = flat.sort(stable=True)  # the pairs' experts in order, and the pairs (their indices) in that order
    max_tiles = cdiv(num_pairs + min(num_experts, num_pairs) * (block_m - 1), block_m)
    pairs = torch.full((max_tiles * block_m,), num_pairs, dtype=torch.int32, device=device)
    rank = torch.arange(num_pairs, device=device) - (counts.cumsum(0) - counts)[expert]  # its place in its group
    pairs[(padded.cumsum(0) - padded)[expert] + rank] = order.int()  # each group starts at a whole tile
    # each tile's expert: how many groups end at or before its first row (num_experts: past the last group)
    tile_experts = torch.searchsorted(padded.cumsum(0), torch.arange(max_tiles, device=device) * block_m, right=True)
    h = torch.empty(num_pairs, down.shape[2], dtype=x.dtype, device=device)  # per pair: SwiGLU's output
    out = torch.empty(num_pairs, hidden, dtype=x.dtype, device=device)  # and the weighted down projection
    for a, w, y, swiglu in ((x, gate_up, h, True), (h, down, out, False)):  # y (num_pairs, N) = f(a @ W.T)
        _moe_gemm_kernel[(max_tiles, cdiv(y.shape[1], 64))](
            a, w, y, pairs, tile_experts, weights.flatten(), num_pairs, num_experts, y.shape[1], a.shape[1],
            TOP_K=top_k, SWIGLU=swiglu, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64, UPCAST=not x.is_cuda, num_warps=4)
    return out.view(num_tokens, top_k, hidden).sum(1)  # each token's top_k weighted outputs


class DecoderLayer(nn.Module):
    def __init__(self, cfg, tp, index):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        sparse = cfg.num_experts and index not in cfg.mlp_only_layers and (index + 1) % cfg.decoder_sparse_step == 0
        self.mlp = (SparseMoeBlock if sparse else MLP)(cfg, tp)  # a MoE model's dense layers: per config

    def forward(self, positions, h, residual, cos_sin, meta):  # each norm is applied (residual added) by the
        h, residual = self.self_attn(positions, h, residual, self.input_layernorm, cos_sin, meta)  # projection after it
        return self.mlp(h, residual, self.post_attention_layernorm)


class Model(nn.Module):
    def __init__(self, cfg, tp):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, tp, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        cos_sin = rope_table(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("cos_sin", cos_sin, persistent=False)

    def forward(self, input_ids, positions, meta):
        residual = self.embed_tokens(input_ids)  # the residual stream starts as the embeddings: every norm adds
        h = torch.zeros_like(residual)
        for layer in self.layers:
            h, residual = layer(positions, h, residual, self.cos_sin, meta)
        return self.norm(h, residual)[0]


class ForCausalLM(nn.Module):  # module paths = checkpoint keys; packed parts load through this map
    packed = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
              "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, cfg, tp):
        super().__init__()
        self.model, self.lm_head = Model(cfg, tp), ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def load_weights(self, path, tied):
        from safetensors import safe_open
        if not (files := sorted(Path(path).glob("*.safetensors"))):
            raise FileNotFoundError(f"no *.safetensors files in {path!r} (pickled .bin checkpoints are not loaded)")
        params = dict(self.named_parameters())
        # what must load: (name, expert, part) for each part (q, k, v; gate, up) of each expert's slice
        missing = {(name, expert, part) for name, param in params.items()
                   for expert in (range(param.shape[0]) if ".experts." in name else [None])
                   for part in [index for packed, index in self.packed.values() if f".{packed}." in name] or [None]}
        for file in files:  # one file, or the shards that model.safetensors.index.json lists
            with safe_open(file, "pt", "cpu") as f:
                for key in f.keys():
                    if tied and key == "lm_head.weight":
                        continue
                    # one expert's matrix (experts.7.up_proj) loads into its slice of the layer's stacked weight
                    expert = re.search(r"\.experts\.(\d+)\.", key)  # (experts.gate_up_proj.weight[7])
                    name = key if expert is None else key.replace(expert[0], ".experts.")
                    part = name.split(".")[-2]  # e.g. q_proj, which is part 0 of qkv_proj
                    packed_part, *shard = self.packed.get(part, (part,))
                    name = name.replace(f".{part}.", f".{packed_part}.")
                    if name not in params:  # e.g. Qwen3's q_norm in a checkpoint that says it is a Llama
                        raise ValueError(f"checkpoint {path!r} has a weight its architecture lacks, or in a layout "
                                         f"nanollm does not load: {key}")
                    module = self.get_submodule(name.rpartition(".")[0])
                    loader = getattr(module, "weight_loader", lambda p, w: p.data.copy_(w))  # norms: whole
                    index = None if expert is None else int(expert[1])
                    loader(params[name] if index is None else params[name][index], f.get_tensor(key), *shard)
                    missing.discard((name, index, shard[0] if shard else None))
        if missing:  # a shard not downloaded, say: never run on uninitialised memory
            raise ValueError(f"checkpoint {path!r} lacks weights (name, expert, part): {sorted(missing, key=str)[:5]}")


# -----------------------------------------------------------------------------
# Attention over a paged KV cache
# Each layer's cache holds keys as (num_blocks, block_size, kv_heads, head_dim), and values alike. A sequence owns a
# list of blocks (its block table): position p lives at offset p % block_size of block block_table[p // block_size],
# i.e. at slot block_id * block_size + offset. A step writes the new tokens' keys/values through the slot mapping, then
# attention reads the whole context (cached prefix + new tokens) back through the block table, so prefix-cache hits and
# chunked prefill need nothing special: the queries are the last q_len positions of a longer context. On a GPU, a step
# of one token a sequence (decode) runs one kernel that writes each new token itself, at position context_len - 1
# through the block table (context 0: a padding row, nothing written); it reads neither positions nor slot mapping.

@dataclass
class AttnMeta:
    slot_mapping: torch.Tensor   # (N,) int32 cache slot of each new token; -1 = padding, not written (a GPU decode
                                 # step does not read it: see above)
    cu_seqlens_q: torch.Tensor   # (B+1,) int32 offsets of each sequence's new tokens in the batch
    context_lens: torch.Tensor   # (B,) int32 tokens in the cache per sequence, new ones included
    block_tables: torch.Tensor   # (B, max_blocks) int32
    max_seqlen_q: int            # 1 for a decode step


def qk_norm_rope_store_reference(qkv, q_norm, k_norm, eps, positions, cos_sin, k_cache, v_cache, slot_mapping):
    # qkv (N, (heads + 2 kv_heads) * hd): each q and k head normalised (Qwen3; q_norm None: Qwen2, Llama), then RoPE;
    # -> q, with k and v written to the cache
    kv_heads, head_dim = k_cache.shape[2:]
    q, k, v = qkv.unflatten(1, (-1, head_dim)).split([qkv.shape[1] // head_dim - 2 * kv_heads, kv_heads, kv_heads], 1)
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    q, k = apply_rope(q, positions, cos_sin), apply_rope(k, positions, cos_sin)
    keep = slot_mapping >= 0
    for cache, x in ((k_cache, k), (v_cache, v)):
        cache.view(-1, kv_heads, head_dim)[slot_mapping[keep].long()] = x[keep]
    return q  # (N, heads, hd)


def paged_attention_reference(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale):
    # plain torch, one sequence at a time, in fp32: the definition the Triton kernels are held to
    out, block_size, group = torch.empty_like(q), k_cache.shape[1], q.shape[1] // k_cache.shape[2]
    cu, lens = cu_seqlens_q.tolist(), context_lens.tolist()
    for i, ctx in enumerate(lens):
        qi = q[cu[i]:cu[i + 1]].float()  # (n, heads, head_dim); k and v below: (ctx, heads, head_dim), GQA expanded
        blocks = block_tables[i, :cdiv(ctx, block_size)].long()
        k, v = (c[blocks].flatten(0, 1)[:ctx].float().repeat_interleave(group, 1) for c in (k_cache, v_cache))
        scores = torch.einsum("nhd,khd->hnk", qi, k) * scale
        n = qi.shape[0]  # query j sits at position ctx - n + j and sees keys 0..that position: later keys masked
        scores.masked_fill_(torch.ones(n, ctx, dtype=torch.bool, device=q.device).triu(ctx - n + 1), float("-inf"))
        out[cu[i]:cu[i + 1]] = torch.einsum("hnk,khd->nhd", scores.softmax(-1), v).to(q.dtype)
    return out


# ---- Triton kernels, the fast path on GPUs: dots take the model's dtype and accumulate in fp32; fp32 dots are exact
# ("ieee"). UPCAST: tiles go to fp32 after loading only in Triton's CPU interpreter (the tests'), whose bf16 is broken.
LOG2_E = 1.4426950408889634  # softmax runs in base 2: exp(x) = exp2(x * log2(e))


@triton.jit
def _norm_rope(ptrs, mask, weight_ptr, cos_sin_ptr, pos, eps, HEAD_DIM: tl.constexpr):
    # (heads, 1) pointers to heads of one token at position pos -> (heads, HEAD_DIM) RMSNormed (weight_ptr None: not,
    # as in Qwen2 and Llama) and rotated, rounded to the model's dtype where the reference rounds (after the norm,
    # after the weight, after RoPE). Rotate-half RoPE pairs dimension d with its partner d +- HEAD_DIM / 2.
    HALF: tl.constexpr = HEAD_DIM // 2
    dims = tl.arange(0, HEAD_DIM)[None, :]
    partner = (dims + HALF) % HEAD_DIM
    x = tl.load(ptrs + dims, mask=mask, other=0.0).to(tl.float32)
    x_partner = tl.load(ptrs + partner, mask=mask, other=0.0).to(tl.float32)
    dtype = ptrs.dtype.element_ty
    if weight_ptr is not None:
        inv_rms = tl.rsqrt(tl.sum(x * x, 1) / HEAD_DIM + eps)[:, None]
        weight, partner_weight = tl.load(weight_ptr + dims).to(tl.float32), tl.load(weight_ptr + partner).to(tl.float32)
        x = (weight * (x * inv_rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        x_partner = (partner_weight * (x_partner * inv_rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    cos = tl.load(cos_sin_ptr + pos * HEAD_DIM + dims % HALF)  # the table's rows: [cos | sin]
    sin = tl.load(cos_sin_ptr + pos * HEAD_DIM + HALF + dims % HALF)
    return (x * cos + tl.where(dims < HALF, -x_partner, x_partner) * sin).to(dtype)


@triton.jit
def _qk_norm_rope_store_kernel(qkv_ptr, q_ptr, q_norm_ptr, k_norm_ptr, cos_sin_ptr, positions_ptr, slot_mapping_ptr,
                               k_cache_ptr, v_cache_ptr, eps, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                               HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
    # grid: (num_tokens,). A program reads one token's row of qkv, [q heads | k heads | v heads] x head_dim, and writes
    # q normalised (if norm pointers are given) and rotated to q_ptr (N, heads, head_dim), k likewise and v as it is to
    # the token's slot. GPU steps of more than one token a sequence run it; in decode steps attention does this itself.
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token)
    row = qkv_ptr + token * (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM
    heads, dims = tl.arange(0, HEADS_PAD)[:, None], tl.arange(0, HEAD_DIM)[None, :]
    q = _norm_rope(row + heads * HEAD_DIM, heads < NUM_HEADS, q_norm_ptr, cos_sin_ptr, pos, eps, HEAD_DIM)
    tl.store(q_ptr + (token * NUM_HEADS + heads) * HEAD_DIM + dims, q, mask=heads < NUM_HEADS)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:  # slot -1 marks a padding token: nothing to store
        kv_heads = tl.arange(0, KV_HEADS_PAD)[:, None]
        valid, cache = kv_heads < NUM_KV_HEADS, (slot * NUM_KV_HEADS + kv_heads) * HEAD_DIM + dims
        k = _norm_rope(row + (NUM_HEADS + kv_heads) * HEAD_DIM, valid, k_norm_ptr, cos_sin_ptr, pos, eps, HEAD_DIM)
        tl.store(k_cache_ptr + cache, k, mask=valid)
        v = tl.load(row + (NUM_HEADS + NUM_KV_HEADS + kv_heads) * HEAD_DIM + dims, mask=valid)
        tl.store(v_cache_ptr + cache, v, mask=valid)


def qk_norm_rope_store(qkv, q_norm, k_norm, eps, positions, cos_sin, k_cache, v_cache, slot_mapping):
    num_tokens, (num_kv_heads, head_dim) = qkv.shape[0], k_cache.shape[2:]
    num_heads = qkv.shape[1] // head_dim - 2 * num_kv_heads
    assert qkv.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()
    q = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    _qk_norm_rope_store_kernel[(num_tokens,)](  # no tokens: no programs, nothing launched
        qkv, q, q_norm, k_norm, cos_sin, positions, slot_mapping, k_cache, v_cache, eps, NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads, HEADS_PAD=triton.next_power_of_2(num_heads), HEAD_DIM=head_dim,
        KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads))
    return q


@triton.jit
def _load_kv_tile(k_cache_ptr, v_cache_ptr, block_table_ptr, kv_pos, kv_mask, kv_head,
                  BLOCK_SIZE: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    # kv_pos: (BLOCK_N,) positions -> K and V tiles (BLOCK_N, HEAD_DIM); a tile may span several blocks
    block_id = tl.load(block_table_ptr + kv_pos // BLOCK_SIZE, mask=kv_mask, other=0).to(tl.int64)
    slot = block_id * BLOCK_SIZE + kv_pos % BLOCK_SIZE
    offs = (slot * NUM_KV_HEADS + kv_head)[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    k = tl.load(k_cache_ptr + offs, mask=kv_mask[:, None], other=0.0)
    v = tl.load(v_cache_ptr + offs, mask=kv_mask[:, None], other=0.0)
    return (k.to(tl.float32), v.to(tl.float32)) if UPCAST else (k, v)


@triton.jit
def _online_softmax_step(q, k, v, allowed, m_i, l_i, acc, qk_scale):
    # q (M, D), k/v (N, D), allowed (M, N) or (1, N); row max m_i, row sum l_i (M,) in base 2; acc (M, D) unnormalised
    s = tl.where(allowed, tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))  # m_i starts at -1e30, so m_new stays finite
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old max
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["block_tables_stride"])  # the table width changes from step to step
def _prefill_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, cu_seqlens_q_ptr, context_lens_ptr, block_tables_ptr, qk_scale,
        block_tables_stride, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    # grid: (cdiv(max_seqlen_q, BLOCK_M), num_heads, batch). Each program owns a (BLOCK_M, HEAD_DIM)
    # tile of one head's queries of one sequence and streams (BLOCK_N, HEAD_DIM) K/V tiles.
    tile, head, seq = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:  # this sequence has fewer query tiles than the longest one
        return
    context_len = tl.load(context_lens_ptr + seq)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < q_len
    dims = tl.arange(0, HEAD_DIM)
    q_pos = context_len - q_len + rows  # the last q_len positions of the context; each query sees keys 0..its position
    offs = (q_start + rows).to(tl.int64)[:, None] * (NUM_HEADS * HEAD_DIM) + head * HEAD_DIM + dims[None, :]  # q, out
    q = tl.load(q_ptr + offs, mask=row_mask[:, None], other=0.0).to(tl.float32 if UPCAST else q_ptr.dtype.element_ty)
    m_i, l_i = tl.full([BLOCK_M], -1e30, tl.float32), tl.zeros([BLOCK_M], tl.float32)  # running row max and sum
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    kv_head = head // (NUM_HEADS // NUM_KV_HEADS)
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * block_tables_stride
    kv_end = context_len - q_len + tl.minimum(tile * BLOCK_M + BLOCK_M, q_len)  # causal limit of the tile
    for kv_start in range(0, kv_end, BLOCK_N):
        kv_pos = kv_start + tl.arange(0, BLOCK_N)
        kv_mask = kv_pos < kv_end
        k, v = _load_kv_tile(k_cache_ptr, v_cache_ptr, block_table_ptr, kv_pos, kv_mask, kv_head,
                             BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, UPCAST)
        allowed = (kv_pos[None, :] <= q_pos[:, None]) & kv_mask[None, :]
        m_i, l_i, acc = _online_softmax_step(q, k, v, allowed, m_i, l_i, acc, qk_scale)
    tl.store(out_ptr + offs, acc / l_i[:, None], mask=row_mask[:, None])


def prefill_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, max_seqlen_q, out=None):
    (_, num_heads, head_dim), (_, block_size, num_kv_heads, _) = q.shape, k_cache.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    assert q.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous() and out.is_contiguous()
    # fp32 runs its dots on CUDA cores and holds twice the bytes per tile: smaller tiles avoid spills.
    # bf16 on the H100: 64 x 64 tiles and 4 warps ran fastest for prompts of 500-2,000 tokens.
    block_m, block_n = (32, 32) if q.dtype == torch.float32 else (64, 64)
    block_m = 16 if max_seqlen_q <= 16 else block_m  # short chunks (e.g. prefix-cache hits)
    _prefill_attention_kernel[(cdiv(max_seqlen_q, block_m), num_heads, cu_seqlens_q.numel() - 1)](
        q, k_cache, v_cache, out, cu_seqlens_q, context_lens, block_tables, scale * LOG2_E,
        block_tables.stride(0), NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=not q.is_cuda, num_warps=4)
    return out


@triton.jit(do_not_specialize=["block_tables_stride"])  # eager steps (no graph) change the table width
def _decode_attention_kernel(
        qkv_ptr, q_norm_ptr, k_norm_ptr, cos_sin_ptr, eps, k_cache_ptr, v_cache_ptr, out_ptr, part_m_ptr, part_l_ptr,
        part_acc_ptr, counters_ptr, context_lens_ptr, block_tables_ptr, qk_scale, block_tables_stride,
        NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
        UPCAST: tl.constexpr, PDL: tl.constexpr):
    # grid: (num_kv_heads, batch, NUM_SPLITS), whatever the context lengths (CUDA-graph safe). A sequence's new token
    # sits at position context_len - 1, its qkv row as qk_norm_rope_store reads it, and this kernel does that kernel's
    # work too. A kv head's GROUP query heads are one (GROUP_PAD, HEAD_DIM) tile (padding rows masked): K/V read once.
    kv_head, seq, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if PDL:  # see pdl()
        gdc_launch_dependents()
        gdc_wait()
    context_len = tl.load(context_lens_ptr + seq)
    num_tiles = tl.cdiv(context_len, BLOCK_N)  # dealt out evenly to as few splits as it takes: the rest stop here
    tiles_per_split = tl.maximum(tl.cdiv(num_tiles, NUM_SPLITS), 1)
    used_splits = tl.maximum(tl.cdiv(num_tiles, tiles_per_split), 1)  # a padding row (no context) uses one
    if split >= used_splits:
        return
    group_idx = tl.arange(0, GROUP_PAD)
    heads, head_mask = kv_head * GROUP + group_idx, group_idx < GROUP
    dims = tl.arange(0, HEAD_DIM)
    # the new token: the group's query heads normalised and rotated (as qk_norm_rope_store does)
    pos = tl.maximum(context_len - 1, 0)
    qkv_row = qkv_ptr + seq.to(tl.int64) * (NUM_KV_HEADS * (GROUP + 2) * HEAD_DIM)
    q = _norm_rope(qkv_row + heads[:, None] * HEAD_DIM, head_mask[:, None], q_norm_ptr, cos_sin_ptr, pos, eps, HEAD_DIM)
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * block_tables_stride
    # The split that reads the last tile caches the new key (normalised and rotated too) and value of this kv head,
    # then its threads read them back from the cache like every other key and value. No other program reads that
    # slot of this kv head: other splits stop before the last tile, and a block holding a new token is never shared.
    if split == used_splits - 1:
        zero = tl.zeros([1, 1], tl.int32)  # makes the key and value (1, HEAD_DIM) tiles
        has_token = zero < context_len  # a padding row (no context) has none: nothing is stored
        k_row = qkv_row + (NUM_KV_HEADS * GROUP + kv_head) * HEAD_DIM + zero
        slot = tl.load(block_table_ptr + pos // BLOCK_SIZE).to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        cache = (slot * NUM_KV_HEADS + kv_head) * HEAD_DIM + dims[None, :]
        new_key = _norm_rope(k_row, has_token, k_norm_ptr, cos_sin_ptr, pos, eps, HEAD_DIM)
        tl.store(k_cache_ptr + cache, new_key, mask=has_token)
        tl.store(v_cache_ptr + cache, tl.load(k_row + NUM_KV_HEADS * HEAD_DIM + dims[None, :]), mask=has_token)
        tl.debug_barrier()  # the stores before the loop's loads, for every thread of the program
    q = q.to(tl.float32) if UPCAST else q
    m_i, l_i = tl.full([GROUP_PAD], -1e30, tl.float32), tl.zeros([GROUP_PAD], tl.float32)  # running row max and sum
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for tile in range(split * tiles_per_split, tl.minimum((split + 1) * tiles_per_split, num_tiles)):  # this split's
        kv_pos = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        kv_mask = kv_pos < context_len
        k, v = _load_kv_tile(k_cache_ptr, v_cache_ptr, block_table_ptr, kv_pos, kv_mask, kv_head,
                             BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, UPCAST)
        m_i, l_i, acc = _online_softmax_step(q, k, v, kv_mask[None, :], m_i, l_i, acc, qk_scale)
    if used_splits == 1:  # nothing to merge: the output itself (0 for a padding row, whose context is empty)
        out_offs = (seq * NUM_KV_HEADS * GROUP + heads)[:, None] * HEAD_DIM + dims[None, :]
        tl.store(out_ptr + out_offs, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], mask=head_mask[:, None])
        return
    part = (seq * NUM_KV_HEADS * GROUP + heads) * NUM_SPLITS + split  # partials: (batch, heads, NUM_SPLITS[, HEAD_DIM])
    tl.store(part_m_ptr + part, m_i, mask=head_mask)
    tl.store(part_l_ptr + part, l_i, mask=head_mask)
    tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=head_mask[:, None])
    # The last of the (sequence, kv head)'s splits to finish merges them all and sets their counter back to 0. The
    # barrier orders every thread's partials before the counter's (acquire-release) atomic add.
    tl.debug_barrier()
    if tl.atomic_add(counters_ptr + seq * NUM_KV_HEADS + kv_head, 1) == used_splits - 1:
        tl.atomic_xchg(counters_ptr + seq * NUM_KV_HEADS + kv_head, 0)
        splits = tl.arange(0, SPLITS_PAD)
        for g in tl.static_range(GROUP):  # a (SPLITS_PAD, HEAD_DIM) tile of each query head's partials
            row = (seq * NUM_KV_HEADS + kv_head) * GROUP + g
            parts, valid = row * NUM_SPLITS + splits, splits < used_splits
            split_m = tl.load(part_m_ptr + parts, valid, float("-inf"), cache_modifier=".cg")  # .cg: from L2, not L1
            split_l = tl.load(part_l_ptr + parts, valid, 0.0, cache_modifier=".cg")
            split_acc = tl.load(part_acc_ptr + parts[:, None] * HEAD_DIM + dims[None, :], valid[:, None], 0.0,
                                cache_modifier=".cg")
            weight = tl.exp2(split_m - tl.max(split_m, axis=0))  # every split brought to the common max
            total = tl.sum(split_l * weight, axis=0)  # > 0: every split used has keys
            out = tl.sum(split_acc * weight[:, None], axis=0) / total
            tl.store(out_ptr + row * HEAD_DIM + dims, out)


@functools.cache
def split_counters(device):  # decode's merge counters, one per (sequence, kv head); each merge resets its own to 0
    return torch.zeros(1 << 16, dtype=torch.int32, device=device)


def decode_attention(qkv, q_norm, k_norm, eps, cos_sin, k_cache, v_cache, context_lens, block_tables, scale,
                     num_splits=None, out=None):
    # qkv (batch, (heads + 2 kv_heads) * hd): each sequence's new token -> (batch, heads, hd); its key and value cached
    (batch, width), (_, block_size, num_kv_heads, head_dim) = qkv.shape, k_cache.shape
    num_heads = width // head_dim - 2 * num_kv_heads
    out = torch.empty(batch, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device) if out is None else out
    assert qkv.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous() and out.is_contiguous()
    # K/V tiles of 8K elements (4K in fp32, to avoid spills): 64 x 128 for bf16 at head_dim 128
    block_n = max(16, min(128, (4096 if qkv.dtype == torch.float32 else 8192) // head_dim))
    if num_splits is None:  # from shapes only (CUDA-graph safe): about two waves of programs over the
        # SMs, no more splits than the block table holds KV tiles, and at most 32 (the merge reads them all)
        sms = gpu(qkv.device).multi_processor_count if qkv.is_cuda else 132
        max_tiles = cdiv(block_tables.shape[1] * block_size, block_n)
        num_splits = max(1, min(cdiv(2 * sms, batch * num_kv_heads), max_tiles, 32))
    part_m = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=qkv.device)
    part_l = torch.empty_like(part_m)  # its own allocation: 16-byte aligned whatever the shape (one compiled kernel)
    part_acc = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=qkv.device)
    counters = split_counters(qkv.device)
    assert batch * num_kv_heads <= counters.numel()
    # 2 warps a program up to batch 16 (H200, head_dim 128: up to 2.4 us a layer faster; from batch 32, 4 warps are)
    _decode_attention_kernel[(num_kv_heads, batch, num_splits)](  # programs start sequence by sequence
        qkv, q_norm, k_norm, cos_sin, eps, k_cache, v_cache, out, part_m, part_l, part_acc, counters, context_lens,
        block_tables, scale * LOG2_E, block_tables.stride(0), NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, GROUP=num_heads // num_kv_heads, UPCAST=not qkv.is_cuda,
        GROUP_PAD=max(16, triton.next_power_of_2(num_heads // num_kv_heads)), BLOCK_N=block_n, NUM_SPLITS=num_splits,
        SPLITS_PAD=triton.next_power_of_2(num_splits), num_warps=2 if batch <= 16 else 4, **pdl(qkv))
    return out


def paged_attention(qkv, q_norm, k_norm, eps, positions, cos_sin, k_cache, v_cache, meta, scale):
    # qkv (N, (heads + 2 kv_heads) * hd) -> (N, heads, hd): q/k norms and RoPE, new keys/values cached, attention
    if qkv.is_cuda and meta.max_seqlen_q == 1:  # the fast path for a decode step: one Triton kernel does it all
        return decode_attention(qkv, q_norm, k_norm, eps, cos_sin, k_cache, v_cache, meta.context_lens,
                                meta.block_tables, scale)
    store = qk_norm_rope_store if qkv.is_cuda else qk_norm_rope_store_reference  # Triton or plain torch
    q = store(qkv, q_norm, k_norm, eps, positions, cos_sin, k_cache, v_cache, meta.slot_mapping)
    args = (q, k_cache, v_cache, meta.cu_seqlens_q, meta.context_lens, meta.block_tables, scale)
    return prefill_attention(*args, meta.max_seqlen_q) if q.is_cuda else paged_attention_reference(*args)


# -----------------------------------------------------------------------------
# Sequences and the block manager (prefix caching)
# A block is "published" under a hash once all its tokens are computed and cached. The hash chains the parent block's
# hash with the block's token ids, so equal hashes mean equal prefixes; a hit is still confirmed against the stored
# parent hash and tokens. A block whose last user is done returns to the free list with its hash and contents: a later
# request with the same prefix revives it, until it is handed out for new tokens (least recently freed first). Ctrl-C:
# Python raises KeyboardInterrupt as a call returns, a function starts or a loop goes round, never between two plain
# statements (`n -= 1`, `d[k] = v`); at each such point below, release() can give every block back exactly once.

class Sequence:
    def __init__(self, request_id, token_ids, params):
        self.request_id = request_id
        self.params = params
        self.token_ids = list(token_ids)     # prompt, then generated tokens
        self.num_prompt_tokens = len(token_ids)
        self.block_table = []                # ids of the blocks holding its tokens' keys and values, in order
        self.num_computed_tokens = 0         # tokens whose keys/values are in the cache
        self.num_scheduled_tokens = 0        # tokens to compute in the current step
        self.finish_reason = None            # "stop", "length" or "abort" once finished
        self.running = False                 # in the scheduler's running list
        self.placeholder = None              # -1 - row of its newest token in a sample still on the GPU

    def __len__(self):  # the newest token counts while it is still on its way to the host
        return len(self.token_ids) + (self.placeholder is not None)

    @property
    def completion_token_ids(self):
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self):
        return self.finish_reason is not None


@dataclass(eq=False)
class Block:
    id: int
    ref_count: int = 0
    hash: int = -1          # -1: not published
    parent_hash: int = -1
    token_ids: tuple = ()


class BlockManager:
    def __init__(self, num_blocks, block_size, enable_prefix_caching=True):
        self.block_size, self.enable_prefix_caching = block_size, enable_prefix_caching
        self.blocks, self.hash_to_block = [Block(i) for i in range(num_blocks)], {}
        self.free = OrderedDict.fromkeys(range(num_blocks))   # ref_count == 0, oldest-freed first

    def blocks_needed(self, seq, num_tokens):  # new blocks for seq to hold num_tokens more tokens
        return max(0, cdiv(seq.num_computed_tokens + num_tokens, self.block_size) - len(seq.block_table))

    def claim_cached_prefix(self, seq):
        # the longest published run of seq's first full blocks, short of its last token (its logits give the next one)
        assert not seq.block_table
        parent = -1
        for i in range((len(seq) - 1) // self.block_size if self.enable_prefix_caching else 0):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            block = self.hash_to_block.get(hash((parent, tokens)))
            if block is None or block.parent_hash != parent or block.token_ids != tokens:
                break
            block.ref_count += 1
            seq.block_table.append(block.id)
            self.free.pop(block.id, None)  # revived from the free list (where exactly the blocks of ref_count 0 are)
            parent = block.hash
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        return seq.num_computed_tokens

    def allocate(self, seq, num_tokens):  # fresh blocks for the next num_tokens of seq
        for _ in range(self.blocks_needed(seq, num_tokens)):
            block = self.blocks[next(iter(self.free))]  # the least recently freed
            if self.hash_to_block.get(block.hash) is block:  # evict its old contents
                del self.hash_to_block[block.hash]
            self.blocks[block.id] = Block(block.id, ref_count=1)  # a fresh record: unpublished, no tokens
            seq.block_table.append(block.id)
            del self.free[block.id]  # after the append: a Ctrl-C between leaves it in both; release() mends that

    def commit(self, seq, num_tokens):  # seq's next num_tokens are computed: publish the blocks they filled
        computed = seq.num_computed_tokens + num_tokens
        for i in range(seq.num_computed_tokens // self.block_size, computed // self.block_size):
            block = self.blocks[seq.block_table[i]]
            block.parent_hash = self.blocks[seq.block_table[i - 1]].hash if i else -1
            block.token_ids = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            block.hash = hash((block.parent_hash, block.token_ids))
            self.hash_to_block.setdefault(block.hash, block)  # an equal twin may be published already
        # counted last: after a Ctrl-C in the loop the tokens are computed again, so no full block stays unpublished
        seq.num_computed_tokens = computed

    def release(self, seq):  # the tail is freed first, so it is also evicted first
        while seq.block_table:
            block = self.blocks[seq.block_table[-1]]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block.id] = None
            seq.block_table.pop()  # last: a Ctrl-C lands before the block is released or after it left the table
        seq.num_computed_tokens = 0


# -----------------------------------------------------------------------------
# Scheduler: continuous batching with chunked prefill and preemption
# A step is a prefill step (prompt chunks, up to max_num_batched_tokens tokens) or a decode step (one token for every
# running sequence); prefill goes first: new requests join once there is room. A sequence that cannot get a block for
# its next token preempts the newest admitted one, which frees its blocks and recomputes later (mostly prefix-cached).

class Scheduler:
    def __init__(self, config, num_kvcache_blocks, eos_token_ids, stats):
        self.config = config
        self.block_manager = BlockManager(num_kvcache_blocks, config.kvcache_block_size, config.enable_prefix_caching)
        self.eos_token_ids = set(eos_token_ids)
        self.waiting = deque()   # not admitted, or preempted (at the front)
        self.running = []        # admitted, oldest first
        self.stats = stats       # the engine's counters: preemptions and cached_prompt_tokens are counted here

    def schedule(self):  # -> (batch, is_prefill)
        # a prefill step: first the running sequences still prefilling (chunked prompts), oldest first...
        batch, budget = self.schedule_running([s for s in self.running if len(s) - s.num_computed_tokens > 1],
                                              self.config.max_num_batched_tokens)
        # ...then new (or preempted) sequences in arrival order, while the free blocks hold all their uncached tokens
        # (admitted on its first chunk alone, a long prompt beside a growing sequence could be preempted and restarted
        # from its first token again and again: without prefix caching nothing of the work it lost comes back)
        while self.waiting and budget and len(self.running) < self.config.max_num_seqs:  # caps the batch too
            seq = self.waiting[0]
            uncached = len(seq) - self.block_manager.claim_cached_prefix(seq)
            if self.block_manager.blocks_needed(seq, uncached) > len(self.block_manager.free):
                self.block_manager.release(seq)  # give the claimed prefix back; try again next step
                break
            self.running.append(self.waiting.popleft())
            seq.running = True
            self.stats["cached_prompt_tokens"] += seq.num_computed_tokens  # all claimed from the prefix cache
            budget -= self.take(seq, min(uncached, budget), batch)
        if batch:
            return batch, True
        # decode: one token each, longest context first. The attention kernel's programs start sequence by sequence,
        # so the long ones start early and the GPU's last wave is short work (README: 3-4% faster attention)
        return sorted(self.schedule_running(list(self.running), len(self.running))[0], key=len, reverse=True), False

    def schedule_running(self, seqs, budget):  # oldest first -> (batch, budget left: 0 once a sequence must wait)
        batch = []
        for seq in seqs:
            if not seq.running or budget == 0:
                continue  # preempted just now by an older sequence, or no tokens left for it this step
            num_tokens = min(len(seq) - seq.num_computed_tokens, budget)
            while self.block_manager.blocks_needed(seq, num_tokens) > len(self.block_manager.free):
                newest = self.running[-1]  # preempted: newer sequences make way for older ones, and last of all seq
                self.remove(newest)
                self.waiting.appendleft(newest)
                self.stats["preemptions"] += 1
                if newest is seq:  # seq itself must wait
                    return batch, 0
            budget -= self.take(seq, num_tokens, batch)
        return batch, budget

    def take(self, seq, num_tokens, batch):
        self.block_manager.allocate(seq, num_tokens)
        seq.num_scheduled_tokens = num_tokens
        batch.append(seq)
        return num_tokens

    def remove(self, seq):  # out of its queue, if in one; its blocks back (a waiting one's: claimed before a Ctrl-C)
        if seq in self.running:  # not the flag: a Ctrl-C may land between the two
            self.running.remove(seq)
            seq.running = False
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.release(seq)

    def postprocess(self, batch, rows):  # rows: those sampled, in row order; each still running gets a placeholder
        for seq in batch:
            if seq.running:  # not finished while the step ran
                self.block_manager.commit(seq, seq.num_scheduled_tokens)
        for row, seq in enumerate(rows):
            if seq.running:
                seq.placeholder = -1 - row
                if self.at_length_limit(seq):
                    self.remove(seq)  # nothing left to compute; finish() gives the reason

    def finish(self, seq, token):  # the sampled id of seq's placeholder reached the host
        seq.token_ids.append(token)
        seq.placeholder = None
        stop = (not seq.params.ignore_eos and token in self.eos_token_ids) or token in seq.params.stop_token_ids
        if stop or self.at_length_limit(seq):
            self.remove(seq)  # first: an abort skips a finished sequence
            seq.finish_reason = "stop" if stop else "length"

    def at_length_limit(self, seq):
        return len(seq) - seq.num_prompt_tokens == seq.params.max_tokens or len(seq) == self.config.max_model_len


# -----------------------------------------------------------------------------
# Model runner: batch -> tensors -> forward (CUDA graph replay for decode) -> logits -> sampled tokens

def sample(logits, temperature, seeds, top_k=None, top_p=None, candidates=None):
    # logits: (B, V); temperature: (B,) float, 0 = greedy; seeds: (B,) int32, each row's random stream; top_k: (B,)
    # int (V = all) and top_p: (B,) float, None when no row filters; candidates: >= each row's top_k -> (B,) int32 ids
    if top_k is not None:  # the kept tokens are among each row's best `candidates`: up to V / 8 a partial sort, more
        # a whole one (whose memory the KV cache's warm-up measures: topk near V takes more, and is slower)
        best, order = logits.topk(candidates) if candidates * 8 <= logits.shape[1] else logits.sort(descending=True)
        kept = filter_top_k_top_p(best, temperature, top_k, top_p)
        logits = torch.full_like(logits, float("-inf")).scatter_(1, order, kept)  # -inf outside the kept set
    return (sample_triton if logits.is_cuda else sample_reference)(logits, temperature, seeds)


@compiled_on_gpu
def filter_top_k_top_p(best, temperature, top_k, top_p):  # best: (B, C) each row's best logits, in order
    # -> best with -inf at ranks >= top_k, then in the tail past top_p of the renormalised rest. Its shapes are
    # (B, C) only: were the logits' width V among them, a C < V would compile apart from the warm-up's C = V
    dropped = torch.arange(best.shape[1], device=best.device) >= top_k.unsqueeze(1)
    probs = (best.float() / temperature.clamp(min=1e-6).unsqueeze(1)).masked_fill(dropped, float("-inf")).softmax(-1)
    # the mass of the better tokens reached top_p; the best token always stays (a top_p of 1e-50 is 0 in fp32). A
    # top_p of 1 drops nothing: the fp32 sum of a long tail reaches 1 early (a row's draw must not depend on the batch)
    dropped |= probs.cumsum(-1) - probs >= top_p.clamp(min=1e-30).masked_fill(top_p >= 1, 2).unsqueeze(1)
    return best.masked_fill(dropped, float("-inf"))


def sample_reference(logits, temperature, seeds):
    # The exponential race: with E_i ~ Exp(1), argmax(p_i / E_i) is index i with probability p_i. In logs,
    # argmax(logits / T - log E) with E = -log U, U uniform in [0, 1) drawn from the row's seed.
    uniform = torch.stack([torch.rand(logits.shape[1], generator=torch.Generator().manual_seed(s))
                           for s in seeds.tolist()]).to(logits.device)
    race = logits.float() / temperature.clamp(min=1e-6).unsqueeze(1) - (-uniform.log()).log()
    return torch.where(temperature == 0, logits.argmax(-1), race.argmax(-1)).int()


@triton.jit
def _sample_kernel(logits_ptr, temperature_ptr, seed_ptr, best_ptr, best_index_ptr, vocab, row_stride,
                   PART: tl.constexpr, BLOCK: tl.constexpr):
    row, part = tl.program_id(0), tl.program_id(1)  # the race over columns [part * PART, (part + 1) * PART) of row
    temperature, seed = tl.load(temperature_ptr + row), tl.load(seed_ptr + row)
    QUARTER: tl.constexpr = BLOCK // 4
    best = tl.full([QUARTER], float("-inf"), tl.float32)  # per lane: the best score so far and its index
    best_index = tl.zeros([QUARTER], tl.int32)
    row_ptr = logits_ptr + row.to(tl.int64) * row_stride  # int64: rows x vocab passes 2^31 at ~14K rows
    for start in range(part * PART, (part + 1) * PART, BLOCK):
        # one Philox call gives four random words: for columns start + i, + QUARTER, + 2 QUARTER, + 3 QUARTER
        randoms = tl.randint4x(seed, start // 4 + tl.arange(0, QUARTER))
        for j in tl.static_range(4):
            cols = start + j * QUARTER + tl.arange(0, QUARTER)
            logit = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            uniform = tl.random.uint_to_uniform_float(randoms[j])  # in [0, 1)
            # the reference's race times log2(e), less a constant: the same argmax, on the cheaper base-2 logs
            race = logit * (1.4426950408889634 / tl.maximum(temperature, 1e-6)) - tl.log2(-tl.log2(uniform))
            score = tl.where(temperature > 0, race, logit)
            better = score > best  # lanes see their columns in increasing order: ties keep the lowest
            best, best_index = tl.where(better, score, best), tl.where(better, cols, best_index)
    top = tl.max(best, 0)  # ties go to the lowest index, as in torch.argmax
    tl.store(best_ptr + row * tl.num_programs(1) + part, top)
    tl.store(best_index_ptr + row * tl.num_programs(1) + part, tl.min(tl.where(best == top, best_index, vocab), 0))


def sample_triton(logits, temperature, seeds, part=8192, block=2048):
    rows, vocab = logits.shape
    parts = cdiv(vocab, part)  # the row is split so that even one row fills the GPU
    best = torch.empty(rows, parts, device=logits.device)
    best_index = torch.empty_like(best, dtype=torch.int32)
    _sample_kernel[(rows, parts)](logits, temperature, seeds, best, best_index, vocab, logits.stride(0),
                                  PART=part, BLOCK=min(block, part))
    return best_index.gather(1, best.argmax(1, keepdim=True)).squeeze(1)


# A step's inputs, in the order of its one upload: per token, per sequence, per sampled row, then the block tables
STEP_INPUTS = ["positions", "input_ids", "slot_mapping", "cu_seqlens_q", "context_lens", "logits_rows", "seeds",
               "temperature", "top_k", "top_p", "block_tables"]


class ModelRunner:
    def __init__(self, config, tp=Parallel()):
        self.config = config
        self.tp = tp
        self.block_size = config.kvcache_block_size
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if config.device == "cuda" else config.device)
        torch.set_default_dtype(config.torch_dtype)
        with self.device:
            self.model = ForCausalLM(config.hf, tp)
        torch.set_default_dtype(torch.float32)
        self.model.load_weights(config.model, config.hf.tie_word_embeddings)
        self.kv_heads = config.hf.num_key_value_heads // tp.size
        self.block_bytes = (2 * config.hf.num_hidden_layers * self.block_size * self.kv_heads * config.hf.head_dim
                            * config.torch_dtype.itemsize)
        self.graphs = {}  # batch size -> (CUDA graph, its outputs); none until capture_cudagraph()
        self.sampled = torch.zeros(config.max_num_seqs, dtype=torch.int32, device=self.device)  # the last step's ids
        num_blocks = torch.tensor([config.num_kvcache_blocks or self.measure_kv_cache_blocks()], device=self.device)
        if tp.size > 1:  # every rank must agree: take the smallest
            dist.all_reduce(num_blocks, dist.ReduceOp.MIN, group=tp.group)
        self.num_kvcache_blocks = int(num_blocks.item())
        self.allocate_kv_cache(self.num_kvcache_blocks)
        if self.device.type == "cuda" and not config.enforce_eager:
            self.capture_cudagraph()

    # ---- tensor parallelism: rank 0 calls a method, and every other rank runs the same call
    def call(self, method, *args):
        if self.tp.size > 1:
            dist.broadcast_object_list([(method, args)], src=self.tp.first, group=self.tp.control)
        return getattr(self, method)(*args)

    def loop(self):  # ranks 1..N-1: run rank 0's commands until "exit"
        method = None
        while method != "exit":
            command = [None]
            dist.broadcast_object_list(command, src=self.tp.first, group=self.tp.control)
            method, args = command[0]
            getattr(self, method)(*args)

    def exit(self):  # nothing to do: the other ranks leave loop() after this command
        pass

    def rpc(self, fn, args):  # fn(runner, *args) on every rank; rank 0 gets the list of results
        result = fn(self, *args)
        if self.tp.size == 1:
            return [result]
        results = [None] * self.tp.size if self.tp.rank == 0 else None
        dist.gather_object(result, results, dst=self.tp.first, group=self.tp.control)
        return results

    def allocate_kv_cache(self, num_blocks):
        self.kv_cache = torch.empty(2, self.config.hf.num_hidden_layers, num_blocks, self.block_size, self.kv_heads,
                                    self.config.hf.head_dim, dtype=self.config.torch_dtype, device=self.device)
        for i, layer in enumerate(self.model.model.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]

    def measure_kv_cache_blocks(self):
        if self.device.type == "cpu":  # a fixed budget: the CPU path is for learning and tests
            return max(1, (1 << 30) // self.block_bytes)  # 1 GiB
        # the KV cache gets gpu_memory_utilization less the weights, other processes and the peak of the largest step
        cfg, hf, bs = self.config, self.config.hf, self.block_size
        n, rest = divmod(cfg.max_num_batched_tokens, cfg.max_model_len)
        # the sampler's filters (compiled) at their largest batch and at batch 1 (the last sequence, of one token), so
        # that torch.compile never compiles in the middle of a run
        params = SamplingParams(top_p=0.9)  # no top_k: a whole sort, the filter's largest memory
        seqs = [Sequence(-1, [0] * m, params) for m in [cfg.max_model_len] * n + ([rest] if rest else []) + [1]]
        for seq in seqs:  # what the cache holds does not matter here, so all of them share the first blocks
            seq.num_scheduled_tokens, seq.block_table = len(seq), list(range(cdiv(len(seq), bs)))
        self.allocate_kv_cache(len(seqs[0].block_table))
        torch.cuda.reset_peak_memory_stats()  # the peak of allocated bytes (memory the allocator caches is not counted)
        baseline = torch.cuda.memory_allocated()
        step = self.prepare(seqs[:-1])
        for name in ("logits_rows", "seeds", "temperature", "top_k", "top_p"):  # the largest sampled batch
            step[name] = (step[name] * cfg.max_num_seqs)[:cfg.max_num_seqs]
        self.run(step)
        self.run(self.prepare(seqs[-1:]))
        activations = torch.cuda.max_memory_allocated() - baseline
        self.allocate_kv_cache(0)  # frees the warm-up cache
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        # CUDA graphs: 256 MiB, the logits of the largest one's batch, and every graph's hidden rows (it keeps its own:
        # the graphs' batch sizes add up to less than 17 times the largest), counted at 4 bytes (fp32, the widest)
        graphs = (256 << 20) + min(cfg.max_num_seqs, 512) * (hf.vocab_size + 17 * hf.hidden_size) * 4
        budget = total * cfg.gpu_memory_utilization - (total - free) - activations - graphs
        if budget < self.block_bytes:
            raise RuntimeError(f"no GPU memory left for the KV cache: {budget / 2**30:.2f} GiB after weights "
                               f"and activations; raise gpu_memory_utilization or lower max_num_batched_tokens")
        return int(budget // self.block_bytes)

    # ---- one step: host lists -> one upload -> the model -> the LM head and sampler (a decode step: a graph replay)
    def prepare(self, batch):  # host lists describing one step; rank 0 builds them and sends them to the other ranks
        bs, vocab = self.block_size, self.config.hf.vocab_size
        step = {name: [0] if name == "cu_seqlens_q" else [] for name in STEP_INPUTS}
        for seq in batch:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + seq.num_scheduled_tokens
            step["input_ids"] += seq.token_ids[start:end] + ([seq.placeholder] if end > len(seq.token_ids) else [])
            step["positions"] += range(start, end)
            step["slot_mapping"] += [seq.block_table[p // bs] * bs + p % bs for p in range(start, end)]
            step["cu_seqlens_q"].append(step["cu_seqlens_q"][-1] + end - start)
            step["context_lens"].append(end)
            step["block_tables"].append(seq.block_table)
            if end == len(seq):  # the last token is computed: its logits give the next token, sampled by its params
                step["logits_rows"].append(step["cu_seqlens_q"][-1] - 1)
                # a request with a seed draws from a stream given by its seed and length, whatever else is in the batch
                step["seeds"].append(random.getrandbits(31) if seq.params.seed is None
                                     else (int(seq.params.seed) * 1000003 + len(seq)) % 2**31)  # numpy ints wrap
                step["temperature"].append(seq.params.temperature)
                step["top_k"].append(min(seq.params.top_k, vocab) if seq.params.top_k > 0 else vocab)  # fits int32
                step["top_p"].append(seq.params.top_p)
        step["max_seqlen_q"] = max(seq.num_scheduled_tokens for seq in batch)
        return step

    def upload(self, step, graph_bs=None):  # -> {name: device view} of step's inputs (tables flat), from one copy
        # One int32 tensor, floats as their bits (head() views them as floats again). Each part is 16-byte aligned:
        # Triton specialises a kernel on its pointers' alignment, and nothing may compile mid-run.
        if graph_bs is not None:  # a decode step grown to a graph's batch size, into the buffer the graph reads: its
            # padding rows have context 0, so write nothing (slot -1 too), attend to nothing and sample greedily from
            # row 0. The block tables come last: every other input lands where it did at capture, whatever their width.
            fill = dict(slot_mapping=-1, top_k=self.config.hf.vocab_size, top_p=1.0, block_tables=[0])
            step = {name: step[name] + [fill.get(name, 0)] * (graph_bs - len(step[name])) for name in STEP_INPUTS}
            step["cu_seqlens_q"] = list(range(graph_bs + 1))
        width = max(map(len, step["block_tables"]))
        parts = {name: array("i", array("f", step[name]).tobytes()).tolist() if name in ("temperature", "top_p")
                 else step[name] for name in STEP_INPUTS}
        parts["block_tables"] = [b for table in step["block_tables"] for b in table + [0] * (width - len(table))]
        host = torch.tensor([x for part in parts.values() for x in part + [0] * (-len(part) % 4)], dtype=torch.int32,
                            pin_memory=self.device.type == "cuda")
        flat = torch.empty_like(host, device=self.device) if graph_bs is None else self.graph_inputs[:len(host)]
        flat.copy_(host, non_blocking=True)
        return dict(zip(parts, flat.split([n for part in parts.values() for n in (len(part), -len(part) % 4)])[::2]))

    def forward(self, inputs, max_seqlen_q):  # -> the final hidden states of the rows to sample
        # input -1 - row: that row of the previous step's sampled ids, still on the device
        input_ids = inputs["input_ids"]
        input_ids = torch.where(input_ids < 0, self.sampled[(-1 - input_ids).clamp(min=0)], input_ids)
        tables = inputs["block_tables"].view(len(inputs["context_lens"]), -1)
        meta = AttnMeta(inputs["slot_mapping"], inputs["cu_seqlens_q"], inputs["context_lens"], tables, max_seqlen_q)
        return self.model.model(input_ids, inputs["positions"], meta)[inputs["logits_rows"]]

    def head(self, hidden, inputs, candidates, logits=None):  # LM head (unless logits are given) and sampler -> ids
        # (rows,) in self.sampled; None off rank 0. candidates: see sample(); None: no row filters
        logits = self.model.lm_head(hidden) if logits is None else logits
        if logits is None:
            return None
        filters = (inputs["top_k"], inputs["top_p"].view(torch.float32), candidates) if candidates else ()
        ids = sample(logits, inputs["temperature"].view(torch.float32), inputs["seeds"], *filters)
        return self.sampled[:len(hidden)].copy_(ids)

    @torch.inference_mode()
    def run(self, step):  # -> the sampled ids (rows,) on the device on the group's first rank; else or no rows: None
        rows = len(step["logits_rows"])
        # with top-k/top-p filters: 2 candidates at least (torch.compile would specialise the filter for 1)
        filtered = any(k < self.config.hf.vocab_size for k in step["top_k"]) or any(p < 1 for p in step["top_p"])
        candidates = max(2, *step["top_k"]) if filtered else None
        # a decode step replays the smallest graph that fits it
        bs = min((b for b in self.graphs if b >= len(step["input_ids"]) and step["max_seqlen_q"] == 1), default=None)
        inputs = self.upload(step, graph_bs=bs)
        if bs is None:
            hidden, logits, ids = self.forward(inputs, step["max_seqlen_q"]), None, None
        else:  # the graph reads its inputs where they were at capture; only the tables' columns in use are copied
            self.graph_tables[:bs, :len(inputs["block_tables"]) // bs] = inputs["block_tables"].view(bs, -1)
            graph, hidden, logits, ids = self.graphs[bs]
            graph.replay()
        if rows and (ids is None or filtered):  # no head in the graph (tensor parallelism), or top-k/top-p filters
            ids = self.head(hidden, inputs, candidates, logits)
        return ids[:rows] if rows and ids is not None else None

    # ---- CUDA graphs: decode steps are replayed from graphs captured once per bucketed batch size
    @torch.inference_mode()  # as run() is: torch.compile compiles once per grad mode
    def capture_cudagraph(self):
        max_bs = min(self.config.max_num_seqs, 512)
        width = cdiv(self.config.max_model_len, self.block_size)
        # static buffers: a replay reads its inputs from these; the tables are copied apart, at their width in use
        self.graph_tables = torch.zeros(max_bs, width, dtype=torch.int32, device=self.device)
        self.graph_inputs = self.graph_tables.new_zeros((max_bs + 4) * (len(STEP_INPUTS) + width))
        if self.tp.size == 1:  # the head's output; with tensor parallelism the graphs hold no head
            self.graph_logits = self.model.lm_head.weight.new_empty(max_bs, self.model.lm_head.rows)
        pool = torch.cuda.graph_pool_handle()  # one memory pool: captured largest first, smaller graphs reuse it
        for bs in reversed([b for b in [1, 2, 4, 8, *range(16, max_bs, 16)] if b < max_bs] + [max_bs]):
            inputs = self.upload({name: [] for name in STEP_INPUTS}, graph_bs=bs)
            inputs["block_tables"] = self.graph_tables[:bs]
            self.head(self.forward(inputs, 1), inputs, None)  # run once (Triton compiles), then captured
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                hidden = self.forward(inputs, 1)
                # the head too, but with tensor parallelism: its gather to rank 0 is not proven inside a graph. Its
                # logits go to a buffer that outlives the replay: a step with top-k/top-p filters samples them again
                logits = self.model.lm_head(hidden, out=self.graph_logits[:bs]) if self.tp.size == 1 else None
                ids = self.head(hidden, inputs, None, logits) if logits is not None else None
            self.graphs[bs] = (graph, hidden, logits, ids)
            torch.cuda.synchronize()


# -----------------------------------------------------------------------------
# Tensor-parallel launcher
# LLM(tensor_parallel_size=N) spawns ranks 1..N-1 with torch.multiprocessing. They meet rank 0 at a TCP store on a
# loopback port the OS picks (none is hard-coded, so engines never collide, and there is no file to clean up), build
# their model shard and run ModelRunner.loop(). Collectives use NCCL on GPUs, gloo on CPUs; commands travel on a gloo
# group. The store lives as long as the process group: NCCL connects lazily, through the store, at its first
# collective, and so does every group made later. A failing worker queues its traceback and exits; rank 0 then fails
# its next collective, ends every worker and raises that traceback. Nothing waits forever: a rank that does not come is
# reported after dist_timeout_s, one that ends during start-up at once, and a model collective that cannot complete
# fails after dist_timeout_s (on GPUs NCCL's watchdog then ends the process).
IDLE_TIMEOUT = timedelta(days=30)  # commands (an idle chat) and data-parallel results (uneven jobs) may be far apart


def spawn_workers(config):  # -> ranks 1..N-1's processes, the queue of their tracebacks, rank 0's rendezvous store
    if dist.is_initialized():  # torch's own error came later, and ending this engine then ended the running one's group
        raise RuntimeError("a tensor-parallel LLM already runs in this process: exit() it first (one at a time)")
    ctx = torch.multiprocessing.get_context("spawn")
    # no world size: the store waits for no one (join_workers watches the ranks arrive, or end)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=config.dist_timeout_s))
    errors = ctx.SimpleQueue()
    workers = [ctx.Process(target=worker_main, args=(config, rank, store.port, errors), daemon=True)
               for rank in range(1, config.tensor_parallel_size)]
    for w in workers:
        w.start()
    return workers, errors, store


def join_workers(config, workers, store):  # rank 0: waits for every spawned rank at the store, watching them
    deadline = time.monotonic() + config.dist_timeout_s
    while not store.check([f"joined/{rank}" for rank in range(1, config.tensor_parallel_size)]):
        for rank, w in enumerate(workers, 1):
            if not w.is_alive():
                raise RuntimeError(f"tensor-parallel rank {rank} ended during start-up (exit code {w.exitcode})")
        if time.monotonic() > deadline:
            raise TimeoutError(f"tensor-parallel ranks did not reach the rendezvous in {config.dist_timeout_s} s")
        time.sleep(0.01)
    return init_parallel(config, 0, store)


def init_parallel(config, rank, store=None, world_size=None, local_rank=None):
    # spawned ranks meet at rank 0's store, torchrun's (world_size) at env://; -> this rank's group (tp_size ranks)
    tp_size = config.tensor_parallel_size
    world_size = world_size or tp_size
    if config.device == "cuda":
        torch.cuda.set_device(rank if local_rank is None else local_rank)
    dist.init_process_group("nccl" if config.device == "cuda" else "gloo", store=store, world_size=world_size,
                            rank=rank, timeout=timedelta(seconds=config.dist_timeout_s))
    # (group, control) of each tensor-parallel group; every rank creates all of them, in the same order
    group_ranks = [list(range(first, first + tp_size)) for first in range(0, world_size, tp_size)]
    groups = [(dist.group.WORLD if tp_size == world_size else dist.new_group(ranks),  # one group: the world
               dist.new_group(ranks, backend="gloo", timeout=IDLE_TIMEOUT)) for ranks in group_ranks]
    return Parallel(rank % tp_size, tp_size, *groups[rank // tp_size], first=rank - rank % tp_size)


def worker_main(config, rank, port, errors):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle; it ends the workers
    try:
        store = dist.TCPStore("127.0.0.1", port, timeout=timedelta(seconds=config.dist_timeout_s))
        store.set(f"joined/{rank}", "")
        ModelRunner(config, init_parallel(config, rank, store)).loop()
        dist.destroy_process_group()
    except BaseException:
        errors.put(f"tensor-parallel rank {rank} failed:\n{traceback.format_exc()}")
        os._exit(1)


# -----------------------------------------------------------------------------
# LLM: the API. generate() is a loop over the step-level engine: add_request(), step(), is_finished().

class LLM(AbstractContextManager):  # `with LLM(...) as llm:` ends the engine (and its workers) on leaving
    def __init__(self, model, *, parallel=None, **kwargs):
        # parallel: the caller's tensor-parallel group (torchrun); None: tensor_parallel_size > 1 spawns the other ranks
        self.config = config = Config(model, **kwargs)
        from transformers import AutoTokenizer
        # no clean-up of spaces before punctuation (Llama 3's config asks for it; transformers 4 does it): it would
        # rewrite text a stream has already sent, and transformers 5 and vLLM leave the text as it is anyway
        self.tokenizer = AutoTokenizer.from_pretrained(model, clean_up_tokenization_spaces=False)
        if len(self.tokenizer) < 2:  # transformers gives a directory without tokenizer files an empty one
            raise ValueError(f"no tokenizer in {model!r}: nanollm needs the model's own (tokenizer.json or the like)")
        self.runner, self.workers, self.errors = None, [], None  # the model's runner; spawned ranks, their tracebacks
        self.requests = {}  # id -> Sequence, until it finishes or is aborted
        self.pending = None  # the last step's sampled ids on their way to the host (see step())
        self.ids_overwritten = False
        try:
            if parallel is None and config.tensor_parallel_size > 1:
                self.workers, self.errors, store = spawn_workers(config)
                parallel = join_workers(config, self.workers, store)
            self.runner = ModelRunner(config, parallel or Parallel())
        except BaseException as e:
            self.exit(e)
        self.num_kvcache_blocks = self.runner.num_kvcache_blocks
        eos_token_ids = config.hf.eos_token_ids or tuple({self.tokenizer.eos_token_id} - {None})  # may have none
        # counters since start: prefill_tokens and decode_tokens, the tokens computed by each kind of step (a row whose
        # sequence stopped while in the next step's batch too); the scheduler's preemptions and cached_prompt_tokens
        self.stats = dict(prompt_tokens=0, cached_prompt_tokens=0, prefill_tokens=0, decode_tokens=0,
                          preemptions=0, steps=0)
        self.scheduler = Scheduler(config, self.num_kvcache_blocks, eos_token_ids, self.stats)
        self.request_ids = itertools.count()  # ids for new requests: 0, 1, 2, ...

    def __exit__(self, exc_type, exc, tb):
        self.exit(abrupt=exc is not None)

    def exit(self, failure=None, abrupt=False):
        # workers waiting for a command get "exit"; mid-step (error, Ctrl-C) they may be in a collective: terminated
        abrupt = abrupt or failure is not None
        if self.runner is not None and self.runner.tp.size > 1 and not abrupt:
            self.call("exit")  # a dead worker: its error is raised, after the clean-up
        workers, self.workers = self.workers, []  # a second exit() finds none
        self.runner = self.pending = None
        self.abort(*self.requests)  # so a later step() has nothing to run
        for w in workers:
            w.join(timeout=0.5 if abrupt else 5)
        # a worker's traceback, or the exit code of one that ended by itself without a word (killed, say)
        ended = [f"tensor-parallel rank {rank} ended with exit code {w.exitcode}"
                 for rank, w in enumerate(workers, 1) if w.exitcode not in (None, 0)]
        for w in workers:
            w.terminate()  # no-op for a worker that has ended
            w.join()
        worker_error = self.errors.get() if workers and not self.errors.empty() else next(iter(ended), None)
        if workers and dist.is_initialized():
            dist.destroy_process_group()
        if worker_error:
            raise RuntimeError(worker_error) from failure
        if failure is not None:
            raise failure

    def call(self, method, *args):  # on every rank; a failure anywhere ends the engine
        if self.runner is None:
            raise RuntimeError("this LLM has exited")
        try:
            return self.runner.call(method, *args)
        except BaseException as e:  # Ctrl-C too: mid-step the other ranks may be left inside a collective
            if not self.workers:
                raise
            self.exit(e)

    def collective_rpc(self, fn, *args):  # fn(runner, *args) on every rank (inspect or swap weights) -> results by rank
        self.scheduler.block_manager.hash_to_block.clear()  # fn may change the weights: no cached prefix is reused
        return self.call("rpc", fn, args)

    # ---- requests
    def chat_prompt(self, messages, **kwargs):  # -> token ids up to the reply; kwargs: Qwen3's enable_thinking=...
        # tokenized as HF does: only the template's special tokens (its text got a BOS added where it had none)
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False, **kwargs)

    def make_sequence(self, prompt, params):  # validate before any work, so a bad request changes nothing
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):  # one that starts with BOS (a chat template's, Llama 3's) gets no second one
            bos = self.tokenizer.bos_token
            token_ids = self.tokenizer.encode(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))
        elif isinstance(prompt, (list, tuple)) and all(is_int(t) for t in prompt):  # numpy's ints too, not bools
            token_ids = [int(t) for t in prompt]
        else:
            raise TypeError("a prompt is a string or a list of token ids")
        if not token_ids:
            raise ValueError("empty prompt: at least one token is needed")
        if bad := [t for t in token_ids if not 0 <= t < self.config.hf.vocab_size]:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.config.hf.vocab_size})")
        if len(token_ids) >= self.config.max_model_len:  # it must leave room for one new token
            raise ValueError(f"prompt too long: {len(token_ids)} tokens >= max_model_len={self.config.max_model_len}")
        longest = min(len(token_ids) + int(params.max_tokens), self.config.max_model_len)
        # the blocks it needs at its longest (- 1: nothing is computed from the last token)
        if (need := cdiv(longest - 1, self.config.kvcache_block_size)) > self.num_kvcache_blocks:
            raise ValueError(f"could never run: {need} KV-cache blocks needed, the cache has {self.num_kvcache_blocks}")
        return Sequence(next(self.request_ids), token_ids, replace(params))  # a copy: the caller may reuse theirs

    def add_request(self, prompt, sampling_params=None):
        return self.enqueue(self.make_sequence(prompt, sampling_params or SamplingParams()))

    def enqueue(self, seq):  # -> its request id
        if self.runner is None:  # a stream read after exit() too
            raise RuntimeError("this LLM has exited")
        self.requests[seq.request_id] = seq
        self.scheduler.waiting.append(seq)
        self.stats["prompt_tokens"] += seq.num_prompt_tokens
        return seq.request_id

    def abort(self, *request_ids):  # each unfinished one leaves its queue, and its blocks are freed
        # Ctrl-C is ignored until done: a second one in generate()'s clean-up, landing between a request leaving its
        # queue and its blocks' release, lost them for good. Main thread only; a handler set in C (None) is kept.
        with ExitStack() as on_exit:
            if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not None:
                on_exit.callback(signal.signal, signal.SIGINT, signal.signal(signal.SIGINT, signal.SIG_IGN))
            for request_id in request_ids:
                if (seq := self.requests.pop(request_id, None)) is not None and not seq.is_finished:
                    self.scheduler.remove(seq)
                    seq.finish_reason, seq.placeholder = "abort", None  # a token still on the GPU is dropped

    def is_finished(self):  # every request finished or aborted (a pending sample may still hold aborted rows' ids)
        return not self.scheduler.waiting and not self.scheduler.running and not self.requests

    # ---- one step of the engine: schedule, run the model, sample, update the sequences
    # The host runs one step ahead of the GPU: step N+1 is launched before step N's sampled ids are read back, so the
    # GPU never waits for Python. Until then a new token is a placeholder, -1 - its row in step N's sample, which run()
    # swaps for the id on the device. Other tensor-parallel ranks have no sample to read, so with TP ids are read first;
    # so they are after a step that failed or was interrupted: the device may hold that step's ids in their place.
    def step(self):  # -> the sequences whose new token reached the host (finished ones included)
        done = self.resolve() if self.config.tensor_parallel_size > 1 or self.ids_overwritten else []
        batch, is_prefill = self.scheduler.schedule()
        if not batch:
            return done + self.resolve()
        self.ids_overwritten = True  # until this step's sample is the pending one
        ids = self.call("run", self.runner.prepare(batch))  # sampled on the device; None on other ranks, or no rows
        rows = [seq for seq in batch if seq.num_computed_tokens + seq.num_scheduled_tokens == len(seq)]
        # the sampled ids' copy to the host (into pinned memory, not waited for; on a CPU a copy too, as the runner
        # reuses ids' memory), and its event
        host = ids.to("cpu", non_blocking=True, copy=True) if rows else None
        copied = torch.cuda.current_stream().record_event() if rows and ids.is_cuda else None
        done += self.resolve()  # step N's ids: queued for the host before step N+1's work
        self.pending = (rows, host, copied) if rows else None  # before the placeholders exist: none is ever lost
        self.ids_overwritten = False
        self.scheduler.postprocess(batch, rows)
        self.stats["prefill_tokens" if is_prefill else "decode_tokens"] += sum(s.num_scheduled_tokens for s in batch)
        self.stats["steps"] += 1
        return done

    def resolve(self):  # the previous step's sampled ids reach the host; -> the sequences that got one
        if self.pending is None:
            return []
        rows, host, copied = self.pending
        if copied is not None:
            copied.synchronize()  # the one wait for the GPU per step
        tokens, done = host.tolist(), []
        for seq in rows:  # the rows that got a placeholder (not those that finished or were aborted meanwhile)
            if seq.placeholder is not None:
                self.scheduler.finish(seq, tokens[-1 - seq.placeholder])
                done.append(seq)
            if seq.is_finished:  # also where a Ctrl-C came between finish() and here in the last try
                self.requests.pop(seq.request_id, None)
        self.pending = None  # only now: after a Ctrl-C above, the next resolve() picks up where this one stopped
        return done

    # ---- offline generation and streaming: loops over step()
    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        if isinstance(prompts, str) or (prompts and is_int(prompts[0])):
            raise TypeError("prompts is a list of strings or a list of token-id lists")
        params = SamplingParams() if sampling_params is None else sampling_params  # an empty list is not None
        params = params if isinstance(params, (list, tuple)) else [params] * len(prompts)  # one for all, or one each
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        seqs = [self.make_sequence(p, sp) for p, sp in zip(prompts, params)]  # all checked before any runs
        self.run(seqs, use_tqdm)
        return [self.result(seq) for seq in seqs]

    def result(self, seq):
        return dict(text=self.tokenizer.decode(seq.completion_token_ids, skip_special_tokens=True),
                    token_ids=seq.completion_token_ids, finish_reason=seq.finish_reason)

    def run(self, seqs, use_tqdm=True, on_finish=lambda seq: None):  # steps until seqs finish, each passed to on_finish
        from tqdm.auto import tqdm  # the bar: done/total, latest tok/s
        bar = tqdm(total=len(seqs), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        unfinished = {seq.request_id for seq in seqs}
        rates = {}  # the latest tok/s of each kind of step
        try:
            for seq in seqs:
                self.enqueue(seq)
            while unfinished and not self.is_finished():  # or they were aborted outside its steps (a callback)
                t, before = time.perf_counter(), (self.stats["prefill_tokens"], self.stats["decode_tokens"])
                for seq in self.step():
                    if seq.is_finished and seq.request_id in unfinished:
                        unfinished.remove(seq.request_id)
                        bar.update(1)
                        on_finish(seq)
                prefill, decode = self.stats["prefill_tokens"] - before[0], self.stats["decode_tokens"] - before[1]
                if prefill or decode:  # the last step may only read the last ids back ("decode 0 tok/s" at the end)
                    rates["prefill" if prefill else "decode"] = (prefill or decode) / (time.perf_counter() - t)
                bar.set_postfix_str(", ".join(f"{k} {v:,.0f} tok/s" for k, v in rates.items()), refresh=False)
        finally:  # after an interruption: drop what is left, the engine stays usable
            self.abort(*[seq.request_id for seq in seqs])
            bar.close()

    def stream(self, prompt, sampling_params=None):  # yields text pieces; other streams and generate() share the steps
        # checked now, queued when first read: a stream dropped unread never starts (its finally would never run)
        seq = self.make_sequence(prompt, sampling_params or SamplingParams())

        def pieces():
            sent = ""
            self.enqueue(seq)
            try:
                while True:
                    finished = seq.is_finished  # read once: other streams may step while this one yields
                    text = self.tokenizer.decode(seq.completion_token_ids, skip_special_tokens=True)
                    # hold back a split multi-byte character (decoded as U+FFFD) until it is whole
                    if len(text) > len(sent) and (finished or not text.endswith("\ufffd")):
                        yield text[len(sent):]
                        sent = text
                    if finished:
                        return
                    self.step()
            finally:
                self.abort(seq.request_id)
        return pieces()


# -----------------------------------------------------------------------------
# A tiny random-weight checkpoint (Qwen3, or any HF architecture) with its own tokenizer: the demo, tests, bench.py

def build_random_checkpoint(path, seed=0, dtype=torch.float32, architecture="Qwen3ForCausalLM", **config):
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    config = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=False) | config
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator([__doc__] * 4, trainers.BpeTrainer(
        vocab_size=min(config["vocab_size"], 1000), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                     pad_token="<|endoftext|>")
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tokenizer.save_pretrained(path)
    eos = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    torch.manual_seed(seed)
    config_class = getattr(transformers, architecture.replace("ForCausalLM", "Config"))  # Qwen3Config, ...
    model = getattr(transformers, architecture)(config_class(eos_token_id=eos, **config)).to(dtype)  # + generation cfg
    # HF starts biases at 0: random ones, so that tests can see them
    for bias in [param for name, param in model.named_parameters() if name.endswith(".bias")]:
        bias.data.normal_(std=0.5)
    model.save_pretrained(path)
    return path


# -----------------------------------------------------------------------------
# Front ends on the step loop: resumable offline jobs and an interactive chat

def run_job(llm, input_path, output_path, defaults, shard=(0, 1), use_tqdm=True):
    # Input lines: {"id": ..., "prompt": ... | "messages": [...], optional sampling fields}. Results are appended as
    # requests finish; ids already in the output are skipped (a rerun resumes); shard (g, n): every n-th line from g.
    done = set()  # read from a file only: a pipe or terminal (--output /dev/stdout) is written to, never read
    with open(output_path if os.path.isfile(output_path) else os.devnull, errors="replace") as f:
        for line in f:
            with suppress(ValueError, KeyError, TypeError):  # a line cut short by a crash: its request runs again
                done.add(json.dumps(json.loads(line)["id"]))
    jobs = {}  # the line's id (as JSON) -> its sequence
    with open(input_path, "rb") as f:  # bytes: a line that is not UTF-8 is reported below like any other
        for lineno, line in enumerate(f, 1):
            if not line.strip() or (lineno - 1) % shard[1] != shard[0]:
                continue
            try:
                # pandas writes an int column with a missing value as floats (3.0): whole numbers count as ints
                item = json.loads(line, parse_float=lambda s: int(float(s)) if float(s).is_integer() else float(s))
                # and every column on every line, null where the row has none: a null counts as missing
                item = {k: v for k, v in item.items() if v is not None} if isinstance(item, dict) else item
                if not isinstance(item, dict) or "id" not in item or ("prompt" in item) == ("messages" in item):
                    raise ValueError('expected {"id": ..., "prompt": ...} or {"id": ..., "messages": [...]}')
                key = json.dumps(item["id"])
                if key in done:
                    continue
                if key in jobs:
                    raise ValueError(f"duplicate id {item['id']!r}")
                prompt = item["prompt"] if "prompt" in item else llm.chat_prompt(item["messages"])
                if unknown := set(item) - {"id", "prompt", "messages", *JOB_SAMPLING_FIELDS}:
                    raise ValueError(f"unknown fields {sorted(unknown)}")
                params = replace(defaults, **{k: item[k] for k in JOB_SAMPLING_FIELDS if k in item})  # else the CLI's
                jobs[key] = llm.make_sequence(prompt, params)
            except Exception as e:  # report the line and go on with the rest
                print(f"{input_path}:{lineno}: skipped: {e}", file=sys.stderr)
    print(f"{output_path}: {len(done)} results already there, {len(jobs)} to go", file=sys.stderr)
    ids = {seq.request_id: json.loads(key) for key, seq in jobs.items()}  # request id -> the line's id
    with open(output_path, "a+b", buffering=0) as out:  # unbuffered: each write() goes straight to the file
        if out.seekable() and out.seek(0, os.SEEK_END) and os.pread(out.fileno(), 1, out.tell() - 1) != b"\n":
            out.write(b"\n")  # end a line cut short by a crash before appending

        def write(seq):  # one write() per line: a kill never leaves half a new line behind
            line = dict(id=ids[seq.request_id], **llm.result(seq), prompt_tokens=seq.num_prompt_tokens)
            out.write((json.dumps(line) + "\n").encode())
        llm.run(list(jobs.values()), use_tqdm, on_finish=write)


JOB_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "max_tokens", "seed", "ignore_eos")


def chat(llm, params, read=input):
    messages = []  # the conversation: each turn's prompt starts with the earlier turns, which the prefix cache serves
    print("Chat with the model (random weights talk gibberish). An empty line or Ctrl-D ends it.")
    try:
        while True:
            user = ""  # Ctrl-D and Ctrl-C end it as an empty line does
            with suppress(EOFError, KeyboardInterrupt):
                user = read("\n> ")
            if not user.strip():
                break
            messages.append({"role": "user", "content": user})
            reply = ""
            with suppress(KeyboardInterrupt):  # Ctrl-C ends the reply, not the chat (its request is aborted)
                for piece in llm.stream(llm.chat_prompt(messages), params):
                    print(piece, end="", flush=True)
                    reply += piece
            messages.append({"role": "assistant", "content": reply})
            print(f"\n[{llm.stats['cached_prompt_tokens']} prompt tokens served by the prefix cache so far]")
    except ValueError as e:  # stream() refused the conversation: longer than max_model_len, or than the KV cache
        print(f"[{e}: start a new chat]")


# -----------------------------------------------------------------------------
# main(): the command line; under torchrun, data-parallel groups of tensor_parallel_size ranks split the prompts

def main(argv=None):
    p = argparse.ArgumentParser(description="nanollm: offline generation (Qwen3, Qwen3-MoE, Qwen2, Llama 3)")
    p.add_argument("--model", help="local HF checkpoint directory (none: a tiny random demo model)")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--chat", action="store_true", help="chat template; without --prompt an interactive chat")
    p.add_argument("--input", help="JSONL job: one {id, prompt | messages, sampling fields} per line")
    p.add_argument("--output", help="JSONL results, appended as requests finish; a rerun resumes")
    for f in [f for f in fields(Config)[1:] + fields(SamplingParams) if f.name != "stop_token_ids"]:  # vLLM's names
        kind = getattr(f.type, "__args__", [f.type])[0]  # the annotation's type: X for X | None
        how = dict(action=argparse.BooleanOptionalAction) if kind is bool else dict(type=kind)  # bool: --x / --no-x
        p.add_argument("--" + f.name.replace("_", "-"), default=f.default, **how)  # defaults from the dataclasses
    args = p.parse_args(argv)
    if bool(args.input) != bool(args.output) or (args.input and (args.chat or args.prompt)):
        p.error("--input and --output go together, without --chat or --prompt")
    if args.input and (not os.path.exists(args.input) or os.path.realpath(args.input) == os.path.realpath(args.output)):
        p.error(f"--input {args.input!r} does not exist, or is the --output file too")  # a pipe exists too
    engine_args = {f.name: getattr(args, f.name) for f in fields(Config)[1:]}  # all but model
    params = SamplingParams(**{k: getattr(args, k) for k in JOB_SAMPLING_FIELDS})
    if args.model is None:
        args.model = build_random_checkpoint(tempfile.mkdtemp(prefix="nanollm-demo-"))
        print(f"No --model given: built a tiny Qwen3 with RANDOM weights (gibberish, but it all runs) in {args.model}")
    config = Config(args.model, **engine_args)
    parallel, dp_rank, dp_size = None, 0, 1  # torchrun: this rank's TP group, its DP group's index, how many DP groups
    if (world := int(os.environ.get("WORLD_SIZE", 1))) > 1:  # torchrun started this many processes
        tp, rank = config.tensor_parallel_size, int(os.environ["RANK"])
        if world % tp or (args.chat and not args.prompt and world > tp):  # a chat reads one stdin: one group
            raise ValueError(f"torchrun world size {world} must be tensor_parallel_size {tp} x N (N = 1 for a chat)")
        parallel = init_parallel(config, rank, world_size=world, local_rank=int(os.environ["LOCAL_RANK"]))
        dp_rank, dp_size = rank // tp, world // tp
        results_group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)  # for the gather at the end
    prompts, results = [], None
    if parallel is not None and parallel.rank != 0:  # a tensor-parallel rank: serve its group's first rank
        ModelRunner(config, parallel).loop()
    else:
        with LLM(args.model, parallel=parallel, **engine_args) as llm:
            if args.input:
                run_job(llm, args.input, args.output, params, shard=(dp_rank, dp_size))
            elif args.chat and not args.prompt:
                chat(llm, params)
            else:
                prompts = args.prompt or ["Introduce yourself.", "List all prime numbers within 100."]
                inputs = [llm.chat_prompt([{"role": "user", "content": q}]) for q in prompts] if args.chat else prompts
                results = llm.generate(inputs[dp_rank::dp_size], params)  # group g takes prompts g, g+dp, ...
    if dp_size > 1:  # gather every group's results on rank 0, back in prompt order
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(results, gathered, dst=0, group=results_group)
        by_group = [g for g in gathered or [] if g is not None]
        results = [by_group[i % dp_size][i // dp_size] for i in range(len(prompts))] if by_group else None
        dist.destroy_process_group()
    for prompt, out in zip(prompts, results or []):
        print(f"\nPrompt: {prompt!r}\nCompletion: {out['text']!r}")


if __name__ == "__main__":
    main()
