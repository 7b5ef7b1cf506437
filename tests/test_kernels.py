"""The fused VDEP kernel (Triton, run by its interpreter on CPU) against the reference implementation.

On a GPU, `TRITON_INTERPRET=0 pytest tests/test_kernels.py` runs the compiled kernel on CUDA tensors
instead (the tests that need the CPU model or the interpreter are skipped then).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from vdep.config import VdepConfig
from vdep.errors import ConfigError
from vdep.kernels.fused_vdep import fused_vdep_pass_through, fused_vdep_sum
from vdep.objectives.losses import reference_vdep_sum
from vdep.objectives.objective import VdepTerm, select_term

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# conftest sets TRITON_INTERPRET=1 unless told otherwise; 0 compiles the kernels, which then need CUDA tensors.
COMPILED = os.environ.get("TRITON_INTERPRET") == "0"
DEVICE = torch.device("cuda" if COMPILED else "cpu")
interpreter_only = pytest.mark.skipif(COMPILED, reason="runs on CPU tensors: needs Triton's interpreter")
pytestmark = pytest.mark.skipif(COMPILED and not torch.cuda.is_available(),
                                reason="TRITON_INTERPRET=0 compiles the kernels for CUDA, and there is no CUDA device")


def random_case(batch: int, length: int, hidden: int, dtype: torch.dtype, seed: int, fraction: float = 0.4):
    generator = torch.Generator().manual_seed(seed)
    h = (torch.randn(batch, length, hidden, generator=generator) * 2 + 0.5).to(DEVICE, dtype).requires_grad_()
    e = (torch.randn(batch, length, hidden, generator=generator) - 0.3).to(DEVICE, dtype).requires_grad_()
    targets = torch.rand(batch, length, generator=generator) < fraction
    targets[:, 0] = False  # position 0 has no predecessor (guaranteed by the data path)
    return h, e, targets.to(DEVICE)


def value_and_grads(fn, h, e, targets, norm, detach_target):
    h = h.detach().clone().requires_grad_()
    e = e.detach().clone().requires_grad_()
    out = fn(h, e, targets, nn.Identity(), target_norm=norm, detach_target=detach_target)
    (out * 3.0).backward()  # an upstream gradient other than 1
    return out.detach(), h.grad, e.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("norm", ["none", "layernorm", "l2"])
@pytest.mark.parametrize("detach_target", [True, False])
def test_fused_matches_the_reference_in_value_and_gradients(dtype, norm, detach_target):
    for seed, (batch, length, hidden) in enumerate([(2, 9, 37), (3, 17, 64), (1, 5, 129)]):  # odd sizes too
        h, e, targets = random_case(batch, length, hidden, dtype, seed)
        ref = value_and_grads(reference_vdep_sum, h, e, targets, norm, detach_target)
        fused = value_and_grads(fused_vdep_sum, h, e, targets, norm, detach_target)
        assert_same_value_and_grads(fused, ref, dtype, TOLERANCE[dtype], detach_target)


def assert_same_value_and_grads(fused, ref, dtype, tol: float, detach_target: bool) -> None:
    """(value, hidden grad, target grad) triples: values to fp32 accuracy (both accumulate in fp32)."""
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1].float(), ref[1].float(), rtol=tol, atol=tol)
    assert fused[1].dtype == dtype
    if detach_target:
        assert fused[2] is None and ref[2] is None
    else:
        torch.testing.assert_close(fused[2].float(), ref[2].float(), rtol=tol, atol=tol)


def test_an_empty_selection_gives_a_connected_zero():
    h, e, _ = random_case(2, 6, 33, torch.float32, seed=7)
    targets = torch.zeros(2, 6, dtype=torch.bool, device=DEVICE)
    value, grad_h, _ = value_and_grads(fused_vdep_sum, h, e, targets, "layernorm", True)
    assert value.item() == 0.0
    assert grad_h is not None and torch.count_nonzero(grad_h) == 0  # the backward ran (ZeRO-3 hooks fire)


def test_two_samples_packed_in_one_row_stay_apart():
    """Image spans of two packed samples: each target is predicted from its own sample's previous row."""
    h, e, _ = random_case(1, 20, 48, torch.float32, seed=3)
    targets = torch.zeros(1, 20, dtype=torch.bool, device=DEVICE)
    targets[0, 3:7] = True  # sample A: image tokens 2..6, first one not a target
    targets[0, 13:16] = True  # sample B starts at 10: image tokens 12..15
    ref = value_and_grads(reference_vdep_sum, h, e, targets, "none", False)
    fused = value_and_grads(fused_vdep_sum, h, e, targets, "none", False)
    torch.testing.assert_close(fused[0], ref[0])
    torch.testing.assert_close(fused[1], ref[1])
    touched = fused[1][0].abs().sum(-1) > 0
    assert touched.nonzero().squeeze(1).tolist() == [2, 3, 4, 5, 12, 13, 14]


