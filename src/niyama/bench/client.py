"""Open-loop load against any OpenAI-compatible server, timing every streamed token.

Each request is sent at its workload arrival time whatever the server's state (open loop, like
``vllm bench serve``), streams its answer, and records when each chunk of text arrived. Prompts are
random token ids sent to ``/v1/completions`` (exact lengths, nothing for a prefix cache to share), or random
words sent to ``/v1/chat/completions``. With ``ignore_eos`` every answer is exactly ``max_tokens`` long.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
from tqdm import tqdm

from niyama.qos import QoS, QoSClasses
from niyama.sim.workload import RequestSpec

QOS_MODES = ("niyama", "service-tier", "priority", "none")
SETUP_TIMEOUT = 30.0  # s for the server to answer GET /models
WORDS = ("time", "people", "way", "water", "word", "world", "number", "part", "place", "sound", "work", "year",
         "light", "house", "story", "point", "river", "city", "music", "paper", "color", "field", "table", "road")


class ServerError(ConnectionError):
    """The server could not be reached or answered the benchmark's set-up calls with an error."""


@dataclass
class BenchConfig:
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str | None = None  # default: the first model the server lists
    endpoint: str = "completions"  # or "chat"
    qos_mode: str = "niyama"  # how each request states its class (QOS_MODES)
    service_tiers: Mapping[str, str] | None = None  # class → tier; default: interactive classes priority, others flex
    priorities: Mapping[str, int] | None = None  # class → vLLM priority; others: by deadline, tightest 0
    ignore_eos: bool = True
    vocab_size: int = 32000  # random prompt ids are drawn from [100, vocab_size)
    api_key: str | None = None
    drain_timeout: float | None = None  # after the last arrival, cancel what is still running
    stall_timeout: float | None = 600.0  # a stream silent this long fails (a hung server must not hang us)
    stop_at_violation_pct: float | None = None  # end the run once a class has this many certain violations
    seed: int = 0
    progress: bool = True


@dataclass
class RequestResult:
    """What the client saw of one request. Times are seconds since the run started."""

    index: int
    spec: RequestSpec
    sent: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk with text
    output_tokens: int | None = None  # the server's usage count, when it sends one
    prompt_tokens: int | None = None
    finished: float | None = None  # the answer completed (``[DONE]`` received)
    ended: float | None = None  # the client stopped waiting: finished, failed or cancelled
    error: str | None = None  # the server refused or broke the answer
    cancelled: bool = False  # the run ended first (drain timeout or early stop); judged on what arrived
    server_info: dict[str, Any] | None = None  # Niyama's ``niyama`` object, from our server

    def missed(self, qos: QoS, now: float) -> bool:
        """Whether this sent request has missed its SLO by ``now`` (``math.inf``: the final verdict): it failed,
        or its deadline passed unmet (interactive: the first token's; batch: the last token's)."""
        if self.error is not None:
            return True
        if qos.interactive:
            t = self.chunk_times[0] if self.chunk_times else now
        else:
            t = self.finished if self.finished is not None else now
        return t > qos.first_token_deadline(self.sent)  # type: ignore[arg-type]


@dataclass
class RunResult:
    results: list[RequestResult]
    duration: float  # first send to the last request's end
    # "violations" (a class passed its budget), "drain" (drain timeout) or "interrupted" (Ctrl-C)
    stop_reason: str | None = None

    @property
    def stopped_early(self) -> bool:
        return self.stop_reason is not None


def _priorities(classes: QoSClasses, given: Mapping[str, int] | None = None) -> dict[str, int]:
    """vLLM priority per class: ``given``, else by deadline, the class with the tightest first deadline 0
    (served first)."""
    order = sorted(classes, key=lambda n: classes[n].first_token_deadline(0.0))
    return {name: i for i, name in enumerate(order)} | dict(given or {})


OPENAI_SERVICE_TIERS = ("auto", "default", "flex", "scale", "priority")


def _service_tiers(classes: QoSClasses, given: Mapping[str, str] | None = None) -> dict[str, str]:
    """OpenAI service tier per class: ``given``, else ``priority`` for interactive classes, ``flex`` for batch
    ones."""
    return {name: "priority" if qos.interactive else "flex" for name, qos in classes.items()} | dict(given or {})


def _body(cfg: BenchConfig, model: str, spec: RequestSpec, prompt: list[int] | str, classes: QoSClasses,
          priorities: Mapping[str, int], tiers: Mapping[str, str]) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": spec.decode_tokens, "temperature": 0.0, "stream": True,
                            "stream_options": {"include_usage": True}}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if cfg.qos_mode == "niyama":  # the class and its SLOs as the client judges them, so both sides agree
        qos = classes[spec.qos_class]
        slo = {"ttlt": qos.ttlt} if qos.ttlt is not None else {"ttft": qos.ttft, "tbt": qos.tbt}
        body["qos"] = {"class": spec.qos_class, **slo, "importance": spec.importance.name.lower()}
    elif cfg.qos_mode == "service-tier":
        body["service_tier"] = tiers[spec.qos_class]
    elif cfg.qos_mode == "priority":
        body["priority"] = priorities[spec.qos_class]
    return body


