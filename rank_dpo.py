#!/usr/bin/env python3
"""rank_dpo.py: learning to rank caption chains, in one script.

A caption chain c0 > c1 > ... > cK is a correct caption followed by copies with one, two, ...
errors. The trainer scores every caption of a chain under the policy and under the reference
model, turns the scores into implicit rewards r_i = beta * (log pi(c_i|x) - log ref(c_i|x)),
and minimises the Plackett-Luce loss of the whole ranking (or a baseline: dpo, mpo, hinge,
sft). The loss itself lives in kernels/ (kernels/reference.py is its readable spec).

    python rank_dpo.py --model tiny --data chains.jsonl --video_root data --objective rank \\
        --output_dir runs/rank
    torchrun --nproc_per_node 8 rank_dpo.py --model Qwen/Qwen2.5-VL-7B-Instruct ...

Reading order: (1) the embedded tiny model, (2) loading models and videos, (3) turning
prompts/responses/videos into token batches, (4) the forward pass that encodes each video
once per chain, (5) the data, (6) the training loop with DDP, checkpoints and resume.
Importing this file has no side effects; eval_judge.py reuses sections 2-4.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import inspect
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import kernels
from gen_chains import DataError, read_jsonl

IGNORE_INDEX = -100

# ================================================================================================
# 1. The embedded "tiny" preset: a Qwen2.5-VL-architecture model built from a config, with its
#    own small byte-level BPE tokenizer trained at build time. Nothing is downloaded; the same
#    seed gives the same weights and the same tokenizer every time (every DDP rank builds it).
# ================================================================================================

TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                       "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# The corpus the tiny tokenizer learns its merges from: the words of synthetic scene captions,
# prompts and questions, so they encode in few tokens. Byte-level BPE still encodes any text.
_TINY_WORDS = """
a an the this that these those there here it its is are was were be being been has have had
and or but not no yes of in on at to from into onto over under above below near next beside
between across along around through toward towards away behind front back while then after
before first second third last later finally again still also only both each every all some
red green blue yellow orange purple pink white black gray grey brown cyan magenta gold silver
dark light bright pale
circle circles square squares triangle triangles star stars ball balls box boxes ring rings
cross crosses diamond diamonds rectangle rectangles disk disks dot dots shape shapes object
objects block blocks line lines hexagon heart
small large big tiny huge medium little larger smaller bigger
left right top bottom center centre middle upper lower corner corners side edge edges frame
screen background foreground scene picture image video clip
moves moving move moved slides sliding slide bounces bouncing rotates rotating spins spinning
stays staying stay remains still stationary static grows growing shrinks shrinking fades fading
appears appearing disappears disappearing jumps falls rises drifts travels goes comes enters
leaves exits stops starts turns changes becomes flashes blinks follows chases passes
up down upward downward leftward rightward diagonally horizontally vertically slowly quickly
fast slow steadily smoothly
one two three four five six seven eight nine ten zero once twice
color colour colors colours position positions motion direction speed size count number
describe this video in detail what is the color of which where how many does do did move
question answer true false correct wrong option options choose best letter user assistant system
caption captions describe describes showing shows shown show depicts contains visible
A B C D E
"""
_TINY_SENTENCES = [
    "Describe this video in detail.",
    "Describe the video.",
    "A red circle moves from the left to the right while a blue square stays in the center.",
    "A small green triangle slides from the top left corner toward the bottom right corner.",
    "Two yellow stars bounce up and down on a black background.",
    "The large purple box grows and then shrinks in the middle of the frame.",
    "First a white ring appears at the top, then it moves down to the bottom.",
    "Is there a red circle in the video? Answer yes or no.",
    "Does the blue square move to the left? Answer yes or no.",
    "How many shapes are in the video?",
    "What color is the triangle?",
    "Which option best describes the video? Answer with the letter.",
    "A. a red circle\nB. a blue square\nC. a green triangle\nD. a yellow star\nE. a purple box",
    "yes", "no", "Yes.", "No.",
]


def tiny_corpus() -> list[str]:
    words = _TINY_WORDS.split()
    return _TINY_SENTENCES + [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)] + \
        [" " + w for w in words] + [w.capitalize() for w in words]


# Qwen's chat format (<|im_start|>role ... <|im_end|>) without the default system prompt,
# which would only make the tiny model's sequences longer.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Sized for CPU: ~1M parameters. Vision: 8x8 patches of 64x64 frames, merged 2x2 into 4x4 tokens
# per pair of frames (temporal patch 2), so an 8-frame clip is 64 video tokens that still carry
# colour (per-pixel RGB in the patch), position (2-D rotary positions) and motion (time).
TINY_VISION = dict(depth=2, hidden_size=64, intermediate_size=256, num_heads=4, patch_size=8,
                   spatial_merge_size=2, temporal_patch_size=2, window_size=64,
                   fullatt_block_indexes=[1], tokens_per_second=2)
TINY_TEXT = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                  "mrope_section": [4, 6, 6]})
TINY_IMAGE_SIZE = 64
TINY_VOCAB = 1024


class TinyProcessor:
    """The tiny preset's processor: its tokenizer (with the chat template) and the frame -> patch
    step of its vision tower.

    It stands in for Qwen2_5_VLProcessor because that processor's video half needs torchvision,
    which is not a dependency here. Hub models use their official processor (see
    `video_inputs`); the tiny model uses `patchify_video`, which lays patches out exactly as
    Qwen2-VL's video processor does (same flattening order, so the same vision tower code runs).
    """

    def __init__(self, tokenizer, patch_size: int, temporal_patch_size: int, merge_size: int,
                 image_size: int = TINY_IMAGE_SIZE):
        self.tokenizer = tokenizer
        self.patch_size, self.temporal_patch_size = patch_size, temporal_patch_size
        self.merge_size, self.image_size = merge_size, image_size
        self.video_token = "<|video_pad|>"
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        self.chat_template = tokenizer.chat_template

    def apply_chat_template(self, messages, **kwargs):
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def settings(self) -> dict:
        return dict(patch_size=self.patch_size, temporal_patch_size=self.temporal_patch_size,
                    merge_size=self.merge_size, image_size=self.image_size)

    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        with open(os.path.join(path, "tiny_processor.json"), "w") as f:
            json.dump(self.settings(), f, indent=1)

    @classmethod
    def from_pretrained(cls, path: str) -> "TinyProcessor":
        from transformers import AutoTokenizer
        with open(os.path.join(path, "tiny_processor.json")) as f:
            settings = json.load(f)
        return cls(AutoTokenizer.from_pretrained(path), **settings)


def build_tiny_tokenizer():
    """Byte-level BPE trained on the embedded corpus (deterministic: no randomness in training)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=TINY_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(tiny_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>",
                                        extra_special_tokens={"video_token": "<|video_pad|>"})
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_tiny(seed: int = 0):
    """The tiny Qwen2.5-VL: random weights from `seed`, its tokenizer and processor."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    tokenizer = build_tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in TINY_SPECIAL_TOKENS}
    vocab = 64 * math.ceil(len(tokenizer) / 64)
    config = Qwen2_5_VLConfig(
        text_config=dict(TINY_TEXT, vocab_size=vocab, bos_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(TINY_VISION, out_hidden_size=TINY_TEXT["hidden_size"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    with _seeded(seed):
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    processor = TinyProcessor(tokenizer, TINY_VISION["patch_size"],
                              TINY_VISION["temporal_patch_size"], TINY_VISION["spatial_merge_size"])
    return model, processor


@contextlib.contextmanager
def _seeded(seed: int):
    """Run a block under a fixed torch seed without disturbing the caller's RNG stream."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


