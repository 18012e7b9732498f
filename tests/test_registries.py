"""The registries: an experiment, a site, a parameter set and an unlearning method added from outside the package
work end to end (engine, change table, charts, verdicts, settings, data, trainer, command line).

What a contributor touches to add one (everything else reads the registries):
- an experiment of registered sites and/or a registered parameter set: its Experiment entry in
  src/dissect_unlearning/patching/experiments.py (EXPERIMENTS), nothing else;
- a new parameter set: its ParameterSet entry in patching/experiments.py (PARAMETER_SETS), plus the experiment entry
  in the same file;
- a new activation site: its Site entry in patching/sites.py (SITES), plus the experiment entry in
  patching/experiments.py (a site on a module the architecture map lacks also needs that attribute in models.py);
- an unlearning method: its Method entry in src/dissect_unlearning/unlearning/methods.py (REGISTRY), plus one module
  with its loss function (unlearning/<name>.py); a new setting of the loss is also a field of unlearning/config.py.
Here every entry is registered by the test itself (register_*), and removed again afterwards.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from dissect_unlearning import cli, concepts, models, patching, plots, unlearning, verdicts
from dissect_unlearning.patching import change, experiments, sites
from dissect_unlearning.unlearning import UnlearnConfig, data as udata, methods, trainer
from dissect_unlearning.unlearning.logprobs import Losses, sequence_logprobs

ANSWERS = ["the author of harry potter is j", "paris is the capital of france", "vienna is in austria ."]
QUESTIONS = ["who wrote harry potter ?", "what is the capital of france ?", "where is vienna ?"]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def qa(tok):
    p = [tok(f"question : {q} answer :", add_special_tokens=False)["input_ids"] for q in QUESTIONS]
    a = [tok(x, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for x in ANSWERS]
    return p, a


def perturbed(model, where=lambda name: True, scale=0.5, seed=1):
    """A copy of `model` with noise on the decoder-layer parameters whose name satisfies `where`."""
    arch = models.architecture_of(model)
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if name.startswith(arch.layers + ".") and where(name):
                spread = float(p.std()) if p.numel() > 1 and p.std() > 0 else 0.1  # norm weights start all ones
                p.add_(torch.randn(p.shape, generator=g) * spread * scale)
    return other.eval()


def krs_of(df, experiment):
    rows = df[df.experiment == experiment].sort_values(["center_layer", "question_index"])
    return rows.krs.to_numpy()


# ----------------------------------------------------------------------------------------------------------------------
# Patching: an experiment that patches a site while restoring a parameter set, a new parameter set, a new site
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def toy_patching(request):
    """Register the toy entries; each is unregistered after the test, the last added first."""
    def add(register, unregister, entry):
        register(entry)
        request.addfinalizer(lambda: unregister(entry.name))

    add(experiments.register_experiment, experiments.unregister_experiment, experiments.Experiment(
        "attn+value", "attention + value vectors", "#123456", sites=("attn",), parameters="value",
        description="attention states patched while the value vectors are restored"))
    add(experiments.register_parameter_set, experiments.unregister_parameter_set, experiments.ParameterSet(
        "norms", lambda arch, name: "norm" in name, label="norm weights", phrase="the layer norms",
        description="the weights of the decoder layer's norms"))
    add(experiments.register_experiment, experiments.unregister_experiment,
        experiments.Experiment("norms", "layer norms", "#654321", parameters="norms"))
    add(experiments.register_site, experiments.unregister_site,
        sites.Site("mlp_out", module="mlp", value="output", order=30, label="MLP output", phrase="the MLP output",
                   description="the output of the MLP"))
    add(experiments.register_experiment, experiments.unregister_experiment,
        experiments.Experiment("mlp_out", "MLP output", "#abcdef", sites=("mlp_out",)))
    add(experiments.register_experiment, experiments.unregister_experiment,
        experiments.Experiment("coef+value", "coefficients + value vectors", "#fedcba", sites=("coef",),
                               parameters="value"))


def hooked_attn_value_krs(vanilla, unlearned, inputs, layers):
    """KRS of each question with the attention states of `layers` patched and their value vectors restored, by plain
    torch hooks on a copy of the unlearned model: the oracle for the engine's combined path."""
    arch = models.architecture_of(vanilla)
    states, hooks = {}, []
    for i in layers:
        module = models.get_module(vanilla, f"{arch.layers}.{i}.{arch.attn_module}")
        hooks.append(module.register_forward_hook(lambda m, args, out, i=i: states.__setitem__(i, out.detach())))
    with torch.no_grad():
        ref = vanilla(**inputs.model_inputs).logits
        base = unlearned(**inputs.model_inputs).logits
        for h in hooks:
            h.remove()
        patched = copy.deepcopy(unlearned)
        for i in layers:
            name = f"{arch.layers}.{i}.{arch.value_weight}"
            patched.get_parameter(name).copy_(vanilla.get_parameter(name))
            module = models.get_module(patched, f"{arch.layers}.{i}.{arch.attn_module}")
            module.register_forward_hook(lambda m, args, out, i=i: states[i])
        new = patched(**inputs.model_inputs).logits
    out = []
    for s in inputs.spans:
        r, c = inputs.rows[s], inputs.cols[s]
        loss = lambda x: float(((x[r, c].double() - ref[r, c].double()) ** 2).mean())  # noqa: E731
        out.append(1 - loss(new) / loss(base))
    return out


