"""A user's memory across sessions: is what a turn needs in its prompt, is history never presented as current, at
what cost? A seeded user simulator with a hidden profile, through the toolkit's own loop (`pipelines.memory_eval`,
which `mmpersona eval bench memory` also runs).

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
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from t2i_overhead import paired  # noqa: E402  (the benchmarks' shared timing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=60)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=int, default=20, help="interleaved answer pairs for the latency ratio")
    parser.add_argument("--extractor", choices=("rule", "oracle", "model"), default="rule",
                        help="rule: the toolkit's rule extractor reads each sentence; oracle: each sentence is "
                             "stored as what it means (the memory layer alone); model: the pipeline's own (the "
                             "chat model reads it; the rule extractor for the tiny models)")
    parser.add_argument("--paraphrase", type=float, default=0.3,
                        help="the share of new states said in other words than the plain form")
    parser.add_argument("--vlm", default="tiny:qwen2.5-vl")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()

    from mmpersona import ConceptDB
    from pipelines import PersonalizedVLMPipeline
    from pipelines.memory_eval import simulate

    tmp = Path(tempfile.mkdtemp(prefix="mmpersona-memory-bench-"))
    db = ConceptDB(tmp / "c.db", preset="tiny", device="cpu")
    pipe = PersonalizedVLMPipeline(db, vlm=args.vlm, preset="tiny", device="cpu", max_new_tokens=args.max_new_tokens)
    user = "sim"
    result = simulate(pipe, user, subjects=args.subjects, sessions=args.sessions, seed=args.seed,
                      extractor=args.extractor, paraphrase=args.paraphrase)
    questions = result.pop("questions")
    c = result["counts"]
    print(f"{c['sentences']} sentences told, {c['entries']} entries stored ({c['current']} current)", file=sys.stderr)

    off = pipe.variant(max_memory_chars=0)
    sample = [q["question"] for q in questions[: max(args.runs, 1)]]
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
    during = reading_delay(pipe, user, sample, args.max_new_tokens, runs=max(3, args.runs // 4))
    result["targets"] = {**result["targets"], "answer_latency_ratio": 1.0}
    out = {k: result[k] for k in ("needed_recall", "stale_rate", "memory_tokens_per_turn", "memory_ms",
                                  "memory_ms_unchanged")}
    out.update(answer_latency_ratio=round(ratio, 3), answer_ms_without_memory=round(base_ms, 1),
               extract_ms=result["extract_ms"], answer_accuracy=result["answer_accuracy"], **during, counts=c,
               targets=result["targets"], vlm=args.vlm)
    print(json.dumps(out))


def reading_delay(pipe, user: str, questions: list[str], max_new_tokens: int, runs: int) -> dict:
    """A server's answer that arrives while the model reads an earlier turn for memory (`VLMExtractor`, 256
    tokens, on the model worker's background lane), against the same answer with the model idle: median ratios of
    the answer's latency (queued to done), with the reading giving way (`submit_idle(yields=True)`, the server's
    way) and without."""
    import statistics
    import threading
    import time

    from mmpersona.server.worker import ModelWorker
    from pipelines.memory import VLMExtractor

    worker = ModelWorker(queue_size=4)

    def answer():
        pipe.answer_as("retrieval", None, questions[0], user=user, do_sample=False, min_new_tokens=max_new_tokens)

    def reading(stop=None):  # the chat model reads a turn: a full 256-token generation
        VLMExtractor(lambda messages, **kw: pipe.generate(messages, stop=stop, min_new_tokens=256, **kw)
                     ).propose(pipe.db, user, "Kiko's bed is on the balcony now. Kiko turned four.")

    def latency() -> float:
        t = time.perf_counter()
        worker.submit(answer, user=user).result()
        return time.perf_counter() - t

    out = {}
    try:
        for name, yields in (("answer_latency_ratio_during_reading", True),
                             ("answer_latency_ratio_during_reading_not_giving_way", False)):
            ratios = []
            for _ in range(runs):
                alone = latency()
                started = threading.Event()

                def job(stop=None, started=started):
                    started.set()
                    return reading(stop)

                future = worker.submit_idle(job, user="reader", yields=yields)
                started.wait(30)
                time.sleep(0.002)
                ratios.append(latency() / alone)
                try:
                    future.result(60)
                except Exception:  # noqa: BLE001 - a reading that gave up: not what is measured
                    pass
            out[name] = round(statistics.median(ratios), 3)
    finally:
        worker.close()
    return out


if __name__ == "__main__":
    main()