# ================================================================================================
# 2. Loading: one model loader (the trainer and eval_judge.py both use it) and one video reader.
# ================================================================================================

RUN_META = "rank_dpo.json"      # written next to the adapter: base model, init chain, run args


def load_base(model: str, *, device="cpu", dtype=None):
    """(model, processor) for "tiny", a directory saved by rank_dpo.py, a local path or a hub name.

    A vision-language model (anything AutoModelForImageTextToText knows) comes with its
    AutoProcessor; any other causal LM with its tokenizer, which then plays the processor.
    """
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText,
                              AutoProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration)
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    if model == "tiny":
        net, processor = build_tiny()
    elif os.path.isfile(os.path.join(model, "tiny_processor.json")):
        net = Qwen2_5_VLForConditionalGeneration.from_pretrained(model, dtype=torch.float32)
        processor = TinyProcessor.from_pretrained(model)
    else:
        config = AutoConfig.from_pretrained(model)
        if type(config) in AutoModelForImageTextToText._model_mapping:
            net = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype)
            processor = AutoProcessor.from_pretrained(model)
        else:
            net = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
            processor = AutoTokenizer.from_pretrained(model)
    tok = tokenizer_of(processor)
    if tok.pad_token is None:            # causal LMs often ship without one; any id works (masked)
        tok.pad_token = tok.eos_token
    return net.to(device=device, dtype=dtype), processor


