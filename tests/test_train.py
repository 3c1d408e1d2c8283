"""Tests for rank_dpo.py on the embedded tiny model: objectives, the DPO formula, the vision
choice, encoding each video once per chain, torchrun DDP, exact resume, SIGTERM, bad input."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rank_dpo as R
import synthetic
from gen_chains import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 230), "yellow": (230, 230, 30)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """Four synthetic clips (a coloured square moving right), chain and yes/no records."""
    root = tmp_path_factory.mktemp("data")
    os.makedirs(root / "videos")
    chains = []
    for i, colour in enumerate(COLOURS):
        video = np.zeros((16, 64, 64, 3), np.uint8)
        for t in range(16):
            video[t, 24:40, 2 + 3 * t:14 + 3 * t] = COLOURS[colour]
        np.save(root / "videos" / f"{i}.npy", video)
        other = list(COLOURS)[(i + 1) % 4]
        chains.append({"id": f"c{i}", "video": f"videos/{i}.npy",
                       "prompt": "Describe this video in detail.",
                       "chain": [f"A {colour} square moves from the left to the right.",
                                 f"A {other} square moves from the left to the right.",
                                 f"A {other} square moves from the right to the left.",
                                 f"A {other} circle stays in the center."]})
    yesno = [{"id": f"y{i}", "video": f"videos/{i}.npy", "response": "no",
              "prompts": [f"Is the square {list(COLOURS)[(i + 2) % 4]} and moving up?",
                          f"Is the square {list(COLOURS)[(i + 1) % 4]}?"]} for i in range(2)]
    return {"root": str(root), "chains": chains, "yesno": yesno,
            "two": write_jsonl(root / "two.jsonl", chains[:2]),
            "mixed": write_jsonl(root / "mixed.jsonl", chains + yesno)}


def run(data, out, *extra, objective="rank", steps=2, batch=2, path="two"):
    argv = ["--data", data[path], "--output_dir", str(out), "--objective", objective,
            "--lr", "3e-3", "--max_steps", str(steps), "--batch_size", str(batch),
            "--save_every", "0", *map(str, extra)]
    return R.train(R.parse_args(argv))


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def fresh_model(vision="lora", seed=0):
    model, processor = synthetic.build_tiny()
    torch.manual_seed(seed)
    args = R.parse_args(["--data", "x", "--output_dir", "x", "--vision", vision, "--lora_r", "4"])
    return R.add_adapters(model, args), processor, args


def perturb_adapters(model, scale=0.05, seed=1):
    """Random non-zero LoRA B (and trained copies), so the policy differs from the reference."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


# ---------------------------------------------------------------------------------------------
# The tiny preset
# ---------------------------------------------------------------------------------------------

def test_tiny_is_deterministic_and_saved_base_reloads(tmp_path):
    a, pa = synthetic.build_tiny()
    b, pb = synthetic.build_tiny()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    text = "A red square moves from the left to the right."
    assert pa.tokenizer(text).input_ids == pb.tokenizer(text).input_ids
    assert len(pa.tokenizer(text).input_ids) <= 14          # captions stay short in tokens
    a.save_pretrained(tmp_path)
    pa.save_pretrained(tmp_path)
    c, pc = R.load_model(str(tmp_path))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))
    assert pc.tokenizer(text).input_ids == pa.tokenizer(text).input_ids


def test_tiny_comes_in_through_the_one_hook(data, tmp_path):
    """"tiny" and a directory a tiny model was saved to are the names that reach synthetic.py
    (rank_dpo.embedded_preset); past the hook the tiny model is generic: its processor names its
    video family and expands its own placeholder, the model names its own --modules_to_save
    auto, and a run keeps its base under OUT/base, where load_model and export find it."""
    assert R.TINY_SAVED_MARKER == synthetic.TINY_PROCESSOR_FILE
    assert R.embedded_preset(str(tmp_path)) is None            # any other directory or name
    rows = run(data, tmp_path / "run", steps=3)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    base = str(tmp_path / "run" / "base")
    assert R.embedded_preset("tiny").built and not R.embedded_preset(base).built
    saved, processor = R.load_model(base)
    tiny, _ = R.load_model("tiny")
    assert all(torch.equal(x, y) for x, y in zip(saved.state_dict().values(),
                                                  tiny.state_dict().values()))
    assert saved.default_modules_to_save == tiny.default_modules_to_save == synthetic.TINY_FULL_MODULES
    assert R.processor_family(processor).name == "qwen2_5_vl"
    frames = R.load_video(os.path.join(data["root"], "videos", "0.npy"), 8)
    video = R.video_inputs(processor, frames)
    assert sorted(video) == ["pixel_values_videos", "placeholder_ids", "video_grid_thw"]
    assert video["placeholder_ids"].tolist() == [processor.video_token_id] * 64
    R.main(["export", "--adapter", str(tmp_path / "run"), "--out", str(tmp_path / "merged"),
            "--dtype", "float32"])
    merged, _ = R.load_model(str(tmp_path / "merged"))
    trained, _ = R.load_model("tiny", adapter=str(tmp_path / "run"))
    w = "model.language_model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(merged.state_dict()[w], trained.state_dict()[w])
    assert not torch.equal(merged.state_dict()[w], tiny.state_dict()[w])


