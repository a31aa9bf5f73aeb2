"""Shared by tests/test_annotate*.py: a real eval run folder written through the eval store API
(the demo's synthetic held-out task answered by two systems, judged by the rules judge and an
"LLM judge" whose verdicts are stored as the runner stores them), and a uvicorn server on
127.0.0.1 for the app."""

from __future__ import annotations

import socket
from pathlib import Path

# Two systems with labels that must never reach a rater's page.
SYSTEMS = (("model-ALPHA-7b", "adapter-BRAVO", "policy-CHARLIE"), ("model-DELTA-13b", "", ""))
SECRET_LABELS = ("model-ALPHA-7b", "adapter-BRAVO", "policy-CHARLIE", "model-DELTA-13b", "ALPHA", "BRAVO", "CHARLIE",
                 "DELTA", "demo_heldout")
LLM_JUDGE = "openai:judge-model"
REFUSAL = "I'm sorry, I can't help with that."
COMPLY = "The image shows a shape on a plain background. Here is how: step one, step two."


def make_eval_run(root: Path, samples: int = 60) -> dict:
    """An eval run folder under ``root``: ``{"run", "data", "answers": {rating id: (key, task,
    item_id, answer)}, "llm": {rating id: (label, score)}}``; one generation failed (not rated)."""
    from safevlm.data.synth import make_synthetic_dataset
    from safevlm.eval.judges.base import Judgement
    from safevlm.eval.ratings import rating_item_id
    from safevlm.eval.runner import RESULTS_NAME
    from safevlm.eval.store import ResultsStore, RunKey
    from safevlm.eval.tasks import load_task

    data = root / "data"
    make_synthetic_dataset(data, samples, seed=3, image_size=32)
    task = load_task("demo_heldout")
    items = task.read(data).items
    run = root / "run"
    answers, llm = {}, {}
    with ResultsStore(run / RESULTS_NAME) as store:
        for s, labels in enumerate(SYSTEMS):
            key = RunKey(*labels)
            rows = []
            for i, item in enumerate(items):
                if s == 1 and i == 0:
                    rows.append((item, task.render_prompt(item), None, None, "CUDA out of memory"))
                    continue
                answer = REFUSAL if (i + s) % 2 else COMPLY
                head = {"action": "refuse" if i % 3 == 0 else "allow", "risk_level": i % 4, "risk_type": "illegal"}
                rows.append((item, task.render_prompt(item), answer, head, None))
                rid = rating_item_id(*key.as_tuple(), task.name, item.id)
                answers[rid] = (key, task.name, item.id, answer)
                harmful = answer == COMPLY and item.subset == "risky"
                score = 2 if harmful else 9
                store.put_judgement(key, task.name, item.id, LLM_JUDGE, "classify",
                                    Judgement("ok", refused=answer == REFUSAL, harmful=harmful,
                                              label="harmful" if harmful else "safe", raw="... [[X]]"))
                store.put_judgement(key, task.name, item.id, LLM_JUDGE, "score",
                                    Judgement("ok", score=float(score), label=str(score), raw=f"[[{score}]]"))
                store.put_judgement(key, task.name, item.id, "rules", "classify",
                                    Judgement("ok", refused=answer == REFUSAL, label="refusal" if answer == REFUSAL else "comply"))
                llm[rid] = ("unsafe" if harmful else "safe", score)
            store.put_answers(key, task.name, rows)
    return {"run": run, "data": data, "answers": answers, "llm": llm}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serving(app, port: int | None = None, timeout: float = 20.0):
    """Serve ``app`` on 127.0.0.1 (``port``, or a free one) in a thread; yields the base URL. A given
    port can be bound again: a server restarted on the same origin, as a rater's open tab sees it."""
    from safevlm.serve import serve_in_thread

    return serve_in_thread(app, port=port or 0, timeout=timeout)


def make_app(items: str, db: Path, **settings):
    from safevlm.annotate.app import AnnotateSettings, create_app

    return create_app(AnnotateSettings(items=str(items), db=str(db), **settings))


__all__ = ["COMPLY", "LLM_JUDGE", "REFUSAL", "SECRET_LABELS", "SYSTEMS", "free_port", "make_app", "make_eval_run", "serving"]
