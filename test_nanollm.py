"""nanollm's tests: every path against an independent reference (HF transformers, plain torch) or an exact
invariant. CPU by default; tests marked `cuda` run on a GPU and skip without one."""
import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # the Triton kernels run on the CPU through Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
import triton  # noqa: E402

import nanollm  # noqa: E402
from nanollm import (LLM, BlockManager, SamplingParams, Scheduler, Sequence, build_random_checkpoint,  # noqa: E402
                     cdiv, decode_attention, paged_attention_reference, prefill_attention, qk_norm_rope_store,
                     qk_norm_rope_store_reference)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")

# Llama 3.1's RoPE scaling with an original context of 32 tokens, which the tests' prompts and outputs run past
# (HF's configs add rope_theta to the dict they are given: pass them copies)
LLAMA3_ROPE = dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32)
MOE = dict(architecture="Qwen3MoeForCausalLM", num_attention_heads=4, num_key_value_heads=2, moe_intermediate_size=32)

# tiny random checkpoints: Qwen3 with GQA ratio 2 untied and ratio 4 tied; Qwen2 (q/k/v biases, no q/k norms) untied;
# Llama with every bias, llama3 RoPE and tied embeddings. Without q/k norms, HF's default weight scale (0.02) leaves
# attention almost uniform, blind to RoPE: 0.1 makes the tests see positions. Qwen3-MoEs: top-1 of 4 experts
# renormalised (a weight of 1), top-2 of 8 raw with layer 0 dense by decoder_sparse_step, top-3 of 8 renormalised,
# tied, with a dense layer by mlp_only_layers.
CHECKPOINTS = {
    "gqa2-untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "gqa4-tied": dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2-gqa2-untied": dict(architecture="Qwen2ForCausalLM", num_attention_heads=4, num_key_value_heads=2,
                              tie_word_embeddings=False, initializer_range=0.1),
    "llama3-gqa4-tied": dict(architecture="LlamaForCausalLM", num_attention_heads=8, num_key_value_heads=2,
                             tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                             rope_scaling=dict(LLAMA3_ROPE), initializer_range=0.1),
    "moe-top1": MOE | dict(num_experts=4, num_experts_per_tok=1, norm_topk_prob=True),
    "moe-top2-sparse-step": MOE | dict(num_experts=8, num_experts_per_tok=2, decoder_sparse_step=2),
    "moe-top3-tied": MOE | dict(num_experts=8, num_experts_per_tok=3, norm_topk_prob=True, num_hidden_layers=3,
                                mlp_only_layers=[1], tie_word_embeddings=True),
}
FAMILIES = ["gqa4-tied", "qwen2-gqa2-untied", "llama3-gqa4-tied", "moe-top2-sparse-step"]  # one of each family


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {name: build_random_checkpoint(str(root / name), **cfg) for name, cfg in CHECKPOINTS.items()}


@pytest.fixture(scope="session")
def hf_models(checkpoints):
    from transformers import AutoModelForCausalLM
    return {name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            for name, path in checkpoints.items()}


REALISTIC = {  # for GPU tests: head_dim 128 and hidden 256, as real attention runs them, one of each family
    "realistic": dict(),
    "realistic-qwen2": dict(architecture="Qwen2ForCausalLM", initializer_range=0.1),
    "realistic-llama3": dict(architecture="LlamaForCausalLM", rope_scaling=dict(LLAMA3_ROPE), initializer_range=0.1),
}


@pytest.fixture(scope="session")
def realistic(tmp_path_factory):  # name -> (path, HF model)
    from transformers import AutoModelForCausalLM
    paths = {name: build_random_checkpoint(str(tmp_path_factory.mktemp("ckpt") / name), hidden_size=256,
                                           intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                                           head_dim=128, **cfg) for name, cfg in REALISTIC.items()}
    return {name: (path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval())
            for name, path in paths.items()}


def hf_greedy(hf, prompt, max_tokens):
    ids = torch.tensor([prompt])  # an explicit mask: generate() would otherwise mask pad-id tokens
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def hf_chat_ids(tokenizer, messages, **template_kwargs):  # the reference: HF's token ids of the chat template
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                              **template_kwargs)["input_ids"])


def random_prompts(lengths, seed=0, vocab=512):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def assert_all_blocks_free(llm):
    bm = llm.scheduler.block_manager
    assert len(bm.free) == len(bm.blocks)
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert llm.is_finished() and not llm.requests


# ---------------------------------------------------------------- greedy equals HF transformers

@pytest.mark.parametrize("name", CHECKPOINTS)
@pytest.mark.parametrize("block_size", [16, 32])
def test_greedy_matches_hf_uneven_batch(checkpoints, hf_models, name, block_size):
    # 1 token to several blocks, on and off block boundaries, all in one batch
    prompts = random_prompts([1, 15, 16, 17, 31, 32, 33, 70])
    llm = LLM(checkpoints[name], kvcache_block_size=block_size, num_kvcache_blocks=64)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out["token_ids"] == hf_greedy(hf_models[name], prompt, GREEDY.max_tokens)
    assert_all_blocks_free(llm)


def test_string_prompts_match_hf(checkpoints, hf_models):
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=64)
    prompts = ["Hello, world!", "What does the block manager do with a freed block?"]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ref = hf_greedy(hf_models["gqa2-untied"], llm.tokenizer.encode(prompt), GREEDY.max_tokens)
        assert out["token_ids"] == ref
        assert out["text"] == llm.tokenizer.decode(ref, skip_special_tokens=True)


@pytest.mark.parametrize("name", FAMILIES)
def test_prefix_cache_across_calls(checkpoints, hf_models, name):
    prefix = random_prompts([3 * 16 + 5], seed=1)[0]  # three full blocks and a bit
    first = [prefix + s for s in random_prompts([4, 9], seed=2)]
    second = [prefix + s for s in random_prompts([1, 20], seed=3)]
    llm = LLM(checkpoints[name], kvcache_block_size=16, num_kvcache_blocks=64)
    llm.generate(first, GREEDY, use_tqdm=False)
    assert llm.stats["cached_prompt_tokens"] == 0  # nothing published before the first call ran
    outs = llm.generate(second, GREEDY, use_tqdm=False)
    assert llm.stats["cached_prompt_tokens"] == 2 * 3 * 16  # each prompt reused the three prefix blocks
    for prompt, out in zip(second, outs):
        assert out["token_ids"] == hf_greedy(hf_models[name], prompt, GREEDY.max_tokens)
    assert_all_blocks_free(llm)


def test_last_prompt_token_is_always_computed(checkpoints, hf_models):
    prompt = random_prompts([32], seed=4)[0]  # exactly two blocks
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=64)
    a = llm.generate([prompt], GREEDY, use_tqdm=False)
    b = llm.generate([prompt], GREEDY, use_tqdm=False)
    assert llm.stats["cached_prompt_tokens"] == 16  # not 32: the last block holds the last prompt token
    assert a == b and a[0]["token_ids"] == hf_greedy(hf_models["gqa2-untied"], prompt, GREEDY.max_tokens)


def test_chunked_prefill(checkpoints, hf_models):
    prompts = random_prompts([100, 7], seed=5)
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=64, max_num_batched_tokens=24)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.stats["steps"] >= 107 // 24 + GREEDY.max_tokens  # the prompts took several prefill steps
    for prompt, out in zip(prompts, outs):
        assert out["token_ids"] == hf_greedy(hf_models["gqa2-untied"], prompt, GREEDY.max_tokens)
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("name, prefix_caching", [("gqa4-tied", True), ("gqa4-tied", False),
                                                  ("qwen2-gqa2-untied", True), ("llama3-gqa4-tied", True),
                                                  ("moe-top3-tied", True), ("moe-top3-tied", False)])
def test_preemption_loses_nothing(checkpoints, hf_models, name, prefix_caching):
    prompts = random_prompts([20, 5, 33, 17, 12, 40], seed=6)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    # 10 blocks of 16 tokens: each sequence needs 3-5 blocks at full length, so they cannot all run
    llm = LLM(checkpoints[name], kvcache_block_size=16, num_kvcache_blocks=10, enable_prefix_caching=prefix_caching)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.stats["preemptions"] > 0
    roomy = LLM(checkpoints[name], kvcache_block_size=16, num_kvcache_blocks=64).generate(prompts, params, use_tqdm=False)
    assert outs == roomy
    for prompt, out in zip(prompts, outs):
        assert out["token_ids"] == hf_greedy(hf_models[name], prompt, params.max_tokens)
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_a_preempted_prompt_is_not_restarted_again_and_again(checkpoints, hf_models, prefix_caching):
    # 6 blocks of 16: A (16 + 64 tokens, 5 blocks at full length) decodes while B's 64-token prompt (4 blocks) waits.
    # Admitted as soon as its first chunk fitted, B took the free blocks, A's next block preempted it, and without
    # prefix caching B's prefill started over from its first token once for each of A's tokens: 2,670 prefill tokens
    # for the 80 of the two prompts, 63 preemptions
    a, b = random_prompts([16, 64], seed=21)
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=6, max_num_batched_tokens=16,
              enable_prefix_caching=prefix_caching)
    long_run = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    first = llm.requests[llm.add_request(a, long_run)]
    llm.step()  # A admitted first
    second = llm.requests[llm.add_request(b, GREEDY)]
    while not llm.is_finished():
        llm.step()
    assert llm.stats["preemptions"] <= 1 and llm.stats["prefill_tokens"] <= 2 * (16 + 64)
    assert first.completion_token_ids == hf_greedy(hf_models["gqa2-untied"], a, 64)
    assert second.completion_token_ids == hf_greedy(hf_models["gqa2-untied"], b, GREEDY.max_tokens)
    assert_all_blocks_free(llm)


def test_max_num_seqs_and_stops(checkpoints, hf_models):
    prompts = random_prompts([5, 9, 13], seed=7)
    ref = [hf_greedy(hf_models["gqa2-untied"], p, 12) for p in prompts]
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=64, max_num_seqs=2, max_model_len=20)
    stop = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[ref[0][3]])
    outs = llm.generate(prompts, [stop, GREEDY, GREEDY], use_tqdm=False)
    assert outs[0]["token_ids"] == ref[0][:ref[0].index(ref[0][3]) + 1] and outs[0]["finish_reason"] == "stop"
    assert outs[1]["token_ids"] == ref[1][:20 - 9]  # max_model_len caps prompt + output at 20
    assert outs[2]["token_ids"] == ref[2][:20 - 13] and outs[2]["finish_reason"] == "length"


def test_eos_stops_unless_ignored(checkpoints, hf_models):
    prompt = random_prompts([6], seed=8)[0]
    ref = hf_greedy(hf_models["gqa2-untied"], prompt, 12)
    path = checkpoints["gqa2-untied"]
    llm = LLM(path, kvcache_block_size=16, num_kvcache_blocks=64)
    llm.scheduler.eos_token_ids = {ref[4]}  # pretend the 5th token is the model's eos
    assert llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]["token_ids"] == ref[:ref.index(ref[4]) + 1]
    assert llm.generate([prompt], GREEDY, use_tqdm=False)[0]["token_ids"] == ref


def test_a_stop_token_that_is_also_the_last_allowed_is_a_stop(checkpoints, hf_models):
    prompt = random_prompts([7], seed=8)[0]
    ref = hf_greedy(hf_models["gqa2-untied"], prompt, 12)
    n = next(i for i in range(3, 12) if ref[i] not in ref[:i])  # the first time this token comes
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=n + 1, ignore_eos=True, stop_token_ids=[ref[n]])
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert out["token_ids"] == ref[:n + 1] and out["finish_reason"] == "stop"  # a whole answer, not a cut one


# ---------------------------------------------------------------- block manager invariants

def make_seq(tokens):
    return Sequence(0, tokens, SamplingParams())


def compute(bm, seq, n):  # what a step does to the cache: allocate, compute (commit publishes full blocks)
    bm.allocate(seq, n)
    bm.commit(seq, n)