def test_patchify_matches_the_vision_tower_layout():
    """Each merged token must be a 2x2 block of neighbouring patches: put a distinct value in
    one 16x16 block of frame pair 1 and check exactly one merged group of 4 patches sees it."""
    frames = np.zeros((4, 64, 64, 3), np.uint8)
    frames[2:4, 16:32, 48:64] = 255                       # block row 1, column 3, time step 1
    out = synthetic.patchify_video(frames, patch_size=8, temporal_patch_size=2, merge_size=2, image_size=64)
    assert out["video_grid_thw"].tolist() == [[2, 8, 8]]
    patches = out["pixel_values_videos"]
    assert patches.shape == (2 * 8 * 8, 3 * 2 * 8 * 8)
    lit = (patches.max(-1).values > 1.0).nonzero().flatten().tolist()
    group = 64 + (1 * 4 + 3) * 4                          # t=1, merged row 1, merged column 3
    assert lit == list(range(group, group + 4))


def test_load_video_formats(tmp_path, data):
    clip = np.load(os.path.join(data["root"], "videos", "0.npy"))
    assert R.load_video(os.path.join(data["root"], "videos", "0.npy"), 8).shape == (8, 64, 64, 3)
    os.makedirs(tmp_path / "frames")
    for t in range(5):
        np.save(tmp_path / "frames" / f"{t:03d}.npy", clip[t])
    folder = R.load_video(str(tmp_path / "frames"), 8)      # shorter clip: frames repeat
    assert folder.shape == (8, 64, 64, 3) and np.array_equal(folder[-1], clip[4])
    with pytest.raises(ValueError, match="unknown video format"):
        R.load_video(str(tmp_path / "clip.gif"), 8)
    np.save(tmp_path / "bad.npy", np.zeros((4, 64, 64), np.uint8))
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        R.load_video(str(tmp_path / "bad.npy"), 8)
    try:
        import av  # noqa: F401
    except ImportError:
        (tmp_path / "clip.mp4").write_bytes(b"")
        with pytest.raises(ImportError, match="PyAV"):
            R.load_video(str(tmp_path / "clip.mp4"), 8)


# ---------------------------------------------------------------------------------------------
# The forward pass: the video is encoded once per chain, and that changes nothing numerically
# ---------------------------------------------------------------------------------------------

class VisionCounter:
    """Counts vision-encoder calls and the videos they encode (rows of grid_thw)."""

    def __init__(self, model):
        self.calls = self.videos = 0
        visual = next(m for n, m in model.named_modules() if n.endswith("model.visual"))
        visual.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls += 1
        self.videos += len(kwargs.get("grid_thw", args[1] if len(args) > 1 else None))


@pytest.mark.parametrize("vision, passes", [("frozen", 1), ("lora", 2)])
def test_video_encoded_once_per_chain(data, vision, passes):
    model, processor, args = fresh_model(vision)
    args.objective = "rank"
    counter = VisionCounter(model)
    chains, _ = R.load_chains(data["two"], processor, "rank")
    batch, index = R.collate(chains, processor, 8, 2048)
    assert index.shape == (2, 4)
    loss, _ = R.chain_loss_step(model, batch, index, args, vision_trainable=vision != "frozen")
    loss.backward()
    # 2 chains x 4 captions: 2 encodings per pass (reference + policy when the tower trains;
    # a frozen tower is encoded once for both), never 8
    assert (counter.calls, counter.videos) == (passes, 2 * passes)
    if vision == "lora":          # the gradients of all 4 captions reach the one encoding
        grads = [p.grad for n, p in model.named_parameters() if "visual" in n and p.requires_grad]
        assert grads and all(g is not None for g in grads)


def test_shared_video_embeddings_equal_per_caption_encoding(data):
    """Scattering one encoding into K sequences == the model encoding the video K times."""
    model, processor, _ = fresh_model("lora")
    perturb_adapters(model)
    frames = R.load_video(os.path.join(data["root"], "videos", "1.npy"), 8)
    chain = data["chains"][1]["chain"]
    shared = R.response_logps(model, processor, frames, ["Describe this video in detail."] * 4, chain)
    vid = R.video_inputs(processor, frames)
    rows = [(*R.encode_text(processor, "Describe this video in detail.", c, True), 0) for c in chain]
    batch = R.make_batch(processor, rows, [vid], 2048)
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    pixel_values_videos=vid["pixel_values_videos"].repeat(4, 1),
                    video_grid_thw=vid["video_grid_thw"].repeat(4, 1),
                    mm_token_type_ids=(batch.input_ids == processor.video_token_id).int() * 2)
    naive, _ = R.kernels.sequence_logps(out.logits[:, :-1], batch.labels)
    torch.testing.assert_close(shared, naive, rtol=1e-5, atol=1e-4)


