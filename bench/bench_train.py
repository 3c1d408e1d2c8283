#!/usr/bin/env python3
"""Training benchmark (make bench-train): rank_dpo.py on the embedded tiny model, on CPU.

1. tokens/s and peak memory per objective (video caption chains, K = 4);
2. the vision-once saving: one training step with each chain's video encoded once and shared
   by its K captions, against the stock way (every sequence carries its own copy of the video);
3. TRL's DPOTrainer against rank_dpo.py --objective dpo on the same model, LoRA and text pairs
   (TRL's DPOTrainer has no video input for this model). TRL is not a project dependency: it is
   installed here, pinned by constraints.txt so torch/transformers stay as tested.

Every training run is a separate process (peak memory is per process); ours and TRL's runs
alternate so that load from other work on the machine hits both alike. Results go to
bench/train.json and to the Training section of bench/RESULTS.md. Run alone (`--only
row_packing`): one chain per packed row against several (--pack_chains) on chains of mixed
lengths, into its own section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from records import load_jsonl, write_jsonl  # noqa: E402

import results_md  # noqa: E402        (bench/, this script's own folder)

TRAINING_SECTION = "## Training (`make bench-train`)"

COLOURS = ["red", "green", "blue", "yellow", "purple", "white"]
SHAPES = ["square", "circle", "triangle", "star"]


# ---------------------------------------------------------------------------------------------
# Data: synthetic clips with caption chains, and text preference pairs for the TRL comparison
# ---------------------------------------------------------------------------------------------

def caption(colour, shape, direction):
    return f"A {colour} {shape} moves from the {direction[0]} to the {direction[1]} of the frame."


def make_video_chains(root: str, n: int, k: int) -> str:
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "videos"), exist_ok=True)
    records = []
    for i in range(n):
        video = rng.integers(0, 40, (16, 64, 64, 3), dtype=np.uint8)
        np.save(os.path.join(root, "videos", f"{i}.npy"), video)
        colour, shape = COLOURS[i % 6], SHAPES[i % 4]
        chain = [caption(colour, shape, ("left", "right")),
                 caption(COLOURS[(i + 1) % 6], shape, ("left", "right")),
                 caption(COLOURS[(i + 1) % 6], SHAPES[(i + 1) % 4], ("left", "right")),
                 caption(COLOURS[(i + 1) % 6], SHAPES[(i + 1) % 4], ("right", "left"))]
        records.append({"id": f"v{i}", "video": f"videos/{i}.npy",
                        "prompt": "Describe this video in detail.", "chain": chain[:k]})
    path = os.path.join(root, "chains.jsonl")
    write_jsonl(path, records)
    return path


def make_pairs(root: str, n: int) -> str:
    os.makedirs(root, exist_ok=True)
    records = []
    for i in range(n):
        colour, shape = COLOURS[i % 6], SHAPES[i % 4]
        records.append({"id": f"p{i}", "prompt": f"Describe scene number {i} in detail.",
                        "chain": [caption(colour, shape, ("left", "right")) + " It stays there.",
                                  caption(COLOURS[(i + 3) % 6], shape, ("left", "right"))
                                  + " It stays there."]})
    path = os.path.join(root, "pairs.jsonl")
    write_jsonl(path, records)
    return path


# ---------------------------------------------------------------------------------------------
# Workers (each run in its own process): peak RSS sampled while training only
# ---------------------------------------------------------------------------------------------

class RssSampler:
    """Peak resident memory, sampled every 5 ms from /proc (CPU tensors have no allocator
    statistics). Both trainers call `mark()` as each step starts; the baseline is taken at the
    start of step 2, after the one-time costs both pay in step 1 (optimizer state, first
    allocations, loading the loss extension), so peak - baseline is the memory a training step
    needs on top of the model and data, and `peak` the whole process's high-water mark."""

    def __init__(self):
        self.baseline = self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def mark(self):
        self.marks = getattr(self, "marks", 0) + 1
        if self.marks == 2:                       # the start of step 2: one-time costs are paid
            self.baseline = self.peak = self.rss()

    @staticmethod
    def rss() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def train_argv(a) -> list[str]:
    """rank_dpo.py's flags for a worker's training run on the tiny model."""
    return ["--model", "tiny", "--data", a.data, "--objective", a.objective, "--output_dir", a.out,
            "--lr", "1e-4", "--max_steps", str(a.steps), "--batch_size", str(a.batch_size),
            "--save_every", "0", "--vision", a.vision, "--lora_r", "16", "--lora_alpha", "32",
            "--ntp_weight", str(a.ntp_weight), "--lr_schedule", "constant", "--num_frames", "8",
            "--modules_to_save", a.modules_to_save]


def worker_ours(a) -> dict:
    import torch
    import rank_dpo as R
    torch.set_num_threads(a.threads)
    args = R.parse_args(train_argv(a))
    real_step = R.chain_loss_step

    def marked_step(*args_, **kwargs):
        mem.mark()
        return real_step(*args_, **kwargs)

    R.chain_loss_step = marked_step
    with RssSampler() as mem:
        rows = R.train(args)
    return {"step_times": [r["step_time_s"] for r in rows],
            "tokens_per_s": [r["tokens_per_s"] for r in rows],
            "rss_baseline_mb": mem.baseline, "rss_peak_mb": mem.peak,
            "losses": [r["loss"] for r in rows]}


def worker_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer
    import rank_dpo as R
    import synthetic
    torch.set_num_threads(a.threads)
    model, processor = synthetic.build_tiny()
    records = load_jsonl(a.data)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "chosen": [{"role": "assistant", "content": r["chain"][0]}],
                               "rejected": [{"role": "assistant", "content": r["chain"][1]}]}
                              for r in records])
    targets = [n for n, m in model.named_modules()          # the same LoRA as rank_dpo.py
               if isinstance(m, torch.nn.Linear) and ".language_model." in n]
    config = DPOConfig(output_dir=a.out, per_device_train_batch_size=a.batch_size,
                       max_steps=a.steps, learning_rate=1e-4, lr_scheduler_type="constant",
                       beta=0.1, loss_type="sigmoid", logging_steps=1, save_strategy="no",
                       report_to="none", use_cpu=True, bf16=False, max_length=512,
                       gradient_checkpointing=False,        # TRL's default is on; ours is off
                       dataloader_num_workers=0, disable_tqdm=True, seed=0)

    class StepTimer(TrainerCallback):
        times, start = [], None

        def on_step_begin(self, *args, **kwargs):
            mem.mark()
            StepTimer.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            StepTimer.times.append(time.perf_counter() - StepTimer.start)

    mem = RssSampler()
    trainer = DPOTrainer(model=model, args=config, train_dataset=data,
                         processing_class=processor.tokenizer, callbacks=[StepTimer()],
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                target_modules=targets))
    with mem:
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"step_times": StepTimer.times, "rss_baseline_mb": mem.baseline,
            "rss_peak_mb": mem.peak, "losses": losses}


