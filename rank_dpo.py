#!/usr/bin/env python3
"""rank_dpo.py: learning to rank caption chains, in one script.

A caption chain c0 > c1 > ... > cK is a correct caption followed by copies with one, two, ...
errors. The trainer scores every caption of a chain under the policy and under the reference
model, turns the scores into implicit rewards r_i = beta * (log pi(c_i|x) - log ref(c_i|x)),
and minimises the Plackett-Luce loss of the whole ranking (or a baseline: dpo, mpo, hinge,
sft). The loss itself lives in kernels/ (kernels/reference.py is its readable spec).

    python rank_dpo.py --model tiny --data chains.jsonl --video_root data --objective rank \\
        --output_dir runs/rank
    python rank_dpo.py export --adapter runs/rank --out runs/rank/merged   # a hub-format model
    torchrun --nproc_per_node 8 rank_dpo.py --model Qwen/Qwen2.5-VL-7B-Instruct ...

Reading order: (1) loading models and videos, (2) turning prompts/responses/videos into token
batches, (3) the forward pass that encodes each video once per chain, (4) the data, (5) the
training loop with DDP, checkpoints and resume. `--model tiny` (the embedded ~1M-parameter
model, built from a config) lives in synthetic.py with the rest of the toy world; it comes in
through one hook, `embedded_preset`, and a real model never imports synthetic.py.
Importing this file has no side effects; eval_judge.py reuses sections 1-3.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import inspect
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

import kernels
from records import (DataError, RUN_META, SharedCache, load_jsonl, read_records, read_run_meta,
                     write_run_meta)

IGNORE_INDEX = -100

# ================================================================================================
# 1. Loading: one model loader (the trainer and eval_judge.py both use it) and one video reader.
# ================================================================================================

TINY_SAVED_MARKER = "tiny_processor.json"   # synthetic.TINY_PROCESSOR_FILE: a saved tiny model


def embedded_preset(model: str):
    """The one hook into the toy world: synthetic.TinyPreset for "tiny" or a directory a tiny
    model was saved to (a run's OUT/base, an export), else None, without importing synthetic.py.

    A preset has load() -> (model in fp32, processor), `built` (no directory holds it) and
    save_base(path) (writes the untrained model where load_model(path) finds it).
    """
    if model != "tiny" and not os.path.isfile(os.path.join(model, TINY_SAVED_MARKER)):
        return None
    import synthetic
    return synthetic.TinyPreset(model)


def load_base(model: str, *, device="cpu", dtype=None, attn_implementation: str | None = None):
    """(model, processor) for "tiny" (embedded_preset), a local path or a hub name.

    A vision-language model (anything AutoModelForImageTextToText knows) comes with its
    AutoProcessor; any other causal LM with its tokenizer, which then plays the processor.
    attn_implementation (--attn_implementation): the attention backend; None keeps the one
    transformers picks.
    """
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText,
                              AutoProcessor, AutoTokenizer)
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    preset = embedded_preset(model)
    if preset is not None:
        net, processor = preset.load()
    else:
        config = AutoConfig.from_pretrained(model)
        if type(config) in AutoModelForImageTextToText._model_mapping:
            family = video_family(config)           # an unknown family stops before any data
            for module, package in family.needs:
                require(module, package, f"{model} ({family.name})")
            processor = load_processor(model, AutoProcessor)
            net = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype)
        else:
            net = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
            processor = AutoTokenizer.from_pretrained(model)
    tok = tokenizer_of(processor)
    if tok.pad_token is None:            # causal LMs often ship without one; any id works (masked)
        tok.pad_token = tok.eos_token
    set_attention_backend(net, attn_implementation)
    return net.to(device=device, dtype=dtype), processor


ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flex_attention")


def set_attention_backend(net, attn_implementation: str | None) -> None:
    """--attn_implementation: switch every sub-model (language model and vision tower) to it, or
    one clear error when the name is unknown, the package is missing or the family lacks it."""
    if attn_implementation is None:
        return
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ModelError(f"--attn_implementation {attn_implementation!r}: not one of "
                         f"{', '.join(ATTN_IMPLEMENTATIONS)}")
    if attn_implementation == "flex_attention" and not _has_flex_attention():
        raise ModelError(f"--attn_implementation flex_attention: torch {torch.__version__} has no "
                         "torch.nn.attention.flex_attention (it needs torch >= 2.5)")
    try:
        net.set_attn_implementation(attn_implementation)
    except (ImportError, ValueError) as e:
        reason = str(e).strip().splitlines()[0]
        raise ModelError(f"--attn_implementation {attn_implementation}: {type(net).__name__} "
                         f"cannot use it here ({reason})") from None


def attention_backend(model) -> str:
    """The language model's attention backend as it runs now (sdpa, eager, flex_attention, ...)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config.get_text_config()._attn_implementation or "eager"


def check_trainable_backend(model, device) -> None:
    """Training needs the backend's backward: FlexAttention has none on CPU (torch raises
    "FlexAttention does not support backward on CPU" at the first step), so say so up front."""
    if attention_backend(model) == "flex_attention" and torch.device(device).type == "cpu":
        raise ModelError("--attn_implementation flex_attention: FlexAttention has no backward pass "
                         f"on CPU (torch {torch.__version__}); train on a GPU, or use sdpa here "
                         "(evaluation runs flex on CPU: it needs the forward only)")


def _has_flex_attention() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def load_processor(model: str, auto):
    """The model directory's own processor; one clear line when it has none or a broken one."""
    try:
        processor = auto.from_pretrained(model)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ModelError(f"{model}: cannot load its processor ({str(e).strip().splitlines()[0]}); "
                         "a vision-language model directory needs the files the processor's "
                         "save_pretrained writes (processor_config.json or preprocessor_config.json, "
                         "the tokenizer, chat template)") from None
    if getattr(processor, "video_processor", None) is None:
        raise ModelError(f"{model}: no video processor found (got {type(processor).__name__}); "
                         "the directory lacks video_preprocessor_config.json / processor_config.json")
    return processor


def load_model(model: str, adapter: str | None = None, *, device="cpu", dtype=None,
               attn_implementation: str | None = None):
    """(model, processor) in eval mode, with a saved rank_dpo.py adapter merged in if given.

    An adapter trained from an --init warm start was trained on top of that start: its run
    directory keeps a copy of the init adapter under init/, which is merged first.
    """
    net, processor = load_base(model, device=device, dtype=dtype,
                               attn_implementation=attn_implementation)
    if adapter is not None:
        net = merge_adapter(net, adapter)
    return net.eval(), processor


def merge_adapter(net, adapter: str):
    """Merge a saved adapter (and, first, the warm-start adapter it was trained on) into `net`."""
    from peft import PeftModel
    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise FileNotFoundError(f"{adapter}: not an adapter directory (no adapter_config.json)")
    init = read_run_meta(adapter).get("init")
    if init:                        # relative to the adapter: init/ in a run, ../../init in a checkpoint
        net = merge_adapter(net, os.path.join(adapter, init))
    with _quiet_peft():
        return PeftModel.from_pretrained(net, adapter).merge_and_unload()


@contextlib.contextmanager
def _quiet_peft():
    """peft 0.21 calls a transformers API that transformers 5 renamed: silence that warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        yield


def run_video_sampling(args, adapter: str | None) -> VideoSampling:
    """Video flags for evaluation: each one given on the command line wins, then the value the
    adapter's run trained with (its rank_dpo.json), then the VideoSampling default."""
    stored = (read_run_meta(adapter).get("video") or {}) if adapter else {}
    pick = {k: getattr(args, k, None) if getattr(args, k, None) is not None else stored.get(k)
            for k in ("num_frames", "fps", "max_pixels")}
    return VideoSampling(**{k: v for k, v in pick.items() if v is not None})


def run_attn_implementation(args, adapter: str | None) -> str | None:
    """--attn_implementation for evaluation: the flag when given, else the backend the adapter's
    run trained with (its rank_dpo.json), else None (transformers' choice)."""
    given = getattr(args, "attn_implementation", None)
    if given is not None or not adapter:
        return given
    return read_run_meta(adapter).get("attn_implementation")


def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov")
FRAME_EXTENSIONS = (".npy", ".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass
class VideoSampling:
    """How frames are taken from a clip and sized (the --num_frames/--fps/--max_pixels flags).

    Uniform: num_frames frames evenly over the clip. With fps: fps frames per second of the
    clip, at most num_frames (then spread evenly over the whole clip). max_pixels caps H*W of
    each frame: frames are shrunk after decoding, and the family's processor gets the same cap.
    """
    num_frames: int = 8
    fps: float | None = None
    max_pixels: int | None = None

    @classmethod
    def of(cls, args) -> "VideoSampling":
        return cls(args.num_frames, getattr(args, "fps", None), getattr(args, "max_pixels", None))

    def as_dict(self) -> dict:
        return {"num_frames": self.num_frames, "fps": self.fps, "max_pixels": self.max_pixels}


@dataclass
class Clip:
    """Sampled frames plus the timing a processor needs (Qwen3-VL writes timestamps)."""
    frames: np.ndarray               # uint8 [T, H, W, 3]
    indices: list[int]               # which source frames these are
    fps: float | None                # source frame rate (None for .npy / frame folders)
    total: int                       # source frame count


def load_video(path: str, num_frames: int | VideoSampling) -> np.ndarray:
    """The sampled frames of a video, uint8 [T, H, W, 3] (see load_clip)."""
    return load_clip(path, num_frames).frames


def load_clip(path: str, sampling: int | VideoSampling) -> Clip:
    """Frames sampled from a video: a .npy array (uint8 [T, H, W, 3]), a folder of frames (.npy,
    or images via Pillow) sorted by name, or a video file (.mp4/.webm/... via PyAV).

    Only the kept frames are read: the .npy is memory-mapped, a video file is streamed and each
    frame not kept is dropped as soon as it is decoded, so memory does not grow with clip length.
    A clip shorter than num_frames repeats frames.
    """
    s = sampling if isinstance(sampling, VideoSampling) else VideoSampling(sampling)
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(FRAME_EXTENSIONS))
        if not files:
            raise ValueError(f"{path}: folder holds no frames ({', '.join(FRAME_EXTENSIONS)})")
        picked = _pick(len(files), None, s)
        clip = Clip(np.stack([_read_frame(os.path.join(path, files[i])) for i in picked]),
                    picked, None, len(files))
    elif path.endswith(".npy"):
        array = np.load(path, mmap_mode="r")
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"{path}: expected a [T, H, W, 3] array, got shape {list(array.shape)}")
        picked = _pick(array.shape[0], None, s)
        clip = Clip(np.asarray(array[picked]), picked, None, array.shape[0])
    elif path.lower().endswith(VIDEO_EXTENSIONS):
        clip = _decode_video(path, s)
    else:
        raise ValueError(f"{path}: unknown video format (use .npy, a folder of frames, or "
                         f"{'/'.join(VIDEO_EXTENSIONS)})")
    if clip.frames.dtype != np.uint8:
        raise ValueError(f"{path}: expected uint8 pixels, got {clip.frames.dtype}")
    if s.max_pixels and clip.frames.shape[1] * clip.frames.shape[2] > s.max_pixels:
        clip.frames = _shrink(clip.frames, s.max_pixels)
    return clip


def _pick(total: int, fps: float | None, s: VideoSampling) -> list[int]:
    """Frame indices to keep: num_frames evenly spread, or one per 1/--fps seconds (at most
    num_frames, spread over the whole clip); uniform when the clip's frame rate is unknown."""
    if total == 0:
        raise ValueError("video has no frames")
    n = s.num_frames
    if s.fps and fps:
        n = max(1, min(n, int(total / fps * s.fps)))
    return np.linspace(0, total - 1, n).round().astype(int).tolist()


def _shrink(frames: np.ndarray, max_pixels: int) -> np.ndarray:
    """Downscale [T, H, W, 3] so that H * W <= max_pixels (aspect kept; area resampling)."""
    t, h, w, _ = frames.shape
    scale = math.sqrt(max_pixels / (h * w))
    size = (max(1, int(h * scale)), max(1, int(w * scale)))
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=size, mode="area")
    return x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def _read_frame(path: str) -> np.ndarray:
    if path.endswith(".npy"):
        frame = np.load(path)
    else:
        frame = np.asarray(require("PIL", "pillow", f"{path}: reading image frames").Image
                           .open(path).convert("RGB"))
    if frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"{path}: expected an [H, W, 3] frame, got shape {list(frame.shape)}")
    return frame


def _decode_video(path: str, s: VideoSampling, total: int | None = None) -> Clip:
    """Stream-decode, keeping only the sampled frames (each converted to RGB when kept)."""
    av = require("av", "av", f"{path}: decoding video files")
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else None
            if total is None:
                total = stream.frames or 0
            if total == 0:                  # the header does not say: count packets (no decode)
                total = sum(1 for packet in container.demux(stream) if packet.size)
                container.seek(0)
            picked = _pick(total, fps, s)
            want, kept, seen = set(picked), {}, 0
            for i, frame in enumerate(container.decode(stream)):
                if i in want:
                    kept[i] = frame.to_ndarray(format="rgb24")
                seen = i + 1
                if i >= picked[-1]:
                    break
    except av.error.FFmpegError as e:
        raise ValueError(f"{path}: cannot decode video ({e})") from None
    if not kept:
        raise ValueError(f"{path}: no video frames decoded")
    if seen <= picked[-1]:                  # the header over-counted: sample the true count
        return _decode_video(path, s, seen)
    return Clip(np.stack([kept[i] for i in picked]), picked, fps, total)