def test_dpo_equals_textbook_formula(data):
    """The trainer's dpo loss == -log sigmoid(beta * ((pc - rc) - (pr - rr))) + ntp_weight * NTP,
    with every log-prob recomputed independently, one response at a time."""
    model, processor, args = fresh_model("lora")
    perturb_adapters(model)
    args.objective, args.beta, args.ntp_weight = "dpo", 0.5, 0.1
    chains, _ = R.load_chains(data["two"], processor, "dpo")
    batch, index = R.collate(chains, processor, 8, 2048)
    with torch.no_grad():
        loss, _ = R.chain_loss_step(model, batch, index, args, vision_trainable=True)
    expected = []
    for record in data["chains"][:2]:
        frames = R.load_video(os.path.join(data["root"], record["video"]), 8)
        logp = lambda text: R.response_logps(model, processor, frames, [record["prompt"]], [text])[0]
        chosen, rejected = record["chain"][:2]
        pc, pr = logp(chosen), logp(rejected)
        with model.disable_adapter():
            rc, rr = logp(chosen), logp(rejected)
        n_tokens = len(R.encode_text(processor, record["prompt"], chosen, True)[1])
        expected.append(-F.logsigmoid(args.beta * ((pc - rc) - (pr - rr))) + 0.1 * (-pc / n_tokens))
    torch.testing.assert_close(loss, torch.stack(expected).mean(), rtol=1e-5, atol=1e-5)


def test_summed_ntp_adds_the_summed_nll_of_the_best_caption(data):
    """--ntp_norm sum == the preference loss alone + ntp_weight * (-logp(y_0)) summed over its
    tokens, in value and in gradient (the term is added outside the fused op)."""
    def loss_and_grads(norm, weight):
        model, processor, args = fresh_model("lora")
        perturb_adapters(model)
        args.objective, args.ntp_weight, args.ntp_norm = "rank", weight, norm
        chains, _ = R.load_chains(data["two"], processor, "rank")
        batch, index = R.collate(chains, processor, 8, 2048)
        loss, _ = R.chain_loss_step(model, batch, index, args, vision_trainable=True)
        if norm == "none":   # the summed NLL of every chain's y_0, from a separate forward pass
            logits, labels = R.forward_logits(model, batch)
            logps, _ = R.kernels.sequence_logps(logits, labels, backend="reference")
            loss = loss + 0.5 * (-logps[index[:, 0]]).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]
    summed, g_summed = loss_and_grads("sum", 0.5)
    by_hand, g_hand = loss_and_grads("none", 0.0)
    torch.testing.assert_close(summed, by_hand, rtol=1e-5, atol=1e-4)
    for a, b in zip(g_summed, g_hand):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    mean, _ = loss_and_grads("mean", 0.5)
    assert abs(float(summed - mean)) > 1.0   # the two norms really differ (y_0 has many tokens)


@pytest.mark.parametrize("objective, norm", [("rank", "mean"), ("rank", "sum"), ("dpo", "mean"),
                                             ("mpo", "sum"), ("hinge", "mean"), ("sft", "mean")])
def test_logged_preference_loss_is_the_loss_without_its_ntp_term(data, objective, norm):
    """stats[-1] (metrics.jsonl's pref_loss) == the same step's loss at ntp_weight 0; sft has none."""
    def step(weight):
        model, processor, args = fresh_model("lora")
        perturb_adapters(model)
        args.objective, args.ntp_weight, args.ntp_norm = objective, weight, norm
        chains, _ = R.load_chains(data["two"], processor, objective)
        batch, index = R.collate(chains, processor, 8, 2048)
        with torch.no_grad():
            return R.chain_loss_step(model, batch, index, args, vision_trainable=True)
    loss, stats = step(0.5)
    alone, _ = step(0.0)
    expected = 0.0 if objective == "sft" else float(alone)
    assert float(stats[-1]) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    if objective != "sft":
        assert float(loss) - float(stats[-1]) > 0.01   # the NTP term was really there


# ---------------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("objective", ["rank", "dpo", "mpo", "hinge", "sft"])
def test_each_objective_lowers_its_loss(data, tmp_path, objective):
    # the whole data set is one batch, so every step sees the same chains
    rows = run(data, tmp_path, "--lr_schedule", "constant", objective=objective, steps=5)
    losses = [r["loss"] for r in rows]
    assert losses[-1] < losses[0], losses
    assert all(np.isfinite(list(r.values())).all() for r in rows)


def test_yes_no_and_chain_records_train_together(data, tmp_path):
    rows = run(data, tmp_path, "--max_chain", "3", "--grad_accum", "2", path="mixed", steps=3)
    assert len(rows) == 3 and rows[0]["rank_acc"] >= 0
    assert set(rows[0]) >= {"loss", "ntp", "margin", "rank_acc", "tokens_per_s", "peak_mem_mb"}
    assert read_metrics(tmp_path) == rows
    model, processor = synthetic.build_tiny()
    chains, left_out = R.load_chains(data["mixed"], processor, "rank", max_chain=3)
    assert [len(c.rows) for c in chains] == [3, 3, 3, 3, 2, 2] and left_out == 0
    assert chains[-1].field == "prompts" and chains[-1].rows[0][1] == chains[-1].rows[1][1]