def worker_vision(a) -> dict:
    """One training step (reference + policy forward, backward) with the video encoded once per
    chain vs once per caption, vision tower trainable (LoRA), B = 2 chains."""
    import torch
    import rank_dpo as R
    import synthetic
    torch.set_num_threads(a.threads)
    stock_forward = R.forward_logits

    def per_caption_forward(model, batch, video_embeds=None):
        # the stock pipeline: each of the N sequences carries its own copy of its video
        rows = [v for v in batch.video_of_row if v >= 0]
        kwargs = {"pixel_values_videos": torch.cat([batch.videos[v]["pixel_values_videos"] for v in rows]),
                  "video_grid_thw": torch.cat([batch.videos[v]["video_grid_thw"] for v in rows]),
                  "mm_token_type_ids": (batch.input_ids == model.config.video_token_id).int() * 2}
        real = batch.labels != R.IGNORE_INDEX
        first = int(real.float().argmax(-1)[real.any(-1)].min())
        keep = torch.arange(first, batch.labels.shape[1])
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    use_cache=False, logits_to_keep=keep, **kwargs)
        return out.logits, batch.labels[:, first:]

    results = {}
    for k in (2, 4, 8):
        root = tempfile.mkdtemp()
        data = make_video_chains(root, 2, 4)
        recs = load_jsonl(data)
        for r in recs:                                      # K captions per chain
            r["chain"] = [r["chain"][i % 4] + (" again" * (i // 4)) for i in range(k)]
        write_jsonl(data, recs)
        model, processor = synthetic.build_tiny()
        args = R.parse_args(["--data", data, "--output_dir", root, "--vision", "lora"])
        model = R.add_adapters(model, args)
        counted = {"videos": 0}
        model.base_model.model.model.visual.register_forward_pre_hook(
            lambda m, args_, kw: counted.update(videos=counted["videos"] + len(kw["grid_thw"])),
            with_kwargs=True)
        chains, _ = R.load_chains(data, processor, "rank")
        batch, index = R.collate(chains, processor, 8, 2048)
        row = {}
        for name, forward in (("once_per_chain", stock_forward), ("once_per_caption", per_caption_forward)):
            R.forward_logits = forward
            times = []
            for i in range(a.repeats + 1):              # the first is a warm-up, not timed
                counted["videos"] = 0
                t0 = time.perf_counter()
                loss, _ = R.chain_loss_step(model, batch, index, args, vision_trainable=True)
                loss.backward()
                if i:
                    times.append(time.perf_counter() - t0)
                model.zero_grad(set_to_none=True)
            # the minimum: the machine is shared, and other work only ever adds time
            row[name] = {"step_s": min(times), "videos_encoded": counted["videos"]}
        R.forward_logits = stock_forward
        row["speedup"] = row["once_per_caption"]["step_s"] / row["once_per_chain"]["step_s"]
        results[f"K={k}"] = row
    return results


# The shared-prefix table: the tiny family sized up so the language model dominates the step.
SHARED_TEXT = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
                   num_attention_heads=8, num_key_value_heads=4,       # head dim 64:
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                    "mrope_section": [8, 12, 12]})     # halves sum to 32
SHARED_K = (2, 4, 5, 8)
SHARED_RATIOS = (1, 4, 16)


def saved_activation_mb(fn) -> float:
    """MiB of distinct tensors autograd saves for backward while `fn` runs (the activation
    memory of a step; CPU tensors have no allocator statistics to read a peak from)."""
    import torch
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()) / 2 ** 20, out


def tiny_lora_policy(text: dict):
    """(policy, processor, args): the tiny family with `text` as its LM, LoRA r=16 on the LM only
    (vision frozen, no modules in full), rank objective, in training mode."""
    import torch
    import rank_dpo as R
    import synthetic
    torch.manual_seed(0)
    model, processor = synthetic.build_tiny(text=text)
    args = R.parse_args(["--data", "x", "--output_dir", "x", "--objective", "rank",
                         "--vision", "frozen", "--lora_r", "16", "--modules_to_save", "none"])
    model = R.add_adapters(model, args)
    model.train()
    return model, processor, args


def worker_shared_prefix(a) -> dict:
    """One training step (rank objective: reference forward, policy forward and backward, LoRA
    r=16 on the LM) on one chain [prefix P | K captions of R tokens], packed (--shared_prefix
    on) vs one sequence per caption (off), interleaved, the fastest of `repeats` timed steps.
    The prefix is P ordinary tokens standing in for the prompt and video tokens: the LM costs
    the same per token, and the vision tower (encoded once per chain in both modes) is left
    out so the table isolates what sharing changes."""
    import numpy as np
    import torch
    import rank_dpo as R
    import synthetic
    torch.set_num_threads(a.threads)
    model, processor, args = tiny_lora_policy(SHARED_TEXT)
    rng = np.random.default_rng(0)
    low, high = len(synthetic.TINY_SPECIAL_TOKENS), len(processor.tokenizer)
    rows_out = []
    # the grid at R, then the K=5, P=4R target point again with 3x longer captions (a fixed
    # per-step cost weighs less there, as it does with the paper's ~200-token captions)
    shapes = [(k, ratio, a.caption_tokens) for k in SHARED_K for ratio in SHARED_RATIOS]
    for k, ratio, length in shapes + [(5, 4, 3 * a.caption_tokens)]:
        prefix = rng.integers(low, high, ratio * length).tolist()
        rows = [(prefix, rng.integers(low, high, length).tolist(), -1) for _ in range(k)]
        batch = R.make_batch(processor, rows, [], 10 ** 6)
        index = torch.arange(k).unsqueeze(0)

        def train_step(shared):
            loss, _ = R.chain_loss_step(model, batch, index, args, False, shared_prefix=shared)
            loss.backward()
            model.zero_grad(set_to_none=True)
            return loss

        row = {"K": k, "P/R": ratio, "R": length, "P": ratio * length,
               "caption_tokens": k * length}
        times = {False: [], True: []}
        for i in range(a.repeats + 1):            # the first round warms up, untimed
            for shared in (False, True):
                t0 = time.perf_counter()
                train_step(shared)
                if i:
                    times[shared].append(time.perf_counter() - t0)
        for shared, name in ((False, "unshared"), (True, "shared")):
            memory, _ = saved_activation_mb(lambda: train_step(shared))
            step = min(times[shared])    # shared machine: other work only ever adds time
            row[name] = {"step_s": step, "tokens_per_s": row["caption_tokens"] / step,
                         "activation_mb": memory}
        row["tokens_processed"] = {"unshared": int(batch.attention_mask.sum()),
                                   "shared": R.pack_model_chains(model, batch, index).tokens()}
        row["bound"] = row["tokens_processed"]["unshared"] / row["tokens_processed"]["shared"]
        row["speedup"] = row["shared"]["tokens_per_s"] / row["unshared"]["tokens_per_s"]
        row["of_bound"] = row["speedup"] / row["bound"]
        row["memory_ratio"] = row["shared"]["activation_mb"] / row["unshared"]["activation_mb"]
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows_out.append(row)
    return {"text_config": SHARED_TEXT, "caption_tokens": a.caption_tokens,
            "repeats": a.repeats, "rows": rows_out}


