"""The EKD loss terms against hand computations, and which side each term moves."""

from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn.functional as F

from ekd_ddnn.errors import UserError
from ekd_ddnn.losses import EKDLoss, sharing_pattern
from ekd_ddnn.models import build_net


def test_attention_maps_by_hand():
    """A = sum over channels, flattened, divided by its L2 norm per sample: MSE_1 of two
    one-stage nets by hand; a bf16 map is summed with float32 accumulation."""

    def mse(full, sub):
        logits = [torch.zeros(1, 2)] * 2
        loss = EKDLoss(ensemble=False)
        return loss.terms(logits, [[full], [sub]], torch.tensor([0])).mse[1].item()

    full = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])  # (1, 2, 1, 2): sums 4, 6
    sub = torch.tensor([[[[1.0, 0.0]], [[0.0, 0.0]]]])  # sums 1, 0
    a = [4 / math.sqrt(52), 6 / math.sqrt(52)]
    assert mse(full, sub) == pytest.approx(((a[0] - 1) ** 2 + a[1] ** 2) / 2, rel=1e-6)
    wide = torch.ones(1, 384, 1, 2, dtype=torch.bfloat16)
    wide[0, :, 0, 0] = 1.0 + 2**-7  # channel sums 387 and 384: bf16 has steps of 2 there
    flat = torch.ones(1, 384, 1, 2, dtype=torch.bfloat16)  # sums 384, 384
    want = [387 / math.hypot(387, 384), 384 / math.hypot(387, 384), 1 / math.sqrt(2)]
    assert mse(wide, flat) == pytest.approx(
        ((want[0] - want[2]) ** 2 + (want[1] - want[2]) ** 2) / 2, rel=1e-4
    )


def test_kl_by_hand():
    """KL(p_t || softmax(s)) for p_t = [.5, .5] and q = [.25, .75]; T^2 scaling at T = 2."""
    teacher = torch.tensor([[0.0, 0.0]])  # softmax [.5, .5] at any temperature
    student = torch.tensor([[0.0, math.log(3.0)]])
    feats = [[torch.ones(1, 1, 1, 1)]] * 2
    y = torch.tensor([0])
    kl = EKDLoss(ensemble=False).terms([teacher, student], feats, y).kl
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl[0] is None and kl[1].item() == pytest.approx(expected, rel=1e-6)
    # T = 2: q = softmax([0, ln 3] / 2) = [1, sqrt 3] / (1 + sqrt 3); KL scaled by 4
    q = [1 / (1 + math.sqrt(3)), math.sqrt(3) / (1 + math.sqrt(3))]
    expected_t2 = 4 * sum(0.5 * math.log(0.5 / qi) for qi in q)
    kl = EKDLoss(ensemble=False, temperature=2.0).terms([teacher, student], feats, y).kl
    assert kl[1].item() == pytest.approx(expected_t2, rel=1e-6)


def _softmax(row):
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def _norm_map(feature):  # feature: C x positions (one sample)
    summed = [sum(col) for col in zip(*feature, strict=True)]
    n = math.sqrt(sum(v * v for v in summed))
    return [v / n for v in summed]


def test_ekd_total_by_hand():
    """K = 2, batch 1, one stage: every term and the total, from plain-Python formulas."""
    logits = [[2.0, 0.0, -1.0], [1.0, 1.0, 0.0], [0.0, 0.5, 0.2]]
    feats = [  # one sample, 2 channels x 3 positions each
        [[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]],
        [[0.5, 0.0, 1.0], [1.0, 1.0, 0.0]],
        [[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]],
    ]
    target = 1
    w, a = 0.7, 30.0
    loss = EKDLoss(mode="ekd", w=w, a=a)
    terms = loss.terms(
        [torch.tensor([lg]) for lg in logits],
        [[torch.tensor([f]).unsqueeze(-2)] for f in feats],  # (1, C, 1, 3)
        torch.tensor([target]),
    )
    probs = [_softmax(lg) for lg in logits]
    ce = [-math.log(p[target]) for p in probs]
    p_et = [sum(col) / 3 for col in zip(*probs, strict=True)]
    kl = [_kl(p_et, probs[0]), _kl(probs[0], probs[1]), _kl(probs[0], probs[2])]
    maps = [_norm_map(f) for f in feats]
    a_et = [sum(col) / 3 for col in zip(*maps, strict=True)]
    mse = lambda u, v: sum((x - y) ** 2 for x, y in zip(u, v, strict=True)) / len(u)  # noqa: E731
    mses = [mse(maps[0], a_et), mse(maps[1], maps[0]), mse(maps[2], maps[0])]
    total = ce[0] + (ce[1] + ce[2]) / 2 + w / 3 * sum(kl) + a / 3 * sum(mses)
    for got, want in zip(terms.ce + terms.kl + terms.mse, ce + kl + mses, strict=True):
        assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert terms.total.item() == pytest.approx(total, rel=1e-5)