@pytest.mark.parametrize("vision", ["frozen", "lora", "full"])
def test_vision_choice(data, tmp_path, vision):
    # gradients: frozen -> none on any vision parameter; lora/full -> on the trainable ones
    model, processor, args = fresh_model(vision)
    chains, _ = R.load_chains(data["two"], processor, "rank")
    batch, index = R.collate(chains, processor, 8, 2048)
    loss, _ = R.chain_loss_step(model, batch, index, args, vision_trainable=vision != "frozen")
    loss.backward()
    vision_params = [(n, p) for n, p in model.named_parameters() if ".visual." in n]
    if vision == "frozen":
        assert all(p.grad is None and not p.requires_grad for _, p in vision_params)
    else:
        trained = [p for _, p in vision_params if p.requires_grad]
        assert trained and all(p.grad is not None for p in trained)
        assert sum(p.grad.abs().sum() for p in trained) > 0
    # weights after a short run, through the saved adapter
    run(data, tmp_path, "--vision", vision, steps=2)
    before, _ = R.load_model("tiny")
    after, _ = R.load_model("tiny", adapter=str(tmp_path))
    same = [torch.equal(a, b) for (n, a), b in zip(before.model.visual.state_dict().items(),
                                                    after.model.visual.state_dict().values())]
    assert all(same) if vision == "frozen" else not all(same)
    lm_same = [torch.equal(a, b) for a, b in zip(before.model.language_model.state_dict().values(),
                                                  after.model.language_model.state_dict().values())]
    assert not all(lm_same)                               # the language model trains in every mode


def test_modules_to_save_auto_trains_the_tiny_output_layer(data, tmp_path):
    """LoRA alone cannot teach a random model (its frozen random lm_head caps confidence), so
    'auto' trains the tiny preset's lm_head and final norm in full; 'none' leaves them."""
    run(data, tmp_path / "auto", steps=1)
    run(data, tmp_path / "none", "--modules_to_save", "none", steps=1)
    base, _ = R.load_model("tiny")
    auto, _ = R.load_model("tiny", adapter=str(tmp_path / "auto"))
    none, _ = R.load_model("tiny", adapter=str(tmp_path / "none"))
    assert not torch.equal(auto.lm_head.weight, base.lm_head.weight)
    assert not torch.equal(auto.model.language_model.norm.weight, base.model.language_model.norm.weight)
    assert torch.equal(none.lm_head.weight, base.lm_head.weight)
    with pytest.raises(SystemExit, match="no module named nope"):
        run(data, tmp_path / "bad", "--modules_to_save", "lm_head,nope", steps=1)


def test_full_vision_reference_is_the_original_tower(data):
    model, processor, args = fresh_model("full")
    perturb_adapters(model)
    frames = R.load_video(os.path.join(data["root"], "videos", "0.npy"), 8)
    base, _ = synthetic.build_tiny()
    with torch.no_grad(), model.disable_adapter():
        ref = R.response_logps(model, processor, frames, ["Describe."], ["A red square."])
    expected = R.response_logps(base, processor, frames, ["Describe."], ["A red square."])
    torch.testing.assert_close(ref, expected)


def test_resume_reproduces_the_next_steps(data, tmp_path):
    full = tmp_path / "full"
    run(data, full, "--save_every", "2", "--batch_size", "1", path="mixed", steps=4, batch=1)
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step-000004")          # as if killed after step 3
    rows = run(data, part, "--save_every", "2", "--resume", path="mixed", steps=4, batch=1)
    assert [r["step"] for r in rows] == [3, 4]
    assert [r["loss"] for r in rows] == [r["loss"] for r in read_metrics(full)[2:]]
    assert [r["step"] for r in read_metrics(part)] == [1, 2, 3, 4]
    with pytest.raises(SystemExit, match="already has checkpoints"):
        run(data, part, path="mixed", steps=4, batch=1)


def test_validation_scores_held_out_chains_and_keeps_the_best_adapter(data, tmp_path):
    """--val_data: every --val_every steps, validation.jsonl gets the held-out chains' numbers,
    equal to an independent recomputation from the checkpoint; OUT/best is the best point's."""
    val = write_jsonl(os.path.join(data["root"], "val.jsonl"), data["chains"][2:])
    out = tmp_path / "run"
    run(data, out, "--val_data", val, "--val_every", "2", "--keep_checkpoints", "3", steps=6)
    rows = R.load_jsonl(out / "validation.jsonl")
    assert [r["step"] for r in rows] == [2, 4, 6] and rows[0]["best"]
    reference, processor = R.load_model("tiny")
    for r in rows:
        policy, _ = R.load_model(str(out / "base"), adapter=str(out / "checkpoints" / f"step-{r['step']:06d}"))
        logp, ref = [], []
        for record in data["chains"][2:]:
            frames = R.load_video(os.path.join(data["root"], record["video"]), 8)
            prompts = [record["prompt"]] * len(record["chain"])
            logp.append(R.response_logps(policy, processor, frames, prompts, record["chain"]))
            ref.append(R.response_logps(reference, processor, frames, prompts, record["chain"]))
        logp, ref = torch.stack(logp).double(), torch.stack(ref).double()
        mask = torch.ones_like(logp, dtype=torch.bool)
        from kernels.reference import rank_loss
        assert r["pref_loss"] == pytest.approx(rank_loss(0.1 * (logp - ref), mask).mean().item(), rel=1e-4)
        assert r["loss"] == r["pref_loss"]                    # --select_by loss: rank's own term
        assert r["logp_c0"] == pytest.approx(logp[:, 0].mean().item(), rel=1e-5)
        assert r["nll"] == -r["logp_c0"]
        assert r["logp_cK"] == pytest.approx(logp[:, -1].mean().item(), rel=1e-5)
        right = [(row[i] > row[j]).item() for row in logp for i in range(4) for j in range(i + 1, 4)]
        assert r["logp_acc"] == pytest.approx(np.mean(right))
    best = [r for r in rows if r["best"]][-1]
    assert best["loss"] == min(r["loss"] for r in rows)
    w = "model.language_model.layers.0.self_attn.q_proj.weight"
    from_best, _ = R.load_model(str(out / "base"), adapter=str(out / "best"))
    from_ckpt, _ = R.load_model(str(out / "base"), adapter=str(out / "checkpoints" / f"step-{best['step']:06d}"))
    torch.testing.assert_close(from_best.state_dict()[w], from_ckpt.state_dict()[w], rtol=0, atol=0)


