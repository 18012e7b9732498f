"""The dissection engine: activation patching and parameter restoration through nnsight, scored by KRS.

For a vanilla model, an unlearned model (any second model of the same architecture) and a concept's questions with
the vanilla answers (teacher forcing), restore something from one model in the other over a window of consecutive
layers and score how much of the output comes back. See `sites` (which activations can be patched), `experiments`
(what each experiment restores: sites and/or a parameter set; the registry to extend), `windows` (where),
`batch` (the teacher-forced inputs and the scored positions), `score` (KRS, KL, top-1 agreement, aggregation),
`engine` (the nnsight traces), `restore` (parameter restoration that always undoes itself) and `change` (how much
each layer changed). The tidy table that pipeline.sweep writes is described by SWEEP_COLUMNS and
docs/sweep-schema.md.

    from dissect_unlearning import patching
    table = patching.run(vanilla_model, unlearned_model, tok, prompt_ids, answer_ids,
                         experiments=("coef", "attn", "coef+attn", "value"), window=5)
    patching.aggregate(table, by=("experiment", "center_layer"))
"""
from .engine import (DIRECTIONS, ENGINE_COLUMNS, REMOTE_CHOICES, Pass, RemoteLocalModelError,
                     RemoteUnavailableError, check_pair, check_remote, check_remote_pair, refuse_local_model, run,
                     wrap)
from .experiments import (EXPERIMENTS, PAPER_EXPERIMENTS, PARAMETER_SETS, Experiment, ParameterSet, parameter_names,
                          register_experiment, register_parameter_set, register_site, unregister_experiment,
                          unregister_parameter_set, unregister_site)
from .sites import SITES, Site
from .restore import restored_parameters
from .batch import ALIGNMENTS, LAYOUTS, ScoringInputs, paper_counts, scoring_inputs
from .score import Reference, aggregate, kl, krs, mse, top1_agree
from .windows import Window, centred, explicit, windows
from . import adapted, remote  # noqa: E402 - the adapter path (after `windows`, which it imports by name)

# The columns of a sweep table (pipeline.sweep / `dissect-unlearning sweep`), in order; docs/sweep-schema.md
# describes each one.
SWEEP_COLUMNS = [
    # what was measured
    "concept", "kind", "experiment", "direction", "window_size", "center_layer", "layers", "question_index",
    "question", "text", "answer", "answer_positions", "n_positions",
    # the scores
    "loss_patched", "loss_unpatched", "krs", "kl", "kl_unpatched", "top1_agree", "top1_agree_unpatched",
    # provenance
    "vanilla_model", "unlearned_model", "unlearned_identity", "alignment", "prompt_format", "remote", "settings",
    "package_version", "torch_version", "transformers_version", "nnsight_version",
]

__all__ = [
    "ALIGNMENTS", "DIRECTIONS", "ENGINE_COLUMNS", "EXPERIMENTS", "LAYOUTS", "PAPER_EXPERIMENTS", "PARAMETER_SETS",
    "REMOTE_CHOICES", "SITES", "SWEEP_COLUMNS", "Experiment", "ParameterSet", "Pass", "Reference",
    "RemoteLocalModelError", "RemoteUnavailableError", "ScoringInputs", "Site", "Window", "aggregate", "centred",
    "check_pair", "check_remote", "check_remote_pair", "explicit", "kl", "krs", "mse", "paper_counts", "parameter_names", "register_experiment",
    "register_parameter_set", "register_site", "restored_parameters", "run", "scoring_inputs", "top1_agree",
    "unregister_experiment", "unregister_parameter_set", "unregister_site", "windows", "wrap",
]
