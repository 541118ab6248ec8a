"""The decode workers' internal gRPC service admits only callers that send the cluster secret."""

from __future__ import annotations

import hmac

import grpc

SECRET_HEADER = "x-smcserve-secret"


class SecretCheck(grpc.ServerInterceptor):
    """A (sync) gRPC server interceptor: calls without the cluster secret are UNAUTHENTICATED."""

    def __init__(self, secret: str):
        self.secret = secret.encode()

    def intercept_service(self, continuation, handler_call_details):
        sent = dict(handler_call_details.invocation_metadata or ()).get(SECRET_HEADER, "")
        sent = sent.encode() if isinstance(sent, str) else sent
        if not self.secret or hmac.compare_digest(sent, self.secret):
            return continuation(handler_call_details)
        return _refuse(continuation(handler_call_details))


def _refuse(handler):
    def deny(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong cluster secret")

    if handler is None:
        return None
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            lambda req, ctx: iter(deny(req, ctx) or ()),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return grpc.unary_unary_rpc_method_handler(
        deny, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )
