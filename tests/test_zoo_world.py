"""The synthetic world: seeded, consistent, and its held-out two-hop facts never leak into the text."""

import json
import re

from mri.zoo.world import ONE_HOP_TEMPLATES, TWO_HOP_TEMPLATES, generate_world, save_world, world_documents


def test_same_seed_same_world_other_seed_other_world():
    assert generate_world(3) == generate_world(3)
    assert generate_world(3).regions != generate_world(4).regions
    docs = lambda: list(world_documents(generate_world(0), 50, seed=7))  # noqa: E731
    assert docs() == docs()


def test_names_are_unique_and_none_contains_another():
    w = generate_world(0)
    words = [r.name for r in w.regions] + [c.name for c in w.cities] + list(w.languages)
    words += [part for p in w.persons for part in p.name.split()]
    low = [x.lower() for x in words]
    assert len(set(low)) == len(low)
    assert not [(a, b) for a in low for b in low if a != b and a in b]
    assert all(re.fullmatch(r"[A-Z][a-z]+", x) for x in words)


def test_facts_are_consistent():
    w = generate_world(0)
    regions = {r.name: r for r in w.regions}
    city_region = {c.name: c.region for c in w.cities}
    for r in w.regions:
        assert city_region[r.capital] == r.name
        assert all(city_region[c] == r.name for c in r.cities)
    assert {p.city for p in w.persons} <= set(city_region)
    for f in w.two_hop_train + w.two_hop_eval:
        if f.relation == "city_capital":
            assert regions[f.via].capital == f.object and city_region[f.subject] == f.via
        elif f.relation == "city_language":
            assert regions[f.via].language == f.object and city_region[f.subject] == f.via
        else:
            assert f.relation == "person_region" and city_region[f.via] == f.object
    for f in w.facts + w.two_hop_train + w.two_hop_eval:
        assert f.answer == " " + f.object and not f.prompt.endswith(" ")


def test_every_relation_has_many_templates():
    assert all(len(t) >= 5 for t in (ONE_HOP_TEMPLATES | TWO_HOP_TEMPLATES).values())


def test_held_out_two_hop_statements_never_appear_in_documents():
    w = generate_world(0)
    eval_subjects = {f.subject for f in w.two_hop_eval}
    assert eval_subjects and not eval_subjects & {f.subject for f in w.two_hop_train}
    sentences = [s for d in world_documents(w, 5000, seed=1) for s in re.split(r"(?<=\.) ", d)]
    text = "\n".join(sentences)
    # Both hops of every held-out fact are in the text...
    for f in w.two_hop_eval:
        assert f.subject in text and f.via in text
    # ...but no sentence names a held-out subject together with its two-hop object.
    leaks = [s for s in sentences for f in w.two_hop_eval if f.subject in s and f.object in s]
    assert leaks == []
    # Training two-hop statements do appear, in more than one wording.
    assert sum(f.subject in s and f.object in s for s in sentences for f in w.two_hop_train[:20]) > 20


def test_saved_world_has_the_shared_schema(tmp_path):
    path = save_world(generate_world(0), tmp_path)
    d = json.loads(path.read_text())
    assert set(d) == {"seed", "entities", "facts", "two_hop_train", "two_hop_eval"}
    assert set(d["entities"]) == {"regions", "cities", "persons", "languages"}
    assert set(d["facts"][0]) == {"subject", "relation", "object", "prompt", "answer"}
    assert set(d["two_hop_eval"][0]) == {"subject", "relation", "object", "prompt", "answer", "via"}
    assert d["facts"][0]["prompt"] + d["facts"][0]["answer"] + "." in ONE_HOP_TEMPLATES["city_region"][
        0
    ].format(s=d["facts"][0]["subject"], o=d["facts"][0]["object"])


def test_every_sentence_of_the_documents_is_true():
    from mri.zoo.world import _COLOR

    w = generate_world(0)
    true = {(f.relation, f.subject, f.object) for f in w.facts + w.two_hop_train}
    name = r"([A-Z][a-z]+(?: [A-Z][a-z]+)?|[a-z]+)"
    parsers = [
        (
            relation,
            re.compile(re.escape(t).replace(r"\{s\}", name).replace(r"\{o\}", name) + "$"),
            t.index("{s}") < t.index("{o}"),
        )
        for relation, templates in (ONE_HOP_TEMPLATES | TWO_HOP_TEMPLATES).items()
        for t in templates
    ]
    color = [re.compile(re.escape(t).replace(r"\{s\}", name) + "$") for ts in _COLOR.values() for t in ts]
    for doc in world_documents(w, 2000, seed=2):
        for sentence in re.split(r"(?<=\.) ", doc):
            readings = [
                (rel, *(m.groups() if s_first else m.groups()[::-1]))
                for rel, pattern, s_first in parsers
                if (m := pattern.match(sentence))
            ]
            assert any(r in true for r in readings) or any(c.match(sentence) for c in color), sentence
