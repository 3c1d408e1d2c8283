"""--attn_implementation and the packed forward's routes (rank_dpo.py section 3b): the dense mask
(sdpa, eager), a FlexAttention BlockMask (flex_attention) and the prefix once into a KV cache with
the captions over it (flash_attention_2). The prefix-cache route takes no attention rule, so it is
checked on CPU under sdpa and eager, forced, against the unshared forward: per-caption log-probs
1e-5, loss, every gradient 1e-4 relative. FlexAttention has no backward on CPU: its forward is
checked here, its gradients by the CUDA-only test at the end (make gpu-check)."""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch

import rank_dpo as R
from test_shared_prefix import (ONE_ROW, OBJECTIVES, adapted, assert_same_step,  # noqa: F401
                                assert_same_vlm_step, causal_config, hub_vlm, records, step, tiny,
                                tiny_tokenizer)
from test_train import run

pytestmark = pytest.mark.usefixtures("one_torch_thread")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def causal_lm():
    """A plain Qwen2 LM without sliding windows (the block-mask and cache routes carry none)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=1024, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2))
    return model, tiny_tokenizer()


@pytest.fixture
def prefix_cache_route(monkeypatch):
    """The flash-attention route under whatever backend the model has (the switch tests use)."""
    monkeypatch.setattr(R, "packed_route", lambda model: "prefix_cache")


def with_backend(model, backend: str):
    model = copy.deepcopy(model)
    R.set_attention_backend(model, backend)
    return model


# --- the prefix-cache route (flash attention's), exact on CPU -------------------------------------

@pytest.mark.parametrize("objective,kind,vision",
                         [(o, "mixed", "lora") for o in OBJECTIVES] +
                         [("rank", k, v) for k in ("video", "text") for v in ("frozen", "lora", "full")] +
                         [("rank", "mixed", "frozen"), ("rank", "mixed", "full")])
def test_prefix_cache_step_equals_unshared_qwen2_5_vl(tiny, records, prefix_cache_route,
                                                      objective, kind, vision):
    base, processor = tiny
    model, args = adapted(base, vision, objective)
    assert_same_step(model, processor, records[kind], args, vision)
    if kind != "text":            # the vision tower's gradients come through the prefix's cache
        visual = [p.grad for n, p in model.named_parameters() if "visual" in n and p.requires_grad]
        assert (vision == "frozen") == (not visual)
        assert all(g is not None and bool(g.abs().sum() > 0) for g in visual)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_prefix_cache_step_equals_unshared_causal_lm(causal_lm, records, prefix_cache_route,
                                                     objective, attention):
    base, tokenizer = causal_lm
    model, args = adapted(with_backend(base, attention), "full", objective,
                          "--modules_to_save", "lm_head")
    assert_same_step(model, tokenizer, records["text"], args, "full")


@pytest.mark.parametrize("family", ["qwen3_vl", "perception_lm"])
@pytest.mark.parametrize("kind,vision", [("video", "lora"), ("mixed", "full")])
def test_prefix_cache_step_equals_unshared_hub_vlm(records, prefix_cache_route, family, kind,
                                                  vision):
    """The hub families through the cache route: Qwen3-VL's deepstack features and timestamp
    positions, PerceptionLM's projector, all in the prefix pass."""
    assert_same_vlm_step(hub_vlm(family), records, "rank", kind, vision, "sdpa")


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_prefix_cache_step_equals_unshared_other_causal_lms(records, prefix_cache_route, arch):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(causal_config(arch, "sdpa"))
    model, args = adapted(base, "full", "rank", "--modules_to_save", "lm_head")
    assert_same_step(model, tiny_tokenizer(), records["text"], args, "full")