def test_block_manager_hashing_reuse_and_refcounts():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(list(range(10)))            # blocks [0..3] [4..7] [8, 9]
    compute(bm, a, 10)
    assert len(a.block_table) == 3 and len(bm.free) == 5
    assert [bm.blocks[b].hash != -1 for b in a.block_table] == [True, True, False]  # only full blocks
    b = make_seq(list(range(8)) + [42, 43, 44])  # shares two full blocks
    assert bm.claim_cached_prefix(b) == 8
    assert b.block_table == a.block_table[:2] and [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    compute(bm, b, 3)
    c = make_seq([0, 1, 2, 99, 4, 5, 6, 7, 8])  # differs in the first block: the chain breaks there
    assert bm.claim_cached_prefix(c) == 0
    bm.release(a)
    bm.release(b)
    assert len(bm.free) == 8 and all(blk.ref_count == 0 for blk in bm.blocks)
    # freed blocks keep their hashes and are revived by the same prefix
    d = make_seq(list(range(9)))
    assert bm.claim_cached_prefix(d) == 8 and len(bm.free) == 6
    bm.release(d)
    # handing every block out for new tokens evicts the old contents
    e = make_seq([7] * 32)
    bm.allocate(e, 32)
    assert len(bm.free) == 0 and not bm.hash_to_block
    bm.release(e)
    assert bm.claim_cached_prefix(make_seq(list(range(9)))) == 0


def test_hash_hit_is_confirmed_against_tokens():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq([1, 2, 3, 4, 5])
    compute(bm, a, 5)
    block = bm.blocks[a.block_table[0]]
    block.token_ids = (9, 9, 9, 9)  # a forged collision: same hash, other tokens
    assert bm.claim_cached_prefix(make_seq([1, 2, 3, 4, 5])) == 0


def test_prefix_caching_off_never_hits():
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    a = make_seq(list(range(9)))
    compute(bm, a, 9)
    again = make_seq(list(range(9)))
    assert bm.claim_cached_prefix(again) == 0 and not again.block_table  # blocks are published, never looked up


def test_eviction_takes_unused_blocks_then_tails_before_prefixes():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq(list(range(9)))  # blocks: two published, then a tail of one token; the fourth never used
    compute(bm, a, 9)
    bm.release(a)
    bm.allocate(make_seq([100] * 8), 8)  # two fresh blocks: the never-used one, then a's tail
    assert bm.claim_cached_prefix(make_seq(list(range(9)))) == 8  # a's prefix survives


def check_block_invariants(llm):  # exact, between any two steps
    scheduler = llm.scheduler
    bm = scheduler.block_manager
    assert len(scheduler.running) <= llm.config.max_num_seqs
    assert not any(seq.block_table for seq in scheduler.waiting)  # preempted or not admitted: holds nothing
    holders = Counter(block_id for seq in scheduler.running for block_id in seq.block_table)
    assert [block.ref_count for block in bm.blocks] == [holders[block.id] for block in bm.blocks]
    assert set(bm.free) == {block.id for block in bm.blocks if block.ref_count == 0}
    for seq in scheduler.running:
        assert len(set(seq.block_table)) == len(seq.block_table) >= cdiv(seq.num_computed_tokens, bm.block_size)
        parent = -1
        full = seq.num_computed_tokens // bm.block_size  # exactly the full blocks are published: own tokens, chained
        assert all(bm.blocks[block_id].hash == -1 for block_id in seq.block_table[full:])
        for i, block_id in enumerate(seq.block_table[:full]):
            block = bm.blocks[block_id]
            assert block.token_ids == tuple(seq.token_ids[i * bm.block_size:(i + 1) * bm.block_size])
            assert block.parent_hash == parent
            parent = block.hash
    assert all(block.hash == key for key, block in bm.hash_to_block.items())


@pytest.mark.parametrize("seed", range(24))
def test_random_traffic_keeps_every_invariant_and_output(checkpoints, seed):
    # Requests sharing prefixes arrive at random steps at an engine of random settings (a cache just big enough for
    # the longest request: preemption; a small token budget: chunked prefill), and some are aborted. Between steps
    # the block invariants hold exactly; every request that was not aborted equals the same request run alone
    rng = random.Random(seed)
    block_size, max_model_len = rng.choice([16, 32]), rng.choice([64, 160, 256, 256])
    prefixes = random_prompts([rng.randint(0, 80) for _ in range(3)], seed=seed)
    requests = []  # (prompt, params, arrival step, abort step or None)
    for _ in range(rng.randint(4, 12)):
        length = min(rng.randint(1, 200), max_model_len - 1)
        prompt = (rng.choice(prefixes) + random_prompts([length], seed=rng.random())[0])[:length]
        greedy = rng.random() < 0.6
        top_k, top_p = rng.choice([(-1, 1.0), (-1, 1.0), (5, 1.0), (50, 0.9), (-1, 0.8)])
        params = SamplingParams(temperature=0 if greedy else 0.8, seed=None if greedy else rng.randrange(2**30),
                                top_k=top_k, top_p=top_p, max_tokens=rng.randint(1, 40), ignore_eos=True)
        requests.append((prompt, params, rng.choice([0, 0, rng.randint(0, 20)]),
                         rng.randint(0, 40) if rng.random() < 0.2 else None))
    need = max(cdiv(min(len(p) + params.max_tokens, max_model_len) - 1, block_size) for p, params, *_ in requests)
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=block_size, max_model_len=max_model_len,
              num_kvcache_blocks=need + rng.choice([0, 0, 1, 4, need, 200]), max_num_seqs=rng.randint(1, 8),
              max_num_batched_tokens=rng.choice([32, 48, 100, 256, 1024]), enable_prefix_caching=rng.random() < 0.7)
    seqs, step = {}, 0  # request index -> its sequence
    while len(seqs) < len(requests) or not llm.is_finished():
        for i, (prompt, params, arrival, abort) in enumerate(requests):
            if arrival == step:
                seqs[i] = llm.requests[llm.add_request(prompt, params)]
            if abort == step and i in seqs:
                llm.abort(seqs[i].request_id)
        llm.step()
        check_block_invariants(llm)
        step += 1
    assert_all_blocks_free(llm)
    alone = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=64, max_num_seqs=1,
                max_model_len=max_model_len, enable_prefix_caching=False)
    for i, seq in seqs.items():
        if seq.finish_reason != "abort":
            prompt, params = requests[i][:2]
            assert seq.completion_token_ids == alone.generate([prompt], params, use_tqdm=False)[0]["token_ids"]


# ---------------------------------------------------------------- sampling

def test_top_k_1_equals_greedy_and_seeds_repeat(checkpoints):
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=64)
    prompts = random_prompts([5, 30], seed=9)
    greedy = llm.generate(prompts, GREEDY, use_tqdm=False)
    top1 = llm.generate(prompts, SamplingParams(temperature=1.5, top_k=1, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert top1 == greedy
    tiny_top_p = SamplingParams(temperature=1.5, top_p=1e-50, max_tokens=12, ignore_eos=True)  # 0 in fp32
    assert llm.generate(prompts, tiny_top_p, use_tqdm=False) == greedy
    # a top_k past the vocabulary (past int32 too) keeps every token
    assert llm.generate(prompts, SamplingParams(temperature=0, top_k=2**40, max_tokens=12, ignore_eos=True),
                        use_tqdm=False) == greedy
    seeded = [SamplingParams(temperature=1.0, seed=s, max_tokens=12, ignore_eos=True) for s in (1, 1, 2)]
    a = llm.generate([prompts[0]] * 3, seeded, use_tqdm=False)
    b = llm.generate([prompts[0]] * 3, seeded, use_tqdm=False)
    assert a == b and a[0] == a[1] and a[0] != a[2]
    # top_k 0 keeps every token, as -1 does (HF's and vLLM's meaning; it was refused)
    assert llm.generate([prompts[0]] * 3, [replace(p, top_k=0) for p in seeded], use_tqdm=False) == a


def reference_probs(logits, temperature, top_k, top_p):
    # the distribution top-k then top-p sampling defines, written the plain way
    probs = (logits / temperature).softmax(-1)
    order = probs.argsort(descending=True)
    keep, mass = [], 0.0
    for rank, i in enumerate(order.tolist()):
        if rank >= top_k or mass >= top_p:
            break
        keep.append(i)
        mass += probs[i].item() / probs[order[:top_k]].sum().item()
    out = torch.zeros_like(probs)
    out[keep] = probs[keep]
    return out / out.sum()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])  # torch reference; Triton kernel
# candidates: the sort's width, the batch's largest top_k or more (up to 50 / 8 = 6: a partial sort, topk)
@pytest.mark.parametrize("top_k, top_p, candidates", [(5, 1.0, 5), (5, 0.7, 6), (5, 0.7, 20), (50, 0.6, 50),
                                                      (-1, 0.3, 50), (-1, 1.0, None)])
def test_sampler_matches_reference_distribution(top_k, top_p, candidates, device):
    torch.manual_seed(0)
    vocab, draws = 50, 20000
    logits = torch.randn(vocab) * 2
    ref = reference_probs(logits, 0.8, top_k if top_k > 0 else vocab, top_p)
    rows = logits.expand(draws, vocab).contiguous().to(device)
    full = lambda value, dtype=torch.float32: torch.full((draws,), value, dtype=dtype, device=device)
    top_k_row = full(top_k if top_k > 0 else vocab, torch.int64)
    filters = (top_k_row, full(top_p), candidates) if candidates else ()
    seeds = torch.randint(2**31, (draws,), dtype=torch.int32, device=device)
    ids = nanollm.sample(rows, full(0.8), seeds, *filters).cpu()
    freq = torch.bincount(ids, minlength=vocab).float() / draws
    assert set(ids.unique().tolist()) <= set(ref.nonzero().flatten().tolist())  # never outside the set
    assert (freq - ref).abs().max() < 0.02


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])  # torch; torch.compile
def test_a_row_without_filters_keeps_every_token(device):
    # A batch with one filtering row sends every row through the filter: a row with top_k = vocab and top_p = 1 must
    # keep all its tokens, or its seeded draw would depend on the batch. Over 151,936 random logits the fp32 running
    # sum reaches 1 well before the tail: the top-p cut dropped ~16,000 tokens at top_p = 1
    torch.manual_seed(0)
    vocab = 151936
    best = (torch.randn(2, vocab) * 3).sort(descending=True).values.to(device)
    rows = lambda *values: torch.tensor(values, device=device)
    kept = nanollm.filter_top_k_top_p(best, rows(1.0, 1.0), rows(vocab, vocab), rows(1.0, 0.9))
    assert kept[0].isfinite().all()  # top_p 1: nothing dropped
    assert 0 < kept[1].isfinite().sum() < vocab  # top_p 0.9: the tail dropped


def test_seeded_draws_differ_step_to_step_and_unseeded_requests_differ(checkpoints):
    # temperature 1e30 flattens the logits: each token is the argmax of that step's noise, uniform over the vocabulary
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=64)
    seeded = SamplingParams(temperature=1e30, seed=1, max_tokens=20, ignore_eos=True)
    assert len(set(llm.generate([[1, 2, 3]], seeded, use_tqdm=False)[0]["token_ids"])) > 10  # new noise each step
    unseeded = SamplingParams(temperature=1e30, max_tokens=20, ignore_eos=True)
    a, b = llm.generate([[1, 2, 3]] * 2, unseeded, use_tqdm=False)
    assert a["token_ids"] != b["token_ids"]  # each row its own stream


@pytest.mark.parametrize("temperature, top_k, top_p, kept", [
    (0.5, 4, 0.8, [True, False, False, False]),  # tempered: p = .87 .12 .02 .00 (untempered: .64 .24 .09 .03)
    (1.0, 2, 0.7, [True, False, False, False]),  # renormalised over the top 2: .73 .27 (not .64 .24)
    (1.0, 4, 0.8, [True, True, False, False])])
def test_top_p_counts_the_tempered_top_k_renormalised(temperature, top_k, top_p, kept):
    best = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    out = nanollm.filter_top_k_top_p(best, torch.tensor([temperature]), torch.tensor([top_k]), torch.tensor([top_p]))
    assert out.isfinite()[0].tolist() == kept


def test_sample_kernel():
    # Triton's race against the same distribution (few draws on a CPU: the interpreter runs a program per row),
    # greedy rows equal argmax, masked entries never win, and a seed repeats its draw
    torch.manual_seed(0)
    draws, logits = 300 if DEVICE == "cpu" else 20000, torch.tensor([2.0, 1.3, 0.0, -1.5])
    rows = logits.expand(draws, 4).contiguous().to(DEVICE)
    temperature = torch.full((draws,), 0.8, device=DEVICE)
    seeds = torch.randint(2**31, (draws,), dtype=torch.int32, device=DEVICE)
    ids = nanollm.sample_triton(rows, temperature, seeds, part=4, block=4)
    freq = torch.bincount(ids.long().cpu(), minlength=4).float() / draws
    assert (freq - (logits / 0.8).softmax(-1)).abs().max() < (0.1 if DEVICE == "cpu" else 0.02)
    assert torch.equal(nanollm.sample_triton(rows, temperature, seeds, part=4, block=4), ids)
    # equal logits over 40 columns, 3 parts of 2 tiles each: each column has its own random word, so each wins
    winners = nanollm.sample_triton(torch.zeros(draws, 40, device=DEVICE), temperature, seeds, part=16, block=8)
    counts = torch.bincount(winners.long().cpu(), minlength=40)
    assert (counts > 0).all() and (DEVICE == "cpu" or (counts / draws - 1 / 40).abs().max() < 0.01)
    noisy = torch.randn(8, 40, device=DEVICE)
    noisy[:, 5] = float("-inf")
    greedy = nanollm.sample_triton(noisy, torch.zeros(8, device=DEVICE), seeds[:8], part=16, block=8)
    assert torch.equal(greedy.long(), noisy.argmax(-1))
    hot = nanollm.sample_triton(noisy, torch.full((8,), 100.0, device=DEVICE), seeds[:8], part=16, block=8)
    assert (hot != 5).all()
    padded = torch.cat([noisy, torch.full((8, 8), float("inf"), device=DEVICE)], 1)[:, :40]  # row stride 48
    assert padded.stride(0) == 48  # the +inf past each row's end must never be read
    greedy_padded = nanollm.sample_triton(padded, torch.zeros(8, device=DEVICE), seeds[:8], part=16, block=8)
    assert torch.equal(greedy_padded, greedy)


# ---------------------------------------------------------------- bad input: clear errors, engine unharmed

def test_bad_model_paths(tmp_path, checkpoints):
    with pytest.raises(FileNotFoundError, match="not found"):
        LLM(str(tmp_path / "missing"))
    other = tmp_path / "llama"
    shutil.copytree(checkpoints["gqa2-untied"], other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(cfg, architectures=["MistralForCausalLM"])))
    with pytest.raises(ValueError, match="unsupported: architecture 'MistralForCausalLM'"):
        LLM(str(other))
    (other / "config.json").write_text(json.dumps(dict(cfg, architectures=["LlamaForCausalLM"])))
    with pytest.raises(ValueError, match="has a weight its architecture lacks.*: .*_norm"):  # Qwen3's q/k norms
        LLM(str(other))
    for f in other.glob("*.safetensors"):
        f.unlink()
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LLM(str(other))
    no_tokenizer = tmp_path / "weights-only"  # config and weights, no tokenizer files: said at once, not "empty prompt"
    shutil.copytree(checkpoints["gqa2-untied"], no_tokenizer,
                    ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*", "chat_template*", "vocab*", "merges*"))
    with pytest.raises((ValueError, OSError), match="(?i)tokenizer"):  # ours, or an older transformers' own
        LLM(str(no_tokenizer))


def test_config_spellings_and_unsupported_variants(tmp_path, checkpoints):
    # transformers 5 writes rope_parameters with rope_theta inside, 4.x rope_scaling ("type" in older files) beside a
    # top-level rope_theta; head_dim may be missing (then hidden / heads); generation_config.json's eos ids win
    saved = json.loads((Path(checkpoints["llama3-gqa4-tied"]) / "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == "llama3"  # what this transformers wrote
    base = {k: v for k, v in saved.items() if k not in ("rope_parameters", "rope_scaling", "rope_theta", "head_dim")}

    def load(**changes):
        (tmp_path / "config.json").write_text(json.dumps(base | changes))
        return nanollm.load_model_config(str(tmp_path))
    old = dict(LLAMA3_ROPE, type=LLAMA3_ROPE["rope_type"])
    del old["rope_type"]
    for cfg in [load(rope_parameters=dict(LLAMA3_ROPE, rope_theta=5e5)), load(rope_scaling=LLAMA3_ROPE, rope_theta=5e5),
                load(rope_scaling=old, rope_theta=5e5)]:
        assert cfg.rope_theta == 5e5 and cfg.rope_scaling["factor"] == 4.0 and cfg.head_dim == 64 // 8
        assert not cfg.qk_norm and cfg.qkv_bias and cfg.attention_bias and cfg.mlp_bias
    for cfg in [load(rope_parameters=dict(rope_type="default", rope_theta=1e6)), load(rope_theta=1e6),
                load(rope_scaling=None, rope_theta=1e6)]:
        assert cfg.rope_theta == 1e6 and cfg.rope_scaling is None
    qwen2 = load(architectures=["Qwen2ForCausalLM"], attention_bias=None, mlp_bias=None, use_sliding_window=False,
                 sliding_window=4096, layer_types=["full_attention"] * 2)  # a window that is off: fine
    assert qwen2.qkv_bias and not (qwen2.attention_bias or qwen2.mlp_bias or qwen2.qk_norm)
    assert load().rope_theta == 10000.0 and load(head_dim=32).head_dim == 32
    for changes, what in [(dict(rope_scaling=dict(rope_type="yarn", factor=4.0)), "rope scaling 'yarn'"),
                          (dict(rope_parameters=dict(rope_type="linear", factor=2.0)), "rope scaling 'linear'"),
                          (dict(rope_scaling=dict(type="dynamic", factor=2.0)), "rope scaling 'dynamic'"),
                          (dict(rope_scaling=dict(rope_type="llama3", factor=8.0)), "rope scaling 'llama3' with"),
                          (dict(use_sliding_window=True), "sliding-window"),
                          (dict(layer_types=["full_attention", "sliding_attention"]), "sliding-window"),
                          (dict(architectures=["MistralForCausalLM"]), "architecture 'MistralForCausalLM'"),
                          (dict(hidden_act="gelu"), "activation 'gelu'")]:
        with pytest.raises(ValueError, match="unsupported: " + what):
            load(**changes)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 128009]}))
    assert load(eos_token_id=128001).eos_token_ids == (128001, 128008, 128009)  # Llama 3's three