def require(module: str, package: str, purpose: str):
    """Import an optional dependency of the real-model path, or stop with one line naming it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(f"{purpose} needs {package}: pip install {package} "
                                "(or `make setup`, which installs requirements-real.txt)") from None


class MissingDependency(ImportError):
    """An optional package of the real-model path is not installed (one-line message)."""


# Video families. What differs between VLM families on the video path lives here and nowhere
# else: how the family's video processor is called (frame timing, pixel cap), how one video is
# encoded, and how already-encoded videos are handed to the model's forward (mm_encoder_outputs).
# How many placeholder tokens a clip takes is asked of the family's own processor
# (replace_video_token), so the counts are the processor's, never re-derived here.

@dataclass
class VideoFeatures:
    """One video encoded by the vision tower: what mm_encoder_outputs needs for it."""
    embeds: torch.Tensor                         # [tokens, hidden]
    deepstack: list[torch.Tensor] | None = None  # Qwen3-VL: per deepstack layer, [tokens, hidden]


def _encode_grid(model, videos: list[dict]) -> list[VideoFeatures]:
    """Qwen2.5-VL / Qwen3-VL: all patches of all videos in one call, split per video."""
    out = model.get_video_features(torch.cat([v["pixel_values_videos"] for v in videos]),
                                   torch.cat([v["video_grid_thw"] for v in videos]), return_dict=True)
    deep = getattr(out, "deepstack_features", None)
    return [VideoFeatures(e, [layer[i] for layer in deep] if deep else None)
            for i, e in enumerate(out.pooler_output)]


def _encode_frames(model, videos: list[dict]) -> list[VideoFeatures]:
    """PerceptionLM: every frame is an image to the (timm) tower; a video is its frames' tokens."""
    pixels = torch.cat([v["pixel_values_videos"] for v in videos])        # [B, T, C, H, W]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = base.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
    return [VideoFeatures(e.reshape(-1, e.shape[-1])) for e in out.unflatten(0, pixels.shape[:2])]


def _grid_inputs(feats: list[VideoFeatures], videos: list[dict]) -> dict:
    """Per-row features as the Qwen models take them, plus the grids their mrope needs."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    encoded = BaseModelOutputWithPooling(pooler_output=[f.embeds for f in feats])
    if feats[0].deepstack is not None:
        encoded["deepstack_features"] = [list(layer) for layer in zip(*(f.deepstack for f in feats))]
    kwargs = {"mm_encoder_outputs": {"video": encoded},
              "video_grid_thw": torch.cat([v["video_grid_thw"] for v in videos])}
    if "second_per_grid_ts" in videos[0]:
        kwargs["second_per_grid_ts"] = torch.cat([v["second_per_grid_ts"] for v in videos])
    return kwargs


def _frame_inputs(feats: list[VideoFeatures], videos: list[dict]) -> dict:
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    return {"mm_encoder_outputs": {"video": BaseModelOutputWithPooling(
        pooler_output=torch.cat([f.embeds for f in feats]))}}


def _qwen2_call(vp, s: VideoSampling, clip: Clip) -> dict:
    """Frames are already sampled; the pixel cap is per frame."""
    kw = {"do_sample_frames": False, "cap_pixels_per_frame": True}
    if s.max_pixels:
        kw["size"] = {"shortest_edge": min(vp.size["shortest_edge"], s.max_pixels),
                      "longest_edge": s.max_pixels}
    return kw


def _qwen3_call(vp, s: VideoSampling, clip: Clip) -> dict:
    """As Qwen2.5-VL, plus the clip's timing (the processor writes per-frame timestamps from it;
    without it, it re-samples at 2 fps assuming a 24 fps source). Its size cap is per clip."""
    kw = _qwen2_call(vp, s, clip)
    if s.max_pixels:
        kw["size"]["longest_edge"] = s.max_pixels * len(clip.indices)
    kw["video_metadata"] = [{"fps": clip.fps or s.fps or 1.0, "frames_indices": clip.indices,
                             "total_num_frames": clip.total}]
    return kw


def _plain_call(vp, s: VideoSampling, clip: Clip) -> dict:
    """PerceptionLM resizes every frame to its tower's tile: nothing to pass but the frames."""
    return {"do_sample_frames": False}


@dataclass(frozen=True)
class VideoFamily:
    name: str
    tensors: tuple[str, ...]          # processor outputs the vision tower / forward needs
    call: Callable                    # (video_processor, VideoSampling, Clip) -> processor kwargs
    encode: Callable                  # (model, videos) -> [VideoFeatures] (one tower call)
    inputs: Callable                  # (features per row, video dicts per row) -> forward kwargs
    token_types: bool = True          # forward takes mm_token_type_ids (2 marks video tokens)
    needs: tuple[tuple[str, str], ...] = (("torchvision", "torchvision"), ("PIL", "pillow"))
    # (module, pip package) its processor and tower import; checked before loading


VIDEO_FAMILIES = {f.name: f for f in (
    VideoFamily("qwen2_5_vl", ("pixel_values_videos", "video_grid_thw"), _qwen2_call,
                _encode_grid, _grid_inputs),
    VideoFamily("qwen3_vl", ("pixel_values_videos", "video_grid_thw"), _qwen3_call,
                _encode_grid, _grid_inputs),
    VideoFamily("perception_lm", ("pixel_values_videos",), _plain_call, _encode_frames,
                _frame_inputs, token_types=False,
                needs=(("torchvision", "torchvision"), ("PIL", "pillow"), ("timm", "timm"))),
)}


def video_family(model_or_config) -> VideoFamily:
    """The family of a VLM (its config's model_type); a clear error for one this code lacks."""
    config = getattr(model_or_config, "config", model_or_config)
    name = getattr(config, "model_type", None)
    if name not in VIDEO_FAMILIES:
        raise ModelError(f"model type {name!r} has no video path here; supported "
                         f"vision-language families: {', '.join(VIDEO_FAMILIES)}")
    return VIDEO_FAMILIES[name]


class ModelError(ValueError):
    """A model directory the code cannot use (unknown family, no processor): one-line message."""


# ================================================================================================
# 2. From text and frames to token batches. Every prompt goes through the processor's chat
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


# The hub's processor classes by family; a processor may instead name its family itself
# (a `video_family` attribute, as the tiny preset's does).
PROCESSOR_FAMILIES = {"Qwen2_5_VLProcessor": "qwen2_5_vl", "Qwen3VLProcessor": "qwen3_vl",
                      "PerceptionLMProcessor": "perception_lm"}


def processor_family(processor) -> VideoFamily:
    name = (getattr(processor, "video_family", None)
            or PROCESSOR_FAMILIES.get(type(processor).__name__))
    if name is None:
        raise ModelError(f"{type(processor).__name__}: no video path for this processor; "
                         f"supported vision-language families: {', '.join(VIDEO_FAMILIES)}")
    return VIDEO_FAMILIES[name]


def video_inputs(processor, video: np.ndarray | Clip, sampling: VideoSampling | None = None) -> dict:
    """Vision-tower inputs for one video from the family's own video processor, plus
    `placeholder_ids`: the tokens the prompt's one video placeholder becomes (the processor's
    own replace_video_token: Qwen3-VL's per-frame groups with timestamps included)."""
    if getattr(processor, "video_processor", None) is None:
        raise ValueError("this model's processor has no video processor; use text-only records")
    clip = video if isinstance(video, Clip) else Clip(np.asarray(video), list(range(len(video))),
                                                      None, len(video))
    family, vp = processor_family(processor), processor.video_processor
    out = vp(videos=[clip.frames], return_tensors="pt", return_metadata=True,
             **family.call(vp, sampling or VideoSampling(len(clip.frames)), clip))
    enc = {k: out[k] for k in family.tensors}
    if "second_per_grid_ts" in getattr(processor, "model_input_names", ()):
        # Qwen2.5-VL's: the time one temporal patch spans, for the rotary time axis (the
        # processor's formula); a processor that does not feed it leaves the model's default, 1
        rate = (len(clip.indices) * clip.fps / clip.total) if clip.fps else 2.0
        enc["second_per_grid_ts"] = torch.tensor([vp.temporal_patch_size / rate])
    text = processor.replace_video_token(out, video_idx=0)
    ids = tokenizer_of(processor)(text, add_special_tokens=False).input_ids
    enc["placeholder_ids"] = torch.tensor(ids, dtype=torch.long)
    return enc


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


class PromptTooLong(ValueError):
    def __init__(self, row: int, length: int, max_length: int):
        super().__init__(f"prompt is {length} tokens (video included), max_length is {max_length}")
        self.row = row


def expand_video_tokens(processor, prompt_ids: list[int], video: dict) -> list[int]:
    """Replace the prompt's one video placeholder by as many as the video has embeddings."""
    at = prompt_ids.index(video_token_id(processor))
    return prompt_ids[:at] + video["placeholder_ids"].tolist() + prompt_ids[at + 1:]


def make_batch(processor, rows: list[tuple[list[int], list[int], int]], videos: list[dict],
               max_length: int) -> Batch:
    """rows: (prompt_ids with one video placeholder or none, response_ids, video index or -1).

    A response that would run past max_length is cut; a prompt that leaves no room for a
    response raises PromptTooLong (the data loader turns it into a file:line error).
    """
    tok = tokenizer_of(processor)
    seqs, prompt_lens = [], []
    for n, (prompt_ids, response_ids, vid) in enumerate(rows):
        if vid >= 0:
            prompt_ids = expand_video_tokens(processor, prompt_ids, videos[vid])
        if len(prompt_ids) >= max_length:
            raise PromptTooLong(n, len(prompt_ids), max_length)
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
# 3. The forward pass. Each distinct video goes through the vision encoder ONCE (all videos of a
#    batch in one call); its embeddings are then placed into every sequence that shows it, via
#    the model's own `mm_encoder_outputs` input, so the model's own code scatters them into the
#    video-token slots and computes its rotary (mrope) positions. With a trainable vision tower,
#    the gradients of all K captions flow back into the one encoding.
# ================================================================================================

def encode_videos(model, videos: list[dict]) -> list[VideoFeatures]:
    """One vision-encoder call for all distinct videos -> their features, one per video."""
    return video_family(model).encode(model, videos)


def video_forward_kwargs(model, videos: list[dict], spans: list[int], input_ids: torch.Tensor,
                         video_embeds: list[VideoFeatures] | None = None) -> dict:
    """The forward's video inputs: spans[i] is the video (an index into `videos`) of the i-th
    video span in input_ids, in order. Each video is encoded once (unless video_embeds are
    given) however many spans show it; plus the token types where the family takes them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    family = video_family(base)
    if video_embeds is None:
        video_embeds = family.encode(model, videos)
    kwargs = family.inputs([video_embeds[v] for v in spans], [videos[v] for v in spans])
    if family.token_types:
        kwargs["mm_token_type_ids"] = (input_ids == base.config.video_token_id).int() * 2
    return kwargs


def forward_logits(model, batch: Batch, video_embeds: list[VideoFeatures] | None = None):
    """(logits [N, L, V], labels [N, L]) over the response region only.

    Logits are computed just from the first position any response starts at: with long video
    prompts that is most of the [N, T, V] logits tensor saved (logits_to_keep). `video_embeds`
    reuses already-encoded videos (the reference pass with a frozen vision tower); otherwise
    the batch's videos are encoded here, once each.
    """
    kwargs = {}
    rows_with_video = [v for v in batch.video_of_row if v >= 0]
    if rows_with_video:
        kwargs = video_forward_kwargs(model, batch.videos, rows_with_video, batch.input_ids,
                                      video_embeds)
    real = batch.labels != IGNORE_INDEX
    first = int(real.float().argmax(-1)[real.any(-1)].min()) if real.any() else 0
    keep = torch.arange(first, batch.labels.shape[1], device=batch.labels.device)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                logits_to_keep=keep, **kwargs)
    return out.logits, batch.labels[:, first:]


# ------------------------------------------------------------------------------------------------
# 3b. Shared-prefix chain forward (--shared_prefix). The K rows of a chain repeat one prefix
#     (chat header, every video token, the question); here the prefix goes through the language
#     model ONCE per chain. Layout of one packed row, prefix P and captions c_1..c_K:
#
#         tokens   [ p p p p p | c1 c1 c1 | c2 c2 | c3 c3 c3 c3 ]
#         segment    0 0 0 0 0   1  1  1    2  2    3  3  3  3       (-1: right padding)
#         sees       causal      P + own    P + own P + own          (never another caption)
#         position   0 1 2 3 4   5  6  7    5  6    5  6  7  8       (restart after the prefix)
#
#     With --pack_chains, several chains share a row back to back, each its own document that
#     never sees another, so only padding goes. Chains A (prefix P, c1 c2) and B (Q, d1):
#
#         tokens   [ P P P | c1 c1 | c2 c2 c2 | Q Q | d1 d1 d1 | pad ]
#         document   0 0 0   0  0    0  0  0   1 1   1  1  1    -1
#         segment    0 0 0   1  1    2  2  2   0 0   1  1  1    -1
#         position   0 1 2   3  4    3  4  5   0 1   2  3  4     0   (restart per chain)
#
#     Packed: the model's own forward, so LoRA, peft and gradients work unchanged.
#     Same numbers: positions are the model's rope index on the UNPACKED rows, moved.
#     A segment starts at its row's last prompt token: its first label is predicted inside it.
#     One attention rule (packed_visible), handed to each backend its way (PACKED_ROUTES): sdpa
#     a boolean mask, eager an additive one, flex attention a BlockMask (masked blocks skipped),
#     flash attention the prefix once into a KV cache and the captions over it (it takes no
#     mask). Sliding-window layers get their own mask (window in unpacked positions) where the
#     decoder takes one per layer type; under flex and flash they fall back.
#     Why, at length: docs/DESIGN.md, "The shared-prefix forward".
# ------------------------------------------------------------------------------------------------

FEATURE_MODES = ("on", "off", "auto")       # --shared_prefix, --fused_linear
# Families (config.model_type) whose packed forward tests/test_shared_prefix.py checks against
# the unshared one, per objective, under sdpa and eager (Gemma 2: eager, transformers has no sdpa
# for it). Any other family falls back: its forward may read the mask or the positions in a way
# these checks never saw.
SHARED_PREFIX_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "perception_lm", "llama", "mistral", "qwen2",
                          "qwen3", "gemma", "gemma2", "gemma3_text")
# Of those, the ones whose decoder takes a mask per layer type ({layer_type: 4-D mask}), checked
# with sliding-window layers. Mistral needs none: its window, when set, is on every layer.
MASK_PER_LAYER_TYPE = ("qwen2", "qwen3", "gemma2", "gemma3_text")
_fallbacks_logged: set[str] = set()
# How the packed forward hands its attention rule to each backend: a dense [C, 1, S, S] mask, a
# FlexAttention BlockMask (masked blocks skipped), or the prefix once into a KV cache and the
# captions over it (flash attention takes no mask but a padding one).
PACKED_ROUTES = {"sdpa": "dense_mask", "eager": "dense_mask", "flex_attention": "block_mask",
                 "flash_attention_2": "prefix_cache"}


def packed_route(model) -> str:
    """The route the packed forward takes under the model's attention backend (PACKED_ROUTES)."""
    return PACKED_ROUTES[attention_backend(model)]


