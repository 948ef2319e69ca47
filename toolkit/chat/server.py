"""The OpenAI-compatible API of ``tk serve``: ``GET /v1/models`` and ``POST /v1/chat/completions``
(streamed as server-sent events, or whole), optionally behind a bearer token."""

import hmac
import json
import threading
import time
import uuid

from .session import ChatSession


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


def parse_messages(raw) -> list:
    """OpenAI messages (content as text or a list of text parts) -> plain {role, content} messages."""
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content}", param="messages")
    messages = []
    for i, item in enumerate(raw):
        role, content = (item.get("role"), item.get("content")) if isinstance(item, dict) else (None, None)
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role must be system, user or assistant, not {role!r}",
                           param=f"messages[{i}].role")
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content
                              if isinstance(part, dict) and part.get("type") == "text")
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be text", param=f"messages[{i}].content")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise ApiError(400, "the last message must come from the user", param="messages")
    return messages


def session_for(chat_model, body: dict, defaults: dict) -> ChatSession:
    """A session with the request's sampling settings (the server's defaults where it gives none)."""
    def pick(key, *aliases):
        for name in (key, *aliases):
            if body.get(name) is not None:
                return body[name]
        return defaults[key]

    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else list(stop)
    try:
        return ChatSession(chat_model.model, chat_model.tokenizer, chat_model.template, chat_model.system,
                           max_new_tokens=int(pick("max_new_tokens", "max_completion_tokens", "max_tokens")),
                           temperature=float(pick("temperature")), top_p=float(pick("top_p")),
                           top_k=int(defaults["top_k"]), repetition_penalty=float(defaults["repetition_penalty"]),
                           stop_words=stop, seed=body.get("seed"), lock=chat_model.lock)
    except (TypeError, ValueError) as exc:
        raise ApiError(400, f"bad sampling setting: {exc}") from None


def build_app(chat_model, api_key: str | None = None, **defaults):
    """A FastAPI app serving ``chat_model`` under the id ``chat_model.name``."""
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse, StreamingResponse

    defaults = dict(dict(max_new_tokens=512, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0),
                    **defaults)
    created = int(time.time())
    app = FastAPI(title="tk serve", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body, status_code=exc.status)

    @app.middleware("http")
    async def bearer_token(request: Request, call_next):
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return JSONResponse(ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                                             kind="authentication_error", code="invalid_api_key").body,
                                    status_code=401)
        return await call_next(request)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": chat_model.name, "object": "model", "created": created,
                                            "owned_by": "tk"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "the request body is not JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        if body.get("model") != chat_model.name:
            raise ApiError(404, f"model {body.get('model')!r} is not served here; use {chat_model.name!r} "
                                f"(see GET /v1/models)", code="model_not_found", param="model")
        messages = parse_messages(body.get("messages"))
        session = session_for(chat_model, body, defaults)
        answer_id, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(sse(request, session, messages, answer_id, now, usage), media_type="text/event-stream")
        reply = await run_in_threadpool(session.reply_to, messages)  # the event loop keeps serving meanwhile
        return {"id": answer_id, "object": "chat.completion", "created": now, "model": chat_model.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                             "finish_reason": session.usage["finish_reason"]}],
                "usage": usage_of(session)}

    async def sse(request, session, messages, answer_id, now, include_usage):
        """Server-sent events; a client that goes away cancels the generation (freeing the model)."""
        def event(delta, finish_reason=None, **extra):
            chunk = {"id": answer_id, "object": "chat.completion.chunk", "created": now, "model": chat_model.name,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}
            return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

        yield event({"role": "assistant", "content": ""})
        cancel = threading.Event()
        pieces = session.stream_messages(messages, cancel)
        try:
            while (piece := await run_in_threadpool(next, pieces, None)) is not None:
                if await request.is_disconnected():  # uvicorn drops what is sent after a disconnect silently
                    return
                yield event({"content": piece})
        finally:
            cancel.set()
        yield event({}, session.usage["finish_reason"])
        if include_usage:
            chunk = {"id": answer_id, "object": "chat.completion.chunk", "created": now, "model": chat_model.name,
                     "choices": [], "usage": usage_of(session)}
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return app


def usage_of(session) -> dict:
    prompt, completion = session.usage["prompt_tokens"], session.usage["completion_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
