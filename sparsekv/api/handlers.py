"""Completions and chat: prompts -> engine requests -> one JSON body or an SSE stream.

Both endpoints share one path (`_generate`); what differs between them is only how a choice
is shaped, so that is the one thing parameterised by `chat`.
"""
from __future__ import annotations

import asyncio
import uuid
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from sparsekv.api.errors import APIError, sse_error, to_api_error
from sparsekv.api.metrics import Metrics, RequestTracker
from sparsekv.api.protocol import (ChatChoice, ChatChunkChoice, ChatCompletionRequest, ChatMessage,
                                   ChatMessageOut, CompletionChoice, CompletionRequest, CompletionResponse,
                                   DetokenizeRequest, SamplingRequest, TokenizeRequest, Usage)
from sparsekv.engine.async_engine import AsyncEngine, RequestGroup
from sparsekv.engine.outputs import CompletionOutput, RequestOutput, SparsityStats
from sparsekv.engine.prompts import encode_prompt, render_chat

MIN_LOGPROB = -9999.0  # what OpenAI reports for impossible tokens (JSON has no -inf)


class Serving:
    def __init__(self, engine: AsyncEngine, metrics: Metrics) -> None:
        self.engine, self.metrics = engine, metrics
        self.tokenizer = engine.tokenizer
        self.max_model_len: int = engine.config.max_model_len
        self.max_n: int = engine.config.max_num_seqs
        self.model_names = {engine.model_name, engine.config.model}

    # ---- prompts ----------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name and name not in self.model_names:
            raise APIError(404, f"The model `{name}` does not exist.", "model")

    def encode(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, add_special_tokens)

    def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool,
                    template_kwargs: dict[str, Any] | None = None) -> list[int]:
        try:
            return render_chat(self.tokenizer, [m.as_template_input() for m in messages],
                               add_generation_prompt, template_kwargs)
        except ValueError as e:
            raise APIError(400, str(e), "messages") from e

    def _max_tokens(self, prompts: list[list[int]], requested: int | None) -> int:
        """The request's max_tokens (None: the rest of the context, as vLLM), checked to fit."""
        longest = max(len(p) for p in prompts)
        max_tokens = requested if requested is not None else max(1, self.max_model_len - longest)
        if longest + max_tokens > self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. "
                                f"However, you requested {longest + max_tokens} tokens ({longest} in the "
                                f"prompt, {max_tokens} for the completion). Please reduce the prompt or "
                                f"max_tokens.", "max_tokens" if longest < self.max_model_len else "prompt")
        return max_tokens

    # ---- endpoints ---------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, raw: Request) -> Response:
        self.check_model(req.model)
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo together with logprobs is not supported", "echo")
        prompts = [self.encode(p) for p in req.prompts()]
        params = _params(req, self._max_tokens(prompts, req.max_tokens), req.logprobs, self.max_n)
        echo = [self.tokenizer.decode(p) if isinstance(p, list) else p for p in req.prompts()] if req.echo else None
        return await self._generate(req, raw, prompts, params, chat=False, echo=echo)

    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Response:
        self.check_model(req.model)
        prompt = self.chat_prompt(req.messages, req.add_generation_prompt, req.chat_template_kwargs)
        max_tokens = self._max_tokens([prompt], req.max_completion_tokens or req.max_tokens)
        top = (req.top_logprobs or 0) if req.logprobs else None
        return await self._generate(req, raw, [prompt], _params(req, max_tokens, top, self.max_n), chat=True)

    def tokenize(self, req: TokenizeRequest) -> dict:
        self.check_model(req.model)
        ids = (self.encode(req.prompt, req.add_special_tokens) if req.prompt is not None
               else self.chat_prompt(req.messages, req.add_generation_prompt))
        out = {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids}
        return out | ({"token_strs": self.tokenizer.convert_ids_to_tokens(ids)} if req.return_token_strs else {})

    def detokenize(self, req: DetokenizeRequest) -> dict:
        self.check_model(req.model)
        bad = [t for t in req.tokens if t >= len(self.tokenizer)]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of the vocabulary (size {len(self.tokenizer)})", "tokens")
        return {"prompt": self.tokenizer.decode(req.tokens)}

    # ---- generation --------------------------------------------------------------------
    async def _generate(self, req: SamplingRequest, raw: Request, prompts: list[list[int]], params,
                        chat: bool, echo: list[str] | None = None) -> Response:
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        try:
            group = await self.engine.add_requests(request_id, prompts, params, req.sparsity)
        except Exception as e:
            raise to_api_error(e) from e
        shape = _Shape(self, request_id, chat, params.n, params.logprobs, echo)
        tracker = self.metrics.tracker(len(prompts), params.n)
        if req.stream:
            return StreamingResponse(self._stream(group, tracker, shape, req.include_usage),
                                     media_type="text/event-stream")
        task = asyncio.ensure_future(self._collect(group, tracker, shape))
        watcher = asyncio.ensure_future(_disconnected(raw))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():  # the client left: stop generating for nobody
                task.cancel()
                tracker.aborted(len(group.unfinished))
                group.close()
        if task.cancelled():
            return Response(status_code=499)
        if task.exception() is not None:
            raise to_api_error(task.exception())
        return Response(task.result().model_dump_json(), media_type="application/json")

    async def _collect(self, group: RequestGroup, tracker: RequestTracker, shape: "_Shape") -> CompletionResponse:
        latest: dict[int, RequestOutput] = {}
        try:
            async for i, out in group:
                tracker.observe(i, out)
                latest[i] = out
        finally:
            group.close()
        choices = [shape.choice(i, o, o.text, o.token_ids, o.logprobs, final=True)
                   for i in sorted(latest) for o in latest[i].outputs]
        return shape.response(choices, _usage(list(latest.values())), final=True)

    async def _stream(self, group: RequestGroup, tracker: RequestTracker, shape: "_Shape",
                      include_usage: bool) -> AsyncIterator[str]:
        # (prompt, choice) -> chars, tokens sent, done, text_offset of the next token (logprobs)
        sent: dict[tuple[int, int], tuple[int, int, bool, int]] = {}
        latest: dict[int, RequestOutput] = {}
        try:
            if shape.chat:
                yield shape.sse([ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""})
                                 for i in range(shape.n)])
            async for i, out in group:
                tracker.observe(i, out)
                latest[i] = out
                choices = []
                for o in out.outputs:
                    chars, toks, done, offset = sent.get((i, o.index), (0, 0, False, 0))
                    lps = o.logprobs[toks:] if o.logprobs else None
                    # text held back (a partial stop string or UTF-8 char) waits, unless logprobs must go
                    if not done and (len(o.text) > chars or o.finished or (lps and shape.top is not None)):
                        choice = shape.choice(i, o, o.text[chars:], o.token_ids[toks:], lps, final=False,
                                              first=(i, o.index) not in sent, offset=offset)
                        if choice.logprobs and not shape.chat and choice.logprobs["tokens"]:
                            offset = choice.logprobs["text_offset"][-1] + len(choice.logprobs["tokens"][-1])
                        choices.append(choice)
                        sent[(i, o.index)] = (len(o.text), len(o.token_ids), o.finished, offset)
                if choices:
                    yield shape.sse(choices)
            if include_usage:
                yield f"data: {shape.response([], _usage(list(latest.values())), final=False).model_dump_json()}\n\n"
        except Exception as e:  # after the 200 went out, errors travel as an event
            yield sse_error(e)
        finally:
            tracker.aborted(len(group.unfinished))
            group.close()
        yield "data: [DONE]\n\n"