# The packed forward's attention routes at long packed lengths: a Qwen2-style causal LM (transformers
# lists no FlexAttention for Qwen2.5-VL), one chain [prefix P | K captions of R tokens] of packed
# length S = P + K(R + 1), FORWARD only (FlexAttention has no backward on CPU), no gradients.
ATTENTION_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
ATTENTION_K, ATTENTION_R = 5, 64
ATTENTION_LENGTHS = (2048, 8192)
ATTENTION_TRAIN_LENGTH = 2048       # training steps (no flex: no backward on CPU)
ATTENTION_MODES = {            # mode: (attention backend, packed, packed route forced)
    "unshared": ("sdpa", False, None), "dense_mask": ("sdpa", True, None),
    "block_mask": ("flex_attention", True, None), "prefix_cache": ("sdpa", True, "prefix_cache")}


def peak_rss_kib(reset: bool = False) -> tuple[int, int]:
    """(resident KiB now, the peak since the last reset); reset=True restarts the peak here
    (Linux: /proc/self/clear_refs)."""
    if reset:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    with open("/proc/self/status") as f:
        status = f.read()
    field = lambda name: int(re.search(rf"^{name}:\s+(\d+)", status, re.M)[1])
    return field("VmRSS"), field("VmHWM")


def worker_attention(a) -> dict:
    """One mode at one packed length: the fastest of `repeats` forwards after an untimed one
    (it compiles FlexAttention), and the resident memory the last forward adds at its peak.
    Large blocks are mmap'd (MALLOC_MMAP_THRESHOLD_, set by the driver), so freed tensors leave
    the resident set and the peak is that forward's own. --attn_train 1: a training step instead
    (rank objective: reference forward, policy forward + backward, LoRA r=16 on the LM)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    import rank_dpo as R
    import synthetic
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    backend, packed, route = ATTENTION_MODES[a.attn_mode]
    if route is not None:
        R.packed_route = lambda model: route
    tokenizer = synthetic.build_tiny_tokenizer()
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), **ATTENTION_TEXT)).eval()
    R.set_attention_backend(model, backend)
    if a.attn_train:
        args = R.parse_args(["--data", "x", "--output_dir", "x", "--objective", "rank",
                             "--lora_r", "16", "--modules_to_save", "none"])
        model = R.add_adapters(model, args).train()
    rng = np.random.default_rng(0)
    low, high = len(synthetic.TINY_SPECIAL_TOKENS), len(tokenizer)
    # + 1: the last prompt token is repeated at the head of every caption segment
    prefix = rng.integers(low, high, a.packed_length - ATTENTION_K * (ATTENTION_R + 1) + 1).tolist()
    rows = [(prefix, rng.integers(low, high, ATTENTION_R).tolist(), -1) for _ in range(ATTENTION_K)]
    batch = R.make_batch(tokenizer, rows, [], 10 ** 6)
    index = torch.arange(ATTENTION_K).unsqueeze(0)

    def forward():
        if a.attn_train:
            loss, _ = R.chain_loss_step(model, batch, index, args, False, shared_prefix=packed)
            loss.backward()
            model.zero_grad(set_to_none=True)
            return loss
        with torch.no_grad():
            packing = R.pack_model_chains(model, batch, index) if packed else None
            logits, labels = R.chain_logits(model, batch, packing)
            return R.kernels.sequence_logps(logits, labels)[0]

    times = []
    for i in range(a.repeats + 1):
        before, _ = peak_rss_kib(reset=True)
        t0 = time.perf_counter()
        forward()
        if i:
            times.append(time.perf_counter() - t0)
        _, peak = peak_rss_kib()
    packing = R.pack_model_chains(model, batch, index)
    width = packing.segment.shape[1]
    mask_bytes = {"dense_mask": len(index) * width * width,        # boolean [C, 1, S, S]
                  "block_mask": sum(t.nbytes for t in R.packed_block_mask(packing).as_tuple()
                                    if isinstance(t, torch.Tensor))}.get(a.attn_mode, 0)
    step = min(times)            # shared machine: other work only ever adds time
    return {"mode": a.attn_mode, "backend": backend, "S": width, "train": bool(a.attn_train),
            "P": int((packing.segment == 0).sum()), "K": ATTENTION_K, "R": ATTENTION_R,
            "tokens_per_s": ATTENTION_K * ATTENTION_R / step, "seconds": step,
            "peak_mib": (peak - before) / 1024, "mask_mib": mask_bytes / 2 ** 20,
            "tokens_processed": packing.tokens() if packed else int(batch.attention_mask.sum())}


def run_attention(a) -> dict:
    import torch
    import transformers
    print(f"attention routes: forward at packed lengths {ATTENTION_LENGTHS}, K = {ATTENTION_K}, "
          f"R = {ATTENTION_R}, modes {tuple(ATTENTION_MODES)}", flush=True)
    load = os.getloadavg()[0]
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"       # inherited by the workers
    rows = []
    for length in ATTENTION_LENGTHS:
        for mode in ATTENTION_MODES:                     # one process each: compile and peak apart
            rows.append(spawn("attention", attn_mode=mode, packed_length=length,
                              repeats=a.shared_repeats, threads=a.threads))
            print(f"  {json.dumps(rows[-1])}", flush=True)
    for mode in ATTENTION_MODES:
        if ATTENTION_MODES[mode][0] != "flex_attention":
            rows.append(spawn("attention", attn_mode=mode, packed_length=ATTENTION_TRAIN_LENGTH,
                              repeats=a.shared_repeats, threads=a.threads, attn_train=1))
            print(f"  {json.dumps(rows[-1])}", flush=True)
    return {"rows": rows, "text_config": ATTENTION_TEXT, "repeats": a.shared_repeats,
            "machine": machine(load), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": a.threads}


ATTENTION_BLOCK = ("<!-- attention-routes table (bench_train.py) -->",
                   "<!-- end attention-routes table -->")
# Its own section: a full run rewrites the Training section, and this table is --only's alone.
ATTENTION_HEADING = ("## The packed forward's attention routes "
                     "(`python bench/bench_train.py --only attention`)")


def attention_markdown(r: dict) -> str:
    t = r["text_config"]
    lines = [ATTENTION_BLOCK[0],
             "**The packed forward's attention routes at long packed lengths** "
             "(`bench_train.py --only attention`; machine: "
             f"{r['machine']}; torch {r['torch']}, transformers {r['transformers']}, "
             f"{r['threads']} torch thread(s); no GPU). FORWARD only, no gradients (FlexAttention "
             "has no backward on CPU): one chain [prefix P | K = 5 captions of R = 64 tokens] of "
             "packed length S, a Qwen2 causal LM of hidden "
             f"{t['hidden_size']}, {t['num_hidden_layers']} layers, {t['num_attention_heads']} "
             f"heads ({t['num_key_value_heads']} KV). Modes: unshared (5 rows of P + R, sdpa, "
             "causal), dense mask (packed, sdpa with the boolean [1, 1, S, S] mask), block mask "
             "(packed, flex_attention with the BlockMask; its compile is in the untimed first "
             "call), prefix cache (flash attention's route, here under sdpa: the prefix once "
             "into a KV cache, the 5 captions over it). tokens/s = caption tokens scored per "
             f"second, the fastest of {r['repeats']} timed forwards; peak = resident memory the "
             "forward adds at its peak (large blocks mmap'd, so freed tensors leave); mask = "
             "the attention mask's own bytes.",
             "",
             "The training rows: one step (rank objective: reference forward, policy forward + "
             "backward, LoRA r=16 on the LM), no flex (no backward on CPU).",
             "",
             "| pass | S | P | mode | tokens/s | vs dense mask | peak (MiB) | mask (MiB) |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    dense = {(row["S"], row["train"]): row for row in r["rows"] if row["mode"] == "dense_mask"}
    for row in r["rows"]:
        ratio = row["tokens_per_s"] / dense[row["S"], row["train"]]["tokens_per_s"]
        lines.append(f"| {'training step' if row['train'] else 'forward'} | {row['S']} | "
                     f"{row['P']} | {row['mode'].replace('_', ' ')} | "
                     f"{row['tokens_per_s']:.0f} | {ratio:.2f}x | {row['peak_mib']:.0f} | "
                     f"{row['mask_mib']:.2f} |")
    lines.append(ATTENTION_BLOCK[1])
    return "\n".join(lines)


def worker_ref_cache(a) -> dict:
    """One training run with --ref_logps a.ref_logps (cache or recompute): per step its wall
    time, its CPU time (this process's, which other work on a shared machine does not inflate:
    the time between the starts of two steps, marked where each step asks for its batches),
    loss and the share of captions whose reference log-prob was read from the cache."""
    import torch
    import rank_dpo as R
    torch.set_num_threads(a.threads)
    starts, real_batches = [], R.step_batches

    def marked_batches(*args_, **kwargs):
        starts.append(time.process_time())
        return real_batches(*args_, **kwargs)

    R.step_batches = marked_batches
    rows = R.train(R.parse_args(train_argv(a) + ["--ref_logps", a.ref_logps]))
    starts.append(time.process_time())
    return {"step_times": [r["step_time_s"] for r in rows],
            "step_cpu_times": [b - s for s, b in zip(starts, starts[1:])],
            "losses": [r["loss"] for r in rows],
            "ref_cached": [r.get("ref_cached", 0.0) for r in rows]}


# The row-packing table: micro-batches of chains of mixed lengths, one chain per packed row
# against several. A prefix of ordinary tokens stands in for the prompt + video; caption chains
# have K captions of mixed lengths; yes/no chains (as in the data format) have two questions
# after the shared prefix and a one-token answer. One LM layer of the shared-prefix table's
# width: per token, layers cost alike, and one keeps the run within minutes on a busy CPU.
ROW_TEXT = dict(SHARED_TEXT, num_hidden_layers=1)
ROW_PACKING = {
    "captions": dict(chains=8, yesno=0, k=(4, 6), caption=(20, 400), prefix=(64, 256),
                     budgets=(3000,)),
    "captions+yes/no": dict(chains=8, yesno=4, k=(4, 6), caption=(20, 400), prefix=(64, 256),
                            budgets=(3000,)),
    "quick": dict(chains=8, yesno=2, k=(4, 6), caption=(10, 100), prefix=(16, 64),
                  budgets=(1000,)),
}


def mixed_chain_batches(processor, rng, n_batches: int, shape: dict):
    """(batch, index) micro-batches of `chains` chains, the first `yesno` of them yes/no chains;
    K, caption and prefix tokens drawn uniformly from their (low, high) ranges."""
    import torch
    import rank_dpo as R
    import synthetic
    low, high = len(synthetic.TINY_SPECIAL_TOKENS), len(processor.tokenizer)
    draw = lambda bounds: int(rng.integers(bounds[0], bounds[1] + 1))
    tokens = lambda n: rng.integers(low, high, n).tolist()
    out = []
    for _ in range(n_batches):
        rows, index = [], []
        for c in range(shape["chains"]):
            prefix = tokens(draw(shape["prefix"]))
            if c < shape["yesno"]:
                chain = [(prefix + tokens(draw((8, 20))), tokens(1), -1) for _ in range(2)]
            else:
                chain = [(prefix, tokens(draw(shape["caption"])), -1)
                         for _ in range(draw(shape["k"]))]
            index.append(list(range(len(rows), len(rows) + len(chain)))
                         + [-1] * (shape["k"][1] - len(chain)))
            rows += chain
        out.append((R.make_batch(processor, rows, [], 10 ** 6), torch.tensor(index)))
    return out


def worker_row_packing(a) -> dict:
    """Training steps (rank objective, packed forward, LoRA r=16 on the LM, vision frozen) over
    micro-batches of chains of mixed lengths: each chain its own packed row (--pack_chains off)
    against several chains per row (auto, and the shape's explicit budgets), interleaved step by
    step; per mode the sum over batches of each batch's fastest of `repeats` timed steps, after
    a warm-up pass. The real tokens are the same work in every mode; padded tokens = rows x row
    width (what the LM runs); attention cells = rows x width^2 (what a dense [S, S] mask costs)."""
    import numpy as np
    import torch
    import rank_dpo as R
    torch.set_num_threads(a.threads)
    model, processor, args = tiny_lora_policy(ROW_TEXT)
    out = {}
    for name in a.row_shapes.split(","):
        shape = ROW_PACKING[name]
        batches = mixed_chain_batches(processor, np.random.default_rng(0), a.batches, shape)
        modes = ["off", "auto", *shape["budgets"]]
        times = {(m, b): [] for m in modes for b in range(len(batches))}
        for i in range(a.repeats + 1):             # the first pass warms up, untimed
            for b, (batch, index) in enumerate(batches):
                for mode in modes:
                    args.pack_chains = mode
                    t0 = time.perf_counter()
                    loss, _ = R.chain_loss_step(model, batch, index, args, False,
                                                shared_prefix=True)
                    loss.backward()
                    model.zero_grad(set_to_none=True)
                    if i:
                        times[mode, b].append(time.perf_counter() - t0)
        # per batch the fastest step: the machine is shared, other work only ever adds time
        seconds_of = {m: sum(min(times[m, b]) for b in range(len(batches))) for m in modes}
        rows = {}
        for mode in modes:
            packings = [R.pack_model_chains(model, b, index, mode) for b, index in batches]
            seconds = seconds_of[mode]
            rows[str(mode)] = {
                "seconds": seconds,
                "tokens_per_s": sum(p.tokens() for p in packings) / seconds,
                "rows": sum(len(p.segment) for p in packings),
                "real_tokens": sum(p.tokens() for p in packings),
                "padded_tokens": sum(p.segment.numel() for p in packings),
                "attention_cells": sum(len(p.segment) * p.segment.shape[1] ** 2
                                       for p in packings)}
            rows[str(mode)]["speedup"] = seconds_of["off"] / seconds
            print(json.dumps({name: {str(mode): rows[str(mode)]}}), file=sys.stderr, flush=True)
        out[name] = {"shape": {k: v for k, v in shape.items()}, "modes": rows}
    return {"text_config": ROW_TEXT, "batches": a.batches, "repeats": a.repeats, "shapes": out}


def run_row_packing(a) -> dict:
    import torch
    import transformers
    print(f"row packing: one chain per row vs several ({a.row_shapes}; {a.batches} batch(es), "
          f"{a.row_repeats} timed pass(es))", flush=True)
    load = os.getloadavg()[0]
    result = spawn("row_packing", threads=a.threads, repeats=a.row_repeats, batches=a.batches,
                   row_shapes=a.row_shapes)
    result.update(machine=machine(load), torch=torch.__version__,
                  transformers=transformers.__version__, threads=a.threads,
                  shared_machine=load >= 0.5)    # the load before the run is other jobs' work
    return result


ROW_BLOCK = ("<!-- row-packing table (bench_train.py --only row_packing) -->",
             "<!-- end row-packing table -->")
ROW_HEADING = "## Several chains per packed row (`python bench/bench_train.py --only row_packing`)"


def shape_words(shape: dict) -> str:
    """A row-packing batch shape in words, for the table."""
    span = lambda key: f"{shape[key][0]}-{shape[key][1]}"
    captions = shape["chains"] - shape["yesno"]
    words = f"{captions} caption chains (K {span('k')}, captions {span('caption')} tokens)"
    if shape["yesno"]:
        words += f" + {shape['yesno']} yes/no chains"
    return f"{words}, prefix {span('prefix')} tokens"


def row_packing_markdown(r: dict) -> str:
    t = r["text_config"]
    lines = [ROW_BLOCK[0],
             f"`--pack_chains off` (one chain per packed row) against `auto` (rows no longer "
             f"than the batch's longest chain) and an explicit budget. Machine: {r['machine']}"
             + (" (shared with other jobs)" if r.get("shared_machine") else "") + "; "
             f"torch {r['torch']}, {r['threads']} torch thread(s); no GPU was lent to this task. "
             "Training steps (rank objective: reference forward, policy forward + backward, LoRA "
             f"r=16 on the LM, vision frozen, sdpa) on the tiny family with hidden "
             f"{t['hidden_size']}, {t['num_hidden_layers']} layer(s), MLP "
             f"{t['intermediate_size']}, {t['num_attention_heads']} heads; {r['batches']} "
             "micro-batch(es) per shape. Each chain starts with a prefix of ordinary tokens "
             "standing in for prompt + video; caption chains have K captions; yes/no chains "
             "two 8-20-token questions after the prefix and a one-token answer. tokens/s = "
             f"real tokens per second (the same work in every mode), each batch's fastest of "
             f"{r['repeats']} interleaved timed steps per mode after a warm-up (modes whose "
             "rows and padded tokens equal `off`'s run the same work: their ratio is the "
             "noise). Padded tokens = rows x row width (what the LM runs); attention cells = "
             "rows x width^2 (what the dense mask makes attention compute).",
             "",
             "| chains per batch | --pack_chains | rows | real tokens | padded tokens | fill | "
             "attention cells (M) | tokens/s | vs off |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, shape in r["shapes"].items():
        for mode, m in shape["modes"].items():
            lines.append(f"| {shape_words(shape['shape'])} | `{mode}` | {m['rows']} | "
                         f"{m['real_tokens']} | {m['padded_tokens']} | "
                         f"{m['real_tokens'] / m['padded_tokens']:.2f} | "
                         f"{m['attention_cells'] / 1e6:.1f} | {m['tokens_per_s']:.0f} | "
                         f"**{m['speedup']:.2f}x** |")
    lines.append(ROW_BLOCK[1])
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------

def spawn(kind: str, **kw) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind]
    for key, value in kw.items():
        cmd += [f"--{key}", str(value)]
    env = dict(os.environ, PYTHONPATH=ROOT, TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"worker {kind} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ensure_trl() -> str:
    try:
        import trl
    except ImportError:
        print("installing TRL for the comparison (pinned by constraints.txt) ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "trl", "-c",
                        os.path.join(ROOT, "constraints.txt")], check=True)
        import trl
    return trl.__version__


def machine(load_before: float | None = None) -> str:
    """lscpu's model name (with family/model: a VM may show only the brand), the cores, and the
    1-minute load average before and after the run (other work on the machine slows it)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        field = lambda name: (re.search(rf"^{name}:\s*(.+)$", out, re.M) or [None, "?"])[1].strip()
        model = f"{field('Model name')} (family {field('CPU family')}, model {field('Model')})"
        if field("Hypervisor vendor") != "?":
            model += f", {field('Hypervisor vendor')} VM"
    except (OSError, IndexError):
        model = platform.processor() or "unknown CPU"
    load = f"load average {load_before:.2f} before the run, " if load_before is not None else ""
    return f"{model}, {os.cpu_count()} CPU cores visible, {load}{os.getloadavg()[0]:.2f} after it"


def summarise(run: dict, tokens_per_step: float | None = None, skip: int = 1) -> dict:
    times = run["step_times"][skip:]
    step = statistics.median(times)
    out = {"median_step_s": step, "peak_rss_mb": run["rss_peak_mb"],
           "train_rss_mb": run["rss_peak_mb"] - run["rss_baseline_mb"]}
    if tokens_per_step is not None:
        out["tokens_per_s"] = tokens_per_step / step
    elif "tokens_per_s" in run:
        out["tokens_per_s"] = statistics.median(run["tokens_per_s"][skip:])
    return out


def pair_tokens(path: str) -> float:
    """Real tokens of one (prompt + chosen) and one (prompt + rejected) sequence, on average."""
    import rank_dpo as R
    import synthetic
    _, processor = synthetic.build_tiny()
    total, n = 0, 0
    for r in load_jsonl(path):
        for response in r["chain"][:2]:
            p, q = R.encode_text(processor, r["prompt"], response, False)
            total += len(p) + len(q)
        n += 1
    return total / n


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", choices=("ours", "trl", "vision", "shared_prefix", "attention",
                                        "ref_cache", "row_packing"))
    p.add_argument("--only", choices=("shared_prefix", "attention", "ref_cache", "row_packing"),
                   help="run just this table (bench/train_<table>.json) and rewrite its "
                   "block of RESULTS.md, leaving the other training figures as they are")
    p.add_argument("--attn_mode", choices=tuple(ATTENTION_MODES), help="attention worker: the mode")
    p.add_argument("--packed_length", type=int, help="attention worker: S")
    p.add_argument("--attn_train", type=int, default=0, help="attention worker: 1 = a training step")
    p.add_argument("--shared_repeats", type=int, default=3,
                   help="timed steps per mode and shape in the shared-prefix table")
    p.add_argument("--caption_tokens", type=int, default=32,
                   help="R, tokens per caption in the shared-prefix table (P = ratio x R)")
    p.add_argument("--ref_logps", default="auto", help="worker ref_cache: cache or recompute")
    p.add_argument("--batches", type=int, default=1,
                   help="micro-batches of mixed-length chains per shape in the row-packing table")
    p.add_argument("--row_repeats", type=int, default=2,
                   help="timed steps per batch and mode in the row-packing table (after a "
                   "warm-up pass; each batch counts its fastest)")
    p.add_argument("--row_shapes", default="captions,captions+yes/no",
                   help=f"comma-separated row-packing batch shapes, of {', '.join(ROW_PACKING)} "
                   "(quick: shorter chains, a smoke run of a minute or two)")
    p.add_argument("--data")
    p.add_argument("--out")
    p.add_argument("--objective", default="dpo")
    p.add_argument("--vision", default="lora")
    p.add_argument("--ntp_weight", type=float, default=0.1)
    p.add_argument("--modules_to_save", default="auto")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per run: 1 keeps timings stable on a shared machine")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3, help="interleaved repeats of every run")
    p.add_argument("--json", default=os.path.join(HERE, "train.json"))
    p.add_argument("--results_md", default=os.path.join(HERE, "RESULTS.md"))
    p.add_argument("--render", action="store_true", help="only rewrite RESULTS.md from --json")
    a = p.parse_args()
    if a.render:
        with open(a.json) as f:
            write_section(a.results_md, markdown(json.load(f)))
        return
    if a.worker:
        print(json.dumps({"ours": worker_ours, "trl": worker_trl, "vision": worker_vision,
                          "shared_prefix": worker_shared_prefix,
                          "attention": worker_attention, "ref_cache": worker_ref_cache,
                          "row_packing": worker_row_packing}[a.worker](a)))
        return
    # --only NAME: that table alone -> bench/train_NAME.json and its block of RESULTS.md:
    # (run, markdown, the block's markers, a section heading of its own or None)
    tables = {"shared_prefix": (run_shared_prefix, shared_prefix_markdown, SHARED_BLOCK, None),
              "attention": (run_attention, attention_markdown, ATTENTION_BLOCK, ATTENTION_HEADING),
              "ref_cache": (run_ref_cache, ref_cache_markdown, REF_CACHE_BLOCK, None),
              "row_packing": (run_row_packing, row_packing_markdown, ROW_BLOCK, ROW_HEADING)}
    if a.only:
        run, render, markers, heading = tables[a.only]
        report = run(a)
        with open(os.path.join(HERE, f"train_{a.only}.json"), "w") as f:
            json.dump(report, f, indent=1)
        md = render(report)
        print(md)
        write_block(a.results_md, md, markers, heading)
        return

    load = os.getloadavg()[0]
    trl_version = ensure_trl()
    import torch
    import transformers
    work = tempfile.mkdtemp(prefix="bench_train_")
    chains = make_video_chains(os.path.join(work, "video"), 16, 4)
    pairs = make_pairs(os.path.join(work, "text"), 32)
    report = {"machine": machine(load), "torch": torch.__version__,
              "transformers": transformers.__version__, "trl": trl_version,
              "threads": a.threads, "steps": a.steps, "rounds": a.rounds, "gpu": "none in this task: the ~1B-parameter GPU run was not measured"}

    print("1/3 objectives on video chains (tiny model, K=4, batch 2 chains, vision LoRA)", flush=True)
    objectives = ("rank", "dpo", "mpo", "hinge", "sft")
    runs = {o: [] for o in objectives}
    for r in range(a.rounds):                  # rounds interleave, so load hits all alike
        for objective in objectives:
            run = spawn("ours", data=chains, out=os.path.join(work, f"run-{objective}-{r}"),
                        objective=objective, steps=a.steps, batch_size=2, threads=a.threads)
            runs[objective].append(summarise(run))
            print(f"  {objective}: {runs[objective][-1]}", flush=True)
    report["objectives"] = {o: min(rs, key=lambda x: x["median_step_s"]) for o, rs in runs.items()}

    print("2/3 video encoded once per chain vs once per caption", flush=True)
    report["vision_once"] = spawn("vision", threads=a.threads, repeats=a.repeats)
    print(f"  {report['vision_once']}", flush=True)

    print(f"3/3 TRL {trl_version} DPOTrainer vs rank_dpo.py --objective dpo (32 text pairs, "
          "batch 4, LoRA r=16 on the language model)", flush=True)
    tokens = 4 * pair_tokens(pairs)
    ours_runs, trl_runs = [], []
    for r in range(a.rounds):
        ours_runs.append(summarise(spawn("ours", data=pairs, out=os.path.join(work, f"ours-{r}"),
                                         objective="dpo", vision="frozen", ntp_weight=0.0,
                                         modules_to_save="none",     # LoRA only, as TRL's
                                         steps=a.steps, batch_size=4, threads=a.threads), tokens))
        trl_runs.append(summarise(spawn("trl", data=pairs, out=os.path.join(work, f"trl-{r}"),
                                        steps=a.steps, batch_size=4, threads=a.threads), tokens))
        print(f"  round {r + 1}: ours {ours_runs[-1]}\n           trl  {trl_runs[-1]}", flush=True)

    def best(runs, key, fn):
        return fn(x[key] for x in runs)

    ours = {"tokens_per_s": best(ours_runs, "tokens_per_s", max),
            "train_rss_mb": best(ours_runs, "train_rss_mb", min),
            "peak_rss_mb": best(ours_runs, "peak_rss_mb", min)}
    theirs = {"tokens_per_s": best(trl_runs, "tokens_per_s", max),
              "train_rss_mb": best(trl_runs, "train_rss_mb", min),
              "peak_rss_mb": best(trl_runs, "peak_rss_mb", min)}
    report["vs_trl"] = {"tokens_per_step": tokens, "rounds": a.rounds, "ours": ours, "trl": theirs,
                        "ours_runs": ours_runs, "trl_runs": trl_runs,
                        "speed_ratio": ours["tokens_per_s"] / theirs["tokens_per_s"],
                        "train_memory_ratio": ours["train_rss_mb"] / max(theirs["train_rss_mb"], 1e-9),
                        "peak_memory_ratio": ours["peak_rss_mb"] / theirs["peak_rss_mb"]}
    report["shared_prefix"] = run_shared_prefix(a)
    report["ref_cache"] = run_ref_cache(a)
    with open(a.json, "w") as f:
        json.dump(report, f, indent=1)
    md = markdown(report)
    print(md)
    write_section(a.results_md, md)


