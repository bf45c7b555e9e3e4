"""A user's memory across sessions, evaluated: a seeded user simulator with a hidden profile, through the
toolkit's own loop (`mmpersona eval bench memory`; `benchmarks/memory.py` adds the answer-time ratio).

The simulator draws a hidden profile: people, pets and objects (each registered as a concept), each with lasting
facts ("Kiko loves tennis balls.") and states that change from session to session (a pet's bed and food, a
person's home and job, an object's place, anyone's age). Over the sessions the user tells the assistant the facts
and each new state in sentences (a share of the new states in other words than the plain form); every sentence
goes through a proposal step with the user's auto-accept setting on, so the store holds what extraction made of
them:
- `extractor="model"`: the pipeline's own (`pipe.remember`: the chat model reads it; the rule extractor for the
  tiny test models);
- `"rule"`: the documented `RuleExtractor`;
- `"oracle"`: each sentence stored as what it means (the memory layer measured apart from extraction).

After the last session the user asks about every subject, directly (naming it: "Where is <kiko>'s bed now?") and
by implication (not naming it: "Is anyone allergic to peanuts?"), and each question is answered by the pipeline.
Scored without trusting the VLM, on the rendered prompt:
- `needed_recall`: the share of questions whose needed entry (the current state, or the fact asked about) is in
  the prompt's memory section;
- `stale_rate`: the share of questions whose prompt holds a state the user has since changed;
- `memory_tokens_per_turn`: the memory section's tokens (the VLM's own tokenizer), mean over questions;
- `memory_ms`: choosing a turn's entries (`pipe.recall`) just after the user's data changed (read from the store
  and indexed), median; `memory_ms_unchanged`: the same with the index of the unchanged data;
- `extract_ms`: proposing entries from one sentence (after the answer, not in its latency), median;
and, meaningful with a real VLM only, `answer_accuracy`: the share of answers that hold the needed value (the
current place, food, city, job or age; the loved thing; for an implied question, the subject's name).
"""

from __future__ import annotations

import random
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

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


@dataclass
class Question:
    text: str
    needed: str  # the entry's text the prompt needs (as the user said it)
    stale: set[str]  # texts of states the user has since changed
    value: str  # what a right answer says
    implied: bool = False