def copy_with_config(src, dst, **changes):  # a copy of a checkpoint, its config.json changed (None: key removed)
    shutil.copytree(src, dst)
    cfg = json.loads((Path(dst) / "config.json").read_text()) | changes
    (Path(dst) / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return str(dst)


def test_config_limits_and_fallbacks(checkpoints, tmp_path):
    # max_model_len is capped by the model's positions (its RoPE table): a request stops there
    path = copy_with_config(checkpoints["gqa2-untied"], tmp_path / "short", max_position_embeddings=40)
    llm = LLM(path, kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=4096)
    assert llm.config.max_model_len == 40
    out = llm.generate([list(range(1, 31))], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out["token_ids"]) == 10 and out["finish_reason"] == "length"
    # "auto" on a CPU is fp32 whatever the checkpoint's dtype
    path = copy_with_config(checkpoints["gqa2-untied"], tmp_path / "bf16", dtype="bfloat16")
    assert nanollm.Config(path, device="cpu").torch_dtype == torch.float32
    assert nanollm.Config(path, device="cpu", dtype="bfloat16").torch_dtype == torch.bfloat16
    # no eos id in config.json nor a generation_config.json: the tokenizer's eos stops requests
    path = copy_with_config(checkpoints["gqa2-untied"], tmp_path / "no-eos", eos_token_id=None)
    (Path(path) / "generation_config.json").unlink()
    assert nanollm.load_model_config(path).eos_token_ids == ()
    llm = LLM(path, kvcache_block_size=16, num_kvcache_blocks=16)
    assert llm.scheduler.eos_token_ids == {llm.tokenizer.eos_token_id}
    # the edges of what is allowed
    assert nanollm.Config(checkpoints["gqa2-untied"], gpu_memory_utilization=1.0).gpu_memory_utilization == 1.0
    path = copy_with_config(checkpoints["moe-top2-sparse-step"], tmp_path / "all-experts", num_experts_per_tok=8)
    assert nanollm.load_model_config(path).num_experts_per_tok == 8


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", "0.5"), ("temperature", None),
    ("temperature", 1e39), ("temperature", float("inf")),  # inf in fp32: with filters, -inf / inf made NaN logits
    ("max_tokens", 0), ("max_tokens", 2.5),  # 2.5 would never equal a length: the request would run to max_model_len
    ("top_p", 0), ("top_p", 1.5), ("top_p", float("nan")),
    ("top_k", -2), ("top_k", 2.5), ("top_k", 20.0),  # torch.topk takes ints only: mid-step, it failed
    ("top_k", -1.0),  # -1 the int only, as every other top_k
    ("seed", "7"), ("seed", 1.5), ("seed", True), ("ignore_eos", "false"), ("max_tokens", True),
    ("stop_token_ids", ["</s>"]), ("stop_token_ids", [2.5]), ("stop_token_ids", [-1]),  # "</s>" would never stop one
    ("stop_token_ids", 22),  # one id, not in a list: a TypeError that named nothing
])
def test_invalid_sampling_params(field, value):  # named before any work, whatever the value's type
    with pytest.raises(ValueError, match=f"^{field} must be"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("field, value", [
    ("tensor_parallel_size", 0), ("tensor_parallel_size", 2.0), ("dtype", "fp8"),
    ("max_model_len", 1), ("max_model_len", 20.5),  # 20.5 would never equal a length: sequences ran past it
    ("max_num_seqs", 0), ("max_num_seqs", True),
    ("max_num_batched_tokens", 1e4),  # a float budget failed mid-step, in the first prefill
    ("gpu_memory_utilization", 0), ("gpu_memory_utilization", 1.5), ("gpu_memory_utilization", "0.9"),
    ("kvcache_block_size", 8), ("kvcache_block_size", 24), ("kvcache_block_size", 16.0),
    ("num_kvcache_blocks", 0), ("num_kvcache_blocks", 10.0),
    ("device", "cuda:1"), ("device", "mps"),  # the KV cache was sized from the memory of the current GPU
    ("dist_timeout_s", 0), ("dist_timeout_s", "600"),
    ("dist_timeout_s", float("inf")), ("dist_timeout_s", 1e15),  # past timedelta's range: spawning ranks failed
    ("enable_prefix_caching", "no"), ("enforce_eager", "false"),  # strings are truthy: "no" turned caching on
])
def test_invalid_engine_config(checkpoints, field, value):  # named before any work, whatever the value's type
    with pytest.raises(ValueError, match=f"^{field} must be"):
        LLM(checkpoints["gqa2-untied"], **{field: value})


def test_engine_options_are_keywords(checkpoints):  # LLM(path, 2) failed deep inside with an AttributeError
    with pytest.raises(TypeError, match="positional argument"):
        LLM(checkpoints["gqa2-untied"], 2)


def test_sampling_params_take_numpy_numbers(checkpoints):  # e.g. read from a dataframe
    import numpy as np
    params = SamplingParams(temperature=np.float32(0.5), top_p=np.float64(0.9), top_k=np.int64(20),
                            max_tokens=np.int32(8), seed=np.int32(3))
    assert params.top_k == 20 and params.max_tokens == 8
    # they run as Python's numbers do (an int32 seed overflowed in the seed's arithmetic, at every step)
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=64)
    python = SamplingParams(temperature=0.5, top_p=0.9, top_k=20, max_tokens=8, seed=3)
    assert llm.generate([[1, 2, 3]], params, use_tqdm=False) == llm.generate([[1, 2, 3]], python, use_tqdm=False)
    # an int8 max_tokens plus a 200-token prompt overflowed int8 in the could-never-run check
    long = SamplingParams(max_tokens=np.int8(100), temperature=0, ignore_eos=True)
    assert len(llm.generate([list(range(1, 201))], long, use_tqdm=False)[0]["token_ids"]) == 100
    # prompts of numpy's ints are token ids too (they were refused as not a list of ids); bools are not (they ran)
    ids = np.array([5, 6, 7])
    assert llm.generate([list(ids)], python, use_tqdm=False) == llm.generate([[5, 6, 7]], python, use_tqdm=False)
    with pytest.raises(TypeError, match="list of token ids"):
        llm.generate([[True, False]], python, use_tqdm=False)


def test_bad_requests_change_nothing(checkpoints, hf_models):
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=4, max_model_len=100)
    good = random_prompts([10], seed=10)[0]
    cases = [
        ([list(range(100))], GREEDY, "max_model_len"),                   # prompt too long
        ([[]], GREEDY, "empty"),                                          # empty prompt
        ([""], GREEDY, "empty"),
        ([[1, 2, 512]], GREEDY, "vocabulary"),                            # token id outside the vocab
        ([[-1]], GREEDY, "vocabulary"),
        ([good, good], [GREEDY], "2 prompts but 1"),                      # list lengths differ
        ([good], [], "1 prompts but 0"),                                  # an empty list is not the default
        ([good, list(range(50))], SamplingParams(max_tokens=20), "could never run"),  # 70 tokens > 4 blocks
    ]
    for prompts, params, message in cases:
        with pytest.raises(ValueError, match=message):
            llm.generate(prompts, params, use_tqdm=False)
        assert llm.is_finished() and len(llm.scheduler.block_manager.free) == 4
    assert llm.generate([good], GREEDY, use_tqdm=False)[0]["token_ids"] == hf_greedy(hf_models["gqa2-untied"], good, 12)
    # 60 + 5 tokens fit the 4 blocks' 64 slots: the last token is never cached (it was refused as "could never run")
    fits = list(range(1, 61))
    out = llm.generate([fits], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert out[0]["token_ids"] == hf_greedy(hf_models["gqa2-untied"], fits, 5) and llm.stats["preemptions"] == 0


def test_a_decode_step_grown_to_a_graph_batch(checkpoints):
    # The inputs a CUDA graph reads, built here on the CPU into a stand-in for the graphs' buffer: every input but the
    # block tables lands where capture put it, whatever the tables' width; padding rows write nothing (slot -1), attend
    # to nothing (context 0) and sample greedily (temperature 0, no filter); the sampling parameters keep their values.
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=64)
    runner, vocab = llm.runner, llm.config.hf.vocab_size
    runner.graph_inputs = torch.zeros(4096, dtype=torch.int32)
    seqs = [Sequence(i, list(range(1, n + 1)), SamplingParams(temperature=0.5, top_p=0.9, top_k=7, seed=i))
            for i, n in enumerate([5, 20, 40])]
    for seq in seqs:  # one new token each: a decode step
        llm.scheduler.block_manager.allocate(seq, len(seq))
        seq.num_computed_tokens, seq.num_scheduled_tokens = len(seq) - 1, 1
    step = runner.prepare(seqs)
    captured = runner.upload({name: [] for name in nanollm.STEP_INPUTS}, graph_bs=8)
    inputs = runner.upload(step, graph_bs=8)
    for name in nanollm.STEP_INPUTS[:-1]:
        assert inputs[name].data_ptr() == captured[name].data_ptr() and len(inputs[name]) == len(captured[name])
        assert inputs[name].data_ptr() % 16 == 0
    assert inputs["input_ids"].tolist() == [5, 20, 40] + [0] * 5
    assert inputs["positions"].tolist() == [4, 19, 39] + [0] * 5
    assert inputs["slot_mapping"].tolist() == step["slot_mapping"] + [-1] * 5
    assert inputs["context_lens"].tolist() == [5, 20, 40] + [0] * 5
    assert inputs["cu_seqlens_q"].tolist() == list(range(9)) and inputs["logits_rows"].tolist() == [0, 1, 2] + [0] * 5
    assert inputs["temperature"].view(torch.float32).tolist() == [0.5] * 3 + [0.0] * 5
    assert inputs["top_p"].view(torch.float32).tolist() == [torch.tensor(0.9).item()] * 3 + [1.0] * 5
    assert inputs["top_k"].tolist() == [7] * 3 + [vocab] * 5
    assert inputs["block_tables"].view(8, -1).tolist() == [t + [0] * (3 - len(t)) for t in step["block_tables"]] + [
        [0] * 3] * 5
    for seq in seqs:
        llm.scheduler.block_manager.release(seq)


def test_placeholder_is_read_on_the_device(checkpoints):
    # A token still on its way to the host is a placeholder, -1 - its row in the previous step's sample; the
    # runner reads it there, wherever it stands in the step's inputs (here the last token of a prefill).
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=64)
    prompt = random_prompts([20], seed=12)[0]

    def prefill_hidden(seq):
        llm.scheduler.block_manager.allocate(seq, len(seq))
        seq.num_scheduled_tokens = len(seq)
        step = llm.runner.prepare([seq])
        hidden = llm.runner.forward(llm.runner.upload(step), step["max_seqlen_q"])
        llm.scheduler.block_manager.release(seq)
        return hidden
    held = Sequence(1, prompt[:-1], GREEDY)
    held.placeholder = -1 - 2  # row 2 of the previous sample
    llm.runner.sampled[:4] = torch.tensor([7, 8, prompt[-1], 9])
    assert len(held) == len(prompt)
    assert torch.equal(prefill_hidden(held), prefill_hidden(Sequence(0, prompt, GREEDY)))


def test_step_level_api(checkpoints, hf_models):
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=64)
    prompts = random_prompts([3, 18], seed=11)
    ids = [llm.add_request(p, GREEDY) for p in prompts]
    tokens = {i: [] for i in ids}
    while not llm.is_finished():
        for seq in llm.step():
            tokens[seq.request_id].append(seq.token_ids[-1])
    assert [tokens[i] for i in ids] == [hf_greedy(hf_models["gqa2-untied"], p, 12) for p in prompts]


def test_abort_takes_many_ids_and_skips_finished_and_unknown_ones(checkpoints):
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=64, max_num_seqs=1)
    finished = llm.requests[llm.add_request([1, 2, 3], replace(GREEDY, max_tokens=1))]
    while not finished.is_finished:
        llm.step()
    running, waiting = [llm.requests[llm.add_request(p, GREEDY)] for p in random_prompts([9, 40], seed=4)]
    llm.step()  # one sequence at a time: one runs, holding blocks, and the other waits
    assert llm.scheduler.running == [running] and list(llm.scheduler.waiting) == [waiting] and running.block_table
    llm.requests[finished.request_id] = finished  # finished but still listed (a Ctrl-C inside resolve() can do that)
    llm.abort(finished.request_id, waiting.request_id, running.request_id, 12345)
    assert not llm.requests
    assert [s.finish_reason for s in (finished, waiting, running)] == ["length", "abort", "abort"]
    llm.step()  # reads back the last step's ids: the aborted rows get none
    assert_all_blocks_free(llm)


