"""GMF, MLP and NeuMF started from them (issue 12): the models, the pretrained start, every tool
on every kind, and the refusals."""
import os
import sys

import pytest
import torch

import checkpoint
import cli
import evaluation
import export
import inference
import ncf
import recommend
import scoring
import train
from conftest import TINY_ITEMS as ITEMS, TINY_USERS as USERS, write_clustered_dataset
from neumf import GMF, MLP, NeuMF, build, load_pretrained, parameter_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FACTORS, LAYERS = 4, [8, 4]
SHAPE = ["-f", str(FACTORS), "--layers", *map(str, LAYERS)]


def shape_flags(flags):
    """SHAPE's flags that the --model among `flags` has a use for (the others are refused)."""
    kind = flags[flags.index("--model") + 1] if "--model" in flags else "neumf"
    return {"gmf": SHAPE[:2], "mlp": SHAPE[2:]}.get(kind, SHAPE)


def train_flags(data, directory, *extra):
    return ["--data", data, "--checkpoint_dir", str(directory), "--log_path",
            str(directory / "log.json"), "-b", "256", "-t", "1.1", "--opt_level", "O0",
            *shape_flags(extra), *extra]


@pytest.fixture(scope="module")
def halves(tiny_data, tmp_path_factory):
    """{kind: model.pth} of a GMF, an MLP and a NeuMF trained 2 epochs on tiny_data."""
    paths = {}
    for kind in ("gmf", "mlp", "neumf"):
        directory = tmp_path_factory.mktemp(kind)
        ncf.main(train_flags(tiny_data, directory, "-e", "2", "--model", kind))
        paths[kind] = directory / "model.pth"
    return paths


def pairs(nb_users, nb_items):
    users, items = torch.meshgrid(torch.arange(nb_users), torch.arange(nb_items), indexing="ij")
    return users.reshape(-1), items.reshape(-1)