def load_model(model: str, adapter: str | None = None, *, device="cpu", dtype=None):
    """(model, processor) in eval mode, with a saved rank_dpo.py adapter merged in if given.

    An adapter trained from an --init warm start was trained on top of that start: its run
    directory keeps a copy of the init adapter under init/, which is merged first.
    """
    net, processor = load_base(model, device=device, dtype=dtype)
    if adapter is not None:
        net = merge_adapter(net, adapter)
    return net.eval(), processor


def merge_adapter(net, adapter: str):
    """Merge a saved adapter (and, first, the warm-start adapter it was trained on) into `net`."""
    from peft import PeftModel
    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise FileNotFoundError(f"{adapter}: not an adapter directory (no adapter_config.json)")
    init_dir = os.path.join(adapter, "init")
    if os.path.isdir(init_dir):
        net = merge_adapter(net, init_dir)
    return PeftModel.from_pretrained(net, adapter).merge_and_unload()


def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov")
FRAME_EXTENSIONS = (".npy", ".png", ".jpg", ".jpeg", ".bmp", ".webp")


def load_video(path: str, num_frames: int) -> np.ndarray:
    """`num_frames` frames sampled uniformly over the video: uint8 [num_frames, H, W, 3].

    Accepts a .npy array (uint8 [T, H, W, 3]), a folder of frames (.npy, or images via PIL)
    sorted by name, or a video file (.mp4/.webm/... via PyAV, an optional extra).
    A clip shorter than num_frames repeats frames.
    """
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(FRAME_EXTENSIONS))
        if not files:
            raise ValueError(f"{path}: folder holds no frames ({', '.join(FRAME_EXTENSIONS)})")
        picked = [files[i] for i in _uniform(len(files), num_frames)]
        video = np.stack([_read_frame(os.path.join(path, f)) for f in picked])
    elif path.endswith(".npy"):
        array = np.load(path, mmap_mode="r")
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"{path}: expected a [T, H, W, 3] array, got shape {list(array.shape)}")
        video = np.asarray(array[_uniform(array.shape[0], num_frames)])
    elif path.lower().endswith(VIDEO_EXTENSIONS):
        video = _decode_video(path, num_frames)
    else:
        raise ValueError(f"{path}: unknown video format (use .npy, a folder of frames, or "
                         f"{'/'.join(VIDEO_EXTENSIONS)})")
    if video.dtype != np.uint8:
        raise ValueError(f"{path}: expected uint8 pixels, got {video.dtype}")
    return video


def _uniform(total: int, n: int) -> list[int]:
    if total == 0:
        raise ValueError("video has no frames")
    return np.linspace(0, total - 1, n).round().astype(int).tolist()