def test_abort_and_interrupt_while_a_token_is_in_flight(checkpoints, hf_models):
    # The host runs a step ahead: a request aborted while its newest token is still on the GPU gets no more
    # tokens and is not reported again; an interrupt inside resolve() loses nothing for the other requests.
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=64)
    prompts = random_prompts([5, 9, 7], seed=13)
    aborted, *others = [llm.requests[llm.add_request(p, GREEDY)] for p in prompts]
    for _ in range(3):
        llm.step()
    assert aborted.placeholder is not None  # its newest token is in flight
    llm.abort(aborted.request_id)
    kept = list(aborted.completion_token_ids)
    finish = llm.scheduler.finish
    calls = []

    def interrupted_once(seq, token):  # Ctrl-C after the first sequence of a resolve() got its token
        calls.append(seq)
        if len(calls) == 2:
            raise KeyboardInterrupt
        finish(seq, token)
    llm.scheduler.finish = interrupted_once
    with pytest.raises(KeyboardInterrupt):
        llm.step()
    llm.scheduler.finish = finish
    while not llm.is_finished():
        assert aborted not in llm.step()
    assert aborted.completion_token_ids == kept and aborted.finish_reason == "abort" and not llm.requests
    for seq, prompt in zip(others, prompts[1:]):
        assert seq.completion_token_ids == hf_greedy(hf_models["gqa2-untied"], prompt, 12)
        assert seq.finish_reason == "length"
    assert_all_blocks_free(llm)


def test_interrupt_inside_commit_leaves_no_block_unpublished(checkpoints, hf_models):
    # Ctrl-C in BlockManager.commit, before the first full block of a prefill chunk is published. Its tokens were
    # counted as computed first: that block was never published, the next one was published as a prompt's first
    # block, and a prompt starting with that block's tokens got another position's keys and values from the cache.
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=64, max_num_batched_tokens=16)
    bm = llm.scheduler.block_manager
    commit = bm.commit

    class InterruptedOnce(list):  # the block list, whose first read raises
        def __getitem__(self, index):
            bm.blocks = list(self)
            raise KeyboardInterrupt

    def interrupted(seq, num_tokens):
        bm.commit = commit
        bm.blocks = InterruptedOnce(bm.blocks)
        commit(seq, num_tokens)
    bm.commit = interrupted
    prompt = random_prompts([40], seed=23)[0]
    seq = llm.requests[llm.add_request(prompt, GREEDY)]
    with pytest.raises(KeyboardInterrupt):
        llm.step()  # the first chunk: tokens 0-15, block 0
    while not llm.is_finished():
        llm.step()
        check_block_invariants(llm)
    assert seq.completion_token_ids == hf_greedy(hf_models["gqa2-untied"], prompt, 12)
    second = prompt[16:32] + [7, 9, 11]  # starts with block 1's tokens: no prefix of it is cached
    assert llm.generate([second], GREEDY, use_tqdm=False)[0]["token_ids"] == hf_greedy(
        hf_models["gqa2-untied"], second, 12)
    assert llm.stats["cached_prompt_tokens"] == 0
    assert llm.generate([prompt], GREEDY, use_tqdm=False)[0]["token_ids"] == seq.completion_token_ids
    assert llm.stats["cached_prompt_tokens"] == 32  # both of its full blocks were published after all


def test_a_ctrl_c_at_any_point_of_the_bookkeeping_loses_no_block(checkpoints, hf_models):
    # Python raises a Ctrl-C's KeyboardInterrupt as a call returns, a function starts or a loop goes round. Here it is
    # raised at each point of the first two kinds in the scheduler's and block manager's methods (a call made there
    # returns, or a Python function they call starts), one point per run, through every point of a run of two
    # generate() calls that claim a cached prefix, evict, preempt and finish. After each, no request is left and every
    # block is free. (Before: a Ctrl-C just after `free.popitem()` in allocate, or `block_table.pop()` in release,
    # lost that block for good; one in the admission left a sequence in the running list.)
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=5, max_num_batched_tokens=32)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompt = random_prompts([60], seed=5)[0]
    prompts = [prompt[20:60], prompt[:30], prompt[:40]]
    methods = {f.__code__ for cls in (BlockManager, Scheduler) for f in vars(cls).values() if callable(f)}
    target = points = 0

    def profile(frame, event, arg):  # counts the points; the target-th raises
        nonlocal points
        caller = frame if event == "c_return" else frame.f_back
        if event in ("c_return", "call") and caller is not None and caller.f_code in methods:
            points += 1
            if points == target:
                raise KeyboardInterrupt

    def run():  # from an empty cache: each run meets the same points in the same order
        nonlocal points
        llm.scheduler.block_manager = BlockManager(llm.num_kvcache_blocks, llm.config.kvcache_block_size)
        points = 0
        sys.setprofile(profile)
        try:
            llm.generate([prompt[:36]], params, use_tqdm=False)  # its first two blocks are cached for the others
            return llm.generate(prompts, params, use_tqdm=False)
        finally:
            sys.setprofile(None)
    expected = run()
    assert llm.stats["cached_prompt_tokens"] and llm.stats["preemptions"]  # the run does all it should
    assert [out["token_ids"] for out in expected] == [hf_greedy(hf_models["gqa2-untied"], p, 8) for p in prompts]
    for target in range(1, points + 1):
        with pytest.raises(KeyboardInterrupt):
            run()
        assert not llm.scheduler.waiting and not llm.scheduler.running and not llm.requests, f"point {target}"
        bm = llm.scheduler.block_manager
        assert all(b.ref_count == 0 for b in bm.blocks) and len(bm.free) == len(bm.blocks) == 5, f"point {target}"
    target = 0
    assert run() == expected


def test_a_second_ctrl_c_during_the_clean_up_loses_no_block(checkpoints, hf_models):
    # A user presses Ctrl-C twice: the second lands while generate() aborts its requests after the first, just after
    # a request left the running list and before its blocks are released (a real SIGINT, raised there). Those blocks
    # were lost for good, and a later request that needed them waited forever; now the clean-up ignores it.
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=16)
    prompts = random_prompts([30, 45, 20], seed=8)
    expected = [hf_greedy(hf_models["gqa2-untied"], p, 12) for p in prompts]
    step, release, pressed = llm.step, llm.scheduler.block_manager.release, []

    def first_ctrl_c():  # after two steps: each request holds blocks, and none has finished
        if llm.stats["steps"] == 2:
            raise KeyboardInterrupt
        return step()

    def release_after_second_ctrl_c(seq):
        if not pressed:
            pressed.append(seq)
            signal.raise_signal(signal.SIGINT)  # Python raises its KeyboardInterrupt as this call returns
        release(seq)
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whatever started pytest
    try:
        llm.step, llm.scheduler.block_manager.release = first_ctrl_c, release_after_second_ctrl_c
        with pytest.raises(KeyboardInterrupt):
            llm.generate(prompts, GREEDY, use_tqdm=False)
        assert pressed and signal.getsignal(signal.SIGINT) is signal.default_int_handler  # pressed, and restored
    finally:
        signal.signal(signal.SIGINT, handler)
        del llm.step, llm.scheduler.block_manager.release
    assert not llm.requests and not llm.scheduler.running and not llm.scheduler.waiting
    # checked before a generate() that would wait for lost blocks; finished at once, though the interrupted step's
    # sample (of aborted rows) was never read back (before: is_finished() waited for one more step())
    assert llm.pending is not None
    assert_all_blocks_free(llm)
    assert [out["token_ids"] for out in llm.generate(prompts, GREEDY, use_tqdm=False)] == expected
    # the clean-up runs on any thread (only the main one may set a signal handler)
    results = []
    thread = threading.Thread(target=lambda: results.append(llm.generate(prompts, GREEDY, use_tqdm=False)))
    thread.start()
    thread.join()
    assert [out["token_ids"] for out in results[0]] == expected


def test_abort_leaves_a_ctrl_c_handler_set_outside_python_alone(checkpoints, monkeypatch):
    # getsignal() gives None for a handler a host program set in C; signal.signal(SIGINT, None) would then raise
    # TypeError in every clean-up, so abort() must not swap it
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=64)
    swaps = []
    monkeypatch.setattr(signal, "getsignal", lambda signum: None)
    monkeypatch.setattr(signal, "signal", lambda *args: swaps.append(args))
    llm.abort(llm.add_request([1, 2, 3], GREEDY))
    assert llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0]["finish_reason"] == "length" and not swaps


def test_interrupt_during_admission_frees_the_claimed_prefix(checkpoints, hf_models):
    # Ctrl-C after a waiting sequence claimed its cached prefix, before the admission check: generate() aborts it,
    # and its claimed blocks come back (they stayed held: the cache lost them for good)
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=64)
    prompt = random_prompts([40], seed=21)[0]
    expected = llm.generate([prompt], GREEDY, use_tqdm=False)  # its first two blocks are cached now
    blocks_needed = llm.scheduler.block_manager.blocks_needed

    def interrupted(seq, num_tokens):
        assert seq.block_table  # the prefix is claimed
        raise KeyboardInterrupt
    llm.scheduler.block_manager.blocks_needed = interrupted
    with pytest.raises(KeyboardInterrupt):
        llm.generate([prompt], GREEDY, use_tqdm=False)
    llm.scheduler.block_manager.blocks_needed = blocks_needed
    assert llm.is_finished() and not llm.requests
    assert_all_blocks_free(llm)
    assert llm.generate([prompt], GREEDY, use_tqdm=False) == expected


def test_exit_ends_every_request(checkpoints):
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=64)
    seqs = [llm.requests[llm.add_request(p, GREEDY)] for p in random_prompts([5, 40], seed=3)]
    unread = llm.stream([1, 2], GREEDY)  # queued when first read: after the exit below
    llm.step()  # running, a token of each in flight
    llm.exit()
    assert llm.step() == [] and llm.is_finished()  # nothing left to run (before: an AttributeError)
    assert all(seq.finish_reason == "abort" for seq in seqs) and not llm.requests
    assert_all_blocks_free(llm)
    with pytest.raises(RuntimeError, match="exited"):
        llm.add_request([1, 2], GREEDY)
    with pytest.raises(RuntimeError, match="exited"):  # it was an AttributeError that named nothing
        next(unread)
    with pytest.raises(RuntimeError, match="exited"):
        llm.generate([[1, 2]], GREEDY, use_tqdm=False)
    assert llm.is_finished() and not llm.requests


def test_a_request_keeps_the_params_it_was_given(checkpoints):  # it kept the caller's object, changes and all
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=64)
    params, seqs = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True), []
    for seed in range(3):  # one object, reused for each request
        params.seed = seed
        seqs.append(llm.requests[llm.add_request([1, 2, 3], params)])
    params.max_tokens = 1
    while not llm.is_finished():
        llm.step()
    alone = [llm.generate([[1, 2, 3]], replace(params, seed=seed, max_tokens=8), use_tqdm=False)[0]["token_ids"]
             for seed in range(3)]
    assert [seq.completion_token_ids for seq in seqs] == alone and len(set(map(tuple, alone))) == 3


def test_a_ctrl_c_as_a_request_finishes_leaves_it_in_no_list(checkpoints):  # is_finished() stayed False for ever
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=64)
    finish = llm.scheduler.finish

    def interrupted(seq, token):  # a Ctrl-C as finish() returns the request's last token
        finish(seq, token)
        if seq.is_finished:
            llm.scheduler.finish = finish
            raise KeyboardInterrupt
    llm.scheduler.finish = interrupted
    llm.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    with pytest.raises(KeyboardInterrupt):
        while not llm.is_finished():
            llm.step()
    llm.step()  # the step loop goes on: the interrupted read-back is picked up where it stopped
    assert_all_blocks_free(llm)  # and is_finished(), no request left


def test_run_ends_when_its_requests_are_aborted_outside_its_steps(checkpoints):  # it stepped on for ever
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=64, max_num_seqs=1)  # one by one
    seqs = [llm.make_sequence([1, 2, 3], replace(GREEDY, max_tokens=n)) for n in (2, 40)]
    step, steps = llm.step, []

    def counted():
        steps.append(1)
        assert len(steps) < 100, "run() stepped on with nothing left to run"
        return step()
    llm.step = counted
    llm.run(seqs, use_tqdm=False, on_finish=lambda seq: llm.abort(*llm.requests))  # the first aborts the waiting one
    assert [seq.finish_reason for seq in seqs] == ["length", "abort"]
    llm.step = step
    assert_all_blocks_free(llm)


def load_weights_of(runner, path):  # for collective_rpc: another checkpoint's weights, of the same shapes
    runner.model.load_weights(path, runner.config.hf.tie_word_embeddings)


def test_weights_swapped_by_collective_rpc_get_no_stale_prefix_from_the_cache(checkpoints, tmp_path):
    other = build_random_checkpoint(str(tmp_path / "other"), seed=1, **CHECKPOINTS["gqa2-untied"])
    prompt, engine = list(range(1, 41)), dict(kvcache_block_size=16, num_kvcache_blocks=64)  # 2 blocks to cache
    llm = LLM(checkpoints["gqa2-untied"], **engine)
    llm.generate([prompt], GREEDY, use_tqdm=False)
    llm.collective_rpc(load_weights_of, other)
    swapped = llm.generate([prompt], GREEDY, use_tqdm=False)[0]["token_ids"]  # the old weights' keys were served
    assert swapped == LLM(other, **engine).generate([prompt], GREEDY, use_tqdm=False)[0]["token_ids"]


