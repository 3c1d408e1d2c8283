"""Tiny random vision-language models saved exactly as the hub stores them.

`save_family(name, path)` writes a model directory a user could have downloaded: the model's
config and safetensors (`save_pretrained` of the real transformers class, built from a tiny
config, nothing downloaded), the family's real processor class with its real image and video
processors, and a small byte-level tokenizer that carries the family's special tokens and a
chat template in the family's format. The trainer and eval_judge.py load it through
`--model DIR`, as they would a hub checkpoint.
"""
from __future__ import annotations

import torch

FAMILIES = ("qwen2_5_vl", "qwen3_vl", "perception_lm")
VOCAB = 320                      # 256 byte tokens + the special tokens below, rounded up

# ChatML with Qwen's vision markers (Qwen2.5-VL adds a default system turn, Qwen3-VL does not).
QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' and SYSTEM %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# PerceptionLM's Llama-3 format: media first, then the text, each turn closed by <|eot_id|>.
PLM_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<|image|>' }}{%- endfor %}"
    "{%- for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<|video|>' }}{%- endfor %}"
    "{%- for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{- content['text'] | trim }}{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{%- endif %}")

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
PLM_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>", "<|image|>", "<|video|>"]


def byte_tokenizer(specials: list[str], **kwargs):
    """A byte-level BPE tokenizer (no merges: one token per byte) plus the family's specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast
    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tk, **kwargs)


def _qwen_text(tok, layers: int = 1, **extra) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), **extra)


def _qwen_ids(tok) -> dict:
    return {name: tok.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}


def build(name: str, seed: int = 0):
    """(model, processor) of one family: a random tiny model and the family's real processor."""
    import transformers as T
    torch.manual_seed(seed)
    if name == "qwen2_5_vl":
        tok = byte_tokenizer(QWEN_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>")
        config = T.Qwen2_5_VLConfig(
            text_config=_qwen_text(tok, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                         "mrope_section": [2, 3, 3]}),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                               out_hidden_size=32, patch_size=14, spatial_merge_size=2,
                               temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1]),
            **_qwen_ids(tok))
        model = T.Qwen2_5_VLForConditionalGeneration(config)
        size = {"shortest_edge": 28 * 28, "longest_edge": 56 * 56}
        processor = T.Qwen2_5_VLProcessor(
            image_processor=T.Qwen2VLImageProcessor(size=size), tokenizer=tok,
            video_processor=T.Qwen2VLVideoProcessor(size=size),
            chat_template=QWEN_TEMPLATE.replace("SYSTEM", "true"))
    elif name == "qwen3_vl":
        tok = byte_tokenizer(QWEN_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>")
        config = T.Qwen3VLConfig(
            # two layers: the deepstack features are added after layer 0, which only a later
            # layer carries to the text tokens
            text_config=_qwen_text(tok, layers=2, head_dim=16, rope_parameters={
                "rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 3, 3],
                "mrope_interleaved": True}),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                               out_hidden_size=32, patch_size=16, spatial_merge_size=2,
                               temporal_patch_size=2, num_position_embeddings=64,
                               deepstack_visual_indexes=[0]),
            **_qwen_ids(tok))
        model = T.Qwen3VLForConditionalGeneration(config)
        size = {"shortest_edge": 32 * 32, "longest_edge": 64 * 64 * 8}
        processor = T.Qwen3VLProcessor(
            image_processor=T.Qwen2VLImageProcessor(size=size, patch_size=16), tokenizer=tok,
            video_processor=T.Qwen3VLVideoProcessor(size=size),
            chat_template=QWEN_TEMPLATE.replace("SYSTEM", "false"))
    elif name == "perception_lm":
        tok = byte_tokenizer(PLM_SPECIALS, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                             pad_token="<|end_of_text|>",
                             extra_special_tokens={"image_token": "<|image|>",
                                                   "video_token": "<|video|>"})
        vision = T.TimmWrapperConfig(
            architecture="vit_pe_core_gigantic_patch14_448",
            model_args={"embed_dim": 32, "depth": 1, "num_heads": 2, "img_size": [28, 28],
                        "patch_size": 14, "global_pool": "", "use_post_transformer_norm": False,
                        "init_values": 0.1, "ref_feat_shape": [2, 2], "class_token": True},
            num_classes=0, do_pooling=False)
        config = T.PerceptionLMConfig(
            vision_config=vision,
            text_config=dict(model_type="llama", vocab_size=VOCAB, hidden_size=32,
                             intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id),
            vision_use_cls_token=True, projector_pooling_ratio=1,
            image_token_id=tok.convert_tokens_to_ids("<|image|>"),
            video_token_id=tok.convert_tokens_to_ids("<|video|>"))
        model = T.PerceptionLMForConditionalGeneration(config)
        size = {"height": 28, "width": 28}
        processor = T.PerceptionLMProcessor(
            video_processor=T.PerceptionLMVideoProcessor(size=size),
            image_processor=T.PerceptionLMImageProcessor(tile_size=28, max_num_tiles=1),
            tokenizer=tok, patch_size=14, pooling_ratio=1, chat_template=PLM_TEMPLATE)
    else:
        raise ValueError(f"unknown family {name}; known: {', '.join(FAMILIES)}")
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model.eval(), processor


def save_family(name: str, path: str, seed: int = 0) -> str:
    """Write family `name` to `path` in hub format; returns path."""
    model, processor = build(name, seed)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)
