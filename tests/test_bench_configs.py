"""The benches' step functions on a tiny config: prefix-shared EKD training equals unshared.

``bench/step_cost.py`` times the shared step (``forward_depths``) against the unshared one
(``net(x, depth)`` per depth); the comparison only means something if both compute the same
loss and gradients from the same weights, which is what these tests pin down.
"""

from __future__ import annotations

import collections
import copy
import functools
import importlib
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ekd_ddnn.losses import EKDLoss
from ekd_ddnn.models import build_net

BENCH = Path(__file__).resolve().parents[1] / "bench"
# float32; the shared step sums a shared block's upstream gradients before its backward, the
# unshared one accumulates per-depth parameter gradients: equal up to summation order (seen:
# equal losses, gradients within 1e-6 of each other, largest 0.84)
LOSS_TOL = {"rtol": 1e-6, "atol": 1e-6}
GRAD_TOL = {"rtol": 1e-4, "atol": 1e-5}


def _bench(name: str):
    """``bench/<name>.py``, imported with ``bench/`` on the path while it loads (the benches
    import each other by name)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def step_cost():
    return _bench("step_cost")


def test_shared_ekd_step_equals_unshared(step_cost) -> None:
    torch.manual_seed(0)
    net = build_net("cifar_resnet20", subnets=[[2, 2, 2], [1, 1, 1]], image_size=16)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(10, (4,))
    shared, unshared = copy.deepcopy(net).train(), copy.deepcopy(net).train()
    losses = {}
    for name, model, is_shared in (("shared", shared, True), ("unshared", unshared, False)):
        optimizer = step_cost.make_sgd(model.parameters())
        losses[name] = step_cost.ekd_step(model, EKDLoss(), optimizer, shared=is_shared)(x, y)

    torch.testing.assert_close(losses["shared"], losses["unshared"], **LOSS_TOL)
    named = dict(unshared.named_parameters())
    for key, param in shared.named_parameters():
        assert param.grad is not None, key
        torch.testing.assert_close(param.grad, named[key].grad, **GRAD_TOL, msg=key)
        torch.testing.assert_close(param, named[key], **GRAD_TOL, msg=key)  # after the step
    # the one stated difference: a shared block's BatchNorm statistics update once per step,
    # the unshared step updates them once per depth
    assert shared.stem[1].num_batches_tracked.item() == 1
    assert unshared.stem[1].num_batches_tracked.item() == len(net.depths)


def test_experiment_settings_reach_the_bench(step_cost) -> None:
    args = step_cost.parse_args(["--experiment", "imagenet_r50"])
    assert args.settings["arch"] == "resnet50"
    assert args.settings["subnets"] == [[3, 4, 4, 3], [3, 3, 3, 3]]
    assert (args.settings["image_size"], args.settings["num_classes"]) == (224, 1000)
    # an explicit flag wins over the experiment
    args = step_cost.parse_args(["--experiment", "digits", "--image-size", "8"])
    assert (args.settings["in_channels"], args.settings["image_size"]) == (1, 8)
    assert args.settings["bn_stats"] == "private"


def test_step_cost_runs_end_to_end(step_cost, capsys) -> None:
    argv = ["--arch", "cifar_resnet20", "--subnets", "[[1,1,1]]", "--batch-size", "4"]
    argv += ["--image-size", "8", "--repeats", "1", "--warmup", "0", "--threads", "0"]
    threads = torch.get_num_threads()
    result = step_cost.main(argv)
    assert torch.get_num_threads() == threads
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == result
    keys = ("ekd_over_individual", "ideal_flops_ratio", "shared_over_unshared", "distill_overhead")
    assert all(key in result for key in keys)
    # the floor is a part of the loss's work: it costs less than the whole loss
    assert result["distill_overhead_loss_floor"] < result["distill_overhead_loss_only"]
    # the prefix tree runs [3,3,3] + [1,1,1] as 9 + 2 blocks instead of 9 + 3
    assert 0.5 < result["ideal_flops_ratio"] < 1.0


def test_step_profile_profiles_the_eager_and_the_compiled_step(capsys) -> None:
    """bench/step_profile.py on a tiny size, inductor on the CPU: both steps profiled, the
    compiled one through graphs it made (Dynamo's count); no device figures on a CPU."""
    bench = _bench("step_profile")
    torch._dynamo.reset()  # no graph left from another test's regions
    graphs = torch._dynamo.utils.counters["stats"]
    before = graphs["unique_graphs"]
    argv = ["--arch", "cifar_resnet20", "--subnets", "[[1,1,1]]", "--batch-size", "4"]
    result = bench.main([*argv, "--image-size", "8", "--repeats", "2", "--warmup", "1"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert set(result) == {"ekd", "ekd_compiled", "config"}
    # the stem, the head, 5 block configurations (test_models) and the loss
    assert graphs["unique_graphs"] - before == 8
    for mode in ("ekd", "ekd_compiled"):
        figures = result[mode]
        assert 0 < figures["host_ms"] <= figures["wall_ms"]
        assert figures["device_busy_ms"] is figures["kernels_per_step"] is None
    torch._dynamo.reset()


def test_saved_activation_memory_by_hand(step_cost):
    """``saved_mib`` counts what autograd keeps for backward, weights excluded: a linear layer
    keeps its input (4 x 1000 floats), the ReLU its output (4 x 10 floats)."""
    layer = torch.nn.Linear(1000, 10)
    x = torch.randn(4, 1000)
    mib = step_cost.saved_mib(lambda: torch.relu(layer(x)), list(layer.parameters()))
    assert mib * 2**20 == 4 * 1000 * 4 + 4 * 10 * 4
    # the blocks the two depths share are counted once
    net = build_net("cifar_resnet20", subnets=[[2, 2, 2]], image_size=8)
    memory = step_cost.activation_memory(net, torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
    assert memory["resnet14"] < memory["resnet20"] < memory["ekd"]
    assert memory["ekd"] < memory["resnet20"] + memory["resnet14"]


def test_data_on_device_bench_runs_and_reports_its_ratios() -> None:
    """bench/data_on_device.py on a tiny size: both ratios and its settings in the result."""
    bench = _bench("data_on_device")
    args = ["--num-images", "100", "--batch-size", "8", "--steps", "1", "--repeats", "2"]
    result = bench.main([*args, "--warmup", "0", "--workers", "0"])
    assert set(result) == {"preloaded_over_on_device", "preloaded_over_dataloader", "config"}
    assert all(0 < result[k] < 100 for k in result if k != "config")
    assert (result["config"]["batch_size"], result["config"]["num_images"]) == (8, 100)


@pytest.mark.parametrize("bf16", [False, True])
def test_overhead_bench_trains_what_lightning_trains(bf16) -> None:
    """bench/overhead.py part (a): the raw loop it times Lightning against reaches exactly
    Lightning's weights, also under bf16-mixed (the same autocast, without a cast cache)."""
    bench = _bench("overhead")
    result = bench.bench_lightning(5, 1, 4, 8, subnets=[[1, 1, 1]], bf16=bf16)
    assert result["max_weight_diff"] == 0.0
    assert result["pairs"] == 3  # 5 Lightning steps: 4 paired with a raw step, 1 warm-up


def test_syncs_bench_counts_reads_on_logging_steps_only() -> None:
    """bench/syncs.py on the CPU (tensor reads instead of CUDA syncs), a real Trainer logging
    every 3 steps: the divergence check and the bar's loss read on each logging step, no
    other step reads. (Exact counts: a Lightning release that reads on its own would show
    here first.)"""
    bench = _bench("syncs")
    args = ["--device", "cpu", "--steps", "8", "--log-every", "3", "--batch-size", "4"]
    result = bench.main([*args, "--image-size", "8", "--subnets", "[[1,1,1]]"])["syncs"]
    assert result["per_step"] == {"1": 0, "2": 2, "3": 0, "4": 0, "5": 2, "6": 0, "7": 0}
    assert (result["logging_steps"], result["other_steps"]) == (4, 0)


@pytest.fixture(scope="module")
def loss_ab():
    head = subprocess.run(["git", "-C", str(BENCH), "rev-parse", "HEAD"], capture_output=True)
    if head.returncode != 0:
        pytest.skip("bench/loss_ab.py reads the loss at a git revision: not a git checkout")
    return _bench("loss_ab")


@pytest.mark.parametrize("subnets", ["[[2,2,2],[1,1,1]]", "[[3,2,2]]"])
def test_loss_ab_bench_times_the_loss_against_a_revision(loss_ab, subnets) -> None:
    """bench/loss_ab.py against HEAD (the same loss) on a tiny size, also with a stage every
    depth shares (its output gets no gradient): a ratio and the three losses' medians per
    round; a revision without the loss file is refused in one line."""
    tiny = ["--batch-size", "2", "--image-size", "4", "--rounds", "2", "--calls", "2"]
    tiny += ["--subnets", subnets]
    result = loss_ab.main(["--against", "HEAD", *tiny, "--warmup", "0"])
    assert len(result["distill_new_over_old"]) == len(result["ms"]) == 2
    assert set(result["ms"][0]) == {"now", "at_revision", "ce_only", "ratio"}
    assert result["stage_outputs"] == {"dtype": "float32", "channels_last": False}
    with pytest.raises(SystemExit, match=r"^error: no src/ekd_ddnn/losses.py at revision 'no-such"):
        loss_ab.main(["--against", "no-such-revision", *tiny])


def test_loss_ab_bench_reads_a_loss_file_and_runs_bf16_channels_last(loss_ab) -> None:
    """Where there is no git history (a device machine), the other loss is a file; the
    outputs and both losses run as a bf16-mixed, channels_last step runs them, and the bf16
    gradients pass the equality check."""
    losses_file = BENCH.parent / "src" / "ekd_ddnn" / "losses.py"
    tiny = ["--batch-size", "2", "--image-size", "4", "--rounds", "1", "--calls", "2"]
    result = loss_ab.main(["--against", str(losses_file), *tiny, "--bf16", "--channels-last"])
    assert len(result["distill_new_over_old"]) == 1
    assert result["stage_outputs"] == {"dtype": "bfloat16", "channels_last": True}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("# notes\n1st line\n", r"is not a losses.py that imports: SyntaxError: invalid decimal"),
        ("import no_such_module_here\n", r"is not a losses.py that imports: ModuleNotFoundError"),
        ("x = 1 / 0\n", r"is not a losses.py that imports: ZeroDivisionError: division by zero$"),
        ("x = 1\n", r"has no EKDLoss with terms\(\): not an ekd_ddnn losses.py$"),
        (
            "class EKDLoss:\n    pass\n",
            r"has no EKDLoss with terms\(\): not an ekd_ddnn losses.py$",
        ),
        (None, r"is a directory; pass a losses.py or a git revision$"),
        (b"\x7fELF\xd0\x00", r"is not a losses.py that imports: SyntaxError: "),
        (b"", r"has no EKDLoss with terms\(\): not an ekd_ddnn losses.py$"),
    ],
)
def test_loss_ab_bench_refuses_a_file_that_is_no_loss(loss_ab, tmp_path, text, message) -> None:
    """A path given as the other loss that is a directory, does not import, or has no
    EKDLoss with ``terms``, is refused in one line before anything is built or timed."""
    path = tmp_path / "other.py"
    if text is None:
        path.mkdir()
    else:
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    with pytest.raises(SystemExit, match=rf"^error: {path} {message}"):
        loss_ab.main(["--against", str(path), "--batch-size", "2", "--image-size", "4"])


def test_loss_ab_bench_refuses_losses_that_differ(loss_ab, monkeypatch) -> None:
    """Two losses whose totals differ are never timed against each other."""
    other = loss_ab.losses_at("HEAD")
    monkeypatch.setattr(other, "EKDLoss", functools.partial(other.EKDLoss, w=2.0))
    monkeypatch.setattr(loss_ab, "losses_at", lambda revision: other)
    with pytest.raises(SystemExit, match=r"^error: the EKD loss at HEAD and now differ \("):
        loss_ab.main(["--against", "HEAD", "--batch-size", "2", "--image-size", "4"])


@pytest.mark.parametrize("n", range(1, 8))
def test_balanced_orders_balance_positions_and_predecessors(step_cost, n) -> None:
    """Over a cycle of orders every item runs in every position equally often and directly
    after every other item equally often."""
    orders = step_cost.balanced_orders(n)
    assert all(sorted(order) == list(range(n)) for order in orders)
    positions = {(order[p], p) for order in orders for p in range(n)}
    assert len(positions) == n * n
    pairs = [(a, b) for order in orders for a, b in itertools.pairwise(order)]
    assert sorted(set(pairs)) == [(a, b) for a in range(n) for b in range(n) if a != b]
    assert len(pairs) == len(set(pairs)) * (1 if n % 2 == 0 else 2) or n == 1


def test_time_interleaved_calls_follow_every_function_equally_often(step_cost) -> None:
    """In ``time_interleaved`` each timed call's predecessor (the call just before it,
    across repeats too) is every other function equally often, or itself: the order effects
    that favoured a loss listed first by 2-4 % (``loss_ab.py`` against itself) cancel."""
    calls: list[str] = []
    fns = {name: functools.partial(calls.append, name) for name in "abc"}
    times, _ = step_cost.time_interleaved(fns, repeats=6, warmup=0, device=torch.device("cpu"))
    assert {len(t) for t in times.values()} == {6}
    # every repeat is an untimed call, then the timed calls in the repeat's order
    timed = [i for i in range(len(calls)) if i % 4]
    before = collections.Counter((calls[i - 1], calls[i]) for i in timed)
    assert set(before.values()) == {2}
    assert len(before) == 9  # 6 ordered pairs and 3 of a function after itself


def test_time_interleaved_numbers_the_timed_calls(step_cost, monkeypatch) -> None:
    """``timed_calls`` names, per function, which of its calls each timing is: a fake clock
    that call n of a function advances by n + 1 makes every time equal its number + 1, with
    the untimed first calls of the repeats (and the warm-up) in between."""
    clock = [0.0]
    monkeypatch.setattr(step_cost.time, "perf_counter", lambda: clock[0])
    made = collections.Counter()

    def call(name: str) -> None:
        clock[0] += made[name] + 1
        made[name] += 1

    fns = {name: functools.partial(call, name) for name in "abc"}
    numbers: dict[str, list[int]] = {}
    times, _ = step_cost.time_interleaved(
        fns, repeats=5, warmup=2, device=torch.device("cpu"), timed_calls=numbers
    )
    for name in fns:
        assert times[name] == [n + 1 for n in numbers[name]]
        assert numbers[name] == sorted(numbers[name]) and len(numbers[name]) == 5
    # 7 repeats, each with one untimed extra call: 21 calls timed or warm-up, 7 extra
    assert sum(made.values()) == 28
    # the last calls are not the timed ones: counting back from the end would be wrong
    assert any(numbers[name] != list(range(made[name] - 5, made[name])) for name in fns)


COUNT = "must be an integer >= {}, got '{}'"
BAD_ARGUMENTS = [
    ("step_cost", ["--batch-size", "0"], "argument --batch-size: " + COUNT.format(1, 0)),
    ("step_cost", ["--threads", "-3"], "argument --threads: " + COUNT.format(0, -3)),
    (
        "step_cost",
        ["--subnets", "[]"],
        "argument --subnets: must be a JSON list of one or more block lists, e.g. "
        "'[[2,2,2],[1,1,1]]', got '[]'",
    ),
    (
        "step_cost",
        ["--experiment", "nope"],
        "cannot compose experiment=nope: In 'train': Could not find 'experiment/nope'",
    ),
    ("loss_ab", ["--against", "HEAD", "--rounds", "0"], "argument --rounds: " + COUNT.format(1, 0)),
    (
        "syncs",
        ["--device", "cpu", "--log-every", "0"],
        "argument --log-every: " + COUNT.format(1, 0),
    ),
    ("data_on_device", ["--workers", "-1"], "argument --workers: " + COUNT.format(0, -1)),
    (
        "overhead",
        ["--parts", "lightning,resnt50"],
        "unknown --parts resnt50; choose from lightning,resnet50,data",
    ),
    (
        "overhead",
        ["--parts", "lightning", "--steps", "5", "--warmup", "4"],
        "--steps 5 leaves no timed step after --warmup 4",
    ),
]


@pytest.mark.parametrize(("name", "argv", "message"), BAD_ARGUMENTS)
def test_bench_arguments_are_refused_in_one_line(name, argv, message, capsys) -> None:
    """Counts below what a bench can time with, a malformed sub-net list, an unknown
    experiment or part: argparse's one line and exit status 2, before anything runs."""
    with pytest.raises(SystemExit) as info:
        _bench(name).parse_args(argv)
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].split(": error: ", 1)[1] == message


@pytest.mark.parametrize(
    "flag", [["--compile-scope", "step"], ["--compile-mode", "reduce-overhead"]]
)
def test_step_cost_refuses_compile_choices_without_compile(step_cost, flag) -> None:
    """What --compile compiles means nothing without --compile: refused before anything
    runs, rather than recorded in the JSON as if it had been measured."""
    from ekd_ddnn.errors import UserError

    with pytest.raises(UserError) as info:
        step_cost.main(flag)
    assert str(info.value) == (
        "--compile-mode and --compile-scope choose what --compile compiles; add --compile"
    )


def test_bench_user_errors_are_one_line(tmp_path) -> None:
    """A mistake the library words for the user (a sub-net deeper than the network) ends a
    bench in that one line and exit status 1, as it ends a command, not in a traceback."""
    argv = ["--arch", "cifar_resnet20", "--subnets", "[[4,4,4]]", "--memory-only"]
    result = subprocess.run(
        [sys.executable, str(BENCH / "step_cost.py"), *argv, "--batch-size", "2"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error")] == [
        "error: depth [4, 4, 4]: stage 1 has 4 blocks; each stage keeps between 1 and the "
        "full-net's count [1..3, 1..3, 1..3]"
    ]


def test_gpu_suite_refuses_bad_calls_and_reports_failed_parts(tmp_path) -> None:
    """``bench/gpu_suite.sh`` without OUT, or with an unknown part, runs nothing (exit 2,
    one line); a part whose bench fails (the layouts part against a revision that does not
    exist) makes the suite's exit status 1, with its status line in OUT/summary.txt."""
    suite = ["bash", str(BENCH / "gpu_suite.sh")]
    env = {"PATH": "/usr/bin:/bin", "SMOKE": "1", "PYTHON": sys.executable}
    usage = subprocess.run(suite, capture_output=True, text=True, env=env)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: bench/gpu_suite.sh OUT")
    out = tmp_path / "out"
    unknown = subprocess.run([*suite, str(out), "env", "bogus"], capture_output=True, text=True)
    assert unknown.returncode == 2 and not out.exists()
    assert unknown.stderr.splitlines() == [
        "error: unknown part 'bogus'; choose from env r56 r50 r56_compile r50_compile "
        "r56_graphs r50_graphs r56_step r50_step profile lightning syncs data train_r50 "
        "train_cifar train_step layouts"
    ]
    env["AGAINST"] = "no-such-revision"
    failed = subprocess.run([*suite, str(out), "layouts"], capture_output=True, text=True, env=env)
    assert failed.returncode == 1
    header, status = (out / "summary.txt").read_text().splitlines()
    assert header.startswith("# ") and header.endswith(" layouts")
    assert status.startswith("layouts: rc 1 in ")
    log = (out / "layouts.log").read_text()
    assert log.count("error: no src/ekd_ddnn/losses.py at revision 'no-such-revision'") == 2
