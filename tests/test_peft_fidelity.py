"""COBOT, AdaptFormer(+COBOT) and Conv-LoRA against reference functions written from the
published formulas (issue 12).

The references below are our own transcriptions of what the authors' code computes (SAM-COBOT
medical/train.py and quaternion_ops.py; AutoGluon's adaptation_layers.py), not copies of it.
Everything runs in float64 with random, non-trivial values in every added tensor (B non-zero,
R not the identity, γ ≠ 1, random quaternion parts, non-zero biases), so a sign flip, a
transpose, a wrong column of C @ R or the wrong input (h instead of norm2(h)) moves the output
by far more than the tolerance.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cobot_med.peft.cobot import HypercomplexLinear
from cobot_med.peft.conv_lora import ConvLoraConfig, ConvLoraQkv
from toy import tiny

TOL = dict(rtol=1e-9, atol=1e-11)


def randomize(module: nn.Module, seed: int = 7, scale: float = 0.5) -> None:
    """Fill every trainable tensor with N(0, scale²) (a frozen ``fixed`` R is random already)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module.parameters():
            if t.requires_grad and t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64) * scale)


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def adapted_and_base(method: str, **options):
    """(adapted encoder, its unadapted twin) in float64, eval, with the same base weights.

    The base LayerNorms get random affine parameters (trained SAM's are far from 1 and 0), so
    that norm2(h) and h differ even after the branch's own LayerNorm; the adapter is randomized.
    """
    encoders = [tiny(m, **o).double().eval().sam.image_encoder for m, o in ((method, options), ("frozen", {}))]
    for encoder in encoders:
        g = torch.Generator().manual_seed(9)
        with torch.no_grad():
            for block in encoder.blocks:
                for norm in (block.norm1, block.norm2):
                    norm.weight.copy_(1 + torch.randn(norm.weight.shape, generator=g, dtype=torch.float64))
                    norm.bias.copy_(torch.randn(norm.bias.shape, generator=g, dtype=torch.float64))
    randomize(encoders[0])
    return encoders


def encoder_input(seed: int = 1, size: int = 64) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- reference functions --------------------------------------------------------------------


def ref_quaternion(x, r, i, j, k):
    """Hamilton product (r + i i + j j + k k) ⊗ x of a weight quaternion and the input's four
    quarters (Parcollet et al.'s QNN linear layer); each product of parts is ``x_part @ w_part``."""
    xr, xi, xj, xk = x.chunk(4, dim=-1)
    return torch.cat(
        [
            xr @ r - xi @ i - xj @ j - xk @ k,
            xr @ i + xi @ r - xj @ k + xk @ j,
            xr @ j + xi @ k + xj @ r - xk @ i,
            xr @ k - xi @ j + xj @ i + xk @ r,
        ],
        dim=-1,
    )


def ref_head(kind, tensors):
    if kind == "quaternion":
        return lambda d: ref_quaternion(d, *tensors)
    if kind == "linear":  # an nn.Linear without bias: d W^T
        return lambda d: d @ tensors[0].t()
    return lambda d: d


def head_tensors(orchestrator, site):
    if orchestrator.config.head == "quaternion":
        h = orchestrator.heads[site]
        return (h.r_weight, h.i_weight, h.j_weight, h.k_weight)
    if orchestrator.config.head == "linear":
        return (orchestrator.heads[site].weight,)
    return ()


def ref_cobot_site(d, orchestrator, site):
    """d' = H_s(d * (C @ R)[:, s] + γ_s * d) and the authors' ablation lines (train.py 318-326):
    without C the bracket is γ_s * d, without H the head is the identity."""
    config = orchestrator.config
    gamma = orchestrator.site_coefficients[site]
    inner = gamma * d
    if config.cross_block_coefficients:
        cp = orchestrator.coefficients @ orchestrator.relation  # (V, S)
        inner = d * cp[:, site] + inner
    return ref_head(config.head, head_tensors(orchestrator, site))(inner)


def ref_lora_qkv(x, layer, orchestrator=None, block=0):
    """SAM-COBOT's ``_LoRA_qkv`` / ``_LoRA_qkv_relation_add``: q (first third) and v (last third)
    get B(site(A x)); block b's q uses site 2b, its v site 2b + 1."""
    base = layer.base_layer
    qkv = x @ base.weight.t() + base.bias
    dim = base.in_features
    parts = {}
    for n, t in enumerate(("q", "v")):
        a = x @ layer.lora_A[t].weight.t()
        if orchestrator is not None:
            a = ref_cobot_site(a, orchestrator, 2 * block + n)
        parts[t] = a @ layer.lora_B[t].weight.t() * layer.scale
    q = qkv[..., :dim] + parts["q"]
    v = qkv[..., -dim:] + parts["v"]
    return torch.cat([q, qkv[..., dim:-dim], v], dim=-1)