def log_fallback_once(message: str, log=print) -> None:
    """Say a fallback once per process (log None: say nothing)."""
    if log is not None and message not in _fallbacks_logged:
        _fallbacks_logged.add(message)
        log(message)


def sliding_window_of(text_config) -> int | None:
    """The window of the model's sliding-window layers, None when no layer slides (a config may
    name a window its layers do not use: Qwen2's use_sliding_window=False, full layer types)."""
    window = getattr(text_config, "sliding_window", None)
    types = getattr(text_config, "layer_types", None)
    if window is None or getattr(text_config, "use_sliding_window", True) is False:
        return None
    return window if not types or "sliding_attention" in types else None


def shared_prefix_unsupported(model) -> str | None:
    """Why the packed forward cannot serve this model, or None when it can."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    if config.model_type not in SHARED_PREFIX_FAMILIES:
        return (f"model family {config.model_type!r} is not one the packed forward is checked on "
                f"(checked: {', '.join(SHARED_PREFIX_FAMILIES)})")
    text = config.get_text_config()
    backend = attention_backend(base)
    if backend not in PACKED_ROUTES:
        return (f"attention backend {backend!r} has no packed route (routes for: "
                f"{', '.join(PACKED_ROUTES)})")
    types = set(getattr(text, "layer_types", None) or ())
    if types - {"full_attention", "sliding_attention"}:
        return f"layer types {sorted(types - {'full_attention', 'sliding_attention'})} " \
            "have no packed mask here"
    if "sliding_attention" in types and config.model_type not in MASK_PER_LAYER_TYPE:
        return (f"model family {config.model_type!r} has sliding-window layers but is not checked "
                f"with a mask per layer type (checked: {', '.join(MASK_PER_LAYER_TYPE)})")
    if sliding_window_of(text) is not None and PACKED_ROUTES[backend] != "dense_mask":
        return (f"sliding-window layers: the {PACKED_ROUTES[backend].replace('_', ' ')} route "
                f"under {backend} carries no window (sdpa and eager do)")
    return None


def resolve_mode(flag: str, mode: str, why_not, fallback: str, log=print) -> bool:
    """An on|off|auto flag for a feature that may not apply: why_not() is the reason it does not,
    or None. `on` where it does not apply is an error; `auto` falls back to `fallback` and says
    so once per process, with the reason."""
    if mode not in FEATURE_MODES:
        raise ValueError(f"{flag} must be one of {FEATURE_MODES}, got {mode!r}")
    if mode == "off":
        return False
    reason = why_not()
    if reason is None:
        return True
    if mode == "on":
        raise SystemExit(f"--{flag} on: {reason}")
    log_fallback_once(f"--{flag} auto: off, {fallback} ({reason})", log)
    return False


def resolve_shared_prefix(model, mode: str, log=print) -> bool:
    """--shared_prefix on|off|auto -> whether to pack (resolve_mode)."""
    return resolve_mode("shared_prefix", mode, lambda: shared_prefix_unsupported(model),
                        "one sequence per caption", log)


@dataclass
class Packing:
    """Where every token of a Batch goes when each chain becomes one document
    [prefix | c_1 | ... | c_K] and the documents are laid into rows (one or several per row).

    source[c, s]: flat index (row * T + t) into the unpacked [N, T] batch of packed token s,
    -1 for padding; segment[c, s]: 0 prefix, k >= 1 the chain's k-th row, -1 padding;
    document[c, s]: which of the chains packed into row c the token belongs to (0, 1, ...; -1
    padding): tokens of different documents never see each other.
    gather[n, j]: flat index into the packed [C * S] outputs whose prediction is labels[n, j];
    labels[n, j]: row n's j-th response label (aligned per row at its first one), -100 after.
    videos_of_row[c]: indices into Batch.videos, one per video span in packed row c, in order.
    """
    source: torch.Tensor
    segment: torch.Tensor
    document: torch.Tensor
    gather: torch.Tensor
    labels: torch.Tensor
    videos_of_row: list[list[int]]

    def to(self, device):
        self.source, self.segment, self.document, self.gather, self.labels = (
            t.to(device) for t in (self.source, self.segment, self.document, self.gather,
                                   self.labels))
        return self

    def tokens(self) -> int:
        return int((self.segment >= 0).sum())


PACK_CHAINS_MODES = ("off", "auto")     # --pack_chains, besides a number of tokens


def pack_budget(value: str) -> str | int:
    """--pack_chains off|auto|N (argparse type): the mode, or N tokens per packed row."""
    if value in PACK_CHAINS_MODES:
        return value
    try:
        tokens = int(value)
    except ValueError:
        tokens = 0
    if tokens < 1:
        raise argparse.ArgumentTypeError(
            f"--pack_chains takes off, auto or a number of tokens >= 1, got {value!r}")
    return tokens


def pack_rows(lengths: list[int], row_tokens: str | int = "off") -> list[list[int]]:
    """Which documents (packed chains, by index; `lengths` their tokens) share each packed row.

    off: one per row, in order. Otherwise first-fit decreasing, deterministic (longest first,
    ties by index), into rows of at most a budget: auto = the longest document, so no row is
    longer than that chain alone makes it (the dense [S, S] mask never grows, only padding
    goes); N = max(N, the longest document), since a chain is never split across rows.
    """
    if row_tokens == "off":
        return [[d] for d in range(len(lengths))]
    if row_tokens != "auto" and (isinstance(row_tokens, bool) or not isinstance(row_tokens, int)
                                 or row_tokens < 1):
        raise ValueError(f"row_tokens must be 'off', 'auto' or a number of tokens >= 1, "
                         f"got {row_tokens!r}")
    budget = max(lengths) if row_tokens == "auto" else max(row_tokens, max(lengths))
    rows, used = [], []
    for d in sorted(range(len(lengths)), key=lambda d: (-lengths[d], d)):
        fits = next((r for r, u in enumerate(used) if u + lengths[d] <= budget), None)
        if fits is None:
            rows.append([d])
            used.append(lengths[d])
        else:
            rows[fits].append(d)
            used[fits] += lengths[d]
    return rows


def pack_chains(batch: Batch, index: torch.Tensor, video_token: int | None = None,
                row_tokens: str | int = "off") -> Packing:
    """Pack each chain (a row of `index` [C, K], -1 padded) of `batch` into one document
    [prefix | c_1 | ... | c_K], and the documents into rows: one per row, or back to back up
    to a token budget (row_tokens, see pack_rows).

    The shared prefix is the longest run of tokens all the chain's rows start with, stopped at
    the last prompt token of the shortest prompt (so yes/no chains, whose prompts differ, share
    their header and video); a prefix that would cut a video span in two stops before it.
    """
    ids, labels = batch.input_ids.cpu(), batch.labels.cpu()
    n_rows, width = ids.shape
    lengths = batch.attention_mask.cpu().sum(-1).tolist()
    has_label = labels != IGNORE_INDEX
    starts = [int(has_label[n].float().argmax()) if has_label[n].any() else lengths[n] - 1
              for n in range(n_rows)]                   # first label = last prompt token
    sources, segments, offsets, shared_of = [], [], {}, {}
    videos_of_chain = []
    for members in index.tolist():
        members = [m for m in members if m >= 0]
        first = members[0]
        shared = min(starts[m] for m in members)
        for m in members[1:]:
            same = (ids[first, :shared] == ids[m, :shared]).int()
            shared = min(shared, int(same.cumprod(0).sum()))
        if video_token is not None and shared > 0:
            is_video = (ids[first, :shared + 1] == video_token).tolist()
            if is_video[shared - 1] and is_video[shared]:      # inside a video span: stop before
                while shared > 0 and is_video[shared - 1]:
                    shared -= 1
        src = list(range(first * width, first * width + shared))
        seg = [0] * shared
        spans = [batch.video_of_row[first]] if video_token is not None and \
            bool((ids[first, :shared] == video_token).any()) else []
        for k, m in enumerate(members, start=1):
            offsets[m] = len(src) - shared              # within the chain's document
            shared_of[m] = shared
            src += range(m * width + shared, m * width + lengths[m])
            seg += [k] * (lengths[m] - shared)
            if video_token is not None and bool((ids[m, shared:lengths[m]] == video_token).any()):
                spans.append(batch.video_of_row[m])
        sources.append(src)
        segments.append(seg)
        videos_of_chain.append(spans)
    rows = pack_rows([len(s) for s in sources], row_tokens)
    packed_width = max(sum(len(sources[d]) for d in docs) for docs in rows)
    source = torch.full((len(rows), packed_width), -1, dtype=torch.long)
    segment = torch.full_like(source, -1)
    document = torch.full_like(source, -1)
    place = {}                          # chain -> flat index of its document's first token
    videos_of_row = []
    for r, docs in enumerate(rows):
        at = 0
        for j, d in enumerate(docs):
            end = at + len(sources[d])
            source[r, at:end] = torch.tensor(sources[d])
            segment[r, at:end] = torch.tensor(segments[d])
            document[r, at:end] = j
            place[d] = r * packed_width + at
            at = end
        # the model fills video spans in token order: row by row, document by document
        videos_of_row.append([v for d in docs for v in videos_of_chain[d]])
    # unpacked row -> the chain (document) that holds it
    chain_of = {m: c for c, members in enumerate(index.tolist()) for m in members if m >= 0}
    span = max(lengths[n] - 1 - starts[n] for n in range(n_rows))
    span = max(span, 1)
    gather = torch.zeros((n_rows, span), dtype=torch.long)
    row_labels = torch.full((n_rows, span), IGNORE_INDEX, dtype=torch.long)
    for n in range(n_rows):
        count = lengths[n] - 1 - starts[n]
        if count <= 0:
            continue
        t = torch.arange(starts[n], starts[n] + count)
        gather[n, :count] = place[chain_of[n]] + offsets[n] + t
        row_labels[n, :count] = labels[n, starts[n]:starts[n] + count]
    return Packing(source, segment, document, gather, row_labels, videos_of_row)


def pack_model_chains(model, batch: Batch, index: torch.Tensor,
                      row_tokens: str | int = "off") -> Packing:
    """pack_chains with the model's video token, the Packing on the batch's device."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    video_token = getattr(base.config, "video_token_id", None) if batch.videos else None
    return pack_chains(batch, index, video_token, row_tokens).to(batch.input_ids.device)


def packed_visible(q_idx, k_idx, q_segment, k_segment, q_document, k_document,
                   q_position=None, k_position=None, window: int | None = None):
    """The packed forward's one attention rule (the dense masks and any block mask use it):
    query q sees key k iff k <= q, both are in the same chain (document), and k is that chain's
    prefix or q's own segment. Padding (segment -1) is never seen. A sliding-window layer
    (window set) also needs q_position - k_position < window, in the positions the tokens have
    in their unpacked rows: transformers' own window (sliding_window_overlay) on those rows."""
    visible = (k_idx <= q_idx) & (k_document == q_document) & (k_segment >= 0) & \
        ((k_segment == 0) | (k_segment == q_segment))
    if window is not None:
        visible = visible & (q_position - k_position < window)
    return visible