class _Shape:
    """How choices look for one call: completion or chat, whole or streamed."""

    def __init__(self, serving: Serving, request_id: str, chat: bool, n: int, top_logprobs: int | None,
                 echo: list[str] | None) -> None:
        self.serving, self.id, self.chat, self.n = serving, request_id, chat, n
        self.top, self.echo = top_logprobs, echo

    def choice(self, prompt_index: int, o: CompletionOutput, text: str, ids: list[int], lps, final: bool,
               first: bool = True, offset: int = 0):
        index = prompt_index * self.n + o.index
        if self.echo and first:  # echo excludes logprobs, so offsets need no shift
            text = self.echo[prompt_index] + text
        logprobs = self.logprobs(ids, lps, offset) if lps is not None and self.top is not None else None
        common = {"index": index, "logprobs": logprobs, "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}
        if not self.chat:
            return CompletionChoice(text=text, **common)
        if final:
            return ChatChoice(message=ChatMessageOut(content=text), **common)
        return ChatChunkChoice(delta={"content": text}, **common)

    def logprobs(self, ids: list[int], lps: list[dict[int, float]], offset: int) -> dict[str, Any]:
        """OpenAI's logprobs objects: per-token lists for completions, `content` entries for chat."""
        decode = self.serving.tokenizer.decode
        entries = []
        for tid, d in zip(ids, lps):
            top = sorted(d.items(), key=lambda kv: -kv[1])[: self.top]
            entries.append((decode([tid]), max(d.get(tid, MIN_LOGPROB), MIN_LOGPROB),
                            [(decode([t]), max(lp, MIN_LOGPROB)) for t, lp in top]))
        if self.chat:
            def item(s: str, lp: float) -> dict:
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}
            return {"content": [item(s, lp) | {"top_logprobs": [item(*x) for x in top]} for s, lp, top in entries]}
        offsets = []
        for s, _, _ in entries:
            offsets.append(offset)
            offset += len(s)
        return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
                "top_logprobs": [dict(e[2]) for e in entries], "text_offset": offsets}

    def response(self, choices: list, usage: Usage | None, final: bool) -> CompletionResponse:
        kind = ("chat.completion" if final else "chat.completion.chunk") if self.chat else "text_completion"
        return CompletionResponse(id=self.id, object=kind, model=self.serving.engine.model_name,
                                  choices=choices, usage=usage)

    def sse(self, choices: list) -> str:
        return f"data: {self.response(choices, None, final=False).model_dump_json()}\n\n"


def _params(req: SamplingRequest, max_tokens: int, logprobs: int | None, max_n: int):
    if req.n is not None and req.n > max_n:  # all choices of a request must fit in one batch
        raise APIError(400, f"n must be at most {max_n} (the server's --max-num-seqs)", "n")
    try:
        return req.sampling_params(max_tokens, logprobs)
    except ValueError as e:
        raise APIError(400, str(e)) from e


def _usage(outs: list[RequestOutput]) -> Usage:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    total = SparsityStats()
    for o in outs:
        total.add("prefill", o.sparsity.prefill_attended, o.sparsity.prefill_total)
        total.add("decode", o.sparsity.decode_attended, o.sparsity.decode_total)
    kv = [o.sparsity.kv_bytes_fraction for o in outs if o.sparsity.kv_bytes_fraction is not None]
    sparsity = total.as_dict() | {"kv_bytes_fraction": sum(kv) / len(kv) if kv else None}
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 sparsity=sparsity)


async def _disconnected(raw: Request) -> None:
    """Returns once the client has gone (the body is already read, so only that can arrive)."""
    while (await raw.receive())["type"] != "http.disconnect":
        pass
