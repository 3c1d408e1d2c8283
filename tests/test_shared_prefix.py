"""Shared-prefix chain forward (rank_dpo.py section 3b): one packed sequence per chain, one
chain per row or several back to back in a row (--pack_chains), gives the unshared forward's
numbers: per-caption log-probs to 1e-5 (fp32) and every parameter gradient to 1e-4 relative, for
every objective, video / text / yes-no chains of unequal lengths and K, vision frozen / lora /
full, every family in SHARED_PREFIX_FAMILIES (the VLMs Qwen2.5-VL, Qwen3-VL and PerceptionLM; the
causal LMs Llama, Mistral, Qwen2, Qwen3, Gemma 1/2/3) under sdpa and eager, sliding-window layers
with text longer than the window, the fused LM head on the packed forward, the evaluation path
and torchrun with two processes."""
from __future__ import annotations

import argparse
import copy
import functools
import io
import os
import sys
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch

import rank_dpo as R
import synthetic
from test_train import ROOT, read_metrics, run, run_process, write_jsonl

OBJECTIVES = R.kernels.OBJECTIVES
ONE_ROW = 100_000            # a --pack_chains budget that takes every test batch in one row
# --pack_chains beside off (one chain per row): rows no longer than the longest chain; one row
PACKINGS = ("auto", ONE_ROW)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    return synthetic.build_tiny()


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Video chains (K=4, captions of different lengths), a yes/no chain (K=2, prompts differ),
    text chains (K=3 and K=2): mixed in one batch they pad both the rows and K."""
    root = tmp_path_factory.mktemp("sp")
    os.makedirs(root / "videos")
    rng = np.random.default_rng(0)
    for i in range(2):
        np.save(root / "videos" / f"{i}.npy", rng.integers(0, 255, (8, 64, 64, 3), dtype=np.uint8))
    video = [{"id": f"v{i}", "video": f"videos/{i}.npy", "prompt": "Describe this video in detail.",
              "chain": ["A red square moves from the left to the right.",
                        "A blue square moves.",
                        "A blue circle moves from the right to the left of the frame, slowly.",
                        "Nothing."]} for i in range(2)]
    yesno = {"id": "y", "video": "videos/1.npy", "response": "no",
             "prompts": ["Is the square green and moving up?", "Is it blue?"]}
    text = [{"id": "t0", "prompt": "Describe the scene.",
             "chain": ["A red square on the left.", "A red circle.", "A blue circle at the top."]},
            {"id": "t1", "prompt": "What is shown?", "chain": ["A square.", "Two green stars."]}]
    return {"root": str(root),
            "video": write_jsonl(root / "video.jsonl", video),
            "text": write_jsonl(root / "text.jsonl", text),
            "mixed": write_jsonl(root / "mixed.jsonl", [video[0], yesno, text[0]]),
            "all": write_jsonl(root / "all.jsonl", [video[0], yesno, text[0], text[1], video[1]])}


def adapted(base, vision: str, objective: str, *flags: str):
    """A LoRA policy (per --vision) whose adapters are perturbed, so policy != reference."""
    torch.manual_seed(0)
    args = R.parse_args(["--data", "x", "--output_dir", "x", "--vision", vision, "--lora_r", "4",
                         "--objective", objective, *flags])
    model = R.add_adapters(copy.deepcopy(base), args)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model, args


def step(model, batch, index, args, vision: str, pack=None, fused: bool = False):
    """(loss, stats, per-row policy log-probs, {name: grad}) of one training step: unshared (pack
    None) or packed with --pack_chains `pack` (fused: the LM head inside the loss kernel)."""
    args = argparse.Namespace(**{**vars(args), "pack_chains": pack or "off"})
    model.zero_grad(set_to_none=True)
    loss, stats = R.chain_loss_step(model, batch, index, args, vision != "frozen",
                                    shared_prefix=pack is not None, fused_linear=fused)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        packing = R.pack_model_chains(model, batch, index, pack) if pack is not None else None
        logits, labels = R.chain_logits(model, batch, packing)
        logps, _ = R.kernels.sequence_logps(logits, labels)
    return loss.detach(), stats, logps, grads


def assert_close_steps(got, want, what):
    """Two steps' loss, logged stats, per-row log-probs and every gradient agree."""
    (loss, stats, logps, grads), (loss_ref, stats_ref, logps_ref, grads_ref) = got, want
    torch.testing.assert_close(logps, logps_ref, rtol=1e-5, atol=1e-5, msg=what)
    torch.testing.assert_close(stats, stats_ref, rtol=1e-5, atol=1e-5, msg=what)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6, msg=what)
    assert grads.keys() == grads_ref.keys() and grads_ref, what
    for name, g in grads_ref.items():
        scale = g.abs().max().clamp_min(1e-8)        # relative to the tensor's largest entry
        assert float((grads[name] - g).abs().max() / scale) < 1e-4, (what, name)