def packed_attention_mask(packing: Packing, backend: str, dtype: torch.dtype,
                          window: int | None = None,
                          position: torch.Tensor | None = None) -> torch.Tensor:
    """[C, 1, S, S] from packed_visible: boolean for sdpa, additive (0 / dtype min) for eager.
    Padding queries see themselves only (a row with no key would give NaN, even in backward).
    window: a sliding-window layer's, with position [C, S] each token's index in its unpacked
    row (packed_token_positions)."""
    segment, document = packing.segment, packing.document
    width = segment.shape[1]
    idx = torch.arange(width, device=segment.device)
    if window is not None and position is None:
        raise ValueError("packed_attention_mask: a sliding window needs the tokens' positions")
    q_position, k_position = (None, None) if position is None else \
        (position.unsqueeze(2), position.unsqueeze(1))
    allowed = packed_visible(idx.view(1, -1, 1), idx.view(1, 1, -1), segment.unsqueeze(2),
                             segment.unsqueeze(1), document.unsqueeze(2), document.unsqueeze(1),
                             q_position, k_position, window)
    allowed |= torch.eye(width, dtype=torch.bool, device=segment.device)
    allowed = allowed.unsqueeze(1)
    if backend == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=segment.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min)


FLEX_BLOCK = 128                # FlexAttention's default block: the unit of skipped work