def _outputs(k=2, classes=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = [torch.randn(4, classes, generator=gen, requires_grad=True) for _ in range(k + 1)]
    feats = [
        [torch.randn(4, 3, 4, 4, generator=gen, requires_grad=True) for _ in range(2)]
        for _ in range(k + 1)
    ]
    return logits, feats, torch.randint(classes, (4,), generator=gen)


def _grads(tensors):
    return [t.grad is not None and bool(t.grad.abs().sum() > 0) for t in tensors]


def test_student_terms_do_not_move_the_teacher():
    """KL_k and MSE_k give gradients to sub-net k only; the ensemble terms to the full-net."""
    for term in ("kl", "mse"):
        for index, movers in ((1, [False, True, False]), (0, [True, False, False])):
            logits, feats, y = _outputs()
            terms = EKDLoss().terms(logits, feats, y)
            getattr(terms, term)[index].backward()
            tensors = logits if term == "kl" else [f[0] for f in feats]
            assert _grads(tensors) == movers, (term, index)


def test_individual_is_plain_cross_entropy():
    """Mode individual: the total is F.cross_entropy of the one net, no other terms."""
    logits, feats, y = _outputs(k=0)
    terms = EKDLoss(mode="individual").terms(logits, feats, y)
    torch.testing.assert_close(terms.total, F.cross_entropy(logits[0], y))
    assert terms.kl == [None] and terms.mse == [None]


def test_ddnn_is_cross_entropy_of_every_depth():
    """Mode ddnn: CE_t + mean of the sub-nets' CE; no distillation terms computed."""
    logits, feats, y = _outputs(k=3)
    terms = EKDLoss(mode="ddnn").terms(logits, feats, y)
    ce = [F.cross_entropy(lg, y) for lg in logits]
    torch.testing.assert_close(terms.total, ce[0] + (ce[1] + ce[2] + ce[3]) / 3)
    assert terms.kl == [None] * 4 and terms.mse == [None] * 4


def test_ensemble_switch_and_zero_weights():
    """ensemble=False drops KL_t and MSE_t; w = a = 0 makes ekd equal ddnn."""
    logits, feats, y = _outputs()
    full = EKDLoss().terms(logits, feats, y)
    ablated = EKDLoss(ensemble=False).terms(logits, feats, y)
    assert ablated.kl[0] is None and ablated.mse[0] is None
    expected = full.total - 1.0 / 3 * full.kl[0] - 100.0 / 3 * full.mse[0]
    torch.testing.assert_close(ablated.total, expected)
    zero = EKDLoss(w=0, a=0).terms(logits, feats, y)
    torch.testing.assert_close(zero.total, EKDLoss(mode="ddnn").terms(logits, feats, y).total)


def test_k0_ekd_equals_cross_entropy():
    """With no sub-nets the ensemble is the full-net itself: EKD reduces to CE."""
    logits, feats, y = _outputs(k=0)
    terms = EKDLoss().terms(logits, feats, y)
    torch.testing.assert_close(terms.total, F.cross_entropy(logits[0], y))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"w": -1.0}, "ekd.w and ekd.a must be >= 0 (got w=-1.0, a=100.0)"),
        ({"a": -0.5}, "ekd.w and ekd.a must be >= 0"),
        ({"temperature": 0.0}, "ekd.temperature must be > 0, got 0.0"),
        ({"w": "high"}, "ekd.w must be a number, got 'high'"),
        ({"mode": "kd"}, "unknown ekd.mode 'kd'; choose one of individual, ddnn, ekd"),
        ({"attention_stages": "x"}, "ekd.attention_stages must be all or differing, got 'x'"),
    ],
)
def test_invalid_settings(kwargs, message):
    """Bad settings are user errors with the fix in the message."""
    with pytest.raises(UserError) as info:
        EKDLoss(**kwargs)
    assert message in str(info.value)


# ----------------------------------------------------------------- plain-formula reference
def _plain_maps(features):
    """Channel sum, flattened, divided by its L2 norm per sample (no library helper)."""
    maps = []
    for f in features:
        summed = f.sum(dim=1).reshape(f.shape[0], -1)
        maps.append(summed / summed.pow(2).sum(dim=1, keepdim=True).sqrt())
    return maps


def _plain_mse(u, v):
    return ((u - v) ** 2).mean()


def _plain_terms(logits, feats, y, temperature):
    """CE, KL, per-stage MSE of every net, from plain formulas (K sub-nets, ensemble on)."""
    rows = torch.arange(len(y))
    ce = [-torch.log_softmax(lg, dim=1)[rows, y].mean() for lg in logits]
    probs = [torch.log_softmax(lg / temperature, dim=1).exp() for lg in logits]

    def kl(p, q):  # T^2 * batch mean of sum_c p log(p / q)
        return temperature**2 * (p * torch.log(p / q)).sum(dim=1).mean()

    p_et = sum(probs) / len(probs)
    kls = [kl(p_et, probs[0])] + [kl(probs[0], q) for q in probs[1:]]
    maps = [_plain_maps(f) for f in feats]
    a_et = [sum(m[s] for m in maps) / len(maps) for s in range(len(feats[0]))]
    stage_mse = [[_plain_mse(m0, e) for m0, e in zip(maps[0], a_et, strict=True)]] + [
        [_plain_mse(mk, m0) for mk, m0 in zip(m, maps[0], strict=True)] for m in maps[1:]
    ]
    return ce, kls, stage_mse


def _float64_outputs(seed=0, shapes=((3, 4, 4), (5, 2, 2)), batch=3, classes=4, k=2):
    gen = torch.Generator().manual_seed(seed)
    logits = [torch.randn(batch, classes, generator=gen, dtype=torch.float64) for _ in range(k + 1)]
    feats = [
        [torch.randn(batch, *shape, generator=gen, dtype=torch.float64) for shape in shapes]
        for _ in range(k + 1)
    ]
    return logits, feats, torch.randint(classes, (batch,), generator=gen)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_every_term_against_plain_formulas(temperature):
    """K = 2, ensemble on, two stages of different shapes, float64: CE, KL_t, KL_k, MSE_t,
    MSE_k and the total against log_softmax / sum p log(p/q) / channel-sum maps."""
    logits, feats, y = _float64_outputs()
    w, a = 0.7, 30.0
    terms = EKDLoss(w=w, a=a, temperature=temperature).terms(logits, feats, y)
    ce, kls, stage_mse = _plain_terms(logits, feats, y, temperature)
    mses = [sum(m) / len(m) for m in stage_mse]
    total = ce[0] + (ce[1] + ce[2]) / 2 + w / 3 * sum(kls) + a / 3 * sum(mses)
    for name, got, want in zip(
        ["ce"] * 3 + ["kl"] * 3 + ["mse"] * 3,
        terms.ce + terms.kl + terms.mse,
        ce + kls + mses,
        strict=True,
    ):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14, msg=name)
    torch.testing.assert_close(terms.total, total, rtol=1e-12, atol=1e-14)
    assert all(k > 0 for k in kls) and all(m > 0 for m in mses)


