"""deltaserve client: torch-free gRPC client, CLI and load generator."""