def packed_block_mask(packing: Packing, block: int = FLEX_BLOCK, chunk_elements: int = 2 ** 22):
    """A FlexAttention BlockMask for packed_visible: blocks no query of which sees any key are
    skipped, fully visible blocks run without the rule, the rest apply it per element.
    Padding queries see themselves, as in packed_attention_mask.

    Built from the rule evaluated one band of query rows at a time (about chunk_elements
    booleans alive), reduced per block to any/all: torch's create_block_mask would hold the
    whole [C, 1, S, S] mask unless compiled, and compiling costs ~12 s per new length on CPU."""
    from torch.nn.attention.flex_attention import BlockMask
    rows, width = packing.segment.shape
    blocks = -(-width // block)
    # the kernel may call the rule past the end, inside the last block: -1 there is padding
    segment = F.pad(packing.segment, (0, blocks * block - width), value=-1)
    document = F.pad(packing.document, (0, blocks * block - width), value=-1)

    def mask_mod(b, h, q_idx, kv_idx):
        return packed_visible(q_idx, kv_idx, segment[b, q_idx], segment[b, kv_idx],
                              document[b, q_idx], document[b, kv_idx]) | (q_idx == kv_idx)

    idx = torch.arange(blocks * block, device=segment.device)
    band = max(1, chunk_elements // (rows * blocks * block * block)) * block
    seen, whole = [], []                # per band: [C, query blocks, key blocks]
    for start in range(0, blocks * block, band):
        q = idx[start:start + band]
        visible = mask_mod(torch.arange(rows, device=idx.device).view(-1, 1, 1), None,
                           q.view(1, -1, 1), idx.view(1, 1, -1))
        visible = visible.view(rows, -1, block, blocks, block)
        seen.append(visible.any(4).any(2))
        whole.append(visible.all(4).all(2))
    full = torch.cat(whole, 1)
    partial = torch.cat(seen, 1) & ~full

    def listed(chosen):       # per query block: how many key blocks, and which (those first)
        order = torch.argsort((~chosen).int(), dim=-1, stable=True)
        return chosen.sum(-1).int().unsqueeze(1), order.int().unsqueeze(1)

    return BlockMask.from_kv_blocks(*listed(partial), *listed(full), BLOCK_SIZE=block,
                                    mask_mod=mask_mod, seq_lengths=(width, width))
def packed_token_positions(packing: Packing, batch: Batch) -> torch.Tensor:
    """[C, S]: each packed token's index in its unpacked (right-padded) row, 0 for padding. The
    unshared forward's sliding windows count in these indices."""
    return packing.source.clamp_min(0) % batch.input_ids.shape[1]


def packed_layer_masks(model, packing: Packing, batch: Batch) -> torch.Tensor | dict:
    """The ready 4-D mask the decoder takes: one for all layers, windowed where the config has a
    window but no layer types (Mistral: every layer slides), or {layer type: mask} where some
    layers slide (MASK_PER_LAYER_TYPE; the decoder then uses each layer's mask as-is)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    text = base.config.get_text_config()
    inner = getattr(base, base.base_model_prefix)
    backend = attention_backend(model)
    dtype = inner.get_input_embeddings().weight.dtype
    window = sliding_window_of(text)
    types = set(getattr(text, "layer_types", None) or ())
    position = packed_token_positions(packing, batch)

    def mask(windowed: bool):
        return packed_attention_mask(packing, backend, dtype, window if windowed else None,
                                     position)
    if window is None or "sliding_attention" not in types:
        return mask(window is not None)      # one kind of layer (Mistral's window is on all)
    return {kind: mask(kind == "sliding_attention") for kind in types}


def unpacked_position_ids(model, batch: Batch, video_kwargs: dict) -> torch.Tensor:
    """The position ids the unshared forward gives `batch`'s rows: [N, T], or [3, N, T] from the
    model's own rope index (the Qwen VLMs' 3-D mrope positions) when the batch holds videos;
    video_kwargs: the unshared forward's video inputs (video_forward_kwargs)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, base.base_model_prefix)
    if video_kwargs and hasattr(inner, "get_rope_index"):
        accepted = inspect.signature(inner.get_rope_index).parameters
        kwargs = {k: v for k, v in dict(video_kwargs, attention_mask=batch.attention_mask).items()
                  if k in accepted}
        positions, _ = inner.get_rope_index(batch.input_ids, **kwargs)
        return positions
    return (batch.attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def packed_hidden_states(model, batch: Batch, packing: Packing,
                         video_embeds: list[VideoFeatures] | None = None):
    """(hidden [N, L, H], labels [N, L]): the final hidden states (after the last norm) at the
    positions that predict each row's response labels, from ONE forward per chain. The LM head
    is left to the caller (packed_logits, or a fused linear + loss kernel)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, base.base_model_prefix)
    flat_ids = batch.input_ids.reshape(-1)
    padding = batch.attention_mask.reshape(-1) == 0      # any id fills padding: it is masked
    pad = int(flat_ids[padding][0]) if bool(padding.any()) else 0
    ids = torch.where(packing.source >= 0, flat_ids[packing.source.clamp_min(0)],
                      torch.full_like(packing.source, pad))
    video_kwargs, kwargs = {}, {}
    rows_with_video = [v for v in batch.video_of_row if v >= 0]
    if rows_with_video:        # encoded once here, for the positions' and the packed row's kwargs
        if video_embeds is None:
            video_embeds = encode_videos(model, batch.videos)
        video_kwargs = video_forward_kwargs(model, batch.videos, rows_with_video,
                                            batch.input_ids, video_embeds)
    positions = unpacked_position_ids(model, batch, video_kwargs)
    flat_pos = positions.reshape(*positions.shape[:-2], -1)
    packed_pos = flat_pos[..., packing.source.clamp_min(0)] * (packing.source >= 0)
    spans = [v for row in packing.videos_of_row for v in row]
    route = packed_route(model)
    if route == "prefix_cache":
        return prefix_cache_hidden_states(model, batch, packing, ids, packed_pos, pad,
                                          video_embeds), packing.labels
    if spans:
        kwargs = video_forward_kwargs(model, batch.videos, spans, ids, video_embeds)
    if route == "block_mask":
        mask = packed_block_mask(packing)
    else:
        mask = packed_layer_masks(model, packing, batch)
    out = inner(input_ids=ids, attention_mask=mask, position_ids=packed_pos, use_cache=False,
                **kwargs)
    hidden = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
    return hidden[packing.gather], packing.labels


def prefix_cache_declined(model, packing: Packing, ids: torch.Tensor) -> str | None:
    """Why the prefix-cache route cannot run this batch, or None when it can."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, base.base_model_prefix)
    video_token = getattr(base.config, "video_token_id", None)
    if video_token is not None and bool(((ids == video_token) & (packing.segment > 0)).any()):
        return "a caption part holds video tokens (the prefix stopped before a video span)"
    chain = torch.arange(len(packing.segment), device=ids.device).view(-1, 1) * ids.shape[1] + \
        packing.document                                      # one id per (packed row, chain)
    if len(chain[packing.segment >= 0].unique()) != len(chain[packing.segment == 0].unique()):
        return "a chain shares no prefix"
    if getattr(inner, "gradient_checkpointing", False) and inner.training and \
            torch.is_grad_enabled():
        return "gradient checkpointing would re-run the prefix into its cache in backward"
    return None


def prefix_cache_hidden_states(model, batch: Batch, packing: Packing, ids: torch.Tensor,
                               positions: torch.Tensor, pad: int,
                               video_embeds: list[VideoFeatures] | None = None) -> torch.Tensor:
    """packed_hidden_states for a backend that takes no attention rule (flash attention): each
    chain's prefix runs ONCE through the model into a KV cache (gradients flow through it), every
    caption row gets its chain's cache rows, and the captions run over it as a right-padded
    batch (a 2-D mask over prefix + caption, the unpacked positions). The same tokens, keys and
    positions as the packed row, so the same numbers. `ids`/`positions` are the packed row's.
    Where prefix_cache_declined, the batch runs unshared (said once)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, base.base_model_prefix)
    reason = prefix_cache_declined(model, packing, ids)
    if reason is not None:
        log_fallback_once(f"shared prefix over a KV cache: one sequence per caption for such "
                          f"batches ({reason})", log=lambda m: print(m, file=sys.stderr))
        return unshared_hidden_states(model, batch, packing, video_embeds)
    segment, document = packing.segment.cpu(), packing.document.cpu()
    rows, width = segment.shape
    prefixes, captions, chain_of_caption = [], [], []     # flat indices into the packed [C * S]
    for c in range(rows):
        for d in sorted(set(document[c].tolist()) - {-1}):
            part = document[c] == d
            prefixes.append(c * width + ((segment[c] == 0) & part).nonzero()[:, 0])
            for k in sorted(set(segment[c][part].tolist()) - {0}):
                captions.append(c * width + ((segment[c] == k) & part).nonzero()[:, 0])
                chain_of_caption.append(len(prefixes) - 1)
    device = ids.device
    flat_ids, flat_pos = ids.reshape(-1), positions.reshape(*positions.shape[:-2], -1)

    def gathered(parts):        # right-padded rows of the packed tokens: (ids, positions, mask)
        at = torch.nn.utils.rnn.pad_sequence(parts, batch_first=True, padding_value=-1).to(device)
        real = at >= 0
        return (torch.where(real, flat_ids[at.clamp_min(0)], pad),
                flat_pos[..., at.clamp_min(0)] * real, real.long(), at)

    p_ids, p_pos, p_mask, _ = gathered(prefixes)
    c_ids, c_pos, c_mask, c_at = gathered(captions)
    spans = [v for row in packing.videos_of_row for v in row]      # all inside the prefixes
    kwargs = video_forward_kwargs(model, batch.videos, spans, p_ids, video_embeds) if spans else {}
    cache = inner(input_ids=p_ids, attention_mask=p_mask, position_ids=p_pos, use_cache=True,
                  **kwargs).past_key_values
    chain_of_caption = torch.tensor(chain_of_caption, device=device)
    cache.batch_select_indices(chain_of_caption)
    out = inner(input_ids=c_ids, attention_mask=torch.cat([p_mask[chain_of_caption], c_mask], 1),
                position_ids=c_pos, past_key_values=cache, use_cache=True)
    hidden = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
    # packed position -> its caption-row position, then packed_hidden_states' gather
    row_of_packed = torch.zeros(rows * width, dtype=torch.long, device=device)
    real = c_at >= 0
    row_of_packed[c_at[real]] = torch.arange(c_at.numel(), device=device)[real.reshape(-1)]
    return hidden[row_of_packed[packing.gather]]


def unshared_hidden_states(model, batch: Batch, packing: Packing,
                           video_embeds: list[VideoFeatures] | None = None) -> torch.Tensor:
    """The hidden states packed_hidden_states returns, from one sequence per caption."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, base.base_model_prefix)
    rows_with_video = [v for v in batch.video_of_row if v >= 0]
    kwargs = video_forward_kwargs(model, batch.videos, rows_with_video, batch.input_ids,
                                  video_embeds) if rows_with_video else {}
    out = inner(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                **kwargs)
    hidden = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
    return hidden[packing.source.reshape(-1)[packing.gather]]


def packed_logits(model, batch: Batch, packing: Packing,
                  video_embeds: list[VideoFeatures] | None = None):
    """(logits [N, L, V], labels [N, L]) of every row's response, one forward per chain: the
    drop-in for forward_logits (equal per-row log-probs; labels aligned per row)."""
    hidden, labels = packed_hidden_states(model, batch, packing, video_embeds)
    logits = model.get_output_embeddings()(hidden)
    cap = final_logit_softcapping(model)
    if cap is not None:           # what the family's own forward does after its head (Gemma 2/3)
        logits = torch.tanh(logits / cap) * cap
    return logits, labels


def final_logit_softcapping(model) -> float | None:
    """The cap Gemma 2/3 put on the logits after the LM head (logits = cap * tanh(logits / cap)),
    None for the families without one: the only head post-processing among
    SHARED_PREFIX_FAMILIES."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base.config.get_text_config(), "final_logit_softcapping", None)


def output_head(model):
    """The LM head as it runs now: its `.weight`/`.bias` are peft's trained copy while adapters
    are on (--modules_to_save lm_head) and the original while they are disabled (the reference)."""
    return model.get_output_embeddings()


def resolve_fused_linear(model, mode: str, shared_prefix: bool, log=print) -> bool:
    """--fused_linear on|off|auto -> whether the LM head runs inside the fused loss
    (kernels.fused_linear_chain_loss: the response logits are never materialised). It takes the
    hidden states the packed forward returns, so it needs --shared_prefix, and a head that is a
    plain linear layer with nothing after it (no logit soft-capping; resolve_mode says what `on`
    and `auto` do where it cannot apply)."""
    def why_not():
        head = output_head(model)
        head = getattr(head, "original_module", head)      # under peft's modules_to_save wrapper
        if type(head) is not torch.nn.Linear:
            return f"the LM head is a {type(head).__name__}, not a plain linear layer"
        if final_logit_softcapping(model) is not None:
            return "the model soft-caps its logits after the LM head; the fused kernel does not"
        if not shared_prefix:
            return "it runs on the packed forward's hidden states, and --shared_prefix is off here"
        return None
    return resolve_mode("fused_linear", mode, why_not, "logits then the fused loss", log)


def chain_logits(model, batch: Batch, packing: Packing | None = None,
                 video_embeds: list[VideoFeatures] | None = None):
    """The trainer's and the evaluation's one entry: packed when given a Packing, else unshared."""
    if packing is None:
        return forward_logits(model, batch, video_embeds)
    return packed_logits(model, batch, packing, video_embeds)


@torch.no_grad()
def response_logps(model, processor, video, prompts: list[str], responses: list[str],
                   max_length: int = 2048, sampling: VideoSampling | None = None,
                   shared_prefix: str = "auto") -> torch.Tensor:
    """[K] fp32 sums of each response's token log-probs given its prompt and the shared video
    (encoded once for all K; None for text-only). No gradients: this is for evaluation.
    shared_prefix (on|off|auto): the K rows' common prefix runs through the LM once."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    device = next(model.parameters()).device
    videos = [video_inputs(processor, video, sampling)] if video is not None else []
    vid = 0 if video is not None else -1
    rows = [(*encode_text(processor, p, r, video is not None), vid)
            for p, r in zip(prompts, responses)]
    batch = make_batch(processor, rows, videos, max_length).to(device)
    packing = None
    if resolve_shared_prefix(model, shared_prefix, log=lambda m: print(m, file=sys.stderr)):
        index = torch.arange(len(rows)).unsqueeze(0)
        packing = pack_model_chains(model, batch, index)
    logits, labels = chain_logits(model, batch, packing)
    logps, _ = kernels.sequence_logps(logits, labels)
    return logps.float()


def build_generation_inputs(processor, prompts: list[str], videos: list[np.ndarray | Clip | None],
                            sampling: VideoSampling | None = None, model=None,
                            copies: int = 1) -> dict:
    """A left-padded batch of chat prompts (generation prompt appended), ready for
    model.generate(**inputs), with each prompt's row repeated `copies` times (adjacent).

    Without `model`, generate gets the pixels and encodes each video itself. With it, each video
    is encoded here, once, and generate gets the features (mm_encoder_outputs): the copies of a
    row share them. N samples of one video are then one vision-tower pass, where
    num_return_sequences=N would repeat the pixels N times for a family whose generate does not
    encode before expanding (PerceptionLM's)."""
    if len(prompts) != len(videos):
        raise ValueError(f"{len(prompts)} prompts but {len(videos)} videos")
    tok = tokenizer_of(processor)
    encoded = [video_inputs(processor, v, sampling) if v is not None else None for v in videos]
    seqs = []
    for prompt, enc in zip(prompts, encoded):
        ids, _ = encode_text(processor, prompt, None, enc is not None)
        if enc is not None:
            ids = expand_video_tokens(processor, ids, enc)
        seqs.extend([ids] * copies)
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for n, s in enumerate(seqs):
        input_ids[n, width - len(s):] = torch.tensor(s)
        attention_mask[n, width - len(s):] = 1
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    present = [{k: v for k, v in e.items() if k != "placeholder_ids"} for e in encoded if e is not None]
    if present and model is not None:
        device = next(model.parameters()).device
        present = [{k: t.to(device) for k, t in v.items()} for v in present]
        spans = [v for v in range(len(present)) for _ in range(copies)]
        with torch.no_grad():                                   # the tower, once per video
            inputs.update(video_forward_kwargs(model, present, spans, input_ids.to(device)))
    elif present:
        for key in present[0]:
            inputs[key] = torch.cat([v[key] for v in present for _ in range(copies)])
        if processor_family(processor).token_types:
            inputs["mm_token_type_ids"] = (input_ids == video_token_id(processor)).int() * 2
    return inputs


# ================================================================================================
# 4. Data. A record is a chain of responses ranked best first under one prompt
#    {"id", "video"?, "prompt", "chain": [...]}, or a yes/no chain of prompts ranked best first
#    under one fixed response {"id", "video"?, "prompts": [...], "response": "no"}. Both become
#    K (prompt, response) pairs that share the record's video. Everything is checked up front.
# ================================================================================================

PREFERENCE_OBJECTIVES = ("rank", "dpo", "mpo", "hinge")
REFERENCE_OBJECTIVES = ("rank", "dpo", "mpo")       # the ones whose loss uses the reference model


@dataclass
class Chain:
    id: str
    path: str                                       # file and line, for error messages
    line: int
    field: str                                      # "chain" or "prompts": what varies
    video: str | None
    rows: list[tuple[list[int], list[int]]]         # per entry: (prompt_ids, response_ids)


def _string_list(path, line, record, field) -> list[str]:
    value = record[field]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise DataError(path, line, "expected a list of non-empty strings", field)
    return value


def _string(path, line, record, field) -> str:
    if not isinstance(record.get(field), str):
        raise DataError(path, line, "missing or not a string" if field not in record
                        else f"expected a string, got {type(record[field]).__name__}", field)
    return record[field]


def probe_clip(path: str, sampling: VideoSampling) -> Clip:
    """The clip as load_clip would return it, but with black frames of the right size: read
    from headers (and the first decoded frame, so an undecodable file fails here), not the whole
    video. Lets training count every record's video tokens before its first step."""
    if os.path.isdir(path) or path.endswith(".npy"):
        shape = None
        if path.endswith(".npy"):
            array = np.load(path, mmap_mode="r")
            if array.ndim != 4 or array.shape[-1] != 3:
                raise ValueError(f"{path}: expected a [T, H, W, 3] array, got shape {list(array.shape)}")
            total, shape, fps = array.shape[0], array.shape[1:3], None
        else:
            files = sorted(f for f in os.listdir(path) if f.lower().endswith(FRAME_EXTENSIONS))
            if not files:
                raise ValueError(f"{path}: folder holds no frames ({', '.join(FRAME_EXTENSIONS)})")
            total, shape, fps = len(files), _read_frame(os.path.join(path, files[0])).shape[:2], None
    elif path.lower().endswith(VIDEO_EXTENSIONS):
        av = require("av", "av", f"{path}: decoding video files")
        try:
            with av.open(path) as container:
                stream = container.streams.video[0]
                fps = float(stream.average_rate) if stream.average_rate else None
                total = stream.frames or sum(1 for p in container.demux(stream) if p.size)
                container.seek(0)
                first = next(container.decode(stream), None)
        except (av.error.FFmpegError, IndexError) as e:
            raise ValueError(f"{path}: cannot decode video ({e or 'no video stream'})") from None
        if first is None:
            raise ValueError(f"{path}: no video frames decoded")
        shape = (first.height, first.width)
    else:
        raise ValueError(f"{path}: unknown video format (use .npy, a folder of frames, or "
                         f"{'/'.join(VIDEO_EXTENSIONS)})")
    picked = _pick(total, fps, sampling)
    clip = Clip(np.zeros((len(picked), *shape, 3), np.uint8), picked, fps, total)
    if sampling.max_pixels and shape[0] * shape[1] > sampling.max_pixels:
        clip.frames = _shrink(clip.frames[:1], sampling.max_pixels).repeat(len(picked), 0)
    return clip


def video_tokens_of(processor, path: str, sampling: VideoSampling, cache: dict) -> int:
    """Prompt tokens the video at `path` takes, from the family's processor (cached per size)."""
    clip = probe_clip(path, sampling)
    key = (clip.frames.shape, tuple(clip.indices), clip.fps, clip.total)
    if key not in cache:
        cache[key] = len(video_inputs(processor, clip, sampling)["placeholder_ids"])
    return cache[key]


def resolve_video(path: str, line: int, record: dict, video_root: str | None) -> str | None:
    """The record's video resolved against video_root (default: the data file's folder);
    None for text-only records. A missing file is a DataError naming file:line:video."""
    if record.get("video") is None:
        return None
    video = os.path.join(video_root or os.path.dirname(path), _string(path, line, record, "video"))
    if not os.path.exists(video):
        raise DataError(path, line, f"video not found: {video} (paths are relative to "
                        "--video_root, default the data file's folder)", "video")
    return video


def chain_record(path: str, line: int, record: dict,
                 video_root: str | None = None) -> tuple[str, list[str], list[str], str | None]:
    """One ranked record, checked: (field, prompts, responses, video path or None).

    A caption chain {"prompt", "chain": [best, ..., worst]} has one prompt and K responses; a
    yes/no chain {"prompts": [best, ...], "response": "no"} has K prompts and one response.
    `field` names the ranked list, for error messages. Used by training and by eval_judge.py.
    """
    if "chain" in record:
        field, responses = "chain", _string_list(path, line, record, "chain")
        prompts = [_string(path, line, record, "prompt")] * len(responses)
    elif "prompts" in record:
        field, prompts = "prompts", _string_list(path, line, record, "prompts")
        responses = [_string(path, line, record, "response")] * len(prompts)
    else:
        raise DataError(path, line, "a record needs 'chain' (responses ranked best first, "
                        "with 'prompt') or 'prompts' (prompts ranked best first, with "
                        "'response')", "chain")
    return field, prompts, responses, resolve_video(path, line, record, video_root)


def load_chains(path: str, processor, objective: str, video_root: str | None = None,
                max_chain: int | None = None, max_length: int = 2048,
                sampling: int | VideoSampling = 8) -> tuple[list[Chain], int]:
    """Read, check and tokenize every record; any problem is a DataError naming file:line:field.
    Every video is probed (headers and first frame) so a missing or undecodable file, or a prompt
    too long once its video tokens are counted, is reported before training starts.

    Returns (chains, left_out): records gen_chains.py wrote with a status other than "ok"
    (failed, no_preference) hold no ranking and are left out, and counted.
    """
    sampling, token_cache = _sampling(sampling), {}
    takes_video = getattr(processor, "video_processor", None) is not None
    found, left_out = read_records(path)
    chains = []
    for line, record in found:
        field, prompts, responses, video = chain_record(path, line, record, video_root)
        if video is not None and not takes_video:
            raise DataError(path, line, "this model's processor takes no video", "video")
        if max_chain is not None:
            prompts, responses = prompts[:max_chain], responses[:max_chain]
        if not prompts or (objective in PREFERENCE_OBJECTIVES and len(prompts) < 2):
            raise DataError(path, line, f"has {len(prompts)} entr{'y' if len(prompts) == 1 else 'ies'}"
                            f"{' after --max_chain' if max_chain else ''}; the {objective} objective "
                            "needs at least 2, ranked best first", field)
        rows = [encode_text(processor, p, r, video is not None) for p, r in zip(prompts, responses)]
        video_tokens = 1
        if video is not None:
            try:
                video_tokens = video_tokens_of(processor, video, sampling, token_cache)
            except (OSError, ValueError) as e:
                raise DataError(path, line, str(e), "video") from None
        for prompt_ids, _ in rows:           # the placeholder becomes video_tokens tokens
            length = len(prompt_ids) + video_tokens - 1
            if length >= max_length:
                raise DataError(path, line, f"prompt is {length} tokens"
                                f"{' (video included)' if video else ''}, max_length is {max_length}",
                                "prompts" if field == "prompts" else "prompt")
        chains.append(Chain(record["id"], path, line, field, video, rows))
    if not chains:
        raise DataError(path, None, f"no usable records ({left_out} not ok)" if left_out
                        else "no records")
    return chains, left_out


def collate(chains: list[Chain], processor, sampling: int | VideoSampling, max_length: int):
    """A Batch of all the chains' sequences plus chains [B, K]: row indices best first, -1 pad."""
    rows, videos, members = [], [], []
    for chain in chains:
        vid = -1
        if chain.video is not None:
            try:
                clip = load_clip(chain.video, sampling)
            except (OSError, ValueError) as e:
                raise DataError(chain.path, chain.line, str(e), "video") from None
            videos.append(video_inputs(processor, clip, _sampling(sampling)))
            vid = len(videos) - 1
        members.append(list(range(len(rows), len(rows) + len(chain.rows))))
        rows += [(p, r, vid) for p, r in chain.rows]
    try:
        batch = make_batch(processor, rows, videos, max_length)
    except PromptTooLong as e:
        chain = chains[next(i for i, m in enumerate(members) if e.row in m)]
        raise DataError(chain.path, chain.line, str(e),
                        "prompts" if chain.field == "prompts" else "prompt") from None
    index = torch.full((len(chains), max(len(m) for m in members)), -1, dtype=torch.long)
    for b, m in enumerate(members):
        index[b, :len(m)] = torch.tensor(m)
    return batch, index


def _sampling(sampling: int | VideoSampling) -> VideoSampling:
    return sampling if isinstance(sampling, VideoSampling) else VideoSampling(sampling)


def step_batches(n_chains: int, step: int, seed: int, batch_size: int, grad_accum: int,
                 world: int, rank: int) -> list[list[int]]:
    """This rank's micro-batches (chain indices) for optimizer step `step` (0-based).

    Every epoch is a fresh permutation of the data (seeded by seed + epoch); each step takes the
    next global batch of batch_size * grad_accum * world chains and rank r gets its slices. The
    data position is therefore a function of the step alone, which is what makes resume exact.
    A last partial global batch of an epoch is dropped.
    """
    global_batch = batch_size * grad_accum * world
    per_epoch = n_chains // global_batch
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng(seed + epoch).permutation(n_chains)[i * global_batch:]
    return [order[(m * world + rank) * batch_size:][:batch_size].tolist()
            for m in range(grad_accum)]


# ================================================================================================
# 5. Training: arguments, LoRA and the vision choice, DDP, the step, checkpoints, the loop.
# ================================================================================================

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Learning to rank caption chains (Plackett-Luce DPO) "
                                "and its baselines, on a VLM or LM with LoRA.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny', a local path or a hub name")
    p.add_argument("--data", required=True, help="chains JSONL (chain or yes/no records)")
    p.add_argument("--video_root", help="videos are relative to this (default: the data file's folder)")
    p.add_argument("--objective", choices=kernels.OBJECTIVES, default="rank")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--ntp_weight", type=float, default=0.1, help="NTP term on the best response")
    p.add_argument("--ntp_norm", choices=("mean", "sum"), default="mean",
                   help="NTP term as the mean token NLL of y_0 (the kernels' term) or the summed "
                        "NLL (the scale of the preference terms); sft itself is always the mean")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--batch_size", type=int, default=1, help="chains per rank per micro-step")
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--max_steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--max_chain", type=int, help="keep the first K entries of every chain")
    p.add_argument("--vision", choices=("frozen", "lora", "full"), default="lora",
                   help="vision encoder: no grads, LoRA on its linear layers, or fully trained")
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--lora_alpha", type=float, help="default: 2 * lora_r")
    p.add_argument("--modules_to_save", default="auto",
                   help="comma-separated modules trained in full beside LoRA (the reference keeps "
                   "the originals); 'auto': the ones the model names (the tiny preset's lm_head "
                   "and final norm), none for pretrained models; 'none'")
    add_video_flags(p)
    add_attention_flag(p)
    p.add_argument("--max_length", type=int, default=2048, help="tokens per sequence, video included")
    p.add_argument("--save_every", type=int, default=500, help="checkpoint every N steps (0: end only)")
    p.add_argument("--keep_checkpoints", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss_backend", choices=kernels.BACKENDS, default="auto")
    p.add_argument("--init", metavar="ADAPTER_DIR", help="warm start: merge this saved adapter "
                   "first (e.g. an SFT run); it then is the reference model too")
    p.add_argument("--warmup_steps", type=int, default=0)
    p.add_argument("--lr_schedule", choices=("cosine", "linear", "constant"), default="cosine")
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--shared_prefix", choices=FEATURE_MODES, default="auto",
                   help="run each chain's prompt and video through the LM once (one packed "
                   "sequence per chain); auto: where the model family supports it, else off "
                   "with the reason in the log")
    p.add_argument("--pack_chains", type=pack_budget, default="auto", metavar="off|auto|N",
                   help="with the packed forward (--shared_prefix), lay several chains of a "
                   "micro-batch back to back in one row (first-fit decreasing; they never see "
                   "each other), so rows carry less padding: auto = rows no longer than the "
                   "batch's longest chain; N = rows of up to N tokens (a longer chain gets a row "
                   "of its own); off = one chain per row")
    p.add_argument("--fused_linear", choices=FEATURE_MODES, default="auto",
                   help="apply the LM head inside the fused loss, chunk by chunk, so the response "
                   "logits are never materialised; auto: where the head is a plain linear layer "
                   "and the packed forward runs, else off with the reason in the log")
    p.add_argument("--ref_logps", choices=REF_LOGPS_MODES, default="auto",
                   help="the reference's log-probs: cache (each caption's computed once, then read "
                   "from --ref_cache: from the second epoch on no reference forward runs) or "
                   "recompute (every step); auto: cache where the objective uses the reference")
    p.add_argument("--ref_cache", metavar="PATH", help="the reference log-prob cache (JSONL, "
                   "safe to share between runs and ranks: entries are keyed by the reference, the "
                   "video flags, max_length and precision); default OUT/ref_logps.jsonl")
    p.add_argument("--log_every", type=int, default=1)
    p.add_argument("--val_data", help="validation chains (same format as --data), scored every "
                   "--val_every steps into OUT/validation.jsonl; the best point's adapter is kept "
                   "in OUT/best")
    p.add_argument("--val_every", type=int, help="steps between validation points (default: "
                   "--save_every); a checkpoint is written at each")
    p.add_argument("--select_by", choices=tuple(SELECT_BY), default="loss",
                   help="the validation number that picks OUT/best: loss (the objective's own "
                        "term without the NTP anchor; sft: its NTP; lower), logp_acc (share of "
                        "ordered pairs the policy's log-probs rank right; higher) or nll "
                        "(-log p(y_0) summed; lower)")
    p.add_argument("--min_gain", type=float, default=0.0, help="a validation point is better only "
                   "by more than this (relative for loss and nll, absolute for logp_acc)")
    p.add_argument("--patience", type=int, default=0, help="stop after this many validation points "
                   "without a better one (0: train all --max_steps)")
    args = p.parse_args(argv)
    if args.val_data is None and args.patience:
        p.error("--patience needs --val_data")
    if args.ref_logps == "cache" and args.objective not in REFERENCE_OBJECTIVES:
        p.error(f"--ref_logps cache: the {args.objective} objective uses no reference model "
                f"(those that do: {', '.join(REFERENCE_OBJECTIVES)})")
    args.val_every = args.val_every or args.save_every or args.max_steps
    if args.max_chain is not None and args.max_chain < (2 if args.objective != "sft" else 1):
        p.error(f"--max_chain {args.max_chain} leaves no pair to rank for --objective {args.objective}")
    for name in ("batch_size", "grad_accum", "max_steps", "num_frames", "max_length", "lora_r"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


def add_video_flags(p: argparse.ArgumentParser, from_run: bool = False) -> None:
    """--num_frames/--fps/--max_pixels: the same flags in rank_dpo.py, eval_judge.py and the
    reward step; a run stores them in rank_dpo.json and evaluation reuses them (from_run: the
    flags default to the adapter's run, then to VideoSampling's defaults)."""
    p.add_argument("--num_frames", type=int, default=None if from_run else 8,
                   help="frames sampled per video (uniformly over the clip, or at --fps)"
                   + ("; default: the adapter's run, else 8" if from_run else ""))
    p.add_argument("--fps", type=float, help="sample this many frames per second of video "
                   "(at most --num_frames); default: --num_frames spread uniformly")
    p.add_argument("--max_pixels", type=int, help="cap on height x width of each frame, "
                   "passed to the model's video processor (default: the processor's own)")


def add_attention_flag(p: argparse.ArgumentParser, from_run: bool = False) -> None:
    """--attn_implementation, in rank_dpo.py and every eval_judge.py command that loads the
    policy; a run stores it in rank_dpo.json and evaluation reuses it (from_run)."""
    p.add_argument("--attn_implementation", default=None, help="attention backend: "
                   + ", ".join(ATTN_IMPLEMENTATIONS) + " (default: "
                   + ("the adapter's run, else " if from_run else "") + "what transformers "
                   "picks); the packed forward (--shared_prefix) runs under each, see README")


def setup_distributed():
    """(rank, world, device). Under torchrun: one process per GPU with NCCL, or gloo on CPU."""
    import torch.distributed as dist
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


VISION_MODULES = ("visual", "vision_tower", "vision_model", "multi_modal_projector")


def vision_module_names(model) -> list[str]:
    """Top-level names of the vision encoder (and projector) inside a VLM; [] for an LM."""
    names = [n for n, _ in model.named_modules() if n.split(".")[-1] in VISION_MODULES]
    return [n for n in names if not any(n.startswith(o + ".") for o in names)]


def add_adapters(model, args):
    """LoRA on every linear layer of the language model; the vision encoder per --vision.

    frozen: the tower gets no gradients. lora: LoRA on its linear layers too; disabling the
    adapters restores it, so the reference stays the untouched network. full: the whole tower
    trains as a peft `modules_to_save` copy: peft keeps the original beside the trained copy
    and runs the original while adapters are disabled, so the reference still sees the
    original tower (LoRA-disabling alone could not undo full-weight updates). Costs one extra
    copy of the tower, never a second copy of the language model.
    """
    from peft import LoraConfig, get_peft_model
    vision = vision_module_names(model)

    def in_vision(name):
        return any(name == v or name.startswith(v + ".") for v in vision)

    linear = [n for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and n.split(".")[-1] != "lm_head"]
    targets = [n for n in linear if not in_vision(n)]
    if args.vision == "lora":
        targets += [n for n in linear if in_vision(n)]
    full = (vision if args.vision == "full" else []) + full_modules(model, args)
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha or 2 * args.lora_r,
                        lora_dropout=0.0, target_modules=targets, modules_to_save=full or None)
    with _quiet_peft():
        return get_peft_model(model, config)


def full_modules(model, args) -> list[str]:
    """--modules_to_save: modules trained in full beside LoRA. 'auto' is the model's own
    `default_modules_to_save`: none for pretrained models, the output layer and final norm for
    the tiny preset (synthetic.py says why)."""
    if args.modules_to_save == "none":
        return []
    if args.modules_to_save == "auto":
        return list(getattr(model, "default_modules_to_save", ()))
    names = [n.strip() for n in args.modules_to_save.split(",") if n.strip()]
    present = {n for n, _ in model.named_modules()}
    missing = [n for n in names if n not in present and not any(p.endswith("." + n) for p in present)]
    if missing:
        raise SystemExit(f"--modules_to_save: no module named {', '.join(missing)} in {args.model}")
    return names


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warmup to the peak, then cosine or linear decay towards zero (or constant)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress,
            "constant": 1.0}[schedule]