def test_cli_demo_runs_offline(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the demo checkpoint goes where pytest cleans up
    nanollm.main(["--max-tokens", "5", "--temperature", "0", "--prompt", "hi", "--chat"])
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and "Completion:" in out


@pytest.mark.parametrize("flag", ["--input", "--output"])
def test_cli_input_and_output_go_together(tmp_path, capsys, flag):
    with pytest.raises(SystemExit):
        nanollm.main([flag, str(tmp_path / "x.jsonl")])
    assert "--input and --output go together" in capsys.readouterr().err


@pytest.mark.parametrize("output", ["out.jsonl", "./in.jsonl"])  # the input missing; the input as the output too
def test_cli_job_files_are_checked_before_the_model_loads(tmp_path, capsys, monkeypatch, output):
    monkeypatch.chdir(tmp_path)
    if output == "./in.jsonl":  # every input line would have counted as done, and nothing run
        Path("in.jsonl").write_text('{"id": 1, "prompt": "hi"}\n')
    with pytest.raises(SystemExit):  # not the missing model's FileNotFoundError: the files are checked first
        nanollm.main(["--model", "no-such-model", "--input", "in.jsonl", "--output", output])
    assert "--input 'in.jsonl' does not exist, or is the --output file too" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--chat"], ["--prompt", "hi"]])
def test_cli_prompts_do_not_apply_to_a_job(tmp_path, capsys, flags):  # a job line says it: "messages" or "prompt"
    with pytest.raises(SystemExit):  # the prompt was ignored without a word
        nanollm.main(flags + ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")])
    assert "without --chat or --prompt" in capsys.readouterr().err  # (the usage line names both anyway)


def test_cli_chat_applies_the_template_to_prompts(capsys, tmp_path, monkeypatch):
    from transformers import AutoTokenizer
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    generate, prompts = LLM.generate, []

    def recorded(llm, inputs, *args):
        prompts.extend(inputs)
        return generate(llm, inputs, *args)
    monkeypatch.setattr(LLM, "generate", recorded)
    nanollm.main(["--max-tokens", "2", "--temperature", "0", "--prompt", "hi", "--chat"])
    assert "Prompt: 'hi'\nCompletion: " in capsys.readouterr().out  # as the user wrote it
    tokenizer = AutoTokenizer.from_pretrained(next(tmp_path.glob("nanollm-demo-*")))
    assert prompts == [hf_chat_ids(tokenizer, [{"role": "user", "content": "hi"}])]


def test_llama3_style_tokenizer(checkpoints, tmp_path):
    # Llama 3's tokenizer adds BOS when encoding, its chat template starts with BOS too, and its config asks for
    # spaces before punctuation to be cleaned up when decoding (transformers 4 does so)
    from tokenizers import processors
    from transformers import AutoTokenizer
    path = shutil.copytree(checkpoints["gqa2-untied"], tmp_path / "llama3-tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(path)
    bos = "<|endoftext|>"
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.convert_tokens_to_ids(bos))])
    tokenizer.bos_token, tokenizer.clean_up_tokenization_spaces = bos, True
    chatml = tokenizer.chat_template
    tokenizer.chat_template = "{{ bos_token }}" + chatml
    tokenizer.save_pretrained(path)
    llm = LLM(str(path), kvcache_block_size=16, num_kvcache_blocks=64)
    messages = [{"role": "user", "content": "hi"}]
    chat_ids = hf_chat_ids(tokenizer, messages)
    chat_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text = "Hello , world . Streams only append ."
    for prompt, expected in [(llm.chat_prompt(messages), chat_ids), (text, tokenizer.encode(text)),
                             (chat_text, chat_ids)]:  # a template's text: no second BOS
        seq = llm.requests[llm.add_request(prompt, GREEDY)]
        assert seq.token_ids == expected and expected.count(tokenizer.bos_token_id) == 1  # one BOS, as HF gives
    # a template without BOS on this tokenizer (unsloth's "chatml" on Llama 3): none, as HF tokenizes it (as text it
    # got one from encode())
    llm.tokenizer.chat_template = tokenizer.chat_template = chatml
    seq = llm.requests[llm.add_request(llm.chat_prompt(messages), GREEDY)]
    assert seq.token_ids == hf_chat_ids(tokenizer, messages) and tokenizer.bos_token_id not in seq.token_ids
    # what stream() relies on: decoding more tokens only appends text
    assert llm.tokenizer.decode(llm.tokenizer.encode(text), skip_special_tokens=True) == text
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=40, ignore_eos=True)
    assert "".join(llm.stream(text, params)) == llm.generate([text], params, use_tqdm=False)[0]["text"]


def test_chat_prompt_passes_its_keywords_to_the_template(checkpoints, tmp_path):
    # Qwen3's template takes enable_thinking=False: it then writes an empty think block, and the model answers at once
    from transformers import AutoTokenizer
    path = shutil.copytree(checkpoints["gqa2-untied"], tmp_path / "thinking")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template += "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
    tokenizer.save_pretrained(path)
    llm = LLM(str(path), kvcache_block_size=16, num_kvcache_blocks=64)
    messages = [{"role": "user", "content": "hi"}]
    expected = hf_chat_ids(tokenizer, messages, enable_thinking=False)
    assert llm.chat_prompt(messages, enable_thinking=False) == expected != llm.chat_prompt(messages)


# ---------------------------------------------------------------- Triton kernels against the torch reference
# On a CPU these run through TRITON_INTERPRET=1 at tiny shapes; on a GPU the same tests run compiled.

TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}  # relative L2 error


def rel_error(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


def make_paged_cache(context_lens, block_size, num_kv_heads, head_dim, dtype, spare_blocks=3):
    # Random K/V for each sequence's tokens in randomly permuted blocks; every other slot is NaN and
    # unused block-table entries are -1, so a read outside a sequence's own tokens poisons the output.
    ctx = torch.tensor(context_lens, dtype=torch.int64)
    blocks_per_seq = (ctx + block_size - 1) // block_size
    num_blocks = int(blocks_per_seq.sum()) + spare_blocks
    used = torch.arange(int(blocks_per_seq.max()) + 1)[None, :] < blocks_per_seq[:, None]
    block_tables = torch.full(used.shape, -1, dtype=torch.int64)
    block_tables[used] = torch.randperm(num_blocks)[:int(blocks_per_seq.sum())]
    pos = torch.arange(int(ctx.max()))
    slots = (block_tables.gather(1, (pos // block_size)[None, :].expand(len(ctx), -1)) * block_size
             + pos % block_size)[pos[None, :] < ctx[:, None]].to(DEVICE)
    caches = []
    for _ in range(2):
        cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
        cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(len(slots), num_kv_heads, head_dim, device=DEVICE).to(dtype)
        caches.append(cache)
    return caches[0], caches[1], block_tables.to(torch.int32).to(DEVICE)


# (dtype, head_dim, group, block_size): every dtype meets every head_dim, group and block size
ATTENTION_CASES = [
    (torch.float32, 16, 1, 16), (torch.float32, 64, 2, 32), (torch.float32, 128, 4, 16),
    (torch.float32, 32, 8, 256),
    (torch.float16, 16, 8, 32), (torch.float16, 64, 1, 16), (torch.float16, 128, 2, 32),
    (torch.bfloat16, 16, 4, 16), (torch.bfloat16, 64, 8, 32), (torch.bfloat16, 128, 2, 16),
    (torch.bfloat16, 64, 2, 256),
]


def case_id(case):
    return f"{str(case[0])[6:]}-d{case[1]}-g{case[2]}-bs{case[3]}"


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=case_id)
def test_prefill_attention(case):
    dtype, head_dim, group, block_size = case
    rng = random.Random(str(case))
    torch.manual_seed(rng.randrange(2**31))
    num_kv_heads = 1 if group == 8 else 2
    num_heads = num_kv_heads * group
    # (prefix, q_len): fresh prompt ending on a block edge, prefix-cache hit, chunk spanning q tiles
    bs_tokens = min(block_size, 32)
    prefixes = [0, block_size, rng.randrange(0, 3 * block_size)]
    q_lens = [bs_tokens, rng.randrange(1, 40), rng.randrange(65, 80)]
    context_lens = [p + n for p, n in zip(prefixes, q_lens)]
    k_cache, v_cache, block_tables = make_paged_cache(context_lens, block_size, num_kv_heads, head_dim, dtype)
    cu_seqlens_q = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    q = torch.randn(sum(q_lens), num_heads, head_dim, dtype=dtype, device=DEVICE)
    context_lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim ** -0.5
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
    prefill_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, max(q_lens), out=out)
    ref = paged_attention_reference(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale)
    assert rel_error(out, ref) < TOLERANCE[dtype]


def make_decode_inputs(context_lens, block_size, num_kv_heads, group, head_dim, dtype, qk_norm=True):
    # a decode step's inputs: each row's new token at position context_len - 1, its row of qkv random and its slot in
    # the cache NaN (written by the step: a read of the old value poisons the output); context 0: a padding row
    k_cache, v_cache, block_tables = make_paged_cache(context_lens, block_size, num_kv_heads, head_dim, dtype)
    context_lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    block_tables[context_lens == 0, 0] = block_tables.max()  # as in the engine, a live block: a stray write shows
    positions = (context_lens - 1).clamp(min=0)
    blocks = block_tables.gather(1, (positions // block_size)[:, None].long())[:, 0]
    slots = blocks * block_size + positions % block_size
    slot_mapping = torch.where(context_lens > 0, slots, -1).to(torch.int32)
    for cache in (k_cache, v_cache):
        cache.view(-1, num_kv_heads, head_dim)[slot_mapping[context_lens > 0].long()] = float("nan")
    qkv = torch.randn(len(context_lens), num_kv_heads * (group + 2) * head_dim, device=DEVICE).to(dtype)
    norms = [1 + torch.randn(head_dim, device=DEVICE).to(dtype) / 4 if qk_norm else None for _ in range(2)]
    cos_sin = nanollm.rope_table(head_dim, int(context_lens.max()) + 1, 1e6).to(DEVICE)
    inputs = dict(qkv=qkv, q_norm=norms[0], k_norm=norms[1], eps=1e-6, cos_sin=cos_sin, k_cache=k_cache,
                  v_cache=v_cache, context_lens=context_lens, block_tables=block_tables, scale=head_dim ** -0.5)
    return inputs, dict(positions=positions, slot_mapping=slot_mapping)  # the kernel's, and what the reference adds


def decode_reference(qkv, q_norm, k_norm, eps, cos_sin, k_cache, v_cache, context_lens, block_tables, scale,
                     positions, slot_mapping):
    # plain torch: the q/k norms, RoPE and cache write, then attention -> (out, k_cache, v_cache), the caches copies
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    q = qk_norm_rope_store_reference(qkv, q_norm, k_norm, eps, positions, cos_sin, k_cache, v_cache, slot_mapping)
    cu_seqlens_q = torch.arange(qkv.shape[0] + 1, dtype=torch.int32, device=DEVICE)
    out = paged_attention_reference(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale)
    return out, k_cache, v_cache


def rounding_tolerance(dtype):  # for what the kernels and the reference round alike (q/k norms, RoPE)
    # within two units in the last place (a rounding flipped early can carry); but Triton's interpreter rounds
    # to bf16 by truncation, a few units off
    close = dict(rtol=2 * torch.finfo(dtype).eps, atol=1e-5) if dtype != torch.float32 else {}
    return dict(rtol=0.05, atol=0.07) if dtype == torch.bfloat16 and DEVICE == "cpu" else close


def check_decode(inputs, reference_inputs, num_splits=None):  # -> the kernel's output, checked against the reference
    ref, k_ref, v_ref = decode_reference(**inputs, **reference_inputs)
    out = torch.full(ref.shape, float("nan"), dtype=ref.dtype, device=DEVICE)
    decode_attention(**inputs, num_splits=num_splits, out=out)
    dtype, padding = ref.dtype, inputs["context_lens"] == 0
    assert rel_error(out, ref) < TOLERANCE[dtype] and torch.all(out[padding] == 0)  # context 0 -> zeros
    # the new keys as the reference rounds them (but at real sizes a rounding flipped early and carried turns up:
    # within the attention's tolerance), values as they are; nothing else written
    slots = reference_inputs["slot_mapping"]
    written = slots[slots >= 0].long()
    key, key_ref = inputs["k_cache"].flatten(0, 1), k_ref.flatten(0, 1)  # (slots, kv heads, head_dim)
    assert rel_error(key[written], key_ref[written].float()) < TOLERANCE[dtype]
    key_ref[written] = key[written]
    torch.testing.assert_close(key, key_ref, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(inputs["v_cache"], v_ref, equal_nan=True, rtol=0, atol=0)
    return out


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=case_id)
@pytest.mark.parametrize("qk_norm", [True, False], ids=["qk-norm", "no-norm"])
def test_decode_attention(case, qk_norm):
    dtype, head_dim, group, block_size = case
    rng = random.Random(case_id(case))
    torch.manual_seed(rng.randrange(2**31))
    # a padding row (0), on and off block edges (block_size + 1: the new token first in a fresh block), a few blocks
    context_lens = [0, block_size, block_size + 1, rng.randrange(1, block_size),
                    rng.randrange(2 * block_size, 5 * block_size)]
    check_decode(*make_decode_inputs(context_lens, block_size, 1 if group == 8 else 2, group, head_dim, dtype, qk_norm))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_decode_num_splits_invariant(dtype):
    # contexts of up to 5 tiles of 128 keys: split 1, 2, 3 and 8 ways, they take up to 1, 2, 3 and 5 splits
    context_lens = [0, 128, 77, 333, 600]
    outs = []
    for num_splits in [1, 2, 3, 8]:
        torch.manual_seed(0)  # the same inputs each time
        inputs, reference_inputs = make_decode_inputs(context_lens, 128, 2, 2, 32, dtype)
        outs.append(check_decode(inputs, reference_inputs, num_splits).float())
        assert not nanollm.split_counters(inputs["qkv"].device).any()  # each merge set its counter back to 0
    for out in outs[1:]:
        assert rel_error(out, outs[0]) < TOLERANCE[dtype] / 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(6, 3, 64), (16, 8, 128)], ids=["padded", "0.6B"])
@pytest.mark.parametrize("qk_norm", [True, False], ids=["qk-norm", "no-norm"])  # Qwen3; Qwen2 and Llama (llama3 RoPE)
def test_qk_norm_rope_store(dtype, num_heads, num_kv_heads, head_dim, qk_norm):  # 6 and 3 heads: padded to powers of 2
    torch.manual_seed(0)
    num_tokens = 37
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, device=DEVICE)
    q_norm, k_norm = (1 + torch.randn(head_dim, dtype=dtype, device=DEVICE) / 4 if qk_norm else None for _ in range(2))
    positions = torch.randint(0, 4096, (num_tokens,), dtype=torch.int32, device=DEVICE)
    cos_sin = nanollm.rope_table(head_dim, 4096, 1e6, None if qk_norm else LLAMA3_ROPE).to(DEVICE)
    slot_mapping = torch.randperm(8 * 16)[:num_tokens].to(torch.int32)
    slot_mapping[::5] = -1  # CUDA-graph padding rows
    slot_mapping = slot_mapping.to(DEVICE)
    k_cache = torch.randn(8, 16, num_kv_heads, head_dim, dtype=dtype, device=DEVICE)
    v_cache = torch.randn_like(k_cache)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    args = (q_norm, k_norm, 1e-6, positions, cos_sin)
    q = qk_norm_rope_store(qkv, *args, k_cache, v_cache, slot_mapping)
    q_ref = qk_norm_rope_store_reference(qkv, *args, k_ref, v_ref, slot_mapping)
    assert q.shape == (num_tokens, num_heads, head_dim)
    torch.testing.assert_close(q, q_ref, **rounding_tolerance(dtype))
    torch.testing.assert_close(k_cache, k_ref, **rounding_tolerance(dtype))  # and slots no token maps to untouched
    assert torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("in_features, out_features",  # 5,000: two tiles of 4,096 columns, the second one masked
                         [(64, 96), (200, 37), (5000, 6), pytest.param(1024, 4096, marks=cuda)])
