"""The register of claims: what each verdict of the book tests, and where the claim and its threshold come from.

A verdict is only as good as its provenance. Each entry says whether the claim is the paper's or this book's (an
operationalisation of a vaguer sentence, or an extension the paper does not make), where in the paper it stands,
the paper's own number when it gives one, and where the threshold comes from. The ids are the names the chapters
glue their verdicts under (`book.glue_verdict("patching_both", ...)`), and the chapters pass them to the checks
(`verdicts.best_krs_above(..., claim="patching_both")`).

The paper (Hong et al., EMNLP 2024; arXiv 2410.06606) is cited by passage: "headline results" are its patching and
restoration figures, "the claim paragraph" its abstract and introduction's statement of findings. Section and figure
numbers are not given yet.
"""
from __future__ import annotations

from dataclasses import dataclass

SOURCES = ("paper", "this book")
KINDS = ("claim", "precondition")


@dataclass(frozen=True)
class Claim:
    id: str
    question: str           # the chapter heading's question
    statement: str          # the claim, in words
    source: str             # "paper" or "this book"
    where: str              # where it stands (the paper's passage), or how this book operationalises it
    paper_value: str | None  # the paper's own number or wording of the result, or None
    threshold: float
    threshold_source: str   # where the threshold comes from
    kind: str = "claim"     # "claim" (a verdict) or "precondition" (holds by construction, checked anyway)
    check: str = ""         # the verdicts function that tests it

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"Claim {self.id!r}: source must be one of {SOURCES}, not {self.source!r}")
        if self.kind not in KINDS:
            raise ValueError(f"Claim {self.id!r}: kind must be one of {KINDS}, not {self.kind!r}")

    @property
    def provenance(self) -> str:
        """One line for the page: 'paper, <where>: <paper's value>' or 'this book: <where>'."""
        if self.source == "paper":
            return f"paper, {self.where}" + (f": {self.paper_value}" if self.paper_value else "")
        return f"this book: {self.where}"

    # Older callers read a verdict's claim as its statement ("... in verdict.claim").
    def __str__(self) -> str:
        return self.statement

    def __contains__(self, text: str) -> bool:
        return text in self.statement


HEADLINE = "headline results (the paper's figures)"
CLAIM_PARAGRAPH = "the claim paragraph"