def text_like_loss(hidden: torch.Tensor, seed: int) -> torch.Tensor:
    """A stand-in for the text loss: reads hidden[:, :-1] with dense weights, as the LM head's path does."""
    weights = torch.randn(hidden[:, :-1].shape, generator=torch.Generator().manual_seed(seed)).to(hidden.device)
    return (hidden[:, :-1].float() * weights).sum()


def with_text_loss(use_pass_through: bool, h, e, targets, norm, detach_target):
    """Value and gradients of text + 3 · VDEP, through the pass-through or through reference_vdep_sum."""
    h = h.detach().clone().requires_grad_()
    e = e.detach().clone().requires_grad_()
    if use_pass_through:
        text_hidden, vdep = fused_vdep_pass_through(h, e, targets, target_norm=norm, detach_target=detach_target)
    else:
        text_hidden, vdep = h, reference_vdep_sum(h, e, targets, nn.Identity(), target_norm=norm, detach_target=detach_target)
    (text_like_loss(text_hidden, seed=1) + 3.0 * vdep).backward()
    return vdep.detach(), h.grad, e.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("norm", ["none", "layernorm", "l2"])
@pytest.mark.parametrize("detach_target", [True, False])
def test_the_pass_through_adds_the_vdep_gradient_to_the_text_gradient(dtype, norm, detach_target):
    for seed, (batch, length, hidden) in enumerate([(2, 9, 37), (3, 17, 64)]):
        h, e, targets = random_case(batch, length, hidden, dtype, seed)
        ref = with_text_loss(False, h, e, targets, norm, detach_target)
        fused = with_text_loss(True, h, e, targets, norm, detach_target)
        # bf16/fp16: the reference rounds the VDEP gradient, then the sum; the kernel adds in fp32 and rounds once.
        tol = TOLERANCE[dtype] * (2 if dtype != torch.float32 else 1)
        assert_same_value_and_grads(fused, ref, dtype, tol, detach_target)


def test_the_pass_through_updates_the_text_gradient_in_place():
    """No full-size gradient of its own: the hidden states' gradient is the buffer the text loss sent."""
    h, e, targets = random_case(2, 9, 37, torch.float32, seed=4)
    h = h.detach().requires_grad_()
    text_hidden, vdep = fused_vdep_pass_through(h, e.detach(), targets)
    arriving: list[int] = []
    text_hidden.register_hook(lambda grad: arriving.append(grad.data_ptr()))
    (text_like_loss(text_hidden, seed=2) + vdep).backward()
    assert arriving == [h.grad.data_ptr()]
    # ... and it still holds both terms: the text gradient alone differs on the VDEP predictor rows.
    h_text = h.detach().clone().requires_grad_()
    text_like_loss(h_text, seed=2).backward()
    changed = (h.grad - h_text.grad).abs().sum(-1) > 0  # (B, T): rows whose gradient VDEP added to
    assert changed[:, :-1].tolist() == targets[:, 1:].tolist() and not changed[:, -1].any()


def test_the_pass_through_alone_still_gives_the_vdep_gradient():
    """With nothing reading the passed hidden states, autograd hands the backward zeros: VDEP alone."""
    h, e, targets = random_case(2, 9, 37, torch.float32, seed=5)
    ref = value_and_grads(reference_vdep_sum, h, e, targets, "layernorm", True)
    hh = h.detach().clone().requires_grad_()
    _, vdep = fused_vdep_pass_through(hh, e.detach(), targets, target_norm="layernorm")
    (vdep * 3.0).backward()
    torch.testing.assert_close(vdep.detach(), ref[0])
    torch.testing.assert_close(hh.grad, ref[1])