def markdown(r: dict) -> str:
    lines = [f"Machine: {r['machine']}; torch {r['torch']}, transformers {r['transformers']}, "
             f"{r['threads']} torch thread(s) per run. GPU: {r['gpu']}. Raw numbers: `bench/train.json`.",
             "", "**Per objective** (tiny Qwen2.5-VL, 8-frame 64x64 clips, chains of K = 4 "
             "captions, 2 chains per step, LoRA on the LM and the vision tower, lm_head and final "
             "norm trained in full (`--modules_to_save auto`); median step "
             f"time over steps 2..{r['steps']}, the best of {r['rounds']} interleaved runs):", "",
             "| objective | tokens/s | step (ms) | peak RSS (MiB) | step working memory (MiB) |",
             "|---|---:|---:|---:|---:|"]
    for name, o in r["objectives"].items():
        lines.append(f"| {name} | {o['tokens_per_s']:.0f} | {1000 * o['median_step_s']:.0f} | "
                     f"{o['peak_rss_mb']:.0f} | {o['train_rss_mb']:.0f} |")
    lines += ["", "**Video encoded once per chain vs once per caption** (one training step: "
              "reference + policy forward and backward, 2 chains, vision tower trainable (LoRA), so "
              "it is encoded for the reference and for the policy; the fastest of 5 timed "
              "repeats):", "",
              "| K captions | videos encoded (once / per caption) | step ms (once) | "
              "step ms (per caption) | speed-up |", "|---|---|---:|---:|---:|"]
    for k, v in r["vision_once"].items():
        lines.append(f"| {k[2:]} | {v['once_per_chain']['videos_encoded']} / "
                     f"{v['once_per_caption']['videos_encoded']} | "
                     f"{1000 * v['once_per_chain']['step_s']:.0f} | "
                     f"{1000 * v['once_per_caption']['step_s']:.0f} | {v['speedup']:.2f}x |")
    t = r["vs_trl"]
    lines += ["", f"**Against TRL {r['trl']} DPOTrainer** (the same tiny model, the same 32 text "
              "pairs, batch 4, LoRA r=16 on the language model's linear layers, beta 0.1, no NTP "
              "term, gradient checkpointing off in both (TRL's default is on); best of "
              f"{t['rounds']} alternating runs; TRL's DPOTrainer takes no video for this model, so "
              "the pairs are text). Peak RSS is the whole process, TRL's imports (datasets, "
              "pandas, pyarrow) included; the step working memory is the RSS growth during steps "
              "2..N:", "",
              "| trainer | tokens/s | peak RSS (MiB) | step working memory (MiB) |",
              "|---|---:|---:|---:|",
              f"| rank_dpo.py --objective dpo | {t['ours']['tokens_per_s']:.0f} | "
              f"{t['ours']['peak_rss_mb']:.0f} | {t['ours']['train_rss_mb']:.0f} |",
              f"| TRL DPOTrainer | {t['trl']['tokens_per_s']:.0f} | {t['trl']['peak_rss_mb']:.0f} | "
              f"{t['trl']['train_rss_mb']:.0f} |", "",
              f"Speed ratio (ours / TRL): **{t['speed_ratio']:.2f}x**; memory ratio (ours / TRL): "
              f"{t['peak_memory_ratio']:.2f}x of peak RSS, {t['train_memory_ratio']:.2f}x of the "
              "step working memory."]
    if "shared_prefix" in r:
        lines += ["", shared_prefix_markdown(r["shared_prefix"])]
    if "ref_cache" in r:
        lines += ["", ref_cache_markdown(r["ref_cache"])]
    return "\n".join(lines)