def ref_adaptformer_branch(x, branch, orchestrator=None, site=0):
    """The authors' ``Adapter`` / ``Adapter_relation`` forward minus the residual: LN_in, down,
    [COBOT], ReLU, (dropout: eval), up, * scale."""
    x = F.layer_norm(x, x.shape[-1:], branch.norm.weight, branch.norm.bias, branch.norm.eps)
    d = x @ branch.down.weight.t() + branch.down.bias
    if orchestrator is not None:
        d = ref_cobot_site(d, orchestrator, site)
    return (torch.relu(d) @ branch.up.weight.t() + branch.up.bias) * branch.scale


def ref_expert(x, conv, scale):
    """AutoGluon's expert i: bicubic up by s, Conv3x3, GELU, bicubic back (no resize at s = 1)."""
    h, w = x.shape[-2:]
    if scale != 1:
        x = F.interpolate(x, scale_factor=scale, mode="bicubic")
    y = F.gelu(F.conv2d(x, conv.weight, conv.bias, padding=1))
    return y if scale == 1 else F.interpolate(y, size=(h, w), mode="bicubic")


def cv_squared(x):
    return x.var() / (x.mean() ** 2 + 1e-10) if x.numel() > 1 else x.new_zeros(())


def ref_conv_lora(x, layer, noise=None):
    """AutoGluon's ``ConvLoRALinear`` + ``MoEGate`` (top-k softmax gates, no multiplication by the
    gates, log-sum-exp combine); returns (output, load-balancing loss, chosen experts)."""
    moe = layer.moe
    k = moe.top_k
    a = x @ layer.lora_A.weight.t()  # (N, H, W, r)
    grid = a.permute(0, 3, 1, 2)
    pooled = grid.mean(dim=(2, 3))
    clean = pooled @ moe.w_gate
    logits = clean
    if noise is not None:
        std = F.softplus(pooled @ moe.w_noise) + 1e-2
        logits = clean + noise * std
    top_values, top_index = logits.topk(min(k + 1, logits.shape[1]), dim=1)
    gates = torch.zeros_like(logits)
    for n in range(len(x)):
        gates[n, top_index[n, :k]] = top_values[n, :k].softmax(dim=0)
    mixed = []
    for n in range(len(x)):
        outs = [ref_expert(grid[n : n + 1], moe.experts[e].conv, e + 1) for e in top_index[n, :k].tolist()]
        mixed.append(torch.logsumexp(torch.stack(outs), dim=0))
    bottleneck = grid + torch.cat(mixed)
    out = x @ layer.base_layer.weight.t() + layer.base_layer.bias
    out = out + bottleneck.permute(0, 2, 3, 1) @ layer.lora_B.weight.t() * layer.scale
    if noise is not None and k < logits.shape[1]:
        normal = torch.distributions.Normal(0.0, 1.0)
        t_in, t_out = top_values[:, k : k + 1], top_values[:, k - 1 : k]
        load = torch.where(logits > t_in, normal.cdf((clean - t_in) / std), normal.cdf((clean - t_out) / std)).sum(0)
    else:
        load = (gates > 0).sum(0).double()
    loss = moe.aux_loss_weight * (cv_squared(gates.sum(0)) + cv_squared(load))
    return out, loss, top_index[:, :k]


# --- the hypercomplex head ------------------------------------------------------------------


def test_quaternion_head_is_the_authors_hamilton_matrix():
    head = HypercomplexLinear(4).double()
    with torch.no_grad():  # r, i, j, k = 1, 2, 3, 4: unit inputs read W's rows
        for p, v in zip((head.r_weight, head.i_weight, head.j_weight, head.k_weight), (1.0, 2.0, 3.0, 4.0)):
            p.fill_(v)
    rows = head(torch.eye(4, dtype=torch.float64))
    expected = torch.tensor([[1, 2, 3, 4], [-2, 1, 4, -3], [-3, -4, 1, 2], [-4, 3, -2, 1]], dtype=torch.float64)
    assert torch.equal(rows, expected)


def test_an_authors_quaternion_state_dict_loads_and_computes_the_hamilton_product():
    g = torch.Generator().manual_seed(0)
    theirs = {f"{c}_weight": torch.randn(4, 4, generator=g, dtype=torch.float64) for c in "rijk"}
    head = HypercomplexLinear(16).double()
    head.load_state_dict(theirs)  # strict: their names are ours
    x = torch.randn(3, 5, 16, generator=g, dtype=torch.float64)
    expected = ref_quaternion(x, *(theirs[f"{c}_weight"] for c in "rijk"))
    torch.testing.assert_close(head(x), expected, **TOL)
    # the block-transpose convention ((r, i, j, k) read as (r, -i, -j, -k)) is far off
    flipped = ref_quaternion(x, theirs["r_weight"], -theirs["i_weight"], -theirs["j_weight"], -theirs["k_weight"])
    assert relative_l2(head(x), flipped) > 0.1