def chain_stats(logps, ref, counts, index, beta) -> torch.Tensor:
    """Sums for the logged metrics: [ntp, chains, margin, adjacent pairs, right pairs, pairs,
    pairs right by log-prob, log p(y_0), log p(y_last)].

    The score is the implicit reward beta*(logp - ref) when the objective has a reference,
    else the policy log-prob (sft, hinge). margin = mean score gap between neighbours in a
    chain; ranking accuracy = share of ordered pairs (i < j) scored in the right order (by the
    score, and by the policy's log-probs alone, which every objective can be compared on).
    """
    mask, rows = index >= 0, index.clamp_min(0)
    policy = logps[rows]
    score = beta * (policy - ref[rows]) if ref is not None else policy
    best = rows[:, 0]
    last = rows.gather(1, (mask.sum(1, keepdim=True) - 1).clamp_min(0)).squeeze(1)
    ntp = -logps[best] / counts[best].clamp_min(1)
    adjacent = mask[:, 1:] & mask[:, :-1]
    gaps = (score[:, :-1] - score[:, 1:])[adjacent]
    k = index.shape[1]
    pairs = torch.ones(k, k, dtype=torch.bool, device=index.device).triu(1) & \
        mask.unsqueeze(2) & mask.unsqueeze(1)
    right = (score.unsqueeze(2) > score.unsqueeze(1)) & pairs
    right_logp = (policy.unsqueeze(2) > policy.unsqueeze(1)) & pairs
    return torch.stack([ntp.sum(), torch.tensor(float(len(index))), gaps.sum(),
                        torch.tensor(float(len(gaps))), right.sum().float(),
                        pairs.sum().float(), right_logp.sum().float(), logps[best].sum(),
                        logps[last].sum()]).double().cpu()


STATS = 10      # chain_stats' sums and, last, the preference loss (chain_loss_step)


def stats_row(sums: torch.Tensor, pref_divisor: float) -> dict:
    """The logged numbers from summed STATS (pref: a sum of per-batch means, over pref_divisor)."""
    ntp, n, gap, n_gap, right, pairs, right_logp, logp_c0, logp_ck, pref = sums.tolist()
    return {"pref_loss": pref / pref_divisor, "ntp": ntp / n, "margin": gap / max(n_gap, 1),
            "rank_acc": right / max(pairs, 1), "logp_acc": right_logp / max(pairs, 1),
            "logp_c0": logp_c0 / n, "logp_cK": logp_ck / n}


# ------------------------------------------------------------------------------------------------
# Validation: held-out chains scored during training, the best adapter kept, early stopping
# ------------------------------------------------------------------------------------------------

# --select_by: the validation number compared. loss: the objective's own term without the NTP
# anchor (sft: its NTP, the whole of its loss); logp_acc: pairs the log-probs rank right;
# nll: -log p(y_0) summed over its tokens
SELECT_BY = {"loss": "lower", "logp_acc": "higher", "nll": "lower"}