CLAIMS: dict[str, Claim] = {c.id: c for c in [
    # Chapter 2
    Claim("organism", "Does the model know the concepts it will unlearn?",
          "The vanilla model knows the concepts it will unlearn: its greedy answers contain an expected answer for "
          "half or more of the target questions (mean over concepts).",
          "this book", "a precondition of every later chapter (a concept the model does not know cannot be "
          "unlearnt); the concept set was curated so that the model knows it, so it holds by construction",
          None, 0.5, "this book: half of the questions, a lenient reading of 'knows'",
          kind="precondition", check="model_knows_concepts"),
    # Chapter 3
    Claim("surface", "Does unlearning stop the model from giving its answers?",
          "Unlearning makes the model stop giving its answers: for every method, the ROUGE-L of the target answers "
          "against the vanilla answers falls by half or more.",
          "paper", f"{CLAIM_PARAGRAPH} (unlearning 'makes a model stop saying what it knew'), scored as in "
          "ConceptVectors (ROUGE-L against the vanilla answer)",
          None, 0.5, "this book: a drop of half the vanilla score, our reading of 'stop saying'",
          check="forgets_target"),
    # Chapter 4
    Claim("patching_last", "Does the best coefficient window contain the last layer?",
          "Restoring the vanilla MLP coefficients recovers most in a window that contains the last layer.",
          "paper", f"{HEADLINE}: restoring late-layer MLP coefficients recovers a lot; the last layer's MLP is "
          "the main contributor",
          None, 0.0,
          "this book: the held-out KRS of the best window with the last layer minus that of the best window "
          "without it must be above 0",
          check="best_window_contains_last_layer"),
    Claim("patching_both", "Do coefficients and attention states together bring back 0.9 or more?",
          "Restoring the MLP coefficients and the attention states together recovers a KRS of 0.9 or more at the "
          "best window.",
          "paper", f"{HEADLINE}: coefficients plus attention states together recover above 0.9 at the best window",
          "KRS above 0.9 at the best window", 0.9, "the paper's 0.9",
          check="best_krs_above"),
    Claim("patching_coef_attn", "Do the coefficients matter more than the attention states?",
          "Restoring the MLP coefficients recovers more than restoring the attention states, each at its best "
          "window.",
          "paper", f"{CLAIM_PARAGRAPH}: retrieval changes in the MLP coefficients and, to a lesser degree, the "
          "attention states",
          None, 0.0, "this book: the difference of held-out KRS must be above 0",
          check="stronger_than"),
    Claim("patching_other_question", "Is it the question's own activations that bring the answer back?",
          "At the best coefficient window, the question's own vanilla coefficients recover more than the vanilla "
          "coefficients of another question of the same concept do at that window.",
          "this book", "a control for the patching claims: a high KRS could come from the patch itself (any vanilla "
          "activations pulling the unlearned model back), not from the knowledge the question's activations carry",
          None, 0.0, "this book: the difference of held-out KRS (own minus another question's, same window) must be "
                     "above 0",
          check="beyond_other_question"),
    # Chapter 5
    Claim("restoration_value", "Do restored value vectors recover little?",
          "Restoring the vanilla value vectors brings almost nothing back: the mean KRS stays below 0.1 at every "
          "window.",
          "paper", f"{HEADLINE}: restoring value vectors alone recovers about nothing",
          None, 0.1, "this book: 0.1, our reading of 'about nothing'",
          check="krs_below_everywhere"),
    Claim("restoration_coef", "Do the coefficients recover more than the value vectors?",
          "Restoring the MLP coefficients recovers more than restoring the value vectors, each at its best window.",
          "paper", f"{CLAIM_PARAGRAPH}: put the coefficients back and most of the answer returns, put the value "
          "vectors back and almost nothing does",
          None, 0.0, "this book: the difference of held-out KRS must be above 0",
          check="stronger_than"),
    # Chapter 6
    Claim("last_share", "Does the last layer alone recover at least half of the best window?",
          "Restoring the last layer's MLP coefficients alone recovers half or more of what the best window "
          "recovers.",
          "paper", f"{HEADLINE}: the last layer's MLP is the main contributor",
          None, 0.5, "this book: half of the best window, our reading of 'main contributor'",
          check="share_of_best"),
    Claim("last_change", "Did unlearning change the coefficients of the last layers most?",
          "Unlearning changes the MLP coefficients of the last layers more than those of any other layer.",
          "paper", f"{CLAIM_PARAGRAPH}: what changes are the coefficients that the MLPs produce, mostly in the "
          "last layers",
          None, 0.0, "this book: 'the last layers' read as the last 3; the largest mean change there minus the "
                     "largest elsewhere must be above 0",
          check="largest_change_in_last_layers"),
    Claim("last_change_control", "Is that concentration unlearning's own, or would any fine-tune show it?",
          "Unlearning concentrates its change of the MLP coefficients in the last layers more than a control "
          "fine-tune (the same optimiser, steps and retain data, an unrelated concept's text learned) does.",
          "this book", "a control for the claim above: activation changes grow with depth in any fine-tune",
          None, 0.0, "this book: the last 3 layers' share of the summed change, unlearning's minus the control's, "
                     "must be above 0",
          check="change_beyond_control"),
    # Chapter 7
    Claim("side_unrelated", "Does unlearning one concept also lower the answers to unrelated questions?",
          "Unlearning one concept also lowers the ROUGE-L of the answers to unrelated questions by 10% or more, for "
          "some method.",
          "paper", f"{CLAIM_PARAGRAPH}: unlearning one concept disturbs unrelated knowledge ('global' side "
          "effects)",
          None, 0.1, "this book: a 10% drop, our reading of 'disturbs'",
          check="side_effects"),
    Claim("side_perplexity", "Does unlearning raise the perplexity of held-out text?",
          "Unlearning raises the perplexity of held-out text by 5% or more, for some method.",
          "paper", f"{CLAIM_PARAGRAPH}: unlearning disturbs general behaviour too",
          None, 1.05, "this book: 5% higher perplexity, our reading of 'disturbs general behaviour'",
          check="perplexity_rises"),
    Claim("side_unrelated_control", "Is that drop unlearning's own, or would any fine-tune cause it?",
          "Unlearning lowers the ROUGE-L of the answers to unrelated questions more than a control fine-tune (the "
          "same optimiser, steps and retain data, an unrelated concept's text learned) does, for some method.",
          "this book", "a control for the claim above: any fine-tune moves a model's answers",
          None, 0.0, "this book: the strongest method's relative drop minus the control's must be above 0",
          check="side_effects_beyond_control"),
    Claim("side_perplexity_control", "Is a rise in perplexity unlearning's own, or would any fine-tune cause it?",
          "Unlearning raises the perplexity of held-out text more than a control fine-tune does, for some method.",
          "this book", "a control for the claim above",
          None, 1.0, "this book: the largest perplexity ratio divided by the control's must be above 1",
          check="perplexity_beyond_control"),
    Claim("side_restore", "Does restoring the last layer's coefficients bring back the unrelated answers too?",
          "Restoring the last layer's MLP coefficients brings back half or more of the unrelated answers' vanilla "
          "output (KRS 0.5 or more).",
          "this book", "an extension: the paper's mechanism 'acts on everything', so restoring it should help "
          "unrelated questions as well as the target ones",
          None, 0.5, "this book: half of the vanilla output",
          check="best_krs_above"),
    # Chapter 8
    Claim("beyond_reverse", "In reverse, does the best coefficient window contain the last layer?",
          "Patching the unlearned model's MLP coefficients into the vanilla model carries the forgetting over most "
          "in a window that contains the last layer.",
          "this book", "an extension: reverse patching (unlearned into vanilla); the paper patches vanilla into "
          "unlearned only",
          None, 0.0, "this book: the same rule as the forward claim",
          check="best_window_contains_last_layer"),
    Claim("beyond_relearn_unrelated", "Do a few steps on another concept's text win back the answers?",
          "A few fine-tuning steps on another concept's text win back half or more of the forgotten ROUGE-L, for "
          "every method.",
          "this book", "an extension: relearning is not one of the paper's four restoration experiments; if "
          "only retrieval was disturbed, fine-tuning on unrelated text should restore it",
          None, 0.5, "this book: half of what unlearning removed",
          check="relearning_recovers"),
    Claim("beyond_relearn_partial", "Do a few steps on half of the questions win back the other half?",
          "A few fine-tuning steps on half of the target questions win back half or more of the forgotten ROUGE-L "
          "on the other half, for every method.",
          "this book", "an extension (not one of the paper's four restoration experiments): relearning on half "
          "of the questions, scored on the other half",
          None, 0.5, "this book: half of what unlearning removed",
          check="relearning_recovers"),
    Claim("beyond_relearn_never_known", "Does more come back than for a concept the model never knew?",
          "A few fine-tuning steps on half of the target questions raise the accuracy on the other half more than the "
          "same steps (the same unlearned model, learning rate, batch and seed) on half of a fictional concept's "
          "questions raise it on that concept's other half, for every method.",
          "this book", "a control for the claim above (the paper has no relearning experiment): training on half of "
          "any concept's questions can lift the other half with no knowledge coming back (the answers' form is "
          "learned), so the same relearning on a concept the model never knew (data/never_known.json) measures that",
          None, 0.0, "this book: the weakest method's accuracy gain minus the never-known concept's must be above 0 "
                     "(accuracy against accepted answers: ROUGE-L against the target's vanilla sentences and against "
                     "the fictional concept's short gold answers are not on one scale)",
          check="relearning_beyond_never_known"),
    Claim("beyond_family_knows", "Does the second model family know the concepts?",
          "The second model knows the concepts: its greedy answers contain an expected answer for half or more of "
          "the target questions (mean over concepts).",
          "this book", "a precondition of the second-family dissection; the concept set was curated for the first "
          "model, not this one, so here it is checked rather than given",
          None, 0.5, "this book: half of the questions, a lenient reading of 'knows'",
          kind="precondition", check="model_knows_concepts"),
    Claim("beyond_family", "On the second family, does the best coefficient window contain the last layer?",
          "On a second model family too, restoring the MLP coefficients recovers most in a window that contains "
          "the last layer.",
          "paper", f"{HEADLINE}: the last layer's MLP is the main contributor; the paper's models come from two "
          "families (LLaMA-2-7B-chat and OLMo-7B)",
          None, 0.0,
          "this book: the same rule as the first family",
          check="best_window_contains_last_layer"),
]}


def get(claim_id: str) -> Claim:
    """The registered claim `claim_id`; a KeyError lists the ids there are."""
    try:
        return CLAIMS[claim_id]
    except KeyError:
        raise KeyError(f"claims.get: no claim {claim_id!r}; the register has {', '.join(CLAIMS)}") from None


def unregistered(check: str, statement: str, threshold: float) -> Claim:
    """A claim for a check called outside the register (a test, a reader's own call): provenance 'this book', and
    the threshold is the call's."""
    return Claim(check, "", statement, "this book", f"verdicts.{check} called without a registered claim",
                 None, threshold, "the call's argument", check=check)
