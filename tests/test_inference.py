import pytest
import torch

import inference
from logger import log_records, read_log
from neumf import NeuMF

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
    logged = log_records(read_log(log_path), "summary")
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
                                     "--warmup_batches", "0", "--precision", "fp32"])
    assert [(r["n_users"], r["n_items"], r["factors"], r["layers"]) for r in results] == \
        [(40, 25, 6, [12, 6])]


def test_checkpoint_contradicting_a_flag_is_refused(tmp_path, capsys):
    path = tmp_path / "model.pth"
    torch.save(NeuMF(40, 25, 6, [12, 6]).state_dict(), path)
    with pytest.raises(SystemExit) as exit_info:
        inference.main(["--device", "cpu", "--load_checkpoint_path", str(path),
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
        inference.main(["--device", "cpu"] + argv)
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in last_line and flag in last_line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        inference.main(["--device", "cuda"])
    assert exit_info.value.code == 2
    assert "--device cuda: no CUDA device" in capsys.readouterr().err
