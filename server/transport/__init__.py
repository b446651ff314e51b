"""The gRPC face: servicer, interceptors, errors to statuses, auth, TLS, reflection, options."""
