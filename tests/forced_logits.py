"""Test helper: a tiny model whose next-token distribution is worked out by hand.

    from forced_logits import fixed_logits, token_id

    with fixed_logits(model, [{token_id(processor, "B"): 50.0}]):
        ...   # every forward pass now scores only "B" above the rest

The pipeline around the LM head (chat template, video, label masking, letters, decoding,
metrics) runs as usual; only the logits are replaced.
"""
import contextlib


@contextlib.contextmanager
def fixed_logits(model, boost_at_step=None):
    """Every position's logits become 0 except the boosted tokens. boost_at_step: a list of
    {token_id: value}, one per forward call (generation: the prompt, then one per new token);
    the last one holds for the remaining calls."""
    import torch
    calls = [0]

    def hook(module, inputs, output):
        logits = torch.zeros_like(output)
        steps = boost_at_step or [{}]
        for token, value in steps[min(calls[0], len(steps) - 1)].items():
            logits[..., token] = value
        calls[0] += 1
        return logits
    handle = model.lm_head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def token_id(processor, text):
    """The one token id `text` encodes to (asserts it is one token)."""
    from rank_dpo import tokenizer_of
    ids = tokenizer_of(processor)(text, add_special_tokens=False).input_ids
    assert len(ids) == 1, f"{text!r} is {len(ids)} tokens"
    return ids[0]