def randomised(model, seed):
    """`model` with every parameter drawn afresh at a scale that makes each term matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model.eval()


def test_models_share_neumf_parameter_names_and_shapes():
    neumf_shapes = {name: p.shape for name, p in NeuMF(5, 7, 3, [8, 4]).named_parameters()}
    for model in (GMF(5, 7, 3), MLP(5, 7, [8, 4])):
        for name, parameter in model.named_parameters():
            if not name.startswith("final."):
                assert parameter.shape == neumf_shapes[name], name
    assert GMF(5, 7, 3).final.weight.shape == (1, 3)
    assert MLP(5, 7, [8, 4]).final.weight.shape == (1, 4)


@pytest.mark.parametrize("kind", ["neumf", "gmf", "mlp"])
@pytest.mark.parametrize("layers", [[8], [8, 4], [6, 4, 2]])
def test_parameter_count_is_that_of_the_built_model(kind, layers):
    model = build(kind, 5, 7, 3, layers)
    assert parameter_count(5, 7, 3, layers, kind) == sum(p.numel() for p in model.parameters())


def test_neumf_default_is_todays_model_numbers():
    torch.manual_seed(3)
    built = build("neumf", 5, 7, 3, [8, 4], dropout=0.5)
    torch.manual_seed(3)
    direct = NeuMF(5, 7, 3, [8, 4], dropout=0.5)
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(),
                                                 direct.state_dict().values()))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_pretrained_neumf_logit_is_alpha_weighted_sum_of_halves(alpha):
    gmf = randomised(GMF(6, 9, 3), 1)
    mlp = randomised(MLP(6, 9, [8, 4, 2]), 2)
    neumf = NeuMF(6, 9, 3, [8, 4, 2], dropout=0.5)
    load_pretrained(neumf, gmf, mlp, alpha)
    users, items = pairs(6, 9)
    with torch.no_grad():
        expected = alpha * gmf(users, items) + (1 - alpha) * mlp(users, items)
        assert torch.allclose(neumf.eval()(users, items), expected, rtol=1e-5, atol=1e-5)
    # The embeddings and hidden layers are the halves' own, not copies scaled by alpha.
    assert torch.equal(neumf.mf_user_embed.weight, gmf.mf_user_embed.weight)
    assert torch.equal(neumf.mlp[1].weight, mlp.mlp[1].weight)


def test_ncf_starts_neumf_from_the_two_files(tiny_data, halves, tmp_path):
    """Before any step, the NeuMF ncf.py builds from --pretrained_* scores as 0.3 GMF + 0.7 MLP."""
    args = ncf.parse_args(train_flags(tiny_data, tmp_path, "--pretrained_gmf",
                                      str(halves["gmf"]), "--pretrained_mlp",
                                      str(halves["mlp"]), "--alpha", "0.3"))
    ctx = train.Context(torch.device("cpu"), 0, 1, True)
    model, _ = train.build_model(args, USERS, ITEMS, ctx)
    ncf.load_starting_weights(args, ctx, model, USERS, ITEMS)
    gmf, mlp = (checkpoint.load_model(halves[kind]).eval() for kind in ("gmf", "mlp"))
    users, items = pairs(USERS, ITEMS)
    with torch.no_grad():
        expected = 0.3 * gmf(users, items) + 0.7 * mlp(users, items)
        assert torch.allclose(model.eval()(users, items), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind, layers", [("neumf", [8, 4]), ("gmf", [8]), ("mlp", [8]),
                                          ("mlp", [8, 4]), ("mlp", [6, 4, 2])])
def test_factored_scorer_equals_the_model_for_every_kind(kind, layers):
    model = randomised(build(kind, 7, 11, 3, layers), 4)
    scorer = scoring.FactoredScorer(model, chunk_pairs=5)
    users, items = pairs(7, 11)
    with torch.no_grad():
        expected = model(users, items).view(7, 11)
    assert torch.allclose(scorer(torch.arange(7)), expected, rtol=1e-5, atol=1e-5)
    candidates = torch.tensor([[0, 10, 3], [5, 5, 1]])
    assert torch.allclose(scorer.candidates(torch.tensor([2, 6]), candidates),
                          expected[[[2], [6]], candidates], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gmf", "mlp"])
def test_full_ranking_of_a_half_counts_the_items_scored_ahead(kind):
    model = randomised(build(kind, 4, 6, 3, [8, 4]), 5)
    with torch.no_grad():
        scores = model(*pairs(4, 6)).view(4, 6)
    positives = torch.tensor([0, 2, 5, 1])
    ranks = evaluation.full_ranking_ranks(model, torch.arange(4), positives,
                                       torch.tensor([0, 3]), torch.tensor([1, 4]))
    trained = torch.zeros(4, 6, dtype=torch.bool)
    trained[0, 1] = trained[3, 4] = True
    expected = ((scores > scores.gather(1, positives[:, None])) & ~trained).sum(dim=1)
    assert torch.equal(ranks, expected)


def final_weights(directory):
    return torch.load(directory / "model.pth", weights_only=True)


SGD = ["--optimizer", "sgd", "-l", "0.5"]


def pretrained(halves):
    return ["--pretrained_gmf", str(halves["gmf"]), "--pretrained_mlp", str(halves["mlp"])]


# Run name: its flags, given the halves' {kind: model.pth}.
RUNS = {
    "gmf": lambda halves: ["--model", "gmf"],
    "mlp": lambda halves: ["--model", "mlp"],
    "neumf sgd": lambda halves: SGD,
    "pretrained adam": pretrained,
    "pretrained sgd": lambda halves: pretrained(halves) + SGD,
}


@pytest.mark.parametrize("name", list(RUNS))
def test_each_kind_trains_resumes_tests_and_recommends(tiny_data, halves, tmp_path, capsys,
                                                      name):
    flags = RUNS[name](halves)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    summary = ncf.main(train_flags(tiny_data, whole, "-e", "3", *flags))
    ncf.main(train_flags(tiny_data, parts, "-e", "1", *flags))
    ncf.main(train_flags(tiny_data, parts, "-e", "3", "--resume", *flags))
    # A resumed run is the uninterrupted one: same best model, bit for bit.
    for (key, value), other in zip(final_weights(whole).items(), final_weights(parts).values()):
        assert torch.equal(value, other), key
    model_flags = [flag for flag in flags if flag in ("--model", "gmf", "mlp")]
    result = ncf.main(["--data", tiny_data, "--mode", "test", "--load_checkpoint_path",
                       str(whole / "model.pth"), "--log_path", str(tmp_path / "test.json"),
                       *shape_flags(model_flags), *model_flags, "--full_ranking"])
    assert result["hr"] == summary["best_accuracy"]
    assert 0.0 <= result["full_hr"] <= result["hr"]
    table = recommend.main(["--data", tiny_data, "--load_checkpoint_path",
                            str(whole / "model.pth"), "--users", "100", "129", "-k", "3"])
    # The model's own best three untrained items of each user, in the original ids.
    model = checkpoint.load_model(whole / "model.pth").eval()
    train = torch.load(os.path.join(tiny_data, "train_ratings.pt"), weights_only=True)
    for user in (0, 29):
        with torch.no_grad():
            scores = model(torch.full((ITEMS,), user), torch.arange(ITEMS)).view(-1)
        scores[train[train[:, 0] == user, 1]] = -float("inf")
        expected = (scores.topk(3).indices + 500).tolist()
        assert table[table.userId == user + 100].movieId.tolist() == expected


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("kind", ["gmf", "mlp"])
def test_inference_and_export_take_every_kind(tiny_data, halves, tmp_path, capsys, kind):
    results = inference.main(["--load_checkpoint_path", str(halves[kind]), "--device", "cpu",
                              "--precision", "fp32", "--batch_sizes", "4", "--num_batches", "2",
                              "--log_path", str(tmp_path / "inference.json")])
    assert [result["model"] for result in results] == [kind]
    assert f"Model: {kind}, {USERS} users" in capsys.readouterr().out
    output = tmp_path / "model.pt"
    export.main(["--load_checkpoint_path", str(halves[kind]), "--data", tiny_data,
                 "--format", "torchscript", "--output", str(output)])
    users, items = pairs(USERS, ITEMS)
    with torch.no_grad():
        expected = checkpoint.load_model(halves[kind]).eval()(users, items)
    assert torch.allclose(torch.jit.load(str(output))(users, items), expected, atol=1e-6)


def test_inference_refuses_a_model_flag_the_checkpoint_contradicts(halves, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.run(inference.main, ["--load_checkpoint_path", str(halves["gmf"]), "--model", "mlp",
                                 "--log_path", str(tmp_path / "log.json")])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"inference.py: error: {halves['gmf']}: checkpoint has --model gmf, run "
                     f"asks for mlp; drop --model"]


def pretrained(halves):
    return ["--pretrained_gmf", str(halves["gmf"]), "--pretrained_mlp", str(halves["mlp"])]


# (flags after the tiny data's, given {kind: model.pth}; what the one stderr line says after
# "ncf.py: error: ")
REFUSALS = [
    ("alpha above 1", lambda h: pretrained(h) + ["--alpha", "1.5"],
     "--alpha must be in [0, 1], got 1.5"),
    ("alpha below 0", lambda h: pretrained(h) + ["--alpha", "-0.1"],
     "--alpha must be in [0, 1], got -0.1"),
    ("alpha nan", lambda h: pretrained(h) + ["--alpha", "nan"], "--alpha must be a finite number"),
    ("alpha without the halves", lambda h: ["--alpha", "0.5"],
     "--alpha weighs the two halves of --pretrained_gmf and --pretrained_mlp; pass both, or drop "
     "--alpha"),
    ("adam's setting with sgd", lambda h: ["--optimizer", "sgd", "-b1", "0.25"],
     "--beta1 is a setting of Adam; --optimizer sgd has none, drop --beta1"),
    ("adam's eps with sgd", lambda h: ["--optimizer", "sgd", "--eps", "1e-8"],
     "--eps is a setting of Adam"),
    ("pretrained with gmf", lambda h: ["--model", "gmf", "--pretrained_gmf", str(h["gmf"]),
                                       "--pretrained_mlp", str(h["mlp"])],
     "--pretrained_gmf starts a NeuMF, not --model gmf"),
    ("pretrained with mlp", lambda h: ["--model", "mlp", "--pretrained_mlp", str(h["mlp"])],
     "--pretrained_mlp starts a NeuMF, not --model mlp"),
    ("gmf half alone", lambda h: ["--pretrained_gmf", str(h["gmf"])],
     "--pretrained_gmf needs its other half"),
    ("mlp half alone", lambda h: ["--pretrained_mlp", str(h["mlp"])],
     "--pretrained_mlp needs its other half"),
    ("pretrained and a starting checkpoint",
     lambda h: ["--pretrained_gmf", str(h["gmf"]), "--pretrained_mlp", str(h["mlp"]),
                "--load_checkpoint_path", str(h["neumf"])], "are two starting points"),
    ("unknown optimizer", lambda h: ["--optimizer", "rmsprop"], "--optimizer: invalid choice"),
    ("unknown model", lambda h: ["--model", "svd"], "--model: invalid choice"),
    # train_flags gives each kind only the shape flags it has a use for; these add the other
    ("gmf with layers", lambda h: ["--model", "gmf", "--layers", "8", "4"],
     "--layers: --model gmf has no MLP layers; drop --layers; see --help"),
    ("mlp with factors", lambda h: ["--model", "mlp", "-f", "4"],
     "--factors: --model mlp has no MF embeddings; drop --factors; see --help"),
    ("swapped files", lambda h: ["--pretrained_gmf", str(h["mlp"]), "--pretrained_mlp",
                                 str(h["gmf"])],
     "{mlp}: checkpoint holds an MLP model, --pretrained_gmf needs a GMF one"),
    ("gmf as both", lambda h: ["--pretrained_gmf", str(h["gmf"]), "--pretrained_mlp",
                               str(h["gmf"])],
     "{gmf}: checkpoint holds a GMF model, --pretrained_mlp needs an MLP one"),
    ("neumf as a half", lambda h: ["--pretrained_gmf", str(h["neumf"]), "--pretrained_mlp",
                                   str(h["mlp"])],
     "{neumf}: checkpoint holds a NeuMF model, --pretrained_gmf needs a GMF one"),
    ("missing half", lambda h: ["--pretrained_gmf", str(h["gmf"]), "--pretrained_mlp",
                                str(h["gmf"].parent / "nothing.pth")],
     "nothing.pth: no such checkpoint file"),
    ("gmf of other factors", lambda h: ["--pretrained_gmf", str(h["gmf"]), "--pretrained_mlp",
                                        str(h["mlp"]), "-f", "6"],
     "{gmf}: checkpoint has --factors 4, run asks for 6"),
    ("mlp of other layers", lambda h: ["--pretrained_gmf", str(h["gmf"]), "--pretrained_mlp",
                                       str(h["mlp"]), "--layers", "8", "2"],
     "{mlp}: checkpoint has --layers 8 4, run asks for 8 2"),
    ("gmf file for --model mlp", lambda h: ["--model", "mlp", "--mode", "test",
                                            "--load_checkpoint_path", str(h["gmf"])],
     "{gmf}: checkpoint holds a GMF model, --model mlp needs an MLP one"),
    ("neumf file for --model gmf", lambda h: ["--model", "gmf", "--load_checkpoint_path",
                                              str(h["neumf"])],
     "{neumf}: checkpoint holds a NeuMF model, --model gmf needs a GMF one"),
    ("gmf file for neumf", lambda h: ["--mode", "test", "--load_checkpoint_path", str(h["gmf"])],
     "{gmf}: checkpoint holds a GMF model, --model neumf needs a NeuMF one"),
]


@pytest.mark.parametrize("flags, message", [(flags, message) for _, flags, message in REFUSALS],
                         ids=[name for name, _, _ in REFUSALS])
def test_refusals_are_one_line(tiny_data, halves, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.run(ncf.main, train_flags(tiny_data, tmp_path, "-e", "1", *flags(halves)))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("ncf.py: error: ")
    assert message.format(**{kind: str(path) for kind, path in halves.items()}) in lines[0]
    assert not (tmp_path / "model.pth").exists()


def test_halves_of_another_dataset_are_refused(halves, tmp_path, capsys):
    other = write_clustered_dataset(str(tmp_path / "other"), nb_users=USERS + 1, nb_items=ITEMS,
                                    clusters=4, per_user=8, negatives=10)
    with pytest.raises(SystemExit):
        cli.run(ncf.main, train_flags(other, tmp_path, "-e", "1", "--pretrained_gmf",
                                      str(halves["gmf"]), "--pretrained_mlp",
                                      str(halves["mlp"])))
    assert capsys.readouterr().err.splitlines() == [
        f"ncf.py: error: {halves['gmf']}: checkpoint has {USERS} users and {ITEMS} items, data "
        f"has {USERS + 1} users and {ITEMS} items; use the checkpoint of this dataset"]


@pytest.mark.parametrize("saved, resumed, changed", [
    # the GMF's --layers were the default, the MLP's are SHAPE's
    (["--model", "gmf"], ["--model", "mlp"],
     "layers ([256, 256, 128, 64] -> [8, 4]), model (gmf -> mlp) differ"),
    (["--model", "gmf"], [], "layers ([256, 256, 128, 64] -> [8, 4]), model (gmf -> neumf) differ"),
    ([], ["--optimizer", "sgd"], "optimizer (adam -> sgd) differs"),
])
def test_resume_refuses_another_model_or_optimizer(tiny_data, tmp_path, capsys, saved, resumed,
                                                   changed):
    ncf.main(train_flags(tiny_data, tmp_path, "-e", "1", *saved))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run(ncf.main, train_flags(tiny_data, tmp_path, "-e", "2", "--resume", *resumed))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and f"cannot resume: {changed} from the saved run" in lines[0]


def test_resume_refuses_a_kind_the_saved_settings_do_not_record(tiny_data, tmp_path, capsys):
    """A last.pth from before --model (no model in its args) holds a NeuMF."""
    ncf.main(train_flags(tiny_data, tmp_path, "-e", "1"))
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    del state["args"]["model"]
    torch.save(state, tmp_path / "last.pth")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.run(ncf.main, train_flags(tiny_data, tmp_path, "-e", "2", "--resume", "--model", "gmf"))
    assert capsys.readouterr().err.splitlines() == [
        f"ncf.py: error: {tmp_path / 'last.pth'}: checkpoint holds a NeuMF model, --model gmf "
        f"needs a GMF one; pass the model.pth of an ncf.py --model gmf run"]


def test_resume_ignores_the_shape_flag_the_model_has_no_use_for(tiny_data, tmp_path, capsys):
    """A GMF's last.pth from before --layers was refused with --model gmf may hold any --layers."""
    ncf.main(train_flags(tiny_data, tmp_path, "-e", "1", "--model", "gmf"))
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    state["args"]["layers"] = [8, 4]
    torch.save(state, tmp_path / "last.pth")
    summary = ncf.main(train_flags(tiny_data, tmp_path, "-e", "2", "--resume", "--model", "gmf"))
    assert summary["epochs_run"] == 2