@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])  # Qwen2's q/k/v, Llama's attention_bias
def test_gemv_with_folded_norm_and_swiglu(dtype, in_features, out_features, with_bias):  # one row: single-stream decode
    torch.manual_seed(in_features)
    weight = torch.randn(out_features, in_features, dtype=dtype, device=DEVICE) / in_features ** 0.5
    bias = torch.randn(out_features, dtype=dtype, device=DEVICE) if with_bias else None
    x, residual = torch.randn(2, 1, in_features, dtype=dtype, device=DEVICE)
    norm = nanollm.RMSNorm(in_features, 1e-6).to(DEVICE)
    norm.weight.data = (1 + torch.randn(in_features, device=DEVICE) / 4).to(dtype)
    reference = dict(none=lambda: F.linear(x, weight, bias), norm=lambda: F.linear(norm(x, residual)[0], weight, bias),
                     swiglu=lambda: F.linear(nanollm.silu_and_mul(torch.cat([x, residual], 1)), weight, bias))
    outs = dict(none=nanollm.gemv(x, weight, bias=bias), norm=nanollm.gemv(x, weight, norm, residual, bias=bias),
                swiglu=nanollm.gemv(torch.cat([x, residual], 1), weight, swiglu=True, bias=bias))
    out, summed = outs["norm"]
    if DEVICE == "cuda" or dtype == torch.float32:  # (the interpreter's bf16 and fp16 roundings are off)
        assert torch.equal(summed, x + residual)
    for name, ref in reference.items():
        out = outs[name][0] if name == "norm" else outs[name]
        assert out.shape == (1, out_features) and out.dtype == dtype
        assert rel_error(out, ref().float()) < TOLERANCE[dtype], name


QK_NORM_OR_NOT = ({}, dict(q_norm_ptr=None, k_norm_ptr=None))  # Qwen3; Qwen2 and Llama
HOPPER_LAUNCHES = [  # each kernel with the compile-time constants the engine gives it for Qwen3-0.6B in bf16
    *[(nanollm._gemv_kernel, dict(PROLOGUE=prologue, BLOCK_N=4, BLOCK_K=block_k, PDL=True, bias_ptr=None))
      for prologue, block_k in (("none", 2048), ("swiglu", 4096), ("norm", 1024))],  # o_proj, down, q|k|v and gate|up
    (nanollm._gemv_kernel, dict(PROLOGUE="norm", BLOCK_N=4, BLOCK_K=1024, PDL=True)),  # with a bias: Qwen2's q/k/v
    *[(nanollm._qk_norm_rope_store_kernel, dict(NUM_HEADS=16, NUM_KV_HEADS=8, HEADS_PAD=16, KV_HEADS_PAD=8,
                                                HEAD_DIM=128, **no_norm)) for no_norm in QK_NORM_OR_NOT],
    (nanollm._prefill_attention_kernel, dict(NUM_HEADS=16, NUM_KV_HEADS=8, HEAD_DIM=128, BLOCK_SIZE=256, BLOCK_M=64,
                                             BLOCK_N=64, UPCAST=False)),
    *[(nanollm._decode_attention_kernel, dict(NUM_KV_HEADS=8, HEAD_DIM=128, BLOCK_SIZE=256, GROUP=2, GROUP_PAD=16,
                                              BLOCK_N=64, NUM_SPLITS=splits, SPLITS_PAD=splits, UPCAST=False,
                                              PDL=True, **no_norm)) for splits in (1, 8) for no_norm in QK_NORM_OR_NOT],
    (nanollm._sample_kernel, dict(PART=8192, BLOCK=2048)),
    *[(nanollm._moe_gemm_kernel, dict(TOP_K=8, SWIGLU=swiglu, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64, UPCAST=False))
      for swiglu in (True, False) for block_m in (16, 64)],
]


def compile_kernels_for_hopper():  # in a process without TRITON_INTERPRET: see the next test
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    bf16 = {"qkv", "q_norm", "k_norm", "k_cache", "v_cache", "q", "out", "logits", "x", "w", "bias", "residual",
            "summed", "norm", "a", "weights"}
    fp32 = {"cos_sin", "part_m", "part_l", "part_acc", "temperature", "best"}
    for kernel, constants in HOPPER_LAUNCHES:
        def arg_type(name):
            if name in constants:
                return "constexpr"
            if name.endswith("_ptr"):
                return "*bf16" if name[:-4] in bf16 else "*fp32" if name[:-4] in fp32 else "*i32"
            return "fp32" if name in ("qk_scale", "eps") else "i32"
        signature = {p.name: arg_type(p.name) for p in kernel.params}
        triton.compile(ASTSource(kernel, signature, constexprs=constants), target=GPUTarget("cuda", 90, 32))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU every kernel is compiled for real by the tests")
def test_kernels_compile_for_hopper():
    # The interpreter runs a kernel as Python, so it accepts what only the compiler rejects (a Python global read
    # inside a kernel, say): compile each kernel for an H100 (sm_90), as the engine launches it.
    import subprocess
    import sys
    subprocess.run([sys.executable, "-c", "import test_nanollm; test_nanollm.compile_kernels_for_hopper()"],
                   env=dict(os.environ, TRITON_INTERPRET="0"), cwd=os.path.dirname(os.path.abspath(__file__)), check=True)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernels_at_real_shapes(dtype, block_size, head_dim):
    # GQA 1/2/4/8, batch 1 to 256, contexts to 2k on and off block edges, prefixes 0 to several blocks
    rng = random.Random(f"{dtype}{block_size}{head_dim}")
    torch.manual_seed(rng.randrange(2**31))
    scale, num_kv_heads = head_dim ** -0.5, 4
    for group, batch in zip([1, 2, 4, 8], [1, 7, 64, 256]):
        ctx = [rng.choice([rng.randrange(1, 2048), rng.randrange(1, 8) * block_size]) for _ in range(batch)]
        ctx[-1] = 0 if batch > 1 else ctx[-1]  # a CUDA-graph padding row
        check_decode(*make_decode_inputs(ctx, block_size, num_kv_heads, group, head_dim, dtype, qk_norm=group != 4))
        q_lens = [rng.randrange(1, 600) for _ in range(min(batch, 16))]
        ctx = [n + rng.choice([0, block_size, rng.randrange(0, 1024)]) for n in q_lens]
        k_cache, v_cache, tables = make_paged_cache(ctx, block_size, num_kv_heads, head_dim, dtype)
        q = torch.randn(sum(q_lens), num_kv_heads * group, head_dim, device=DEVICE).to(dtype)
        cu = torch.tensor([0] + q_lens, device=DEVICE).cumsum(0).to(torch.int32)
        lens = torch.tensor(ctx, dtype=torch.int32, device=DEVICE)
        out = prefill_attention(q, k_cache, v_cache, cu, lens, tables, scale, max(q_lens))
        ref = paged_attention_reference(q, k_cache, v_cache, cu, lens, tables, scale)
        assert rel_error(out, ref.float()) < TOLERANCE[dtype]


@cuda
@pytest.mark.parametrize("name", ["gqa4-tied", *REALISTIC, "moe-top2-sparse-step"])
def test_gpu_end_to_end_fp32_with_cuda_graphs(checkpoints, hf_models, request, name):
    # fp32 on the GPU, Triton kernels and CUDA graphs on: greedy tokens equal HF's, with a prefix-cache
    # hit and preemption in the same run; at head_dim 16 (tiny) and 128 (realistic: Qwen3, Qwen2, Llama 3), and the
    # Triton MoE
    path, hf = request.getfixturevalue("realistic")[name] if name in REALISTIC else (checkpoints[name], hf_models[name])
    prefix = random_prompts([40], seed=12)[0]
    prompts = random_prompts([1, 15, 16, 17, 33, 70], seed=13) + [prefix + [1], prefix + [2, 3]]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    llm = LLM(path, device="cuda", dtype="float32", kvcache_block_size=16, num_kvcache_blocks=14)
    assert llm.runner.graphs  # decode replays CUDA graphs
    alone = llm.generate([prefix], params, use_tqdm=False)[0]  # one sequence: the one-row GEMV path
    assert alone["token_ids"] == hf_greedy(hf, prefix, params.max_tokens)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.stats["preemptions"] > 0 and llm.stats["cached_prompt_tokens"] >= 2 * 32
    for prompt, out in zip(prompts, outs):
        assert out["token_ids"] == hf_greedy(hf, prompt, params.max_tokens)
    assert_all_blocks_free(llm)


@cuda
def test_gpu_sampling_inside_cuda_graphs_equals_eager(checkpoints):
    # decode's LM head and sampler are captured in the graphs (the top-k/top-p filters run after a replay): seeded
    # draws, greedy rows and filtered rows, mixed in one batch and alone, give the tokens of the eager engine
    prompts = random_prompts([3, 17, 30, 9], seed=21)
    params = [SamplingParams(temperature=0.9, seed=1, max_tokens=24, ignore_eos=True), GREEDY,
              SamplingParams(temperature=1.2, top_k=20, top_p=0.8, seed=3, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0.7, seed=4, max_tokens=24, ignore_eos=True)]
    outs = []
    for eager in (False, True):
        llm = LLM(checkpoints["gqa2-untied"], device="cuda", dtype="float32", num_kvcache_blocks=64,
                  kvcache_block_size=16, enforce_eager=eager)
        assert bool(llm.runner.graphs) != eager
        outs.append([llm.generate(prompts, params, use_tqdm=False),
                     [llm.generate([p], [q], use_tqdm=False)[0] for p, q in zip(prompts, params)]])
    assert outs[0] == outs[1] and outs[0][0] == outs[0][1]


@cuda
def test_gpu_kv_cache_sized_from_memory(checkpoints):
    llm = LLM(checkpoints["gqa2-untied"], device="cuda", gpu_memory_utilization=0.5)
    free, total = torch.cuda.mem_get_info()
    assert llm.num_kvcache_blocks * llm.runner.block_bytes <= 0.5 * total
    assert llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0]["token_ids"]


# ---------------------------------------------------------------- mixture of experts: Triton against the torch loop