def test_prefix_cache_runs_the_prefix_once(tiny, records, prefix_cache_route, monkeypatch):
    """Two language-model calls per pass: the prefixes (one row per chain), then the captions."""
    base, processor = tiny
    chains, _ = R.load_chains(records["mixed"], processor, "rank")
    batch, index = R.collate(chains, processor, 8, 2048)
    packing = R.pack_model_chains(base, batch, index)
    inner = base.model
    calls = []
    hook = inner.register_forward_pre_hook(
        lambda m, a, kw: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    try:
        with torch.no_grad():
            R.packed_hidden_states(base, batch, packing)
    finally:
        hook.remove()
    prefix_len = int((packing.segment == 0).sum(-1).max())
    assert calls[0] == (len(index), prefix_len)
    assert calls[1][0] == int((index >= 0).sum())         # one caption row per chain entry
    assert len(calls) == 2


def test_declined_batches_run_unshared_with_one_line(tiny, records, prefix_cache_route,
                                                     monkeypatch, capsys):
    base, processor = tiny
    model, args = adapted(base, "lora", "rank")
    monkeypatch.setattr(R, "prefix_cache_declined", lambda *a: "a test reason")
    monkeypatch.setattr(R, "_fallbacks_logged", set())
    assert_same_step(model, processor, records["mixed"], args, "lora")
    assert capsys.readouterr().err.count("a test reason") == 1


def test_prefix_cache_declines_what_it_cannot_share(causal_lm, records):
    base, tokenizer = causal_lm
    chains, _ = R.load_chains(records["text"], tokenizer, "rank")
    batch, index = R.collate(chains, tokenizer, 8, 2048)
    packing = R.pack_model_chains(base, batch, index)
    ids = torch.zeros_like(packing.segment)
    assert R.prefix_cache_declined(base, packing, ids) is None
    no_prefix = copy.copy(packing)
    no_prefix.segment = torch.where(packing.segment == 0, 1, packing.segment)
    assert "no prefix" in R.prefix_cache_declined(base, no_prefix, ids)
    model = copy.deepcopy(base)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert "gradient checkpointing" in R.prefix_cache_declined(model, packing, ids)


# --- flex attention: the BlockMask --------------------------------------------------------------

def dense_from_block_mask(block_mask, width: int) -> torch.Tensor:
    """[C, S, S] what a BlockMask lets through: full blocks whole, partial ones by its mask_mod."""
    rows = block_mask.kv_num_blocks.shape[0]
    block = block_mask.BLOCK_SIZE[0]
    out = torch.zeros(rows, width, width, dtype=torch.bool)
    idx = torch.arange(width)
    for b in range(rows):
        for qb in range(block_mask.kv_num_blocks.shape[2]):
            q = idx[qb * block:(qb + 1) * block]
            for kind, nums, where in (("partial", block_mask.kv_num_blocks, block_mask.kv_indices),
                                      ("full", block_mask.full_kv_num_blocks,
                                       block_mask.full_kv_indices)):
                for kb in where[b, 0, qb, :int(nums[b, 0, qb])].tolist():
                    k = idx[kb * block:(kb + 1) * block]
                    if kind == "full":
                        out[b, q.view(-1, 1), k.view(1, -1)] = True
                    else:
                        out[b, q.view(-1, 1), k.view(1, -1)] = block_mask.mask_mod(
                            torch.tensor(b), None, q.view(-1, 1), k.view(1, -1))
    return out


def test_block_mask_lets_through_what_the_dense_mask_does(tiny, records):
    base, processor = tiny
    chains, _ = R.load_chains(records["mixed"], processor, "rank")
    batch, index = R.collate(chains, processor, 8, 2048)
    packing = R.pack_model_chains(base, batch, index)
    width = packing.segment.shape[1]
    dense = R.packed_attention_mask(packing, "sdpa", torch.float32)[:, 0]
    # small blocks and bands: empty, full and partial blocks all occur, over several bands
    block_mask = R.packed_block_mask(packing, block=16, chunk_elements=len(index) * 16 * 4096)
    assert torch.equal(dense_from_block_mask(block_mask, width), dense)
    listed = block_mask.kv_num_blocks + block_mask.full_kv_num_blocks
    blocks = -(-width // 16)
    assert bool((block_mask.full_kv_num_blocks > 0).any())
    assert int(listed.sum()) < len(index) * blocks * (blocks + 1) // 2   # caption blocks skipped


def flex_model(base):
    model = with_backend(base, "flex_attention")
    assert R.packed_route(model) == "block_mask" and R.resolve_shared_prefix(model, "on")
    return model


@pytest.fixture
def flex_calls(monkeypatch):
    """Counts the calls transformers makes to its FlexAttention function (taking a BlockMask)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    calls = []
    flex = ALL_ATTENTION_FUNCTIONS["flex_attention"]

    def counted(module, query, key, value, attention_mask, **kwargs):
        calls.append(type(attention_mask).__name__)
        return flex(module, query, key, value, attention_mask, **kwargs)
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flex_attention", counted)
    return calls


def test_flex_forward_equals_unshared_sdpa(causal_lm, records, monkeypatch, flex_calls):
    """Evaluation (response_logps, eval_judge.chain_logps) and the trainer's no-grad reference
    pass under flex, against the unshared sdpa forward; padding queries give no NaN."""
    import eval_judge
    base, tokenizer = causal_lm
    model, args = adapted(base, "full", "rank", "--modules_to_save", "lm_head")
    flex = flex_model(model)
    built = []
    make = R.packed_block_mask
    monkeypatch.setattr(R, "packed_block_mask", lambda *a, **k: built.append(1) or make(*a, **k))
    chains, _ = R.load_chains(records["text"], tokenizer, "rank")
    batch, index = R.collate(chains, tokenizer, 8, 2048)
    with torch.no_grad():
        logits, labels = R.chain_logits(model, batch)
        sdpa_logps, _ = R.kernels.sequence_logps(logits, labels)
        for pack in ("off", ONE_ROW):          # one chain per row; both chains in one row
            packing = R.pack_model_chains(flex, batch, index, pack)
            logits, labels = R.chain_logits(flex, batch, packing)
            flex_logps, _ = R.kernels.sequence_logps(logits, labels)
            assert not bool(torch.isnan(flex_logps).any())
            torch.testing.assert_close(flex_logps, sdpa_logps, rtol=1e-5, atol=1e-5, msg=str(pack))
    assert len(packing.segment) == 1 and int(packing.document.max()) == 1
    assert built == [1, 1]
    built.clear()
    chain = {"video": None, "prompts": ["Describe the scene."] * 3,
             "responses": ["A red square on the left.", "A red circle.", "A blue circle."]}
    shared = eval_judge.chain_logps(flex, tokenizer, [chain], R.VideoSampling(8))[0]
    assert built == [1]
    unshared = R.response_logps(model, tokenizer, None, chain["prompts"], chain["responses"],
                                shared_prefix="off")
    np.testing.assert_allclose(shared, unshared.numpy(), rtol=1e-5, atol=1e-5)
    assert flex_calls and set(flex_calls) == {"BlockMask"}


def test_flex_forward_with_video_equals_unshared_sdpa(tiny, records, flex_calls):
    """The BlockMask route with a video prefix and Qwen2.5-VL's 3-D positions. transformers does
    not list flex for this family (the flag refuses it), so its language model is switched here
    directly: its attention dispatches through the same interface."""
    base, processor = tiny
    model, _ = adapted(base, "lora", "rank")
    flex = copy.deepcopy(model)
    flex.get_base_model().config.text_config._attn_implementation = "flex_attention"
    assert R.packed_route(flex) == "block_mask"
    frames = R.load_video(os.path.join(records["root"], "videos", "0.npy"), 8)
    prompts = ["Describe this video in detail."] * 3
    responses = ["A red square.", "A blue square moves left.", "A cat."]
    packed = R.response_logps(flex, processor, frames, prompts, responses, shared_prefix="on")
    unshared = R.response_logps(model, processor, frames, prompts, responses, shared_prefix="off")
    torch.testing.assert_close(packed, unshared, rtol=1e-5, atol=1e-5)
    assert flex_calls and set(flex_calls) == {"BlockMask"}


# --- the flag ------------------------------------------------------------------------------------

def test_unknown_or_unavailable_backend_names_the_flag(causal_lm, tiny):
    base, _ = causal_lm
    with pytest.raises(R.ModelError, match="--attn_implementation 'flash'.*not one of"):
        R.set_attention_backend(copy.deepcopy(base), "flash")
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(R.ModelError, match="--attn_implementation flash_attention_2: "):
            R.set_attention_backend(copy.deepcopy(base), "flash_attention_2")
    # transformers 5 lists no flex support for Qwen2.5-VL
    with pytest.raises(R.ModelError, match="--attn_implementation flex_attention: "
                                           "Qwen2_5_VLForConditionalGeneration cannot use it"):
        R.set_attention_backend(copy.deepcopy(tiny[0]), "flex_attention")
    with pytest.raises(R.ModelError, match="no backward pass on CPU"):
        R.check_trainable_backend(with_backend(base, "flex_attention"), "cpu")
    R.check_trainable_backend(with_backend(base, "flex_attention"), "cuda")


def test_backend_is_stored_in_the_run_and_reused_by_its_evaluation(tmp_path, monkeypatch):
    import test_train
    import eval_judge
    data = {"two": test_train.write_jsonl(tmp_path / "c.jsonl", [
        {"id": "a", "prompt": "Describe.", "chain": ["A red square.", "A blue circle."]}])}
    run(data, tmp_path / "run", "--attn_implementation", "eager", steps=1, batch=1)
    with open(tmp_path / "run" / R.RUN_META) as f:
        assert json.load(f)["attn_implementation"] == "eager"
    seen = []
    monkeypatch.setattr(R, "load_model", lambda *a, **k: seen.append(k["attn_implementation"]))
    args = eval_judge.build_parser().parse_args(
        ["rank", "--data", "x", "--adapter", str(tmp_path / "run"), "--device", "cpu"])
    assert args.attn_implementation is None
    eval_judge._load(args, args.adapter)
    args.attn_implementation = "sdpa"                    # the flag wins over the run's
    eval_judge._load(args, None)
    assert seen == ["eager", "sdpa"]
    assert R.run_attn_implementation(args, None) == "sdpa"


# --- on a GPU (make gpu-check): gradients under flex and flash attention ------------------------

def assert_close_steps(base_model, tokenizer, path, backend, logp_tol, step_tol):
    """The packed step under `backend` against the unshared step under sdpa, same weights, on
    the GPU. The trainer's step runs under bf16 autocast there, so loss and gradients agree to
    bf16's precision (step_tol, gradients relative to each tensor's largest entry); the
    log-probs are a forward outside autocast (logp_tol)."""
    model, args = adapted(base_model, "full", "rank", "--modules_to_save", "lm_head")
    model = model.cuda()
    reference = with_backend(model, "sdpa")
    R.set_attention_backend(model, backend)
    assert R.resolve_shared_prefix(model, "on")
    chains, _ = R.load_chains(path, tokenizer, args.objective)
    batch, index = R.collate(chains, tokenizer, 8, 2048)
    batch = batch.to("cuda")
    loss_off, _, logps_off, grads_off = step(reference, batch, index, args, "full")
    for pack in ("off", ONE_ROW):          # one chain per row, and every chain in one row
        loss_on, _, logps_on, grads_on = step(model, batch, index, args, "full", pack)
        torch.testing.assert_close(logps_on.float(), logps_off.float(), rtol=logp_tol, atol=logp_tol)
        torch.testing.assert_close(loss_on.float(), loss_off.float(), rtol=step_tol, atol=step_tol)
        assert grads_on.keys() == grads_off.keys() and grads_off
        for name, g in grads_off.items():
            scale = g.abs().max().clamp_min(1e-8)
            assert float((grads_on[name] - g).abs().max() / scale) < step_tol, (pack, name)


@cuda
def test_flex_packed_step_gradients_on_cuda(causal_lm, records):
    """FlexAttention's backward (the packed BlockMask route) against the unshared sdpa step."""
    base, tokenizer = causal_lm
    assert_close_steps(base, tokenizer, records["text"], "flex_attention", 1e-3, 5e-2)


@cuda
def test_flash_prefix_cache_step_gradients_on_cuda(causal_lm, records):
    """The prefix-cache route under flash_attention_2 (a bf16 model: flash takes no fp32)
    against the unshared sdpa step on the same bf16 weights."""
    pytest.importorskip("flash_attn")
    base, tokenizer = causal_lm
    assert R.PACKED_ROUTES["flash_attention_2"] == "prefix_cache"
    assert_close_steps(copy.deepcopy(base).to(torch.bfloat16), tokenizer, records["text"],
                       "flash_attention_2", 5e-2, 5e-2)