def test_patience_stops_training_and_a_resume_stays_stopped(data, tmp_path):
    out = tmp_path / "run"
    # no later point can be 1000% better: the second validation is stale, training stops there
    args = ("--val_data", data["two"], "--val_every", "1", "--patience", "1", "--min_gain", "10")
    rows = run(data, out, *args, steps=10)
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["best"] for r in R.load_jsonl(out / "validation.jsonl")] == [True, False]
    assert os.path.isdir(out / "best") and os.path.isfile(out / "adapter_model.safetensors")
    assert run(data, out, "--resume", *args, steps=10) == []          # nothing more to train
    assert [r["step"] for r in R.load_jsonl(out / "validation.jsonl")] == [1, 2]
    with pytest.raises(SystemExit):
        R.parse_args(["--data", "x", "--output_dir", "y", "--patience", "2"])   # needs --val_data


def test_warm_start_is_the_reference(data, tmp_path):
    run(data, tmp_path / "sft", objective="sft", steps=2)
    rows = run(data, tmp_path / "rank", "--init", tmp_path / "sft", steps=2)
    assert rows[0]["margin"] == 0.0            # policy == reference (the merged warm start)
    sft, _ = R.load_model("tiny", adapter=str(tmp_path / "sft"))
    ranked, _ = R.load_model("tiny", adapter=str(tmp_path / "rank"))   # merges sft, then rank
    ckpt = os.path.join(tmp_path, "rank", "checkpoints", "step-000002")
    from_ckpt, _ = R.load_model(os.path.join(tmp_path, "rank", "base"), adapter=ckpt)
    w = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(sft.state_dict()[w], ranked.state_dict()[w])
    torch.testing.assert_close(ranked.state_dict()[w], from_ckpt.state_dict()[w])


def test_gradient_checkpointing_same_loss(data, tmp_path):
    plain = run(data, tmp_path / "a", steps=1)
    ckpt = run(data, tmp_path / "b", "--gradient_checkpointing", steps=1)
    assert ckpt[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-6)


def test_a_causal_lm_from_a_local_path_trains_on_text(tmp_path):
    """--model takes any Auto-loadable causal LM; its tokenizer then plays the processor."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=1024, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2)).save_pretrained(tmp_path / "lm")
    synthetic.build_tiny_tokenizer().save_pretrained(tmp_path / "lm")
    path = write_jsonl(tmp_path / "text.jsonl", [
        {"id": str(i), "prompt": "Describe the scene.", "chain": ["A red square.", "A blue circle."]}
        for i in range(2)])
    rows = R.train(R.parse_args(["--model", str(tmp_path / "lm"), "--data", path, "--output_dir",
                                 str(tmp_path / "out"), "--max_steps", "3", "--batch_size", "2",
                                 "--lr", "1e-2", "--vision", "full"]))
    assert rows[-1]["loss"] < rows[0]["loss"]
    model, tokenizer = R.load_model(str(tmp_path / "lm"), adapter=str(tmp_path / "out"))
    logps = R.response_logps(model, tokenizer, None, ["Describe the scene."] * 2,
                             ["A red square.", "A blue circle."])
    assert logps.shape == (2,) and bool((logps < 0).all())


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def run_process(cmd, timeout):
    """Run a command in its own process group; on timeout, kill the whole group (torchrun's
    workers included) so nothing is left running."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {stderr[-3000:]}")
    return proc.returncode, stdout, stderr