def args_say_adam(state):
    state["args"]["optimizer"] = "adam"


def foreign_momentum(state):
    state["optimizer"]["state"][0] = {"momentum_buffer": torch.zeros(3)}


def no_momentum(state):
    del state["optimizer"]["param_groups"][0]["momentum"]


@pytest.mark.parametrize("damage, message", [
    (args_say_adam, "optimizer lacks numeric lr, betas, eps or weight_decay"),
    (foreign_momentum, "optimizer's momentum_buffer of parameter 0 is a float32 tensor of "
                       "shape [3], the parameter is [30, 4]"),
    (no_momentum, "optimizer lacks numeric lr, momentum or weight_decay: not an SGD state"),
])
def test_resume_refuses_a_damaged_sgd_state(tiny_data, tmp_path, capsys, damage, message):
    ncf.main(train_flags(tiny_data, tmp_path, "-e", "1", "--optimizer", "sgd"))
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    damage(state)
    torch.save(state, tmp_path / "last.pth")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run(ncf.main, train_flags(tiny_data, tmp_path, "-e", "2", "--resume", "--optimizer",
                                      state["args"]["optimizer"]))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ncf.py: error: {tmp_path / 'last.pth'}: ")
    assert message in lines[0]


def test_bench_table_averages_seeds_and_adds_the_pretraining_time():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from models import RUNS as BENCH_RUNS, table

    def result(hr, epoch, seconds):
        return {"k": 10, "hr": hr, "ndcg": hr / 2, "full_hr": hr / 4, "full_ndcg": hr / 8,
                "epoch": epoch, "seconds_to_best": seconds / 2, "seconds": seconds}
    runs = {run: [result(0.5, 3, 10.0), result(0.7, 5, 30.0)] for _, run, _ in BENCH_RUNS}
    lines = table({"toy": runs}).splitlines()
    assert len(lines) == 2 + len(BENCH_RUNS)
    assert lines[2] == ("| toy | GMF | 0.6000 | 0.3000 | 0.1500 | 0.0750 | 3 / 5 | 10 | 20 |")
    assert lines[5] == ("| toy | NeuMF, pretrained, Adam | 0.6000 | 0.3000 | 0.1500 | 0.0750 "
                        "| 3 / 5 | 10 | 20 (+40 GMF and MLP) |")