def run_shared_prefix(a) -> dict:
    import torch
    import transformers
    print(f"4/4 shared prefix vs one sequence per caption (K {SHARED_K}, P/R {SHARED_RATIOS}, "
          f"R = {a.caption_tokens}, hidden {SHARED_TEXT['hidden_size']})", flush=True)
    load = os.getloadavg()[0]
    result = spawn("shared_prefix", threads=a.threads, repeats=a.shared_repeats,
                   caption_tokens=a.caption_tokens)
    result.update(machine=machine(load), torch=torch.__version__,
                  transformers=transformers.__version__, threads=a.threads)
    return result


SHARED_BLOCK = ("<!-- shared-prefix table (bench_train.py) -->",
                "<!-- end shared-prefix table -->")


def shared_prefix_markdown(r: dict) -> str:
    t = r["text_config"]
    lines = [SHARED_BLOCK[0],
             "**Shared prefix vs one sequence per caption** (`--shared_prefix on` / `off`; "
             f"machine: {r['machine']}; torch {r['torch']}, {r['threads']} torch thread(s); no GPU "
             "was lent to this task, so no GPU figures). One training step (rank objective: "
             "reference forward, policy forward + backward, LoRA r=16 on the LM, vision frozen) "
             "on one chain [prefix P | K captions of R = "
             f"{r['caption_tokens']} tokens; the last row R = {3 * r['caption_tokens']}], on the "
             "tiny Qwen2.5-VL sized up to hidden "
             f"{t['hidden_size']}, {t['num_hidden_layers']} layers, MLP {t['intermediate_size']}, "
             f"{t['num_attention_heads']} heads. The prefix is P ordinary tokens standing in for "
             "prompt + video tokens (the LM costs the same per token; the vision tower is encoded "
             "once per chain in both modes and left out). tokens/s = caption tokens trained per "
             f"second (the same work in both modes); the fastest of {r['repeats']} interleaved "
             "timed steps after a warm-up. Memory: the activations autograd saves for backward "
             "(CPU tensors have no allocator peak). Bound = tokens processed unshared / shared "
             "(K(P+R) against P + K(R+1): each caption segment repeats the last prompt token).",
             "",
             "| K | P/R | R | tokens/s unshared | tokens/s shared | speed-up | bound | of bound | "
             "activations unshared (MiB) | shared (MiB) | memory ratio |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        lines.append(f"| {row['K']} | {row['P/R']} | {row['R']} | "
                     f"{row['unshared']['tokens_per_s']:.0f} | "
                     f"{row['shared']['tokens_per_s']:.0f} | **{row['speedup']:.2f}x** | "
                     f"{row['bound']:.2f}x | {100 * row['of_bound']:.0f}% | "
                     f"{row['unshared']['activation_mb']:.0f} | {row['shared']['activation_mb']:.0f} "
                     f"| {row['memory_ratio']:.2f} |")
    lines.append(SHARED_BLOCK[1])
    return "\n".join(lines)