def test_torchrun_two_processes_match_one(data, tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", os.path.join(ROOT, "rank_dpo.py"),
           "--data", data["mixed"], "--output_dir", str(tmp_path / "ddp"), "--lr", "3e-3",
           "--max_steps", "2", "--batch_size", "1", "--save_every", "0",
           "--val_data", data["two"], "--val_every", "1"]
    returncode, _, stderr = run_process(cmd, timeout=300)
    assert returncode == 0, stderr[-3000:]
    ddp = read_metrics(tmp_path / "ddp")
    single = run(data, tmp_path / "one", "--val_data", data["two"], "--val_every", "1",
                 path="mixed", steps=2, batch=2)
    assert ddp[0]["loss"] == pytest.approx(single[0]["loss"], rel=1e-5)
    assert ddp[1]["loss"] == pytest.approx(single[1]["loss"], rel=1e-4)
    assert os.path.isfile(tmp_path / "ddp" / "checkpoints" / "step-000002" / "rng-1.pt")
    # validation: each rank scores its share of the chains, the sums are the single process's
    v_ddp, v_one = (R.load_jsonl(tmp_path / d / "validation.jsonl") for d in ("ddp", "one"))
    assert [r["step"] for r in v_ddp] == [r["step"] for r in v_one] == [1, 2]
    for a, b in zip(v_ddp, v_one):
        for key in ("pref_loss", "ntp", "logp_c0", "logp_cK", "logp_acc", "rank_acc"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "rank_dpo.py"), "--data", data["mixed"],
           "--output_dir", str(out), "--lr", "1e-3", "--max_steps", "100000", "--save_every", "0"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (os.path.exists(out / "metrics.jsonl") and os.path.getsize(out / "metrics.jsonl")):
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-2000:]
    assert "checkpoint saved" in stdout
    last = read_metrics(out)[-1]["step"]
    ckpt = R.latest_checkpoint(str(out))
    assert ckpt.endswith(f"step-{last:06d}")
    rows = run(data, out, "--resume", "--lr", "1e-3", path="mixed", steps=last + 1, batch=1)
    assert [r["step"] for r in rows] == [last + 1]


# ---------------------------------------------------------------------------------------------
# Reference log-probs computed once (--ref_logps cache)
# ---------------------------------------------------------------------------------------------

TIMINGS = ("tokens_per_s", "step_time_s", "peak_mem_mb", "ref_cached")


def count_reference_forwards(monkeypatch) -> list:
    """Replace rank_dpo.reference_logps by a wrapper that records each call's batch size."""
    calls, real = [], R.reference_logps

    def counted(model, batch, *args, **kwargs):
        calls.append(len(batch.input_ids))
        return real(model, batch, *args, **kwargs)

    monkeypatch.setattr(R, "reference_logps", counted)
    return calls


def cache_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("objective", R.REFERENCE_OBJECTIVES)
@pytest.mark.parametrize("flags", [("--vision", "frozen"), ("--vision", "lora"),
                                   ("--vision", "lora", "--shared_prefix", "off")])
def test_cached_reference_gives_the_recomputed_numbers(data, tmp_path, objective, flags):
    """Video chains and yes/no chains, 3 steps an epoch: epoch 1 computes and logs exactly what a
    recompute run logs; epoch 2 reads every reference log-prob back (ref_cached 1.0) and logs
    the same numbers up to float rounding (a caption's batch, hence its padding, changes).
    Packed with the fused head (the tiny model's auto) and one sequence per caption."""
    common = (*flags, "--lora_r", "4")
    cached = run(data, tmp_path / "cache", *common, objective=objective, steps=4, path="mixed")
    plain = run(data, tmp_path / "plain", *common, "--ref_logps", "recompute",
                objective=objective, steps=4, path="mixed")
    assert [r["ref_cached"] for r in cached] == [0.0, 0.0, 0.0, 1.0]
    assert all("ref_cached" not in r for r in plain)
    for a, b in zip(cached, plain):
        numbers = {k: v for k, v in a.items() if k not in TIMINGS}
        expected = {k: v for k, v in b.items() if k not in TIMINGS}
        if a["step"] <= 3:
            assert numbers == expected
        else:
            assert numbers == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_second_epoch_and_validation_run_no_reference_forward(data, tmp_path, monkeypatch):
    calls = count_reference_forwards(monkeypatch)
    out = tmp_path / "run"
    rows = run(data, out, "--val_data", data["two"], "--val_every", "3", path="mixed", steps=6)
    assert len(calls) == 3 and sum(calls) == 4 * 4 + 2 * 2    # epoch 1's micro-batches, no more
    assert [r["ref_cached"] for r in rows] == [0, 0, 0, 1, 1, 1]
    entries = cache_lines(out / R.REF_CACHE_FILE)   # the validation chains' captions are
    assert len(entries) == len({e["key"] for e in entries}) == 4 * 4 + 2 * 2    # training's
    calls.clear()
    plain = run(data, tmp_path / "plain", "--val_data", data["two"], "--val_every", "3",
                "--ref_logps", "recompute", path="mixed", steps=6)
    assert len(calls) == 6 + 2         # without the cache: every step and validation point
    for a, b in zip(R.load_jsonl(out / "validation.jsonl"), R.load_jsonl(tmp_path / "plain" / "validation.jsonl")):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-6)
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in plain], rel=1e-6)