def simulate(pipe: Any, user: str = "sim", *, subjects: int = 60, sessions: int = 8, seed: int = 0,
             extractor: str = "model", paraphrase: float = 0.3, progress: bool = False) -> dict[str, Any]:
    """Register the simulated user's subjects in `pipe.db`, tell the sessions, ask the questions; returns the
    scores (module docs), the counts and, under "questions", each question with what its prompt held."""
    from PIL import Image
    from tqdm.auto import tqdm

    from .memory import AUTO_ACCEPT_SETTING, MemoryIndex, RuleExtractor

    if extractor not in ("model", "rule", "oracle"):
        raise ValueError(f"unknown extractor {extractor!r}; valid: model, rule, oracle")
    db = pipe.db
    rng = random.Random(seed)
    people = profile(rng, subjects, sessions)
    ids = {}
    for i, s in enumerate(people):
        colour = (37 * i % 256, 91 * i % 256, 53 * i % 256)
        ids[s.name] = db.add(user, s.name, [Image.new("RGB", (32, 32), colour)], category=s.kind).id
    db.store.set_setting(user, AUTO_ACCEPT_SETTING, True)
    reader = RuleExtractor() if extractor == "rule" else None

    # the sessions: facts once (in the first sessions), every state as it changes
    extract_ms, said = [], 0
    told: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)  # (subject, topic) -> (value, sentence)
    day = 86_400.0
    for session in tqdm(range(sessions), desc="memory: sessions told", disable=not progress):
        sentences = []
        for s in people:  # (sentence, subject, topic: "" for a fact)
            if session == 0 and "loves" in s.facts:
                sentences.append((f"{s.name.capitalize()} loves {s.facts['loves']}.", s, ""))
            if session == 1 and "allergy" in s.facts:
                sentences.append((f"{s.name.capitalize()} is allergic to {s.facts['allergy']}.", s, ""))
            for topic, values in s.states.items():
                if session == 0 or values[session] != values[session - 1]:
                    variant = 0 if rng.random() >= paraphrase else rng.choice((1, 2))
                    sentences.append((say_state(s, topic, values[session], variant), s, topic))
                    told[s.name, topic].append((values[session], sentences[-1][0]))
        rng.shuffle(sentences)
        for sentence, s, topic in sentences:
            t = time.perf_counter()
            if extractor == "oracle":  # what the sentence means, as the simulator knows it
                entries = [db.store.add_memory(user, sentence, concept_id=ids[s.name], kind="state" if topic else
                                               "fact", topic=topic, source=f"session {session}")]
            else:
                entries = pipe.remember(user, sentence, source=f"session {session}", extractor=reader)
            extract_ms.append((time.perf_counter() - t) * 1000)
            said += 1
            for e in entries:  # the session's time: states told later hold from later
                db.store.update_memory(user, e.id, valid_from=time.time() - (sessions - session) * day)
    entries = db.store.memory(user)

    # the questions, after the last session
    questions: list[Question] = []
    for s in people:
        n = s.name.capitalize()
        for topic, values in s.states.items():
            current = told[s.name, topic][-1][1]  # as the user said it last
            stale = {text for value, text in told[s.name, topic] if value != values[-1]}
            questions.append(Question(ask_state(s, topic), current, stale, values[-1]))
        if "loves" in s.facts:
            questions.append(Question(f"What does <{s.name}> love?", f"{n} loves {s.facts['loves']}.", set(),
                                      s.facts["loves"]))
        if "allergy" in s.facts:  # by implication: the subject is not named
            questions.append(Question(f"Is anyone at home allergic to {s.facts['allergy']}?",
                                      f"{n} is allergic to {s.facts['allergy']}.", set(), s.name, implied=True))
    tokenizer = pipe.vlm.processor.tokenizer
    hits = stale_n = right = 0
    tokens, recall_ms, cached_ms, records = [], [], [], []
    for q in tqdm(questions, desc="memory: questions", disable=not progress):
        answer = pipe.answer_as("retrieval", None, q.text, user=user)
        used = {e.text for e in answer.memory}
        hits += q.needed in used
        stale_n += bool(used & q.stale)
        right += q.value.lower() in answer.answer.lower()
        system = answer.messages[0]["content"][0]["text"]
        block = system[system.find("What the user has told you"):] if answer.memory else ""
        tokens.append(len(tokenizer(block)["input_ids"]) if block else 0)
        concepts = [r.concept for r in answer.retrieved]
        pipe.memory = MemoryIndex(db)  # as after a change of the user's data: read and indexed again
        t = time.perf_counter()
        pipe.recall(user, q.text, concepts)
        recall_ms.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        pipe.recall(user, q.text, concepts)
        cached_ms.append((time.perf_counter() - t) * 1000)
        records.append({"question": q.text, "needed": q.needed, "in_prompt": q.needed in used,
                        "stale_in_prompt": sorted(used & q.stale), "value": q.value, "answer": answer.answer,
                        "implied": q.implied})
    n = len(questions)
    return {"needed_recall": round(hits / n, 4), "stale_rate": round(stale_n / n, 4),
            "memory_tokens_per_turn": round(statistics.mean(tokens), 1),
            "memory_ms": round(statistics.median(recall_ms), 3),
            "memory_ms_unchanged": round(statistics.median(cached_ms), 3),
            "extract_ms": round(statistics.median(extract_ms), 3), "answer_accuracy": round(right / n, 4),
            "counts": {"subjects": len(people), "sessions": sessions, "sentences": said, "paraphrase": paraphrase,
                       "extractor": extractor, "entries": len(entries), "current": sum(e.current for e in entries),
                       "questions": n, "implied": sum(q.implied for q in questions)},
            "targets": TARGETS, "vlm": pipe.vlm.spec.id, "questions": records}


def markdown(report: dict[str, Any]) -> str:
    """A short Markdown report of `simulate`'s result."""
    c = report["counts"]
    rows = [("needed entry in the prompt", report["needed_recall"], f">= {TARGETS['needed_recall']}"),
            ("replaced state in the prompt", report["stale_rate"], f"<= {TARGETS['stale_rate']}"),
            ("memory tokens per turn", report["memory_tokens_per_turn"], f"<= {TARGETS['memory_tokens_per_turn']}"),
            ("memory ms (after a change)", report["memory_ms"], f"<= {TARGETS['memory_ms']}"),
            ("answers holding the needed value", report["answer_accuracy"], "(a real VLM)")]
    lines = [f"# Memory: {c['subjects']} subjects, {c['sessions']} sessions, {c['sentences']} sentences "
             f"({c['extractor']} extractor), {c['questions']} questions ({c['implied']} by implication)", "",
             f"VLM: {report['vlm']}", "", "| measure | value | target |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {target} |" for name, value, target in rows]
    missed = [q for q in report["questions"] if not q["in_prompt"]][:10]
    if missed:
        lines += ["", "Needed entries missing from the prompt (first 10):", ""]
        lines += [f"- {q['question']}: needed \"{q['needed']}\"" for q in missed]
    return "\n".join(lines) + "\n"