REF_CACHE_BLOCK = ("<!-- reference-cache table (bench_train.py) -->",
                   "<!-- end reference-cache table -->")
REF_CACHE_VISIONS = ("frozen", "lora")


def run_ref_cache(a) -> dict:
    """--ref_logps cache vs recompute, the rank objective on video chains, per --vision: each
    pair of runs side by side in every round (interleaved, so load from other work hits both);
    the step time is the median over the steps after the first epoch (the cache is warm)."""
    import statistics as stats
    import torch
    import transformers
    chains_per_epoch, batch, epochs = 16, 2, 2
    steps = epochs * chains_per_epoch // batch
    print(f"reference log-probs cached vs recomputed (rank, {chains_per_epoch} video chains, "
          f"K = 4, batch 2, {steps} steps; vision {' / '.join(REF_CACHE_VISIONS)})", flush=True)
    load = os.getloadavg()[0]
    work = tempfile.mkdtemp(prefix="bench_ref_cache_")
    data = make_video_chains(os.path.join(work, "video"), chains_per_epoch, 4)
    runs = {(v, m): [] for v in REF_CACHE_VISIONS for m in ("cache", "recompute")}
    for r in range(a.rounds):
        for (vision, mode), done in runs.items():
            done.append(spawn("ref_cache", data=data, out=os.path.join(work, f"{vision}-{mode}-{r}"),
                              objective="rank", vision=vision, ref_logps=mode, steps=steps,
                              batch_size=batch, threads=a.threads))
            print(f"  round {r + 1} {vision} {mode}: {sum(done[-1]['step_times']):.1f} s", flush=True)
    rows = []
    for vision in REF_CACHE_VISIONS:
        cache, plain = runs[(vision, "cache")], runs[(vision, "recompute")]
        warm = [i for i, hit in enumerate(cache[0]["ref_cached"]) if hit == 1.0]
        step, cpu = ({name: min(stats.median(run[key][i] for i in warm) for run in rs)
                      for name, rs in (("cache", cache), ("recompute", plain))}
                     for key in ("step_times", "step_cpu_times"))
        first_epoch = [i for i in range(steps) if i not in warm]
        diffs = [abs(x - y) / abs(y) for c, p in zip(cache, plain)
                 for x, y in zip(c["losses"], p["losses"])]
        rows.append({"vision": vision, "warm_steps": len(warm), "step_s": step, "cpu_s": cpu,
                     "speedup": step["recompute"] / step["cache"],
                     "cpu_speedup": cpu["recompute"] / cpu["cache"],
                     "first_epoch_equal": all(c["losses"][i] == p["losses"][i] for c, p in
                                              zip(cache, plain) for i in first_epoch),
                     "max_rel_loss_diff": max(diffs)})
    return {"machine": machine(load), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": a.threads, "rounds": a.rounds,
            "chains": chains_per_epoch, "batch": batch, "steps": steps, "rows": rows}


