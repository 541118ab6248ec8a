"""Load testing for smcserve (``smcserve bench``). The cluster simulator is :mod:`scheduler.conductor.simulator`.

- :mod:`loadtest.workloads`: Poisson / gamma / fixed-concurrency / rate-sweep workloads and prompt text;
- :mod:`loadtest.trace`: Mooncake JSONL trace replay, scaled down;
- :mod:`loadtest.metrics`: per-request records and vLLM-style aggregate metrics;
- :mod:`loadtest.runner`: drives a workload over gRPC (``grpc.aio``) and implements ``smcserve bench``;
- :mod:`loadtest.report`: the terminal summary, JSON, JSONL records and PNG plots.
- :mod:`loadtest.server_process`: starts ``smcserve serve`` in a subprocess (tests, benchmarks).

Examples (a server on the default loopback address)::

    smcserve bench --rate 2 --num-requests 50 --max-tokens 32 --slo ttft=2000,tpot=200 --out r.json --plots plots/
    smcserve bench --workload gamma --rate 4 --burstiness 0.5 --num-requests 100
    smcserve bench --workload concurrency --concurrency 8 --num-requests 64 --smc-ratio 0.1 --smc-particles 8
    smcserve bench --rates 0.5,1,2,4 --num-requests 40 --out sweep.json --plots plots/
    smcserve bench --trace loadtest/traces/synthetic_trace.jsonl --slice t=990:1022 --max-blocks 8 \
        --block-tokens 16 --time-scale 2 --max-tokens 8 --records records.jsonl

The trace ships in ``loadtest/traces/`` (``smcserve.loadtest.trace.DEFAULT_TRACE``; source, license, sha256 in its
README). Size a replay to the server: the last example (19 requests, 1,825 prompt tokens over about a
minute) suits a 2-core machine; requests still running when the run stops are cancelled and counted
as incomplete (``cut`` in the progress bar, ``num_incomplete`` in the results).

Nothing is imported here, so ``import loadtest.trace`` stays light.
"""