# ----------------------------------------------------------------- ekd.attention_stages
def test_differing_equals_all_when_every_stage_differs():
    """No stage output shared: both settings give the same terms and total."""
    logits, feats, y = _float64_outputs()
    every = EKDLoss(attention_stages="all").terms(logits, feats, y)
    differing = EKDLoss(attention_stages="differing").terms(logits, feats, y)
    for got, want in zip(differing.mse + [differing.total], every.mse + [every.total], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_differing_averages_over_differing_stages_only():
    """Three stages; stage 1 is the full-net's tensor for both sub-nets, stage 2 for sub-net
    1 only. ``differing``: MSE_1 over stage 3, MSE_2 over stages 2-3, MSE_t over stages 2-3
    (where some sub-net differs). ``all``: the paper's mean over the three stages, with the
    shared stages' identically zero MSE counted."""
    logits, feats, y = _float64_outputs(shapes=((3, 4, 4), (4, 2, 2), (2, 2, 2)))
    feats[1][0] = feats[2][0] = feats[0][0]
    feats[1][1] = feats[0][1]
    w, a = 0.5, 20.0
    _, kls, m = _plain_terms(logits, feats, y, 1.0)
    assert m[1][0] == m[2][0] == m[1][1] == 0  # a sub-net's shared stage: exactly zero
    assert m[0][0] < 1e-30  # A_et of three equal maps: zero up to rounding
    ce_part = EKDLoss(mode="ddnn").terms(logits, feats, y).total
    for setting, expected in [
        ("differing", [(m[0][1] + m[0][2]) / 2, m[1][2], (m[2][1] + m[2][2]) / 2]),
        ("all", [sum(m[0]) / 3, m[1][2] / 3, (m[2][1] + m[2][2]) / 3]),
    ]:
        terms = EKDLoss(w=w, a=a, attention_stages=setting).terms(logits, feats, y)
        for k, want in enumerate(expected):
            torch.testing.assert_close(terms.mse[k], want, rtol=1e-12, atol=1e-14, msg=setting)
        total = ce_part + w / 3 * sum(kls) + a / 3 * sum(expected)
        torch.testing.assert_close(terms.total, total, rtol=1e-12, atol=1e-14, msg=setting)


def test_differing_term_is_zero_without_differing_stage():
    """A sub-net whose every stage output is the full-net's: MSE_k = MSE_t = 0."""
    logits, feats, y = _float64_outputs(k=1)
    feats[1] = list(feats[0])
    terms = EKDLoss(attention_stages="differing").terms(logits, feats, y)
    assert terms.mse[0].item() == 0 and terms.mse[1].item() == 0


def test_differing_on_a_real_prefix_tree():
    """ResNet-20 with [3,3,2]: the forward returns the full-net's own stage 1-2 tensors for
    the sub-net, so ``differing`` averages over stage 3 alone, three times ``all``'s MSE_1."""
    torch.manual_seed(0)
    net = build_net("cifar_resnet20", subnets=[[3, 3, 2]], image_size=8).double()
    outputs = net.forward_depths(torch.randn(2, 3, 8, 8, dtype=torch.float64), net.depths)
    (_, full), (_, sub) = outputs
    assert [f is g for f, g in zip(sub, full, strict=True)] == [True, True, False]
    logits, feats, y = [o[0] for o in outputs], [o[1] for o in outputs], torch.tensor([0, 1])
    every = EKDLoss(attention_stages="all").terms(logits, feats, y)
    differing = EKDLoss(attention_stages="differing").terms(logits, feats, y)
    _, _, m = _plain_terms(logits, feats, y, 1.0)
    torch.testing.assert_close(differing.mse[1], m[1][2], rtol=1e-12, atol=0)
    torch.testing.assert_close(every.mse[1], differing.mse[1] / 3, rtol=1e-12, atol=0)
    torch.testing.assert_close(differing.mse[0], m[0][2], rtol=1e-12, atol=0)


# ----------------------------------------------------------------- one depth at a time
def _reference_terms(loss, logits, features, targets):
    """The loss computed one depth at a time (the implementation before the depths were
    stacked): the stacked loss must equal it, values and gradients."""
    temperature = loss.temperature
    ce = [F.cross_entropy(lg, targets) for lg in logits]
    total = ce[0] + (torch.stack(ce[1:]).mean() if len(logits) > 1 else 0.0)
    if not loss.distills:
        return total, ce, [], []

    def kl_of(teacher, student):
        log_student = F.log_softmax(student / temperature, dim=1)
        return F.kl_div(log_student, teacher, reduction="batchmean") * temperature**2

    def mse_of(students, teachers, stages):
        if not stages:
            return students[0].new_zeros(())
        return torch.stack([F.mse_loss(students[s], teachers[s]) for s in stages]).mean()

    every = list(range(len(features[0])))
    own = [[s for s in every if f[s] is not features[0][s]] for f in features]
    own[0] = [s for s in every if any(s in stages for stages in own[1:])]
    stages = own if loss.attention_stages == "differing" else [every] * len(features)
    probs = [F.softmax(lg / temperature, dim=1) for lg in logits]
    maps = [[F.normalize(f.sum(dim=1).flatten(1), dim=1) for f in fs] for fs in features]
    kl = [
        kl_of(
            probs[0].detach(),
            logits[k],
        )
        for k in range(1, len(logits))
    ]
    mse = [mse_of(maps[k], [m.detach() for m in maps[0]], stages[k]) for k in range(1, len(logits))]
    if loss.ensemble:
        ensemble_probs = torch.stack(probs).mean(dim=0).detach()
        ensemble_maps = [torch.stack(m).mean(dim=0).detach() for m in zip(*maps, strict=True)]
        kl.insert(0, kl_of(ensemble_probs, logits[0]))
        mse.insert(0, mse_of(maps[0], ensemble_maps, stages[0]))
    total = total + (loss.w * sum(kl) + loss.a * sum(mse)) / len(logits)
    return total, ce, kl, mse


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"temperature": 3.0, "w": 0.3, "a": 7.0},
        {"ensemble": False},
        {"attention_stages": "differing"},
        {"attention_stages": "differing", "ensemble": False, "temperature": 0.5},
        {"mode": "ddnn"},
    ],
    ids=["default", "temperature", "no_ensemble", "differing", "differing_no_ens", "ddnn"],
)
@pytest.mark.parametrize("shared", ["none", "prefix", "all"])
@pytest.mark.parametrize("k", [0, 1, 3])
def test_stacked_loss_equals_one_depth_at_a_time(kwargs, shared, k):
    """float64: every term, the total and the gradients of every logit and feature map equal
    the per-depth computation to 1e-6 (relative), with stage outputs shared between depths
    as the prefix tree returns them (``prefix``: stage 1 shared by all, stage 2 by sub-net 1
    and, with three sub-nets, sub-nets 2 and 3 share another; ``all``: every stage of
    sub-net 1 is the full-net's)."""
    logits, feats, y = _float64_outputs(seed=k, shapes=((3, 4, 4), (4, 2, 2), (2, 2, 2)), k=k)
    if k and shared == "prefix":
        for f in feats[1:]:
            f[0] = feats[0][0]
        feats[1][1] = feats[0][1]
    if k == 3 and shared == "prefix":
        feats[3][1] = feats[2][1]
    if k and shared == "all":
        feats[1] = list(feats[0])
    leaves = [*logits, *{id(f): f for fs in feats for f in fs}.values()]
    for t in leaves:
        t.requires_grad_()
    loss = EKDLoss(**kwargs)
    got = loss.terms(logits, feats, y)
    want_total, want_ce, want_kl, want_mse = _reference_terms(loss, logits, feats, y)
    grads = torch.autograd.grad(got.total, leaves, allow_unused=True)
    want_grads = torch.autograd.grad(want_total, leaves, allow_unused=True)
    close = {"rtol": 1e-6, "atol": 1e-12}
    torch.testing.assert_close(got.total, want_total, **close)
    torch.testing.assert_close(torch.stack(got.ce), torch.stack(want_ce), **close)
    if loss.distills:
        assert len([t for t in got.kl if t is not None]) == len(want_kl)
        for values, want in ((got.kl_per_depth, want_kl), (got.mse_per_depth, want_mse)):
            want = torch.stack(want) if want else values.new_zeros(0)  # K = 0, no ensemble
            torch.testing.assert_close(values, want, **close)
    else:
        assert got.kl == got.mse == [None] * (k + 1)
    for g, w in zip(grads, want_grads, strict=True):
        if w is None or g is None:  # a leaf only one side reaches has a zero gradient there
            assert (g if w is None else w) is None or (g if w is None else w).abs().max() < 1e-12
            continue
        torch.testing.assert_close(g, w, **close)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("ensemble", [True, False])
