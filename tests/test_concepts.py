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
