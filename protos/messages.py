"""What the public API's clients share below ``client/`` and ``loadtest/``: the default address and
how a request is built from plain Python values.

:data:`DEFAULT_HOST` and :data:`DEFAULT_PORT` are where ``smcserve serve`` listens and :data:`DEFAULT_ADDRESS`
where the client, the CLI and ``smcserve bench`` connect, unless told otherwise. Both the client library
and the load tester import from here (a layer below both), so neither has to import the other.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence

from smcserve.protos import smcserve_pb2 as pb

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50051
DEFAULT_ADDRESS = f"{DEFAULT_HOST}:{DEFAULT_PORT}"


# the built-in kinds: the fields of Potential's ``kind`` oneof, each a message of the kind's parameters
PLUGIN_FIELD = "plugin"
BUILTIN_KINDS = tuple(f.name for f in pb.Potential.DESCRIPTOR.oneofs_by_name["kind"].fields if f.name != PLUGIN_FIELD)
_CASE = ("case_sensitive", "case_insensitive")


def potential_message(pot: Mapping | pb.Potential) -> pb.Potential:
    """A ``Potential`` message from a dict such as ``{"kind": "regex", "pattern": "[0-9]+"}``.

    Keys: ``kind``, ``weight`` (optional; None = unset, the server's default 1) and then either the
    parameters of a built-in kind — the fields of its message in ``Potential``'s ``kind`` oneof:
    regex ``pattern``; cfg ``grammar``, ``format``; json_schema ``schema`` (JSON text, or a dict sent
    as JSON text); max_word_length ``max_len``; forbidden_chars ``chars``, ``case_sensitive``;
    banned_phrases / required_phrases ``phrases``, ``case_insensitive``; max_tokens ``n``;
    prompt_intersection ``prompts`` — or, for any other kind (an operator-installed plugin, sent as
    ``Potential.plugin`` with that name), ``options``: a JSON-like dict sent as a
    ``google.protobuf.Struct`` (numbers travel as doubles; the server hands integral ones to the
    plugin as int). ``case_sensitive`` and ``case_insensitive`` are accepted for both forbidden_chars
    and the phrase kinds (sent as the one the kind has, negated). A key the kind does not have is a
    ValueError; a dict without a kind is sent with none set (the server answers ``kind: required``).
    A ``Potential`` message is passed through.
    """
    if isinstance(pot, pb.Potential):
        return pot
    if not isinstance(pot, Mapping):
        raise ValueError(f"potential {pot!r}: must be a dict or a Potential message")
    d = {k: v for k, v in pot.items() if v is not None}
    kind = d.pop("kind", "")
    if not isinstance(kind, str):
        raise ValueError(f"potential {pot!r}: kind must be a string")
    msg = pb.Potential()
    if "weight" in d:
        try:
            msg.weight = d.pop("weight")
        except (TypeError, ValueError) as err:
            raise ValueError(f"potential {kind!r}: weight: {err}") from None
    options = d.pop("options", None)
    if not kind:
        if d or options is not None:
            raise ValueError(f"potential {pot!r}: kind: required")
        return msg
    if kind not in BUILTIN_KINDS:  # a plugin: its parameters travel in options
        if d:
            raise ValueError(
                f"potential {kind!r}: {', '.join(map(str, d))}: not a field of a plugin potential "
                f"(put its parameters in options)"
            )
        msg.plugin.name = kind
        if options:
            if not isinstance(options, Mapping):
                raise ValueError(f"potential {kind!r}: options must be a dict, got {type(options).__name__}")
            try:
                msg.plugin.options.update(options)
            except (TypeError, ValueError) as err:
                raise ValueError(f"potential {kind!r}: options are not JSON-like: {err}") from None
        return msg
    sub = getattr(msg, kind)
    sub.SetInParent()
    own = sub.DESCRIPTOR.fields_by_name
    if options:
        raise ValueError(
            f"potential {kind!r}: options: '{kind}' is built in and takes no options (its parameters: {', '.join(own)})"
        )
    for name, other in (_CASE, _CASE[::-1]):
        if name in d and name not in own and other in own:
            v = d.pop(name)
            if not isinstance(v, bool):
                raise ValueError(f"potential {kind!r}: {name}: must be a boolean, got {v!r}")
            if other in d and d[other] == v:
                raise ValueError(f"potential {kind!r}: {name} and {other} contradict each other")
            d[other] = not v
    if kind == "json_schema" and isinstance(d.get("schema"), (dict, bool)):
        d["schema"] = json.dumps(d["schema"])
    for name, v in d.items():
        field = own.get(name)
        if field is None:
            raise ValueError(
                f"potential {kind!r}: {name}: not a parameter of '{kind}' (its parameters: {', '.join(own)})"
            )
        try:
            if field.is_repeated:
                if isinstance(v, (str, bytes)) or not isinstance(v, Iterable):
                    raise TypeError(f"must be a list, got {type(v).__name__}")
                getattr(sub, name).extend(v)
            else:
                setattr(sub, name, v)
        except (TypeError, ValueError) as err:
            raise ValueError(f"potential {kind!r}: {name}: {err}") from None
    return msg


def logprob_message(lp) -> pb.TokenLogprob:
    """A token's logprob (``token``, ``logprob``, ``top`` pairs, as ``engine.sampling.TokenLogprob``) as its message."""
    return pb.TokenLogprob(
        token_id=lp.token, logprob=lp.logprob, top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top]
    )


def build_request(
    prompt: str | None = None,
    messages: Sequence[dict] | None = None,
    *,
    request_id: str = "",
    model: str = "",
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int = 0,
    max_tokens: int | None = None,
    stop: Sequence[str] = (),
    seed: int | None = None,
    ignore_eos: bool = False,
    steering: dict | None = None,
    logprobs: int | None = None,
    disable_speculation: bool = False,
) -> pb.GenerateRequest:
    """A GenerateRequest from a raw ``prompt`` or chat ``messages`` ([{"role", "content"}, ...]).

    ``steering``: {"particles": N, "extensions": K, "scheme": ..., "ess_threshold": ...,
    "patch_max_tokens": P, "entropy_threshold": nats or "auto", "weight_drop": ...,
    "potentials": [{"kind": "regex", "pattern": ...}, ...]} turns on SMC steering (each potential a
    dict as :func:`potential_message` takes it, plugin ``options`` included, or a ``Potential`` message).
    """
    sampling = pb.SamplingParams(
        top_k=top_k, stop=list(stop), ignore_eos=ignore_eos, disable_speculation=disable_speculation
    )
    if temperature is not None:
        sampling.temperature = temperature
    if top_p is not None:
        sampling.top_p = top_p
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    if seed is not None:
        sampling.seed = seed
    if logprobs is not None:  # each token's logprob and this many alternatives
        sampling.logprobs = logprobs
    req = pb.GenerateRequest(request_id=request_id, model=model, sampling=sampling)
    if steering is not None:
        spec = dict(steering)
        potentials = spec.pop("potentials", [])
        if spec.get("entropy_threshold") == "auto":  # calibrated on the prompt by the decode workers
            del spec["entropy_threshold"]
            spec["entropy_auto"] = True
        req.steering.CopyFrom(pb.SteeringSpec(**spec))
        req.steering.potentials.extend(potential_message(pot) for pot in potentials)
    if messages is not None:
        req.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    else:
        req.prompt = prompt or ""
    return req
