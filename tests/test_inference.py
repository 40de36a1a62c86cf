import json

import pytest
import torch

import cli
import inference
from logger import log_records, read_log
from neumf import NeuMF, build

TINY = ["--device", "cpu", "--n_users", "30", "--n_items", "20", "-f", "4", "--layers", "8", "4",
        "--num_batches", "5", "--warmup_batches", "1"]


def test_tiny_model_two_batch_sizes(tmp_path):
    log_path = tmp_path / "inference.json"
    results = inference.main(TINY + ["--batch_sizes", "3", "17", "--precision", "fp32",
                                     "--log_path", str(log_path)])
    assert [result["batch_size"] for result in results] == [3, 17]
    for result in results:
        assert result["precision"] == "fp32" and result["dtype"] == "float32"
        assert (result["n_users"], result["n_items"], result["factors"], result["layers"]) == \
            (30, 20, 4, [8, 4])
        assert result["throughput"] > 0
    # a record per size, then the 2023 original's record of them all
    logged = log_records(read_log(log_path), "summary")[:-1]
    assert len(logged) == 2
    assert [record["throughput"] for record in logged] == \
        pytest.approx([result["throughput"] for result in results])


def test_benchmark_times_only_the_timed_passes(monkeypatch):
    torch.manual_seed(0)
    model = NeuMF(30, 20, 4, [8, 4])
    model.train()
    calls = []

    def record_call(module, inputs, output):
        user, item = inputs
        calls.append((len(user), int(user.max()), int(item.max()), module.training,
                      torch.is_inference_mode_enabled()))

    model.register_forward_hook(record_call)
    # Ten timed passes of 1, 2, ..., 10 ms; the two warm-up passes read no clock.
    clock = iter([value for ms in range(1, 11) for value in (100.0, 100.0 + ms / 1000.0)])
    monkeypatch.setattr(inference.time, "perf_counter", lambda: next(clock))
    result = inference.benchmark(model, 4, 10, "fp32", "cpu", warmup_batches=2)
    assert len(calls) == 12
    assert all(size == 4 and user < 30 and item < 20 and not training and inference_mode
               for size, user, item, training, inference_mode in calls)
    assert result["latency_mean_ms"] == pytest.approx(5.5)
    assert result["latency_p90_ms"] == pytest.approx(9.1)
    assert result["latency_p95_ms"] == pytest.approx(9.55)
    assert result["latency_p99_ms"] == pytest.approx(9.91)
    assert result["throughput"] == pytest.approx(40 / 0.055)
    assert result["best_inference_throughput"] == pytest.approx(4 / 0.001)


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("amp", torch.bfloat16)])
def test_precision_on_cpu(precision, dtype):
    model = NeuMF(30, 20, 4, [8, 4])
    dtypes = []
    model.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    result = inference.benchmark(model, 8, 2, precision, "cpu", warmup_batches=0)
    assert dtypes == [dtype, dtype]
    assert result["dtype"] == str(dtype).removeprefix("torch.")


def test_shape_comes_from_checkpoint(tmp_path):
    path = tmp_path / "model.pth"
    torch.manual_seed(3)
    saved = NeuMF(40, 25, 6, [12, 6])
    torch.save(saved.state_dict(), path)
    args = ["--device", "cpu", "--load_checkpoint_path", str(path)]
    model = inference.build_model(inference.parse_args(args), torch.device("cpu"))
    for name, tensor in saved.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor)
    results = inference.main(args + ["--batch_sizes", "5", "--num_batches", "2",
                                     "--warmup_batches", "0", "--precision", "fp32",
                                     "--log_path", str(tmp_path / "log.json")])
    assert [(r["n_users"], r["n_items"], r["factors"], r["layers"]) for r in results] == \
        [(40, 25, 6, [12, 6])]


