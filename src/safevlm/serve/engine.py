"""`Engine`: the model behind the server, run by ONE worker thread.

Every model call happens on the worker thread, so the model is never used concurrently.
Requests wait in a bounded queue; the worker takes the first one, waits up to
``batch_wait_ms`` for more (up to ``max_batch_size``), and runs compatible requests together:
all classify requests in one call, generate requests with the same generation settings in one
:func:`~safevlm.guarded.generate_guarded` call. A streaming request runs alone. If a batched
call fails, its requests are retried one by one, so one bad input cannot fail the others.
Every job's future is resolved exactly once — with a result or an error — even at shutdown.
Stop strings are applied here too (:meth:`Engine._apply_stops`), so a streamed and a plain
answer end, and count their tokens, the same way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from safevlm.serve.metrics import Metrics

logger = logging.getLogger("safevlm.serve")


class AsyncChannel:
    """Events from the worker thread to a coroutine: ``put`` from any thread, ``await get``
    on the event loop that created the channel."""

    def __init__(self):
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()

    def put(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    async def get(self, timeout: float):
        return await asyncio.wait_for(self._queue.get(), timeout)


class Overloaded(RuntimeError):
    """The request queue is full."""


class ShuttingDown(RuntimeError):
    """The engine stopped before the request ran."""


@dataclass
class Job:
    """One request for the worker: a single input (image or None, messages or prompt or None)."""

    kind: str  # "classify" | "generate"
    image: Any
    prompt: Any
    overrides: Any = None
    generation: dict = field(default_factory=dict)
    stops: tuple[str, ...] = ()  # generate: the answer ends before the first of these strings
    events: AsyncChannel | None = None  # streaming: ("decision", d), ("delta", text), ("done", r), ("error", e)
    cancel: threading.Event = field(default_factory=threading.Event)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    def batch_key(self) -> tuple:
        if self.events is not None:
            return ("stream", id(self))
        if self.kind == "classify":
            return ("classify",)
        return ("generate", tuple(sorted(self.generation.items())))


class Engine:
    """A SafeVLM, its processor and policy, served by one worker thread with batching."""

    def __init__(self, model, processor, policy, max_batch_size: int = 8, batch_wait_ms: float = 5.0,
                 max_queue: int = 256, metrics: Metrics | None = None):
        from safevlm.policy import load_policy

        self.model = model
        self.processor = processor
        self.policy = load_policy(policy)
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.metrics = metrics or Metrics()
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings, metrics: Metrics | None = None) -> Engine:
        """Load the model, processor and policy named by :class:`ServerSettings`. A guard proxy
        (``settings.upstream``) loads only what the guard reads (no language-model layers)."""
        from safevlm.loading import load_model_and_processor
        from safevlm.policy import load_policy

        if not settings.model:
            raise ValueError("no model: pass --model DIR (or set SAFEVLM_MODEL)")
        policy = load_policy(settings.policy)
        model, processor = load_model_and_processor(settings.model, settings.adapter, device=settings.device,
                                                    dtype=settings.dtype, allow_base_mismatch=settings.allow_base_mismatch,
                                                    guard_only=settings.proxy)
        if settings.proxy and model.config.num_prefix_tokens:
            logger.warning(
                "the adapter was trained with %d prefix safety tokens; the upstream engine cannot insert them, "
                "so its answers follow the hint and the LoRA only (train with num_prefix_tokens: 0 for proxy "
                "mode, docs/serve.md)", model.config.num_prefix_tokens)
        return cls(model, processor, policy, settings.max_batch_size, settings.batch_wait_ms, settings.max_queue, metrics)

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> Engine:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="safevlm-engine", daemon=True)
                self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker after the running batch; fail every request still queued."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._drain(ShuttingDown("the server is shutting down"))

    def _drain(self, error: Exception) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            self._fail(job, error)
        self.metrics.queue_depth.set(self._queue.qsize())

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    # -- submitting -------------------------------------------------------------------------------
    def submit(self, job: Job) -> concurrent.futures.Future:
        self.start()
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Overloaded(f"{self._queue.maxsize} requests are already waiting; retry later") from None
        self.metrics.queue_depth.set(self._queue.qsize())
        return job.future

    async def run(self, job: Job, timeout: float):
        """Submit and await a job; on timeout the job is cancelled and TimeoutError raised."""
        future = self.submit(job)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            job.cancel.set()
            future.cancel()
            raise

    # -- the worker ---------------------------------------------------------------------------------
    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while not self._stop.is_set():
                try:
                    first = self._queue.get(timeout=0.1)
                except queue.Empty:
                    continue
                jobs = [first]
                deadline = time.monotonic() + self.batch_wait_s
                while len(jobs) < self.max_batch_size:
                    remaining = deadline - time.monotonic()
                    try:
                        jobs.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
                    except queue.Empty:
                        break
                self.metrics.queue_depth.set(self._queue.qsize())
                groups: dict[tuple, list[Job]] = {}
                for job in jobs:
                    groups.setdefault(job.batch_key(), []).append(job)
                for group in groups.values():
                    self._execute(group)

    def _execute(self, jobs: list[Job]) -> None:
        live = []
        for job in jobs:
            if job.cancel.is_set() or not job.future.set_running_or_notify_cancel():
                job.cancel.set()
                if job.events is not None:
                    job.events.put(("error", ShuttingDown("cancelled")))
                continue
            live.append(job)
        if not live:
            return
        self.metrics.batch_size.observe(len(live))
        try:
            results = self._call(live)
        except Exception as err:  # noqa: BLE001 - every error goes back to its request
            if len(live) > 1:
                logger.warning("batch of %d failed (%s); retrying one by one", len(live), err)
                for job in live:
                    self._execute_running(job)
                return
            self._fail(live[0], err)
            return
        for job, result in zip(live, results):
            self._succeed(job, result)

    def _execute_running(self, job: Job) -> None:
        try:
            result = self._call([job])[0]
        except Exception as err:  # noqa: BLE001
            self._fail(job, err)
        else:
            self._succeed(job, result)

    def _call(self, jobs: list[Job]) -> list:
        from safevlm.guarded import classify, generate_guarded

        images = [j.image for j in jobs]
        prompts = [j.prompt for j in jobs]
        overrides = [j.overrides for j in jobs]
        if jobs[0].kind == "classify":
            decisions = classify(self.model, self.processor, images, prompts, self.policy, overrides)
            for d in decisions:
                self.metrics.count_decision(d)
            return decisions
        generation = dict(jobs[0].generation)
        job = jobs[0]
        if job.events is not None:
            generation.update(_stream_kwargs(job, self.processor.tokenizer))
            on_decisions = lambda ds: job.events.put(("decision", ds[0]))
        else:
            on_decisions = None
        results = generate_guarded(self.model, self.processor, images, prompts, self.policy, overrides,
                                   on_decisions=on_decisions, **generation)
        results = [self._apply_stops(j, r) for j, r in zip(jobs, results)]
        for r in results:
            self.metrics.count_decision(r)
            self.metrics.prompt_tokens.inc(r.prompt_tokens)
            self.metrics.completion_tokens.inc(r.completion_tokens)
        return results

    def _apply_stops(self, job: Job, result):
        """The answer cut before the job's first stop string, with ``completion_tokens`` counting
        what is returned (the cut text re-tokenised) and ``finish_reason`` "stop". Refusals are
        the policy's text, never cut. Runs on the worker thread, which owns the tokenizer."""
        if not job.stops or result.action == "refuse":
            return result
        text, stopped = cut_at_stop(result.text, job.stops)
        if not stopped:
            return result
        return replace(result, text=text, completion_tokens=self.count_tokens(text), finish_reason="stop")

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` without special tokens (0 for ""). Call it on the worker thread."""
        if not text:
            return 0
        return len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])

    @staticmethod
    def _succeed(job: Job, result) -> None:
        if not job.future.done():
            job.future.set_result(result)
        if job.events is not None:
            job.events.put(("done", result))

    @staticmethod
    def _fail(job: Job, error: Exception) -> None:
        if not job.future.done():
            try:
                job.future.set_exception(error)
            except concurrent.futures.InvalidStateError:
                pass
        if job.events is not None:
            job.events.put(("error", error))


def cut_at_stop(text: str, stops) -> tuple[str, bool]:
    """(``text`` up to the earliest occurrence of any stop string, whether one occurred)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _stream_kwargs(job: Job, tokenizer) -> dict:
    """A streamer that pushes text deltas to the job's events, and a stopping criterion that
    ends generation when the job is cancelled (the client went away, or a stop string came)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

    events, cancel = job.events, job.cancel

    class _DeltaStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            if text:
                events.put(("delta", text))

    class _Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

    return {
        "streamer": _DeltaStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
        "stopping_criteria": StoppingCriteriaList([_Cancelled()]),
    }


__all__ = ["AsyncChannel", "Engine", "Job", "Overloaded", "ShuttingDown", "cut_at_stop"]