@interpreter_only
def test_selection_explains_its_choice():
    cpu = torch.device("cpu")
    auto = select_term(VdepConfig(kernel="auto"), cpu)
    assert auto.vdep_sum is reference_vdep_sum and auto.description.startswith("reference (")
    fused = select_term(VdepConfig(kernel="fused"), cpu)  # the interpreter, in tests
    assert fused.vdep_sum is fused_vdep_sum and fused.pass_through is fused_vdep_pass_through
    linear = select_term(VdepConfig(kernel="fused", head="linear"), cpu)
    assert linear.vdep_sum is fused_vdep_sum and linear.pass_through is None  # its chunks gather rows
    with pytest.raises(ConfigError, match="vdep.head=mlp is not fused"):
        select_term(VdepConfig(kernel="fused", head="mlp"), cpu)  # type: ignore[arg-type]
    reference = select_term(VdepConfig(kernel="reference", target_norm="l2", detach_target=False), cpu)
    assert reference == VdepTerm(reference_vdep_sum, "l2", False, None, "reference")


def linear_head(hidden: int, dtype: torch.dtype, seed: int) -> nn.Linear:
    head = nn.Linear(hidden, hidden)
    with torch.no_grad():  # the identity plus noise, as a head looks after some training
        head.weight.copy_(torch.eye(hidden) + 0.1 * torch.randn(hidden, hidden, generator=torch.Generator().manual_seed(seed)))
        head.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 1))
    return head.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm", ["none", "layernorm"])
@pytest.mark.parametrize("detach_target", [True, False])
def test_the_linear_head_variant_matches_the_reference_including_head_gradients(dtype, norm, detach_target):
    # 2×23 positions with ~40% selected: a row count that the 8 chunks do not divide evenly.
    h, e, targets = random_case(2, 23, 40, dtype, seed=11)
    results = []
    for fn in (reference_vdep_sum, fused_vdep_sum):
        head = linear_head(40, dtype, seed=5)
        hh, ee = h.detach().clone().requires_grad_(), e.detach().clone().requires_grad_()
        out = fn(hh, ee, targets, head, target_norm=norm, detach_target=detach_target)
        (out * 2.0).backward()
        results.append((out.detach(), hh.grad, ee.grad, head.weight.grad, head.bias.grad))
    tol = TOLERANCE[dtype] * (3 if dtype == torch.bfloat16 else 1)
    (ref_out, *ref_grads), (fused_out, *fused_grads) = results
    torch.testing.assert_close(fused_out, ref_out, rtol=tol, atol=tol)
    for name, a, b in zip(("hidden", "embeds", "weight", "bias"), fused_grads, ref_grads):
        if b is None:
            assert a is None, name
            continue
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol, msg=name)


def test_the_linear_head_runs_its_chunks_even_with_nothing_selected():
    """ZeRO-3 gathers the head's weight at every call: the call count must not depend on the data."""
    h, e, _ = random_case(1, 6, 16, torch.float32, seed=2)
    head = linear_head(16, torch.float32, seed=1)
    calls = []
    head.register_forward_hook(lambda *_: calls.append(1))
    for targets in (torch.zeros(1, 6, dtype=torch.bool), torch.tensor([[False, True, True, True, True, True]])):
        targets = targets.to(DEVICE)
        calls.clear()
        out = fused_vdep_sum(h, e, targets, head)
        out.backward()
        from vdep.kernels.fused_vdep import LINEAR_HEAD_CHUNKS

        assert len(calls) == 2 * LINEAR_HEAD_CHUNKS  # each chunk once forward, once recomputed in backward
    assert head.weight.grad is not None