def moe_inputs(num_tokens, num_experts, top_k, hidden, intermediate, dtype, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(num_tokens, hidden, device=DEVICE).to(dtype)
    gate_up = (torch.randn(num_experts, 2 * intermediate, hidden, device=DEVICE) / hidden ** 0.5).to(dtype)
    down = (torch.randn(num_experts, hidden, intermediate, device=DEVICE) / intermediate ** 0.5).to(dtype)
    weights, ids = torch.randn(num_tokens, num_experts, device=DEVICE).softmax(-1).topk(top_k, -1)
    return x, gate_up, down, weights.to(dtype), ids


@pytest.mark.parametrize("num_tokens, num_experts, top_k, hidden, intermediate", [
    (1, 8, 2, 64, 32),    # one token: most of the grid's tiles return at once
    (5, 8, 8, 64, 48),    # every expert; an intermediate size the 64-wide tiles do not divide
    (7, 4, 1, 32, 40),
    (300, 8, 2, 96, 16),  # many tokens per expert: 64-row tiles, a hidden size the tiles do not divide
])
def test_fused_moe_matches_reference(num_tokens, num_experts, top_k, hidden, intermediate):
    # fp32 (the interpreter's bf16 is broken; bf16 runs on the GPU below)
    x, gate_up, down, weights, ids = moe_inputs(num_tokens, num_experts, top_k, hidden, intermediate, torch.float32)
    ref = nanollm.fused_moe_reference(x, gate_up, down, weights, ids)
    # the reference against its definition written densely: every expert on every token, weighted by its route
    dense = sum(((ids == e) * weights).sum(1, keepdim=True)
                * F.linear(nanollm.silu_and_mul(F.linear(x, gate_up[e])), down[e]) for e in range(num_experts))
    torch.testing.assert_close(ref, dense)
    out = nanollm.fused_moe(x, gate_up, down, weights, ids)
    assert out.shape == x.shape and rel_error(out, ref) < TOLERANCE[torch.float32]


@cuda
@pytest.mark.parametrize("num_tokens", [1, 8, 32, 64, 128, 256, 2048, 6000])
def test_fused_moe_at_real_shape(num_tokens):
    # Qwen3-30B-A3B's experts (128, top-8, hidden 2048, intermediate 768) in bf16: decode batches, prefill chunks
    args = moe_inputs(num_tokens, 128, 8, 2048, 768, torch.bfloat16, seed=num_tokens)
    assert rel_error(nanollm.fused_moe(*args), nanollm.fused_moe_reference(*args).float()) < TOLERANCE[torch.bfloat16]


@cuda
def test_fused_moe_in_a_cuda_graph():
    # decode's case: captured once, replayed with other tokens and routes (all tokens to the same 8 experts, too)
    x, gate_up, down, weights, ids = moe_inputs(64, 128, 8, 256, 128, torch.bfloat16)
    nanollm.fused_moe(x, gate_up, down, weights, ids)  # compiles the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = nanollm.fused_moe(x, gate_up, down, weights, ids)
    for seed in range(1, 4):
        new_x, _, _, new_weights, new_ids = moe_inputs(64, 128, 8, 256, 128, torch.bfloat16, seed=seed)
        new_ids = torch.arange(8, device=DEVICE).expand(64, 8) if seed == 3 else new_ids
        x.copy_(new_x)
        weights.copy_(new_weights)
        ids.copy_(new_ids)
        graph.replay()
        ref = nanollm.fused_moe_reference(x, gate_up, down, weights, ids)
        assert rel_error(out, ref.float()) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("dropped, listed", [("model.layers.1.mlp.experts.5.up_proj.weight", "gate_up_proj.weight', 5, 1"),
                                              ("model.layers.1.mlp.experts.7.down_proj.weight", "down_proj.weight', 7, None"),
                                              ("model.layers.0.self_attn.k_proj.weight", "qkv_proj.weight', None, 1")])
def test_a_missing_weight_is_named(tmp_path, checkpoints, dropped, listed):
    # one expert's matrix, or one part of a packed one, absent (a shard not downloaded): an error, not empty memory
    from safetensors.torch import load_file, save_file
    path = tmp_path / "partial"
    shutil.copytree(checkpoints["moe-top2-sparse-step"], path)
    for file in path.glob("*.safetensors"):
        tensors = load_file(file)
        save_file({k: v for k, v in tensors.items() if k != dropped}, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"lacks weights .*{listed}"):
        LLM(str(path), device="cpu", kvcache_block_size=16, num_kvcache_blocks=16)


def test_a_tied_checkpoint_that_also_saves_its_head_loads(checkpoints, tmp_path):
    # HF leaves lm_head.weight out of a tied checkpoint; some exporters write it: the same model either way
    from safetensors.torch import load_file, save_file
    path = shutil.copytree(checkpoints["gqa4-tied"], tmp_path / "tied")
    (file,) = path.glob("*.safetensors")
    tensors = load_file(file)
    save_file(tensors | {"lm_head.weight": tensors["model.embed_tokens.weight"].clone()}, file, metadata={"format": "pt"})
    prompt = random_prompts([9])[0]
    ref = LLM(checkpoints["gqa4-tied"], kvcache_block_size=16, num_kvcache_blocks=16).generate([prompt], GREEDY,
                                                                                            use_tqdm=False)
    assert LLM(str(path), kvcache_block_size=16, num_kvcache_blocks=16).generate([prompt], GREEDY, use_tqdm=False) == ref


def test_moe_config_spellings_and_errors(tmp_path, checkpoints, hf_models):
    # transformers 4's num_experts (the Hub's files) reads as 5's num_local_experts; unsupported fields fail early
    name = "moe-top2-sparse-step"
    path = tmp_path / "moe"
    shutil.copytree(checkpoints[name], path)
    cfg = json.loads((path / "config.json").read_text())
    hub = {("num_experts" if k == "num_local_experts" else k): v for k, v in cfg.items()}
    assert "num_local_experts" in cfg and "num_experts" in hub
    (path / "config.json").write_text(json.dumps(hub))
    prompt = random_prompts([9], seed=16)[0]
    llm = LLM(str(path), kvcache_block_size=16, num_kvcache_blocks=16)
    assert llm.generate([prompt], GREEDY, use_tqdm=False)[0]["token_ids"] == hf_greedy(hf_models[name], prompt, 12)
    for change, tp, message in [(dict(num_experts_per_tok=9), 1, "MoE config: 9 of 8 experts per token"),
                                (dict(decoder_sparse_step=0), 1, "MoE config: .* decoder_sparse_step 0"),
                                (dict(hidden_act="gelu"), 1, "unsupported: activation 'gelu'"),
                                (dict(moe_intermediate_size=33), 2, "must divide moe_intermediate_size 33")]:
        (path / "config.json").write_text(json.dumps(hub | change))
        with pytest.raises(ValueError, match=message):
            LLM(str(path), device="cpu", tensor_parallel_size=tp)
    # a config without decoder_sparse_step (it defaults to 1) is still reported by a ValueError, not a KeyError
    (path / "config.json").write_text(json.dumps({k: v for k, v in hub.items() if k != "decoder_sparse_step"}
                                                 | dict(num_experts_per_tok=9)))
    with pytest.raises(ValueError, match="9 of 8 experts per token, decoder_sparse_step 1"):
        LLM(str(path), device="cpu")


# ---------------------------------------------------------------- tensor and data parallelism (CPU, gloo)

def fail_on_rank_1(runner):  # for collective_rpc: a worker that raises
    if runner.tp.rank == 1:
        raise ValueError("rank 1 refuses")
    return runner.tp.rank


def shard_shapes(runner):  # q|k|v of the first layer, gate|up of the last (its experts' in a MoE)
    mlp = runner.model.model.layers[-1].mlp
    gate_up = mlp.experts.gate_up_proj if hasattr(mlp, "experts") else mlp.gate_up_proj
    return tuple(runner.model.model.layers[0].self_attn.qkv_proj.weight.shape), tuple(gate_up.weight.shape)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_tensor_parallel_equals_single_rank(checkpoints, hf_models, name):
    prompts = random_prompts([1, 17, 33, 70], seed=14)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    with LLM(checkpoints[name], device="cpu", tensor_parallel_size=2, kvcache_block_size=16, num_kvcache_blocks=64) as llm:
        cfg = CHECKPOINTS[name]
        heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        gate_up = (cfg["num_experts"], 32, 64) if "num_experts" in cfg else (128, 64)  # each expert's half of 2 x 32
        assert llm.collective_rpc(shard_shapes) == [(((heads + 2 * kv_heads) * 16 // 2, 64), gate_up)] * 2  # sharded
        outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out["token_ids"] == hf_greedy(hf_models[name], prompt, params.max_tokens)


def test_a_second_tensor_parallel_engine_is_refused_and_the_first_runs_on(checkpoints, hf_models):
    prompt = random_prompts([20], seed=5)[0]
    kwargs = dict(device="cpu", tensor_parallel_size=2, kvcache_block_size=16, num_kvcache_blocks=64)
    with LLM(checkpoints["gqa2-untied"], **kwargs) as first:
        with pytest.raises(RuntimeError, match="already runs in this process"):  # a notebook cell run twice
            LLM(checkpoints["gqa2-untied"], **kwargs)
        # before: torch's "initialize the default process group twice", and the first engine's group was destroyed
        assert first.generate([prompt], GREEDY, use_tqdm=False)[0]["token_ids"] == hf_greedy(
            hf_models["gqa2-untied"], prompt, GREEDY.max_tokens)
    with LLM(checkpoints["gqa2-untied"], **kwargs) as second:  # one after the other is fine
        assert second.generate([prompt], GREEDY, use_tqdm=False)[0]["token_ids"]


def test_worker_error_ends_every_process(checkpoints):
    llm = LLM(checkpoints["gqa2-untied"], device="cpu", tensor_parallel_size=2, kvcache_block_size=16, num_kvcache_blocks=64)
    workers = list(llm.workers)
    with pytest.raises(RuntimeError, match="rank 1 refuses"):
        llm.collective_rpc(fail_on_rank_1)
    assert not any(w.is_alive() for w in workers) and not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="exited"):
        llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)


@pytest.mark.parametrize("then", ["generate", "exit"])  # exit() raised gloo's error and cleaned up nothing
def test_a_killed_worker_is_reported(checkpoints, then):
    llm = LLM(checkpoints["gqa2-untied"], device="cpu", tensor_parallel_size=2, kvcache_block_size=16,
              num_kvcache_blocks=64, dist_timeout_s=60)
    workers = list(llm.workers)
    os.kill(workers[0].pid, 9)  # no traceback: rank 0's next collective fails, and the exit code says why
    workers[0].join()
    with pytest.raises(RuntimeError, match="rank 1 ended with exit code -9"):
        llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False) if then == "generate" else llm.exit()
    assert not multiprocessing.active_children() and not torch.distributed.is_initialized()


def test_ctrl_c_mid_step_ends_the_tensor_parallel_engine(checkpoints):
    # a KeyboardInterrupt on rank 0 while rank 1 is inside the step's collectives: the engine ends at once (before,
    # rank 1 stayed in its all-reduce and the next call waited dist_timeout_s for it)
    llm = LLM(checkpoints["gqa2-untied"], device="cpu", tensor_parallel_size=2, kvcache_block_size=16,
              num_kvcache_blocks=64, dist_timeout_s=60)
    workers = list(llm.workers)

    def interrupted(step):
        raise KeyboardInterrupt
    llm.runner.run = interrupted  # rank 0 only: rank 1 has received the step and runs it
    with pytest.raises(KeyboardInterrupt):
        llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)
    assert not any(w.is_alive() for w in workers) and not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="exited"):
        llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)


def all_reduce_in_a_new_group(runner):  # for collective_rpc
    # A group made after start-up meets through the rendezvous store, as NCCL's lazily connecting communicators do at
    # their first collective: this fails (or waits) if the store is gone once start-up is over.
    group = torch.distributed.new_group(backend="gloo")
    x = torch.tensor([runner.tp.rank + 1])
    torch.distributed.all_reduce(x, group=group)
    return x.item()


def test_rendezvous_outlives_start_up(checkpoints):
    with LLM(checkpoints["gqa2-untied"], device="cpu", tensor_parallel_size=2, kvcache_block_size=16,
             num_kvcache_blocks=64, dist_timeout_s=60) as llm:
        assert llm.collective_rpc(all_reduce_in_a_new_group) == [3, 3]
        workers = list(llm.workers)
    assert not any(w.is_alive() for w in workers) and not torch.distributed.is_initialized()


def exit_at_once(config, rank, port, errors):  # stands in for worker_main: a rank that dies before the rendezvous
    os._exit(3)


def never_come(config, rank, port, errors):  # stands in for worker_main: a rank that never reaches the rendezvous
    import time
    time.sleep(3600)


# a spawned rank imports torch and this module first (seconds, more with CUDA): the dying one gets time to die
@pytest.mark.parametrize("worker, timeout, error", [(exit_at_once, 120, "rank 1 ended .*exit code 3"),
                                                    (never_come, 5, "did not reach the rendezvous in 5 s")])
def test_a_rank_that_fails_to_start_is_reported(checkpoints, monkeypatch, worker, timeout, error):
    monkeypatch.setattr(nanollm, "worker_main", worker)
    with pytest.raises((RuntimeError, TimeoutError), match=error):
        LLM(checkpoints["gqa2-untied"], device="cpu", tensor_parallel_size=2, dist_timeout_s=timeout)
    assert not multiprocessing.active_children() and not torch.distributed.is_initialized()
    monkeypatch.undo()
    with LLM(checkpoints["gqa2-untied"], device="cpu", tensor_parallel_size=2, kvcache_block_size=16,
             num_kvcache_blocks=64) as llm:  # the next engine starts as usual
        assert llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0]["token_ids"]


def test_script_without_main_guard_fails_at_once(checkpoints, tmp_path):
    # A user's script that builds a tensor-parallel LLM at its top level: spawn imports the script again in rank 1,
    # which tries to start an engine of its own. Python refuses (its message names the missing guard) and rank 0 must
    # report the rank's end at once, not wait dist_timeout_s for it (300 s here, past the subprocess's timeout)
    import subprocess
    import sys
    script = tmp_path / "no_guard.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(Path(nanollm.__file__).parent)!r})\nimport nanollm\n"
                      f"nanollm.LLM({checkpoints['gqa2-untied']!r}, device='cpu', tensor_parallel_size=2, "
                      f"kvcache_block_size=16, num_kvcache_blocks=64, dist_timeout_s=300)\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=200)
    assert run.returncode == 1
    assert "if __name__ == '__main__':" in run.stderr  # from rank 1: Python's advice
    assert "RuntimeError: tensor-parallel rank 1 ended with exit code 1" in run.stderr  # from rank 0


@two_gpus
def test_two_gpu_tensor_parallel_equals_one_gpu(realistic):
    # NCCL connects at the first collective, after start-up: the case the CPU tests (gloo) cannot show
    path, hf = realistic["realistic"]
    prompts = random_prompts([1, 17, 33, 70, 130], seed=15)
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    seeded = [SamplingParams(temperature=1.0, seed=s, max_tokens=30, ignore_eos=True) for s in range(len(prompts))]
    files_before = set(os.listdir(tempfile.gettempdir()))
    results = {}
    for tp in (1, 2):
        with LLM(path, device="cuda", dtype="float32", tensor_parallel_size=tp, kvcache_block_size=16,
                 num_kvcache_blocks=64, dist_timeout_s=120) as llm:
            assert llm.runner.graphs  # decode replays CUDA graphs on every rank
            results[tp] = (llm.generate(prompts, greedy, use_tqdm=False), llm.generate(prompts, seeded, use_tqdm=False))
        assert not multiprocessing.active_children() and not torch.distributed.is_initialized()
    assert results[2] == results[1]
    for prompt, out in zip(prompts, results[1][0]):
        assert out["token_ids"] == hf_greedy(hf, prompt, greedy.max_tokens)
    assert not [f for f in set(os.listdir(tempfile.gettempdir())) - files_before if "nanollm" in f]


def test_parallel_config_errors(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="must divide num_attention_heads 4"):
        LLM(checkpoints["gqa2-untied"], device="cpu", tensor_parallel_size=3)
    with pytest.raises(ValueError, match="must divide num_key_value_heads 2"):  # 8 query heads divide by 4
        LLM(checkpoints["gqa4-tied"], device="cpu", tensor_parallel_size=4)
    odd = copy_with_config(checkpoints["gqa2-untied"], tmp_path / "odd", intermediate_size=129)
    with pytest.raises(ValueError, match="must divide intermediate_size 129"):  # checked before any weight is read
        LLM(odd, device="cpu", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="device cuda .*GPUs present"):  # on a CPU-only machine: tp 1, no GPU
        LLM(checkpoints["gqa2-untied"], device="cuda", tensor_parallel_size=torch.cuda.device_count() + 1)
    with pytest.raises(ValueError, match=r"dist_timeout_s must be a number of seconds in \(0, 1e9\]"):
        LLM(checkpoints["gqa2-untied"], device="cpu", tensor_parallel_size=2, dist_timeout_s=0)