def test_a_changed_key_recomputes_those_entries_and_only_those(data, tmp_path, monkeypatch):
    """One --ref_cache shared by runs: the same reference and data reuse every entry; a changed
    caption, --num_frames, --max_length or --init computes exactly the entries it changes."""
    cache = tmp_path / "shared.jsonl"
    edited = [dict(c) for c in data["chains"][:2]]
    edited[1]["chain"] = edited[1]["chain"][:2] + ["A grey square jumps."] + edited[1]["chain"][3:]
    sources = dict(data, edited=write_jsonl(os.path.join(data["root"], "edited.jsonl"), edited))
    calls = count_reference_forwards(monkeypatch)
    runs = iter(range(100))

    def train(*extra, path="two"):
        calls.clear()
        rows = run(sources, tmp_path / f"run{next(runs)}", "--ref_cache", cache, *extra,
                   steps=2, batch=1, path=path)
        return rows, len(calls), len(cache_lines(cache))

    first, n_calls, n_lines = train()
    assert (n_calls, n_lines) == (2, 8)
    again, n_calls, n_lines = train()                   # another run, same reference: all read
    assert (n_calls, n_lines) == (0, 8)
    assert [r["loss"] for r in again] == [r["loss"] for r in first]
    _, n_calls, n_lines = train(path="edited")          # one caption's entry, in one batch
    assert (n_calls, n_lines) == (1, 9)
    _, n_calls, n_lines = train("--num_frames", "4")     # every video row changes
    assert (n_calls, n_lines) == (2, 17)
    _, n_calls, n_lines = train("--max_length", "200")
    assert (n_calls, n_lines) == (2, 25)
    run(data, tmp_path / "sft", objective="sft", steps=1)
    _, n_calls, n_lines = train("--init", tmp_path / "sft")
    assert (n_calls, n_lines) == (2, 33)
    _, n_calls, _ = train("--init", tmp_path / "sft")
    assert n_calls == 0
    run(data, tmp_path / "sft2", objective="sft", steps=2)           # another warm start
    init_rows, n_calls, n_lines = train("--init", tmp_path / "sft2")
    assert (n_calls, n_lines) == (2, 41)
    calls.clear()
    plain = run(data, tmp_path / "plain", "--init", tmp_path / "sft2", "--ref_logps", "recompute",
                steps=2, batch=1, path="two")
    assert [r["loss"] for r in init_rows] == [r["loss"] for r in plain]


def test_a_garbled_cache_entry_is_computed_again(data, tmp_path, monkeypatch):
    """A cache line whose number was changed (valid JSON) fails its checksum: that batch runs
    the reference again and the run logs the numbers of an intact cache."""
    out = tmp_path / "run"
    first = run(data, out, steps=2, batch=1)
    path = out / R.REF_CACHE_FILE
    text = path.read_text().splitlines(keepends=True)
    entry = json.loads(text[5])
    text[5] = text[5].replace(json.dumps(entry["value"]), json.dumps(entry["value"] / 2))
    path.write_text("".join(text))
    calls = count_reference_forwards(monkeypatch)
    shutil.rmtree(out / "checkpoints")
    again = run(data, out, steps=2, batch=1)
    assert calls == [4]
    assert [r["loss"] for r in again] == [r["loss"] for r in first]


def test_kill_9_while_caching_then_resume_finishes_with_the_same_numbers(data, tmp_path):
    """SIGKILL at a random moment once the cache is being written, then the same command with
    --resume: the same numbers as an uninterrupted run, and a cache of whole, unique lines."""
    import random
    seed = random.randrange(10 ** 6)
    out = tmp_path / "run"
    argv = ["--data", data["mixed"], "--output_dir", str(out), "--lr", "3e-3", "--max_steps", "12",
            "--batch_size", "1", "--save_every", "2"]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "rank_dpo.py"), *argv], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    cache = out / R.REF_CACHE_FILE
    try:
        deadline = time.time() + 120
        while not (os.path.exists(cache) and os.path.getsize(cache)):
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.01)
        time.sleep(random.Random(seed).uniform(0, 1.5))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, f"seed {seed}: the run ended before the kill"
    R.train(R.parse_args(argv + ["--resume"]))
    whole = run(data, tmp_path / "whole", "--save_every", "2", path="mixed", steps=12, batch=1)
    resumed = read_metrics(out)
    assert [r["step"] for r in resumed] == list(range(1, 13)), f"seed {seed}"
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole], f"seed {seed}"
    assert path_is_whole_lines(cache), f"seed {seed}"
    entries = cache_lines(cache)
    assert len(entries) == len({e["key"] for e in entries}) == 4 * 4 + 2 * 2, f"seed {seed}"
    assert R.SharedCache(str(cache)).skipped == 0


def path_is_whole_lines(path) -> bool:
    with open(path, "rb") as f:
        text = f.read()
    return text.endswith(b"\n")