def _chunk_text(event: dict[str, Any]) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    return c.get("text") or (c.get("delta") or {}).get("content") or ""


async def _send(session: aiohttp.ClientSession, url: str, body: dict[str, Any], result: RequestResult,
                t0: float) -> None:
    result.sent = time.perf_counter() - t0
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                text = await resp.text()
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    text = json.loads(text)["error"]["message"]
                result.error = f"HTTP {resp.status}: {str(text)[:200]}"
                return
            done = False
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                now = time.perf_counter() - t0
                event = json.loads(data)
                if "error" in event or event.get("object") == "error":  # OpenAI's shape, or vLLM's flat one
                    err = event.get("error", event)
                    message = str(err.get("message", err) if isinstance(err, dict) else err)[:200]
                    result.error = message or "an error event without a message"
                    return
                if _chunk_text(event):
                    result.chunk_times.append(now)
                if usage := event.get("usage"):
                    result.output_tokens = usage.get("completion_tokens")
                    result.prompt_tokens = usage.get("prompt_tokens")
                if info := event.get("niyama"):
                    result.server_info = info
            if not done:
                result.error = "the stream ended without [DONE]"
            elif body.get("ignore_eos") and result.output_tokens is not None \
                    and result.output_tokens < body["max_tokens"]:
                result.error = (f"the answer stopped at {result.output_tokens} of {body['max_tokens']} tokens "
                                "(ignore_eos not honoured?)")
            else:
                result.finished = time.perf_counter() - t0
    except aiohttp.ServerTimeoutError:  # a read gave nothing for ``stall_timeout`` seconds
        result.error = "the stream stalled: nothing arrived within the stall timeout"
    except aiohttp.ClientError as e:
        result.error = f"{type(e).__name__}: {e}"[:200]
    except (ValueError, AttributeError, TypeError) as e:  # a malformed event
        result.error = f"bad stream event: {e}"[:200]
    except asyncio.CancelledError:
        result.cancelled = True
        raise
    finally:
        result.ended = time.perf_counter() - t0


async def list_models(session: aiohttp.ClientSession, base_url: str, required: bool = True) -> list[str]:
    """The server's model ids. Not ``required``: a server without the model list (any other HTTP status)
    gives []."""
    try:
        async with session.get(f"{base_url}/models", timeout=aiohttp.ClientTimeout(total=SETUP_TIMEOUT)) as resp:
            if resp.status != 200:
                if not required:
                    return []
                raise ServerError(f"GET {base_url}/models answered HTTP {resp.status}")
            body = await resp.json(content_type=None)
            models = [m["id"] for m in body["data"]]
    except aiohttp.InvalidURL as e:  # before ValueError, which it also is
        raise ServerError(f"not a valid base URL: {base_url} ({e})") from None
    except (ValueError, KeyError, TypeError) as e:  # not JSON, or not OpenAI's model list
        raise ServerError(f"GET {base_url}/models did not answer with OpenAI's model list "
                          f"({type(e).__name__}: {e}); is this an OpenAI-compatible server?") from None
    except aiohttp.ClientError as e:
        raise ServerError(f"cannot reach {base_url}: {e}") from None
    except TimeoutError:
        raise ServerError(f"GET {base_url}/models did not answer within {SETUP_TIMEOUT:g} s") from None
    if not models:
        raise ServerError(f"{base_url}/models lists no model")
    return models


def _certain_violations(results: list[RequestResult], classes: QoSClasses, now: float) -> dict[str, int]:
    """Per class, sent requests already known to miss their SLO."""
    counts: dict[str, int] = {}
    for r in results:
        if r.sent is not None:
            c = r.spec.qos_class
            counts[c] = counts.get(c, 0) + r.missed(classes[c], now)
    return counts


def _on_interrupt(interrupted: asyncio.Event) -> None:
    """Ctrl-C ends the run with what it measured so far; a second one stops at once."""
    if interrupted.is_set():
        raise KeyboardInterrupt
    interrupted.set()


