"""Sequence packing: seq_idx in the scan and conv, the Mamba block, and PixelMamba's packed / batched views.

Every packed result is checked against separate calls on each piece (values and gradients).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from trainer.models import build_model, pixel_mamba
from trainer.models import ssm
from trainer.models.mamba_block import MambaBlockConfig, ResidualMambaBlock
from trainer.models.ssm import (
    BackendUnavailableError,
    causal_conv1d,
    numba_scan,
    selective_scan_fn,
    supports_seq_idx,
    torch_scan,
)
from trainer.models.ssm.selective import keep_mask, selective_scan

needs_numba = pytest.mark.skipif(not numba_scan.AVAILABLE, reason="numba is not importable")
BACKENDS = ["torch", pytest.param("numba", marks=needs_numba)]


def _seq_idx(lengths: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), torch.tensor(lengths))


def _pieces(lengths: list[int]) -> list[slice]:
    out, s = [], 0
    for n in lengths:
        out.append(slice(s, s + n))
        s += n
    return out


def _leaves(tensors: dict) -> dict:
    return {k: v.detach().clone().requires_grad_(True) for k, v in tensors.items()}


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 2e-5) -> None:
    scale = b.abs().max().clamp_min(1e-6)
    assert (a - b).abs().max() <= tol * scale, f"max diff {(a - b).abs().max().item()} vs scale {scale.item()}"


# --- scan ---------------------------------------------------------------------------------------------

SCAN_CORES = {
    # small chunks / checkpoints so packed boundaries fall inside, at and across them
    "torch": partial(torch_scan.scan_core, chunk=16),
    "numba": pytest.param(partial(numba_scan.scan_core, checkpoint_every=16), marks=needs_numba)
    if numba_scan.AVAILABLE
    else pytest.param(None, marks=needs_numba),
}
# per batch row: lengths of the packed sequences (rows packed differently; boundaries at 16, 32, ...)
ROW_LENGTHS = [[16, 5, 27, 1, 3], [1, 1, 50]]


def _scan_inputs(L: int, batch: int = 2, d_inner: int = 3, d_state: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = partial(torch.randn, generator=g)
    return {
        "u": r(batch, d_inner, L), "delta": r(batch, d_inner, L), "A": -torch.exp(r(d_inner, d_state) * 0.5),
        "B": r(batch, d_state, L), "C": r(batch, d_state, L), "D": r(d_inner), "z": r(batch, d_inner, L),
        "delta_bias": r(d_inner) * 0.5,
    }  # fmt: skip


def _run_scan(fn, inputs: dict, gy: torch.Tensor, glast: torch.Tensor | None, **kw):
    leaves = _leaves(inputs)
    y, last = fn(**leaves, delta_softplus=True, return_last_state=True, **kw)
    loss = (y * gy).sum() + ((last * glast).sum() if glast is not None else 0.0)
    loss.backward()
    return y.detach(), last.detach(), {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("core", list(SCAN_CORES.values()), ids=list(SCAN_CORES))
def test_seq_idx_scan_equals_separate_calls_values_and_all_grads(core) -> None:
    L = sum(ROW_LENGTHS[0])
    assert all(sum(r) == L for r in ROW_LENGTHS)
    inputs = _scan_inputs(L)
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(2, 3, L, generator=g)
    glast = torch.randn(2, 3, 4, generator=g)
    seq_idx = torch.stack([_seq_idx(r) for r in ROW_LENGTHS])
    fn = partial(selective_scan, core)
    y, last, grads = _run_scan(fn, inputs, gy, glast, seq_idx=seq_idx)

    expected_grads = {k: torch.zeros_like(v) for k, v in inputs.items()}
    for b, lengths in enumerate(ROW_LENGTHS):
        for i, sl in enumerate(_pieces(lengths)):
            piece = {
                k: (v[b : b + 1, ..., sl] if v.dim() == 3 else v) for k, v in inputs.items()
            }
            is_last = i == len(lengths) - 1  # last_state is the row's last sequence's
            y_p, last_p, g_p = _run_scan(fn, piece, gy[b : b + 1, :, sl], glast[b : b + 1] if is_last else None)
            _close(y[b : b + 1, :, sl], y_p)
            if is_last:
                _close(last[b : b + 1], last_p)
            for k, v in g_p.items():
                if v.dim() == 3 and k != "A":
                    expected_grads[k][b : b + 1, ..., sl] += v
                else:
                    expected_grads[k] += v
    assert set(grads) == set(expected_grads)
    for k in grads:
        _close(grads[k], expected_grads[k], tol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_public_function_takes_seq_idx_and_one_sequence_changes_nothing(backend) -> None:
    inputs = _scan_inputs(40, batch=1)
    y_plain = selective_scan_fn(**inputs, delta_softplus=True, backend=backend)
    same = torch.full((1, 40), 7, dtype=torch.int32)  # one sequence: no reset anywhere
    assert torch.equal(selective_scan_fn(**inputs, delta_softplus=True, seq_idx=same, backend=backend), y_plain)
    packed = selective_scan_fn(**inputs, delta_softplus=True, seq_idx=_seq_idx([10, 30])[None], backend=backend)
    torch.testing.assert_close(packed[..., :10], y_plain[..., :10])  # before the reset: untouched
    tail = {k: (v[..., 10:] if v.dim() == 3 else v) for k, v in inputs.items()}
    _close(packed[..., 10:], selective_scan_fn(**tail, delta_softplus=True, backend=backend))
    assert not torch.allclose(packed[..., 10:], y_plain[..., 10:])  # the reset did something


def test_keep_mask_marks_every_change_of_seq_idx() -> None:
    seq_idx = torch.tensor([[0, 0, 1, 1, 1, 2], [3, 3, 3, 3, 0, 0]], dtype=torch.int32)
    expected = torch.tensor([[1, 1, 0, 1, 1, 0], [1, 1, 1, 1, 0, 1]], dtype=torch.float32)
    assert torch.equal(keep_mask(seq_idx), expected)


@pytest.mark.parametrize(
    "seq_idx, match",
    [
        (torch.zeros(1, 40), "integer"),
        (torch.zeros(2, 40, dtype=torch.int32), r"\(batch=1, L=40\)"),
        (torch.zeros(1, 39, dtype=torch.int32), r"\(batch=1, L=40\)"),
    ],
)
def test_bad_seq_idx_is_refused(seq_idx, match) -> None:
    with pytest.raises(ValueError, match=match):
        selective_scan_fn(**_scan_inputs(40, batch=1), seq_idx=seq_idx, backend="torch")


def test_cuda_backend_refuses_seq_idx(monkeypatch) -> None:
    monkeypatch.setattr(ssm, "resolve_backend", lambda backend, device=None, packed=False: "cuda")
    assert not supports_seq_idx("cuda")
    with pytest.raises(BackendUnavailableError, match="cannot reset its state"):
        selective_scan_fn(**_scan_inputs(8, batch=1), seq_idx=torch.zeros(1, 8, dtype=torch.int32), backend="cuda")


def test_cpu_backends_support_seq_idx() -> None:
    assert supports_seq_idx("torch") and supports_seq_idx("auto", "cpu")
    if numba_scan.AVAILABLE:
        assert supports_seq_idx("numba")


# --- conv ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", [None, "silu"])
def test_conv_masks_taps_across_seq_idx_and_equals_separate_calls(activation) -> None:
    lengths = [[2, 1, 9, 4], [16]]
    g = torch.Generator().manual_seed(0)
    inputs = {"x": torch.randn(2, 3, 16, generator=g), "weight": torch.randn(3, 4, generator=g), "bias": torch.randn(3, generator=g)}
    gy = torch.randn(2, 3, 16, generator=g)
    leaves = _leaves(inputs)
    seq_idx = torch.stack([_seq_idx(r) for r in lengths])
    y = causal_conv1d(**leaves, activation=activation, seq_idx=seq_idx, backend="torch")
    (y * gy).sum().backward()

    expected = {k: torch.zeros_like(v) for k, v in inputs.items()}
    for b, row in enumerate(lengths):
        for sl in _pieces(row):
            piece = _leaves({"x": inputs["x"][b : b + 1, :, sl], "weight": inputs["weight"], "bias": inputs["bias"]})
            y_p = causal_conv1d(**piece, activation=activation, backend="torch")
            _close(y[b : b + 1, :, sl].detach(), y_p.detach(), tol=1e-6)
            (y_p * gy[b : b + 1, :, sl]).sum().backward()
            expected["x"][b : b + 1, :, sl] += piece["x"].grad
            expected["weight"] += piece["weight"].grad
            expected["bias"] += piece["bias"].grad
    for k, v in leaves.items():
        _close(v.grad, expected[k], tol=1e-6)


def test_conv_at_a_sequence_start_sees_only_its_own_token() -> None:
    """Hand check: the first token of a packed sequence gets bias + weight[:, -1]·x_t and nothing before it."""
    x = torch.arange(1.0, 7.0).view(1, 1, 6)
    weight = torch.tensor([[1000.0, 100.0, 10.0, 1.0]])
    bias = torch.tensor([0.5])
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1]], dtype=torch.int32)
    y = causal_conv1d(x, weight, bias, activation=None, seq_idx=seq_idx, backend="torch")
    # t=2: 1·3 + 10·2 + 100·1; t=3 (new sequence): 1·4; t=5: 1·6 + 10·5 + 100·4
    assert y.flatten().tolist() == [1.5, 12.5, 123.5, 4.5, 45.5, 456.5]


def test_conv_refuses_bad_seq_idx() -> None:
    x, w = torch.zeros(1, 2, 5), torch.zeros(2, 4)
    with pytest.raises(ValueError, match="seq_idx must be"):
        causal_conv1d(x, w, seq_idx=torch.zeros(1, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="integer"):
        causal_conv1d(x, w, seq_idx=torch.zeros(1, 5))


# --- Mamba block --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_with_seq_idx_equals_separate_calls_with_per_token_drop_path(backend) -> None:
    torch.manual_seed(0)
    block = ResidualMambaBlock(MambaBlockConfig(d_model=8, d_state=4, ssm_backend=backend, drop_path=0.5))
    lengths = [7, 1, 12, 5]
    scales = [2.0, 0.0, 2.0, 2.0]  # per sequence: kept (1/(1 − p)) or dropped
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, sum(lengths), 8, generator=g)
    gy = torch.randn_like(x)
    keep = torch.repeat_interleave(torch.tensor(scales), torch.tensor(lengths))[None]
    y = block(x, keep, seq_idx=_seq_idx(lengths)[None])
    (y * gy).sum().backward()
    grads = {k: p.grad.clone() for k, p in block.named_parameters()}
    block.zero_grad()
    for sl, scale in zip(_pieces(lengths), scales):
        y_p = block(x[:, sl], torch.tensor([scale]))
        _close(y[:, sl].detach(), y_p.detach())
        (y_p * gy[:, sl]).sum().backward()
    for k, p in block.named_parameters():
        _close(grads[k], p.grad, tol=1e-4)


def test_block_refuses_a_mis_shaped_per_token_keep_scale() -> None:
    block = ResidualMambaBlock(MambaBlockConfig(d_model=4, d_state=2, ssm_backend="torch"))
    with pytest.raises(ValueError, match="per-token keep_scale"):
        block(torch.zeros(1, 5, 4), torch.ones(1, 4))


# --- PixelMamba ---------------------------------------------------------------------------------------


SIZE = 16  # region size: the tiny schedule's 4×4-px final tokens, a 4×4 final grid


def _regions(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, SIZE, SIZE, 3), generator=g, dtype=torch.uint8)


def _model(backend: str, **overrides):
    torch.manual_seed(0)
    return build_model("pixel_mamba_tiny", ssm_backend=backend, num_classes=3, region_size=SIZE, **overrides)


def _gens(views: int, seed: int = 100) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + v) for v in range(views)]


def _loss(outputs) -> torch.Tensor:
    # touches every output: logits (head, embedding), CLS and spatial tokens
    return sum(o.logits.square().sum() + o.spatial_tokens.mean() + o.cls_tokens.square().mean() for o in outputs)


def _packed_and_separate(model, counts: list[int], *, train: bool, fusion: bool, random_split=None):
    """(outputs, param grads) of one packed call and of separate calls, with the same per-view generators."""
    model.train(train)
    x = _regions(sum(counts))
    segments = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    packed = model(x, segments=segments, generator=_gens(len(counts)), region_fusion=fusion, random_split=random_split)
    _loss(packed).backward()
    packed_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    separate = []
    for sl, g in zip(_pieces(counts), _gens(len(counts))):
        separate.append(model(x[sl], generator=g, region_fusion=fusion, random_split=random_split))
    _loss(separate).backward()
    separate_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    return packed, separate, packed_grads, separate_grads


def _assert_same(packed, separate, packed_grads, separate_grads) -> None:
    assert isinstance(packed, list) and len(packed) == len(separate)
    for p, s in zip(packed, separate):
        assert torch.equal(p.region_ids, s.region_ids) and torch.equal(p.assignment, s.assignment)
        assert p.cls_tokens.shape == s.cls_tokens.shape and p.embedding.shape == s.embedding.shape
        for name in ("cls_tokens", "spatial_tokens", "embedding", "logits"):
            _close(getattr(p, name).detach(), getattr(s, name).detach())
    for k in separate_grads:
        _close(packed_grads[k], separate_grads[k], tol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train, fusion", [(True, True), (True, False), (False, True), (False, False)])
def test_packed_views_equal_separate_calls(backend, train, fusion) -> None:
    """Unequal views (5, 1, 3, 2 regions): packed with seq_idx, per-view fusion and drop path."""
    model = _model(backend, drop_path_rate=0.5 if train else 0.1)
    packed, separate, pg, sg = _packed_and_separate(model, [5, 1, 3, 2], train=train, fusion=fusion)
    _assert_same(packed, separate, pg, sg)
    if fusion:
        assert [len(o.region_ids) for o in packed] == [len(o.region_ids) for o in separate]
        assert len(packed[0].region_ids) < 5  # the 5-region view fused


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False])
def test_equal_views_run_as_a_batch_and_equal_separate_calls(backend, train) -> None:
    model = _model(backend, drop_path_rate=0.5)
    batches = []
    hook = model.layers[0].block.register_forward_pre_hook(
        lambda mod, args, kwargs: batches.append((args[0].shape[0], kwargs.get("seq_idx"))), with_kwargs=True
    )
    packed, separate, pg, sg = _packed_and_separate(model, [3, 3, 3], train=train, fusion=True)
    hook.remove()
    assert batches[0] == (3, None)  # B = 3 sequences, no packing index
    _assert_same(packed, separate, pg, sg)


def test_one_region_images_batch_like_an_image_folder() -> None:
    model = _model("torch", region_fusion=False)
    packed, separate, pg, sg = _packed_and_separate(model, [1, 1, 1, 1], train=True, fusion=False)
    _assert_same(packed, separate, pg, sg)


def test_unequal_views_are_packed_into_one_sequence_with_seq_idx() -> None:
    model = _model("torch")
    seen = []
    model.layers[0].block.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((tuple(args[0].shape[:2]), kwargs.get("seq_idx"))), with_kwargs=True
    )
    model.eval()
    with torch.no_grad():
        model(_regions(3), segments=torch.tensor([0, 0, 1]))
    (batch, length), seq_idx = seen[0]
    tokens = SIZE * SIZE + 1
    assert (batch, length) == (1, 3 * tokens)
    assert seq_idx.dtype == torch.int32 and seq_idx.tolist() == [[0] * (2 * tokens) + [1] * tokens]


@pytest.mark.parametrize("train", [True, False])
def test_views_run_separately_where_the_backend_cannot_pack(monkeypatch, train) -> None:
    model = _model("torch", drop_path_rate=0.5)
    monkeypatch.setattr(pixel_mamba, "supports_seq_idx", lambda backend, device=None: False)
    seen = []
    model.layers[0].block.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs.get("seq_idx")), with_kwargs=True)
    packed, separate, pg, sg = _packed_and_separate(model, [2, 4, 1], train=train, fusion=True)
    assert all(s is None for s in seen)
    _assert_same(packed, separate, pg, sg)


def test_numba_packed_equals_torch_packed() -> None:
    if not numba_scan.AVAILABLE:
        pytest.skip("numba is not importable")
    counts, segments = [4, 2], torch.tensor([0, 0, 0, 0, 1, 1])
    outs = []
    for backend in ("torch", "numba"):
        model = _model(backend).eval()
        with torch.no_grad():
            outs.append(model(_regions(6), segments=segments))
    for a, b in zip(*outs):
        _close(a.cls_tokens, b.cls_tokens, tol=1e-4)
    assert [len(o.region_ids) for o in outs[0]] == [len(o.region_ids) for o in outs[1]] and len(counts) == 2


def test_without_segments_the_single_output_is_unchanged() -> None:
    model = _model("torch").train()
    x = _regions(4)
    single = model(x, generator=torch.Generator().manual_seed(3))
    as_views = model(x, generator=[torch.Generator().manual_seed(3)], segments=torch.zeros(4, dtype=torch.long))
    assert isinstance(single, pixel_mamba.PixelMambaOutput) and len(as_views) == 1
    assert torch.equal(single.cls_tokens, as_views[0].cls_tokens)
    assert torch.equal(single.region_ids, as_views[0].region_ids)


def test_random_split_overrides_the_training_flag() -> None:
    """Eval mode with random_split=True draws the split from the generator (and only the split: no drop path)."""
    model = _model("torch", drop_path_rate=0.5).eval()
    x = _regions(12)
    with torch.no_grad():
        alternating = model(x)
        random_a = model(x, random_split=True, generator=torch.Generator().manual_seed(1))
        random_b = model(x, random_split=True, generator=torch.Generator().manual_seed(1))
        draws = {tuple(model(x, random_split=True, generator=torch.Generator().manual_seed(s)).region_ids.tolist()) for s in range(6)}
    assert torch.equal(random_a.cls_tokens, random_b.cls_tokens)
    assert len(draws) > 1  # the split follows the generator; without the override eval mode alternates
    no_drop = _model("torch", drop_path_rate=0.0).train()  # same weights; training mode without drop path
    with torch.no_grad():
        alt_train = [no_drop(x, random_split=False, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    for out in alt_train:  # alternating split even in training: exactly the eval-mode result
        assert torch.equal(out.region_ids, alternating.region_ids) and torch.equal(out.cls_tokens, alternating.cls_tokens)


@pytest.mark.parametrize(
    "segments, match",
    [
        (torch.tensor([0, 0, 2, 2]), "step by 0 or 1"),
        (torch.tensor([1, 1, 2, 2]), "start at 0"),
        (torch.tensor([0, 1, 0, 1]), "step by 0 or 1"),
        (torch.tensor([0, 0, 1]), r"\(4,\) tensor"),
        (torch.tensor([0.0, 0.0, 1.0, 1.0]), "integer"),
    ],
)
def test_bad_segments_are_refused(segments, match) -> None:
    with pytest.raises(ValueError, match=match):
        _model("torch")(_regions(4), segments=segments)


def test_generator_list_must_match_the_views() -> None:
    with pytest.raises(ValueError, match="2 generators for 3 view"):
        _model("torch")(_regions(3), segments=torch.tensor([0, 1, 2]), generator=_gens(2))


def test_packed_views_with_activation_checkpointing_equal_without() -> None:
    counts = [3, 1, 2]
    segments = torch.repeat_interleave(torch.arange(3), torch.tensor(counts))
    results = []
    for k in (0, 3):
        model = _model("torch", drop_path_rate=0.5, checkpoint_layers=k).train()
        outs = model(_regions(6), segments=segments, generator=_gens(3))
        _loss(outs).backward()
        results.append((outs, {n: p.grad for n, p in model.named_parameters()}))
    (plain, g_plain), (ckpt, g_ckpt) = results
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a.cls_tokens, b.cls_tokens)
    for n in g_plain:
        torch.testing.assert_close(g_plain[n], g_ckpt[n])