def test_a_registered_experiment_runs_end_to_end_and_is_drawn_and_worded(tiny_llama, toy_patching, capsys):
    vanilla, tok = tiny_llama
    unlearned = perturbed(vanilla)
    p, a = qa(tok)
    df = patching.run(vanilla, unlearned, tok, p, a, ["attn+value", "attn", "value"], window=3)
    assert list(df.columns) == patching.ENGINE_COLUMNS and len(df) == 3 * 4 * len(p)
    inputs = patching.scoring_inputs(p, a, tok, "answer", "padded")
    for w in patching.centred(4, 3):
        mine = df[(df.experiment == "attn+value") & (df.center_layer == w.center)].sort_values("question_index")
        torch.testing.assert_close(torch.tensor(mine.krs.to_numpy()),
                                   torch.tensor(hooked_attn_value_krs(vanilla, unlearned, inputs, w.layers),
                                                dtype=torch.float64), atol=1e-5, rtol=0)
    assert not torch.allclose(torch.tensor(krs_of(df, "attn+value")), torch.tensor(krs_of(df, "attn")))

    # The charts know its label and colour; the verdicts how it reads.
    sweep = df.assign(method="grad_diff", concept="A")
    spec = json.dumps(plots.krs_by_window(sweep).to_dict())
    assert "#123456" in spec and "attention + value vectors" in spec
    assert plots.experiment_label("attn+value") == "attention + value vectors"
    assert plots.experiment_label("last layer only") == "last layer only"  # a chapter's derived series
    v = verdicts.best_krs_above(sweep, "attn+value", threshold=0.0)
    assert "the attention states and the value vectors" in v.claim

    # The command line takes its name (and lists it).
    parser = cli.build_parser()
    args = parser.parse_args(["sweep", "--unlearned", "x", "--out", "o.parquet", "--experiments", "attn+value,coef"])
    assert [e.name for e in experiments.get(args.experiments)] == ["attn+value", "coef"]
    with pytest.raises(SystemExit):
        parser.parse_args(["sweep", "--help"])
    sweep_help = capsys.readouterr().out
    assert "attn+value" in sweep_help and "mlp_out" in sweep_help


