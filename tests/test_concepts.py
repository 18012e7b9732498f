import json

import pytest

from dissect_unlearning import concepts


def record(name="Harry Potter", layer=20, dim=7, **over):
    rec = {
        "Concept": name, "Layer": layer, "Dim": dim,
        "QA": [f"Question {i} about {name}?" for i in range(3)],
        "QA_answers": ["a", ["b", "bee"], "c"],
        "text_completion": [{"First_half": "It is", "Second_half": "a thing."}],
        "unrelated_QA": ["What is the capital of France?"],
        "wikipedia_content": "Some encyclopedic text.",
        "extra_field": {"kept": True},
    }
    rec.update(over)
    return rec


def write(tmp_path, data, name="c.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data), encoding="utf-8")
    return p


def test_valid_file_loads_and_keeps_extra_fields(tmp_path):
    cs = concepts.load(write(tmp_path, [record(), record("Star Wars")]))
    assert cs.names == ["Harry Potter", "Star Wars"]
    hp = cs.get("Harry Potter")
    assert hp.answers == [["a"], ["b", "bee"], ["c"]]
    assert hp.to_record()["extra_field"] == {"kept": True}


def test_every_problem_is_reported_with_file_record_and_field(tmp_path):
    bad = [record(), record("X", QA=[]), record("Y", Layer="5"), {"Concept": "Z"}, 3]
    p = write(tmp_path, bad)
    with pytest.raises(concepts.ConceptDataError) as err:
        concepts.load(p)
    msg = str(err.value)
    assert str(p) in msg
    assert "record 1 (concept 'X'): field 'QA' is an empty question list" in msg
    assert "record 2 (concept 'Y'): field 'Layer' must be an integer, got str" in msg
    assert "record 3 (concept 'Z'): missing field 'Layer'" in msg
    assert "record 4: is a int, expected an object" in msg


def test_duplicate_location_is_an_error_but_a_repeated_name_is_not(tmp_path):
    ok = concepts.load(write(tmp_path, [record(layer=1), record(layer=2)], "ok.json"))
    assert len(ok) == 2 and ok[0].label != ok[1].label  # told apart by index
    with pytest.raises(KeyError, match="ambiguous"):
        ok.get("Harry Potter")
    assert ok.get(ok[1].label) is ok[1]
    with pytest.raises(concepts.ConceptDataError, match="record 1 .*duplicate of record 0"):
        concepts.load(write(tmp_path, [record(), record()], "dup.json"))


def test_not_a_list_not_utf8_not_json_and_missing_file(tmp_path):
    with pytest.raises(concepts.ConceptDataError, match="expected a list of records"):
        concepts.load(write(tmp_path, {"Concept": "x"}))
    p = tmp_path / "latin1.json"
    p.write_bytes('[{"Concept": "Café"}]'.encode("latin-1"))
    with pytest.raises(concepts.ConceptDataError, match="not UTF-8"):
        concepts.load(p)
    p.write_text("[{", encoding="utf-8")
    with pytest.raises(concepts.ConceptDataError, match="not valid JSON"):
        concepts.load(p)
    with pytest.raises(concepts.ConceptDataError, match="file not found"):
        concepts.load(tmp_path / "nope.json")


def test_answers_must_match_questions(tmp_path):
    with pytest.raises(concepts.ConceptDataError, match="has 2 answers for 3 questions"):
        concepts.load(write(tmp_path, [record(QA_answers=["a", "b"])]))


def test_answer_matching_is_word_bounded_and_normalised():
    assert concepts.answer_matches("The author is J.K. Rowling, a British author.", ["J.K. Rowling"])
    assert concepts.answer_matches("It's in VIENNA!", ["Vienna"])
    assert not concepts.answer_matches("Parisian cafes", ["Paris"])
    assert not concepts.answer_matches("no idea", ["Paris", "France"])


def test_content_hash_changes_with_content():
    a = concepts.parse([record()])[0].content_hash()
    b = concepts.parse([record(wikipedia_content="Other text.")])[0].content_hash()
    assert a != b


def test_builtin_set_is_valid_and_large_enough():
    cs = concepts.load("builtin")
    assert len(cs) >= 12
    for c in cs:
        assert len(c.questions) == 10 and c.answers and len(c.answers) == 10, c.label
        assert len(c.unrelated_questions) >= 20, c.label
        assert len(c.text_completion) >= 5, c.label
        words = len(c.forget_text.split())
        assert 200 <= words <= 400, f"{c.label}: forget text has {words} words"
        assert not set(c.unrelated_questions) & set(c.questions), c.label


def load_error(tmp_path, data, name="bad.json") -> tuple[str, str]:
    """(message, file) of the ConceptDataError that loading `data` from a file raises."""
    p = write(tmp_path, data, name)
    with pytest.raises(concepts.ConceptDataError) as err:
        concepts.load(p)
    return str(err.value), str(p)


def test_ids_must_be_unique(tmp_path):
    msg, path = load_error(tmp_path, [record(id=1), record("Star Wars", id=1)])
    assert path in msg
    assert "record 1 (concept 'Star Wars'): field 'id' is 1, the id of record 0 (concept 'Harry Potter') too" in msg
    msg, _ = load_error(tmp_path, [record(ID=4), record("Star Wars", ID=4)])
    assert "record 1 (concept 'Star Wars'): field 'ID' is 4" in msg


def test_labels_must_be_unique(tmp_path):
    # 'A' repeats, so its records are labelled by id: the second one's label is the first record's name
    msg, path = load_error(tmp_path, [record("A#3"), record("A", id=3), record("A", layer=4, id=4)])
    assert path in msg
    assert "record 1 (concept 'A'): fields 'Concept' and 'id' give the label 'A#3' of record 0 (concept 'A#3')" in msg
    # a repeat without an id is labelled by its index, which another repeat's id may already be
    msg, _ = load_error(tmp_path, [record("A", id=1), record("A", layer=4)])
    assert "record 1 (concept 'A'): fields 'Concept' and 'id' give the label 'A#1' of record 0" in msg


def test_names_differing_only_in_white_space_or_case_are_an_error(tmp_path):
    msg, path = load_error(tmp_path, [record("Harry Potter"), record("Star Wars"), record(" harry  potter", layer=3)])
    assert path in msg
    assert ("record 2 (concept ' harry  potter'): field 'Concept' differs from 'Harry Potter' of record 0 only in "
            "white space or case") in msg
    # the same name at two locations is two samples of one concept, not an error
    assert concepts.load(write(tmp_path, [record(layer=1), record(layer=2)])).names == ["Harry Potter#0",
                                                                                          "Harry Potter#1"]


@pytest.mark.parametrize("field, value, expected", [
    ("Layer", -5, "field 'Layer' must be an integer from 0 to 1023, got -5"),
    ("Layer", 10 ** 40, f"field 'Layer' must be an integer from 0 to 1023, got {10 ** 40}"),
    ("Dim", 1 << 20, f"field 'Dim' must be an integer from 0 to {(1 << 20) - 1}, got {1 << 20}"),
    ("Dim", -1, "field 'Dim' must be an integer from 0 to"),
    ("Layer", 1e40, "field 'Layer' must be an integer, got float 1e+40"),
    ("Dim", 5.0, "field 'Dim' must be an integer, got float 5.0"),
    ("Layer", True, "field 'Layer' must be an integer, got bool True"),
])
def test_layer_and_dim_are_non_negative_integers_within_bounds(tmp_path, field, value, expected):
    msg, path = load_error(tmp_path, [record(), record("Star Wars", **{field: value})])
    assert path in msg and f"record 1 (concept 'Star Wars'): {expected}" in msg


def test_locations_are_checked_against_a_model(tmp_path):
    cs = concepts.load(write(tmp_path, [record(layer=3, dim=10), record("Star Wars", layer=4, dim=64)]))
    assert cs.check_against(n_layers=5, mlp_dim=65) is cs
    with pytest.raises(concepts.ConceptDataError) as err:
        cs.check_against(n_layers=4, mlp_dim=64)
    msg = str(err.value)
    assert str(tmp_path / "c.json") in msg
    assert "record 1 (concept 'Star Wars'): field 'Layer' is 4, but the model has 4 layers (0 to 3)" in msg
    assert "record 1 (concept 'Star Wars'): field 'Dim' is 64, but the model's MLP has 64 neurons (0 to 63)" in msg
    assert "record 0" not in msg


def test_the_shipped_set_fits_the_default_models_shape():
    # SmolLM2-135M: 30 layers, an MLP 1536 wide
    concepts.load("builtin").check_against(n_layers=30, mlp_dim=1536)


def test_an_empty_concept_set_is_an_error(tmp_path):
    msg, path = load_error(tmp_path, [])
    assert path in msg and "it holds no concept records (an empty list)" in msg
    p = tmp_path / "empty.json"
    for text in ("", " \n"):
        p.write_text(text, encoding="utf-8")
        with pytest.raises(concepts.ConceptDataError) as err:
            concepts.load(p)
        assert str(p) in str(err.value) and "the file is empty" in str(err.value)


def test_select_takes_all_a_positive_count_or_names(tmp_path):
    p = write(tmp_path, [record(), record("Star Wars"), record("Moon")])
    cs = concepts.load(p)
    assert cs.select("all") is cs and cs.select(None) is cs
    assert cs.select(2).names == ["Harry Potter", "Star Wars"]
    assert cs.select("Moon").names == ["Moon"]
    assert cs.select(["Moon", "Harry Potter"]).names == ["Moon", "Harry Potter"]
    for bad in (0, -1):
        with pytest.raises(ValueError) as err:
            cs.select(bad)
        assert str(err.value) == (f"cannot select {bad} concepts from {p}: select takes 'all', a number N >= 1 "
                                  f"(the first N concepts) or concept names")
    with pytest.raises(ValueError) as err:
        cs.select(4)
    assert str(err.value) == f"cannot select the first 4 concepts from {p}: it holds 3"
    for bad in (True, [], 2.0):
        with pytest.raises(ValueError, match="select takes 'all'"):
            cs.select(bad)
    with pytest.raises(ValueError, match="concept 'Moon' is named twice"):
        cs.select(["Moon", "Moon"])


def test_a_missing_concept_is_named_whole(tmp_path):
    p = write(tmp_path, [record(), record("Moon")])
    cs = concepts.load(p)
    with pytest.raises(KeyError) as err:
        cs.select("Mars")
    assert str(err.value) == f"no concept 'Mars' in {p}; concepts: Harry Potter, Moon"
    with pytest.raises(KeyError) as err:
        cs.get(2)
    assert str(err.value) == f"no concept at index 2 in {p}: it holds 2 concepts (indices 0 to 1)"
    with pytest.raises(KeyError, match="no concept at index -1"):
        cs.get(-1)


def test_an_ambiguous_name_suggests_only_existing_labels(tmp_path):
    # id 0 is a real id: the suggestion must be its label, not the record's index
    cs = concepts.load(write(tmp_path, [record(id=5), record(layer=3, id=0)]))
    assert cs.names == ["Harry Potter#5", "Harry Potter#0"]
    with pytest.raises(KeyError) as err:
        cs.get("Harry Potter")
    assert str(err.value).endswith("use one of Harry Potter#5, Harry Potter#0")
    for label in cs.names:
        assert cs.get(label).label == label


# ------------------------------------------------------------------------------------------- the never-known concept
def test_the_never_known_concept_loads_and_stays_out_of_the_studied_set():
    nk = concepts.never_known()
    assert nk.never_known and nk.layer is None and nk.dim is None  # no concept vector to point at
    assert len(nk.questions) == len(nk.answers) == 10
    assert 200 <= len(nk.forget_text.split()) <= 400
    for q, alts in zip(nk.questions, nk.answers):  # short facts, never given away by the question
        assert all(len(a.split()) <= 3 for a in alts), alts
        assert not concepts.answer_matches(q, alts), q
    shipped = concepts.load("builtin")
    assert nk.name not in [c.name for c in shipped] and not any(c.never_known for c in shipped)
    # its facts are its own: no answer of the studied set names it, none of its answers is theirs
    mine = {concepts.normalise(a) for alts in nk.answers for a in alts}
    for c in shipped:
        assert not any(concepts.normalise(a) in mine for alts in c.answers for a in alts), c.label
        assert nk.name.lower() not in c.forget_text.lower(), c.label
    cut = concepts.never_known(3)
    assert cut.questions == nk.questions[:3] and cut.answers == nk.answers[:3]
    assert cut.content_hash() != nk.content_hash() and concepts.never_known(99).content_hash() == nk.content_hash()


def test_never_known_records_are_checked_and_never_mixed_with_studied_concepts(tmp_path):
    fictional = record("Atlantis", None, None, never_known=True)
    assert concepts.load(write(tmp_path, [fictional])).names == ["Atlantis"]
    with pytest.raises(concepts.ConceptDataError) as err:
        concepts.load(write(tmp_path, [record(), fictional], "mixed.json"))
    assert "record 1 (concept 'Atlantis'): field 'never_known' is true in a set of concepts" in str(err.value)
    bad = [record("A", 3, None, never_known=True), record("B", None, None, never_known="yes"),
           {k: v for k, v in record("C", None, None, never_known=True).items() if k != "QA_answers"}]
    with pytest.raises(concepts.ConceptDataError) as err:
        concepts.load(write(tmp_path, bad, "bad.json"))
    text = str(err.value)
    assert "record 0 (concept 'A'): field 'Layer' must be null for a 'never_known' concept" in text
    assert "record 1 (concept 'B'): field 'never_known' must be true or false, got str 'yes'" in text
    assert "record 1 (concept 'B'): field 'Layer' must be an integer" in text  # not marked: a plain record
    assert "record 2 (concept 'C'): a 'never_known' concept needs field 'QA_answers'" in text
    with pytest.raises(concepts.ConceptDataError, match="exactly one record marked 'never_known'"):
        concepts.never_known(source=write(tmp_path, [record()], "plain.json"))
