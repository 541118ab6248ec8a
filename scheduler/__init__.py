"""The scheduler (after Mooncake's Conductor): the public gRPC API, placement and admission."""