def run_cli(*args, torchrun=0, timeout=300, stdin_text=None):  # stdin: the text, or nothing (not the tests')
    import subprocess
    import sys
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}"] if torchrun else [])
    stdin = dict(stdin=subprocess.DEVNULL) if stdin_text is None else dict(input=stdin_text)
    return subprocess.run(launcher + [nanollm.__file__, *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"), **stdin)


def test_torchrun_data_parallel_equals_one_process(checkpoints):
    args = ["--model", checkpoints["gqa2-untied"], "--device", "cpu", "--max-tokens", "8", "--temperature", "0",
            "--ignore-eos", "--kvcache-block-size", "16", "--num-kvcache-blocks", "64"]
    for prompt in ["one", "two words", "three little words", "four", "five"]:
        args += ["--prompt", prompt]
    single = run_cli(*args)
    dp = run_cli(*args, torchrun=2)  # two ranks, tensor_parallel_size 1: two data-parallel groups
    assert single.returncode == 0 and dp.returncode == 0, dp.stderr[-2000:]
    completions = [line for line in single.stdout.splitlines() if line.startswith(("Prompt:", "Completion:"))]
    assert len(completions) == 10 and completions == [line for line in dp.stdout.splitlines()
                                                     if line.startswith(("Prompt:", "Completion:"))]


def test_torchrun_chat_refuses_more_than_one_group(checkpoints):  # each group ran its own chat on the one stdin
    chat = run_cli("--model", checkpoints["gqa2-untied"], "--device", "cpu", "--chat", torchrun=2)
    assert chat.returncode != 0 and "world size 2 must be tensor_parallel_size 1 x N (N = 1 for a chat)" in chat.stderr
    assert "Chat with the model" not in chat.stdout


# ---------------------------------------------------------------- streaming, chat, resumable jobs

def test_streams_equal_generate(checkpoints):
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=64)
    prompts = ["Hello", "Streams share one step loop", "x"]
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=3, max_tokens=25, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=5)]
    expected = [out["text"] for out in llm.generate(prompts, params, use_tqdm=False)]
    streams = dict(enumerate(llm.stream(p, sp) for p, sp in zip(prompts, params)))
    texts = ["", "", ""]
    while streams:  # round-robin: several streams advance over the same steps
        for i, stream in list(streams.items()):
            piece = next(stream, None)
            if piece is None:
                del streams[i]
            else:
                assert piece
                texts[i] += piece
    assert texts == expected
    assert_all_blocks_free(llm)


def test_a_stream_dropped_unread_never_runs(checkpoints):
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    streams = [llm.stream(prompt, params) for prompt in ("Hello", "two", "three")]
    assert next(streams[0])
    streams = None  # the first ends in its finally; the others never started (before: queued, run by the next step)
    assert llm.step() == []  # reads the last ids back, runs nothing
    assert_all_blocks_free(llm)
    assert llm.stats["prompt_tokens"] == len(llm.tokenizer.encode("Hello"))  # only the first was ever queued
    with pytest.raises(ValueError, match="empty"):  # a bad one is still refused at once
        llm.stream("", params)
    assert "".join(llm.stream("two", params)) == llm.generate(["two"], params, use_tqdm=False)[0]["text"]


def test_progress_bar_ends_with_the_last_rates(checkpoints, capsys):
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=64)
    llm.generate(["Hello"], SamplingParams(max_tokens=10, ignore_eos=True))
    bar = capsys.readouterr().err
    assert "decode" in bar and "decode 0 tok/s" not in bar  # the last step only read the last ids back


def test_chat_second_turn_hits_prefix_cache(checkpoints, capsys):
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=64)
    question = "Tell me about paged attention and its blocks, please."
    lines = iter([question, "And about prefix caching?", ""])
    first_prompt = hf_chat_ids(llm.tokenizer, [{"role": "user", "content": question}])
    nanollm.chat(llm, SamplingParams(temperature=0, max_tokens=12), read=lambda _: next(lines))
    assert llm.stats["cached_prompt_tokens"] >= len(first_prompt) // 16 * 16 > 0  # turn 2 reused turn 1
    assert "prefix cache" in capsys.readouterr().out


def test_chat_sends_the_earlier_replies(checkpoints):
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    seen, chat_prompt = [], llm.chat_prompt
    llm.chat_prompt = lambda messages: seen.append([dict(m) for m in messages]) or chat_prompt(messages)
    lines = iter(["first", "second", ""])
    nanollm.chat(llm, params, read=lambda _: next(lines))
    reply = llm.generate([chat_prompt([{"role": "user", "content": "first"}])], params, use_tqdm=False)[0]["text"]
    assert seen[1] == [{"role": "user", "content": "first"}, {"role": "assistant", "content": reply},
                       {"role": "user", "content": "second"}]


def test_chat_that_outgrows_max_model_len_ends_with_a_message(checkpoints, capsys):
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=64)
    lines = iter(["Tell me about paged attention and its blocks, please.", "And about prefix caching?", "more", ""])
    nanollm.chat(llm, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), read=lambda _: next(lines))
    out = capsys.readouterr().out
    assert "max_model_len=64" in out and "new chat" in out  # the engine's own error, then the chat ended
    assert next(lines) == "more"  # it ended at the turn that did not fit, without reading another
    assert_all_blocks_free(llm)
    assert llm.generate(["hi"], GREEDY, use_tqdm=False)[0]["finish_reason"] == "length"  # and stays usable


def test_ctrl_c_in_a_chat_reply_ends_the_reply_not_the_chat(checkpoints, capsys):
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=64)
    lines = iter(["Tell me about paged attention.", "And prefix caching?", ""])
    step, calls = llm.step, []

    def interrupted_once():  # Ctrl-C in the first reply's third step
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step()
    llm.step = interrupted_once
    try:
        nanollm.chat(llm, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), read=lambda _: next(lines))
    except KeyboardInterrupt:  # a failure of this test, not an interrupt of the whole run
        pytest.fail("the Ctrl-C ended the chat")
    assert capsys.readouterr().out.count("served by the prefix cache") == 2  # both turns ended
    assert len(calls) > 3 + 8  # the second reply ran to its 8 tokens
    llm.step = step
    assert_all_blocks_free(llm)


def write_job(path, n):
    lines = []
    for i in range(n):
        lines.append(json.dumps({"id": f"q{i}", "prompt": f"Question number {i}: what is {i} + {i}?"}) if i % 3
                     else json.dumps({"id": i, "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 20}))
    lines.insert(2, "{not json")
    lines.insert(5, json.dumps({"prompt": "no id"}))
    lines.insert(7, json.dumps({"id": "bad", "prompt": "x", "top_p": 2}))
    lines += [json.dumps({"id": "q1", "prompt": "a duplicate id"}), json.dumps({"id": "empty", "prompt": ""})]
    lines += [json.dumps({"id": f"typed{i}", "prompt": "x", **field}) for i, field in  # a wrong type: the line only
              enumerate([{"seed": "7"}, {"top_k": 20.5}, {"max_tokens": 2.5}])]  # 20.0: 20
    path.write_text("\n".join(lines) + "\n")


def read_results(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_job_killed_and_rerun_loses_nothing(checkpoints, tmp_path):
    import signal
    import subprocess
    import sys
    import time
    write_job(tmp_path / "in.jsonl", 12)
    args = ["--model", checkpoints["gqa2-untied"], "--device", "cpu", "--temperature", "0", "--ignore-eos",
            "--max-tokens", "60", "--max-num-seqs", "1", "--kvcache-block-size", "16", "--num-kvcache-blocks", "64",
            "--input", str(tmp_path / "in.jsonl")]
    clean = run_cli(*args, "--output", str(tmp_path / "clean.jsonl"))
    assert clean.returncode == 0, clean.stderr[-2000:]
    for lineno in (3, 6, 8, 16, 17, 18, 19, 20):  # the malformed lines are reported with their numbers and skipped
        assert f"in.jsonl:{lineno}: skipped" in clean.stderr
    assert "duplicate id 'q1'" in clean.stderr and "empty prompt" in clean.stderr
    assert all(f"{name} must be" in clean.stderr for name in ("seed", "top_k", "max_tokens"))
    expected = {json.dumps(r["id"]): r for r in read_results(tmp_path / "clean.jsonl")}
    assert len(expected) == 12
    out = tmp_path / "out.jsonl"
    job = subprocess.Popen([sys.executable, nanollm.__file__, *args, "--output", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while (not out.exists() or len(out.read_text().splitlines()) < 2) and time.time() < deadline and job.poll() is None:
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    job.wait()
    partial = read_results(out)
    assert 2 <= len(partial) < 12  # killed midway
    rerun = run_cli(*args, "--output", str(out))
    assert rerun.returncode == 0 and f"{len(partial)} results already there" in rerun.stderr
    results = read_results(out)
    assert results[:len(partial)] == partial  # nothing written before was rewritten
    assert sorted(json.dumps(r["id"]) for r in results) == sorted(expected)  # exactly one line per id
    assert all(r == expected[json.dumps(r["id"])] for r in results)  # equal to the uninterrupted run


def test_job_line_that_is_not_utf8_is_skipped(checkpoints, tmp_path, capsys):
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=64)
    lines = [json.dumps({"id": 1, "prompt": "first"}).encode(), '{"id": 2, "prompt": "caf\xe9"}'.encode("latin-1"),
             json.dumps({"id": 3, "prompt": "third"}).encode()]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    nanollm.run_job(llm, tmp_path / "in.jsonl", tmp_path / "out.jsonl", GREEDY, use_tqdm=False)
    assert "in.jsonl:2: skipped" in capsys.readouterr().err
    results = read_results(tmp_path / "out.jsonl")
    expected = llm.generate(["first", "third"], GREEDY, use_tqdm=False)
    assert sorted(r["id"] for r in results) == [1, 3]
    assert [r["token_ids"] for r in sorted(results, key=lambda r: r["id"])] == [e["token_ids"] for e in expected]


def test_job_null_fields_take_the_defaults(checkpoints, tmp_path):  # as pandas writes a missing value
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=64)
    lines = [{"id": 1, "prompt": "first", "temperature": None, "max_tokens": None, "top_k": None, "seed": None},
             {"id": 2, "prompt": "second", "max_tokens": 3, "top_p": None}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    defaults = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    nanollm.run_job(llm, tmp_path / "in.jsonl", tmp_path / "out.jsonl", defaults, use_tqdm=False)
    results = sorted(read_results(tmp_path / "out.jsonl"), key=lambda r: r["id"])  # a line was dropped before
    expected = llm.generate(["first", "second"], [defaults, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)],
                            use_tqdm=False)
    assert [r["token_ids"] for r in results] == [e["token_ids"] for e in expected]
    assert [len(r["token_ids"]) for r in results] == [5, 3]


def test_job_as_pandas_writes_it(checkpoints, tmp_path, capsys):
    # DataFrame.to_json(orient="records", lines=True) writes every column on every line, null where a row has none,
    # and an int column with a missing value as floats: every line was skipped (the last, 2.5 tokens, still is)
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=64)
    chat = [{"role": "user", "content": "hi"}]
    (tmp_path / "in.jsonl").write_text(
        '{"id":"a","prompt":"Hello","messages":null,"max_tokens":3.0,"seed":null}\n'
        '{"id":"b","prompt":null,"messages":[{"role":"user","content":"hi"}],"max_tokens":null,"seed":7.0}\n'
        '{"id":"c","prompt":"World","messages":null,"max_tokens":2.5,"seed":null}\n')
    defaults = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    nanollm.run_job(llm, tmp_path / "in.jsonl", tmp_path / "out.jsonl", defaults, use_tqdm=False)
    assert "in.jsonl:3: skipped: max_tokens must be an int >= 1, got 2.5" in capsys.readouterr().err
    results = sorted(read_results(tmp_path / "out.jsonl"), key=lambda r: r["id"])
    expected = llm.generate(["Hello", llm.chat_prompt(chat)], [replace(defaults, max_tokens=3), replace(defaults, seed=7)],
                            use_tqdm=False)
    assert [r["id"] for r in results] == ["a", "b"]
    assert [r["token_ids"] for r in results] == [e["token_ids"] for e in expected]
    assert [len(r["token_ids"]) for r in results] == [3, 5]


def test_job_takes_its_shard_and_ends_a_line_cut_short(checkpoints, tmp_path):
    llm = LLM(checkpoints["gqa2-untied"], kvcache_block_size=16, num_kvcache_blocks=64)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": i, "prompt": f"q {i}"}) + "\n" for i in range(5)))
    nanollm.run_job(llm, tmp_path / "in.jsonl", tmp_path / "shard.jsonl", GREEDY, shard=(1, 2), use_tqdm=False)
    assert sorted(json.loads(line)["id"] for line in (tmp_path / "shard.jsonl").read_text().splitlines()) == [1, 3]
    (tmp_path / "out.jsonl").write_bytes(b'\xff\n{"id": 0, "text": "cut sh')  # not UTF-8; a crash in mid-write
    nanollm.run_job(llm, tmp_path / "in.jsonl", tmp_path / "out.jsonl", GREEDY, use_tqdm=False)
    lines = (tmp_path / "out.jsonl").read_bytes().splitlines()
    # after the line that is not UTF-8 and the cut line (ended, not glued to the next): the results
    assert sorted(json.loads(line)["id"] for line in lines[2:]) == [0, 1, 2, 3, 4]


def test_job_through_pipes(checkpoints):  # ... | --input /dev/stdin --output /dev/stdout | ...
    # reading the output for done ids hung; the input must pass the check that it exists (as with <(zcat job.gz))
    engine = dict(kvcache_block_size=16, num_kvcache_blocks=64)
    piped = run_cli("--model", checkpoints["gqa2-untied"], "--device", "cpu", "--temperature", "0", "--ignore-eos",
                    "--max-tokens", "12", "--kvcache-block-size", "16", "--num-kvcache-blocks", "64",
                    "--input", "/dev/stdin", "--output", "/dev/stdout", timeout=120,
                    stdin_text="".join(json.dumps({"id": i, "prompt": f"q {i}"}) + "\n" for i in range(3)))
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert "0 results already there, 3 to go" in piped.stderr
    results = sorted((json.loads(line) for line in piped.stdout.splitlines()), key=lambda r: r["id"])
    expected = LLM(checkpoints["gqa2-untied"], **engine).generate(["q 0", "q 1", "q 2"], GREEDY, use_tqdm=False)
    assert [r["token_ids"] for r in results] == [e["token_ids"] for e in expected]


def test_ctrl_c_ends_every_process(checkpoints):
    # what a terminal's Ctrl-C does: SIGINT to the whole process group, mid-generation with a spawned rank
    import signal
    import subprocess
    import sys
    import time
    cmd = [sys.executable, nanollm.__file__, "--model", checkpoints["gqa2-untied"], "--device", "cpu",
           "--tensor-parallel-size", "2", "--prompt", "hi", "--max-tokens", "4000", "--ignore-eos"]
    job = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    out = b""
    while b"Generating" not in out and job.poll() is None:  # tqdm's bar: both ranks are in the step loop
        out += job.stdout.read1(4096)
    time.sleep(1)
    os.killpg(job.pid, signal.SIGINT)
    assert job.wait(timeout=60) != 0
    time.sleep(2)
    ps = subprocess.run(["ps", "-eo", "pgid=,stat=,pid="], capture_output=True, text=True).stdout.split("\n")
    assert not [line for line in ps if line.split()[:1] == [str(job.pid)] and not line.split()[1].startswith("Z")]