def assert_same_step(model, processor, path, args, vision, packs=PACKINGS, fused=False):
    """One chain per row gives the unshared step's numbers, and so does every packing in
    `packs`, which also gives one chain per row's; fused: the packed steps run the LM head
    inside the loss kernel. Returns the batch and its chain index."""
    chains, _ = R.load_chains(path, processor, args.objective)
    batch, index = R.collate(chains, processor, 8, 2048)
    unshared = step(model, batch, index, args, vision)
    one_per_row = step(model, batch, index, args, vision, pack="off", fused=fused)
    assert_close_steps(one_per_row, unshared, "one chain per row vs unshared")
    for pack in packs:
        packed = step(model, batch, index, args, vision, pack, fused)
        assert_close_steps(packed, unshared, f"--pack_chains {pack} vs unshared")
        assert_close_steps(packed, one_per_row, f"--pack_chains {pack} vs one chain per row")
    if ONE_ROW in packs and len(chains) > 1:        # several chains really share the row
        packing = R.pack_model_chains(model, batch, index, ONE_ROW)
        assert len(packing.document) == 1 and int(packing.document.max()) == len(chains) - 1
    return batch, index


def assert_same_vlm_step(model_and_processor, records, objective, kind, vision, attention):
    """assert_same_step on one VLM, plus: the vision tower's gradients come through the prefix."""
    base, processor = model_and_processor
    base.set_attn_implementation(attention)
    model, args = adapted(base, vision, objective)
    assert R.resolve_shared_prefix(model, "auto")
    assert_same_step(model, processor, records[kind], args, vision)
    if kind != "text":
        visual = [p.grad for n, p in model.named_parameters()
                  if any(t in n for t in ("visual", "vision_tower")) and p.requires_grad]
        assert (vision == "frozen") == (not visual)
        assert all(g is not None and bool(g.abs().sum() > 0) for g in visual)


@pytest.mark.parametrize("vision", ["frozen", "lora", "full"])
@pytest.mark.parametrize("kind", ["video", "text", "mixed"])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_packed_step_equals_unshared_qwen2_5_vl(tiny, records, objective, kind, vision):
    assert_same_vlm_step(tiny, records, objective, kind, vision, "sdpa")


@functools.cache
def hub_vlm(family: str):
    """A hub-format family's tiny random model and real processor (tests/hub_models.py)."""
    from hub_models import build
    return build(family)


# Every objective on video chains; one objective for each vision mode, chain kind and backend.
HUB_VLM_CASES = [(objective, "video", "lora", "sdpa") for objective in OBJECTIVES] + \
    [("rank", "video", vision, "sdpa") for vision in ("frozen", "full")] + \
    [("rank", kind, "lora", "sdpa") for kind in ("text", "mixed")] + \
    [("rank", "mixed", "full", "eager")]


@pytest.mark.parametrize("objective,kind,vision,attention", HUB_VLM_CASES)
@pytest.mark.parametrize("family", ["qwen3_vl", "perception_lm"])
def test_packed_step_equals_unshared_hub_vlm(records, family, objective, kind, vision, attention):
    assert_same_vlm_step(hub_vlm(family), records, objective, kind, vision, attention)