def test_quaternion_head_starts_as_the_authors():
    head = HypercomplexLinear(16)
    assert not head.r_weight.any()
    for p in (head.i_weight, head.j_weight, head.k_weight):
        assert p.min() >= 0 and p.max() <= 1 and p.std() > 0.1


# --- LoRA + COBOT ---------------------------------------------------------------------------


COBOT_SWITCHES = [
    {},
    {"head": "none"},  # HL off: d Λ[:, s] + γ_s d
    {"cross_block_coefficients": False, "relation": "identity"},  # only HL: H_s(γ_s d)
    {"cross_block_coefficients": False, "relation": "identity", "head": "none"},  # γ_s d
    {"relation": "identity"},
    {"relation": "fixed"},
    {"head": "linear"},
]


@pytest.mark.parametrize("switches", COBOT_SWITCHES)
def test_lora_cobot_one_block_equals_the_reference(switches):
    model = tiny("lora+cobot", cobot=switches).double()
    randomize(model.sam.image_encoder)
    encoder = model.sam.image_encoder
    x = torch.randn(2, 7, 7, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for block in (0, 2):  # a later block reads later columns of C @ R and later γ rows
        layer = encoder.blocks[block].attn.qkv
        with torch.no_grad():
            ours = layer(x)
            expected = ref_lora_qkv(x, layer, encoder.cobot, block)
            plain = ref_lora_qkv(x, layer)  # LoRA without COBOT
        torch.testing.assert_close(ours, expected, **TOL)
        assert relative_l2(ours, plain) > 1e-2  # the COBOT terms matter in this check


def test_cobot_ablations_keep_gamma():
    """Every switch keeps γ: doubling γ changes the branch in each of the authors' ablations."""
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for switches in COBOT_SWITCHES:
        orchestrator = tiny("lora+cobot", cobot=switches).double().sam.image_encoder.cobot
        randomize(orchestrator)
        with torch.no_grad():
            d = x[:, : orchestrator.width]
            before = orchestrator(d, 1)
            orchestrator.site_coefficients.mul_(2)
            after = orchestrator(d, 1)
        assert relative_l2(after, before) > 1e-2, switches


def assert_qkv_stack_matches(method, reference_qkv):
    """The whole adapted encoder equals the base encoder whose every qkv runs ``reference_qkv(x, encoder, b)``,
    and differs from the base."""
    encoder, reference = adapted_and_base(method)
    x = encoder_input()
    with torch.no_grad():
        base = reference(x)
        for b, block in enumerate(reference.blocks):
            block.attn.qkv = _Call(lambda x, b=b: reference_qkv(x, encoder, b))
        ours, expected = encoder(x), reference(x)
    torch.testing.assert_close(ours, expected, **TOL)
    assert relative_l2(ours, base) > 1e-2


def test_lora_cobot_stack_equals_the_reference_encoder():
    assert_qkv_stack_matches("lora+cobot", lambda x, enc, b: ref_lora_qkv(x, enc.blocks[b].attn.qkv, enc.cobot, b))


class _Call(nn.Module):
    """A module that computes a reference function (so it can stand in a block)."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


# --- AdaptFormer (+ COBOT) --------------------------------------------------------------------


def _global_block_reference(block, branch_fn, x, reads):
    """A segment-anything global-attention block (window 0) with the branch beside its MLP."""
    h = x + block.attn(block.norm1(x))
    inner = block.norm2(h)
    return h + block.mlp(inner) + branch_fn(inner if reads == "mlp_input" else h)


@pytest.mark.parametrize("method", ["adaptformer", "adaptformer+cobot"])
@pytest.mark.parametrize("reads", ["mlp_input", "residual_stream"])
def test_adaptformer_one_block_equals_the_reference(method, reads):
    encoder, pristine = adapted_and_base(method, branch_input=reads)
    assert encoder.blocks[1].window_size == 0  # a global block: h is x + attn(norm1(x))
    x = torch.randn(2, 4, 4, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    orchestrator = getattr(encoder, "cobot", None)
    branch = encoder.blocks[1].mlp.adaptformer
    with torch.no_grad():
        ours = encoder.blocks[1](x)
        expected = _global_block_reference(
            pristine.blocks[1], lambda t: ref_adaptformer_branch(t, branch, orchestrator, 1), x, reads
        )
        other = "residual_stream" if reads == "mlp_input" else "mlp_input"
        wrong_input = _global_block_reference(
            pristine.blocks[1], lambda t: ref_adaptformer_branch(t, branch, orchestrator, 1), x, other
        )
    torch.testing.assert_close(ours, expected, **TOL)
    assert relative_l2(ours, wrong_input) > 1e-2  # reading h instead of norm2(h) would show


@pytest.mark.parametrize("method", ["adaptformer", "adaptformer+cobot"])
def test_adaptformer_stack_equals_the_authors_mlp_replacement(method):
    encoder, reference = adapted_and_base(method)
    orchestrator = getattr(encoder, "cobot", None)
    x = encoder_input()
    with torch.no_grad():
        base = reference(x)
        for b, block in enumerate(reference.blocks):  # the authors replace each block's mlp
            branch = encoder.blocks[b].mlp.adaptformer
            block.mlp = _Call(lambda x, mlp=block.mlp, br=branch, b=b: mlp(x) + ref_adaptformer_branch(x, br, orchestrator, b))
        ours, expected = encoder(x), reference(x)
    torch.testing.assert_close(ours, expected, **TOL)
    assert relative_l2(ours, base) > 1e-2


# --- initialisation -------------------------------------------------------------------------


def test_lora_default_init_is_the_authors_xavier_normal():
    torch.manual_seed(0)
    model = tiny("lora+cobot", size=64)
    layer = model.sam.image_encoder.blocks[0].attn.qkv
    for t in ("q", "v"):
        for w in (layer.lora_A[t].weight, layer.lora_B[t].weight):
            fan_out, fan_in = w.shape
            expected_std = math.sqrt(2.0 / (fan_in + fan_out))
            assert abs(float(w.detach().std()) / expected_std - 1) < 0.2
            assert abs(float(w.detach().mean())) < 3 * expected_std / math.sqrt(w.numel())


def test_lora_zero_b_option_starts_equal_to_the_base():
    layer = tiny("lora", init="zero_b").sam.image_encoder.blocks[0].attn.qkv
    assert not layer.lora_B["q"].weight.any() and layer.lora_A["q"].weight.any()
    x = torch.randn(1, 4, 4, 64)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_layer(x))


def test_adaptformer_init_is_the_authors():
    branch = tiny("adaptformer").sam.image_encoder.blocks[0].mlp.adaptformer
    assert not branch.down.bias.any() and branch.down.weight.any()
    assert not branch.up.weight.any() and not branch.up.bias.any()


# --- Conv-LoRA --------------------------------------------------------------------------------


def _conv_lora_layer(seed=0, **options):
    torch.manual_seed(seed)
    layer = ConvLoraQkv(nn.Linear(12, 36), ConvLoraConfig(**options)).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.7)
    return layer


@pytest.mark.parametrize("top_k", [1, 2])
def test_conv_lora_one_layer_equals_autogluon_eval(top_k):
    layer = _conv_lora_layer(top_k=top_k).eval()
    x = torch.randn(8, 7, 7, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        ours = layer(x)
        expected, loss, chosen = ref_conv_lora(x, layer)
    assert len(set(chosen[:, 0].tolist())) > 1  # the batch really is routed to several experts
    torch.testing.assert_close(ours, expected, **TOL)
    torch.testing.assert_close(layer.moe.aux_loss.double(), loss, rtol=1e-6, atol=1e-9)


def test_conv_lora_one_layer_equals_autogluon_training_with_gate_noise():
    layer = _conv_lora_layer().train()
    x = torch.randn(8, 7, 7, 12, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    torch.manual_seed(11)
    ours = layer(x)
    torch.manual_seed(11)  # the same gate noise, drawn as the layer draws it
    noise = torch.randn(8, layer.moe.w_gate.shape[1], dtype=torch.float64)
    expected, loss, _ = ref_conv_lora(x, layer, noise=noise)
    torch.testing.assert_close(ours, expected, **TOL)
    torch.testing.assert_close(layer.moe.aux_loss.double(), loss, rtol=1e-6, atol=1e-9)


def test_conv_lora_defaults_are_autogluons_sam_preset():
    config = ConvLoraConfig()
    assert (config.rank, config.alpha, config.num_experts, config.top_k) == (3, 32.0, 8, 1)
    layer = ConvLoraQkv(nn.Linear(12, 36), config)
    assert all(not e.conv.bias.any() for e in layer.moe.experts)
    assert not layer.lora_B.weight.any() and not layer.moe.w_gate.any()


def test_conv_lora_stack_equals_the_reference_encoder():
    assert_qkv_stack_matches("conv_lora", lambda x, enc, b: ref_conv_lora(x, enc.blocks[b].attn.qkv)[0])


def test_deep_copy_keeps_the_residual_stream_tap_on_its_own_block():
    model = tiny("adaptformer", branch_input="residual_stream").double().eval()
    randomize(model.sam.image_encoder)
    twin = copy.deepcopy(model)
    x = encoder_input()
    with torch.no_grad():
        torch.testing.assert_close(twin.sam.image_encoder(x), model.sam.image_encoder(x), **TOL)
