"""A user's memory across sessions: is what a turn needs in its prompt, is history never presented as current, at
what cost? A seeded user simulator with a hidden profile, through the toolkit's own loop.

    python benchmarks/memory.py [--subjects 60] [--sessions 8] [--seed 0] [--runs 20]

The simulator draws a hidden profile: `--subjects` people, pets and objects (each registered as a concept), each
with lasting facts ("Kiko loves tennis balls.") and states that change from session to session (a pet's bed and
food, a person's home and job, an object's place, anyone's age). Over `--sessions` sessions the user tells the
assistant the facts and each new state in sentences (`--paraphrase` of the new states in other words than the
plain form); every sentence goes through the toolkit's own proposal step (`pipe.remember`: the rule extractor)
with the user's auto-accept setting on, so the store holds what extraction made of them (about 1,000 entries
with the defaults). `--extractor oracle` stores each sentence as what it means instead: the memory layer
(storage, states replacing states, choosing a turn's entries) measured apart from extraction. After the last session the user asks
about every subject, directly (naming it: "Where is <kiko>'s bed now?") and by implication (not naming it: "Is
anyone allergic to peanuts?"), and each question is answered by the tiny VLM through `PersonalizedVLMPipeline`.

Scored without trusting the VLM, on the rendered prompt:
- `needed_recall`: the share of questions whose needed entry (the current state, or the fact asked about) is in
  the prompt's memory section;
- `stale_rate`: the share of questions whose prompt holds a state the user has since changed;
- `memory_tokens_per_turn`: the memory section's tokens (the VLM's own tokenizer), mean over questions;
- `memory_ms`: choosing a turn's entries (`pipe.recall`) just after the user's data changed (the entries read
  from the store and indexed), median; `memory_ms_unchanged`: the same with the index of the unchanged data;
- `answer_latency_ratio`: a whole answer's time with this memory against the same user's answer with memory off
  (`max_memory_chars=0`), median of interleaved ratios (`--runs` pairs);
- `extract_ms`: proposing entries from one sentence (after the answer, not in its latency), median.
Ends with one JSON line with these fields, the counts and the targets.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from t2i_overhead import paired  # noqa: E402  (the benchmarks' shared timing)

TARGETS = {"needed_recall": 0.95, "stale_rate": 0.02, "memory_tokens_per_turn": 300, "memory_ms": 10.0,
           "answer_latency_ratio": 1.0}
NAMES = ["kiko", "mochi", "pepper", "biscuit", "luna", "nala", "ziggy", "olive", "tofu", "yuki", "anna", "marco",
         "sofia", "theo", "ines", "omar", "lena", "kenji", "rosa", "felix", "bruno", "clio", "dora", "elio", "fenn",
         "gus", "hana", "iggy", "juno", "kai", "lupo", "milo", "nico", "otto", "pia", "quin", "remy", "suki", "taro",
         "uma", "vito", "wren", "xena", "yara", "zane", "arlo", "bea", "cosmo", "dax", "esme", "fifi", "gigi",
         "hugo", "iris", "jax", "kira", "lola", "moss", "nori", "opal"]
PLACES = ["balcony", "kitchen", "hallway", "garden", "bedroom", "attic", "garage", "porch", "studio", "cellar"]
FOODS = ["salmon", "chicken", "kibble", "rice", "lamb", "tuna", "turkey", "duck", "beef", "venison"]
CITIES = ["Lyon", "Porto", "Bergen", "Kyoto", "Austin", "Krakow", "Seville", "Tallinn", "Graz", "Quebec"]
JOBS = ["nurse", "baker", "pilot", "teacher", "plumber", "architect", "chemist", "florist", "editor", "welder"]
LOVES = ["tennis balls", "long walks", "jazz records", "mountain hikes", "chess puzzles", "sunflower seeds",
         "sea swimming", "old maps", "crossword books", "paper kites"]
ALLERGIES = ["peanuts", "pollen", "shellfish", "penicillin", "latex", "sesame", "dust mites", "feathers",
             "strawberries", "mustard"]


@dataclass
class Subject:
    name: str
    kind: str  # pet, person, object
    facts: dict[str, str] = field(default_factory=dict)  # key -> value
    states: dict[str, list[str]] = field(default_factory=dict)  # topic -> values over time (last: current)


STATE_TOPICS = {"pet": ("bed", "food", "age"), "person": ("home", "job", "age"), "object": ("place",)}


def say_state(s: Subject, topic: str, value: str, variant: int = 0) -> str:
    """How the user says a new state: `variant` 0 is the plain form, 1-2 are paraphrases (some of which a rule
    extractor cannot read: then the old state stays current, which `stale_rate` counts)."""
    n = s.name.capitalize()
    forms = {"bed": (f"We moved {n}'s bed to the {value}.", f"{n}'s bed is in the {value} now.",
                     f"{n} sleeps in the {value} these days."),
             "food": (f"{n}'s food is {value} now.", f"We switched {n} to {value}.", f"{n} only eats {value} now."),
             "age": (f"{n} turned {value}.", f"{n} is {value} now.", f"{n} had a birthday and is {value} years old."),
             "home": (f"{n} moved to {value}.", f"{n} lives in {value} now.", f"{n} has a flat in {value} now."),
             "job": (f"{n}'s job is {value} now.", f"{n} works as a {value} now.", f"{n} became a {value}."),
             "place": (f"{n} is in the {value} now.", f"I left {n} in the {value}.", f"{n} is on the {value} shelf.")}
    return forms[topic][variant]


def ask_state(s: Subject, topic: str) -> str:
    h = f"<{s.name}>"
    return {"bed": f"Where is {h}'s bed now?", "food": f"What food does {h} get these days?",
            "age": f"How old is {h}?", "home": f"Where does {h} live?", "job": f"What does {h} do for work?",
            "place": f"Where did I leave {h}?"}[topic]


def profile(rng: random.Random, n: int, sessions: int) -> list[Subject]:
    """The hidden profile: subjects, their facts, and each state's value in every session."""
    out = []
    for i in range(n):
        kind = ("pet", "person", "object")[i % 3]
        s = Subject(NAMES[i % len(NAMES)] + (str(i // len(NAMES)) if i >= len(NAMES) else ""), kind)
        if kind != "object":
            s.facts["loves"] = rng.choice(LOVES)
            s.facts["allergy"] = rng.choice(ALLERGIES)
        pools = {"bed": PLACES, "food": FOODS, "home": CITIES, "job": JOBS, "place": PLACES}
        for topic in STATE_TOPICS[kind]:
            if topic == "age":
                start = rng.randint(1, 12 if kind == "pet" else 60)
                s.states[topic] = [str(start + k // 3) for k in range(sessions)]
            else:
                values, last = [], None
                for _ in range(sessions):
                    v = rng.choice([p for p in pools[topic] if p != last])
                    values.append(v)
                    last = v
                s.states[topic] = values
        out.append(s)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=60)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=int, default=20, help="interleaved answer pairs for the latency ratio")
    parser.add_argument("--extractor", choices=("rule", "oracle"), default="rule",
                        help="rule: the toolkit's rule extractor reads each sentence; oracle: each sentence is "
                             "stored as what it means (the memory layer alone)")
    parser.add_argument("--paraphrase", type=float, default=0.3,
                        help="the share of new states said in other words than the plain form")
    parser.add_argument("--vlm", default="tiny:qwen2.5-vl")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()

    from PIL import Image

    from mmpersona import ConceptDB
    from pipelines import PersonalizedVLMPipeline
    from pipelines.memory import AUTO_ACCEPT_SETTING, MemoryIndex

    rng = random.Random(args.seed)
    subjects = profile(rng, args.subjects, args.sessions)
    tmp = Path(tempfile.mkdtemp(prefix="mmpersona-memory-bench-"))
    db = ConceptDB(tmp / "c.db", preset="tiny", device="cpu")
    user = "sim"
    ids = {}
    for i, s in enumerate(subjects):
        colour = (37 * i % 256, 91 * i % 256, 53 * i % 256)
        ids[s.name] = db.add(user, s.name, [Image.new("RGB", (32, 32), colour)], category=s.kind).id
    db.store.set_setting(user, AUTO_ACCEPT_SETTING, True)
    pipe = PersonalizedVLMPipeline(db, vlm=args.vlm, preset="tiny", device="cpu", max_new_tokens=args.max_new_tokens)

    # the sessions: facts once (in the first sessions), every state as it changes
    extract_ms, said = [], 0
    told: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)  # (subject, topic) -> (value, sentence)
    day = 86_400.0
    for session in range(args.sessions):
        sentences = []
        for s in subjects:  # (sentence, subject, topic: "" for a fact)
            if session == 0 and "loves" in s.facts:
                sentences.append((f"{s.name.capitalize()} loves {s.facts['loves']}.", s, ""))
            if session == 1 and "allergy" in s.facts:
                sentences.append((f"{s.name.capitalize()} is allergic to {s.facts['allergy']}.", s, ""))
            for topic, values in s.states.items():
                if session == 0 or values[session] != values[session - 1]:
                    variant = 0 if rng.random() >= args.paraphrase else rng.choice((1, 2))
                    sentences.append((say_state(s, topic, values[session], variant), s, topic))
                    told[s.name, topic].append((values[session], sentences[-1][0]))
        rng.shuffle(sentences)
        for sentence, s, topic in sentences:
            t = time.perf_counter()
            if args.extractor == "rule":
                entries = pipe.remember(user, sentence, source=f"session {session}")
            else:  # what the sentence means, as the simulator knows it: the memory layer measured on its own
                entries = [db.store.add_memory(user, sentence, concept_id=ids[s.name], kind="state" if topic else
                                               "fact", topic=topic, source=f"session {session}")]
            extract_ms.append((time.perf_counter() - t) * 1000)
            said += 1
            for e in entries:  # the session's time: states told later hold from later
                db.store.update_memory(user, e.id, valid_from=time.time() - (args.sessions - session) * day)
    entries = db.store.memory(user)
    print(f"{said} sentences told, {len(entries)} entries stored "
          f"({sum(e.current for e in entries)} current)", file=sys.stderr)

    # the questions, after the last session
    questions = []  # (question, needed text, stale texts)
    for s in subjects:
        n = s.name.capitalize()
        for topic, values in s.states.items():
            current = told[s.name, topic][-1][1]  # as the user said it last
            stale = {text for value, text in told[s.name, topic] if value != values[-1]}
            questions.append((ask_state(s, topic), current, stale))
        if "loves" in s.facts:
            questions.append((f"What does <{s.name}> love?", f"{n} loves {s.facts['loves']}.", set()))
        if "allergy" in s.facts:  # by implication: the subject is not named
            questions.append((f"Is anyone at home allergic to {s.facts['allergy']}?",
                              f"{n} is allergic to {s.facts['allergy']}.", set()))
    tokenizer = pipe.vlm.processor.tokenizer
    hits = stale_n = 0
    tokens, recall_ms, cached_ms = [], [], []
    for question, needed, stale in questions:
        answer = pipe.answer_as("retrieval", None, question, user=user)
        used = {e.text for e in answer.memory}
        hits += needed in used
        stale_n += bool(used & stale)
        system = answer.messages[0]["content"][0]["text"]
        block = system[system.find("What the user has told you"):] if answer.memory else ""
        tokens.append(len(tokenizer(block)["input_ids"]) if block else 0)
        concepts = [r.concept for r in answer.retrieved]
        pipe.memory = MemoryIndex(db)  # as after a change of the user's data: read and indexed again
        t = time.perf_counter()
        pipe.recall(user, question, concepts)
        recall_ms.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        pipe.recall(user, question, concepts)
        cached_ms.append((time.perf_counter() - t) * 1000)
    implied = sum(q.startswith("Is anyone") for q, _, _ in questions)

    off = pipe.variant(max_memory_chars=0)
    sample = [q for q, _, _ in questions[: max(args.runs, 1)]]
    state = {"i": 0}

    def ask(p):
        def call():
            p.answer_as("retrieval", None, sample[state["i"] % len(sample)], user=user, do_sample=False,
                        min_new_tokens=args.max_new_tokens)
        return call

    def with_memory():
        ask(pipe)()
        state["i"] += 1

    ratio, base_ms = paired(ask(off), with_memory, args.runs)
    result = {"needed_recall": round(hits / len(questions), 4), "stale_rate": round(stale_n / len(questions), 4),
              "memory_tokens_per_turn": round(statistics.mean(tokens), 1),
              "memory_ms": round(statistics.median(recall_ms), 3),
              "memory_ms_unchanged": round(statistics.median(cached_ms), 3), "answer_latency_ratio": round(ratio, 3),
              "answer_ms_without_memory": round(base_ms, 1), "extract_ms": round(statistics.median(extract_ms), 3),
              "counts": {"subjects": len(subjects), "sessions": args.sessions, "sentences": said,
                         "paraphrase": args.paraphrase, "extractor": args.extractor,
                         "entries": len(entries), "current": sum(e.current for e in entries),
                         "questions": len(questions), "implied": implied},
              "targets": TARGETS, "vlm": args.vlm}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