def test_gradient_of_the_total_and_the_terms_together(temperature, ensemble):
    """float64: a backward through the total and some terms at once (the Function gets a
    gradient of both of its outputs) equals the per-depth reference's, every leaf to 1e-6."""
    logits, feats, y = _float64_outputs(seed=11, k=2)
    leaves = [*logits, *(f for fs in feats for f in fs)]
    for t in leaves:
        t.requires_grad_()
    loss = EKDLoss(w=0.7, a=30.0, temperature=temperature, ensemble=ensemble)
    got = loss.terms(logits, feats, y)
    total, ce, kl, mse = _reference_terms(loss, logits, feats, y)
    mixed = [
        got.total + 2 * got.mse[2] - got.kl[1] + 0.5 * got.ce[0],
        total + 2 * mse[-1] - kl[-2] + 0.5 * ce[0],
    ]
    torch.testing.assert_close(mixed[0], mixed[1], rtol=1e-6, atol=1e-12)
    grads = [torch.autograd.grad(m, leaves, allow_unused=True) for m in mixed]
    for g, w in zip(*grads, strict=True):
        if w is None:  # without the ensemble terms nothing moves the full-net's maps
            assert not ensemble and (g is None or g.abs().max() < 1e-12)
            continue
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("precision", ["high", "medium"])
def test_loss_is_exact_whatever_the_float32_matmul_precision(precision):
    """float32 with ``torch.set_float32_matmul_precision`` below ``highest`` (the GPU
    configs' ``high`` is TF32 on a GPU; ``medium`` is bf16, on this CPU too): the terms and
    gradients equal those at ``highest`` to float32 rounding. A float32 matrix product
    inside the loss would round its operands (a 10-bit or 8-bit mantissa)."""
    logits, feats, y = _float64_outputs(seed=3, shapes=((8, 16, 16), (16, 8, 8)), batch=16)
    logits, feats = [t.float() for t in logits], [[f.float() for f in fs] for fs in feats]
    leaves = [*logits, *(f.requires_grad_() for fs in feats for f in fs)]
    for t in logits:
        t.requires_grad_()
    loss = EKDLoss(w=0.7, a=30.0)
    want = loss.terms(logits, feats, y)
    want_grads = torch.autograd.grad(want.total, leaves)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        got = loss.terms(logits, feats, y)
        grads = torch.autograd.grad(got.total, leaves)
    finally:
        torch.set_float32_matmul_precision(before)
    torch.testing.assert_close(got.raw, want.raw, rtol=1e-5, atol=1e-7)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_loss_first_called_under_inference_mode_still_trains():
    """The loss's cached constants made under ``torch.inference_mode`` (an evaluation) serve
    a later training step: its backward runs."""
    from ekd_ddnn.losses import _constant, _constants

    _constant.cache_clear()  # made afresh below, under inference mode
    _constants.cache_clear()
    logits, feats, y = _float64_outputs(seed=7, k=2)
    loss = EKDLoss(attention_stages="differing")
    with torch.inference_mode():
        loss.terms(logits, feats, y)
    leaves = [*logits, *(f for fs in feats for f in fs)]
    for t in leaves:
        t.requires_grad_()
    loss.terms(logits, feats, y).total.backward()
    assert all(t.grad is not None for t in leaves)