WINDOW = 5          # tokens: the text chains' rows are 3-4 times longer, so the window cuts


def causal_config(arch: str, attention: str):
    """A 2-layer, 64-wide config of `arch`; where the architecture has sliding windows, a window
    of WINDOW tokens on some layers (on all for Mistral, whose window has no layer types)."""
    import transformers as T
    size = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                attn_implementation=attention)
    mixed = dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])
    if arch == "llama":
        return T.LlamaConfig(**size)
    if arch == "gemma":
        return T.GemmaConfig(**size)
    if arch == "mistral":
        return T.MistralConfig(**size, sliding_window=WINDOW)
    if arch in ("qwen2", "qwen3"):
        config = T.Qwen2Config if arch == "qwen2" else T.Qwen3Config
        return config(**size, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    if arch == "gemma2":
        return T.Gemma2Config(**size, **mixed, attn_logit_softcapping=50.0,
                              final_logit_softcapping=30.0)
    if arch == "gemma3_text":
        return T.Gemma3TextConfig(**size, **mixed, final_logit_softcapping=30.0)
    raise ValueError(f"no tiny config for {arch}")


CAUSAL_LMS = ("llama", "gemma", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
# (architecture, backend): Gemma 2 runs eager only (transformers refuses sdpa: its attention
# soft-caps the scores)
CAUSAL_LM_BACKENDS = [(arch, attention) for arch in CAUSAL_LMS for attention in ("sdpa", "eager")
                      if (arch, attention) != ("gemma2", "sdpa")]


@functools.cache
def causal_lm(arch: str, attention: str):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(causal_config(arch, attention))


@functools.cache
def tiny_tokenizer():
    return synthetic.build_tiny_tokenizer()


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("arch,attention", CAUSAL_LM_BACKENDS)
def test_packed_step_equals_unshared_causal_lm(records, arch, objective, attention):
    base = causal_lm(arch, attention)
    model, args = adapted(base, "full", objective, "--modules_to_save", "lm_head")
    assert model.get_base_model().config._attn_implementation == attention
    assert R.resolve_shared_prefix(model, "auto")
    batch, _ = assert_same_step(model, tiny_tokenizer(), records["text"], args, "full")
    text = base.config
    if getattr(text, "sliding_window", None) is not None:   # the window cuts these rows
        assert int(batch.attention_mask.sum(-1).min()) > 2 * text.sliding_window


def test_sliding_window_mask_is_transformers_window_in_unpacked_positions(records):
    """Each caption's packed windowed mask, read back in its unpacked row, is the mask
    transformers builds for that row's sliding layers (sliding_window_causal_mask_function)."""
    from transformers.masking_utils import sliding_window_causal_mask_function
    tokenizer = tiny_tokenizer()
    chains, _ = R.load_chains(records["text"], tokenizer, "rank")
    batch, index = R.collate(chains, tokenizer, 8, 2048)
    packing = R.pack_chains(batch, index)
    position = R.packed_token_positions(packing, batch)
    mask = R.packed_attention_mask(packing, "sdpa", torch.float32, WINDOW, position)[:, 0]
    rule = sliding_window_causal_mask_function(WINDOW)
    width = batch.input_ids.shape[1]
    for c in range(mask.shape[0]):
        real = (packing.source[c] >= 0).nonzero()[:, 0]
        for q in real[packing.segment[c, real] > 0].tolist():
            row = int(packing.source[c, q]) // width
            keys = real[(packing.source[c, real] // width == row) |
                        (packing.segment[c, real] == 0)].tolist()
            for k in keys:
                expected = rule(torch.tensor(0), torch.tensor(0), position[c, q], position[c, k])
                assert bool(mask[c, q, k]) == bool(expected), (c, q, k)
            others = sorted(set(real.tolist()) - set(keys))
            assert not mask[c, q, others].any()           # never another caption
    full = R.packed_attention_mask(packing, "sdpa", torch.float32)[:, 0]
    assert bool((full & ~mask).any()) and not bool((mask & ~full).any())   # it only cuts


@pytest.mark.parametrize("family", ["qwen3_vl", "perception_lm", "qwen2_5_vl", "llama"])
def test_fused_lm_head_equals_the_packed_logits_path(tiny, records, family):
    if family == "llama":
        model, args = adapted(causal_lm("llama", "sdpa"), "full", "rank",
                              "--modules_to_save", "lm_head")
        processor, path, vision = tiny_tokenizer(), records["text"], "full"
    else:
        base, processor = tiny if family == "qwen2_5_vl" else hub_vlm(family)
        base.set_attn_implementation("sdpa")
        model, args = adapted(base, "lora", "rank", "--modules_to_save", "lm_head")
        path, vision = records["mixed"], "lora"
    assert R.resolve_fused_linear(model, "auto", shared_prefix=True)
    assert_same_step(model, processor, path, args, vision, fused=True)


def test_fused_lm_head_refuses_soft_capped_logits(monkeypatch):
    monkeypatch.setattr(R, "_fallbacks_logged", set())
    gemma2 = causal_lm("gemma2", "eager")
    assert R.resolve_shared_prefix(gemma2, "auto")
    lines = []
    assert not R.resolve_fused_linear(gemma2, "auto", shared_prefix=True, log=lines.append)
    assert len(lines) == 1 and "soft-caps its logits" in lines[0]
    assert R.resolve_fused_linear(causal_lm("gemma3_text", "sdpa"), "off", True) is False
    with pytest.raises(SystemExit, match="soft-caps"):
        R.resolve_fused_linear(causal_lm("gemma3_text", "sdpa"), "on", shared_prefix=True)


def test_packed_layout_shares_the_prefix_and_isolates_captions(tiny, records):
    base, processor = tiny
    chains, _ = R.load_chains(records["video"], processor, "rank")
    batch, index = R.collate(chains[:1], processor, 8, 2048)
    packing = R.pack_model_chains(base, batch, index)
    lengths = batch.attention_mask.sum(-1)
    prefix = int((packing.segment == 0).sum())
    # every caption segment = its row minus the shared prefix; the prefix holds all 64 video tokens
    assert packing.tokens() == prefix + int((lengths - prefix).sum())
    assert packing.tokens() < int(lengths.sum()) - 2 * prefix
    ids = batch.input_ids.reshape(-1)[packing.source[0, :prefix]]
    assert int((ids == processor.video_token_id).sum()) == 64
    mask = R.packed_attention_mask(packing, "sdpa", torch.float32)[0, 0]
    seg = packing.segment[0]
    one, two = (seg == 1).nonzero()[:, 0], (seg == 2).nonzero()[:, 0]
    assert not mask[two][:, one].any()                       # caption 2 never sees caption 1
    assert mask[two][:, :prefix].all() and mask[one][:, :prefix].all()   # both see the prefix
    eager = R.packed_attention_mask(packing, "eager", torch.float32)[0, 0]
    assert bool(((eager == 0) == mask).all())


@pytest.mark.parametrize("objective", ["rank", "sft"])
def test_rows_of_several_chains_with_the_fused_head_equal_unshared(tiny, records, objective):
    """The fused LM head takes the hidden states through Packing.gather: several chains a row."""
    base, processor = tiny
    model, args = adapted(base, "lora", objective)
    assert R.resolve_fused_linear(model, "on", shared_prefix=True)
    assert_same_step(model, processor, records["mixed"], args, "lora", packs=(ONE_ROW,), fused=True)


def test_pack_rows_is_first_fit_decreasing_within_the_budget():
    lengths = [5, 9, 3, 4, 9]
    assert R.pack_rows(lengths, "off") == [[0], [1], [2], [3], [4]]
    assert R.pack_rows(lengths, "auto") == [[1], [4], [0, 3], [2]]   # rows of at most 9
    assert R.pack_rows(lengths, 12) == [[1, 2], [4], [0, 3]]
    assert R.pack_rows(lengths, 4) == R.pack_rows(lengths, "auto")     # a chain is never split
    for bad in (0, -3, "on", 2.5, True):
        with pytest.raises(ValueError, match="row_tokens"):
            R.pack_rows(lengths, bad)
    parse = lambda *flags: R.parse_args(["--data", "x", "--output_dir", "x", *flags]).pack_chains
    assert parse() == "auto" and parse("--pack_chains", "off") == "off"
    assert parse("--pack_chains", "4096") == 4096
    for bad in ("0", "many"):
        with pytest.raises(SystemExit):
            parse("--pack_chains", bad)


def test_rows_of_several_chains_keep_the_chains_apart(tiny, records):
    """Two video chains in one row: each its own document (own prefix with its own video,
    positions from token 0 of its own rows), never seeing the other; no padding left."""
    base, processor = tiny
    chains, _ = R.load_chains(records["video"], processor, "rank")
    batch, index = R.collate(chains, processor, 8, 2048)
    one_per_row = R.pack_model_chains(base, batch, index)
    packing = R.pack_model_chains(base, batch, index, ONE_ROW)
    assert packing.segment.shape == (1, one_per_row.tokens())     # one row, not a pad in it
    assert packing.tokens() == one_per_row.tokens()
    document, segment, source = packing.document[0], packing.segment[0], packing.source[0]
    width = batch.input_ids.shape[1]
    assert document.tolist() == sorted(document.tolist()) and set(document.tolist()) == {0, 1}
    videos = []
    for d in (0, 1):
        mine = (document == d).nonzero()[:, 0]
        assert int(source[mine[0]]) % width == 0                   # starts at a row's token 0
        prefix = mine[segment[mine] == 0]
        ids = batch.input_ids.reshape(-1)[source[prefix]]
        assert int((ids == processor.video_token_id).sum()) == 64
        videos.append(batch.video_of_row[int(source[mine[0]]) // width])
    assert packing.videos_of_row == [videos] and sorted(videos) == [0, 1]
    mask = R.packed_attention_mask(packing, "sdpa", torch.float32)[0, 0]
    first, second = (document == 0).nonzero()[:, 0], (document == 1).nonzero()[:, 0]
    assert not mask[second][:, first].any() and not mask[first][:, second].any()
    captions, prefix = second[segment[second] >= 1], second[segment[second] == 0]
    assert mask[captions][:, prefix].all()         # the second chain's captions see its prefix
    eager = R.packed_attention_mask(packing, "eager", torch.float32)[0, 0]
    assert bool(((eager == 0) == mask).all())


def test_auto_rows_are_no_longer_than_the_longest_chain(tiny, records):
    base, processor = tiny
    chains, _ = R.load_chains(records["all"], processor, "rank")
    batch, index = R.collate(chains, processor, 8, 2048)
    one_per_row = R.pack_model_chains(base, batch, index)
    auto = R.pack_model_chains(base, batch, index, "auto")
    assert auto.segment.shape[1] == one_per_row.segment.shape[1]      # the mask does not grow
    assert len(auto.segment) < len(one_per_row.segment)               # fewer rows, less padding
    assert auto.tokens() == one_per_row.tokens()
    assert sorted(auto.source[auto.source >= 0].tolist()) == \
        sorted(one_per_row.source[one_per_row.source >= 0].tolist())  # every token, once


def test_auto_is_the_default_and_packs_the_tiny_family(tiny):
    assert R.parse_args(["--data", "x", "--output_dir", "x"]).shared_prefix == "auto"
    model, _ = adapted(tiny[0], "lora", "rank")
    lines = []
    assert R.resolve_shared_prefix(model, "auto", log=lines.append) and not lines


def test_auto_falls_back_once_with_the_reason():
    """A family no test checks (Phi-3) falls back, said once; so do sliding-window layers of a
    checked family whose decoder is not checked with a mask per layer type, unknown layer types,
    and a backend that takes no ready 4-D mask."""
    from transformers import Phi3Config, Phi3ForCausalLM
    phi3 = Phi3ForCausalLM(Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2))
    lines = []
    assert not R.resolve_shared_prefix(phi3, "auto", log=lines.append)
    assert not R.resolve_shared_prefix(phi3, "auto", log=lines.append)
    assert len(lines) == 1 and "'phi3' is not one the packed forward is checked on" in lines[0]
    assert all(f in lines[0] for f in R.SHARED_PREFIX_FAMILIES)
    with pytest.raises(SystemExit, match="is not one the packed forward is checked on"):
        R.resolve_shared_prefix(phi3, "on")
    assert not R.resolve_shared_prefix(phi3, "off")
    llama = copy.deepcopy(causal_lm("llama", "sdpa"))
    assert R.shared_prefix_unsupported(llama) is None
    llama.config.layer_types = ["sliding_attention", "full_attention"]
    assert "'llama' has sliding-window layers" in R.shared_prefix_unsupported(llama)
    llama.config.layer_types = ["chunked_attention", "full_attention"]
    assert "['chunked_attention']" in R.shared_prefix_unsupported(llama)
    llama.config.layer_types = None
    llama.config._attn_implementation = "flash_attention_2"          # packs over a KV cache
    assert R.shared_prefix_unsupported(llama) is None
    llama.config._attn_implementation = "flash_attention_3"
    assert "'flash_attention_3' has no packed route" in R.shared_prefix_unsupported(llama)
    mistral = copy.deepcopy(causal_lm("mistral", "sdpa"))             # every layer slides
    assert R.shared_prefix_unsupported(mistral) is None
    for backend in ("flex_attention", "flash_attention_2"):          # their routes carry no window
        mistral.config._attn_implementation = backend
        assert "carries no window" in R.shared_prefix_unsupported(mistral)


def test_evaluation_uses_the_packed_path(tiny, records, monkeypatch):
    import eval_judge
    base, processor = tiny
    model, _ = adapted(base, "lora", "rank")
    calls = []
    pack = R.pack_chains
    monkeypatch.setattr(R, "pack_chains", lambda *a, **k: calls.append(1) or pack(*a, **k))
    chain = {"video": os.path.join(records["root"], "videos", "0.npy"),
             "prompts": ["Describe this video in detail."] * 3,
             "responses": ["A red square.", "A blue square moves left.", "A cat."]}
    shared = eval_judge.chain_logps(model, processor, [chain], R.VideoSampling(8))[0]
    assert calls == [1]                    # rank and mcq score through chain_logps
    frames = R.load_video(chain["video"], 8)
    unshared = R.response_logps(model, processor, frames, chain["prompts"], chain["responses"],
                                shared_prefix="off")
    np.testing.assert_allclose(shared, unshared.numpy(), rtol=1e-5, atol=1e-5)


def test_torchrun_two_processes_packed_match_one_unshared(records, tmp_path):
    """DDP with --shared_prefix on, two chains per packed row == one process, unshared."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", os.path.join(ROOT, "rank_dpo.py"),
           "--data", records["all"], "--output_dir", str(tmp_path / "ddp"), "--lr", "3e-3",
           "--max_steps", "2", "--batch_size", "2", "--save_every", "0",
           "--shared_prefix", "on", "--pack_chains", str(ONE_ROW)]
    returncode, _, stderr = run_process(cmd, timeout=300)
    assert returncode == 0, stderr[-3000:]
    ddp = read_metrics(tmp_path / "ddp")
    data = {"all": records["all"]}
    with redirect_stdout(io.StringIO()):
        single = run(data, tmp_path / "one", "--shared_prefix", "off",
                     path="all", steps=2, batch=4)
    assert ddp[0]["loss"] == pytest.approx(single[0]["loss"], rel=1e-5)
    assert ddp[1]["loss"] == pytest.approx(single[1]["loss"], rel=1e-4)
