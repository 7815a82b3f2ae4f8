"""Evaluation and export of a trained DDNN, and safe checkpoint loading."""

from __future__ import annotations

import json
import pickle
import shutil
import zipfile

import numpy as np
import pytest
import torch
import torchvision
from hydra.utils import instantiate

from ekd_ddnn import front
from ekd_ddnn.calibration import recalibrate_bn
from ekd_ddnn.errors import UserError
from ekd_ddnn.evaluate import evaluate
from ekd_ddnn.export import export_depth
from ekd_ddnn.models import build_net, count_params
from ekd_ddnn.run.checkpoint import data_config, load_checkpoint, net_from_checkpoint
from tests.conftest import compose_config, run_cli

pytestmark = pytest.mark.slow  # every test here needs the trained digits run


@pytest.fixture(scope="module")
def best(digits_run):
    return digits_run / "checkpoints" / "best.ckpt"


def test_evaluate_reproduces_training_metrics(digits_run, best, tmp_path):
    """Evaluating the best checkpoint gives exactly the errors training reported, per depth."""
    cfg = compose_config(
        "evaluate",
        [f"ckpt_path={best}", "speed.warmup=1", "speed.repeats=2", "speed.batch_size=8"],
        tmp_path,
    )
    rows, _ = evaluate(cfg)
    trained = json.loads((digits_run / "results.json").read_text())
    assert [r["name"] for r in rows] == [r["name"] for r in trained]
    for ours, theirs in zip(rows, trained, strict=True):
        for key in ("blocks", "params", "macs", "top1_err", "top5_err", "split"):
            assert ours[key] == theirs[key], key
        assert ours["latency_ms"] > 0 and ours["throughput"] > 0
    assert json.loads((tmp_path / "results.json").read_text()) == rows
    for name in ("results.md", "results.csv", "front.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "front.png").read_bytes()[:4] == b"\x89PNG"
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 1 + len(rows)


def _ddnn_logits(net, depth, x):
    with torch.no_grad():
        return net(x, depth)[0]


@pytest.mark.parametrize("fmt", ["state_dict", "torchscript", "onnx"])
def test_export_formats_equal_ddnn(best, tmp_path, fmt):
    """Each format's network gives the DDNN's logits at that depth (dynamic batch size)."""
    net = net_from_checkpoint(load_checkpoint(best), best)
    out = tmp_path / f"resnet14.{fmt}"
    info = export_depth(net, "resnet14", out, fmt=fmt)
    assert info["blocks"] == [2, 2, 2] and info["params"] == count_params(net.extract([2, 2, 2]))
    x = torch.randn(5, 1, 16, 16)
    expected = _ddnn_logits(net, [2, 2, 2], x)
    if fmt == "state_dict":
        plain = build_net(
            **{**net.config, "blocks": [2, 2, 2], "subnets": [], "bn_stats": "shared"}
        )
        plain.load_state_dict(torch.load(out, weights_only=True))
        assert count_params(plain) == info["params"]
        got = _ddnn_logits(plain.eval(), None, x)
    elif fmt == "torchscript":
        got = torch.jit.load(str(out))(x)
    else:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_imagenet_export_loads_into_torchvision(tmp_path):
    """A ResNet-18 exported from a ResNet-34 DDNN is a torchvision resnet18 state dict."""
    torch.manual_seed(0)
    net = build_net("resnet34", subnets=[[2, 2, 2, 2]], num_classes=10).eval()
    out = tmp_path / "r18.pt"
    info = export_depth(net, [2, 2, 2, 2], out)
    ref = torchvision.models.resnet18(num_classes=10)
    ref.load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert info["name"] == "resnet18" and info["params"] == count_params(ref)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ref.eval()(x), net(x, [2, 2, 2, 2])[0], rtol=0, atol=0)


def test_export_refuses_to_overwrite(best, tmp_path):
    """An existing file is left untouched unless overwrite=true."""
    net = net_from_checkpoint(load_checkpoint(best), best)
    out = tmp_path / "model.pt"
    out.write_bytes(b"the user's file")
    with pytest.raises(UserError, match="already exists; pass overwrite=true"):
        export_depth(net, "resnet8", out)
    assert out.read_bytes() == b"the user's file"
    export_depth(net, "resnet8", out, overwrite=True)
    assert set(torch.load(out, weights_only=True)) == set(net.extract([1, 1, 1]).state_dict())
    with pytest.raises(UserError, match="no depth named 'resnet18'; its depths are resnet20"):
        export_depth(net, "resnet18", tmp_path / "x.pt")


