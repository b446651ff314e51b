"""Benchmarks: the real server against a bare grpcio ceiling, and cost as the data grows."""