def validate(model, chains, processor, args, vision_trainable, shared_prefix, fused_linear,
             world: int, rank: int, device, ref_cache: ReferenceCache | None = None) -> dict:
    """The validation chains under the current policy, no gradient, each rank its share: the
    loss's parts and the ranking numbers (stats_row), plus nll = -log p(y_0) per chain."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(STATS, dtype=torch.float64)
    with torch.no_grad():
        for start in range(rank * args.batch_size, len(chains), world * args.batch_size):
            micro = chains[start:start + args.batch_size]
            batch, index = collate(micro, processor, VideoSampling.of(args), args.max_length)
            batch.to(device)
            _, stats = chain_loss_step(model, batch, index, args, vision_trainable, shared_prefix,
                                       fused_linear, ref_cache.rows(micro) if ref_cache else None)
            stats[-1] *= len(micro)                  # the batch's mean loss -> its sum
            sums += stats
    model.train(was_training)
    row = stats_row(all_reduce_(sums, world), pref_divisor=len(chains))
    return {**row, "loss": row["ntp"] if args.objective == "sft" else row["pref_loss"],
            "nll": -row["logp_c0"]}


def best_validation(rows: list[dict], select_by: str, min_gain: float) -> tuple[dict | None, int]:
    """(the best validation row, validations since it). A row beats the best so far when its
    --select_by number is better by more than min_gain (relative for loss and nll, absolute for
    logp_acc)."""
    best, stale = None, 0
    for r in rows:
        x = r[select_by]
        if best is None or (x < best[select_by] * (1 - min_gain) if SELECT_BY[select_by] == "lower"
                            else x > best[select_by] + min_gain):
            best, stale = r, 0
        else:
            stale += 1
    return best, stale


def save_best(model, args, out: str) -> None:
    """OUT/best: the adapter of the best validation point, loadable like the run itself."""
    final, tmp = os.path.join(out, "best"), os.path.join(out, "best.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    write_meta(tmp, args, os.path.join("..", "init") if args.init else None)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


# ------------------------------------------------------------------------------------------------
# Reference log-probs, computed once (--ref_logps). The reference (the base with the --init warm
# start merged, adapters off) never changes during a run, and the loss needs nothing of it but
# each caption's summed log-prob: that number is cached in a file the first time a caption is met
# and read back after that, so from the second epoch on a step runs no reference forward. The key
# holds everything the number depends on; a changed key computes it again.
# ------------------------------------------------------------------------------------------------

REF_LOGPS_MODES = ("auto", "cache", "recompute")
REF_CACHE_FILE = "ref_logps.jsonl"
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def files_fingerprint(path: str, extensions: tuple[str, ...] | None = None) -> str:
    """A cheap identity of a file, or of a folder's files (non-recursive): names, sizes and
    modification times, hashed. A copied or rewritten file gets a new one (computed again,
    never wrongly reused); the bytes themselves are not read."""
    if os.path.isdir(path):
        names = sorted(f for f in os.listdir(path)
                       if extensions is None or f.lower().endswith(extensions))
    else:
        path, names = os.path.dirname(path), [os.path.basename(path)]
    stats = []
    for name in names:
        st = os.stat(os.path.join(path, name))
        stats.append((name, st.st_size, st.st_mtime_ns))
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


def adapter_hash(adapter: str) -> str:
    """sha256 of a saved adapter's weights and config, and of its own warm start (init/) in
    turn: the --init part of the reference's identity."""
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        if os.path.isfile(os.path.join(adapter, name)):
            with open(os.path.join(adapter, name), "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
    init = read_run_meta(adapter).get("init")
    if init:
        digest.update(adapter_hash(os.path.join(adapter, init)).encode())
    return digest.hexdigest()[:16]


def reference_weights(args, net) -> dict:
    """The reference's weights, identified before the adapters go on: the base by name plus a
    local directory's weight files (files_fingerprint), a hub name's by those of the cached
    snapshot it loaded (its commit's folder), a model built in memory (no directory holds it;
    small by construction) by its weights' hash; the --init warm start by its hash
    (adapter_hash); the weights' dtype."""
    weights = None
    if os.path.isdir(args.model):
        weights = files_fingerprint(args.model, WEIGHT_FILES)
    elif (preset := embedded_preset(args.model)) is not None and preset.built:
        digest = hashlib.sha256()
        for name, tensor in sorted(net.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        weights = digest.hexdigest()[:16]
    else:
        from huggingface_hub import try_to_load_from_cache
        found = try_to_load_from_cache(args.model, "config.json")
        if isinstance(found, str):
            snapshot = os.path.dirname(found)
            weights = [os.path.basename(snapshot), files_fingerprint(snapshot, WEIGHT_FILES)]
    return {"model": args.model, "weights": weights, "dtype": str(next(net.parameters()).dtype),
            "init": adapter_hash(args.init) if args.init else None}


def reference_identity(args, weights: dict, model, device, shared_prefix: bool,
                       fused_linear: bool) -> dict:
    """Everything besides the caption that changes a reference log-prob: the reference's weights
    (reference_weights), the video flags, max_length (truncation), and the numerics: device and
    precision (a bf16 GPU run and an fp32 CPU run differ in the third digit), attention backend,
    forward route (packed or not, LM head fused or not), loss backend, library versions."""
    import transformers
    cuda = device.type == "cuda"
    return {
        **weights, "video": VideoSampling.of(args).as_dict(), "max_length": args.max_length,
        "device": torch.cuda.get_device_name(device) if cuda else device.type,
        "autocast": "bfloat16" if cuda else None,
        "attention": attention_backend(model),
        "route": ("packed+fused head" if fused_linear else "packed") if shared_prefix else "rows",
        "loss_backend": args.loss_backend,
        "versions": [torch.__version__, transformers.__version__],
    }


def caches_ref_logps(args) -> bool:
    """--ref_logps auto|cache|recompute -> whether reference log-probs are cached: where the
    objective uses the reference (REFERENCE_OBJECTIVES), unless recompute (parse_args refuses
    cache for one that does not)."""
    return args.objective in REFERENCE_OBJECTIVES and args.ref_logps != "recompute"


class ReferenceCache:
    """Each caption's reference log-prob, keyed by the reference's identity (reference_identity),
    the record id, the video file (files_fingerprint) and the row's token ids (prompt and
    response as the chat template and tokenizer render them), in a SharedCache file."""

    def __init__(self, path: str, identity: dict, dtype: torch.dtype):
        self.file = SharedCache(path)
        self.identity = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        self.dtype = dtype                   # what the kernels return: fp32 (fp64 for fp64 logits)
        self._keys: dict[tuple[str, int], list[str]] = {}

    def row_keys(self, chain: Chain) -> list[str]:
        """One key per row of the chain (computed once per chain)."""
        memo = (chain.path, chain.line)
        if memo not in self._keys:
            video = [chain.video, files_fingerprint(chain.video, FRAME_EXTENSIONS)] \
                if chain.video is not None else None
            self._keys[memo] = [hashlib.sha256(json.dumps(
                [self.identity, chain.id, video, prompt_ids, response_ids]).encode()).hexdigest()[:32]
                for prompt_ids, response_ids in chain.rows]
        return self._keys[memo]

    def rows(self, chains: list[Chain]) -> "CachedRows":
        """The rows of a micro-batch of chains, in collate's order."""
        return CachedRows(self, [k for chain in chains for k in self.row_keys(chain)])

    def cached(self, keys: list[str]) -> int:
        return sum(self.file.get(k) is not None for k in keys)


@dataclass
class CachedRows:
    """One micro-batch's keys: lookup() gives its [N] reference log-probs when every row is in
    the file (re-reading what other ranks and runs appended since, on a miss), store() adds the
    missing ones. `hit` says whether the last lookup served the batch."""
    cache: ReferenceCache
    keys: list[str]
    hit: bool = False

    def lookup(self, device) -> torch.Tensor | None:
        if self.cache.cached(self.keys) < len(self.keys):
            self.cache.file.refresh()
        self.hit = self.cache.cached(self.keys) == len(self.keys)
        if not self.hit:
            return None
        return torch.tensor([self.cache.file.get(k) for k in self.keys], dtype=self.cache.dtype,
                            device=device)

    def store(self, ref: torch.Tensor) -> None:
        self.cache.file.add(dict(zip(self.keys, ref.double().cpu().tolist())))


def open_reference_cache(args, weights: dict, model, device, shared_prefix: bool,
                         fused_linear: bool) -> ReferenceCache:
    """--ref_cache, default OUT/ref_logps.jsonl, for this run's reference."""
    path = args.ref_cache or os.path.join(args.output_dir, REF_CACHE_FILE)
    identity = reference_identity(args, weights, model, device, shared_prefix, fused_linear)
    dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    return ReferenceCache(path, identity, dtype)


def head_inputs(model, hidden):
    """(hidden, weight, bias) in one dtype, as the fused-linear kernels take them."""
    head = output_head(model)
    bias = head.bias.to(hidden.dtype) if head.bias is not None else None
    return hidden, head.weight.to(hidden.dtype), bias


def reference_logps(model, batch: Batch, packing: Packing | None,
                    video_embeds: list[VideoFeatures] | None, fused_linear: bool, backend: str,
                    autocast) -> torch.Tensor:
    """[N] the reference's summed log-prob of every row (adapters off, no grad)."""
    with torch.no_grad(), model.disable_adapter(), autocast:
        if fused_linear:
            hidden, labels = packed_hidden_states(model, batch, packing, video_embeds)
            h, w, b = head_inputs(model, hidden)
            ref, _ = kernels.fused_linear_sequence_logps(h, w, labels, bias=b, backend=backend)
        else:
            ref_logits, labels = chain_logits(model, batch, packing, video_embeds)
            ref, _ = kernels.sequence_logps(ref_logits, labels, backend=backend)
    return ref


def chain_loss_step(model, batch: Batch, index: torch.Tensor, args, vision_trainable: bool,
                    shared_prefix: bool = False, fused_linear: bool = False,
                    cached_ref: CachedRows | None = None):
    """Reference log-probs (adapters off, no grad), policy forward, the fused loss.

    Returns (loss, stats). The videos are encoded once per pass; with a frozen tower once in
    all, since the policy and the reference then see the same video features. shared_prefix:
    each chain is one packed sequence (section 3b), its prefix run once per pass, and with
    args.pack_chains several chains share a row. fused_linear: the LM head is applied inside
    the loss kernel, chunk by chunk (needs shared_prefix).
    cached_ref: the batch's rows in the reference cache (--ref_logps): when all are there, no
    reference forward runs; else it runs and the missing ones are added.
    """
    packing = pack_model_chains(model, batch, index, getattr(args, "pack_chains", "off")) \
        if shared_prefix else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if batch.input_ids.is_cuda \
        else contextlib.nullcontext()
    shared = None
    if batch.videos and not vision_trainable:
        with torch.no_grad(), autocast:
            shared = encode_videos(model, batch.videos)
    summed_ntp = getattr(args, "ntp_norm", "mean") == "sum" and args.objective != "sft"
    loss_args = dict(objective=args.objective, beta=args.beta,
                     ntp_weight=0.0 if summed_ntp else args.ntp_weight, backend=args.loss_backend)

    ref = None
    if args.objective in REFERENCE_OBJECTIVES:
        ref = cached_ref.lookup(batch.input_ids.device) if cached_ref is not None else None
        if ref is None:
            ref = reference_logps(model, batch, packing, shared, fused_linear, args.loss_backend,
                                  autocast)
            if cached_ref is not None:
                cached_ref.store(ref)
    if fused_linear:
        with autocast:
            hidden, labels = packed_hidden_states(model, batch, packing, shared)
        h, w, b = head_inputs(model, hidden)
        device = hidden.device
        loss, logps = kernels.fused_linear_chain_loss(
            h, w, labels, index.to(device),
            ref if ref is not None else torch.zeros(len(labels), device=device), bias=b,
            **loss_args)
    else:
        with autocast:
            logits, labels = chain_logits(model, batch, packing, shared)
        device = logits.device
        loss, logps = kernels.fused_chain_loss(
            logits, labels, index.to(device),
            ref if ref is not None else torch.zeros(len(labels), device=device),
            inplace_backward=True, **loss_args)   # logits come straight from the LM head, which
        # needs only its input and weight for backward: their gradient may overwrite them
    counts = (labels != IGNORE_INDEX).sum(-1)
    best = index[:, 0].to(logps.device)
    if summed_ntp:   # the kernels' NTP is per token; this one is the summed NLL of y_0, added
        # here from the per-sequence log-probs (they carry the gradient back to the logits)
        ntp_term = args.ntp_weight * (-logps[best]).mean()
        loss = loss + ntp_term
    elif args.objective == "sft":
        ntp_term = loss
    else:            # what the kernels added: ntp_weight * mean token NLL of y_0
        ntp_term = args.ntp_weight * (-logps[best] / counts[best].clamp_min(1)).mean()
    stats = chain_stats(logps.detach().float(), ref, counts, index.to(device), args.beta)
    # the preference loss alone (the loss without its NTP term), logged as pref_loss
    stats = torch.cat([stats, (loss - ntp_term).detach().double().cpu().view(1)])
    return loss, stats


def all_reduce_(tensor: torch.Tensor, world: int, op="sum") -> torch.Tensor:
    import torch.distributed as dist
    if world > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor


def average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """One all-reduce of every trainable gradient per optimizer step (not per micro-step, as
    DDP would do without no_sync). A parameter a rank did not use counts as a zero gradient."""
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_(flat, world).div_(world)
    for p, g in zip(params, flat.split([q.numel() for q in params])):
        p.grad = g.view_as(p).clone()


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # Linux: KiB


# Checkpoints: OUT/checkpoints/step-NNNNNN/ = the peft adapter (safetensors) + rank_dpo.json +
# trainer_state.pt (optimizer, scheduler, step) + rng-<rank>.pt. Written to a .tmp folder and
# renamed, so a kill -9 mid-write leaves the previous checkpoint intact.

RESUME_KEYS = ("model", "data", "objective", "vision", "lora_r", "lora_alpha", "modules_to_save",
               "init", "batch_size", "grad_accum", "seed", "max_chain", "num_frames", "fps", "max_pixels",
               "max_length", "beta", "ntp_weight", "ntp_norm")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def latest_checkpoint(out: str) -> str | None:
    found = sorted(d for d in glob.glob(os.path.join(out, "checkpoints", "step-*"))
                   if not d.endswith(".tmp") and os.path.isfile(os.path.join(d, "trainer_state.pt")))
    return found[-1] if found else None


def write_meta(directory: str, args, init: str | None) -> None:
    meta = {"base_model": args.model, "init": init, "objective": args.objective,
            "vision": args.vision, "video": VideoSampling.of(args).as_dict(),
            "attn_implementation": getattr(args, "attn_implementation", None), "args": vars(args)}
    write_run_meta(directory, meta)


def copy_adapter(src: str, dst: str) -> None:
    """Copy a saved adapter (with its own warm start, recursively), not its checkpoints."""
    os.makedirs(dst, exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", RUN_META):
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), dst)
    if os.path.isdir(os.path.join(src, "init")):
        copy_adapter(os.path.join(src, "init"), os.path.join(dst, "init"))


def save_checkpoint(args, step, model, optimizer, scheduler, rank, world) -> str:
    import torch.distributed as dist
    final = os.path.join(args.output_dir, "checkpoints", f"step-{step:06d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if world > 1:
        dist.barrier()
    torch.save(rng_state(), os.path.join(tmp, f"rng-{rank}.pt"))
    if world > 1:
        dist.barrier()
    if rank == 0:
        model.save_pretrained(tmp)
        write_meta(tmp, args, os.path.join("..", "..", "init") if args.init else None)
        torch.save({"step": step, "world": world, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "args": {k: getattr(args, k) for k in RESUME_KEYS}},
                   os.path.join(tmp, "trainer_state.pt"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(glob.glob(os.path.join(args.output_dir, "checkpoints", "step-*")))[
                :-args.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        dist.barrier()
    return final


def load_checkpoint(path, args, model, optimizer, scheduler, rank, world) -> int:
    """Restore adapters, optimizer, scheduler and this rank's RNG; returns the step reached."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu",
                       weights_only=False)
    changed = [k for k in RESUME_KEYS if state["args"].get(k) != getattr(args, k)]
    if changed or state["world"] != world:
        raise SystemExit(f"--resume: {path} was trained with different settings "
                         f"({', '.join(changed) or 'world size'}); use a new --output_dir")
    weights = load_file(os.path.join(path, "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    if result.unexpected_keys:
        raise SystemExit(f"--resume: {path} holds weights this model lacks: "
                         f"{result.unexpected_keys[:3]}")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(torch.load(os.path.join(path, f"rng-{rank}.pt"), weights_only=False))
    return state["step"]


def train(args) -> list[dict]:
    """Run training; returns the logged metrics (every rank returns the same numbers)."""
    import torch.distributed as dist
    from tqdm.auto import tqdm
    rank, world, device = setup_distributed()
    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    resume_from = latest_checkpoint(out) if args.resume else None
    if not args.resume and latest_checkpoint(out):
        raise SystemExit(f"{out} already has checkpoints: pass --resume, or a new --output_dir")

    # Model: the base (plus the warm start merged in: the reference is then the warm start),
    # LoRA on top, the same seed on every rank so every rank starts from the same adapters.
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed)
    model, processor = load_base(args.model, device=device,
                                 attn_implementation=args.attn_implementation)
    check_trainable_backend(model, device)
    if args.init:
        model = merge_adapter(model, args.init)
    ref_weights = reference_weights(args, model) if caches_ref_logps(args) else None
    chains, left_out = load_chains(args.data, processor, args.objective, args.video_root,
                                   args.max_chain, args.max_length, VideoSampling.of(args))
    if rank == 0:
        print(f"{args.data}: {len(chains)} chains"
              + (f"; {left_out} records left out (status not 'ok')" if left_out else ""), flush=True)
    val_chains = []
    if args.val_data:
        # whole chains, whatever --max_chain trains on: runs validated on the same numbers
        val_chains, _ = load_chains(args.val_data, processor, args.objective, args.video_root,
                                    None, args.max_length, VideoSampling.of(args))
        if rank == 0:
            print(f"{args.val_data}: {len(val_chains)} validation chains, scored every "
                  f"{args.val_every} steps", flush=True)
    global_batch = args.batch_size * args.grad_accum * world
    if len(chains) < global_batch:
        raise DataError(args.data, None, f"{len(chains)} chains, fewer than one global batch "
                        f"(batch_size x grad_accum x ranks = {global_batch})")
    if args.gradient_checkpointing:      # recompute activations in backward: memory for time
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = add_adapters(model, args)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:                     # bf16 base weights on GPU; trained weights stay fp32
        p.data = p.data.float()
    if world > 1:
        for p in params:
            dist.broadcast(p.data, 0)
    vision_trainable = args.vision != "frozen" and bool(vision_module_names(model))
    shared_prefix = resolve_shared_prefix(model, args.shared_prefix,
                                          log=print if rank == 0 else None)
    fused_linear = resolve_fused_linear(model, args.fused_linear, shared_prefix,
                                        log=print if rank == 0 else None)
    ref_cache = None
    if ref_weights is not None:
        ref_cache = open_reference_cache(args, ref_weights, model, device, shared_prefix,
                                         fused_linear)
        if rank == 0:
            keys = [k for c in chains + val_chains for k in ref_cache.row_keys(c)]
            print(f"--ref_logps cache: {ref_cache.cached(keys)} of {len(keys)} captions' "
                  f"reference log-probs already in {ref_cache.file.path}", flush=True)
    torch.manual_seed(args.seed + rank)

    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, args.warmup_steps, args.max_steps, args.lr_schedule))
    step = 0
    if resume_from:
        step = load_checkpoint(resume_from, args, model, optimizer, scheduler, rank, world)
    elif args.resume and rank == 0:
        print(f"--resume: no checkpoint in {out}/checkpoints yet; starting at step 0")

    metrics_path = os.path.join(out, "metrics.jsonl")
    validation_path = os.path.join(out, "validation.jsonl")
    if rank == 0:
        write_meta(out, args, "init" if args.init else None)
        if args.init and not resume_from:
            copy_adapter(args.init, os.path.join(out, "init"))
        preset, base = embedded_preset(args.model), os.path.join(out, "base")
        if preset is not None and preset.built and not os.path.isdir(base):
            preset.save_base(base)      # no directory holds a built model: load_model(OUT/base)
        for path in (metrics_path, validation_path):    # drop rows past the resumed step
            kept = []
            if os.path.exists(path):
                with open(path) as f:
                    kept = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
            with open(path, "w") as f:
                f.writelines(kept)
    if world > 1:
        dist.barrier()
    validations = load_jsonl(validation_path) if val_chains else []
    best, stale = best_validation(validations, args.select_by, args.min_gain)

    stop = {"signal": None}                             # SIGTERM: checkpoint, then exit cleanly
    previous_handler = signal.signal(signal.SIGTERM, lambda sig, frame: stop.update(signal=sig))
    logged, bar = [], tqdm(total=args.max_steps, initial=step, disable=rank != 0, desc="train")
    saved_at = step if resume_from else None
    try:
        while step < args.max_steps and not (args.patience and stale >= args.patience):
            t0 = time.perf_counter()
            stats, tokens = torch.zeros(STATS, dtype=torch.float64), 0
            losses, ref_rows = [], torch.zeros(2, dtype=torch.float64)   # [cached, all]
            for ids in step_batches(len(chains), step, args.seed, args.batch_size,
                                    args.grad_accum, world, rank):
                micro = [chains[i] for i in ids]
                batch, index = collate(micro, processor, VideoSampling.of(args), args.max_length)
                batch.to(device)
                cached_ref = ref_cache.rows(micro) if ref_cache else None
                loss, micro_stats = chain_loss_step(model, batch, index, args, vision_trainable,
                                                    shared_prefix, fused_linear, cached_ref)
                if cached_ref is not None:
                    ref_rows += torch.tensor([len(cached_ref.keys) * cached_ref.hit,
                                              len(cached_ref.keys)], dtype=torch.float64)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"step {step + 1}: loss is {loss.item()} on chains "
                        f"{[c.id for c in micro]}; lower --lr or --beta, or check the data")
                (loss / args.grad_accum).backward()
                losses.append(loss.detach().double().cpu())
                stats += micro_stats
                tokens += int(batch.attention_mask.sum())
            average_gradients(params, world)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            summed = all_reduce_(torch.cat([torch.stack(losses).sum().view(1), stats,
                                            torch.tensor([float(tokens)], dtype=torch.float64),
                                            ref_rows]), world)
            if step % args.log_every == 0 or step == args.max_steps:
                row = {"step": step, "loss": summed[0].item() / (args.grad_accum * world),
                       **stats_row(summed[1:STATS + 1], args.grad_accum * world), "lr": lr,
                       "grad_norm": float(grad_norm),
                       "tokens_per_s": summed[STATS + 1].item() / (time.perf_counter() - t0),
                       "step_time_s": time.perf_counter() - t0,
                       "peak_mem_mb": all_reduce_(torch.tensor([peak_memory_mb(device)]),
                                                  world, "max").item(),
                       "epoch": step * global_batch / len(chains)}
                if ref_cache is not None:     # share of captions whose reference was read
                    row["ref_cached"] = summed[STATS + 2].item() / summed[STATS + 3].item()
                logged.append(row)
                if rank == 0:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rank_acc']:.2f}")
            bar.update(1)

            validated = bool(val_chains) and (step % args.val_every == 0 or step == args.max_steps)
            if validated:
                row = {"step": step, **validate(model, val_chains, processor, args, vision_trainable,
                                                shared_prefix, fused_linear, world, rank, device,
                                                ref_cache)}
                best, stale = best_validation(validations + [row], args.select_by, args.min_gain)
                row["best"] = best is row
                validations.append(row)
                if rank == 0:
                    if row["best"]:
                        save_best(model, args, out)
                    with open(validation_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    where = "best so far: OUT/best" if row["best"] else f"best: step {best['step']}"
                    print(f"\nvalidation at step {step}: {args.select_by} "
                          f"{row[args.select_by]:.4f} ({where})", flush=True)
            flag = all_reduce_(torch.tensor([1.0 if stop["signal"] else 0.0]), world, "max")
            if flag.item() or validated or (args.save_every and step % args.save_every == 0):
                save_checkpoint(args, step, model, optimizer, scheduler, rank, world)
                saved_at = step
            if flag.item():
                if rank == 0:
                    print(f"\nSIGTERM: checkpoint saved at step {step} in {out}/checkpoints; "
                          "continue with --resume", flush=True)
                return logged
        if saved_at != step:
            save_checkpoint(args, step, model, optimizer, scheduler, rank, world)
        if rank == 0:                                   # the final adapter, loadable by peft
            model.save_pretrained(out)
            write_meta(out, args, "init" if args.init else None)
        return logged
    finally:
        bar.close()
        signal.signal(signal.SIGTERM, previous_handler)
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def export(argv) -> str:
    """`rank_dpo.py export --adapter RUN --out DIR`: the base model with the run's adapter (and its
    warm start) merged in, saved in hub format with the base's processor: a plain checkpoint that
    AutoModelForImageTextToText / AutoProcessor load and vLLM-style servers serve."""
    p = argparse.ArgumentParser(prog="rank_dpo.py export", description=export.__doc__)
    p.add_argument("--adapter", required=True, help="a run directory (or checkpoint) of rank_dpo.py")
    p.add_argument("--out", required=True, help="where the merged model is written")
    p.add_argument("--model", help="base model (default: the one the run recorded)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = p.parse_args(argv)
    meta = read_run_meta(args.adapter)
    if not meta:
        raise ModelError(f"{args.adapter}: no {RUN_META}; not a rank_dpo.py run (pass --model?)")
    saved = os.path.join(args.adapter, "base")    # a run on a built model saved its base here
    base = args.model or (saved if os.path.isdir(saved) else meta["base_model"])
    net, processor = load_model(base, args.adapter, dtype=getattr(torch, args.dtype))
    net.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    print(f"merged model written to {args.out}")
    return args.out


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        try:
            export(argv[1:])
        except (ModelError, MissingDependency, FileNotFoundError) as e:
            sys.exit(f"error: {e}")
        return
    args = parse_args(argv)
    try:
        train(args)
    except DataError as e:
        sys.exit(f"data error: {e}")
    except (ModelError, MissingDependency) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