@interpreter_only
def test_the_model_trains_the_same_with_the_fused_kernel(tiny_model, tokenizer, small_data):
    from tests.helpers import samples
    from vdep.config import VdepConfig
    from vdep.data.batch import collate
    from vdep.objectives.supervision import prepare_inputs

    built = tiny_model
    model, spec = built.model, built.spec
    batch = collate(samples(tiny_model, tokenizer, small_data, "plain", 4), tokenizer.pad_token_id, (32, 32))
    results = []
    for vdep_sum in (reference_vdep_sum, fused_vdep_sum):
        model.vdep_term = VdepTerm(vdep_sum)
        model.zero_grad()
        modes = torch.ones(len(batch.input_ids), dtype=torch.bool)  # every row in VDEP mode
        inputs = prepare_inputs(batch, modes, VdepConfig(), spec.image_token_id, spec.num_image_tokens)
        sums = model(inputs)
        sums.vdep.backward()
        results.append((sums.vdep.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (ref_value, ref_grads), (fused_value, fused_grads) = results
    torch.testing.assert_close(fused_value, ref_value)
    assert len(fused_grads) == len(ref_grads) > 0
    for a, b in zip(fused_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@interpreter_only
def test_the_model_with_the_pass_through_gives_the_reference_losses_and_gradients(tiny_model, tokenizer, small_data):
    """Text + VDEP through the model: the fused pass-through (the text loss reads the hidden states
    through it) against the reference, for every parameter's gradient."""
    from tests.helpers import samples
    from vdep.config import VdepConfig
    from vdep.data.batch import collate
    from vdep.objectives.supervision import prepare_inputs

    built = tiny_model
    model, spec = built.model, built.spec
    assert model.vdep_term.pass_through is None  # the reference on CPU
    batch = collate(samples(tiny_model, tokenizer, small_data, "plain", 4), tokenizer.pad_token_id, (32, 32))
    modes = torch.tensor([True, False, True, True])  # VDEP and LLaVA rows: both terms have targets
    inputs = prepare_inputs(batch, modes, VdepConfig(), spec.image_token_id, spec.num_image_tokens)
    results = []
    for kernel in ("reference", "fused"):
        model.vdep_term = select_term(VdepConfig(kernel=kernel), torch.device("cpu"))
        model.zero_grad()
        sums = model(inputs)
        (sums.text + 0.5 * sums.vdep).backward()
        results.append(([sums.text.detach(), sums.vdep.detach()],
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert model.vdep_term.pass_through is fused_vdep_pass_through  # the fused run used the pass-through
    (ref_sums, ref_grads), (fused_sums, fused_grads) = results
    assert ref_sums[1] > 0 and ref_sums[0] > 0
    torch.testing.assert_close(fused_sums, ref_sums)
    assert fused_grads.keys() == ref_grads.keys() and len(ref_grads) > 0
    for name, grad in ref_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@interpreter_only
@pytest.mark.parametrize("head", ["identity", "linear"])
def test_the_kernel_benchmark_runs_in_smoke_mode(head):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_bench.py"
    result = subprocess.run([sys.executable, str(script), "--smoke", "--head", head, "--num-warps", "8"],
                            check=False, capture_output=True, text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"head {head}," in result.stdout and "| eager reference |" in result.stdout
    assert "| fused (Triton, 4 warps) |" in result.stdout and "| fused (Triton, 8 warps) |" in result.stdout
    assert ("| + fused pass-through (Triton) |" in result.stdout) == (head == "identity")  # the in-a-step table


@interpreter_only
def test_the_fused_kernel_and_its_pass_through_take_tiled_images_and_videos(anyres_model, tokenizer, anyres_shards):
    """Variable numbers of image tokens per sample, with gaps where the image_newlines are (no target there): the
    fused kernel and its pass-through give the reference's losses and every parameter's gradient."""
    from tests.helpers import anyres_samples
    from vdep.data.batch import collate_packed
    from vdep.objectives.supervision import prepare_inputs

    model, spec = anyres_model.model, anyres_model.spec
    samples = anyres_samples(anyres_model, tokenizer, anyres_shards, ["three", "text", "video", "one", "frames"])
    batch = collate_packed(samples, tokenizer.pad_token_id, (64, 64), 1536)  # packed: spans of several samples a row
    inputs = prepare_inputs(batch, torch.tensor([True, False, True, True, False]), VdepConfig(), spec.image_token_id,
                            spec.num_image_tokens)
    counts = [int(inputs.image_targets[batch.sample_index == s].sum()) for s in range(batch.num_samples)]
    assert len(set(counts)) > 2  # the samples' target counts differ
    results = []
    for kernel in ("reference", "fused"):
        model.vdep_term = select_term(VdepConfig(kernel=kernel, target_norm="layernorm"), torch.device("cpu"))
        model.zero_grad()
        sums = model(inputs)
        (sums.text + 0.5 * sums.vdep).backward()
        results.append(([sums.text.detach(), sums.vdep.detach()],
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (ref_sums, ref_grads), (fused_sums, fused_grads) = results
    torch.testing.assert_close(fused_sums, ref_sums)
    assert "image_newline" in ref_grads and fused_grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