def ref_cache_markdown(r: dict) -> str:
    lines = [REF_CACHE_BLOCK[0],
             "**Reference log-probs cached vs recomputed** (`--ref_logps cache` / `recompute`; "
             f"machine: {r['machine']}; torch {r['torch']}, {r['threads']} torch thread(s); no GPU "
             "was lent to this task, so no GPU figures). rank objective on the tiny Qwen2.5-VL, "
             f"{r['chains']} chains of K = 4 captions on 8-frame 64x64 clips, {r['batch']} chains "
             "per step, "
             f"{r['steps']} steps (two epochs), LoRA r=16 on the LM, lm_head and final norm in "
             "full. Step time: the whole training step (collate with video decode, forwards, "
             "backward, optimizer): wall time as rank_dpo.py logs it, and the process's CPU time, "
             "which other work on this shared machine does not inflate; median over the second "
             "epoch's steps, where every reference log-prob is read from the cache; the best of "
             f"{r['rounds']} interleaved rounds. Losses: first epoch (computed in both) compared "
             "exactly; largest relative difference over all steps (the second epoch's cached "
             "numbers came from another batch composition).",
             "",
             "| vision | CPU ms recompute | CPU ms cache | speed-up (CPU) | wall ms recompute | "
             "wall ms cache | speed-up (wall) | first-epoch losses | largest relative loss "
             "difference |", "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for row in r["rows"]:
        lines.append(f"| {row['vision']} | {1000 * row['cpu_s']['recompute']:.0f} | "
                     f"{1000 * row['cpu_s']['cache']:.0f} | **{row['cpu_speedup']:.2f}x** | "
                     f"{1000 * row['step_s']['recompute']:.0f} | "
                     f"{1000 * row['step_s']['cache']:.0f} | {row['speedup']:.2f}x | "
                     f"{'identical' if row['first_epoch_equal'] else 'differ'} | "
                     f"{row['max_rel_loss_diff']:.1e} |")
    lines.append(REF_CACHE_BLOCK[1])
    return "\n".join(lines)


def write_block(path: str, block: str, markers: tuple[str, str] = SHARED_BLOCK,
                heading: str | None = None) -> None:
    """results_md.write_block in the Training section (a `heading`: its own section after it)."""
    results_md.write_block(path, block, markers, TRAINING_SECTION, heading)


def write_section(path: str, body: str) -> None:
    """Replace the text under TRAINING_SECTION up to the next '## '."""
    with open(path) as f:
        text = f.read()
    start = text.index(TRAINING_SECTION) + len(TRAINING_SECTION)
    nxt = text.find("\n## ", start)
    end = len(text) if nxt < 0 else nxt
    with open(path, "w") as f:
        f.write(text[:start] + "\n\n" + body.strip() + "\n" + text[end:])


if __name__ == "__main__":
    main()
