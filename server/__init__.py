"""The enrollment gRPC server: transport, domain services and persistence."""
