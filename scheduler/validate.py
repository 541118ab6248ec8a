"""Request validation: every bad input becomes an :class:`InvalidRequest` naming the field."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import descriptor, empty_pb2, message
from google.protobuf.unknown_fields import UnknownFieldSet
from jinja2 import TemplateError

from smcserve.engine.sampling import MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_TOP_LOGPROBS, SamplingParams
from smcserve.protos import smcserve_pb2
from smcserve.smc.potentials.spec import MAX_POTENTIALS

DEFAULT_MAX_TOKENS = 128
CHAT_ROLES = ("system", "user", "assistant")
_LENGTH_DELIMITED = 2


class InvalidRequest(ValueError):
    """A request the server refuses; ``str(err)`` starts with the offending field."""


@dataclass
class BadUtf8:
    """What the lenient deserializer returns for a request with a string field that is not UTF-8."""

    field: str


def _find_bad_utf8(desc: descriptor.Descriptor, raw: bytes, prefix: str = "") -> str | None:
    holder = empty_pb2.Empty()
    holder.ParseFromString(raw)  # every field lands in the unknown-field set, unchecked
    counts: dict[int, int] = {}
    for f in UnknownFieldSet(holder):
        fd = desc.fields_by_number.get(f.field_number)
        if fd is None or f.wire_type != _LENGTH_DELIMITED:
            continue
        index = counts.get(f.field_number, 0)
        counts[f.field_number] = index + 1
        name = prefix + fd.name + (f"[{index}]" if fd.is_repeated else "")
        if fd.type == fd.TYPE_STRING:
            try:
                f.data.decode("utf-8")
            except UnicodeDecodeError:
                return name
        elif fd.type == fd.TYPE_MESSAGE:
            found = _find_bad_utf8(fd.message_type, f.data, name + ".")
            if found:
                return found
    return None


def lenient_deserializer(cls: type[message.Message]):
    """A gRPC request deserializer that turns bad UTF-8 into :class:`BadUtf8` instead of a transport error."""

    def deserialize(raw: bytes):
        try:
            return cls.FromString(raw)
        except message.DecodeError:
            field = _find_bad_utf8(cls.DESCRIPTOR, raw)
            if field is None:
                raise
            return BadUtf8(field)

    return deserialize


@dataclass
class Limits:
    max_context: int
    max_tokens_limit: int
    model_name: str
    max_prompt_chars: int = 0  # checked before tokenising; 0: PROMPT_CHARS_PER_TOKEN × max_context

    def prompt_chars(self) -> int:
        return self.max_prompt_chars or PROMPT_CHARS_PER_TOKEN * self.max_context


PROMPT_CHARS_PER_TOKEN = 16  # a prompt longer than this per token of context could not fit anyway (≈ 4/token)


MAX_STEERING_BYTES = 1 << 20  # one request's whole steering message (its potentials' phrases, grammars, ...)
STEERING_VALIDATION_THREADS = 4  # steering requests validated at once (grammars compiled, tables built)
STEERING_BACKLOG_BYTES = 1 << 20  # steering messages being validated or waiting to be; more: RESOURCE_EXHAUSTED


class ValidationBacklog(Exception):
    """Too much steering is being validated already: the server is overloaded (RESOURCE_EXHAUSTED)."""


def check_steering_size(req: smcserve_pb2.GenerateRequest) -> None:
    """Sizes of a request's steering, checked on the event loop before any work (each potential's own
    sizes are checked by ``smc.potentials.spec`` before its tables are built)."""
    if not req.HasField("steering"):
        return
    if len(req.steering.potentials) > MAX_POTENTIALS:
        n = len(req.steering.potentials)
        raise InvalidRequest(f"steering.potentials: {n} of them; this server's limit is {MAX_POTENTIALS}")
    size = req.steering.ByteSize()
    if size > MAX_STEERING_BYTES:
        raise InvalidRequest(f"steering: {size} bytes; this server's limit is {MAX_STEERING_BYTES}")


@dataclass
class Validators:
    """Threads that validate requests off the event loop. A plain request (tokenising only) never waits
    behind a steering request's grammar compiles and table builds: it has a thread of its own. Steering
    requests share ``STEERING_VALIDATION_THREADS``, and at most ``backlog_bytes`` of steering messages
    are being validated or waiting (one is always taken): a flood of large ones is refused, not queued."""

    backlog_bytes: int = STEERING_BACKLOG_BYTES
    plain: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="validate-plain")
    )
    steering: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(STEERING_VALIDATION_THREADS, thread_name_prefix="validate-steering")
    )
    _backlog: int = 0  # bytes of steering messages submitted and not finished (or cancelled before starting)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def submit(self, req: smcserve_pb2.GenerateRequest, validate: Callable[[Any], object]) -> Future:
        """``validate(req)`` in a thread; :class:`ValidationBacklog` when the steering backlog is full."""
        if not req.HasField("steering"):
            return self.plain.submit(validate, req)
        size = req.steering.ByteSize()
        with self._lock:
            if self._backlog and self._backlog + size > self.backlog_bytes:
                raise ValidationBacklog("steering: too many steering requests are being validated; try again")
            self._backlog += size
        work = self.steering.submit(validate, req)
        work.add_done_callback(lambda _: self._release(size))
        return work

    def _release(self, size: int) -> None:
        with self._lock:
            self._backlog -= size


def validate_sampling(p: smcserve_pb2.SamplingParams, limits: Limits, prompt_len: int) -> SamplingParams:
    temperature = p.temperature if p.HasField("temperature") else 1.0
    if not temperature >= 0.0:  # also catches NaN
        raise InvalidRequest(f"sampling.temperature: must be >= 0, got {temperature}")
    top_p = p.top_p if p.HasField("top_p") else 1.0
    if not 0.0 < top_p <= 1.0:
        raise InvalidRequest(f"sampling.top_p: must be in (0, 1], got {top_p}")
    if p.top_k < 0:
        raise InvalidRequest(f"sampling.top_k: must be >= 0, got {p.top_k}")
    max_tokens = p.max_tokens if p.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    if max_tokens <= 0:
        raise InvalidRequest(f"sampling.max_tokens: must be > 0, got {max_tokens}")
    if max_tokens > limits.max_tokens_limit:
        raise InvalidRequest(
            f"sampling.max_tokens: {max_tokens} is above this server's limit of {limits.max_tokens_limit}"
        )
    if prompt_len + max_tokens > limits.max_context:
        max_tokens = limits.max_context - prompt_len  # fits the context: generation stops at its end
    if len(p.stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"sampling.stop: {len(p.stop)} of them; this server's limit is {MAX_STOP_STRINGS}")
    for i, s in enumerate(p.stop):
        if not s:
            raise InvalidRequest(f"sampling.stop[{i}]: stop strings must not be empty")
        if len(s) > MAX_STOP_CHARS:
            raise InvalidRequest(f"sampling.stop[{i}]: longer than this server's limit of {MAX_STOP_CHARS} characters")
    seed = p.seed if p.HasField("seed") else random.getrandbits(64)  # any uint64: draws hash it, never overflow
    logprobs = p.logprobs if p.HasField("logprobs") else -1
    if p.HasField("logprobs") and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequest(f"sampling.logprobs: must be in [0, {MAX_TOP_LOGPROBS}], got {logprobs}")
    return SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=p.top_k,
        max_tokens=max_tokens,
        stop=list(p.stop),
        seed=seed,
        ignore_eos=p.ignore_eos,
        logprobs=logprobs,
        disable_speculation=p.disable_speculation,
    )


def tokenize_request(req: smcserve_pb2.GenerateRequest, tokenizer, limits: Limits) -> list[int]:
    """Prompt token ids of a request (chat template for chat input)."""
    if req.model and req.model != limits.model_name:
        raise InvalidRequest(f"model: unknown model {req.model!r}; this server serves {limits.model_name!r}")
    kind = req.WhichOneof("input")
    size = sum(len(m.content) + len(m.role) for m in req.chat.messages) if kind == "chat" else len(req.prompt)
    if size > limits.prompt_chars():  # before any tokenising
        field = "chat.messages" if kind == "chat" else "prompt"
        raise InvalidRequest(f"{field}: longer than this server's limit of {limits.prompt_chars()} characters")
    if kind == "chat":
        if not req.chat.messages:
            raise InvalidRequest("chat.messages: must not be empty")
        for i, m in enumerate(req.chat.messages):
            if m.role not in CHAT_ROLES:
                raise InvalidRequest(f"chat.messages[{i}].role: must be one of {', '.join(CHAT_ROLES)}, got {m.role!r}")
        if not any(m.content.strip() for m in req.chat.messages):
            raise InvalidRequest("chat.messages: every message is empty")
        msgs = [{"role": m.role, "content": m.content} for m in req.chat.messages]
        try:
            ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
        except TemplateError as err:  # the model's template refuses these messages (e.g. roles must alternate)
            raise InvalidRequest(f"chat.messages: the model's chat template refused them: {err}") from None
        ids = list(ids)
    else:
        if not req.prompt:
            raise InvalidRequest("prompt: must not be empty")
        ids = tokenizer.encode(req.prompt, add_special_tokens=False)
        if not ids:
            raise InvalidRequest("prompt: tokenises to no tokens")
    if len(ids) >= limits.max_context:
        raise InvalidRequest(f"prompt: {len(ids)} tokens leave no room in the model's context of {limits.max_context}")
    return ids
