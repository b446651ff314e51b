"""Domain rules and transactions; called by the servicer, calling the models, never gRPC."""