async def run_load_async(specs: list[RequestSpec], classes: QoSClasses, cfg: BenchConfig) -> RunResult:
    """Run the load; on Ctrl-C (in the main thread) return what was measured, with ``stop_reason``
    "interrupted"."""
    if cfg.endpoint not in ("completions", "chat"):
        raise ValueError(f"endpoint must be completions or chat, got {cfg.endpoint!r}")
    if cfg.qos_mode not in QOS_MODES:
        raise ValueError(f"qos mode must be one of {', '.join(QOS_MODES)}, got {cfg.qos_mode!r}")
    for spec in specs:
        classes[spec.qos_class]  # unknown classes fail before anything is sent
    for option, given in (("--service-tiers", cfg.service_tiers), ("--priorities", cfg.priorities)):
        if unknown := set(given or ()) - set(classes):
            raise ValueError(f"{option} names unknown class(es) {', '.join(sorted(unknown))} "
                             f"(known: {', '.join(classes)})")
    if bad := {tier for tier in (cfg.service_tiers or {}).values() if tier not in OPENAI_SERVICE_TIERS}:
        raise ValueError(f"--service-tiers: {', '.join(sorted(bad))} is not a service tier "
                         f"(OpenAI's: {', '.join(OPENAI_SERVICE_TIERS)})")
    if not cfg.base_url.startswith(("http://", "https://")):
        raise ValueError(f"the base URL must start with http:// or https:// (got {cfg.base_url!r})")
    base = cfg.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    rng = np.random.default_rng(cfg.seed)
    priorities = _priorities(classes, cfg.priorities)
    tiers = _service_tiers(classes, cfg.service_tiers)
    results = [RequestResult(i, s) for i, s in enumerate(specs)]
    totals = {name: sum(1 for s in specs if s.qos_class == name) for name in classes}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=cfg.stall_timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
        models = await list_models(session, base, required=cfg.model is None)  # fail fast if nobody answers
        if cfg.model is not None and models and cfg.model not in models:
            raise ServerError(f"{base} does not serve model {cfg.model!r} (it lists {', '.join(models)})")
        model = cfg.model or models[0]
        url = f"{base}/{'chat/completions' if cfg.endpoint == 'chat' else 'completions'}"

        interrupted = asyncio.Event()
        loop = asyncio.get_running_loop()
        catch_sigint = threading.current_thread() is threading.main_thread()
        if catch_sigint:
            loop.add_signal_handler(signal.SIGINT, _on_interrupt, interrupted)
        bar = tqdm(total=len(specs), desc="requests", unit="req", disable=not cfg.progress, dynamic_ncols=True)
        tasks: list[asyncio.Task] = []
        t0 = time.perf_counter()

        async def launch() -> None:
            for spec, result in zip(specs, results, strict=True):
                delay = spec.arrival - (time.perf_counter() - t0)
                if delay > 0:
                    await asyncio.sleep(delay)
                if cfg.endpoint == "chat":
                    prompt: list[int] | str = " ".join(rng.choice(WORDS, spec.prompt_tokens))
                else:
                    prompt = rng.integers(100, cfg.vocab_size, spec.prompt_tokens).tolist()
                body = _body(cfg, model, spec, prompt, classes, priorities, tiers)
                task = asyncio.create_task(_send(session, url, body, result, t0))
                task.add_done_callback(lambda _: bar.update(1))
                tasks.append(task)

        async def watch() -> str:
            """Why the run should stop: Ctrl-C, a class is past its violation budget, or the drain ran out."""
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(interrupted.wait(), 0.5)
                if interrupted.is_set():
                    return "interrupted"
                now = time.perf_counter() - t0
                if cfg.stop_at_violation_pct is not None:
                    counts = _certain_violations(results, classes, now)
                    if any(100 * n > cfg.stop_at_violation_pct * totals[c] for c, n in counts.items()):
                        return "violations"
                if (cfg.drain_timeout is not None and specs
                        and now > specs[-1].arrival + cfg.drain_timeout):
                    return "drain"

        try:
            launcher = asyncio.create_task(launch())
            watcher = asyncio.create_task(watch())
            finished, _ = await asyncio.wait([launcher, watcher], return_when=asyncio.FIRST_COMPLETED)
            while watcher not in finished and any(not t.done() for t in tasks):
                pending = {t for t in tasks if not t.done()}
                finished, _ = await asyncio.wait(pending | {watcher}, return_when=asyncio.FIRST_COMPLETED)
            stop_reason = watcher.result() if watcher in finished else None
            for t in (launcher, watcher, *tasks):
                t.cancel()
            await asyncio.gather(launcher, watcher, *tasks, return_exceptions=True)
        finally:
            if catch_sigint:
                loop.remove_signal_handler(signal.SIGINT)
            bar.close()
        if launcher.done() and not launcher.cancelled() and launcher.exception():
            raise launcher.exception()  # type: ignore[misc]
    ends = [r.ended for r in results if r.ended is not None]
    starts = [r.sent for r in results if r.sent is not None]
    duration = max(0.0, max(ends) - min(starts)) if ends and starts else 0.0
    return RunResult(results, duration, stop_reason)


def run_load(specs: list[RequestSpec], classes: QoSClasses, cfg: BenchConfig) -> RunResult:
    return asyncio.run(run_load_async(specs, classes, cfg))