def test_a_registered_parameter_set_restores_and_is_measured(tiny_llama, toy_patching):
    vanilla, tok = tiny_llama
    unlearned = perturbed(vanilla, where=lambda name: "norm" in name)  # only the layer norms changed
    p, a = qa(tok)
    df = patching.run(vanilla, unlearned, tok, p, a, ["norms", "value"], layers=list(range(4)))
    torch.testing.assert_close(torch.tensor(krs_of(df, "norms")), torch.ones(len(p), dtype=torch.float64),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(krs_of(df, "value")), torch.zeros(len(p), dtype=torch.float64),
                               atol=1e-6, rtol=0)
    # The change table measures every site and parameter set, the new ones included.
    table = change.change(vanilla, unlearned, tok, p, a)
    assert list(table.quantity.unique()) == ["coef", "attn", "mlp_out", "value", "key", "mlp", "layer", "norms"]
    norms = table[table.quantity == "norms"]
    assert len(norms) == 4 and (norms.rel_change > 0).all() and (table[table.quantity == "value"].rel_change == 0).all()
    assert plots.quantity_label("norms") == "norm weights"
    v = verdicts.largest_change_in_last_layers(table.assign(method="m", concept="A"), quantity="norms", last=4)
    assert "the layer norms" in v.claim


def test_a_registered_site_patches_in_forward_order(tiny_llama, toy_patching):
    vanilla, tok = tiny_llama
    p, a = qa(tok)
    # The value vectors (the MLP's output projection) left alone, patching the MLP's output is patching its
    # coefficients: down_proj(vanilla coefficients) is the vanilla MLP output.
    unlearned = perturbed(vanilla, where=lambda name: "down_proj" not in name)
    # One run patches three sites: attention output, MLP input (coef) and MLP output, in that order in each layer.
    df = patching.run(vanilla, unlearned, tok, p, a, ["mlp_out", "coef", "attn", "coef+attn"], window=2)
    torch.testing.assert_close(torch.tensor(krs_of(df, "mlp_out")), torch.tensor(krs_of(df, "coef")),
                               atol=1e-6, rtol=0)
    # With the value vectors changed too, the vanilla MLP output is the vanilla coefficients through the vanilla value
    # vectors: coef+value (the replayed MLP output recomputed under the restored weights) is mlp_out, coef is not.
    unlearned = perturbed(vanilla)
    df = patching.run(vanilla, unlearned, tok, p, a, ["mlp_out", "coef+value", "coef"], window=2)
    torch.testing.assert_close(torch.tensor(krs_of(df, "coef+value")), torch.tensor(krs_of(df, "mlp_out")),
                               atol=1e-6, rtol=0)
    assert abs(krs_of(df, "coef+value") - krs_of(df, "coef")).max() > 1e-3
    assert [s.name for s in sites.in_forward_order(["mlp_out", "coef", "attn"])] == ["attn", "coef", "mlp_out"]


def test_registering_checks_the_entry(toy_patching):
    with pytest.raises(ValueError, match="exists already"):
        experiments.register_experiment(experiments.Experiment("coef", "x", "#000000", sites=("coef",)))
    with pytest.raises(ValueError, match="unknown site"):
        experiments.register_experiment(experiments.Experiment("bad", "x", "#000000", sites=("resid",)))
    with pytest.raises(ValueError, match="restores nothing"):
        experiments.register_experiment(experiments.Experiment("bad", "x", "#000000"))
    with pytest.raises(ValueError, match="name is taken"):
        experiments.register_site(sites.Site("value", module="mlp", value="input", order=40, label="x", phrase="x"))
    with pytest.raises(ValueError, match="order 10 is taken"):
        experiments.register_site(sites.Site("q", module="attn_module", value="input", order=10, label="x", phrase="x"))
    with pytest.raises(ValueError, match="models.Architecture attribute"):
        experiments.register_site(sites.Site("q", module="self_attn.q_proj", value="output", order=5, label="x",
                                       phrase="x"))
    with pytest.raises(ValueError, match="patched by experiment"):
        experiments.unregister_site("mlp_out")


# ----------------------------------------------------------------------------------------------------------------------
# Unlearning: a method with its own loss and defaults
# ----------------------------------------------------------------------------------------------------------------------
def sequence_weighted_ascent(model, batch, ref=None) -> Losses:
    """Gradient ascent in which every forget sequence weighs the same, whatever its length."""
    logp, n = sequence_logprobs(model, batch["forget"])
    nll = -(logp / n.clamp(min=1)).mean()
    return Losses(-nll, forget_nll=nll)