class _RunsCode:
    """Unpickling this calls shutil.copy: a stand-in for code a malicious file would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (shutil.copy, (__file__, str(self.marker)))


def test_crafted_checkpoint_does_not_run_code(best, tmp_path):
    """A checkpoint whose unpickling would run code is refused; the code never runs."""
    marker = tmp_path / "code_ran"
    ckpt = torch.load(best, weights_only=True)
    ckpt["hyper_parameters"]["payload"] = _RunsCode(marker)
    crafted = tmp_path / "crafted.ckpt"
    torch.save(ckpt, crafted)
    with pytest.raises(UserError, match=r"was refused: it holds a Python object \(shutil.copy\)"):
        load_checkpoint(crafted)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # the same file through the unsafe path would
        torch.load(crafted, weights_only=True)


def test_bad_checkpoints_give_clear_errors(best, tmp_path):
    """Truncated, garbage, foreign and mismatched checkpoints: one clear message each."""
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    with pytest.raises(UserError, match=r"truncated\.ckpt is truncated or corrupt"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(UserError, match="is truncated or corrupt"):
        load_checkpoint(garbage)
    foreign = tmp_path / "foreign.pth"
    torch.save(torchvision.models.resnet18().state_dict(), foreign)
    with pytest.raises(UserError, match="is not an ekd-ddnn training checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")
    other = torch.load(best, weights_only=True)
    other["hyper_parameters"]["net_config"]["arch"] = "cifar_resnet56"
    other["hyper_parameters"]["net_config"]["blocks"] = [9, 9, 9]
    mismatched = tmp_path / "other_arch.ckpt"
    torch.save(other, mismatched)
    with pytest.raises(UserError, match="its weights do not fit its cifar_resnet56"):
        net_from_checkpoint(load_checkpoint(mismatched), mismatched)
    later = tmp_path / "later.ckpt"

    def refusal(edit) -> str:
        """load_checkpoint's one line for the real checkpoint with ``edit`` applied."""
        ckpt = torch.load(best, weights_only=True)
        edit(ckpt)
        torch.save(ckpt, later)
        with pytest.raises(UserError) as info:
            load_checkpoint(later)
        return str(info.value)

    # a later release's network settings
    assert refusal(lambda c: c["hyper_parameters"]["net_config"].update(width=2, zoom=1)) == (
        f"checkpoint {later}: its network has settings this ekd-ddnn does not know "
        "(width, zoom); use the ekd-ddnn release that wrote it"
    )
    assert refusal(lambda c: c["hyper_parameters"]["net_config"].pop("arch")) == (
        f"checkpoint {later}: its network description lacks arch; use a checkpoints/*.ckpt "
        "file written by `python -m ekd_ddnn.train`"
    )
    # a setting of the wrong type, checked against build_net's hints as a config's are
    for key, value, wanted in [
        ("num_classes", "ten", "an integer"),
        ("arch", 5, "a string"),
        ("subnets", "abc", "a list"),
        ("channels_last", "yes", "true or false"),
    ]:
        message = refusal(
            lambda c, k=key, v=value: c["hyper_parameters"]["net_config"].update({k: v})
        )
        assert message == (
            f"checkpoint {later}: its network setting {key} must be {wanted}, got {value!r}"
        )
    message = refusal(lambda c: c["hyper_parameters"]["net_config"].update(blocks=[3, "a", 3]))
    assert message == (
        f"checkpoint {later}: its network setting blocks[1] must be an integer, got 'a'"
    )
    for key, what in [
        ("net_config", "network description"),
        ("loss", "loss description"),
        ("config", "run config"),
    ]:
        message = refusal(lambda c, key=key: c["hyper_parameters"].update({key: ["x"]}))
        assert message == f"checkpoint {later}: its {what} is not a mapping"
    message = refusal(lambda c: c.update(state_dict=None))
    assert message == f"checkpoint {later}: its state dict (the weights) is not a mapping"
    assert zipfile.is_zipfile(best)  # the real checkpoint is untouched


def test_cli_export_and_evaluate_errors(best, tmp_path):
    """The README's export command, and an evaluate error, through the real command line."""
    out = tmp_path / "resnet8.pt"
    result = run_cli("export", f"ckpt_path={best}", "depth=[1,1,1]", f"out={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("exported resnet8 [1, 1, 1] (0.08M params) as state_dict")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet8.pt"]  # nothing else written
    result = run_cli(
        "evaluate", f"ckpt_path={tmp_path / 'nope.ckpt'}", f"hydra.run.dir={tmp_path}/ev"
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: checkpoint {tmp_path / 'nope.ckpt'} does not exist" in result.stderr


def test_recalibrate_bn_in_evaluate_and_export(best, tmp_path, monkeypatch):
    """``recalibrate_bn=N`` evaluates the net whose every depth was recalibrated on N training
    images (the same as calling :func:`recalibrate_bn` by hand), and export writes exactly
    that depth's recalibrated statistics; bad values give one line."""
    ckpt = load_checkpoint(best)
    by_hand = net_from_checkpoint(ckpt, best)
    recalibrate_bn(by_hand, instantiate(data_config(ckpt)), 96, seed=42)
    original = net_from_checkpoint(ckpt, best)
    bn = "stages.2.0.bn1.running_mean"
    assert not torch.allclose(by_hand.state_dict()[bn], original.state_dict()[bn])

    cfg = compose_config(
        "evaluate", [f"ckpt_path={best}", "recalibrate_bn=96", "speed.enabled=false"], tmp_path
    )
    evaluated_nets = []  # what each pass evaluates, as the module it builds receives it

    class Recording(front.EKDModule):
        def __init__(self, net, *args, **kwargs) -> None:
            evaluated_nets.append(net)
            super().__init__(net, *args, **kwargs)

    monkeypatch.setattr(front, "EKDModule", Recording)
    rows, _ = evaluate(cfg)
    (evaluated_net,) = evaluated_nets  # one pass: every depth of the net
    evaluated = evaluated_net.state_dict()
    assert sorted(evaluated) == sorted(by_hand.state_dict())
    assert all(torch.equal(evaluated[k], v) for k, v in by_hand.state_dict().items())
    assert "BatchNorm re-estimated from 96 images" in (tmp_path / "results.md").read_text()
    assert [r["name"] for r in rows] == by_hand.names

    out = tmp_path / "resnet14.pt"
    args = [f"ckpt_path={best}", "depth=resnet14", f"out={out}", "recalibrate_bn=96"]
    result = run_cli("export", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    exported = torch.load(out, weights_only=True)
    expected = by_hand.extract([2, 2, 2]).state_dict()
    assert sorted(exported) == sorted(expected)
    assert all(torch.equal(exported[k], v) for k, v in expected.items())

    result = run_cli("export", *args[:2], f"out={tmp_path / 'x.pt'}", "recalibrate_bn=100000")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "recalibrate_bn=100000 but the training split yields only" in result.stderr
    assert not (tmp_path / "x.pt").exists()
