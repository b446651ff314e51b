"""Sample client for enrollment.v1.EnrollmentService: a small library (api) and a CLI (cli)."""