def test_evaluations_sharing_the_cpu_maps_buffer_stay_apart():
    """On a CPU the joined maps live in one buffer per plan and thread, reused by every call:
    two forwards before their backwards, and two threads at once, each get the per-depth
    reference's total and gradients, and the buffer is the same tensor from call to call."""
    from concurrent.futures import ThreadPoolExecutor

    from ekd_ddnn.losses import _constants, _plan

    loss = EKDLoss(w=0.7, a=30.0)

    def evaluations(seeds):
        runs = []
        for seed in seeds:
            logits, feats, y = _float64_outputs(seed=seed, k=2)
            leaves = [*logits, *(f for fs in feats for f in fs)]
            for t in leaves:
                t.requires_grad_()
            runs.append((loss.terms(logits, feats, y).total, leaves, (logits, feats, y)))
        for total, leaves, outputs in runs:  # every forward first, then the backwards
            want = _reference_terms(loss, *outputs)[0]
            torch.testing.assert_close(total, want, rtol=1e-6, atol=1e-12)
            for g, w in zip(
                torch.autograd.grad(total, leaves), torch.autograd.grad(want, leaves), strict=True
            ):
                torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-12)

    logits, feats, y = _float64_outputs(seed=1, k=2)
    plan = _plan(sharing_pattern(feats), tuple(f.shape[2:] for f in feats[0]), True, "all")
    cpu, double = torch.device("cpu"), torch.float64
    constants = _constants(plan, loss.w, loss.a, loss.temperature, len(y), cpu, double, double)
    constants.buffers.clear()
    evaluations([1, 2, 3])
    (buffer,) = constants.buffers.values()
    evaluations([4])
    assert constants.buffers == {threading.get_ident(): buffer}
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(evaluations, [[5, 6] * 5, [7, 8] * 5]))
    assert len(constants.buffers) == 3  # this thread's and each worker's


