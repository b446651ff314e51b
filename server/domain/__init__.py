"""The rules: students, courses, enrollments, validation and page tokens; no gRPC here."""