def _read_frame(path: str) -> np.ndarray:
    if path.endswith(".npy"):
        frame = np.load(path)
    else:
        try:
            from PIL import Image
        except ImportError:
            raise ImportError(f"{path}: reading image frames needs Pillow (pip install pillow); "
                              "or store frames as .npy") from None
        frame = np.asarray(Image.open(path).convert("RGB"))
    if frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"{path}: expected an [H, W, 3] frame, got shape {list(frame.shape)}")
    return frame


def _decode_video(path: str, num_frames: int) -> np.ndarray:
    try:
        import av
    except ImportError:
        raise ImportError(f"{path}: decoding video files needs PyAV (pip install av); "
                          "or convert the video to .npy / a folder of frames") from None
    with av.open(path) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{path}: no video frames decoded")
    return np.stack([frames[i] for i in _uniform(len(frames), num_frames)])


# ================================================================================================
# 3. From text and frames to token batches. Every prompt goes through the processor's chat
#    template; the video placeholder is expanded to as many tokens as the vision tower outputs.
# ================================================================================================

def render_prompt(processor, prompt: str, has_video: bool) -> str:
    """The chat-formatted user turn plus the assistant header (the generation prompt)."""
    tok = tokenizer_of(processor)
    if getattr(processor, "chat_template", None) is None and tok.chat_template is None:
        return prompt + "\n"                      # a base LM without a chat format
    content = ([{"type": "video"}] if has_video else []) + [{"type": "text", "text": prompt}]
    if processor is tok:                            # text-only tokenizer templates want a string
        content = prompt
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_response(processor, prompt: str, response: str, has_video: bool) -> str:
    """The assistant turn as the template writes it (the text plus the end-of-turn token)."""
    head = render_prompt(processor, prompt, has_video)
    tok = tokenizer_of(processor)
    if getattr(processor, "chat_template", None) is None and tok.chat_template is None:
        return response + (tok.eos_token or "")
    content = ([{"type": "video"}] if has_video else []) + [{"type": "text", "text": prompt}]
    if processor is tok:
        content = prompt
    messages = [{"role": "user", "content": content},
                {"role": "assistant", "content": [{"type": "text", "text": response}]
                 if processor is not tok else response}]
    full = processor.apply_chat_template(messages, tokenize=False)
    if not full.startswith(head):
        raise ValueError("the chat template renders the prompt differently with a reply; "
                         "cannot split prompt from response")
    return full[len(head):].rstrip("\n")


def encode_text(processor, prompt: str, response: str | None, has_video: bool):
    """(prompt_ids, response_ids): the prompt keeps ONE video placeholder id (expanded later)."""
    tok = tokenizer_of(processor)
    prompt_ids = tok(render_prompt(processor, prompt, has_video), add_special_tokens=False).input_ids
    if response is None:
        return prompt_ids, []
    text = render_response(processor, prompt, response, has_video)
    return prompt_ids, tok(text, add_special_tokens=False).input_ids


def video_token_id(processor) -> int:
    return getattr(processor, "video_token_id", None) or \
        tokenizer_of(processor).convert_tokens_to_ids(processor.video_token)


