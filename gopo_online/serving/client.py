"""A thin chat client over the `openai` package for vLLM (and any OpenAI-compatible endpoint).

Against vLLM every request asks for the sampled token ids and their logprobs (`return_token_ids`, `logprobs`,
DESIGN §5), so a `ChatResult` turns into a `Generation` without re-tokenising text. Retries are bounded and
explicit: connection errors, timeouts and 5xx are retried with exponential backoff; 4xx are not (the request
itself is wrong). After the last retry the error names the URL.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gopo_online.types import Generation

if TYPE_CHECKING:
    from gopo_online.config import GopoConfig
    from gopo_online.requestlog import RequestLog

Message = Mapping[str, str]


class ClientError(RuntimeError):
    """A model request failed for good (server down after retries, or a rejected request); names the URL."""


@dataclass(frozen=True)
class ChatResult:
    """One chat completion. Token lists are empty when the backend is not vLLM (`ChatClient(vllm=False)`)."""

    text: str
    model: str
    prompt_token_ids: tuple[int, ...] = ()
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    """Logprob of each sampled token (after the grammar mask and the temperature: processed_logprobs)."""
    finish_reason: str | None = None
    latency_s: float = 0.0
    """Wall-clock seconds of the successful request (retries not included)."""
    temperature: float = 0.0
    usage: dict[str, int] = field(default_factory=dict)
    tokens: tuple[str, ...] = ()
    """Text of each sampled token (only when `top_logprobs` was asked for)."""
    top_logprobs: tuple[dict[str, float], ...] = ()
    """Per sampled position: candidate token text -> raw logprob (after the grammar mask), when asked for."""

    def to_generation(self, policy_version: int) -> Generation:
        """The wire record the trajectory carries; requires token ids (a vLLM backend)."""
        if not self.token_ids and self.text:
            raise ValueError(f"no token ids in the result from {self.model!r}: was the backend vLLM?")
        return Generation(
            prompt_token_ids=self.prompt_token_ids,
            completion_token_ids=self.token_ids,
            logprobs=self.logprobs,
            text=self.text,
            model=self.model,
            policy_version=policy_version,
            temperature=self.temperature,
            latency_s=self.latency_s,
            finish_reason=self.finish_reason,
        )


class ChatClient:
    """Chat completions against one OpenAI-compatible base URL (`http://host:port/v1`).

    `timeout` bounds each request in seconds; `max_retries` retries after the first attempt, waiting
    `backoff_s * 2**attempt` seconds (capped at 10 s) between them. `vllm=False` drops the vLLM-only request fields
    (token ids, `structured_outputs`) so a hosted API accepts the request; JSON schemas then go through
    `response_format`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        vllm: bool = True,
    ) -> None:
        from openai import OpenAI  # heavy-ish; only the serving modules pay for it

        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.vllm = vllm
        self.request_log: RequestLog | None = None
        """When set, every successful request is appended to it (gopo_online/requestlog.py)."""
        # The openai client's own retries are off: ours are explicit, bounded and name the URL when they run out.
        self._client = OpenAI(base_url=self.base_url, api_key=api_key or "EMPTY", timeout=timeout, max_retries=0)

    def chat(
        self,
        messages: Sequence[Message],
        *,
        model: str,
        temperature: float,
        max_tokens: int,
        seed: int | None = None,
        structured: Mapping[str, Any] | None = None,
        stop: Sequence[str] | None = None,
        top_p: float | None = None,
        top_logprobs: int = 0,
    ) -> ChatResult:
        """One completion. `structured` is vLLM's `structured_outputs` dict, e.g. `{"grammar": ...}`,
        `{"regex": ...}`, `{"choice": [...]}` or `{"json": schema}` (`guided_json` is ignored by vLLM 0.32)."""
        kwargs: dict[str, Any] = {
            "model": model,
            "messages": [dict(m) for m in messages],
            "temperature": temperature,
            "max_tokens": max_tokens,
        }
        if seed is not None:
            kwargs["seed"] = seed
        if stop:
            kwargs["stop"] = list(stop)
        if top_p is not None:
            kwargs["top_p"] = top_p
        if self.vllm:
            kwargs["logprobs"] = True
            kwargs["top_logprobs"] = top_logprobs
            extra: dict[str, Any] = {"return_token_ids": True}
            if structured:
                extra["structured_outputs"] = dict(structured)
            kwargs["extra_body"] = extra
        elif structured:
            # Hosted APIs know only JSON schemas (response_format); vLLM-only keys like disable_any_whitespace drop.
            if "json" not in structured:
                raise ClientError(f"{self.base_url}: only JSON-schema structured output works off vLLM: {structured}")
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": structured["json"]},
            }
        started = time.time()
        resp, latency = self._create(kwargs)
        result = self._result(resp, model, temperature, latency, with_top=top_logprobs > 0)
        if self.request_log is not None:
            self.request_log.record(
                model=model,
                prompt_token_ids=result.prompt_token_ids,
                prompt_tokens=result.usage.get("prompt_tokens"),
                completion_tokens=result.usage.get("completion_tokens", len(result.token_ids)),
                max_tokens=max_tokens,
                temperature=temperature,
                structured=structured,
                latency_s=latency,
                finish_reason=result.finish_reason,
                started_at=started,
            )
        return result

    def _create(self, kwargs: dict[str, Any]) -> tuple[Any, float]:
        import openai

        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            t0 = time.monotonic()
            try:
                resp = self._client.chat.completions.create(**kwargs)
                return resp, time.monotonic() - t0
            except (openai.APIConnectionError, openai.APITimeoutError, openai.InternalServerError) as e:
                last = e
            except openai.APIStatusError as e:
                if e.status_code in (429, 502, 503, 504):
                    last = e
                else:
                    raise ClientError(
                        f"{self.base_url} rejected the request (HTTP {e.status_code}, model {kwargs['model']!r}): "
                        f"{_short(e)}"
                    ) from e
            if attempt < self.max_retries:
                time.sleep(min(10.0, self.backoff_s * 2**attempt))
        raise ClientError(
            f"model server {self.base_url} unreachable or failing after {self.max_retries + 1} attempts "
            f"({type(last).__name__}: {_short(last)}); is it running?"
        ) from last

    @staticmethod
    def _result(resp: Any, model: str, temperature: float, latency: float, with_top: bool = False) -> ChatResult:
        choice = resp.choices[0]
        text = choice.message.content or ""
        token_ids = getattr(choice, "token_ids", None) or ()
        prompt_ids = getattr(resp, "prompt_token_ids", None) or ()
        logprobs: tuple[float, ...] = ()
        if choice.logprobs is not None and choice.logprobs.content is not None:
            # vLLM reports -inf for a token the sampler forced through a mask with zero probability; clamp so the
            # record stays finite JSON (the learner treats very negative values as "off-policy, clip").
            logprobs = tuple(max(float(t.logprob), -1e4) for t in choice.logprobs.content)
        tokens: tuple[str, ...] = ()
        top: tuple[dict[str, float], ...] = ()
        if with_top and choice.logprobs is not None and choice.logprobs.content is not None:
            tokens = tuple(t.token for t in choice.logprobs.content)
            top = tuple({c.token: float(c.logprob) for c in (t.top_logprobs or [])} for t in choice.logprobs.content)
        usage = {}
        if resp.usage is not None:
            usage = {"prompt_tokens": resp.usage.prompt_tokens, "completion_tokens": resp.usage.completion_tokens}
        return ChatResult(
            text=text,
            model=resp.model or model,
            prompt_token_ids=tuple(int(t) for t in prompt_ids),
            token_ids=tuple(int(t) for t in token_ids),
            logprobs=logprobs,
            finish_reason=choice.finish_reason,
            latency_s=latency,
            temperature=temperature,
            usage=usage,
            tokens=tokens,
            top_logprobs=top,
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _short(e: BaseException | None, limit: int = 500) -> str:
    text = str(e) if e is not None else ""
    return text if len(text) <= limit else text[:limit] + "..."


def client_from_config(cfg: GopoConfig, base_url: str, *, external: bool = False) -> ChatClient:
    """A client for a server of this config; `external=True` for `serving.external_url` (a hosted API, not vLLM)."""
    api_key = os.environ.get(cfg.serving.api_key_env) if external else os.environ.get(cfg.serving.admin_token_env)
    return ChatClient(
        base_url,
        api_key=api_key,
        timeout=cfg.serving.request_timeout_s,
        max_retries=cfg.serving.max_retries,
        vllm=not external,
    )