def test_checkpoint_contradicting_a_flag_is_refused(tmp_path, capsys):
    path = tmp_path / "model.pth"
    torch.save(NeuMF(40, 25, 6, [12, 6]).state_dict(), path)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(inference.main, ["--device", "cpu", "--load_checkpoint_path", str(path),
                                 "--layers", "12", "8"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error == (f"inference.py: error: {path}: checkpoint has --layers 12 6, run asks for "
                     f"12 8; drop --layers")


@pytest.mark.parametrize("argv, flag", [
    (["--batch_sizes", "64", "0"], "--batch_sizes"),
    (["--precision", "fp16"], "--precision"),
    (["--num_batches", "0"], "--num_batches"),
    (["--warmup_batches", "-1"], "--warmup_batches"),
    (["--layers", "7", "4"], "--layers"),
    (["--n_users", "0"], "--n_users"),
    (["--load_checkpoint_path", "no-such-model.pth"], "no-such-model.pth"),
])
def test_bad_flags_exit_2(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.run(inference.main, ["--device", "cpu"] + argv)
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in last_line and flag in last_line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.run(inference.main, ["--device", "cuda"])
    assert exit_info.value.code == 2
    assert "--device cuda: no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("argv, precision, batch_sizes", [
    ([], ["fp32", "amp"], inference.DEFAULT_BATCH_SIZES),
    (["--opt_level", "O0", "--batch_sizes", "1,4,16"], ["fp32"], [1, 4, 16]),
    (["--opt_level", "O2", "--batch_sizes", "8", "1,2", "3"], ["amp"], [8, 1, 2, 3]),
    (["--fp16", "--batch_sizes", "64"], ["amp"], [64]),
    (["--precision", "amp", "fp32"], ["amp", "fp32"], inference.DEFAULT_BATCH_SIZES),
])
def test_the_originals_flag_spellings(argv, precision, batch_sizes):
    args = inference.parse_args(["--device", "cpu"] + argv)
    assert (args.precision, args.batch_sizes, args.log_path) == \
        (precision, batch_sizes, "log.json")


def test_log_json_by_default_with_settings_and_both_throughputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = inference.main(TINY + ["--batch_sizes", "2,5", "--opt_level", "O0"])
    records = read_log(tmp_path / "log.json")
    settings = log_records(records, "parameter")
    assert len(settings) == 1 and settings[0]["batch_sizes"] == [2, 5]
    assert settings[0]["precision"] == ["fp32"]
    logged = log_records(records, "summary")[:-1]
    assert [record["batch_size"] for record in logged] == [2, 5]
    for record, result in zip(logged, results):
        # The best pass is at least as fast as the average one.
        assert record["best_inference_throughput"] >= record["throughput"] > 0
        assert record["best_inference_throughput"] == \
            pytest.approx(result["best_inference_throughput"])


def one_error_line(capsys):
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("argv, named", [
    (["--batch_sizes", "3", "100000"], "--batch_sizes 100000 (with --num_batches"),
    (["--n_users", "100000"], "--n_users 100000 --n_items 20 --factors 4 --layers 8 4: needs"),
])
def test_what_cannot_fit_is_refused_before_anything_runs(argv, named, tmp_path, capsys,
                                                         monkeypatch):
    # 100 KB free: the tiny model and batches of 3 fit, the asked-for sizes do not.
    monkeypatch.setattr(inference, "free_memory", lambda device: 100_000)
    monkeypatch.setattr(inference, "benchmark", pytest.fail)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(inference.main, TINY + argv + ["--log_path", str(tmp_path / "log.json")])
    assert exit_info.value.code == 2
    line = one_error_line(capsys)
    assert line.startswith(f"inference.py: error: {named}") and "GiB free on" in line
    assert not (tmp_path / "log.json").exists()


def test_an_allocation_failure_is_one_line_and_other_errors_are_not_hidden(tmp_path, capsys,
                                                                          monkeypatch):
    def fail(message):
        def benchmark(*args, **kwargs):
            raise RuntimeError(message)
        return benchmark

    argv = TINY + ["--batch_sizes", "7", "--log_path", str(tmp_path / "log.json")]
    monkeypatch.setattr(inference, "benchmark", fail("DefaultCPUAllocator: can't allocate memory"))
    with pytest.raises(SystemExit) as exit_info:
        cli.run(inference.main, argv)
    assert exit_info.value.code == 2
    assert one_error_line(capsys).startswith("inference.py: error: --batch_sizes 7 (with "
                                             "--num_batches + --warmup_batches 6): does not fit")
    monkeypatch.setattr(inference, "benchmark", fail("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):
        inference.main(argv)


@pytest.mark.parametrize("kind, flags, refused", [
    ("gmf", ["--layers", "999998", "2"], "--layers: --model gmf has no MLP layers; drop --layers"),
    ("mlp", ["--factors", "64"], "--factors: --model mlp has no MF embeddings; drop --factors"),
])
def test_a_shape_flag_the_model_has_no_use_for_is_refused_only_when_given(
        kind, flags, refused, tmp_path, capsys):
    shape = ["--device", "cpu", "--model", kind, "--n_users", "30", "--n_items", "20"]
    with pytest.raises(SystemExit) as exit_info:
        cli.run(inference.main, shape + flags)
    assert exit_info.value.code == 2
    assert one_error_line(capsys) == f"inference.py: error: {refused}; see --help"
    results = inference.main(shape + ["--batch_sizes", "2", "--num_batches", "1",
                                      "--precision", "fp32", "--log_path",
                                      str(tmp_path / "log.json")])
    assert [result["model"] for result in results] == [kind]


def test_a_shape_flag_the_checkpoints_model_has_no_use_for_is_refused(tmp_path, capsys):
    path = tmp_path / "gmf.pth"
    torch.save(build("gmf", 40, 25, 6, [12, 6]).state_dict(), path)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(inference.main, ["--device", "cpu", "--load_checkpoint_path", str(path),
                                 "--layers", "12", "6", "--log_path", str(tmp_path / "log.json")])
    assert exit_info.value.code == 2
    assert one_error_line(capsys) == (f"inference.py: error: {path}: checkpoint holds a gmf "
                                      f"model, which has no MLP layers; drop --layers")
    assert not (tmp_path / "log.json").exists()


def inference_table(log_path, batch_sizes):
    """What the 2023 original's qa/inference_table.py makes of a log: the `data` of its last
    line, and a row of its table per batch size."""
    with open(log_path) as opened:
        line = opened.readlines()[-1]
    log = json.loads(line[len("DLLL "):])["data"]
    return log, [[size,
                  "{:3.3f}".format(log[f"batch_{size}_mean_throughput"]),
                  *("{:.6f}".format(log[f"batch_{size}_{kind}_latency"])
                    for kind in ("mean", "p90", "p95", "p99"))]
                 for size in batch_sizes]


def test_the_log_ends_with_the_2023_record_its_inference_table_reads(tmp_path):
    log_path = tmp_path / "log.json"
    results = inference.main(TINY + ["--batch_sizes", "1024,4096", "--fp16",
                                     "--log_path", str(log_path)])
    log, table = inference_table(log_path, [1024, 4096])
    for result, row in zip(results, table):
        assert row == [result["batch_size"], f"{result['throughput']:3.3f}",
                       *(f"{result[key] / 1000:.6f}" for key in (
                           "latency_mean_ms", "latency_p90_ms", "latency_p95_ms",
                           "latency_p99_ms"))]
    assert sorted(log) == sorted(f"batch_{size}_{name}" for size in (1024, 4096) for name in (
        "mean_throughput", "mean_latency", "p90_latency", "p95_latency", "p99_latency"))
    # the units, as the 2023 original describes them, before it
    units = {record["metric"]: record["metadata"]["unit"] for record in read_log(log_path)
             if record["type"] == "METADATA"}
    assert units == {key: "samples/s" if key.endswith("throughput") else "s" for key in log}


def test_the_2023_record_of_several_precisions_names_each(tmp_path):
    log_path = tmp_path / "log.json"
    inference.main(TINY + ["--batch_sizes", "8", "--log_path", str(log_path)])
    log = log_records(read_log(log_path), "summary")[-1]
    assert sorted(log) == sorted(f"{precision}_batch_8_{name}" for precision in ("fp32", "amp")
                                 for name in ("mean_throughput", "mean_latency", "p90_latency",
                                              "p95_latency", "p99_latency"))


def test_dropout_is_taken_and_changes_nothing(tmp_path):
    """Both originals take --dropout; the model runs in eval mode, so the scores are the same."""
    outputs = []
    for dropout in ("0", "0.5", "0.9"):
        args = inference.parse_args(TINY + ["--dropout", dropout])
        model = inference.build_model(args, torch.device("cpu"))
        assert model.dropout == float(dropout)
        model.eval()
        with torch.no_grad():
            outputs.append(model(torch.arange(20), torch.arange(20)))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    results = inference.main(TINY + ["--dropout", "0.5", "--batch_sizes", "4",
                                     "--log_path", str(tmp_path / "log.json")])
    assert len(results) == 2
    assert log_records(read_log(tmp_path / "log.json"), "parameter")[0]["dropout"] == 0.5


@pytest.mark.parametrize("value", ["1", "-0.1", "nan"])
def test_a_dropout_outside_0_1_is_refused(value, capsys):
    with pytest.raises(SystemExit) as leaving:
        cli.run(inference.main, TINY + [f"--dropout={value}"])
    assert leaving.value.code == 2
    assert one_error_line(capsys) == (f"inference.py: error: --dropout must be in [0, 1), got "
                                      f"{float(value)}; see --help")


def test_the_default_sizes_hold_both_originals():
    """The 2019 original ran one size, 1 by default; the 2023 one a list."""
    assert set(inference.parse_args([]).batch_sizes) >= {
        1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576}