@pytest.mark.parametrize("mode", ["ekd", "ddnn"])
def test_total_is_not_rounded_to_bf16_under_autocast(mode):
    """Under bf16 autocast (bf16 logits and feature maps, as a bf16-mixed step gives them)
    the total and every term are float32 and equal the float32 computation on the same
    values: no term or weighting goes through a bf16 matrix product."""
    gen = torch.Generator().manual_seed(3)
    logits = [torch.randn(8, 10, generator=gen).bfloat16() for _ in range(3)]
    feats = [[torch.rand(8, 16, 4, 4, generator=gen).bfloat16()] for _ in range(3)]
    y = torch.randint(10, (8,), generator=gen)
    loss = EKDLoss(mode=mode)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss.terms(logits, feats, y)
    want = loss.terms([t.float() for t in logits], [[f.float() for f in fs] for fs in feats], y)
    assert got.total.dtype == got.ce_per_depth.dtype == torch.float32
    torch.testing.assert_close(got.total, want.total, rtol=1e-6, atol=0)
    torch.testing.assert_close(got.ce_per_depth, want.ce_per_depth, rtol=1e-6, atol=0)


def test_gradients_under_autocast_are_bf16_and_equal_the_float32_ones():
    """A bf16-mixed step: the gradients of the bf16 logits and feature maps are bf16 and
    equal the float32 computation's to bf16 precision."""
    gen = torch.Generator().manual_seed(4)
    logits = [torch.randn(8, 10, generator=gen).bfloat16() for _ in range(3)]
    feats = [[torch.rand(8, 16, 4, 4, generator=gen).bfloat16()] for _ in range(3)]
    y = torch.randint(10, (8,), generator=gen)
    leaves = [*logits, *(f for fs in feats for f in fs)]
    wide = [t.float().requires_grad_() for t in leaves]
    for t in leaves:
        t.requires_grad_()
    loss = EKDLoss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.autograd.grad(loss.terms(logits, feats, y).total, leaves)
    fs = [[f] for f in wide[3:]]
    want = torch.autograd.grad(loss.terms(wide[:3], fs, y).total, wide)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w, rtol=1e-2, atol=1e-2 * w.abs().max().item())


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_clamped_maps_and_channels_last_equal_the_reference(memory_format):
    """float64: samples whose map's norm is below F.normalize's floor (clamped: the map is
    the sums over the floor), one tiny and one all zero, and channels_last feature maps:
    terms and gradients equal the per-depth autograd reference."""
    logits, feats, y = _float64_outputs(seed=5, shapes=((3, 4, 4), (4, 2, 2)), k=2)
    feats[1][0][0] *= 1e-15  # sub-net 1, stage 1, sample 0: a norm of ~1e-14
    feats[0][1][2] = 0.0  # the full-net, stage 2, sample 2
    feats = [[f.contiguous(memory_format=memory_format) for f in fs] for fs in feats]
    leaves = [*logits, *(f for fs in feats for f in fs)]
    for t in leaves:
        t.requires_grad_()
    loss = EKDLoss()
    got = loss.terms(logits, feats, y)
    want_total, _, _, want_mse = _reference_terms(loss, logits, feats, y)
    close = {"rtol": 1e-6, "atol": 1e-12}
    torch.testing.assert_close(got.total, want_total, **close)
    torch.testing.assert_close(got.mse_per_depth, torch.stack(want_mse), **close)
    grads = torch.autograd.grad(got.total, leaves)
    for g, w in zip(grads, torch.autograd.grad(want_total, leaves), strict=True):
        torch.testing.assert_close(g, w, **close)
    assert grads[3 + 2].abs().max() > 1e9  # the clamped map's gradient: 1 / eps scale