def patchify_video(frames: np.ndarray, patch_size: int, temporal_patch_size: int, merge_size: int,
                   image_size: int) -> dict:
    """uint8 [T, H, W, 3] -> Qwen2-VL vision input: flat patches and the (t, h, w) patch grid.

    Frames are resized to image_size x image_size, scaled to [0, 1], normalised with CLIP's
    mean/std, and cut into temporal_patch_size x patch_size x patch_size patches ordered so
    that each merge_size x merge_size block of neighbours is contiguous (the patch merger
    concatenates them). The layout matches transformers' Qwen2VLVideoProcessor.patchify.
    """
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0
    if video.shape[-2:] != (image_size, image_size):
        video = F.interpolate(video, size=(image_size, image_size), mode="bilinear",
                              antialias=True, align_corners=False)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    video = (video - mean) / std
    if pad := -video.shape[0] % temporal_patch_size:          # repeat the last frame
        video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
    t, c = video.shape[0] // temporal_patch_size, video.shape[1]
    h = w = image_size // patch_size
    m, p = merge_size, patch_size
    patches = video.view(t, temporal_patch_size, c, h // m, m, p, w // m, m, p)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)     # t, bh, bw, mh, mw, c, tp, ph, pw
    patches = patches.reshape(t * h * w, c * temporal_patch_size * p * p)
    return {"pixel_values_videos": patches, "video_grid_thw": torch.tensor([[t, h, w]])}


def video_inputs(processor, frames: np.ndarray) -> dict:
    """Vision-tower inputs for one video: the official video processor where the processor has
    one (hub models), the tiny patchifier otherwise."""
    if isinstance(processor, TinyProcessor):
        return patchify_video(frames, **processor.settings())
    if getattr(processor, "video_processor", None) is None:
        raise ValueError("this model's processor has no video processor; use text-only records")
    out = processor.video_processor(videos=[frames], return_tensors="pt")
    return {k: v for k, v in out.items() if k in ("pixel_values_videos", "video_grid_thw")}


def video_token_count(processor, grid_thw: torch.Tensor) -> int:
    """How many placeholder tokens one video takes: its patch grid over merge x merge blocks."""
    merge = processor.merge_size if isinstance(processor, TinyProcessor) else \
        processor.video_processor.merge_size
    return int(grid_thw.prod()) // merge ** 2


@dataclass
class Batch:
    """N right-padded sequences (prompt + response) and the videos they share.

    videos: per distinct video, its vision-tower inputs; video_of_row[n]: which video row n
    shows (-1 for none). Rows of one chain point at the same video, so it is encoded once.
    """
    input_ids: torch.Tensor          # [N, T]
    attention_mask: torch.Tensor     # [N, T]
    labels: torch.Tensor             # [N, T-1] aligned with logits[:, :-1]; prompt/pad = -100
    videos: list[dict]
    video_of_row: list[int]

    def to(self, device):
        self.input_ids, self.attention_mask, self.labels = (
            t.to(device) for t in (self.input_ids, self.attention_mask, self.labels))
        self.videos = [{k: v.to(device) for k, v in vid.items()} for vid in self.videos]
        return self


def make_batch(processor, rows: list[tuple[list[int], list[int], int]], videos: list[dict],
               max_length: int) -> Batch:
    """rows: (prompt_ids with one video placeholder or none, response_ids, video index or -1).

    The placeholder becomes video_token_count copies; a response that would run past
    max_length is cut (the prompt never is: too long a prompt is an error, raised here too).
    """
    tok = tokenizer_of(processor)
    seqs, prompt_lens = [], []
    for prompt_ids, response_ids, vid in rows:
        if vid >= 0:
            vt = video_token_id(processor)
            at = prompt_ids.index(vt)
            n = video_token_count(processor, videos[vid]["video_grid_thw"][0])
            prompt_ids = prompt_ids[:at] + [vt] * n + prompt_ids[at + 1:]
        if len(prompt_ids) >= max_length:
            raise ValueError(f"prompt is {len(prompt_ids)} tokens (video included), "
                             f"max_length is {max_length}")
        seqs.append((prompt_ids + response_ids)[:max_length])
        prompt_lens.append(len(prompt_ids))
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    targets = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for n, (s, p) in enumerate(zip(seqs, prompt_lens)):
        input_ids[n, :len(s)] = torch.tensor(s)
        attention_mask[n, :len(s)] = 1
        targets[n, p:len(s)] = torch.tensor(s[p:], dtype=torch.long)
    return Batch(input_ids, attention_mask, targets[:, 1:].contiguous(), videos,
                 [vid for _, _, vid in rows])


# ================================================================================================
# 4. The forward pass. Each distinct video goes through the vision encoder ONCE (all videos of a
#    batch in one call); its embeddings are then placed into every sequence that shows it, via
#    the model's own `mm_encoder_outputs` input, so the model's own code scatters them into the
#    video-token slots and computes its rotary (mrope) positions. With a trainable vision tower,
#    the gradients of all K captions flow back into the one encoding.
# ================================================================================================

def encode_videos(model, videos: list[dict]) -> list[torch.Tensor]:
    """One vision-encoder call for all distinct videos -> one [tokens, hidden] tensor each."""
    pixels = torch.cat([v["pixel_values_videos"] for v in videos])
    grid = torch.cat([v["video_grid_thw"] for v in videos])
    out = model.get_video_features(pixels, grid, return_dict=True)
    return list(out.pooler_output)


def forward_logits(model, batch: Batch, video_embeds: list[torch.Tensor] | None = None):
    """Logits [N, T-1, V] aligned with batch.labels. `video_embeds` reuses encoded videos (the
    reference pass with a frozen vision tower); otherwise the videos are encoded here, once."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    kwargs = {}
    rows_with_video = [v for v in batch.video_of_row if v >= 0]
    if rows_with_video:
        if video_embeds is None:
            video_embeds = encode_videos(model, batch.videos)
        per_row = [video_embeds[v] for v in rows_with_video]       # shared, not re-encoded
        kwargs["mm_encoder_outputs"] = {"video": BaseModelOutputWithPooling(pooler_output=per_row)}
        kwargs["video_grid_thw"] = torch.cat([batch.videos[v]["video_grid_thw"]
                                              for v in rows_with_video])
        if _accepts(model, "mm_token_type_ids"):
            kwargs["mm_token_type_ids"] = (batch.input_ids == model.config.video_token_id).int() * 2
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                **kwargs)
    return out.logits[:, :-1]


def _accepts(model, name: str) -> bool:
    """Whether the underlying transformers model's forward takes `name` (through peft wrappers)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name in inspect.signature(base.forward).parameters


@torch.no_grad()
def response_logps(model, processor, video, prompts: list[str], responses: list[str],
                   max_length: int = 2048) -> torch.Tensor:
    """[K] fp32 sums of each response's token log-probs given its prompt and the shared video
    (encoded once for all K; None for text-only). No gradients: this is for evaluation."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    device = next(model.parameters()).device
    videos = [video_inputs(processor, video)] if video is not None else []
    vid = 0 if video is not None else -1
    rows = [(*encode_text(processor, p, r, video is not None), vid)
            for p, r in zip(prompts, responses)]
    batch = make_batch(processor, rows, videos, max_length).to(device)
    logits = forward_logits(model, batch)
    logps, _ = kernels.sequence_logps(logits, batch.labels)
    return logps.float()


def build_generation_inputs(processor, prompts: list[str],
                            videos: list[np.ndarray | None]) -> dict:
    """A left-padded batch of chat prompts (generation prompt appended), ready for
    model.generate(**inputs). Each video is encoded by generate itself (once per prompt)."""
    if len(prompts) != len(videos):
        raise ValueError(f"{len(prompts)} prompts but {len(videos)} videos")
    tok = tokenizer_of(processor)
    encoded = [video_inputs(processor, v) if v is not None else None for v in videos]
    seqs = []
    for prompt, enc in zip(prompts, encoded):
        ids, _ = encode_text(processor, prompt, None, enc is not None)
        if enc is not None:
            vt = video_token_id(processor)
            at = ids.index(vt)
            ids = ids[:at] + [vt] * video_token_count(processor, enc["video_grid_thw"][0]) + ids[at + 1:]
        seqs.append(ids)
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for n, s in enumerate(seqs):
        input_ids[n, width - len(s):] = torch.tensor(s)
        attention_mask[n, width - len(s):] = 1
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    present = [e for e in encoded if e is not None]
    if present:
        inputs["pixel_values_videos"] = torch.cat([e["pixel_values_videos"] for e in present])
        inputs["video_grid_thw"] = torch.cat([e["video_grid_thw"] for e in present])
        inputs["mm_token_type_ids"] = (input_ids == video_token_id(processor)).int() * 2
    return inputs