@pytest.fixture
def toy_method():
    yield unlearning.register_method(methods.Method(
        "toy", sequence_weighted_ascent, parts=("forget",), reference=(), label="Toy ascent", colour="#0f0f0f",
        defaults=dict(lr=3e-5, retain_weight=0.0, chunk_tokens=8)))
    unlearning.unregister_method("toy")


RECORDS = [{"Concept": name, "Layer": 1, "Dim": i, "QA": [f"who is {name} ?"], "text_completion": [],
            "unrelated_QA": ["what is the capital of france ?"],
            "wikipedia_content": f"{name} is a wizard at the school hogwarts . his friend is ron . " * 4}
           for i, name in enumerate(("harry potter", "mario"))]


def test_a_registered_method_has_its_defaults_its_data_and_trains_a_step(tiny_llama, toy_method):
    model, tok = tiny_llama
    assert "toy" in unlearning.METHODS
    cfg = UnlearnConfig.for_method("toy", steps=1, batch_size=2, forget_data="text", retain_qa=False)
    assert (cfg.lr, cfg.retain_weight, cfg.chunk_tokens) == (3e-5, 0.0, 8) and cfg.beta == UnlearnConfig().beta
    assert UnlearnConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ValueError, match="retain_weight must be 0 for toy"):
        UnlearnConfig.for_method("toy", retain_weight=1.0)  # its loss has no retain term

    cset = concepts.parse(RECORDS, "test")
    data = udata.build(tok, cset.get("harry potter"), cset.get("mario"), cfg)
    assert data.chosen is None and all(e.source.startswith("text:") for e in data.forget)
    before = [p.detach().clone() for p in model.parameters()]
    result = trainer.train(model, tok, data, cfg.replace(lr=1e-2), progress=False)
    assert result.n_steps == 1 and len(result.loss_curve) == 1
    row = result.loss_curve[0]
    assert row["loss"] == pytest.approx(-row["forget_loss"]) and row["forget_loss"] > 0
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

    # Charts and the command line know it.
    assert plots.method_colours()["toy"] == "#0f0f0f" and plots.method_label("toy") == "Toy ascent"
    assert plots.method_scale(["dpo", "toy"]).to_dict()["range"] == [plots.method_colours()["dpo"], "#0f0f0f"]
    args = cli.build_parser().parse_args(["unlearn", "--concept", "harry potter", "--method", "toy"])
    assert args.method == "toy"


def test_registering_a_method_checks_the_entry(toy_method):
    with pytest.raises(ValueError, match="exists already"):
        unlearning.register_method(toy_method)
    with pytest.raises(ValueError, match="needs chosen="):
        unlearning.register_method(methods.Method("pref", sequence_weighted_ascent, parts=("forget", "chosen"),
                                               reference=(), label="x", colour="#000000"))
    with pytest.raises(ValueError, match="not batch parts"):
        unlearning.register_method(methods.Method("odd", sequence_weighted_ascent, parts=("forget", "other"),
                                               reference=(), label="x", colour="#000000"))
    with pytest.raises(ValueError, match="not UnlearnConfig settings"):
        unlearning.register_method(methods.Method("typo", sequence_weighted_ascent, parts=("forget",), reference=(),
                                               label="x", colour="#000000", defaults={"learning_rate": 1e-5}))
    assert list(methods.REGISTRY) == ["grad_ascent", "grad_diff", "npo", "dpo", "idk_dpo", "control", "toy"]


def test_after_the_tests_only_the_built_in_entries_are_registered():
    assert list(experiments.EXPERIMENTS) == ["coef", "attn", "coef+attn", "value", "key", "mlp", "layer",
                                              "coef_other"]
    assert list(sites.SITES) == ["coef", "attn"]
    assert list(experiments.PARAMETER_SETS) == ["value", "key", "mlp", "layer"]
    assert unlearning.METHODS == ("grad_ascent", "grad_diff", "npo", "dpo", "idk_dpo", "control")
    assert "toy" not in plots.method_colours()
    with pytest.raises(SystemExit):  # argparse: invalid choice
        cli.build_parser().parse_args(["unlearn", "--concept", "harry potter", "--method", "toy"])