@pytest.mark.parametrize("attention_stages", ["all", "differing"])
def test_compiled_loss_equals_eager_and_compiles_once_per_sharing_pattern(attention_stages):
    """``EKDLoss.compile`` (what ``model.compile=true`` trains with), through a counting
    backend over 30 steps of lattice sampling on ResNet-20: the total and every term and
    gradient equal the eager loss's; Dynamo makes one graph per pattern of stage outputs the
    depths share, the first time it comes, and none when a pattern comes again."""
    from torch._dynamo.testing import CompileCounter

    from ekd_ddnn.sampling import sample_depths

    torch._dynamo.reset()
    torch.manual_seed(0)
    net = build_net("cifar_resnet20", image_size=8).double().train()
    lattice = net.lattice()
    eager = EKDLoss(sampling="lattice", attention_stages=attention_stages)
    compiled = EKDLoss(sampling="lattice", attention_stages=attention_stages)
    counter = CompileCounter()
    compiled.compile(backend=counter)
    patterns, graphs = set(), []
    for step in range(30):
        x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
        y = torch.randint(0, 10, (4,))
        outputs = net.forward_depths(x, sample_depths(lattice, 2, seed=0, step=step))
        logits, features = [o[0] for o in outputs], [o[1] for o in outputs]
        leaves = [*logits, *{id(f): f for fs in features for f in fs}.values()]
        got, want = compiled.terms(logits, features, y), eager.terms(logits, features, y)
        for a, b in ((got.total, want.total), (got.raw, want.raw)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
        for a, b in zip(
            torch.autograd.grad(got.total, leaves, retain_graph=True),
            torch.autograd.grad(want.total, leaves),
            strict=True,
        ):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
        patterns.add(sharing_pattern(features))
        graphs.append(counter.frame_count)
    assert graphs[-1] == len(patterns) > 3, (graphs, len(patterns))
    assert graphs[-1] < 30  # patterns come again: those steps made no graph
    torch._dynamo.reset()


def test_inductor_compiled_loss_equals_eager():
    """The compiled loss with inductor's real (CPU) kernels: total, terms and gradients equal
    the eager loss's in float32, and a second batch reuses the graph."""
    torch._dynamo.reset()
    logits, feats, y = _outputs(k=2)
    leaves = [*logits, *(f for fs in feats for f in fs)]
    eager, compiled = EKDLoss(), EKDLoss()
    compiled.compile()
    stats, graphs = torch._dynamo.utils.counters["stats"], []
    for step in range(2):
        graphs.append(stats["unique_graphs"])
        got, want = compiled.terms(logits, feats, y), eager.terms(logits, feats, y)
        torch.testing.assert_close(got.raw, want.raw, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.total, want.total, rtol=1e-5, atol=1e-6)
        grads = torch.autograd.grad(got.total, leaves)
        for a, b in zip(grads, torch.autograd.grad(want.total, leaves), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        logits = [(t.detach() + step + 1).requires_grad_() for t in logits]
        leaves = [*logits, *leaves[len(logits) :]]
    graphs.append(stats["unique_graphs"])
    assert graphs[1] - graphs[0] == 1 and graphs[2] == graphs[1], graphs
    torch._dynamo.reset()


def test_compiled_loss_copies_and_pickles():
    """A copy of a compiled loss compiles its own evaluation (its settings, not the
    original's), and a compiled loss pickles (a spawned process, a saved module)."""
    import copy
    import pickle

    logits, feats, y = _outputs(k=2)
    loss = EKDLoss(w=0.5)
    loss.compile(backend="eager")
    copied = copy.deepcopy(loss)
    copied.w = 2.0
    want = EKDLoss(w=2.0).terms(logits, feats, y).total
    torch.testing.assert_close(copied.terms(logits, feats, y).total, want)
    torch.testing.assert_close(
        pickle.loads(pickle.dumps(loss)).terms(logits, feats, y).total,
        EKDLoss(w=0.5).terms(logits, feats, y).total,
    )
    torch._dynamo.reset()
