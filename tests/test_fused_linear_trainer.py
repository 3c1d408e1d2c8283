"""--fused_linear: the trainer applies the LM head inside the fused loss kernel
(kernels.fused_linear_chain_loss, logits never materialised) on the packed forward's hidden
states. Same loss and gradients as the logits path, the trainable head's weight gradient
included (the tiny preset trains lm_head in full), policy and reference passes alike."""
from __future__ import annotations

import pytest
import torch

import rank_dpo as R
from test_shared_prefix import adapted, records, tiny  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def step(model, batch, index, args, fused: bool):
    model.zero_grad(set_to_none=True)
    loss, stats = R.chain_loss_step(model, batch, index, args, vision_trainable=True,
                                    shared_prefix=True, fused_linear=fused)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), stats, grads


@pytest.mark.parametrize("ntp_norm", ["mean", "sum"])
@pytest.mark.parametrize("objective", R.kernels.OBJECTIVES)
def test_fused_linear_step_equals_logits_step(tiny, records, objective, ntp_norm):
    base, processor = tiny
    model, args = adapted(base, "lora", objective)
    args.ntp_norm = ntp_norm
    chains, _ = R.load_chains(records["mixed"], processor, objective)
    batch, index = R.collate(chains, processor, 8, 2048)
    assert R.resolve_fused_linear(model, "auto", shared_prefix=True)
    loss_off, stats_off, grads_off = step(model, batch, index, args, fused=False)
    loss_on, stats_on, grads_on = step(model, batch, index, args, fused=True)
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats_on, stats_off, rtol=1e-5, atol=1e-5)
    head = [n for n in grads_off if "lm_head" in n]
    assert head, "the tiny preset's lm_head should train (modules_to_save)"
    assert grads_on.keys() == grads_off.keys()
    for name, g in grads_off.items():
        scale = g.abs().max().clamp_min(1e-8)
        assert float((grads_on[name] - g).abs().max() / scale) < 1e-4, name


@pytest.mark.parametrize("objective", ["rank", "sft"])
def test_fused_linear_step_with_a_frozen_head_equals_logits_step(tiny, records, objective):
    """A pretrained model's head under LoRA (--modules_to_save none): frozen, so the kernel
    keeps d logp / d hidden from its forward and its backward makes no logits."""
    base, processor = tiny
    model, args = adapted(base, "lora", objective, "--modules_to_save", "none")
    args.ntp_norm = "sum"
    assert not R.output_head(model).weight.requires_grad
    chains, _ = R.load_chains(records["mixed"], processor, objective)
    batch, index = R.collate(chains, processor, 8, 2048)
    loss_off, stats_off, grads_off = step(model, batch, index, args, fused=False)
    loss_on, stats_on, grads_on = step(model, batch, index, args, fused=True)
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats_on, stats_off, rtol=1e-5, atol=1e-5)
    assert grads_on.keys() == grads_off.keys() and not any("lm_head" in n for n in grads_off)
    for name, g in grads_off.items():
        scale = g.abs().max().clamp_min(1e-8)
        assert float((grads_on[name] - g).abs().max() / scale) < 1e-4, name


def test_reference_pass_uses_the_original_head(tiny, records):
    """With adapters disabled the head's weight is the original, not peft's trained copy."""
    base, _ = tiny
    model, _ = adapted(base, "lora", "rank")
    trained = R.output_head(model).weight
    with model.disable_adapter():
        original = R.output_head(model).weight
    assert not torch.equal(trained, original)
    assert torch.equal(original, base.get_output_embeddings().weight)


def test_fused_linear_falls_back_or_refuses(tiny, monkeypatch):
    base, _ = tiny
    model, _ = adapted(base, "lora", "rank")
    monkeypatch.setattr(R, "_fallbacks_logged", set())   # said once per process: not yet here
    messages = []
    assert not R.resolve_fused_linear(model, "auto", shared_prefix=False, log=messages.append)
    assert "--shared_prefix is off" in messages[0]
    assert not R.resolve_fused_linear(model, "off", shared_prefix=True)
    with pytest.raises(SystemExit, match="--fused_linear on"):
        R.resolve_fused_linear(model, "on", shared_prefix=False)


def test_training_run_with_fused_linear_matches_without(records, tmp_path):
    """Two optimizer steps end to end (CLI): the logged losses agree with and without."""
    from test_train import read_metrics
    rows = {}
    for mode in ("on", "off"):
        out = tmp_path / mode
        R.main(["--data", records["video"], "--output_dir", str(out), "--objective", "rank",
                "--max_steps", "2", "--batch_size", "2", "--lr", "1e-3", "--save_every", "0",
                "--lora_r", "4", "--fused_linear", mode])
        rows[mode] = read_metrics(out)
    for a, b in zip(rows["on"], rows["off"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