def test_torchrun_two_processes_share_one_reference_cache(data, tmp_path):
    """Each rank caches its own micro-batches' captions in the one file; in epoch 2 every rank
    reads the other's entries (no reference forward anywhere), and the numbers are one
    process's."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", os.path.join(ROOT, "rank_dpo.py"),
           "--data", data["mixed"], "--output_dir", str(tmp_path / "ddp"), "--lr", "3e-3",
           "--max_steps", "6", "--batch_size", "1", "--save_every", "0"]
    returncode, _, stderr = run_process(cmd, timeout=300)
    assert returncode == 0, stderr[-3000:]
    ddp = read_metrics(tmp_path / "ddp")
    assert [r["ref_cached"] for r in ddp] == [0, 0, 0, 1, 1, 1]
    # in epoch 2 some chain goes to the rank that did not compute it in epoch 1
    owner = lambda step, rank: {i for b in R.step_batches(6, step, 0, 1, 1, 2, rank) for i in b}
    assert any(owner(step, 0) & set().union(*(owner(s, 1) for s in range(3)))
               for step in range(3, 6))
    entries = cache_lines(tmp_path / "ddp" / R.REF_CACHE_FILE)
    assert len(entries) == len({e["key"] for e in entries}) == 4 * 4 + 2 * 2
    single = run(data, tmp_path / "one", path="mixed", steps=6, batch=2)
    assert len(cache_lines(tmp_path / "one" / R.REF_CACHE_FILE)) == len(entries)
    for a, b in zip(ddp, single):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["rank_acc"] == b["rank_acc"] and a["ref_cached"] == b["ref_cached"]


def test_ref_logps_cache_needs_an_objective_with_a_reference(data, tmp_path):
    with pytest.raises(SystemExit):
        R.parse_args(["--data", "x", "--output_dir", "y", "--objective", "sft",
                      "--ref_logps", "cache"])
    rows = run(data, tmp_path / "hinge", objective="hinge", steps=1)       # auto: no cache
    assert "ref_cached" not in rows[0] and not os.path.exists(tmp_path / "hinge" / R.REF_CACHE_FILE)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming file, line and field
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("line, objective, pattern", [
    ('{"id": "x", "prompt": "p", "chain": ["a", "b"]', "rank", r":1: malformed JSON"),
    ({"id": "x", "video": "videos/missing.npy", "prompt": "p", "chain": ["a", "b"]}, "rank",
     r":1: field 'video': video not found: .*missing\.npy"),
    ({"id": "x", "prompt": "p", "chain": ["only one"]}, "dpo",
     r":1: field 'chain': has 1 entry; the dpo objective needs at least 2"),
    ({"id": "x", "prompts": ["q?"], "response": "no"}, "rank",
     r":1: field 'prompts': has 1 entry"),
    ({"id": "x", "prompt": "word " * 600, "chain": ["a", "b"]}, "rank",
     r":1: field 'prompt': prompt is \d+ tokens, max_length is 512"),
    ({"id": "x", "video": "videos/0.npy", "prompt": "p " * 480, "chain": ["a", "b"]}, "rank",
     r":1: field 'prompt': prompt is \d+ tokens \(video included\)"),
    ({"id": "x", "prompt": "p", "chain": ["a", 3]}, "rank", r":1: field 'chain': expected a list"),
    ({"id": "x", "chain": ["a", "b"]}, "rank", r":1: field 'prompt': missing"),
    ({"id": "x", "caption": "a"}, "rank", r":1: field 'chain': a record needs"),
])
def test_bad_records_name_file_line_field(data, tmp_path, line, objective, pattern):
    path = write_jsonl(tmp_path / "bad.jsonl", [data["chains"][0], line][1:])
    argv = ["--data", path, "--video_root", data["root"], "--objective", objective, "--output_dir",
            str(tmp_path / "out"), "--max_length", "512", "--max_steps", "1", "--batch_size", "1"]
    with pytest.raises(DataError, match=pattern) as err:
        R.train(R.parse_args(argv))
    assert str(err.value).startswith(path)


def test_records_gen_chains_marked_failed_are_left_out_and_counted(data, tmp_path, capsys):
    failed = {"id": "f", "status": "failed", "reason": "step 2: every try rejected",
              "partial_chain": ["a"]}
    path = write_jsonl(tmp_path / "c.jsonl", [dict(data["chains"][0], status="ok"), failed])
    _, processor = synthetic.build_tiny()
    chains, left_out = R.load_chains(path, processor, "rank", video_root=data["root"])
    assert [c.id for c in chains] == ["c0"] and left_out == 1
    R.train(R.parse_args(["--data", path, "--video_root", data["root"], "--output_dir",
                          str(tmp_path / "out"), "--max_steps", "1"]))
    assert "1 chains; 1 records left out (status not 'ok')" in capsys.readouterr().out
    only_failed = write_jsonl(tmp_path / "f.jsonl", [failed])
    with pytest.raises(DataError, match=r"no usable records \(1 not ok\)"):
        R.load_chains(only_failed, processor, "rank")


def test_one_entry_chain_is_fine_for_sft(data, tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"id": "x", "prompt": "p", "chain": ["only one"]}])
    rows = R.train(R.parse_args(["--data", path, "--objective", "sft", "--output_dir",
                                 str(tmp_path / "out"), "--max_steps", "1"]))
    assert len(rows) == 1


def test_unknown_objective(data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        R.parse_args(["--data", data["two"], "--output_dir", str(tmp_path), "--objective", "ppo"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'ppo'" in capsys.readouterr().err


def test_nan_loss_stops_with_a_clear_error(data, tmp_path, monkeypatch):
    real_step = R.chain_loss_step

    def poisoned(*args, **kwargs):          # as if the model had diverged
        loss, stats = real_step(*args, **kwargs)
        return loss * float("nan"), stats

    monkeypatch.setattr(R, "chain_loss_step", poisoned)
    with pytest.raises(FloatingPointError, match=r"step 1: loss is nan on chains \['c"):
        run(data, tmp_path / "nan", steps=1)
    assert not os.path.exists(tmp_path / "nan" / "checkpoints")    # nothing saved from a NaN


def test_main_reports_data_errors_without_a_traceback(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ["not json"])
    returncode, _, stderr = run_process([sys.executable, os.path.join(ROOT, "rank_dpo.py"),
                                         "--data", path, "--output_dir", str(tmp_path / "out")], 120)
    assert returncode == 1
    assert f"data error: {path}:1: malformed JSON" in stderr
    assert "Traceback" not in stderr
